"""Orbax checkpoints that are verified before they are trusted.

Orbax does not verify the array values that it restores: bytes flipped in the latest
checkpoint of a default run came back as nan parameters, silently, and the run overwrote the
earlier run's results with them (issue 16). Each save therefore records, in the
step's own Orbax metadata (`custom_metadata`), the dtype, shape and SHA-256 of every array of
the state; a restore recomputes them and checks that every float is finite. A checkpoint that
fails (its files unreadable, truncated or missing; a digest that differs; nan or inf) is
reported in one line. Training moves it aside to `checkpoints_damaged/` (never deletes it) and
resumes from the newest one that passes; --mode=eval refuses it.
"""

import hashlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ucam_jax import storage
from ucam_jax.errors import ConfigError, RunError

DIGEST_KEY = 'array_digests'
DAMAGED_DIR = 'checkpoints_damaged'


class DamagedCheckpoint(RunError):
  """A checkpoint whose data cannot be trusted; the message is one line: step, path, cause."""


class SaveFailed(RunError):
  """A save that did not complete (a full disk, no permission); the run stops at that step."""


def manager(workdir: str, max_to_keep: int | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoints/. Saves are synchronous, so a failed save stops the run at its
  step (an async failure surfaced a save later, under a thousand lines of tracebacks); a small
  model's save is a small part of `checkpoint_every_steps` steps. Training (not read_only)
  deletes the temporary directories of killed runs' saves first: the workdir lock makes sure
  that they are no live run's."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only)
  # The handler named, so that reading a step's metadata does not warn that it has none.
  return ocp.CheckpointManager(storage.absolute(workdir) / 'checkpoints', options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _local_value(x) -> np.ndarray:
  # The state is replicated: every process holds all of it, so every process gets one digest.
  return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def _signature(x) -> str:
  x = x if hasattr(x, 'dtype') else np.asarray(x)  # A Python scalar (a fresh state's step).
  return f'{np.dtype(x.dtype)}{list(x.shape)}'


def signatures(tree) -> dict[str, str]:
  """'dtype[shape]' of each leaf (an array or a ShapeDtypeStruct), by its key path."""
  return {jax.tree_util.keystr(path): _signature(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def digests(state) -> dict[str, str]:
  """'dtype[shape] sha256' of each array of `state`, by its key path."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _local_value(leaf)  # tobytes() is in C order, however it is laid out.
    out[jax.tree_util.keystr(path)] = (
        f'{_signature(value)} {hashlib.sha256(value.tobytes()).hexdigest()}')
  return out


def _cause(error: BaseException) -> str:
  """The innermost message of an exception chain, on one line (TensorStore's name the array and
  the file; the outer ones are pages of specs)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error) or type(error).__name__
  return ' '.join(text.split(' [tensorstore_spec=')[0].split())[:400]


def save(checkpoints: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` at `step` with its digests; raises SaveFailed naming the path and the cause.
  Orbax writes into a temporary directory and renames it when complete, so the checkpoints
  saved before are intact."""
  try:
    checkpoints.save(step, args=ocp.args.StandardSave(state),
                     custom_metadata={DIGEST_KEY: digests(state)})
    checkpoints.wait_until_finished()
  except Exception as e:  # Orbax wraps OSError (ENOSPC, EACCES) in its own errors.
    checkpoints.reload()
    kept = [s for s in checkpoints.all_steps() if s != step]
    raise SaveFailed(
        f'Saving the checkpoint of step {step} to {checkpoints.directory} failed: {_cause(e)}. '
        'Training stopped there; '
        + (f'the last checkpoint, step {max(kept)}, is intact: free space (or fix the '
           'permissions) and rerun to resume from it.' if kept else
           'no checkpoint had been saved yet: free space (or fix the permissions) and rerun.')
    ) from e


def _check_structure(recorded: dict[str, str], expected: dict[str, str]) -> None:
  """A different tree or shape means another model, not damage: say so, and move nothing."""
  recorded = {k: v.rsplit(' ', 1)[0] for k, v in recorded.items()}
  if recorded != expected:
    changed = sorted(set(recorded.items()) ^ set(expected.items()))
    raise ConfigError(
        'The checkpoints do not fit this config (they were written by a run with another model '
        f'or optimiser; see config.json): e.g. {changed[0][0]} {changed[0][1]}. Resume with the '
        'same config, or start afresh with a new --workdir.')


def restore_verified(checkpoints: ocp.CheckpointManager, step: int, abstract):
  """The state saved at `step`, restored into `abstract` (a tree of ShapeDtypeStructs) and
  verified; raises DamagedCheckpoint, or ConfigError when it is another model's."""
  path = checkpoints.directory / str(step)
  try:
    recorded = (checkpoints.metadata(step).custom_metadata or {}).get(DIGEST_KEY)
  except Exception as e:  # A damaged _CHECKPOINT_METADATA.
    raise DamagedCheckpoint(f'Checkpoint step {step} is damaged ({path}: its metadata: '
                            f'{_cause(e)}).') from e
  if recorded:  # None: saved before digests were recorded; only the finite check applies.
    _check_structure(recorded, signatures(abstract))
  try:
    state = checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    raise DamagedCheckpoint(f'Checkpoint step {step} is damaged ({path}: {_cause(e)}).') from e
  actual = digests(state)
  for key, value in (recorded or {}).items():
    if actual.get(key) != value:
      raise DamagedCheckpoint(f'Checkpoint step {step} is damaged ({path}: array {key} differs '
                              'from the digest recorded when it was saved).')
  for path_keys, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _local_value(leaf)
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise DamagedCheckpoint(f'Checkpoint step {step} is damaged ({path}: array '
                              f'{jax.tree_util.keystr(path_keys)} holds nan or inf).')
  return state


def move_aside(checkpoints: ocp.CheckpointManager, step: int, workdir: str) -> epath.Path:
  """Renames checkpoints/<step> to checkpoints_damaged/<step>[.n] (process 0; the others wait)."""
  target_dir = storage.absolute(workdir) / DAMAGED_DIR
  target = target_dir / str(step)
  n = 1
  while target.exists():
    target, n = target_dir / f'{step}.{n}', n + 1
  if jax.process_index() == 0:
    target_dir.mkdir(parents=True, exist_ok=True)
    (checkpoints.directory / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'ucam_jax_move_aside_{step}')
  checkpoints.reload()
  return target


def restore_newest_intact(checkpoints: ocp.CheckpointManager, abstract, workdir: str):
  """Training's resume: the newest checkpoint that passes `restore_verified`, or None if there
  is none. Each damaged one is reported in one line and moved aside (see `move_aside`); if
  there were checkpoints and none is intact, raises DamagedCheckpoint rather than training
  from step 0 over the earlier run's files."""
  moved = []
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      return restore_verified(checkpoints, step, abstract)
    except DamagedCheckpoint as e:
      target = move_aside(checkpoints, step, workdir)
      moved.append(str(target))
      if jax.process_index() == 0:
        print(f'{e} Moved it to {target}; trying the previous checkpoint.', file=sys.stderr,
              flush=True)
  if moved:
    raise DamagedCheckpoint(
        f'No intact checkpoint is left in {checkpoints.directory}: the damaged ones are in '
        f'{", ".join(moved)}. Rerunning trains from step 0 in this workdir (and then replaces '
        'its metrics.json and report/); a new --workdir keeps them.')
  return None

