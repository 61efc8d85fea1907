"""The report in workdir/report/ (SPEC section 7, issue 3): plots of the evaluation, one figure per
sampled test question, and index.html showing them all. Renders what `ucam_jax.evaluate` computed.

Plots: the reliability diagram, predictive entropy of correct and of wrong answers (uncertainty vs
error), accuracy against the fraction of questions retained, and, on splits with ground-truth
attention, a histogram of each map type's Spearman rank correlation with it.

Per question, one PNG: the image; the model's attention; the GCA attention (the attention after
the certainty mask, in mode 'mask'); Grad-CAM of the answer's logit and U-CAM of its uncertainty,
both over the image grid; the ground-truth attention where the split has it; the question's words
with their certainty; the answer with its uncertainty. Questions and answers are data, so they
are escaped in the HTML and never parsed as mathtext in the figures.
"""

import html

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from ucam_jax import metrics, storage

REPORT_DIR = 'report'


def overlay(ax, image, heatmap, title):
  """The image with a map over it, scaled to its maximum (attention sums to 1, maps peak at 1)."""
  ax.imshow(image)
  if heatmap is not None:
    heatmap = heatmap / max(float(heatmap.max()), 1e-12)
    h, w = image.shape[:2]
    ax.imshow(heatmap, cmap='jet', alpha=0.5, vmin=0, vmax=1, extent=(0, w, h, 0),
              interpolation='bilinear')
  ax.set_title(title, fontsize=8)
  ax.axis('off')


def figure(path, image, words, certainty, caption, maps: dict) -> None:
  """One question's PNG: image panels over a bar chart of word certainty."""
  fig = Figure(figsize=(2.0 * (len(maps) + 1), 3.6))
  grid = fig.add_gridspec(2, len(maps) + 1, height_ratios=(3, 1.1))
  overlay(fig.add_subplot(grid[0, 0]), image, None, 'image')
  for i, (title, heatmap) in enumerate(maps.items(), start=1):
    ax = fig.add_subplot(grid[0, i])
    if heatmap is None:
      ax.text(0.5, 0.5, 'n/a without\nthe GCA mask', ha='center', va='center', fontsize=8)
      ax.set_title(title, fontsize=8)
      ax.axis('off')
    else:
      overlay(ax, image, heatmap, title)
  bars = fig.add_subplot(grid[1, :])
  bars.bar(range(len(words)), certainty[:len(words)], color='tab:green')
  bars.set_xticks(range(len(words)), words, fontsize=8, parse_math=False)
  bars.set_ylim(0, 1)
  bars.set_ylabel('word certainty', fontsize=7)
  bars.tick_params(axis='y', labelsize=7)
  fig.suptitle(caption, fontsize=8, parse_math=False)
  fig.tight_layout()
  storage.savefig(fig, path, dpi=80)


def _words_html(words, certainty) -> str:
  return ' '.join(f'<span style="background: rgba(44, 160, 44, {c:.2f})">{html.escape(w)}</span>'
                  for w, c in zip(words, certainty))


MAP_TITLES = {'model_attention': 'model attention', 'gca_attention': 'GCA attention',
              'gradcam': 'Grad-CAM', 'ucam': 'U-CAM', 'random': 'random'}
MAP_COLUMNS = {'spearman': 'Spearman with the ground truth', 'pointing_game': 'pointing game',
               'deletion_auc': 'deletion AUC (lower is better)',
               'insertion_auc': 'insertion AUC (higher is better)'}


def _save(fig, directory: epath.Path, name: str) -> str:
  fig.tight_layout()
  storage.savefig(fig, directory / name, dpi=90)
  return name


