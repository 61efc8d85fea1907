"""The evaluation suite: the maps and their metrics against an independent computation, the
accuracy and retention metrics, and --mode=eval on a trained workdir."""

import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from scipy import stats

from tests.conftest import tiny_config
from ucam_jax import evaluate, input_pipeline, models, sharding, train
from ucam_jax.text import Vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_state(builder, data_dir, **overrides):
  """(config, vocab, the test split with its masks, an untrained state) for the tiny config."""
  config = tiny_config(data_dir, **overrides)
  vocab = Vocabulary.build(input_pipeline.question_table(builder, 'train').question)
  model = models.get_model(config, vocab.size, 13)
  source = input_pipeline.data_source(builder, 'test', with_mask=True)
  example = input_pipeline.Preprocess(vocab, config.max_question_length).map(source[0])
  batch = {'image': example['image'][None], 'question': example['question'][None, None],
           'length': example['length'][None, None]}
  state = train.create_train_state(config, model, 10, batch)
  return config, vocab, source, state


def evaluate_questions(config, vocab, state, questions, **kwargs):
  """`evaluate.evaluate` on a list of decoded examples: a split cut short."""
  batches, num_batches = input_pipeline.eval_batches(questions, vocab, config, with_mask=True)
  return evaluate.evaluate(state.params, state.apply_fn, batches, num_batches,
                           sharding.make_mesh(), config, **kwargs)


