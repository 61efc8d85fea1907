"""Several processes, one program: JAX's multi-controller runtime, and preemption.

`initialize` starts `jax.distributed` only when this process is one of several: a cluster that JAX
detects by itself (a SLURM step with several tasks, Open MPI, a multi-worker Cloud TPU) or an
explicit coordinator. A plain single-host run never starts it. `preemption_notice` turns SIGTERM
into a step at which every process saves a checkpoint and stops.
"""

import contextlib
import glob
import os
import signal
import threading
import urllib.request
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils


def _tpu_workers() -> int | None:
  """The number of workers of the Cloud TPU slice this VM belongs to, or None off Cloud TPU.

  GKE sets TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES); a TPU VM lists its slice's workers
  in the GCE metadata attribute `worker-network-endpoints`, asked only where TPU chips are
  attached (/dev/accel*, /dev/vfio/N) so that no other machine waits on the network.
  """
  hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES')
  if hosts is None and (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    server = os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
    request = urllib.request.Request(
        f'http://{server}/computeMetadata/v1/instance/attributes/worker-network-endpoints',
        headers={'Metadata-Flavor': 'Google'})
    try:
      with urllib.request.urlopen(request, timeout=5) as response:
        hosts = response.read().decode()
    except OSError:  # Not a Cloud TPU VM (or no metadata server): not a TPU slice.
      return None
  if not hosts:
    return None
  return len(hosts.split(',')) * int(os.environ.get('MEGASCALE_NUM_SLICES') or 1)


def detected_cluster() -> tuple[str, int] | None:
  """(name, number of processes) of the cluster this process runs in, or None.

  The environments that `jax.distributed.initialize()` detects by itself, read from what the
  schedulers document (JAX has no public API for its detectors): a SLURM step, Open MPI's
  mpirun, a Cloud TPU slice. Left out: Kubernetes (it queries the cluster's API, which a
  single-host run inside a pod must not) and mpi4py (opt-in in JAX too); use the explicit
  coordinator there.
  """
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(name in os.environ for name in slurm):
    return 'slurm', int(os.environ['SLURM_NTASKS'])
  if 'OMPI_MCA_orte_hnp_uri' in os.environ:  # Set by mpirun / mpiexec only.
    return 'ompi', int(os.environ['OMPI_COMM_WORLD_SIZE'])
  workers = _tpu_workers()
  return None if workers is None else ('tpu', workers)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime if this is one of several processes; returns whether it did.

  Explicit (any argument given, or JAX's own JAX_COORDINATOR_ADDRESS set): what is not given comes
  from the detected cluster, and must be given where there is none. Otherwise only a detected
  cluster of several processes starts it. Called without `local_device_ids`, so that JAX reads
  JAX_LOCAL_DEVICE_IDS (set by launch/gpu_slurm.sh: one process drives all GPUs of its node).
  Must run before anything touches a JAX device.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  cluster = detected_cluster()
  explicit = coordinator_address or num_processes is not None or process_id is not None
  if explicit and cluster is None and None in (coordinator_address, num_processes, process_id):
    raise ValueError(
        'Outside SLURM, Open MPI and Cloud TPU, several processes need all of '
        '--coordinator_address (or JAX_COORDINATOR_ADDRESS), --num_processes and --process_id; got '
        f'coordinator_address={coordinator_address}, num_processes={num_processes}, '
        f'process_id={process_id}.')
  count = num_processes if num_processes is not None else cluster[1] if cluster else 1
  if count <= 1:
    return False  # One process: the runtime would add nothing but a coordinator to wait for.
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


@contextlib.contextmanager
def preemption_notice() -> Iterator[Callable[[int], bool]]:
  """Yields `reached(step) -> bool`: True, at the same step on every process, once any process
  has received SIGTERM. Call it at every step; save and stop when it is True.

  Several processes: JAX's preemption sync manager (started by `jax.distributed.initialize`)
  catches SIGTERM and agrees on the step (one past the furthest any process has reached), which
  a checkpoint, being a collective, needs. One process: a SIGTERM handler sets a flag, restored
  on exit so that SIGTERM after training (during evaluation) terminates as usual.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False  # Signal handlers can only be set from the main thread.
    return
  received = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
  try:
    yield lambda step: received.is_set()
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
