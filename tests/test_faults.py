"""Faults as a user or an operator meets them, at toy size: damaged checkpoints, a second run on
one workdir, a failing save, bad config values, damaged dataset and workdir files. Each test
checks how the run ends (the exception, or the exit status), its one-line message, and that
nothing good was lost or overwritten.

Most run `train_and_evaluate` in-process on a copy of one trained workdir (the baseline, which
compiles fastest); only what `main` itself does runs as a command.
"""

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.conftest import tiny_config
from ucam_jax import checkpoints, input_pipeline, storage, train
from ucam_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EARLIER_RESULTS = {'metrics.json': '{"test": {"accuracy": 0.97}}',
                   'report/index.html': '<html>the earlier run</html>'}


def _config(data_dir, **overrides):
  """6 steps, checkpoints at 2 and 4, stopping at 4: a resumed run never reaches evaluation."""
  config = tiny_config(data_dir, **{**dict(num_train_steps=6, stop_at_step=4,
                                          checkpoint_every_steps=2, log_every_steps=2),
                                       **overrides})
  config.ucam.mode = 'none'
  return config


def _tree(directory):
  """Every file under `directory` (but the lock file, which each run rewrites): its SHA-256."""
  return {os.path.relpath(path, directory): hashlib.sha256(open(path, 'rb').read()).hexdigest()
          for path in glob.glob(os.path.join(directory, '**'), recursive=True)
          if os.path.isfile(path) and os.path.basename(path) != storage.LOCK_FILE}


def _restore(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step)


def _flip_checkpoint_bytes(step_dir):
  """In the data files that Orbax reads (the per-process ones are merged into these)."""
  for path in glob.glob(os.path.join(step_dir, 'default', 'd', '*')):
    _flip_bytes(path)


def _flip_bytes(path):
  data = bytearray(open(path, 'rb').read())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  open(path, 'wb').write(bytes(data))


def _damaged_lines(text):
  return [line for line in text.splitlines() if 'is damaged' in line]


@pytest.fixture(scope='module')
def trained(small_data_dir, tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 and an earlier run's results."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(_config(small_data_dir), workdir)
  for name, text in EARLIER_RESULTS.items():
    os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text)
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(trained, copy)
  return copy


def _assert_earlier_results_intact(workdir):
  for name, text in EARLIER_RESULTS.items():
    with open(os.path.join(workdir, name)) as f:
      assert f.read() == text, name


# Checkpoint integrity, on a small TrainState saved as training saves it.

def _small_state(value=1.0):
  params = {'dense': {'kernel': jnp.full((64, 32), value), 'bias': jnp.zeros(32)}}
  return train.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3),
                                 rng=jax.random.PRNGKey(0))


def _save_two(directory):
  manager = checkpoints.manager(str(directory), max_to_keep=2)
  checkpoints.save(manager, 1, _small_state(1.0))
  checkpoints.save(manager, 2, _small_state(2.0))
  return manager


def _replace_data(step_dir):
  """Valid arrays, but not the ones saved: Orbax restores them without a word."""
  shutil.rmtree(os.path.join(step_dir, 'default'))
  shutil.copytree(os.path.join(os.path.dirname(step_dir), '1', 'default'),
                  os.path.join(step_dir, 'default'))


def _truncate_data(step_dir):
  for path in glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_data(step_dir):
  for path in glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True):
    os.remove(path)


def _delete_tree_metadata(step_dir):
  """Orbax cannot rebuild a TrainState without it. It was reported as a checkpoint of another
  model or optimiser; its arrays' recorded shapes say that it is this model's."""
  os.remove(os.path.join(step_dir, 'default', '_METADATA'))


