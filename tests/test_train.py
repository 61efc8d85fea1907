import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import tiny_config
from ucam_jax import evaluate, train
from ucam_jax.datasets import easy_vqa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    restored = manager.restore(manager.latest_step())
  return manager.latest_step(), restored


def read_events(directory):
  """TensorBoard's own reader over every event file in `directory`, nothing sampled away."""
  events = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  events.Reload()
  return events


def test_train_and_evaluate_end_to_end(small_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(small_data_dir, eval_batch_size=64)
  results = train.train_and_evaluate(config, workdir)
  test = results['test']
  num_test = easy_vqa.EasyVqa(data_dir=small_data_dir).info.splits['test'].num_examples
  assert test['num_examples'] == num_test > 100  # Every test question, once.
  assert 0.0 <= test['accuracy'] <= 1.0 and 0.0 <= test['ece'] <= 1.0
  assert set(test['uncertainty']) == set(evaluate.uncertainty_scores(config.ucam))
  assert {'sigma2', 'predictive_variance'} <= set(test['uncertainty'])  # The method is on.
  for score in test['uncertainty'].values():
    assert 0.0 <= score['auroc_wrong'] <= 1.0 and score['mean_wrong'] >= 0.0
  # Dropout is on during the MC passes: the samples disagree somewhere.
  assert test['uncertainty']['mutual_information']['mean_wrong'] > 0
  for name in ('config.json', 'vocabulary.json', 'metrics.jsonl', 'curves.png', 'metrics.json',
               'report/index.html'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['test'] == results['test']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'train_loss' in r] == [5, 10, 15, 20]
  assert {'train_answer', 'train_uncertainty', 'train_aleatoric',
          'train_uncertainty_before_mask'} <= set(records[0])
  assert records[-1]['test_accuracy'] == results['test']['accuracy']
  assert {'learning_rate', 'questions_per_sec'} <= set(records[0])
  # TensorBoard: the same scalars, and a U-CAM figure of each report section at the test step.
  events = read_events(workdir)
  tags = events.Tags()
  assert {'train/loss', 'train/accuracy', 'train/uncertainty', 'learning_rate',
          'questions_per_sec', 'test/accuracy', 'test/ece'} <= set(tags['scalars'])
  loss = events.Scalars('train/loss')
  assert [e.step for e in loss] == [5, 10, 15, 20]
  assert [e.value for e in loss] == pytest.approx([r['train_loss'] for r in records[:4]])
  assert [e.value for e in events.Scalars('test/accuracy')] == pytest.approx(
      [test['accuracy']])
  assert [e.value for e in events.Scalars('learning_rate')] == pytest.approx(
      [float(train.learning_rate_schedule(config, 20)(s - 1)) for s in (5, 10, 15, 20)])
  assert {'report/sample', 'report/wrong', 'report/uncertain'} <= set(tags['images'])
  image = events.Images('report/sample')[0]
  assert image.step == 20 and image.width > 500 and image.encoded_image_string[:4] == b'\x89PNG'
  step, _ = _final_params(workdir)
  assert step == 20
  # Periodic saves at 10 and 20, at most checkpoints_to_keep of them.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']


def test_stop_and_resume_matches_an_uninterrupted_run(small_data_dir, tmp_path):
  config = tiny_config(small_data_dir, num_train_steps=16, checkpoint_every_steps=4,
                       eval_batch_size=64)
  config.model.dropout_rate = 0.3
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  resumed = str(tmp_path / 'resumed')
  stopping = config.copy_and_resolve_references()
  stopping.stop_at_step = 7
  stopped = train.train_and_evaluate(stopping, resumed)
  assert stopped['step'] == 7 and 'test' not in stopped
  assert _final_params(resumed)[0] == 7
  train.train_and_evaluate(config, resumed)

  (step_a, a), (step_b, b) = _final_params(straight), _final_params(resumed)
  assert step_a == step_b == 16
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)  # Exactly the same: data, dropout keys and optimiser.
  with open(os.path.join(resumed, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if 'train_loss' in line]
  assert steps == [5, 7, 10, 15, 16]  # The stopped run's lines, then the resumed run's.
  assert [e.step for e in read_events(resumed).Scalars('train/loss')] == steps


def test_profile_steps_write_a_trace(small_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  config = tiny_config(small_data_dir, num_train_steps=4, stop_at_step=3, profile_steps='2,3')
  config.ucam.mode = 'none'  # Compiles fastest; the trace is the same kind.
  train.train_and_evaluate(config, str(workdir))
  runs = os.listdir(workdir / 'plugins' / 'profile')  # Where TensorBoard's profile tab looks.
  assert len(runs) == 1
  files = os.listdir(workdir / 'plugins' / 'profile' / runs[0])
  assert [f for f in files if f.endswith('.xplane.pb')], files
  assert 'perfetto_trace.json.gz' in files, files  # For Perfetto.


@pytest.mark.parametrize('text,window', [('', None), ('2,5', (2, 5)), (' 3,3 ', (3, 3)),
                                         ('5,2', ValueError), ('0,1', ValueError),
                                         ('3', ValueError), ('a,b', ValueError)])
def test_profile_steps_are_a_window_of_steps(text, window):
  config = tiny_config(None, profile_steps=text)
  if window is ValueError:
    with pytest.raises(ValueError, match="config.profile_steps is .*'a,b'"):
      train.profile_window(config)
  else:
    assert train.profile_window(config) == window


def test_resuming_with_another_model_is_a_clear_error(small_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(small_data_dir, num_train_steps=4, stop_at_step=2),
                           workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = f.read()
  other = tiny_config(small_data_dir, num_train_steps=4)
  other.model.hidden_dim = 48
  with pytest.raises(ValueError, match='model hidden_dim was 32, now 48.*new --workdir'):
    train.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == saved  # The earlier run's record is intact.
  assert _final_params(workdir)[0] == 2


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(small_data_dir,
                                                                     tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(small_data_dir, stop_at_step=4, checkpoint_every_steps=2),
                           workdir)
  step, good = _final_params(workdir)
  assert step == 4
  diverging = tiny_config(small_data_dir, learning_rate=float('inf'), checkpoint_every_steps=2)
  with pytest.raises(FloatingPointError, match=r'nan at step [56].*step 4, is intact'):
    train.train_and_evaluate(diverging, workdir)
  step, kept = _final_params(workdir)
  assert step == 4
  for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(x, y)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='not writable.*--workdir'):
    train.train_and_evaluate(tiny_config(None), str(blocker / 'run'))


@pytest.mark.parametrize('key,value,low', [('report_questions', 0, 1), ('mc_samples', 0, 1),
                                           ('faithfulness_steps', 0, 1),
                                           ('faithfulness_questions', -1, 0)])
def test_an_evaluation_setting_below_its_minimum_is_an_error_before_training(tmp_path, key,
                                                                              value, low):
  config = tiny_config(None)
  config[key] = value
  with pytest.raises(ValueError, match=f'config.{key} must be at least {low}, got {value}'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # Nothing was written, nothing trained.


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'ucam_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_unknown_config_key_is_a_clear_error(tmp_path):
  result = _main('--config=configs/san.py', '--config.batch_sise=8', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert "Unknown config key 'batch_sise'" in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)  # Nothing ran.


def test_main_job_end_to_end(small_data_dir, tmp_path):
  """The main job, here as the baseline: the override that the README documents (on a small
  copy of easy-VQA; test_train_and_evaluate_end_to_end evaluates the whole test split)."""
  workdir = tmp_path / 'main'
  overrides = [f'--config.{k}={v}' for k, v in dict(
      data_dir=small_data_dir, num_train_steps=10, batch_size=8, eval_batch_size=64,
      log_every_steps=5, mc_samples=2, faithfulness_questions=8, faithfulness_steps=4,
      report_questions=1).items()]
  result = _main('--config=configs/san.py', f'--workdir={workdir}', *overrides,
                 '--config.model.stem_features=(8,16)', '--config.model.grid_convs=0',
                 '--config.ucam.mode=none')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'test accuracy' in result.stdout
  with open(workdir / 'metrics.json') as f:
    metrics = json.load(f)
  num_test = easy_vqa.EasyVqa(data_dir=small_data_dir).info.splits['test'].num_examples
  assert metrics['num_train_steps'] == 10 and metrics['test']['num_examples'] == num_test > 100
  assert 'sigma2' not in metrics['test']['uncertainty']  # The baseline's variance head is idle.
  assert (workdir / 'report' / 'index.html').exists()