def plot_evaluation(workdir: str, outputs: dict, results: dict, spearman: dict) -> list[str]:
  """Writes the evaluation plots into workdir/report/ and returns their file names.

  outputs: the per-question arrays of `evaluate.evaluate` ('probs', 'mc_probs', 'answer',
  'predictive_entropy'); results: its metrics; spearman: {map type: [n]} per-question rank
  correlations with the ground truth (empty when the split has none: no histogram then).
  """
  directory = epath.Path(workdir) / REPORT_DIR
  directory.mkdir(parents=True, exist_ok=True)
  labels = outputs['answer']
  correct = outputs['probs'].argmax(-1) == labels
  names = []

  fig = Figure(figsize=(4.2, 3.6))
  ax = fig.add_subplot()
  confidence, accuracy, count = metrics.reliability_bins(outputs['probs'], labels)
  edges = np.linspace(0, 1, len(count) + 1)
  ax.bar(edges[:-1], np.nan_to_num(accuracy), width=np.diff(edges), align='edge',
         edgecolor='k', linewidth=0.5, alpha=0.7, label=f"softmax (ECE {results['ece']:.4f})")
  confidence, accuracy, count = metrics.reliability_bins(outputs['mc_probs'], labels)
  ax.plot(confidence[count > 0], accuracy[count > 0], 'o-', color='tab:orange', ms=3,
          label=f"MC-dropout mean (ECE {results['mc_ece']:.4f})")
  ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8, label='calibrated')
  ax.set(xlabel='confidence (top label)', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1))
  ax.set_title('Reliability, 15 equal-width bins', fontsize=9)
  ax.legend(fontsize=7, loc='upper left')
  names.append(_save(fig, directory, 'reliability.png'))

  fig = Figure(figsize=(4.2, 3.6))
  ax = fig.add_subplot()
  entropy = outputs['predictive_entropy']
  bins = np.linspace(0, max(float(entropy.max()), 1e-3), 31)
  for chosen, label in ((correct, 'correct'), (~correct, 'wrong')):
    if chosen.any():
      ax.hist(entropy[chosen], bins, density=True, alpha=0.6, label=f'{label} ({chosen.sum()})')
  ax.set_yscale('log')
  ax.set(xlabel='predictive entropy (MC dropout)', ylabel='density')
  auroc = results['uncertainty']['predictive_entropy']['auroc_wrong']
  ax.set_title(f'Uncertainty vs error (AUROC for wrong answers {auroc:.3f})', fontsize=9)
  ax.legend(fontsize=7)
  names.append(_save(fig, directory, 'uncertainty_vs_error.png'))

  fig = Figure(figsize=(4.2, 3.6))
  ax = fig.add_subplot()
  retention = results['retention']
  fractions = np.asarray(retention['fractions'])
  ax.plot(fractions, retention['accuracy'], 'o-', ms=3,
          label=f"by {retention['score'].replace('_', ' ')} (area {retention['area']:.4f})")
  # References: dropping every wrong answer first (oracle); dropping at random (flat).
  ax.plot(fractions, np.minimum(1, results['accuracy'] / fractions), 'k--', linewidth=0.8,
          label='oracle')
  ax.axhline(results['accuracy'], color='grey', linestyle=':', label='random')
  ax.set(xlabel='fraction of questions retained (most certain first)', ylabel='accuracy')
  ax.set_title('Accuracy vs retention', fontsize=9)
  ax.legend(fontsize=7)
  names.append(_save(fig, directory, 'retention.png'))

  if spearman:
    fig = Figure(figsize=(2.6 * len(spearman), 2.6))
    for i, (name, rho) in enumerate(spearman.items(), start=1):
      ax = fig.add_subplot(1, len(spearman), i)
      rho = rho[np.isfinite(rho)]
      ax.hist(rho, np.linspace(-1, 1, 41), color='tab:blue')
      mean = float(rho.mean()) if len(rho) else float('nan')
      ax.axvline(mean, color='k', linewidth=0.8)
      ax.set_title(f'{MAP_TITLES.get(name, name)}: mean {mean:.3f}', fontsize=8)
      ax.set_xlabel('Spearman with the ground truth', fontsize=7)
      ax.tick_params(labelsize=7)
    names.append(_save(fig, directory, 'rank_correlation.png'))
  return names