@pytest.mark.parametrize('damage,cause', [
    (_replace_data, 'differs from the digest recorded when it was saved'),
    (_truncate_data, 'Error reading'),
    (_delete_data, 'Error reading'),
    (_delete_tree_metadata, ''),
])
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, capsys,
                                                                          damage, cause):
  manager = _save_two(tmp_path)
  damage(str(tmp_path / 'checkpoints' / '2'))
  damaged = _tree(tmp_path / 'checkpoints' / '2')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _small_state())
  state = checkpoints.restore_newest_intact(manager, abstract, str(tmp_path))
  np.testing.assert_array_equal(state.params['dense']['kernel'], 1.0)  # Step 1's.
  [line] = _damaged_lines(capsys.readouterr().err)
  assert line.startswith(f"Checkpoint step 2 is damaged ({tmp_path / 'checkpoints' / '2'}: ")
  assert cause in line and 'another model' not in line and f"Moved it to {tmp_path / 'checkpoints_damaged' / '2'}" in line
  assert manager.all_steps() == [1]
  assert _tree(tmp_path / 'checkpoints_damaged' / '2') == damaged  # Kept as it was.


def test_a_checkpoint_with_nan_parameters_is_damaged(tmp_path):
  manager = checkpoints.manager(str(tmp_path))
  checkpoints.save(manager, 1, _small_state(float('nan')))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _small_state())
  with pytest.raises(checkpoints.DamagedCheckpoint,
                     match=r"step 1 is damaged .*array .*'kernel'.* holds nan or inf"):
    checkpoints.restore_verified(manager, 1, abstract)


# Checkpoint integrity in training and --mode=eval.

def test_training_falls_back_from_flipped_bytes_and_cleans_killed_saves(trained, workdir,
                                                                         small_data_dir, capsys):
  """Flipped bytes in the latest checkpoint came back as nan parameters (the issue's default
  run), or its restore failed with pages of tracebacks; the run exited 0 and overwrote the
  earlier run's results, or died. A killed save's temporary directory goes
  too (the run holds the workdir's lock, so it is no live run's)."""
  latest = os.path.join(workdir, 'checkpoints', '4')
  _flip_checkpoint_bytes(latest)
  damaged = _tree(latest)
  leftover = os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1795949594')
  os.makedirs(leftover)
  results = train.train_and_evaluate(_config(small_data_dir), workdir)
  assert results['step'] == 4 and 'test' not in results  # Resumed from 2, stopped at 4.
  [line] = _damaged_lines(capsys.readouterr().err)
  assert line.startswith(f'Checkpoint step 4 is damaged ({latest}: ')
  assert _tree(os.path.join(workdir, 'checkpoints_damaged', '4')) == damaged
  assert not os.path.exists(leftover)
  # Steps 3 and 4 again, from step 2: exactly the parameters that the damaged file held.
  for x, y in zip(jax.tree.leaves(_restore(trained, 4)), jax.tree.leaves(_restore(workdir, 4))):
    np.testing.assert_array_equal(x, y)
  _assert_earlier_results_intact(workdir)


def test_no_intact_checkpoint_stops_training_before_it_writes(workdir, small_data_dir):
  for step in ('2', '4'):
    _flip_checkpoint_bytes(os.path.join(workdir, 'checkpoints', step))
  before = _tree(workdir)
  with pytest.raises(checkpoints.DamagedCheckpoint, match='No intact checkpoint is left'):
    train.train_and_evaluate(_config(small_data_dir), workdir)
  after = _tree(workdir)
  moved = {f'checkpoints/{k[len("checkpoints_damaged/"):]}': v for k, v in after.items()
           if k.startswith('checkpoints_damaged/')}
  assert moved == {k: v for k, v in before.items() if k.startswith('checkpoints/')}
  assert {k: v for k, v in after.items() if not k.startswith('checkpoints')} == {
      k: v for k, v in before.items() if not k.startswith('checkpoints')}
  _assert_earlier_results_intact(workdir)


def test_mode_eval_refuses_a_damaged_checkpoint_and_moves_nothing(workdir, small_data_dir):
  latest = os.path.join(workdir, 'checkpoints', '4')
  _flip_checkpoint_bytes(latest)
  before = _tree(workdir)
  with pytest.raises(checkpoints.DamagedCheckpoint) as raised:
    train.evaluate_checkpoint(_config(small_data_dir), workdir)
  message = str(raised.value)
  assert '\n' not in message and message.startswith(f'Checkpoint step 4 is damaged ({latest}: ')
  assert '--mode=eval evaluates the latest checkpoint only' in message
  assert _tree(workdir) == before


