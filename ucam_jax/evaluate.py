"""Evaluation on a split (SPEC section 7): answers, uncertainty, and the maps against ground truth.

One jitted step (`explain_questions`) gives, for every question of the split, the deterministic
answer, the MC-dropout uncertainty scores and every map type on the model's grid [h, w]:

  model_attention  the model's attention, mean over hops (in mode 'mask' the first pass's)
  gca_attention    the attention after the certainty mask (mode 'mask' only; absent otherwise)
  gradcam          Grad-CAM of the answer's logit over the grid
  ucam             U-CAM of the uncertainty U of `config.ucam` over the grid
  random           uniform noise, fixed by the seed: the chance level

`evaluate` summarises them: exact and VQA-official accuracy (per question family where the split
has one; on VQA per answer type); calibration; per uncertainty score, AUROC / AUPR for
detecting wrong answers; accuracy against the fraction of questions retained by predictive
entropy; and, on splits with a ground-truth 'mask' (or VQA-HAT maps), each map type's
Spearman rank correlation with the mask's share of each grid cell (the mean over the questions
where it is defined) and its pointing games: on any ground-truth cell (sparse masks), and on
the ground truth's top 15% of mass (`metrics.pointing_game_top_mass`: dense human maps, with
its chance level). `faithfulness` adds deletion
and insertion AUC on a fixed sample of questions; `evaluate_and_report` runs it all on the test
split and writes workdir/report/ (training's end and `--mode=eval` share it).

VQA (10 human answers per question): the official accuracy scores the predicted answer string
against the 10 (`vqa_answers.official_accuracy`), over every question of the split, those whose
answers are all outside the answer vocabulary included (they score 0, as in the standard
practice). Everything else needs one true answer: it is the question's top answer (the most
common human answer in the vocabulary, `input_pipeline.top_answer`), and a prediction is
*correct* when it is that answer. So exact accuracy, loss (-log p of the top answer), ECE, NLL,
Brier, the uncertainty scores' AUROC / AUPR for wrong answers and the retention curve are over
the questions that have a top answer ('num_labelled' of 'num_examples'): a question no answer
of the vocabulary can match has no top-label correctness to calibrate against. (Correct as
"VQA accuracy > 0" would call an answer that 1 of 10 annotators gave correct; the top answer is
the definition that top-label calibration uses.)
VQA-HAT: the human maps, resized to the model grid (`datasets.vqa.human_attention`), are the
'ground_truth' of the map agreement.

Cost, measured on the default job (configs/san.py, 9,673 test questions) on 2 shared CPU cores:
the maps in the step cost nothing measurable per batch (the image stem and the 20 MC-dropout
passes dominate), only their compilation, so they are computed on the whole split; and the
explanation figures reuse those outputs instead of compiling a step of their own. Deletion and
insertion need 2 * (steps + 1) forward passes of the sample per map type, so they run on
`config.faithfulness_questions` questions only. See README (Evaluation) for the timings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from ucam_jax import (explain, gca, input_pipeline, metrics, report, sharding, uncertainty,
                      vqa_answers)

ANNOTATORS = 10  # Human answers per question in VQA.
RETENTION_FRACTIONS = np.linspace(0.05, 1.0, 20)
RETENTION_SCORE = 'predictive_entropy'


def uncertainty_scores(ucam) -> tuple[str, ...]:
  """The per-question scores that the evaluation summarises. sigma2 and the predictive variance
  (which adds it) count only when an uncertainty loss trains the variance head; in the baseline
  they would only report its initialisation."""
  scores = ('predictive_entropy', 'expected_entropy', 'mutual_information', 'variation_ratio')
  return scores if ucam.mode == 'none' else scores + ('sigma2', 'predictive_variance')


def check_config(config) -> None:
  """Raises ValueError naming an evaluation setting below its minimum: it would fail only at the
  end of a training run (report_questions=0 stacked an empty sample), or a report_map_scale
  that `report` does not know. faithfulness_questions=0 skips the deletion / insertion AUC."""
  minimum = {'mc_samples': 1, 'report_questions': 1, 'faithfulness_questions': 0,
             'faithfulness_steps': 1 if config.faithfulness_questions else 0}
  for key, low in minimum.items():
    if config[key] < low:
      raise ValueError(f'config.{key} must be at least {low}, got {config[key]}.')
  if config.report_map_scale not in report.MAP_SCALES:
    raise ValueError(f'config.report_map_scale is {config.report_map_scale!r}; choose one of '
                     f'{list(report.MAP_SCALES)}.')


MC_MEMORY_BYTES = 1 << 30  # What the dropped-out grids of a batch's MC samples may hold at once.


def eval_step(params, apply_fn, batch, key, mc_samples: int, ucam):
  """Per-question outputs of a padded batch: the deterministic answer and its loss, and the MC
  dropout statistics of `mc_samples` stochastic passes (`gca.mc_sampler` of `ucam.mc_scope`:
  the answer stage on the image and question encoded once, or, 'full', every dropout of the
  model with the question encoder rerun per sample).

  In GCA mode the MC passes reuse the certainty maps of the deterministic pass. Also returns
  the GCA outputs (maps, the first pass's attention) and the MC-dropout `top_answers`.
  """
  v = apply_fn(params, batch['image'], method='encode_image')
  e = apply_fn(params, batch['question'], method='embed_question')
  features = (v, e, batch['length'])
  gca_key, mc_key = jax.random.split(key)
  _, out = gca.forward(apply_fn, params, features, batch['answer'], batch['weight'], gca_key,
                       ucam, train=False)
  maps = {b: out[f'certainty_{b}'] for b in ('image', 'question') if f'certainty_{b}' in out}
  answer_fn = gca.mc_sampler(apply_fn, params, features, maps, ucam.combine, ucam.mc_scope)

  # Chunks of samples whose dropped-out copies of the grid fit MC_MEMORY_BYTES (all samples at
  # once unless the grids are large: 50 samples of 256 14x14x2048 grids would hold 20 GB).
  chunk = uncertainty.chunk_size_within(mc_samples, v.size * v.dtype.itemsize, MC_MEMORY_BYTES)
  sample_logits, sample_sigma2 = uncertainty.mc_dropout(
      answer_fn, mc_key, mc_samples, None if chunk == mc_samples else chunk)
  stats = uncertainty.predictive_stats(sample_logits, sample_sigma2)
  top = top_answers(sample_logits, stats['probs'])
  logits = out.pop('logits')
  del out['sigma2']  # The MC mean of sigma2 is in stats.
  # VQA marks questions without a top answer -1: their loss is computed for class 0 and never
  # summarised (see the module docstring).
  labels = jnp.maximum(batch['answer'], 0)
  return {'probs': jax.nn.softmax(logits), 'mc_probs': stats.pop('probs'),
          'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
          **top, **stats, **out}


TOP_ANSWERS = 5  # The report's answers per question.


def top_answers(sample_logits, mean_probs, k: int = TOP_ANSWERS) -> dict:
  """The k answers of highest MC-dropout mean probability: 'top_answers' [n, k] indices,
  'top_probs' [n, k] their mean and 'top_spread' [n, k] their standard deviation over the T
  passes (sample_logits [T, n, c], mean_probs [n, c]). Only these are kept per question: the
  spread of every answer would be another [n, c] array on the host."""
  top_probs, top = jax.lax.top_k(mean_probs, min(k, mean_probs.shape[-1]))
  sample_probs = jnp.take_along_axis(jax.nn.softmax(sample_logits), top[None], axis=-1)
  return {'top_answers': top, 'top_probs': top_probs, 'top_spread': sample_probs.std(0)}


# --------------------------------------------------------------------------- maps


def _from_features(module, v, e, lengths, **kwargs):
  """The question and answer stages as one call, so maps can be taken over 'grid' or 'words'."""
  q, _ = module.encode_question(e, lengths)
  return module.answer(v, q, **kwargs)


def ground_truth_on_grid(mask, grid: tuple[int, int]):
  """mask [n, H, W] bool -> [n, h, w]: the share of each grid cell's pixels that the mask covers
  (H, W multiples of the grid's h, w)."""
  n, height, width = mask.shape
  h, w = grid
  if height % h or width % w:
    raise ValueError(f'The mask ({height}x{width}) must be a multiple of the model grid '
                     f'({h}x{w}) to be averaged over its cells.')
  cells = mask.astype(jnp.float32).reshape(n, h, height // h, w, width // w)
  return cells.mean(axis=(2, 4))


def explain_questions(apply_fn, params, batch, key, config) -> dict:
  """Everything the evaluation and the figures use, for a batch of questions.

  batch: as `eval_step`, with an optional ground-truth attention: 'mask' [n, H, W] bool, or
  'ground_truth' [n, h, w] already on the model grid (VQA-HAT).
  Returns eval_step's outputs plus 'gradcam', 'ucam' and 'random' [n, h, w], 'word_certainty'
  [n, length] and, with either, 'ground_truth' [n, h, w] (a mask through
  `ground_truth_on_grid`). The U-CAM
  maps are of U (`gca.uncertainty_term` of the model's own answer, noise drawn once for the
  batch), one question at a time: a map does not depend on the other questions.
  """
  eval_key, noise_key, random_key = jax.random.split(key, 3)
  out = eval_step(params, apply_fn, batch, eval_key, config.mc_samples, config.ucam)
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
  out['random'] = jax.random.uniform(random_key, out['gradcam'].shape)
  words, grads = explain.activations_and_gradients(staged, params, inputs, 'words',
                                                   uncertainty_of_answer)
  out['word_certainty'] = gca.certainty_map(words, grads, batch['length'])
  if 'mask' in batch:
    out['ground_truth'] = ground_truth_on_grid(batch['mask'], v.shape[1:3])
  elif 'ground_truth' in batch:
    out['ground_truth'] = batch['ground_truth']
  return out


def map_types(out) -> dict:
  """{type: [n, h, w]} for every map type of `explain_questions` outputs (see the module
  docstring): attention is averaged over its hops or glimpses."""
  masked = 'model_attention' in out  # Mode 'mask': 'attention' is the GCA attention.
  maps = {'model_attention': out['model_attention' if masked else 'attention'].mean(1)}
  if masked:
    maps['gca_attention'] = out['attention'].mean(1)
  return {**maps, **{k: out[k] for k in ('gradcam', 'ucam', 'random')}}


def attention_agreement(out) -> dict:
  """{type: (Spearman [n], pointing-game hits [n])} of each map type against 'ground_truth'."""
  return {name: (metrics.spearman_per_example(m, out['ground_truth']),
                 metrics.pointing_game(m, out['ground_truth']))
          for name, m in map_types(out).items()}


# --------------------------------------------------------------------------- the split


def vqa_accuracy(predicted, labels, answer_names, human_answers=None) -> np.ndarray:
  """Official VQA accuracy per question [n] of predicted answer indices [n].

  human_answers: each question's human answers (VQA: 10), in record order, as the VQA builder
  stores them. None for a single-answer dataset: its one answer stands for all ten annotators,
  so a match scores min(9/3, 1) = 1, a miss 0, and the VQA accuracy equals exact match.
  """
  normalise = vqa_answers.normalize_answer
  if human_answers is None:
    humans = [[normalise(answer_names[label])] * ANNOTATORS for label in labels]
  else:
    humans = [vqa_answers.ground_truth_answers(list(h)) for h in human_answers]
  return metrics.vqa_accuracy([normalise(answer_names[p]) for p in predicted], humans)


def summarise(out, config, answer_names=None, family_names=None, human_answers=None,
              answer_types=None) -> dict:
  """The metrics of `evaluate` from its per-question outputs (see there)."""
  # Which MC-dropout computation the mc_ figures and the uncertainty scores are of.
  results = {'num_examples': len(out['answer']), 'mc_scope': config.ucam.mc_scope,
             'mc_samples': config.mc_samples}
  if answer_names is not None and answer_types is not None:  # VQA: every question.
    official = vqa_answers.official_accuracy(
        [answer_names[p] for p in out['probs'].argmax(-1)], human_answers, answer_types)
    results['vqa_accuracy'] = official.overall
    results['vqa_accuracy_per_answer_type'] = official.per_answer_type
    results['vqa_questions_per_answer_type'] = {
        t: int(n) for t, n in zip(*np.unique(np.asarray(answer_types), return_counts=True))}
  labelled = out['answer'] >= 0
  if answer_types is not None or not labelled.all():
    results['num_labelled'] = int(labelled.sum())
  if not labelled.all():  # VQA: the rest are over the questions with a top answer.
    out = {k: v[labelled] for k, v in out.items()}
    human_answers = None if human_answers is None else [
        h for h, keep in zip(human_answers, labelled) if keep]
  labels = out['answer']
  predicted = out['probs'].argmax(-1)
  wrong = predicted != labels
  results.update({'accuracy': float(1 - wrong.mean()), 'loss': float(out['loss'].mean()),
                  'mc_accuracy': metrics.accuracy(out['mc_probs'].argmax(-1), labels)})
  if answer_names is not None and 'vqa_accuracy' not in results:
    results['vqa_accuracy'] = float(
        vqa_accuracy(predicted, labels, answer_names, human_answers).mean())
  if 'family' in out and family_names is not None:
    results['accuracy_per_family'] = {
        family_names[f]: float(1 - wrong[out['family'] == f].mean())
        for f in np.unique(out['family'])}
  for name in ('probs', 'mc_probs'):
    prefix = '' if name == 'probs' else 'mc_'
    results[prefix + 'ece'] = metrics.expected_calibration_error(out[name], labels)
    results[prefix + 'nll'] = metrics.negative_log_likelihood(out[name], labels)
    results[prefix + 'brier'] = metrics.brier_score(out[name], labels)
  results['uncertainty'] = {
      score: {'mean_correct': float(out[score][~wrong].mean()) if (~wrong).any() else None,
              'mean_wrong': float(out[score][wrong].mean()) if wrong.any() else None,
              'auroc_wrong': metrics.auroc(out[score], wrong),
              'aupr_wrong': metrics.aupr(out[score], wrong)}
      for score in uncertainty_scores(config.ucam)}
  if 'certainty_image' in out:  # GCA: is the certainty map more than Grad-CAM of the answer?
    rho = metrics.spearman_per_example(out['certainty_image'], out['gradcam'])
    results['certainty_vs_gradcam_spearman'] = (
        metrics.mean_ignoring_nan(rho) if np.isfinite(rho).any() else None)
  accuracy, area = metrics.retention_curve(out[RETENTION_SCORE], ~wrong, RETENTION_FRACTIONS)
  results['retention'] = {'score': RETENTION_SCORE, 'fractions': RETENTION_FRACTIONS.tolist(),
                          'accuracy': accuracy.tolist(), 'area': area}
  if 'ground_truth' in out:
    results['maps'] = {
        # None (JSON null) where no question has both maps varying: a constant map has no ranks.
        name: {'spearman': metrics.mean_ignoring_nan(rho) if np.isfinite(rho).any() else None,
               'spearman_questions': int(np.isfinite(rho).sum()),
               'pointing_game': float(hits.mean())}
        for name, (rho, hits) in attention_agreement(out).items()}
    # Dense ground truth (VQA-HAT: non-zero almost everywhere, so every map 'points' into it):
    # the pointing game against its cells holding the top 15% of its mass, and its chance level.
    for name, m in map_types(out).items():
      hits, chance = metrics.pointing_game_top_mass(m, out['ground_truth'])
      results['maps'][name]['pointing_game_top'] = float(hits.mean())
    results['pointing_game_top_mass'] = metrics.POINTING_MASS
    results['pointing_game_top_chance'] = float(chance.mean())
    results['map_grid'] = list(out['ground_truth'].shape[1:])
  return results


def evaluate(params, apply_fn, batches, num_batches: int, mesh, config, desc: str = 'eval', *,
             answer_names=None, family_names=None, human_answers=None,
             answer_types=None) -> tuple[dict, dict]:
  """Evaluates `explain_questions` on every batch: (metrics, per-question outputs).

  The outputs are numpy arrays [n, ...] in record order, with the labels as 'answer' (and
  'family' where the split has it). The metrics: exact accuracy, loss, the MC-dropout mean's
  accuracy; with `answer_names`, the official VQA accuracy (see `vqa_accuracy` for
  `human_answers`); VQA (`human_answers` and `answer_types` [n], in record order): the official
  accuracy over every question and per answer type, 'vqa_accuracy_per_answer_type', and the
  other metrics over the questions with a top answer (label >= 0; see the module docstring);
  with `family_names`, accuracy per question family; calibration, top-label
  ECE with 15 equal-width bins, NLL and Brier, of the deterministic softmax and of the
  MC-dropout mean; 'uncertainty': for each MC-dropout score, its mean over correct and over
  wrong answers and its AUROC / AUPR for detecting wrong answers (nan when every answer is
  right); 'retention': accuracy on the fraction of questions with the lowest predictive entropy,
  and its area; on a split with a mask, 'maps': per map type, Spearman (mean over questions
  where both maps vary, and their count) and pointing-game hit rate.
  """
  step = jax.jit(functools.partial(explain_questions, apply_fn, config=config))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  outputs = []
  for i, batch in enumerate(tqdm(batches, total=num_batches, desc=desc, leave=False,
                                 mininterval=2, disable=jax.process_index() > 0)):
    batch = sharding.shard_batch(batch, mesh)
    out = step(params, batch=batch, key=jax.random.fold_in(key, i))
    inputs = {k: batch[k] for k in ('answer', 'family') if k in batch}
    # The whole global batch on every process: its rows live on all processes' devices.
    out, inputs, weight = sharding.to_host((out, inputs, batch['weight']))
    outputs.append(jax.tree.map(lambda x: x[weight > 0], {**out, **inputs}))
  out = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
  return summarise(out, config, answer_names, family_names, human_answers, answer_types), out


# --------------------------------------------------------------------------- samples


def sample_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
  """A fixed sample: `count` distinct indices, sorted, a function of the seed only."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, min(count, num_examples), replace=False))


def read_questions(source, indices, vocab, config, preprocess=None) -> dict:
  """The model inputs of questions `indices` of `source` (a random-access split) as numpy
  arrays ('image', 'question', 'length', 'answer'), and their text. `preprocess`: as
  `input_pipeline.eval_batches`."""
  preprocess = preprocess or input_pipeline.Preprocess(vocab, config.max_question_length)
  raw = [source[int(i)] for i in indices]
  examples = [preprocess.map(example) for example in raw]
  batch = {k: np.stack([x[k] for x in examples]) for k in ('image', 'question', 'length',
                                                             'answer')}
  return {**batch, 'text': [example['question'].decode() for example in raw]}


def report_sections(outputs, count: int, seed: int) -> dict:
  """The questions with a true answer (label >= 0) that the report shows, up to `count` per
  section: {'sample': drawn by the seed, 'wrong': wrong answers drawn by the seed, 'uncertain':
  the highest predictive entropy, 'confident_wrong': the wrong answers of lowest predictive
  entropy} as record numbers. Rankings break ties by record number."""
  candidates = np.flatnonzero(outputs['answer'] >= 0)
  wrong = candidates[outputs['probs'][candidates].argmax(-1) != outputs['answer'][candidates]]
  entropy = outputs['predictive_entropy']
  return {
      'sample': candidates[sample_indices(len(candidates), count, seed)],
      'wrong': wrong[sample_indices(len(wrong), count, seed)],
      'uncertain': candidates[np.argsort(-entropy[candidates], kind='stable')[:count]],
      'confident_wrong': wrong[np.argsort(entropy[wrong], kind='stable')[:count]],
  }


def explain_sample(outputs, source, vocab, config, preprocess=None, display=None) -> dict:
  """The questions that the report shows: `report_sections` of `config.report_questions` each,
  as their rows of `evaluate`'s outputs (a question in several sections once), with their
  inputs, 'index' (their record numbers, sorted) and 'sections' ({section: record numbers}).
  `display(image_ids) -> [n, S, S, 3] uint8` replaces 'image' with a picture when the model's
  input is not one (grid features)."""
  sections = report_sections(outputs, config.report_questions, config.seed)
  indices = np.unique(np.concatenate(list(sections.values())))
  sample = {**{k: v[indices] for k, v in outputs.items()},
            **read_questions(source, indices, vocab, config, preprocess), 'index': indices,
            'sections': sections}
  if display is not None:
    sample['image'] = display([int(source[int(i)]['image_id']) for i in indices])
  return sample


def answer_probability(apply_fn, params, images, question, length, answer, key, ucam):
  """[n] the probability of `answer` [n] for images [n, H, W, 3] and questions [n, length]: the
  deterministic pass of `gca.forward` (with the GCA mask in mode 'mask')."""
  v = apply_fn(params, images, method='encode_image')
  e = apply_fn(params, question, method='embed_question')
  _, out = gca.forward(apply_fn, params, (v, e, length), answer, jnp.ones(answer.shape), key,
                       ucam, train=False)
  return jax.nn.softmax(out['logits'])[jnp.arange(len(answer)), answer]


def faithfulness(params, apply_fn, source, outputs, vocab, config, preprocess=None) -> dict:
  """{type: {'deletion_auc', 'insertion_auc'}}: means over `config.faithfulness_questions` test
  questions fixed by the seed, `config.faithfulness_steps` steps (`metrics.deletion_insertion_auc`).

  The score is the model's probability of its original answer; a deleted pixel takes the
  image's mean colour, which the stem's mean-colour subtraction maps to about zero: no content.
  On grid features a deleted cell takes the grid's mean feature.
  Every map type runs in one batch, so each step is one call. Every process runs it.
  """
  if not config.faithfulness_questions:
    return {}
  indices = sample_indices(len(outputs['answer']), config.faithfulness_questions, config.seed)
  batch = read_questions(source, indices, vocab, config, preprocess)
  maps = map_types({k: v[indices] for k, v in outputs.items()})
  copies = len(maps)

  def tile(x):
    return np.concatenate([x] * copies)

  probability = jax.jit(functools.partial(answer_probability, apply_fn, ucam=config.ucam))
  question, length = tile(batch['question']), tile(batch['length'])
  answer = tile(outputs['probs'][indices].argmax(-1).astype(np.int32))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)

  def score(images):
    return np.asarray(probability(params, images, question, length, answer, key))

  images = batch['image']
  deletion, insertion = metrics.deletion_insertion_auc(
      score, tile(images), np.concatenate(list(maps.values())), config.faithfulness_steps,
      baseline=tile(images.mean(axis=(1, 2), keepdims=True)))
  size = len(indices)
  return {name: {'deletion_auc': float(deletion[i * size:(i + 1) * size].mean()),
                 'insertion_auc': float(insertion[i * size:(i + 1) * size].mean())}
          for i, name in enumerate(maps)}


def display_images(builder, split: str, size: int = 224):
  """VQA on grid features: `display(image_ids)` -> [n, size, size, 3] uint8, the COCO images
  for the report's figures (grey where the file is not in the manual directory)."""
  def display(image_ids):
    images = []
    for image_id in image_ids:
      path = builder.image_path(split, image_id)
      try:
        with Image.open(path) as im:
          images.append(np.asarray(im.convert('RGB').resize((size, size))))
      except (OSError, TypeError, AttributeError):
        images.append(np.full((size, size, 3), 128, np.uint8))
    return np.stack(images)
  return display


def stored_images(builder, split: str, table):
  """Synthetic datasets on grid features: `display(image_ids)` -> [n, H, W, 3] uint8, the
  stored images, for the report's figures."""
  source = input_pipeline.data_source(builder, split)
  first = {}
  for record, image_id in enumerate(table.image_id):
    first.setdefault(int(image_id), record)
  return lambda image_ids: np.stack([source[first[int(i)]]['image'] for i in image_ids])


def evaluation_source(builder, split: str, vocab, config, answers=None, with_mask=False,
                      model_grid=None):
  """(source, preprocess, table) of a split as the evaluation reads it: `preprocess` for
  `input_pipeline.eval_batches` (None: the default one), and the question table (VQA, or grid
  features; else None).
  VQA with masks needs `model_grid(example visual input) -> (h, w)`, the grid its maps go to."""
  kind = input_pipeline.check_features(config)
  if answers is None and kind == 'image':
    return input_pipeline.data_source(builder, split, with_mask=with_mask), None, None
  source = input_pipeline.data_source(builder, split, with_mask=with_mask, features=kind)
  table = input_pipeline.question_table(builder, split)
  visual = (input_pipeline.visual_reader(builder, split, source, table, config)
            if kind == 'grid' else None)
  grid = None
  if with_mask:
    grid = model_grid(visual(None, int(table.image_id[0])) if visual else source[0]['image'])
  preprocess = input_pipeline.Preprocess(vocab, config.max_question_length, with_mask, answers,
                                         visual, grid)
  return source, preprocess, table


def monitor_batch(builder, vocab, config, answers=None) -> dict:
  """The first batch of the evaluation split (no masks): a fixed batch to follow training on."""
  split = input_pipeline.evaluation_split(builder)
  source, preprocess, _ = evaluation_source(builder, split, vocab, config, answers)
  batches, _ = input_pipeline.eval_batches(source, vocab, config, preprocess=preprocess)
  return next(iter(batches))


def monitor_metrics(out, batch, with_sigma2: bool = True) -> dict:
  """Host-side figures of `eval_step` outputs on `monitor_batch`: accuracy, and the AUROC for
  wrong answers of the MC predictive entropy and (with_sigma2) of sigma2, over the questions
  with a true answer."""
  keep = (np.asarray(batch['weight']) > 0) & (np.asarray(batch['answer']) >= 0)
  wrong = (np.asarray(out['probs']).argmax(-1) != np.asarray(batch['answer']))[keep]
  results = {'monitor_accuracy': float(1 - wrong.mean())}
  for score in ('predictive_entropy', 'sigma2')[:1 + with_sigma2]:
    results[f'monitor_auroc_{score}'] = metrics.auroc(np.asarray(out[score])[keep], wrong)
  return results


def evaluate_and_report(params, apply_fn, builder, vocab, mesh, config, workdir: str,
                        answers=None, writer=None, step: int = 0) -> dict:
  """Evaluates on the test split (`evaluate`, `faithfulness`) and, on process 0, writes
  workdir/report/: the plots and the figures of `explain_sample` (`report.write`). Returns the
  test metrics; 'maps' holds, per map type, the agreement with the ground truth (splits with a
  mask, or VQA-HAT maps) and the faithfulness.

  VQA (`answers`, the training run's `vqa_answers.AnswerVocabulary`): the validation split, or
  that of `config.eval_dataset` when set (e.g. 'vqa/v1_hat_questions': VQA-HAT); the visual
  input as `config.features` says. `writer` (a `metric_writer.MetricWriter`, process 0's): the
  first figure of each section of the report goes to TensorBoard at `step`.
  """
  if config.get('eval_dataset'):
    builder = input_pipeline.get_builder(config, config.eval_dataset)
  features = builder.info.features
  split = input_pipeline.evaluation_split(builder)
  with_mask = 'mask' in features or 'hat_maps' in features

  def model_grid(example):  # The model's grid, for the HAT maps.
    return jax.eval_shape(lambda x: apply_fn(params, x, method='encode_image'),
                          jax.ShapeDtypeStruct((1, *example.shape), example.dtype)).shape[1:3]

  source, preprocess, table = evaluation_source(builder, split, vocab, config, answers, with_mask,
                                                model_grid)
  display, answer_types, human_answers = None, None, None
  if answers is None:
    answer_names = features['answer'].names
  else:
    answer_names = list(answers.answers)
    human_answers, answer_types = table.human_answers, table.answer_type
  if input_pipeline.check_features(config) == 'grid':
    display = (display_images(builder, split) if answers is not None
               else stored_images(builder, split, table))
  batches, num_batches = input_pipeline.eval_batches(source, vocab, config, with_mask=with_mask,
                                                     preprocess=preprocess)
  results, outputs = evaluate(
      params, apply_fn, batches, num_batches, mesh, config, desc=split,
      answer_names=answer_names,
      family_names=features['family'].names if 'family' in features else None,
      human_answers=human_answers, answer_types=answer_types)
  if answers is not None:
    results['split'] = split  # VQA evaluates on validation.
  faithful = faithfulness(params, apply_fn, source, outputs, vocab, config, preprocess)
  if faithful:
    results['maps'] = {name: {**results.get('maps', {}).get(name, {}), **values}
                       for name, values in faithful.items()}
    results['faithfulness'] = {'questions': min(config.faithfulness_questions,
                                                results['num_examples']),
                               'steps': config.faithfulness_steps, 'baseline': 'mean colour'}
  if jax.process_index() == 0:
    sample = explain_sample(outputs, source, vocab, config, preprocess, display)
    spearman = ({name: rho for name, (rho, _) in attention_agreement(outputs).items()}
                if 'ground_truth' in outputs else {})
    labelled = outputs['answer'] >= 0  # The plots' correct / wrong need a true answer.
    plots = report.plot_evaluation(workdir, {k: v[labelled] for k, v in outputs.items()},
                                   results, spearman)
    report.write(workdir, sample, vocab, answer_names, config,
                 {**{f'test {k}': results[k] for k in ('accuracy', 'vqa_accuracy', 'ece', 'nll',
                                                       'brier') if k in results},
                  'MC dropout': f"{results['mc_samples']} samples, scope '{results['mc_scope']}'"},
                 plots=plots, maps=results.get('maps'))
    if writer is not None:
      writer.write_images(step, report.first_figures(workdir, sample))
  return results
