"""The report in workdir/report/ (SPEC section 7, issues 3 and 18): plots of the evaluation, one
figure per test question of its sections (a sample, wrong answers, the most uncertain, the most
confident wrong ones: `evaluate.report_sections`), and index.html showing them all, readable on
a laptop screen. Renders what `ucam_jax.evaluate` computed.

Plots: the reliability diagram with each bin's count, predictive entropy of correct and of wrong
answers (uncertainty vs error), accuracy against the fraction of questions retained, and, on
splits with ground-truth attention, a histogram of each map type's Spearman rank correlation
with it.

Per question, one PNG: the image and, over it at its size (`overlay`, the project's one way to
draw a map on an image), the model's attention, the GCA attention (the attention after the
certainty mask, in mode 'mask'), Grad-CAM of the answer's logit, U-CAM of its uncertainty and
the ground-truth attention where the split has it, on one colour scale; the question's words
with their certainty; the top answers with their MC-dropout mean probability and spread.
Questions and answers are data, so they are escaped in the HTML and never parsed as mathtext in
the figures."""

import html
import io

import numpy as np
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

from ucam_jax import metrics, storage

REPORT_DIR = 'report'
MAP_SCALES = ('shared', 'per_map')


def overlay(ax, image, heatmap, title, vmin=None, vmax=None, colorbar=False):
  """Draws the image [H, W, 3] with a map [h, w] over it, upsampled (bilinear) to the image's
  size, on the matplotlib axes `ax`; returns the map's AxesImage (None without a map).

  Without vmax the map is scaled to its own maximum (0 to 1); with vmin / vmax it is drawn on
  that scale, so several maps share one. colorbar: a colour bar beside `ax`.
  """
  ax.imshow(image)
  mappable = None
  if heatmap is not None:
    heatmap = np.asarray(heatmap, np.float32)
    if vmax is None:
      heatmap, vmin, vmax = heatmap / max(float(heatmap.max()), 1e-12), 0.0, 1.0
    h, w = image.shape[:2]
    mappable = ax.imshow(heatmap, cmap='jet', alpha=0.5, vmin=0.0 if vmin is None else vmin,
                         vmax=vmax, extent=(0, w, h, 0), interpolation='bilinear')
    if colorbar:
      ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
  ax.set_title(title, fontsize=9)
  ax.axis('off')
  return mappable


def number(x: float) -> str:
  """Three significant digits: sigma^2 may be 1e-6, an entropy 2.3."""
  return f'{float(x):.3g}'


