"""The explanation report: one figure per sampled test question, an HTML page with escaped text,
maps that do not depend on the other questions."""

import os

import jax
import numpy as np

from tests.conftest import tiny_config
from ucam_jax import input_pipeline, models, report, train
from ucam_jax.text import Vocabulary


def _setup(builder, data_dir, **overrides):
  config = tiny_config(data_dir, **overrides)
  vocab = Vocabulary.build(input_pipeline.question_table(builder, 'train').question)
  model = models.get_model(config, vocab.size, 13)
  source = input_pipeline.data_source(builder, 'test')
  example = input_pipeline.Preprocess(vocab, config.max_question_length).map(source[0])
  batch = {'image': example['image'][None], 'question': example['question'][None, None],
           'length': example['length'][None, None]}
  state = train.create_train_state(config, model, 10, batch)
  return config, vocab, source, state


def test_report_has_a_figure_per_question_and_escapes_text(builder, data_dir, tmp_path):
  config, vocab, source, state = _setup(builder, data_dir, report_questions=3)
  names = [f'<script>{n}</script> $x^2$ &' for n in builder.info.features['answer'].names]
  sample = report.explain_sample(state.apply_fn, state.params, source, vocab, config)
  page = report.write(str(tmp_path), sample, vocab, names, config, {'accuracy': 0.5})
  indices = report.sample_indices(len(source), 3, config.seed)
  pngs = sorted(f for f in os.listdir(tmp_path / 'report') if f.endswith('.png'))
  assert pngs == [f'question_{i:06d}.png' for i in indices]
  text = open(page).read()
  assert '<script>' not in text and '&lt;script&gt;' in text and '&amp;' in text
  assert all(f'src="{name}"' in text for name in pngs)
  # The sample is fixed by the seed.
  np.testing.assert_array_equal(indices, report.sample_indices(len(source), 3, config.seed))


def test_explanations_of_a_question_do_not_depend_on_the_others(builder, data_dir):
  config, vocab, source, state = _setup(builder, data_dir)
  preprocess = input_pipeline.Preprocess(vocab, config.max_question_length)
  examples = [preprocess.map(source[i]) for i in range(4)]
  batch = {k: np.stack([x[k] for x in examples]) for k in ('image', 'question', 'length',
                                                             'answer')}
  batch['weight'] = np.ones(4, np.float32)
  key = jax.random.PRNGKey(0)
  explain = jax.jit(lambda b: report.explain_questions(state.apply_fn, state.params, b, key,
                                                       config))
  together = explain(batch)
  alone = explain({k: v[1:2] for k, v in batch.items()})
  for name in ('gradcam', 'ucam', 'word_certainty'):
    np.testing.assert_allclose(together[name][1:2], alone[name], rtol=1e-4, atol=1e-6)
    assert float(together[name].min()) >= 0 and float(together[name].max()) <= 1
  lengths = batch['length']
  for n in range(4):  # No certainty past the question's end.
    assert (np.asarray(together['word_certainty'])[n, lengths[n]:] == 0).all()
