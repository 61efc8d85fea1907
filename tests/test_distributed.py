"""Several processes, preemption and mixed precision.

The multi-process tests start real `python -m ucam_jax.main` processes that meet through JAX's
coordinator on 127.0.0.1, each with its own fake CPU devices, and train on a cut-down easy-VQA.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import san
from tests.conftest import tiny_config
from ucam_jax import distributed, input_pipeline, models, train
from ucam_jax.text import Vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def small_config(data_dir, **overrides):
  """The tiny config with the baseline loss, which compiles fastest: how the processes share the
  work does not depend on the loss (the bfloat16 test below runs the U-CAM default)."""
  config = tiny_config(data_dir, num_train_steps=12, log_every_steps=2, checkpoint_every_steps=6,
                       mc_samples=2, eval_batch_size=64)
  config.ucam.mode = 'none'
  config.update(overrides)
  return config


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def config_flags(config) -> list[str]:
  """The --config.* flags that turn configs/san.py into `config`."""
  default = _flat(san.get_config())
  return [f'--config.{k}={v}' for k, v in _flat(config).items() if default.get(k) != v]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Job:
  """`python -m ucam_jax.main` as `num_processes` processes, each with `devices` CPU devices."""

  def __init__(self, workdir, config, num_processes=1, devices=8):
    self.workdir, self.procs, self.logs = str(workdir), [], []
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                         '--xla_backend_optimization_level=0')
    args = [sys.executable, '-m', 'ucam_jax.main', '--config=configs/san.py',
            f'--workdir={workdir}', *config_flags(config)]
    port = free_port()
    for i in range(num_processes):
      extra = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
                f'--process_id={i}'] if num_processes > 1 else [])
      log = open(os.path.join(os.path.dirname(self.workdir), f'{workdir.name}.{i}.log'), 'w+')
      self.logs.append(log)  # A file, not a pipe: a full pipe would stall a process mid-run.
      self.procs.append(subprocess.Popen(args + extra, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, text=True))

  def wait_for_step(self, step: int) -> None:
    """Returns once metrics.jsonl has a line for `step` (log_every_steps=1)."""
    path = os.path.join(self.workdir, 'metrics.jsonl')
    deadline = time.time() + TIMEOUT_S
    try:
      while time.time() < deadline:
        assert all(p.poll() is None for p in self.procs), self.output(0)
        if os.path.exists(path):
          with open(path) as f:
            if any(json.loads(line)['step'] >= step for line in f if line.endswith('\n')):
              return
        time.sleep(0.05)
      raise TimeoutError(f'no step {step} in {path}')
    except BaseException:
      self.kill()  # The others would wait for the coordinator for minutes.
      raise

  def wait(self) -> list[str]:
    """Waits for every process; returns their outputs, after checking that each exited 0."""
    try:
      for p in self.procs:
        p.wait(timeout=TIMEOUT_S)
    finally:
      self.kill()
    outputs = [self.output(i) for i in range(len(self.procs))]
    for log in self.logs:
      log.close()
    for p, out in zip(self.procs, outputs):
      assert p.returncode == 0, out[-3000:]
    return outputs

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()

  def output(self, i: int) -> str:
    self.logs[i].flush()
    with open(self.logs[i].name) as f:
      return f.read()


def checkpoint(workdir):
  """(latest step, its state) of a run's checkpoints, on this process's first device, whatever
  devices wrote it."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          manager.item_metadata(step))
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))


def train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['train_loss'] for r in map(json.loads, f) if 'train_loss' in r}


# Two processes with 4 devices each against one with 8. The global batches are the same row for
# row (so are the dropout masks); only the cross-device sums may add up in another order (gloo
# between the processes), which is float32 round-off, amplified a little by Adam where gradients
# are near 0. Measured here after 30 steps: losses 2e-7 apart (relative), parameters and Adam
# moments 3e-7 (absolute; 2e-6 in other runs), test metrics 3e-8 (relative).
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