# One run per workdir.

def _hold_lock(workdir):
  """Another process holding the workdir's lock, as a running job would."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from ucam_jax import storage\n'
       'with storage.workdir_lock(sys.argv[1]):\n  print("locked", flush=True); sys.stdin.read()',
       workdir], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == 'locked\n'
  return holder


def test_a_second_run_on_a_workdir_stops_at_once_and_a_killed_runs_lock_does_not_block(
    workdir, small_data_dir):
  holder = _hold_lock(workdir)
  before = _tree(workdir)
  try:
    with pytest.raises(storage.WorkdirLocked,
                       match=rf'workdir {workdir} is in use by another run \(process '
                             rf'{holder.pid} on '):
      train.train_and_evaluate(_config(small_data_dir), workdir)
    with pytest.raises(storage.WorkdirLocked, match=f'process {holder.pid} on '):
      train.evaluate_checkpoint(_config(small_data_dir), workdir)
    assert _tree(workdir) == before  # Nothing written.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with storage.workdir_lock(workdir):  # The killed holder's lock is gone with it.
    with open(os.path.join(workdir, storage.LOCK_FILE)) as f:
      assert f.read().startswith(f'{os.getpid()} on ')


# Saves that fail.

def test_a_failed_save_stops_the_run_at_its_step_and_keeps_the_last_checkpoint(
    trained, workdir, small_data_dir, monkeypatch):
  def no_space(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', no_space)
  with pytest.raises(checkpoints.SaveFailed) as raised:
    train.train_and_evaluate(_config(small_data_dir, stop_at_step=0), workdir)  # Saves at 6.
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith(
      f"Saving the checkpoint of step 6 to {os.path.join(workdir, 'checkpoints')} failed: "
      '[Errno 28] No space left on device. Training stopped there; the last checkpoint, step 4, '
      'is intact')
  monkeypatch.undo()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert _tree(os.path.join(workdir, 'checkpoints')) == _tree(os.path.join(trained, 'checkpoints'))
  _assert_earlier_results_intact(workdir)


# Config values: an error naming the field, its value and the range, before anything is written.

@pytest.mark.parametrize('key,value,message', [
    ('num_epochs', -1.0, r'config.num_epochs must be in \[0, inf\), got -1.0'),
    ('num_epochs', 0.0, r'config.num_epochs must be in \(0, inf\) when config.num_train_steps '
                        r'is 0, got 0.0'),
    ('batch_size', 0, r'config.batch_size must be in \[1, inf\), got 0'),
    ('batch_size', 12, r'config.batch_size must be a multiple of the number of devices \(8\), '
                       r'got 12'),
    ('log_every_steps', 0, r'config.log_every_steps must be in \[1, inf\), got 0'),
    ('checkpoint_every_steps', 0, r'config.checkpoint_every_steps must be in \[1, inf\), got 0'),
    ('checkpoints_to_keep', 0, r'config.checkpoints_to_keep must be in \[1, inf\), got 0'),
    ('model.dropout_rate', 1.5, r'config.model.dropout_rate must be in \[0, 1\), got 1.5'),
    ('model.stem_features', (8, 0), r'config.model.stem_features must be in \[1, inf\), '
                                    r'got \(8, 0\)'),
    ('learning_rate', -1e-3, r'config.learning_rate must be in \(0, inf\], got -0.001'),
])
def test_a_config_value_out_of_range_is_an_error_before_anything_is_written(tmp_path, key,
                                                                            value, message):
  config = tiny_config(None, num_train_steps=0)
  *parents, name = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def _numeric_fields(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      if key != 'dataset_kwargs':  # Checked by the dataset builders.
        yield from _numeric_fields(value, f'{prefix}{key}.')
    elif isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
      yield prefix + key


def test_every_numeric_field_of_every_config_has_a_range():
  """A field added to a config without a range in train.RANGES (or the checks it names) fails
  here."""
  elsewhere = {'ucam.aleatoric_samples', 'ucam.predictive_samples', 'ucam.warmup',
               'ucam.uncertainty_weight', 'ucam.variance_learning_rate', 'mc_samples',
               'report_questions', 'faithfulness_questions', 'faithfulness_steps'}
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    module = os.path.splitext(os.path.basename(path))[0]
    if module == '__init__':
      continue
    config = __import__(f'configs.{module}', fromlist=['get_config']).get_config()
    missing = set(_numeric_fields(config)) - set(train.RANGES) - elsewhere
    assert not missing, (module, missing)
    # And the configs are in range. (base_vqa's published batch of 220 fits 1, 2 or 4 devices,
    # not the tests' 8.)
    config.batch_size -= config.batch_size % jax.device_count()
    train.check_config(config)


# Damaged data and workdir files.

def test_a_damaged_dataset_record_names_its_file_and_says_rebuild(small_data_dir, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(small_data_dir, data_dir)
  [path] = glob.glob(os.path.join(data_dir, 'ucam_easy_vqa', '*', '*-train.array_record-*'))
  _flip_bytes(path)
  with pytest.raises(input_pipeline.DamagedDataset) as raised:
    train.train_and_evaluate(_config(data_dir), str(tmp_path / 'run'))
  message = str(raised.value)
  assert '\n' not in message and message.startswith(f'The dataset file {path} is damaged (')
  assert f'Rebuild the dataset: delete {os.path.dirname(path)} and rerun' in message
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_a_killed_dataset_build_is_cleaned_at_the_next_start(small_data_dir, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(small_data_dir, data_dir)
  prepared = _tree(data_dir)
  leftover = os.path.join(data_dir, 'ucam_easy_vqa', 'incomplete.K1LLED_1.0.0')
  os.makedirs(leftover)
  with open(os.path.join(leftover, 'ucam_easy_vqa-train.array_record-00000-of-00001'),
            'wb') as f:
    f.write(b'half a shard')
  builder = input_pipeline.get_builder(_config(data_dir))
  assert not os.path.exists(leftover)
  after = _tree(data_dir)
  for tree in (prepared, after):
    tree.pop(os.path.join('ucam_easy_vqa', '.build.lock'), None)  # Each build's lock.
  assert after == prepared and builder.info.splits['train'].num_examples > 0


def test_a_damaged_workdir_json_file_names_its_path(workdir, small_data_dir):
  path = os.path.join(workdir, 'vocabulary.json')
  with open(path, 'w') as f:
    f.write('{"words": ["<pad>", "<u')  # Cut short.
  with pytest.raises(storage.DamagedFile, match=f'^{path} is damaged'):
    train.train_and_evaluate(_config(small_data_dir), workdir)
  with open(path) as f:
    assert f.read() == '{"words": ["<pad>", "<u'  # Left for the user to look at.


# What `main` prints.

def _main(*args):
  return subprocess.run([sys.executable, '-m', 'ucam_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_main_reports_a_fault_in_one_line_with_status_1(workdir):
  holder = _hold_lock(workdir)
  try:
    result = _main('--config=configs/san.py', f'--workdir={workdir}')
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'The workdir {workdir} is in use by another run (process {holder.pid} on '
      f'{os.uname().nodename}, which holds {os.path.join(workdir, storage.LOCK_FILE)}): wait '
      'for it to end, or pass another --workdir.']


def test_a_config_file_without_get_config_is_a_clear_error(tmp_path):
  config_file = tmp_path / 'no_get_config.py'
  config_file.write_text('batch_size = 8\n')
  result = _main(f'--config={config_file}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1
  assert f'The config file {config_file} defines no get_config()' in result.stderr
  assert 'Traceback' not in result.stderr and 'Unknown config key' not in result.stderr
  assert not (tmp_path / 'run').exists()