def figure(path, image, words, certainty, caption, maps: dict, answers=(),
           scale: str = 'shared', truth=None) -> None:
  """One question's PNG: the image and each map over it ({title: [h, w] or None, not
  available}), then the ground truth `truth` [h, w] where there is one, with one colour bar;
  under them the certainty of each word and `answers`, a bar chart of (name, MC-dropout mean
  probability, its standard deviation, colour) rows.

  scale 'shared': every map divided by its sum, so each shows its share per cell on one scale
  (a map that spreads over the image is pale, one that points is bright), up to the largest
  share of `maps` (the ground truth, usually the most concentrated, is clipped there rather
  than fading the maps); 'per_map': each map scaled to its own maximum.
  """
  if scale not in MAP_SCALES:
    raise ValueError(f'The map scale is {scale!r}; choose one of {list(MAP_SCALES)}.')
  if truth is not None:
    maps = {**maps, 'ground truth': truth}
  if scale == 'shared':
    maps = {k: None if m is None else np.maximum(m, 0) / max(float(np.maximum(m, 0).sum()), 1e-12)
            for k, m in maps.items()}
    shares = [float(m.max()) for k, m in maps.items() if m is not None and k != 'ground truth']
    vmax = max(shares + [1e-12])
    label = "share of the map's total per cell"
  else:
    vmax, label = None, "fraction of the map's maximum"
  columns = len(maps) + 1
  fig = Figure(figsize=(1.75 * columns + 0.9, 4.9), layout='constrained')
  upper, lower = fig.subfigures(2, 1, height_ratios=(1.55, 1))
  panels = upper.subplots(1, columns)
  overlay(panels[0], image, None, 'image')
  mappable = None
  for ax, (title, heatmap) in zip(panels[1:], maps.items()):
    if heatmap is None:
      ax.text(0.5, 0.5, 'n/a without\nthe GCA mask', ha='center', va='center', fontsize=9)
      ax.set_title(title, fontsize=9)
      ax.axis('off')
    else:
      mappable = overlay(ax, image, heatmap, title, 0.0 if vmax else None, vmax) or mappable
  if mappable is not None:
    bar = upper.colorbar(mappable, ax=panels[1:], fraction=0.03, pad=0.01)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)
  bars, chart = lower.subplots(1, 2)
  bars.bar(range(len(words)), certainty[:len(words)], color='tab:green')
  bars.set_xticks(range(len(words)), words, fontsize=8, rotation=30, parse_math=False)
  bars.set_ylim(0, 1)
  bars.set_ylabel('word certainty', fontsize=8)
  bars.tick_params(axis='y', labelsize=8)
  if not answers:
    chart.axis('off')
  else:
    names, means, spreads, colours = zip(*answers)
    rows = np.arange(len(names))[::-1]  # The most probable on top.
    chart.barh(rows, means, xerr=spreads, color=colours, capsize=2, error_kw={'linewidth': 0.8})
    chart.set_yticks(rows, names, fontsize=8, parse_math=False)
    chart.set_xlim(0, 1)
    chart.set_xlabel('MC-dropout mean probability, bar: its standard deviation', fontsize=8)
    chart.tick_params(axis='x', labelsize=8)
  fig.suptitle(caption, fontsize=10, parse_math=False)
  storage.savefig(fig, path, dpi=100)


def _words_html(words, certainty) -> str:
  return ' '.join(f'<span style="background: rgba(44, 160, 44, {c:.2f})">{html.escape(w)}</span>'
                  for w, c in zip(words, certainty))


MAP_TITLES = {'model_attention': 'model attention', 'gca_attention': 'GCA attention',
              'gradcam': 'Grad-CAM', 'ucam': 'U-CAM', 'random': 'random'}