def test_two_processes_preempted_and_resumed_end_like_one(small_data_dir, tmp_path):
  """Two processes train, one of them gets SIGTERM, both stop at the same step, the rerun of
  both resumes and evaluates: the losses, parameters and test metrics are those of one process
  that was never stopped."""
  config = small_config(small_data_dir, num_train_steps=30, log_every_steps=1,
                        checkpoint_every_steps=10)
  one = train.train_and_evaluate(config, str(tmp_path / 'one'))  # This process: 8 devices.

  two = tmp_path / 'two'
  job = Job(two, config, num_processes=2, devices=4)
  job.wait_for_step(3)
  job.procs[1].send_signal(signal.SIGTERM)  # Process 1 only: JAX's preemption sync tells 0.
  outputs = job.wait()  # Both exit 0: neither was left waiting in the collective save.
  stopped, _ = checkpoint(two)
  assert 3 <= stopped < 30, outputs[0][-3000:]
  assert f'Stopped at step {stopped} of 30 (SIGTERM)' in outputs[0]
  assert max(train_losses(two)) == stopped  # Process 0 logged up to the step they agreed on.

  outputs = Job(two, config, num_processes=2, devices=4).wait()
  assert 'test accuracy' in outputs[0] and 'test accuracy' not in outputs[1]  # Process 0 reports.
  with open(two / 'metrics.json') as f:
    results = json.load(f)
  assert not [f for f in os.listdir(two) if f.endswith('.tmp')]

  losses_one, losses_two = train_losses(tmp_path / 'one'), train_losses(two)
  assert list(losses_one) == list(losses_two) == list(range(1, 31))
  np.testing.assert_allclose(list(losses_two.values()), list(losses_one.values()),
                             rtol=LOSS_RTOL)
  (step_one, state_one), (step_two, state_two) = checkpoint(tmp_path / 'one'), checkpoint(two)
  assert step_one == step_two == 30
  for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_two), strict=True):
    np.testing.assert_allclose(b, a, atol=PARAM_ATOL, rtol=0)
  # The evaluation gathers every process's rows: the same questions, the same answers.
  test_one, test_two = one['test'], results['test']
  assert test_two['num_examples'] == test_one['num_examples'] > 200
  assert test_two['accuracy'] == test_one['accuracy']
  for key in ('loss', 'ece', 'mc_nll', 'mc_brier'):
    np.testing.assert_allclose(test_two[key], test_one[key], rtol=LOSS_RTOL)
  np.testing.assert_allclose(test_two['uncertainty']['predictive_entropy']['mean_wrong'],
                             test_one['uncertainty']['predictive_entropy']['mean_wrong'],
                             rtol=LOSS_RTOL)


def test_sigterm_checkpoints_and_the_rerun_ends_like_an_uninterrupted_run(small_data_dir,
                                                                          tmp_path):
  # stop_at_step ends both runs before the evaluation, which this test does not need.
  config = small_config(small_data_dir, num_train_steps=400, stop_at_step=40, log_every_steps=1,
                        checkpoint_every_steps=1000)
  config.model.dropout_rate = 0.3
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  job = Job(tmp_path / 'stopped', config)
  job.wait_for_step(3)
  job.procs[0].send_signal(signal.SIGTERM)
  [output] = job.wait()  # Exit status 0: a clean stop.
  step, _ = checkpoint(tmp_path / 'stopped')
  assert 3 <= step < 40, output[-2000:]
  assert f'Stopped at step {step} of 400 (SIGTERM)' in output
  assert max(train_losses(tmp_path / 'stopped')) == step  # Logged up to the step it saved.

  train.train_and_evaluate(config, str(tmp_path / 'stopped'))  # The rerun resumes.
  (step_a, a), (step_b, b) = checkpoint(tmp_path / 'straight'), checkpoint(tmp_path / 'stopped')
  assert step_a == step_b == 40
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)  # Exactly: data, dropout keys and optimiser state.


def _as_processes(monkeypatch, count, make):
  """[make() as seen by process 0, 1, ...] of `count` processes with one device each."""
  monkeypatch.setattr(jax, 'device_count', lambda: count)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  out = []
  for index in range(count):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    out.append(make())
  return out


def test_processes_read_the_rows_of_the_batches_one_process_reads(monkeypatch):
  config = tiny_config(None, batch_size=4, eval_batch_size=4)
  groups = [{'image_id': np.int32(i)} for i in range(10)]

  def first_batches():
    batches = input_pipeline.train_batches(groups, config)
    return [next(batches)['image_id'] for _ in range(3)]

  [one] = _as_processes(monkeypatch, 1, first_batches)
  two = _as_processes(monkeypatch, 2, first_batches)
  for step in range(3):  # Process 0's rows, then process 1's: the batch of one process.
    np.testing.assert_array_equal(np.concatenate([two[0][step], two[1][step]]), one[step])

  # 9 questions in global batches of 4: process 0 has 3 batches of its own, process 1 has 2, plus
  # one of padding, since each batch is a step that every process runs.
  vocab = Vocabulary.build(['is there a red shape?'])
  source = [{'question': b'is there a red shape?', 'image': np.zeros((4, 4, 3), np.uint8),
             'answer': i, 'image_id': i} for i in range(9)]
  evaluation = lambda: input_pipeline.eval_batches(source, vocab, config)
  [(one, num_one)], two = _as_processes(monkeypatch, 1, evaluation), _as_processes(
      monkeypatch, 2, evaluation)
  assert num_one == two[0][1] == two[1][1] == 3
  two = [list(batches) for batches, _ in two]
  assert [len(batches) for batches in two] == [3, 3]
  for k, batch in enumerate(one):
    rows = {key: np.concatenate([two[0][k][key], two[1][k][key]]) for key in batch}
    real = rows['weight'] > 0
    np.testing.assert_array_equal(rows['weight'], batch['weight'])
    np.testing.assert_array_equal(rows['image_id'][real], batch['image_id'][real])


