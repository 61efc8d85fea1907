"""Per-question explanation figures and a static HTML page (SPEC section 5, issue 3).

For a fixed sample of test questions, one PNG each: the image; the model's attention; the GCA
attention (the attention after the certainty mask, in mode 'mask'); Grad-CAM of the answer's
logit and U-CAM of its uncertainty, both over the image grid; the question's words with their
certainty; the answer with its uncertainty. `index.html` shows them all. Questions and answers
are data, so they are escaped in the HTML and never parsed as mathtext in the figures.

The U-CAM map and the word certainty are `ucam_jax.explain` maps of the uncertainty U of
`config.ucam` (the aleatoric recipe or the Kendall & Gal likelihood, of the model's own answer,
noise drawn once), one question at a time: a map does not depend on the other questions.
"""

import html
import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from ucam_jax import explain, gca, input_pipeline, train, uncertainty

REPORT_DIR = 'report'


def sample_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
  """The fixed sample: `count` distinct indices, sorted, a function of the seed only."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, min(count, num_examples), replace=False))


def _from_features(module, v, e, lengths, **kwargs):
  """The question and answer stages as one call, so maps can be taken over 'grid' or 'words'."""
  q, _ = module.encode_question(e, lengths)
  return module.answer(v, q, **kwargs)


def explain_questions(apply_fn, params, batch, key, config) -> dict:
  """Everything the figures show, for a batch of questions (see `train.eval_step` for batch).

  Returns eval_step's outputs plus 'gradcam' and 'ucam' [n, h, w] and
  'word_certainty' [n, length].
  """
  eval_key, noise_key = jax.random.split(key)
  out = train.eval_step(params, apply_fn, batch, eval_key, config.mc_samples, config.ucam)
  v = apply_fn(params, batch['image'], method='encode_image')
  e = apply_fn(params, batch['question'], method='embed_question')

  def staged(variables, v, e, lengths, **kwargs):
    return apply_fn(variables, v, e, lengths, method=_from_features, **kwargs)

  def score(outputs):
    return outputs['logits'].max(-1)

  num_answers = out['probs'].shape[-1]
  noise = uncertainty.sample_noise(noise_key, config.ucam.aleatoric_samples, (1, num_answers))

  def uncertainty_of_answer(outputs):
    logits = outputs['logits']
    own = jax.nn.one_hot(logits.argmax(-1), num_answers)
    return gca.uncertainty_term(config.ucam, logits, outputs['sigma2'], own, noise)[None]

  inputs = (v, e, batch['length'])
  out['gradcam'] = explain.explain(staged, params, inputs, 'grid', score, 'gradcam')
  out['ucam'] = explain.explain(staged, params, inputs, 'grid', uncertainty_of_answer, 'ucam')
  words, grads = explain.activations_and_gradients(staged, params, inputs, 'words',
                                                   uncertainty_of_answer)
  out['word_certainty'] = gca.certainty_map(words, grads, batch['length'])
  return out


def _overlay(ax, image, heatmap, title):
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
  _overlay(fig.add_subplot(grid[0, 0]), image, None, 'image')
  for i, (title, heatmap) in enumerate(maps.items(), start=1):
    ax = fig.add_subplot(grid[0, i])
    if heatmap is None:
      ax.text(0.5, 0.5, 'n/a without\nthe GCA mask', ha='center', va='center', fontsize=8)
      ax.set_title(title, fontsize=8)
      ax.axis('off')
    else:
      _overlay(ax, image, heatmap, title)
  bars = fig.add_subplot(grid[1, :])
  bars.bar(range(len(words)), certainty[:len(words)], color='tab:green')
  bars.set_xticks(range(len(words)), words, fontsize=8, parse_math=False)
  bars.set_ylim(0, 1)
  bars.set_ylabel('word certainty', fontsize=7)
  bars.tick_params(axis='y', labelsize=7)
  fig.suptitle(caption, fontsize=8, parse_math=False)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def _words_html(words, certainty) -> str:
  return ' '.join(f'<span style="background: rgba(44, 160, 44, {c:.2f})">{html.escape(w)}</span>'
                  for w, c in zip(words, certainty))


def explain_sample(apply_fn, params, source, vocab, config) -> dict:
  """`explain_questions` for the fixed sample of `config.report_questions` questions of
  `source` (a random-access split), as numpy arrays with the inputs ('index', 'image',
  'question', 'length', 'answer', 'text'). Every process runs it; process 0 writes it."""
  indices = sample_indices(len(source), config.report_questions, config.seed)
  preprocess = input_pipeline.Preprocess(vocab, config.max_question_length)
  raw = [source[int(i)] for i in indices]
  examples = [preprocess.map(example) for example in raw]
  batch = {k: np.stack([x[k] for x in examples]) for k in ('image', 'question', 'length',
                                                             'answer')}
  batch['weight'] = np.ones(len(examples), np.float32)
  out = jax.jit(lambda p, b, k: explain_questions(apply_fn, p, b, k, config))(
      params, batch, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  return {**jax.tree.map(np.asarray, out), **batch, 'index': indices,
          'text': [example['question'].decode() for example in raw]}


def write(workdir: str, sample: dict, vocab, answer_names, config,
          summary: dict | None = None) -> str:
  """Writes workdir/report/: a PNG per question of `explain_sample` and index.html, which
  shows them with `summary` (the test metrics) above; returns the page's path."""
  directory = os.path.join(workdir, REPORT_DIR)
  os.makedirs(directory, exist_ok=True)
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
    figure(os.path.join(directory, name), out['image'][n], words, out['word_certainty'][n],
           caption, {'model attention': model_attention, 'GCA attention': gca_attention,
                     'Grad-CAM': out['gradcam'][n], 'U-CAM': out['ucam'][n]})
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
  page = os.path.join(directory, 'index.html')
  with open(page, 'w') as f:
    f.write('<!doctype html><html><head><meta charset="utf-8"><title>U-CAM report</title>'
            '</head><body><h1>U-CAM: test questions</h1>'
            f'<p>Config: ucam {html.escape(config.ucam.to_json())}</p>{summary_html}'
            '<p>Word shading and the bars: the certainty of each word (U-CAM over the word '
            'embeddings). Maps: the mean over attention hops or glimpses.</p>'
            f'<table>{"".join(rows)}</table></body></html>')
  return page
