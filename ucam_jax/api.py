"""The Python API: load a trained run, answer questions about images, explain the answers.

  from ucam_jax import api
  run = api.load('workdir/san')                  # the latest checkpoint (or step=N)
  out = api.answer(run, images, ['what shape is in the image?'])
  out['answer'], out['probability'], out['predictive_entropy'], ...
  out = api.explain(run, images, questions)      # out['maps']: {map type: [n, H, W]}
  api.figure(images[0], {k: m[0] for k, m in out['maps'].items()})  # a matplotlib Figure

Answers and maps come from the evaluation's own step (`evaluate.explain_questions`, which
answers through `evaluate.eval_step`), jitted once per run: in GCA mode (`config.ucam.mode=
'mask'`) the answer is that of the second pass, with the certainty mask, as the run's reported
test accuracy counts it (`model.apply` alone is the first pass). The questions go in batches of
`config.eval_batch_size`, padded, with the evaluation's keys, so the test split answered in
order reproduces the evaluation question for question.

Images: [n, H, W, 3] uint8 (or a list of arrays or PIL images), resized to the run's input
size when they differ. Models on precomputed grid features (VQA `features='grid'`) take no
images and are not served here.
"""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

from ucam_jax import (checkpoints, evaluate, input_pipeline, models, report, sharding, storage,
                      train)
from ucam_jax.text import Vocabulary

# The maps of `explain`, as `evaluate.map_types` names them, and the words' certainty.
MAPS = ('model_attention', 'gca_attention', 'gradcam', 'ucam', 'random')


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run: its config, vocabulary, answer names and parameters at `step`."""
  workdir: str
  config: ml_collections.ConfigDict
  vocab: Vocabulary
  answers: tuple[str, ...]
  params: dict
  step: int
  image_shape: tuple[int, int, int]  # The model's input [H, W, 3].
  apply_fn: Callable = dataclasses.field(repr=False)
  # The evaluation's step, jitted once per run (not per call): (params, batch=, key=) -> outputs.
  step_fn: Callable = dataclasses.field(repr=False)


def load(workdir: str, step: int | None = None) -> Run:
  """The run trained in `workdir` (`python -m ucam_jax.main --workdir=...`), with the parameters
  of checkpoint `step` (default: the latest).

  Raises FileNotFoundError when `workdir` holds no run or no checkpoint yet, ValueError for a
  `step` it does not hold or a run on grid features.
  """
  path = epath.Path(workdir)
  if not (path / 'config.json').exists():
    raise FileNotFoundError(
        f'No ucam_jax run in {workdir}: it has no config.json. Train one with `python -m '
        f'ucam_jax.main --config=san --workdir={workdir}`, or pass the workdir of a run.')
  config = ml_collections.ConfigDict(json.loads((path / 'config.json').read_text()))
  if input_pipeline.check_features(config) == 'grid':
    raise ValueError(f'The run in {workdir} reads precomputed grid features, not images: '
                     'evaluate it with `python -m ucam_jax.main --mode=eval` instead.')
  directory = storage.absolute(workdir) / 'checkpoints'
  steps = []
  if directory.exists():
    with checkpoints.manager(workdir, read_only=True) as manager:
      steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(
        f'The run in {workdir} has no checkpoint yet: training saves one every '
        f'{config.checkpoint_every_steps} steps and at its end. Let it run, or resume it with '
        'the same --config and --workdir.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f'No checkpoint at step {step} in {directory}; it holds {sorted(steps)}.')

  vocab = Vocabulary.load(path / 'vocabulary.json')
  builder = input_pipeline.get_builder(config, prepare=False)  # Its description only.
  if (path / train.ANSWERS_FILE).exists():  # VQA: the run's own answer vocabulary.
    answers = tuple(json.loads((path / train.ANSWERS_FILE).read_text())['answers'])
  else:
    answers = tuple(builder.info.features['answer'].names)
  image_shape = tuple(builder.info.features['image'].shape)

  model = models.get_model(config, vocab.size, len(answers))
  abstract = train.abstract_train_state(
      config, model, jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8), sharding.make_mesh())
  with checkpoints.manager(workdir, read_only=True) as manager:
    state = checkpoints.restore_verified(manager, step, abstract)  # Digests and finite values.
  return Run(
      workdir=str(workdir), config=config, vocab=vocab, answers=answers, params=state.params,
      step=int(step), image_shape=image_shape, apply_fn=model.apply,
      step_fn=jax.jit(functools.partial(evaluate.explain_questions, model.apply, config=config)))


def _images(run: Run, images) -> np.ndarray:
  """[n, H, W, 3] uint8 at the run's input size, from arrays or PIL images."""
  height, width, _ = run.image_shape
  out = []
  for image in images:
    if not isinstance(image, Image.Image):
      image = np.asarray(image)
      if image.dtype != np.uint8:
        raise ValueError(f'Images must be uint8 RGB [H, W, 3]; got dtype {image.dtype}.')
      image = Image.fromarray(image)
    if image.size != (width, height) or image.mode != 'RGB':
      image = image.convert('RGB').resize((width, height), Image.BILINEAR)
    out.append(np.asarray(image))
  return np.stack(out)