def test_map_metrics_match_an_independent_computation(builder, data_dir):
  """The baseline (mode none): no GCA attention; every other map type against scipy."""
  config, vocab, source, state = setup_state(builder, data_dir, eval_batch_size=16)
  config.ucam.mode = 'none'
  n = 40  # Three batches, the last one padded.
  questions = [source[i] for i in range(n)]
  names = builder.info.features['answer'].names
  results, out = evaluate_questions(config, vocab, state, questions, answer_names=names)
  labels = np.array([q['answer'] for q in questions])
  np.testing.assert_array_equal(out['answer'], labels)
  assert results['num_examples'] == n

  masks = np.stack([q['mask'][..., 0] > 0 for q in questions])
  h, w = out['gradcam'].shape[1:]
  cell = masks.shape[1] // h
  truth = np.array([[[masks[k, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean()
                      for j in range(w)] for i in range(h)] for k in range(n)])
  np.testing.assert_allclose(out['ground_truth'], truth, atol=1e-6)

  assert 'model_attention' not in out  # Mode none: one attention, the model's.
  maps = {'model_attention': out['attention'].mean(1), 'gradcam': out['gradcam'],
          'ucam': out['ucam'], 'random': out['random']}
  assert set(results['maps']) == set(maps) == set(evaluate.map_types(out))
  assert results['map_grid'] == [h, w]
  for name, m in maps.items():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # scipy warns on a constant map; both give nan.
      rho = np.array([stats.spearmanr(m[k].ravel(), truth[k].ravel()).statistic
                      for k in range(n)])
    got = results['maps'][name]
    assert got['spearman_questions'] == np.isfinite(rho).sum()
    if np.isfinite(rho).any():
      assert got['spearman'] == pytest.approx(np.nanmean(rho), rel=1e-6), name
    else:
      assert got['spearman'] is None
    hits = [truth[k].ravel()[np.argmax(m[k].ravel())] > 0 for k in range(n)]
    assert got['pointing_game'] == pytest.approx(np.mean(hits)), name
  assert 0 <= out['random'].min() and out['random'].max() < 1
  assert results['maps']['random']['spearman_questions'] == n  # Noise never ties.

  # One answer per question: it stands for all ten annotators, so VQA accuracy = exact match.
  assert results['vqa_accuracy'] == pytest.approx(results['accuracy'])
  correct = out['probs'].argmax(-1) == labels
  order = np.argsort(out['predictive_entropy'], kind='stable')
  retention = results['retention']
  for fraction, accuracy in zip(retention['fractions'], retention['accuracy']):
    kept = max(1, round(fraction * n))
    assert accuracy == pytest.approx(correct[order[:kept]].mean())
  assert 'accuracy_per_family' not in results  # easy-VQA has no families.

  # With one step, deletion and insertion both average the score of the image and of the
  # baseline (the mean colour), whatever the map: here against the model applied directly.
  config.faithfulness_questions, config.faithfulness_steps = 6, 1
  faithful = evaluate.faithfulness(state.params, state.apply_fn, questions, out, vocab, config)
  assert set(faithful) == set(maps)
  chosen = evaluate.sample_indices(n, 6, config.seed)
  batch = evaluate.read_questions(questions, chosen, vocab, config)
  blank = np.broadcast_to(batch['image'].mean((1, 2), keepdims=True).astype(np.uint8),
                          batch['image'].shape)
  answer = out['probs'][chosen].argmax(-1)
  logits = state.apply_fn(state.params, blank, batch['question'], batch['length'])['logits']
  blank_p = np.asarray(jax.nn.softmax(logits))[np.arange(6), answer]
  expected = (out['probs'][chosen, answer] + blank_p).mean() / 2
  for values in faithful.values():
    assert values['deletion_auc'] == pytest.approx(expected, rel=1e-4)
    assert values['insertion_auc'] == pytest.approx(expected, rel=1e-4)


def test_accuracy_per_family_and_the_human_answers_hook():
  config = tiny_config(None)
  config.ucam.mode = 'none'
  rng = np.random.default_rng(0)
  n, names = 60, ['red', 'blue', 'green', 'yes']
  probs = rng.dirichlet(np.ones(4), n)
  out = {'probs': probs, 'mc_probs': probs, 'answer': rng.integers(0, 4, n),
         'family': rng.integers(0, 3, n), 'loss': rng.random(n),
         **{score: rng.random(n) for score in evaluate.uncertainty_scores(config.ucam)}}
  results = evaluate.summarise(out, config, names, ['x', 'y', 'z'])
  assert results['mc_scope'] == 'answer' and results['mc_samples'] == config.mc_samples
  correct = probs.argmax(-1) == out['answer']
  assert results['accuracy_per_family'] == {
      family: pytest.approx(correct[out['family'] == f].mean())
      for f, family in enumerate(['x', 'y', 'z'])}
  assert 'maps' not in results  # No ground truth.
  # Ten human answers (VQA), normalised as the official evaluation does ('red.' is 'red'):
  # 3 of 10 agree -> (3 * 2/3 + 7 * 1) / 10 = 0.9; none -> 0; 1 of 10 -> 0.3.
  humans = [['red.'] * 3 + ['blue'] * 7, ['blue'] * 10, ['red', 'green'] + ['blue'] * 8]
  np.testing.assert_allclose(
      evaluate.vqa_accuracy(np.array([0, 0, 0]), None, names, humans), [0.9, 0.0, 0.3])


def test_explanations_of_a_question_do_not_depend_on_the_others(builder, data_dir):
  config, vocab, source, state = setup_state(builder, data_dir)
  preprocess = input_pipeline.Preprocess(vocab, config.max_question_length, with_mask=True)
  examples = [preprocess.map(source[i]) for i in range(4)]
  batch = {k: np.stack([x[k] for x in examples]) for k in ('image', 'question', 'length',
                                                             'answer', 'mask')}
  batch['weight'] = np.ones(4, np.float32)
  key = jax.random.PRNGKey(0)
  explain = jax.jit(lambda b: evaluate.explain_questions(state.apply_fn, state.params, b, key,
                                                         config))
  together = explain(batch)
  alone = explain({k: v[1:2] for k, v in batch.items()})
  for name in ('gradcam', 'ucam', 'word_certainty', 'ground_truth'):
    np.testing.assert_allclose(together[name][1:2], alone[name], rtol=1e-4, atol=1e-6)
    assert float(together[name].min()) >= 0 and float(together[name].max()) <= 1
  lengths = batch['length']
  for n in range(4):  # No certainty past the question's end.
    assert (np.asarray(together['word_certainty'])[n, lengths[n]:] == 0).all()


def _tree(directory):
  """{relative path: (size, mtime)} of every file under `directory`."""
  return {os.path.relpath(os.path.join(root, f), directory):
          (os.path.getsize(os.path.join(root, f)), os.path.getmtime(os.path.join(root, f)))
          for root, _, files in os.walk(directory) for f in files}


def test_mode_eval_writes_metrics_plots_and_report(small_data_dir, tmp_path):
  """A run stopped at step 4 (so it did not evaluate), then --mode=eval on it. The baseline,
  which compiles fastest (test_report covers the GCA attention)."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(small_data_dir, num_train_steps=6, stop_at_step=4, eval_batch_size=64,
                       report_questions=1, faithfulness_questions=8, faithfulness_steps=2)
  config.ucam.mode = 'none'
  assert 'test' not in train.train_and_evaluate(config, workdir)
  checkpoints = _tree(os.path.join(workdir, 'checkpoints'))

  results = train.evaluate_checkpoint(config, workdir)
  assert results['evaluated_step'] == 4
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f) == results
  test = results['test']
  assert set(test['maps']) == {'model_attention', 'gradcam', 'ucam', 'random'}
  for values in test['maps'].values():
    assert {'spearman', 'spearman_questions', 'pointing_game', 'deletion_auc',
            'insertion_auc'} <= set(values)
    assert 0 <= values['pointing_game'] <= 1 and 0 <= values['deletion_auc'] <= 1
  assert test['faithfulness'] == {'questions': 8, 'steps': 2, 'baseline': 'mean colour'}
  report = os.path.join(workdir, 'report')
  for name in ('reliability.png', 'uncertainty_vs_error.png', 'retention.png',
               'rank_correlation.png', 'index.html'):
    assert os.path.exists(os.path.join(report, name)), name
  # A question in each of the report's 4 sections, one in several drawn once.
  assert 1 <= len([f for f in os.listdir(report) if f.startswith('question_')]) <= 4
  assert _tree(os.path.join(workdir, 'checkpoints')) == checkpoints  # Only read.

  other = config.copy_and_resolve_references()
  other.ucam.mode = 'mask'
  with pytest.raises(ValueError, match="ucam was .*'none'.*now .*'mask'"):
    train.evaluate_checkpoint(other, workdir)


def test_mode_eval_without_a_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='No checkpoint.*--mode=train'):
    train.evaluate_checkpoint(tiny_config(None), str(empty))
  assert not os.listdir(empty)

  workdir = tmp_path / 'missing'
  result = subprocess.run(
      [sys.executable, '-m', 'ucam_jax.main', '--config=configs/san.py', '--mode=eval',
       f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'No checkpoint' in result.stderr and 'Traceback' not in result.stderr
  assert f'python -m ucam_jax.main --config=configs/san.py --workdir={workdir}' in result.stderr
  assert not workdir.exists()
