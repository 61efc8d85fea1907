"""The report: evaluation plots, one figure per sampled test question, an HTML page that links
them all with escaped text."""

import os

import numpy as np

from tests.test_evaluate import evaluate_questions, setup_state
from ucam_jax import evaluate, report


def test_report_has_plots_a_figure_per_question_and_escapes_text(builder, data_dir, tmp_path):
  config, vocab, source, state = setup_state(builder, data_dir, report_questions=3,
                                             eval_batch_size=16)
  questions = [source[i] for i in range(16)]
  results, outputs = evaluate_questions(config, vocab, state, questions)
  names = [f'<script>{n}</script> $x^2$ &' for n in builder.info.features['answer'].names]
  sample = evaluate.explain_sample(outputs, questions, vocab, config)
  spearman = {name: rho for name, (rho, _) in evaluate.attention_agreement(outputs).items()}
  plots = report.plot_evaluation(str(tmp_path), outputs, results, spearman)
  assert plots == ['reliability.png', 'uncertainty_vs_error.png', 'retention.png',
                   'rank_correlation.png']
  page = report.write(str(tmp_path), sample, vocab, names, config, {'accuracy': 0.5},
                      plots=plots, maps=results['maps'])
  indices = evaluate.sample_indices(16, 3, config.seed)
  pngs = sorted(f for f in os.listdir(tmp_path / 'report') if f.startswith('question_'))
  assert pngs == [f'question_{i:06d}.png' for i in indices]
  text = open(page).read()
  assert '<script>' not in text and '&lt;script&gt;' in text and '&amp;' in text
  assert all(f'src="{name}"' in text for name in pngs + plots)
  assert text.index('reliability.png') < text.index(pngs[0])  # The plots come first.
  assert 'Grad-CAM' in text and 'GCA attention' in text  # The table of map metrics.
  for name in plots:
    assert (tmp_path / 'report' / name).read_bytes().startswith(b'\x89PNG')
  # The sample is fixed by the seed.
  np.testing.assert_array_equal(indices, evaluate.sample_indices(16, 3, config.seed))
