"""The report: evaluation plots, one figure per question of its sections (a sample, wrong
answers, the most uncertain, the most confident wrong ones), an HTML page that links them all
with escaped text."""

import os

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tests.test_evaluate import evaluate_questions, setup_state
from ucam_jax import evaluate, report


def test_report_shows_wrong_and_uncertain_answers_and_escapes_text(builder, data_dir, tmp_path):
  config, vocab, source, state = setup_state(builder, data_dir, report_questions=3,
                                             eval_batch_size=16)
  questions = [source[i] for i in range(16)]
  results, outputs = evaluate_questions(config, vocab, state, questions)
  names = [f'<script>{n}</script> $x^2$ &' for n in builder.info.features['answer'].names]
  sample = evaluate.explain_sample(outputs, questions, vocab, config)
  sample['text'][0] = '<b>what</b> & "shape"'  # Question text is data too.
  spearman = {name: rho for name, (rho, _) in evaluate.attention_agreement(outputs).items()}
  plots = report.plot_evaluation(str(tmp_path), outputs, results, spearman)
  assert plots == ['reliability.png', 'uncertainty_vs_error.png', 'retention.png',
                   'rank_correlation.png']
  page = report.write(str(tmp_path), sample, vocab, names, config, {'accuracy': 0.5},
                      plots=plots, maps=results['maps'])

  # The sections, from an untrained model's answers: most are wrong.
  sections, entropy = sample['sections'], outputs['predictive_entropy']
  wrong = np.flatnonzero(outputs['probs'].argmax(-1) != outputs['answer'])
  assert list(sections) == ['sample', 'wrong', 'uncertain', 'confident_wrong']
  assert len(wrong) >= 3 and all(len(v) == 3 for v in sections.values())
  np.testing.assert_array_equal(sections['sample'], evaluate.sample_indices(16, 3, config.seed))
  assert set(sections['wrong']) <= set(wrong)
  np.testing.assert_array_equal(sections['wrong'],
                                wrong[evaluate.sample_indices(len(wrong), 3, config.seed)])
  assert sorted(entropy[sections['uncertain']], reverse=True) == sorted(entropy)[::-1][:3]
  assert list(entropy[sections['uncertain']]) == sorted(entropy[sections['uncertain']])[::-1]
  assert list(entropy[sections['confident_wrong']]) == sorted(entropy[wrong])[:3]
  shown = np.unique(np.concatenate(list(sections.values())))
  pngs = sorted(f for f in os.listdir(tmp_path / 'report') if f.startswith('question_'))
  assert pngs == [report.figure_name(i) for i in shown]  # One figure per question.

  text = open(page).read()
  positions = [text.index(f'id="{key}"') for key in sections]
  assert positions == sorted(positions)
  for key, end in zip(sections, positions[1:] + [len(text)]):
    part = text[text.index(f'id="{key}"'):end]
    assert all(f'src="{report.figure_name(i)}"' in part for i in sections[key]), key
  assert '<script>' not in text and '&lt;script&gt;' in text and '&amp;' in text
  assert '&lt;b&gt;what&lt;/b&gt; &amp; &quot;shape&quot;' in text and '<b>what' not in text
  assert all(f'src="{name}"' in text for name in plots)
  assert text.index('reliability.png') < text.index(pngs[0])  # The plots come first.
  assert 'Grad-CAM' in text and 'GCA attention' in text  # The table of map metrics.
  for href in ('../curves.png', '../config.json', '../metrics.json'):
    assert f'href="{href}"' in text
  # Uncertainty with significant digits (sigma^2 may be 1e-6), the top answers with spread.
  n = int(np.flatnonzero(sample['index'] == sections['wrong'][0])[0])
  assert f"sigma<sup>2</sup> {float(sample['sigma2'][n]):.3g}" in text
  assert f"mutual information {float(sample['mutual_information'][n]):.3g}" in text
  assert text.count('&plusmn;') >= len(shown) * evaluate.TOP_ANSWERS
  np.testing.assert_allclose(sample['top_probs'][n],
                             np.sort(sample['mc_probs'][n])[::-1][:evaluate.TOP_ANSWERS])
  assert (sample['top_spread'] > 0).any()  # Dropout is on: the passes disagree.
  for name in plots + pngs:
    assert (tmp_path / 'report' / name).read_bytes().startswith(b'\x89PNG')
  with Image.open(tmp_path / 'report' / pngs[0]) as image:
    assert 700 <= image.width <= 1200  # Shown at its size on a laptop screen, no overflow.
  images = report.first_figures(str(tmp_path), sample)
  assert list(images) == [f'report/{key}' for key in sections]
  assert all(x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8 for x in images.values())


def test_overlay_draws_maps_on_one_scale_or_each_on_its_own():
  image = np.zeros((64, 64, 3), np.uint8)
  heatmap = np.array([[0.0, 0.2], [0.1, 0.4]])
  fig = Figure()
  ax = fig.add_subplot()
  shared = report.overlay(ax, image, heatmap, 'map', 0.0, 0.8, colorbar=True)
  assert shared.get_clim() == (0.0, 0.8) and shared.get_array().max() == pytest.approx(0.4)
  assert len(fig.axes) == 2  # The colour bar.
  own = report.overlay(fig.add_subplot(), image, heatmap, 'map')
  assert own.get_clim() == (0.0, 1.0) and own.get_array().max() == pytest.approx(1.0)
  assert own.get_extent() == [0, 64, 64, 0]  # Over the whole image.
  with pytest.raises(ValueError, match='per_map'):
    report.figure(None, image, [], np.zeros(0), '', {}, scale='own')
