"""The ablation command (ucam_jax/ablation.py): its runs, resuming, and the table."""

import json
import os
import statistics

from ucam_jax import ablation


def test_smoke_runs_each_seed_once_and_resumes_without_training(tmp_path):
  messages = []
  run = dict(variants=['baseline'], datasets=['grounded_shapes'], log=messages.append)
  records = ablation.run_all('smoke', str(tmp_path), str(tmp_path / 'tfds'), **run)
  assert [(r['variant'], r['seed']) for r in records] == [('baseline', 0), ('baseline', 1)]
  assert sum('training' in m for m in messages) == 2
  assert all(r['num_train_steps'] == 3 and 0 <= r['test']['accuracy'] <= 1 for r in records)
  assert all(r['test']['maps']['ucam']['pointing_game'] >= 0 for r in records)

  messages.clear()
  again = ablation.run_all('smoke', str(tmp_path), str(tmp_path / 'tfds'), **run)
  assert not any('training' in m for m in messages)
  assert [r['test'] for r in again] == [r['test'] for r in records]
  # The progress so far: the runs in the directory, and nothing trained for the missing ones.
  run['variants'] = ['baseline', 'A-GCA']
  done = ablation.run_all('smoke', str(tmp_path), None, train_missing=False, **run)
  assert [(r['variant'], r['seed']) for r in done] == [('baseline', 0), ('baseline', 1)]
  assert not any('training' in m for m in messages)


def _record(variant, seed, accuracy, spearman=None):
  test = {'accuracy': accuracy, 'ece': 0.1, 'nll': 0.2,
          'uncertainty': {'predictive_entropy': {'auroc_wrong': 0.9}}}
  if spearman is not None:
    test['maps'] = {'model_attention': {'spearman': spearman, 'pointing_game': 0.5}}
  return dict(dataset='grounded_shapes', variant=variant, seed=seed, wall_time_s=10.0 + seed,
              num_train_steps=5, test=test)


def test_table_gives_mean_and_sample_deviation_over_seeds():
  records = [_record('baseline', s, a, 0.1 * s) for s, a in enumerate([0.5, 0.7, 0.9])]
  records += [_record('A-GCA', 0, 0.8, None), _record('A-GCA', 1, 0.6, 0.3)]
  text = ablation.table(records)
  mean, sd = statistics.mean([0.5, 0.7, 0.9]), statistics.stdev([0.5, 0.7, 0.9])
  assert f'| baseline | 3 | {mean:.4f} ± {sd:.4f} |' in text
  assert '| A-GCA | 2 | 0.7000 ± 0.1414 |' in text
  assert '0.3000 (1 n/a)' in text  # A-GCA's one seed without a Spearman value is named.
  assert '5 training steps a run' in text
  assert text.count('\n| ') == 3  # The header and the two variants.


def test_switches_flip_one_switch_of_a_gca_on_another_draw_of_grounded_shapes():
  spec = ablation.PRESETS['switches']
  reference = ablation.SWITCH_VARIANTS['A-GCA']
  for name, ucam in spec['variants'].items():
    if name.startswith('A-GCA, '):
      assert len(set(ucam.items()) - set(reference.items())) == 1, name
  (make_config, overrides), = spec['datasets'].values()
  config = ablation.run_config(make_config, overrides, reference, 0, None, smoke=False)
  full = ablation.PRESETS['full']['datasets']['grounded_shapes']
  table_config = ablation.run_config(*full, reference, 0, None, smoke=False)
  # The same sizes and training as the table's grounded shapes, but other images.
  assert config.dataset_kwargs.seed != table_config.dataset_kwargs.seed
  config.dataset_kwargs.seed = table_config.dataset_kwargs.seed
  assert config.to_dict() == table_config.to_dict()


def test_seeds_and_num_epochs_replace_the_presets_and_a_diverged_run_is_recorded(
    tmp_path, monkeypatch):
  configs = []

  def fake_train(config, workdir):  # Records the config; leaves what a finished run leaves.
    configs.append(config)
    if config.ucam.sign == 'uncertainty':
      raise FloatingPointError('The training loss is nan at step 3.')
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump({'wall_time_s': 1.0, 'num_train_steps': 7, 'test': {'accuracy': 0.5}}, f)

  monkeypatch.setattr(ablation.train, 'train_and_evaluate', fake_train)
  variants = ['A-GCA, uncertainty sign', 'A-GCA', 'baseline']
  records = ablation.run_all('switches', str(tmp_path), variants=variants, seeds=[2],
                             num_epochs=32.0, log=lambda _: None)
  assert [(r['variant'], r['seed']) for r in records] == [(v, 2) for v in variants]
  assert [(c.seed, c.num_epochs, c.ucam.mode) for c in configs] == [
      (2, 32.0, 'mask'), (2, 32.0, 'mask'), (2, 32.0, 'none')]
  assert 'nan at step 3' in records[0]['diverged'] and 'test' not in records[0]
  text = ablation.table(records)
  assert '| A-GCA, uncertainty sign | 0 (1 diverged) | n/a |' in text
  assert '| A-GCA | 1 | 0.5000 |' in text