MAP_COLUMNS = {'spearman': 'Spearman with the ground truth', 'pointing_game': 'pointing game',
               'pointing_game_top': 'pointing game, top 15% of the mass',
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

  fig = Figure(figsize=(4.6, 4.6))
  ax, below = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': (3, 1.2)})
  confidence, accuracy, count = metrics.reliability_bins(outputs['probs'], labels)
  edges = np.linspace(0, 1, len(count) + 1)
  ax.bar(edges[:-1], np.nan_to_num(accuracy), width=np.diff(edges), align='edge',
         edgecolor='k', linewidth=0.5, alpha=0.7, label=f"softmax (ECE {results['ece']:.4f})")
  below.bar(edges[:-1], count, width=np.diff(edges), align='edge', edgecolor='k',
            linewidth=0.5, alpha=0.7)
  for left, n in zip(edges[:-1], count):
    if n:
      below.text(left + 0.5 / len(count), n, str(int(n)), ha='center', va='bottom', fontsize=6,
                 rotation=90)
  below.set_yscale('log')
  below.set_ylim(0.5, max(float(count.max()), 1) * 30)  # Room for the numbers.
  below.set(xlabel='confidence (top label)', ylabel='questions (softmax)')
  confidence, accuracy, count = metrics.reliability_bins(outputs['mc_probs'], labels)
  ax.plot(confidence[count > 0], accuracy[count > 0], 'o-', color='tab:orange', ms=3,
          label=f"MC-dropout mean (ECE {results['mc_ece']:.4f})")
  ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8, label='calibrated')
  ax.set(ylabel='accuracy', xlim=(0, 1), ylim=(0, 1))
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
    columns = min(len(spearman), 3)
    rows = -(-len(spearman) // columns)
    fig = Figure(figsize=(2.9 * columns, 2.4 * rows))
    for i, (name, rho) in enumerate(spearman.items(), start=1):
      ax = fig.add_subplot(rows, columns, i)
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


SECTION_TITLES = {
    'sample': ('A sample of the questions', 'drawn by the seed'),
    'wrong': ('Wrong answers', 'drawn by the seed'),
    'uncertain': ('The most uncertain answers', 'highest predictive entropy first'),
    'confident_wrong': ('The most confident wrong answers', 'lowest predictive entropy first'),
}
LINKS = (('curves', '../curves.png'), ('config.json', '../config.json'),
         ('metrics.json', '../metrics.json'))
STYLE = """body { font-family: sans-serif; max-width: 1200px; margin: 0 auto; padding: 0 12px; }
img { max-width: 100%; height: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.plots img { max-height: 420px; }
.question { border-top: 1px solid #ccc; padding: 8px 0; }
.question p { margin: 4px 0; }
.scroll { overflow-x: auto; }
code { overflow-wrap: anywhere; }
table { border-collapse: collapse; } td, th { padding: 2px 6px; }"""


def figure_name(index: int) -> str:
  return f'question_{int(index):06d}.png'


def _question(out, n, vocab, answer_names, scale, directory) -> str:
  """Row n of the sample: writes its figure and returns its HTML."""
  words = vocab.decode(out['question'][n], int(out['length'][n]))
  predicted, truth = int(out['probs'][n].argmax()), int(out['answer'][n])
  verdict = 'right' if predicted == truth else 'wrong'
  p = float(out['probs'][n, predicted])
  entropy, information = out['predictive_entropy'][n], out['mutual_information'][n]
  sigma2 = out['sigma2'][n]
  gca_attention = out['attention'][n].mean(0) if 'model_attention' in out else None
  model_attention = out.get('model_attention', out['attention'])[n].mean(0)
  top = [(answer_names[int(a)], float(m), float(sd),
          'tab:green' if int(a) == truth else 'tab:red' if int(a) == predicted else 'tab:gray')
         for a, m, sd in zip(out['top_answers'][n], out['top_probs'][n], out['top_spread'][n])]
  caption = (f"Q: {' '.join(words)}?   A: {answer_names[predicted]} ({verdict}; truth: "
             f"{answer_names[truth]})\np {p:.3f}, predictive entropy {number(entropy)}, "
             f"mutual information {number(information)}, σ² {number(sigma2)}")
  name = figure_name(out['index'][n])
  figure(directory / name, out['image'][n], words, out['word_certainty'][n], caption,
         {'model attention': model_attention, 'GCA attention': gca_attention,
          'Grad-CAM': out['gradcam'][n], 'U-CAM': out['ucam'][n]},
         top, scale, out['ground_truth'][n] if 'ground_truth' in out else None)
  answers = ', '.join(f'{html.escape(a)} {m:.3f} &plusmn; {number(sd)}' for a, m, sd, _ in top)
  return (
      f'<div class="question"><img src="{name}" alt="figure of test question '
      f'{int(out["index"][n])}">'
      f'<p><b>Q</b> {html.escape(out["text"][n])} &nbsp; (test question '
      f'{int(out["index"][n])})</p>'
      f'<p>word certainty: {_words_html(words, out["word_certainty"][n])}</p>'
      f'<p><b>A</b> {html.escape(answer_names[predicted])} ({verdict}; truth '
      f'<b>{html.escape(answer_names[truth])}</b>), p {p:.3f}; predictive entropy '
      f'{number(entropy)}; mutual information {number(information)}; sigma<sup>2</sup> '
      f'{number(sigma2)}</p>'
      f'<p>top {len(top)} (MC-dropout mean &plusmn; standard deviation): {answers}</p></div>')


def write(workdir: str, sample: dict, vocab, answer_names, config,
          summary: dict | None = None, plots=(), maps: dict | None = None) -> str:
  """Writes workdir/report/: a PNG per question of `evaluate.explain_sample` and index.html,
  which shows `summary` (the test metrics), links to the run's curves and files, `maps` ({map
  type: {metric: value}}, see `evaluate.evaluate_and_report`), the `plots` (file names in
  report/) and the questions, section by section (`evaluate.report_sections`). The maps' colour
  scale is `config.report_map_scale` (see `figure`). Returns the page's path."""
  directory = epath.Path(workdir) / REPORT_DIR
  directory.mkdir(parents=True, exist_ok=True)
  rows = {int(index): n for n, index in enumerate(sample['index'])}
  questions = {index: _question(sample, n, vocab, answer_names, config.report_map_scale,
                                directory) for index, n in rows.items()}
  sections = []
  for key, indices in sample['sections'].items():
    title, how = SECTION_TITLES[key]
    body = ''.join(questions[int(i)] for i in indices) or '<p>None.</p>'
    sections.append(f'<h2 id="{key}">{title}</h2><p>{len(indices)} questions, {how}.</p>{body}')
  contents = ' &middot; '.join(
      f'<a href="#{key}">{SECTION_TITLES[key][0]} ({len(indices)})</a>'
      for key, indices in sample['sections'].items())
  summary_html = ''
  if summary:
    summary_html = '<p>' + '; '.join(
        f'{html.escape(str(k))} ' + (f'{v:.4f}' if isinstance(v, float) else html.escape(v))
        for k, v in summary.items() if isinstance(v, (float, str))) + '</p>'
  links = ' &middot; '.join(f'<a href="{href}">{name}</a>' for name, href in LINKS)
  plots_html = ''.join(f'<a href="{html.escape(name)}"><img src="{html.escape(name)}"></a>'
                       for name in plots)
  page = directory / 'index.html'
  storage.write_text(
      page, '<!doctype html><html><head><meta charset="utf-8">'
      '<meta name="viewport" content="width=device-width, initial-scale=1">'
      f'<title>U-CAM report</title><style>{STYLE}</style></head><body><h1>U-CAM report</h1>'
      f'<p>The run: {links}</p>'
      f'<p>Config: ucam <code>{html.escape(config.ucam.to_json())}</code></p>{summary_html}'
      + (f'<h2>Maps</h2><div class="scroll">{_maps_html(maps)}</div>' if maps else '')
      + (f'<h2>Evaluation</h2><div class="plots">{plots_html}</div>' if plots else '')
      + f'<h2>Test questions</h2><p>{contents}</p>'
      '<p>Each figure: the image, then each map over it on the model\'s grid, upsampled to the '
      'image (mean over attention hops or glimpses), with one colour scale ('
      + ('each map divided by its sum: its share per cell, comparable across maps'
         if config.report_map_scale == 'shared' else "each map scaled to its own maximum")
      + '); the certainty of each question word (U-CAM over the word embeddings, also the '
      "words' shading here); the top answers with their MC-dropout mean probability and its "
      'standard deviation over the passes (green: the true answer, red: a wrong prediction). '
      'Predictive entropy and mutual information are in nats.</p>'
      + ''.join(sections) + '</body></html>')
  return str(page)


def first_figures(workdir: str, sample: dict) -> dict:
  """{'report/<section>': [h, w, 3] uint8}: the first figure of each section of the sample that
  `write` drew, for TensorBoard."""
  directory = epath.Path(workdir) / REPORT_DIR
  images = {}
  for key, indices in sample['sections'].items():
    if len(indices):
      data = (directory / figure_name(indices[0])).read_bytes()
      images[f'report/{key}'] = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  return images