@pytest.fixture
def no_cluster(monkeypatch):
  """No cluster in the environment, and jax.distributed.initialize recorded, not run."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR')):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: calls.append(args))
  return calls


def test_a_single_process_never_starts_the_distributed_runtime(no_cluster, monkeypatch):
  assert distributed.detected_cluster() is None
  assert not distributed.initialize()
  assert not distributed.initialize(num_processes=1, process_id=0,
                                    coordinator_address='127.0.0.1:1234')
  # A SLURM step of one task (srun -n 1, or a plain sbatch script) is one process too.
  slurm = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node[001-002]', SLURM_NTASKS='1',
               SLURM_PROCID='0', SLURM_LOCALID='0')
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == ('slurm', 1)
  assert not distributed.initialize()
  assert no_cluster == []


def test_clusters_are_detected_from_their_environment(no_cluster, monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')  # GKE, a 4-worker slice
  assert distributed.detected_cluster() == ('tpu', 4)
  monkeypatch.setenv('MEGASCALE_NUM_SLICES', '2')
  assert distributed.detected_cluster() == ('tpu', 8)
  monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1234.0;tcp://10.0.0.1:5678')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '3')
  assert distributed.detected_cluster() == ('ompi', 3)


def test_several_processes_start_it(no_cluster, monkeypatch):
  assert distributed.initialize('10.0.0.1:1234', num_processes=4, process_id=2)
  with pytest.raises(ValueError, match='--num_processes and --process_id'):
    distributed.initialize('10.0.0.1:1234')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  with pytest.raises(ValueError, match='JAX_COORDINATOR_ADDRESS'):
    distributed.initialize()
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  slurm = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node[001-002]', SLURM_NTASKS='2',
               SLURM_PROCID='1', SLURM_LOCALID='0')
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize()  # JAX reads the rest from SLURM; no local_device_ids.
  assert no_cluster == [('10.0.0.1:1234', 4, 2), (None, None, None)]


def _batch(batch=8, group=3, length=6, vocab=20, answers=13):
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (batch, 64, 64, 3), np.uint8),
          'question': rng.integers(2, vocab, (batch, group, length), np.int32),
          'length': np.full((batch, group), length, np.int32),
          'answer': rng.integers(0, answers, (batch, group), np.int32),
          'weight': np.ones((batch, group), np.float32)}


def test_bfloat16_compute_keeps_float32_parameters_and_loss():
  config = tiny_config(None)  # The default U-CAM mode: GCA, gradients of bfloat16 features.
  batch = _batch()
  model = models.get_model(config, vocab_size=20, num_answers=13)
  state = jax.jit(lambda b: train.create_train_state(config, model, 10, b))(batch)
  config.model.dtype = 'bfloat16'
  bf16 = models.get_model(config, vocab_size=20, num_answers=13)
  shapes = jax.eval_shape(lambda b: train.create_train_state(config, bf16, 10, b).params, batch)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype('float32')}
  assert bf16.apply(state.params, batch['image'], method='encode_image').dtype == jnp.bfloat16

  step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
  _, float32_metrics = step(state, batch)
  new, bfloat16_metrics = step(state.replace(apply_fn=bf16.apply), batch)
  for leaf in jax.tree.leaves((new.params, new.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)  # Parameters and Adam's moments stay float32.
  loss = bfloat16_metrics['loss']
  assert loss.dtype == jnp.float32 and np.isfinite(loss)  # Logits and loss in float32.
  # bfloat16 keeps about 3 significant digits; measured here: 1e-4 apart.
  np.testing.assert_allclose(loss, float32_metrics['loss'], rtol=5e-3)