def _maps_html(maps: dict) -> str:
  """A table: one row per map type, its agreement with the ground truth and its faithfulness."""
  columns = [c for c in MAP_COLUMNS if any(c in values for values in maps.values())]
  head = ''.join(f'<th>{MAP_COLUMNS[c]}</th>' for c in columns)
  rows = ''.join(
      f'<tr><td>{html.escape(MAP_TITLES.get(name, name))}</td>'
      + ''.join(f'<td>{values[c]:.4f}</td>' if values.get(c) is not None else '<td>n/a</td>'
                for c in columns)
      + '</tr>' for name, values in maps.items())
  return f'<table border="1"><tr><th>map</th>{head}</tr>{rows}</table>'


def write(workdir: str, sample: dict, vocab, answer_names, config,
          summary: dict | None = None, plots=(), maps: dict | None = None) -> str:
  """Writes workdir/report/: a PNG per question of `evaluate.explain_sample` and index.html,
  which shows them below `summary` (the test metrics), `maps` ({map type: {metric: value}},
  see `evaluate.evaluate_and_report`) and the `plots` (file names in report/, linked); returns
  the page's path."""
  directory = epath.Path(workdir) / REPORT_DIR
  directory.mkdir(parents=True, exist_ok=True)
  out = sample
  rows = []
  for n, index in enumerate(out['index']):
    words = vocab.decode(out['question'][n], int(out['length'][n]))
    predicted, truth = int(out['probs'][n].argmax()), int(out['answer'][n])
    entropy, sigma2 = float(out['predictive_entropy'][n]), float(out['sigma2'][n])
    gca_attention = out['attention'][n].mean(0) if 'model_attention' in out else None
    model_attention = out.get('model_attention', out['attention'])[n].mean(0)
    caption = (f"Q: {' '.join(words)}?   A: {answer_names[predicted]} "
               f"(p {out['probs'][n, predicted]:.2f}, predictive entropy {entropy:.3f}, "
               f"sigma2 {sigma2:.3f})   truth: {answer_names[truth]}")
    name = f'question_{index:06d}.png'
    figure(directory / name, out['image'][n], words, out['word_certainty'][n],
           caption, {'model attention': model_attention, 'GCA attention': gca_attention,
                     'Grad-CAM': out['gradcam'][n], 'U-CAM': out['ucam'][n],
                     **({'ground truth': out['ground_truth'][n]} if 'ground_truth' in out
                        else {})})
    rows.append(
        f'<tr><td><img src="{name}" width="560"></td><td>'
        f'<p>{html.escape(out["text"][n])}</p>'
        f'<p>{_words_html(words, out["word_certainty"][n])}</p>'
        f'<p>answer <b>{html.escape(answer_names[predicted])}</b> '
        f'(truth {html.escape(answer_names[truth])}, '
        f'{"right" if predicted == truth else "wrong"})</p>'
        f'<p>p {out["probs"][n, predicted]:.3f}; predictive entropy {entropy:.3f}; '
        f'mutual information {float(out["mutual_information"][n]):.3f}; sigma2 {sigma2:.3f}</p>'
        f'<p>test question {index}</p></td></tr>')
  summary_html = ''
  if summary:
    summary_html = '<p>' + '; '.join(f'{html.escape(str(k))} {v:.4f}' for k, v in summary.items()
                                     if isinstance(v, float)) + '</p>'
  plots_html = ''.join(f'<a href="{html.escape(name)}"><img src="{html.escape(name)}" '
                       'height="320"></a> ' for name in plots)
  page = directory / 'index.html'
  storage.write_text(
      page, '<!doctype html><html><head><meta charset="utf-8"><title>U-CAM report</title>'
      '</head><body><h1>U-CAM report</h1>'
      f'<p>Config: ucam {html.escape(config.ucam.to_json())}</p>{summary_html}'
      + (f'<h2>Maps</h2>{_maps_html(maps)}' if maps else '')
      + (f'<h2>Evaluation</h2><p>{plots_html}</p>' if plots else '')
      + '<h2>Test questions</h2>'
      '<p>Word shading and the bars: the certainty of each word (U-CAM over the word '
      'embeddings). Maps: the mean over attention hops or glimpses.</p>'
      f'<table>{"".join(rows)}</table></body></html>')
  return str(page)