def _batches(run: Run, images, questions: Sequence[str]):
  """(batch index, numpy batch, number of real rows): the inputs in batches of
  `config.eval_batch_size`, padded with weight 0, as `input_pipeline.eval_batches` makes them."""
  if isinstance(questions, str):
    raise ValueError('questions must be a list of strings, one per image.')
  images = _images(run, images)
  if len(images) != len(questions):
    raise ValueError(f'{len(images)} images but {len(questions)} questions: give one question '
                     'per image (repeat an image to ask it several questions).')
  size = input_pipeline.local_batch_size(run.config.eval_batch_size)
  encoded = [run.vocab.encode(q, run.config.max_question_length) for q in questions]
  for i, start in enumerate(range(0, len(questions), size)):
    rows = slice(start, start + size)
    batch = {'image': images[rows],
             'question': np.stack([t for t, _ in encoded[rows]]).astype(np.int32),
             'length': np.array([n for _, n in encoded[rows]], np.int32)}
    batch['answer'] = np.zeros(len(batch['length']), np.int32)  # Unknown: no loss is used.
    yield i, input_pipeline.pad_batch(batch, size), len(batch['length'])


def _outputs(run: Run, images, questions, key) -> dict:
  """`evaluate.explain_questions` over the padded batches -> numpy outputs [n, ...]; `key`
  (default: the evaluation's) is folded with the batch index as `evaluate.evaluate` does."""
  if key is None:
    key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 1)
  mesh = sharding.make_mesh()
  outputs = []
  for i, batch, n in _batches(run, images, questions):
    out = run.step_fn(run.params, batch=sharding.shard_batch(batch, mesh),
                      key=jax.random.fold_in(key, i))
    outputs.append(jax.tree.map(lambda x: np.asarray(x)[:n], sharding.to_host(out)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def answer(run: Run, images, questions: Sequence[str], *, mc_dropout: bool = False,
           key: jax.Array | None = None) -> dict:
  """Answers with their probability and every uncertainty score.

  Returns numpy arrays [n] unless said: 'answer' (strings), 'probability' (of the answer),
  'probs' [n, answers], 'mc_probs' [n, answers] (the mean of `config.mc_samples` MC-dropout
  passes), the MC-dropout scores 'predictive_entropy', 'expected_entropy',
  'mutual_information', 'variation_ratio', 'predictive_variance', and 'sigma2' (the variance
  head). mc_dropout=True takes the answer from 'mc_probs' instead of the deterministic pass.
  `key` seeds the MC dropout (and GCA's noise draws); default: the evaluation's.
  """
  out = _outputs(run, images, questions, key)
  probs = out['mc_probs' if mc_dropout else 'probs']
  chosen = probs.argmax(-1)
  scores = {k: out[k] for k in ('predictive_entropy', 'expected_entropy', 'mutual_information',
                                'variation_ratio', 'predictive_variance', 'sigma2') if k in out}
  return {'answer': [run.answers[i] for i in chosen],
          'probability': probs[np.arange(len(chosen)), chosen],
          'probs': out['probs'], 'mc_probs': out['mc_probs'], **scores}


def explain(run: Run, images, questions: Sequence[str], methods: Sequence[str] | None = None,
            *, key: jax.Array | None = None) -> dict:
  """The maps of the run's own answers, at image resolution.

  Returns 'maps': {method: [n, H, W] in [0, 1]}; 'word_certainty' [n, length] (U-CAM over the
  word embeddings) with 'words' (each question's words as the model read them); 'answer'.
  methods: of `MAPS`: 'model_attention' (mean over hops; in GCA mode the first pass's),
  'gca_attention' (after the certainty mask; GCA mode only), 'gradcam' (of the answer's logit),
  'ucam' (of the uncertainty U of `config.ucam`), 'random' (the chance level); default: every
  one the run has but 'random'. Each is scaled to its maximum, then resized bilinearly from the
  model grid.
  """
  unknown = [m for m in methods or () if m not in MAPS]
  if unknown:
    raise ValueError(f'Unknown map types {unknown}; choose from {list(MAPS)}.')
  out = _outputs(run, images, questions, key)
  grid = evaluate.map_types(out)
  if methods is None:
    methods = [m for m in MAPS if m in grid and m != 'random']
  if 'gca_attention' in methods and 'gca_attention' not in grid:
    raise ValueError("'gca_attention' exists only in GCA mode (config.ucam.mode='mask'); this "
                     f"run was trained with mode {run.config.ucam.mode!r}.")
  height, width, _ = run.image_shape
  maps = {}
  for method in methods:
    m = np.asarray(grid[method], np.float32)
    m = m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
    maps[method] = np.asarray(jax.image.resize(m, (len(m), height, width), 'bilinear'))
  words = [run.vocab.decode(*run.vocab.encode(q, run.config.max_question_length))
           for q in questions]
  return {'maps': maps, 'word_certainty': out['word_certainty'], 'words': words,
          'answer': [run.answers[i] for i in out['probs'].argmax(-1)]}


# --------------------------------------------------------------------------- figures


def overlay(image, heatmap, title: str = '') -> Figure:
  """One image with a map over it (`report.overlay`), as a matplotlib Figure."""
  fig = Figure(figsize=(3, 3))
  report.overlay(fig.add_subplot(), np.asarray(image), heatmap, title)
  fig.tight_layout()
  return fig


def figure(image, maps: dict, title: str = '') -> Figure:
  """The image and one panel per map ({name: [H, W] or [h, w]}), as a matplotlib Figure: e.g.
  question n of `explain`: {k: m[n] for k, m in out['maps'].items()}."""
  fig = Figure(figsize=(2.2 * (len(maps) + 1), 2.6))
  axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
  report.overlay(axes[0], np.asarray(image), None, 'image')
  for ax, (name, heatmap) in zip(axes[1:], maps.items()):
    report.overlay(ax, np.asarray(image), np.asarray(heatmap), report.MAP_TITLES.get(name, name))
  if title:
    fig.suptitle(title, fontsize=9, parse_math=False)
  fig.tight_layout()
  return fig
