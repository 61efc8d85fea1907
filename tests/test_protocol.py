"""The fair protocol (ucam_jax/protocol.py): the paired statistics against scipy, and the
search -> pick -> test seeds -> verdict machinery with a stand-in for training."""

import json
import os

import jax
import numpy as np
import pytest
import scipy.stats

from ucam_jax import ablation, models, protocol, train
from ucam_jax.datasets import synthetic


@pytest.mark.parametrize('seed', range(5))
def test_t_interval_and_wilcoxon_match_scipy(seed):
  rng = np.random.default_rng(seed)
  d = list(rng.normal(0.01, 0.02, 5 + seed))
  mean, low, high = protocol.t_interval(d)
  expected = scipy.stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=scipy.stats.sem(d))
  np.testing.assert_allclose([low, high], expected, atol=1e-5)  # t to 3 decimals
  assert mean == pytest.approx(np.mean(d))
  for x in (d, [-v for v in d]):
    assert protocol.wilcoxon_greater(x) == pytest.approx(
        scipy.stats.wilcoxon(x, alternative='greater', method='exact').pvalue)


def test_wilcoxon_by_hand_with_ties_zeros_and_the_five_seed_floor():
  assert protocol.wilcoxon_greater([0.1, 0.2, 0.3, 0.4, 0.5]) == 1 / 32  # the smallest p
  assert protocol.wilcoxon_greater([0, 0, 0]) == 1.0
  # [1, 1, -2] (a zero dropped): ranks 1.5, 1.5, 3; W+ = 3 or more in 5 of 8 sign patterns.
  assert protocol.wilcoxon_greater([1, 0, 1, -2]) == 5 / 8
  shown = protocol.compare([0.02, 0.03, 0.01, 0.04, 0.02], +1)
  assert shown['shown'] and shown['low'] > 0
  lower = protocol.compare([-0.02, -0.03, -0.01, -0.04, -0.02], -1)
  assert lower['shown'] and lower['high'] < 0
  assert not protocol.compare([0.02, -0.03, 0.01, 0.04, 0.02], +1)['shown']
  assert protocol.verdict([shown, lower]) == 'shown'
  assert protocol.verdict([shown, dict(n=5, shown=False)]) == 'partly shown (1 of 2)'


def _fake_metrics(config):
  """Accuracy best at learning rate 3e-3 with weight 0.3 (baseline: dropout 0.2); GCA better
  than the baseline on every seed; deterministic in (config, seed)."""
  gca = config.ucam.mode == 'mask'
  accuracy = 0.8 + 0.05 * (config.learning_rate == 3e-3) + 0.01 * config.seed
  accuracy += (0.02 * (config.ucam.uncertainty_weight == 0.3) + 0.03 * gca
               if config.ucam.mode != 'none' else 0.02 * (config.model.dropout_rate == 0.2))
  accuracy -= 0.01 * config.dataset_kwargs.seed  # The validation draw is harder.
  maps = {'model_attention': {'spearman': 0.4, 'pointing_game': 0.9}}
  if gca:
    maps['gca_attention'] = {'spearman': 0.45 + 0.001 * config.seed}
  return {'accuracy': accuracy, 'ece': 0.05 - 0.01 * gca,
          'uncertainty': {'predictive_entropy': {'auroc_wrong': 0.8}}, 'maps': maps}


def test_search_picks_on_validation_then_tests_seeds_resumes_and_gives_verdicts(
    tmp_path, monkeypatch):
  trained = []

  def fake_train(config, workdir):
    trained.append((workdir, config.learning_rate, config.dataset_kwargs.seed))
    os.makedirs(workdir, exist_ok=True)
    results = dict(test=_fake_metrics(config), wall_time_s=1.0, num_train_steps=2)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(results, f)
    return results
  monkeypatch.setattr(protocol.train, 'train_and_evaluate', fake_train)
  spec = dict(ablation.PAPER_PRESETS['paper'], seeds=(0, 1, 2, 3, 4),
              learning_rates=(1e-3, 3e-3),  # --learning_rates=1e-3,3e-3: 4 settings a variant.
              variants={k: ablation.PAPER_VARIANTS[k] for k in ('baseline', 'A-GCA')})
  make = ablation.paper_run_config(spec, str(tmp_path / 'data'))
  results = protocol.run_protocol(spec, str(tmp_path), make, log=lambda _: None)
  # 4 settings each on the validation draw (dataset seed 1), then 5 seeds on the test draw (0).
  assert len(results['search']) == 8 and len(results['test']) == 10 and len(trained) == 18
  assert all(seed == 1 for _, _, seed in trained[:8]) and all(s == 0 for *_, s in trained[8:])
  assert results['picked'] == {'baseline': 'lr0.003_dropout0.2', 'A-GCA': 'lr0.003_uw0.3'}
  assert all(lr == 3e-3 for _, lr, _ in trained[8:])
  assert [protocol.claim_number(c) for c in results['claims']] == ['1', '2', '3', '4']
  claims = {c['claim'][0]: c for c in results['claims']}
  accuracy = next(r for r in claims['3']['rows'] if r['variant'] == 'A-GCA')
  assert accuracy['n'] == 5 and accuracy['mean'] == pytest.approx(0.03) and accuracy['shown']
  assert claims['2']['rows'][0]['shown']  # GCA attention 0.45+ vs the baseline's 0.4.
  assert claims['3']['verdict'] == 'partly shown (1 of 3)'  # No P-GCA or A+P-GCA runs.
  assert claims['4']['verdict'] == 'n/a (no runs)'  # No image-only or question-only runs.
  text = protocol.report(results)
  assert '| A-GCA | lr0.003_uw0.3 | 5 |' in text and 'partly shown (1 of 3)' in text
  paths = protocol.plot_claims(results['claims'], str(tmp_path / 'figures'))
  assert [os.path.basename(p) for p in paths] == [f'ablation_claim{k}.png' for k in range(1, 5)]
  # Resumed: every run's metrics.json is read, nothing trains.
  trained.clear()
  partial = protocol.run_protocol(spec, str(tmp_path / 'none'), make, log=lambda _: None,
                                  train_missing=False)
  assert not trained and not partial['search'] and not partial['test']
  again = protocol.run_protocol(spec, str(tmp_path), make, log=lambda _: None)
  assert not trained and again['claims'] == results['claims']


def test_every_variant_gets_the_same_number_of_settings():
  for name, ucam in ablation.PAPER_VARIANTS.items():
    assert len(protocol.search_grid(ucam)) == 2, name
    assert len(protocol.search_grid(ucam, (1e-3, 3e-3))) == 4, name


def test_paper_bilinear_swaps_the_base_model_and_claims_a_transfer():
  """The 'paper_bilinear' presets: each variant's model (MCB or MLB on the grid) replaces the
  published one and its training step traces (jax.eval_shape: nothing compiles; training them
  2 steps is ucam_jax.ablation --preset=paper_bilinear_smoke); claim 5 pairs each A-GCA with
  its own base model's baseline."""
  for preset in ('paper_bilinear', 'paper_bilinear_smoke'):
    spec = ablation.PAPER_PRESETS[preset]
    assert list(spec['variants']) == ['MCB baseline', 'MCB A-GCA', 'MLB baseline', 'MLB A-GCA']
    make = ablation.paper_run_config(spec, None)
    for name, ucam in spec['variants'].items():
      (_, setting), *_ = protocol.search_grid(ucam, spec.get('learning_rates',
                                                              protocol.LEARNING_RATES))
      config = protocol.apply_setting(make(spec['test'], ucam, 0), setting)
      assert config.model.name == name.split()[0].lower() and config.model.stem_features == ()
      assert config.ucam.mode == ('none' if name.endswith('baseline') else 'mask')
      if preset == 'paper_bilinear':
        assert config.model.embed_dim == 32 and config.grid_shape == (8, 8, 64)
        # The rate chosen for the bilinear baselines on the validation draw (docs/results.md),
        # for every variant alike.
        assert config.learning_rate == 1e-2
        continue
      model = models.get_model(config, 20, 5)
      batch = synthetic.batch(0, 2, 3, grid_shape=config.grid_shape, num_answers=5,
                              vocab_size=20, max_question_length=4)
      state = jax.eval_shape(lambda b: train.create_train_state(config, model, 2, b), batch)
      _, metrics = jax.eval_shape(lambda s, b: train.train_step(s, b, config.ucam), state, batch)
      assert metrics['loss'].shape == ()

  def record(variant, seed, accuracy):
    return dict(variant=variant, seed=seed, test={
        'accuracy': accuracy, 'uncertainty': {'predictive_entropy': {'auroc_wrong': 0.8}},
        'maps': {'model_attention': {'spearman': 0.4}}})
  records = [record('MCB baseline', s, 0.8) for s in range(5)]
  records += [record('MCB A-GCA', s, 0.81 + 0.001 * s) for s in range(5)]
  (claim,) = protocol.claim_rows(records, ablation.PAPER_PRESETS['paper_bilinear']['claims'])
  rows = {(r['variant'], r['column']): r for r in claim['rows']}
  assert protocol.claim_number(claim) == '5' and len(rows) == 6
  assert rows['MCB A-GCA', 'accuracy']['shown'] and rows['MCB A-GCA', 'accuracy']['n'] == 5
  assert rows['MCB A-GCA', 'accuracy']['reference'] == 'MCB baseline'
  assert not rows['MCB A-GCA', 'AUROC wrong (pred. entropy)']['shown']  # No difference.
  assert rows['MLB A-GCA', 'accuracy']['n'] == 0  # No MLB runs: not evaluated.
  assert claim['verdict'] == 'partly shown (1 of 6)'
