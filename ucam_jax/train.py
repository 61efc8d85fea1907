"""Training and evaluation: jitted, data parallel over every device, resumable from Orbax
checkpoints.

A run is a pure function of its config: the batch at step s and the dropout key at step s are
derived from the seed and the checkpointed state, so a run stopped and resumed ends with the same
parameters as one that never stopped.
"""

import contextlib
import functools
import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state
from tqdm import tqdm

from ucam_jax import (checkpoints, distributed, evaluate, gca, input_pipeline, metric_writer,
                      models, sharding, storage, vqa_answers)
from ucam_jax.errors import ConfigError, MissingFiles
from ucam_jax.text import Vocabulary

ANSWERS_FILE = 'answers.json'  # VQA's answer vocabulary, beside vocabulary.json.
DATA_FILE = 'data.json'  # What the run was trained on, by content (`data_fingerprint`).


class NoCheckpoint(MissingFiles):
  """--mode=eval or predict on a workdir without a checkpoint."""


class TrainState(train_state.TrainState):
  rng: jax.Array  # Raw uint32 key, split once per step.


SCHEDULES = ('cosine', 'step')


def learning_rate_schedule(config, num_steps: int) -> optax.Schedule:
  """`config.learning_rate_schedule`: 'cosine' (the default) decays from `learning_rate` to
  `final_learning_rate_factor` of it over the run; 'step' multiplies it by `decay_factor` every
  `decay_every_steps` steps (the published base model: halved every 50k iterations)."""
  name = config.get('learning_rate_schedule', 'cosine')
  if name == 'cosine':
    return optax.cosine_decay_schedule(config.learning_rate, max(num_steps, 1),
                                       alpha=config.final_learning_rate_factor)
  if name == 'step':  # decay_every_steps and decay_factor: see RANGES.
    return optax.exponential_decay(config.learning_rate, config.decay_every_steps,
                                   config.decay_factor, staircase=True)
  raise ValueError(f'config.learning_rate_schedule is {name!r}; choose one of {list(SCHEDULES)}.')


INF = float('inf')
# The allowed range of every numeric field of the configs (configs/*.py): (low, high, brackets);
# for a tuple, of its every element. A field that a config lacks is skipped. Checked elsewhere:
# config.ucam's (gca.check_config), the evaluation's (evaluate.check_config) and the datasets'
# own settings, dataset_kwargs (by their builders). learning_rate may be inf: tests use it to
# make a run diverge.
RANGES = {
    'max_question_length': (1, INF, '[)'), 'questions_per_image': (1, INF, '[)'),
    'data_threads': (1, INF, '[)'), 'seed': (0, INF, '[)'),
    'batch_size': (1, INF, '[)'), 'eval_batch_size': (1, INF, '[)'),
    'learning_rate': (0, INF, '(]'), 'final_learning_rate_factor': (0, 1, '[]'),
    'decay_every_steps': (1, INF, '[)'), 'decay_factor': (0, 1, '(]'),
    'num_epochs': (0, INF, '[)'), 'num_train_steps': (0, INF, '[)'),
    'log_every_steps': (1, INF, '[)'), 'checkpoint_every_steps': (1, INF, '[)'),
    'checkpoints_to_keep': (1, INF, '[)'), 'stop_at_step': (0, INF, '[)'),
    'num_answers': (1, INF, '[)'), 'grid_shape': (1, INF, '[)'),
    'model.stem_features': (1, INF, '[)'), 'model.grid_convs': (0, INF, '[)'),
    'model.embed_dim': (1, INF, '[)'), 'model.hidden_dim': (1, INF, '[)'),
    'model.question_dim': (1, INF, '[)'), 'model.attention_dim': (1, INF, '[)'),
    'model.num_hops': (1, INF, '[)'), 'model.glimpses': (1, INF, '[)'),
    'model.classifier_dim': (1, INF, '[)'), 'model.dropout_rate': (0, 1, '[)'),
    'model.variance_hidden_dim': (0, INF, '[)'), 'monitor_every_steps': (0, INF, '[)'),
    'model.sketch_dim': (1, INF, '[)'), 'model.joint_dim': (1, INF, '[)'),
    'model.image_dim': (1, INF, '[)'),
    # The frozen synthetic extractor (pretrain_features.default_extractor; its own checks add
    # image_size = 8 x grid).
    'extractor.seed': (0, INF, '[)'), 'extractor.train_seed': (0, INF, '[)'),
    'extractor.num_images': (1, INF, '[)'), 'extractor.image_size': (8, INF, '[)'),
    'extractor.min_objects': (1, INF, '[)'), 'extractor.max_objects': (1, INF, '[)'),
    'extractor.grid': (1, INF, '[)'), 'extractor.width': (1, INF, '[)'),
    'extractor.features': (1, INF, '[)'), 'extractor.steps': (1, INF, '[)'),
    'extractor.batch_size': (1, INF, '[)'), 'extractor.learning_rate': (0, INF, '()'),
    'extractor.object_weight': (0, INF, '[)'),
}


def _in_range(value, low, high, brackets: str) -> bool:
  return ((low <= value if brackets[0] == '[' else low < value)
          and (value <= high if brackets[1] == ']' else value < high))


def check_config(config) -> None:
  """Raises ConfigError naming a field outside its range (RANGES, gca.check_config,
  evaluate.check_config), its value and the range, before anything is written. Unchecked,
  such values crashed late (batch_size=0: a ZeroDivisionError after config.json was written) or
  ran silently wrong (num_epochs=-1 trained nothing and reported it; dropout_rate=1.5 dropped
  every unit; checkpoints_to_keep=0 kept no checkpoint and said that a rerun resumes)."""
  for key, (low, high, brackets) in RANGES.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node.get(parent, {})
    if name not in node:
      continue
    value = node[name]
    for element in value if isinstance(value, (tuple, list)) else (value,):
      if not _in_range(element, low, high, brackets):
        raise ConfigError(f'config.{key} must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}, '
                          f'got {value!r}.')
  if not config.num_train_steps and not config.num_epochs > 0:
    raise ConfigError('config.num_epochs must be in (0, inf) when config.num_train_steps is 0, '
                      f'got {config.num_epochs!r}.')
  if config.get('monitor_every_steps', 0) % config.log_every_steps:
    raise ConfigError(f'config.monitor_every_steps ({config.monitor_every_steps}) must be a '
                      f'multiple of config.log_every_steps ({config.log_every_steps}), or 0.')
  devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % devices:
      raise ConfigError(f'config.{key} must be a multiple of the number of devices ({devices}), '
                        f'got {config[key]}.')
  try:
    gca.check_config(config.ucam)
    evaluate.check_config(config)
    profile_window(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def variance_labels(params):
  """'variance' for the variance head's parameters ('variance', 'variance_hidden'), 'main' for
  the rest (optax.multi_transform)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'variance' if any(str(getattr(k, 'key', '')).startswith('variance')
                                        for k in path) else 'main', params)


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  """Adam on the schedule; with config.ucam.variance_optimizer 'sgd', the variance head has its
  own plain SGD at config.ucam.variance_learning_rate, as the published training scripts do.
  The model's fixed tables (`models.FIXED_PARAMS`, MCB's count sketches) get zero updates."""
  tx = optax.adam(learning_rate_schedule(config, num_steps))
  if config.ucam.variance_optimizer == 'sgd':
    tx = optax.multi_transform(
        {'main': tx, 'variance': optax.sgd(config.ucam.variance_learning_rate)}, variance_labels)
  if models.has_fixed_params(config.model.name):  # Never moved, by any optimiser or decay.
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), models.fixed_mask))
  return tx


def create_train_state(config, model: nn.Module, num_steps: int, batch) -> TrainState:
  """Fresh parameters and optimiser; `batch` is a training batch (question groups)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_rng, batch['image'], batch['question'][:, 0], batch['length'][:, 0])
  params = {'params': variables['params']}  # Not the explanation-only 'perturbations'.
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=make_optimizer(config, num_steps), rng=train_rng)


def abstract_train_state(config, model: nn.Module, visual: jax.ShapeDtypeStruct, mesh):
  """The shapes and dtypes of `create_train_state`'s state, replicated over `mesh`, to restore a
  checkpoint into without computing parameters. visual: one example's image or grid [1, ...]."""
  example = {'image': visual,
             'question': jax.ShapeDtypeStruct((1, 1, config.max_question_length), jnp.int32),
             'length': jax.ShapeDtypeStruct((1, 1), jnp.int32)}
  abstract = jax.eval_shape(lambda batch: create_train_state(config, model, 1, batch), example)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      abstract)


def group_features(apply_fn, params, batch):
  """Features of a batch of question groups, one row per question [b * g]: each image is encoded
  once and its grid is repeated for its g questions. Returns (v, e, lengths), see gca.answer."""
  b, g, length = batch['question'].shape
  v = apply_fn(params, batch['image'], method='encode_image')
  e = apply_fn(params, batch['question'].reshape(b * g, length), method='embed_question')
  return jnp.repeat(v, g, axis=0), e, batch['length'].reshape(-1)


def train_step(state: TrainState, batch, ucam):
  """One optimiser step on a global batch of question groups under the `config.ucam` switches.

  Returns the new state and the batch's mean loss terms (see gca.forward) and accuracy over its
  real (weight 1) questions. The loss's targets are the batch's soft 'targets' [b, g, answers]
  where it has them (VQA), else its 'answer' indices; accuracy is against 'answer'.
  """
  rng, step_rng = jax.random.split(state.rng)
  labels, weights = batch['answer'].reshape(-1), batch['weight'].reshape(-1)
  targets = labels
  if 'targets' in batch:
    targets = batch['targets'].reshape(-1, batch['targets'].shape[-1])

  def loss_fn(params):
    features = group_features(state.apply_fn, params, batch)
    terms, out = gca.forward(state.apply_fn, params, features, targets, weights, step_rng, ucam,
                             train=True)
    return terms['loss'], (terms, out)

  (_, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, rng=rng)
  correct = (out['logits'].argmax(-1) == labels) * weights
  metrics = {**terms, 'accuracy': correct.sum() / weights.sum(), 'questions': weights.sum()}
  if ucam.mode != 'none':  # Whether the variance head collapses, and U's share of the loss.
    sigma2 = jnp.where(weights > 0, out['sigma2'], jnp.nan)
    metrics['sigma2_mean'] = jnp.nanmean(sigma2)
    for q, value in zip((10, 50, 90), jnp.nanquantile(sigma2, jnp.array([0.1, 0.5, 0.9]))):
      metrics[f'sigma2_p{q}'] = value
    metrics['uncertainty_ratio'] = terms['uncertainty'] / terms['answer']
  return state, metrics


def jit_train_step(ucam, out_sharding=None):
  """`train_step` under `ucam`, jitted as training runs it: the state's buffers donated (the
  new state reuses them), the outputs placed by `out_sharding` (e.g. replicated over the mesh)."""
  placed = {} if out_sharding is None else {'out_shardings': (out_sharding, out_sharding)}
  return jax.jit(functools.partial(train_step, ucam=ucam), donate_argnums=0, **placed)


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir (a directory or gs://bucket/dir), or fails with a message that says
  what to do."""
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test{jax.process_index()}'  # Processes may share it.
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:  # gcsfs's errors may have no strerror.
    raise PermissionError(f'The workdir {workdir!r} is not writable ({e.strerror or e}). Pass a '
                          'directory you can write to with --workdir.') from e


def load_or_build_vocabulary(workdir: str, table: input_pipeline.QuestionTable) -> Vocabulary:
  """The run's vocabulary: built from the training questions and saved in the workdir on the
  first run, reused when resuming."""
  path = epath.Path(workdir) / 'vocabulary.json'
  if path.exists():
    return Vocabulary.load(path)
  vocab = Vocabulary.build(table.question)
  if jax.process_index() == 0:  # Every process builds the same one.
    vocab.save(path)
  return vocab


def load_or_build_answers(workdir: str, table: input_pipeline.QuestionTable,
                          num_answers: int) -> vqa_answers.AnswerVocabulary:
  """VQA's answer vocabulary: the `num_answers` most frequent normalised human answers of the
  training questions, built and saved in the workdir (answers.json) on the first run, reused
  when resuming and by --mode=eval."""
  path = epath.Path(workdir) / ANSWERS_FILE
  if path.exists():
    return vqa_answers.AnswerVocabulary(tuple(storage.read_json(path)['answers']))
  answers = vqa_answers.AnswerVocabulary.build(table.human_answers, num_answers)
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps({'answers': answers.answers}, indent=0))
  return answers


def answer_setup(builder, workdir: str, table: input_pipeline.QuestionTable | None, config):
  """(answer names, VQA answer vocabulary or None). VQA: the workdir's vocabulary (built from
  the training `table` when there is none yet); other datasets: the builder's label names."""
  if not input_pipeline.is_vqa(builder):
    return builder.info.features['answer'].names, None
  if table is None and not (epath.Path(workdir) / ANSWERS_FILE).exists():
    raise MissingFiles(f'No {ANSWERS_FILE} in {workdir}: it is written by training. '
                            'Train with the same --config and --workdir first.')
  answers = load_or_build_answers(workdir, table, config.num_answers)
  return list(answers.answers), answers


def stop_if_not_finite(step_metrics: list[dict], step: int,
                       manager: ocp.CheckpointManager) -> None:
  """Raises FloatingPointError if a loss of the steps up to `step` is nan or infinite.

  The bad state is never saved, so the latest checkpoint is the last good one.
  """
  losses = np.array([m['loss'] for m in step_metrics])
  if np.isfinite(losses).all():
    return
  first = step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))
  manager.wait_until_finished()
  kept = manager.latest_step()
  raise FloatingPointError(
      f'The training loss is {losses[~np.isfinite(losses)][0]} at step {first}; training stopped '
      'and that state was not saved. '
      + (f'The last good checkpoint, step {kept}, is intact in {manager.directory}: '
         'rerunning resumes from it (lower --config.learning_rate first).' if kept is not None
         else 'No checkpoint had been saved yet.'))


def check_same_model(workdir: str, config) -> None:
  """Resuming with another model would fail deep inside Orbax: name the differences instead."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = storage.read_json(path).get('model', {})
  current = json.loads(config.model.to_json_best_effort())
  # The compute dtype leaves the parameters as they are: a run may resume in another precision.
  changed = sorted(k for k in (saved.keys() | current.keys()) - {'dtype'}
                   if saved.get(k) != current.get(k))
  if changed:
    raise ConfigError(
        f'The checkpoints in {workdir} do not fit this config: model ' + ', '.join(
            f'{k} was {saved.get(k)!r}, now {current.get(k)!r}' for k in changed)
        + '. Resume with the same config, or start afresh with a new --workdir.')


def profile_window(config) -> tuple[int, int] | None:
  """`config.profile_steps` 'a,b' -> (a, b), the first and last step to trace (inclusive);
  '' -> None. Raises ValueError on anything else."""
  text = config.profile_steps.strip()
  if not text:
    return None
  try:
    first, last = (int(x) for x in text.split(','))
  except ValueError:
    first, last = 0, -1
  if not 1 <= first <= last:
    raise ValueError(f"config.profile_steps is {text!r}: give the first and last step to "
                     "profile, 'a,b' with 1 <= a <= b (e.g. '10,12'), or '' for none.")
  return first, last


def stop_trace(state) -> None:
  """Ends `jax.profiler` tracing once the traced steps have run (dispatch is asynchronous)."""
  jax.block_until_ready(state)
  jax.profiler.stop_trace()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` on `config.dataset`, evaluates on the test split, writes the workdir.

  Writes config.json, vocabulary.json (VQA: and answers.json), checkpoints/, metrics.jsonl and
  TensorBoard event files (`metric_writer`), curves.png, metrics.json and report/ (plots,
  explanation figures, index.html; see `evaluate.evaluate_and_report`); with
  `config.profile_steps` 'a,b', a `jax.profiler` trace of steps a to b in plugins/profile/.
  Returns the contents of metrics.json. With several processes each trains on its slice of every
  batch and all take part in each checkpoint; only process 0 writes the other files and reports.
  SIGTERM (preemption) checkpoints at the next step and returns early, as `stop_at_step` does.
  One run at a time: process 0 locks the workdir (storage.workdir_lock) before writing in it.
  Resuming restores the newest checkpoint that passes verification (checkpoints.py).
  """
  start_time = time.time()
  check_config(config)
  prepare_workdir(workdir)
  with storage.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_and_evaluate(config, workdir, start_time)


def _train_and_evaluate(config, workdir: str, start_time: float) -> dict:
  main_process = jax.process_index() == 0
  builder = input_pipeline.get_builder(config)
  table = input_pipeline.question_table(builder, 'train')
  vocab = load_or_build_vocabulary(workdir, table)
  answer_names, answers = answer_setup(builder, workdir, table, config)
  num_answers = len(answer_names)
  if answers is not None:
    table = input_pipeline.label_answers(table, answers)
  features = input_pipeline.check_features(config)
  source = input_pipeline.data_source(builder, 'train', features=features)
  groups = input_pipeline.QuestionGroups(
      source, table, vocab, config.questions_per_image, config.max_question_length, answers,
      input_pipeline.visual_reader(builder, 'train', source, table, config))
  steps_per_epoch = len(groups) // config.batch_size
  num_steps = config.num_train_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
  if num_steps < 1:
    raise ConfigError(f'config.batch_size {config.batch_size} is more than the {len(groups)} '
                      'training groups (images): no training step. Lower it.')

  mesh = sharding.make_mesh()
  model = models.get_model(config, vocab.size, num_answers)
  example = next(input_pipeline.train_batches(groups, config))
  state = jax.jit(lambda batch: create_train_state(config, model, num_steps, batch),
                  out_shardings=sharding.replicated(mesh))(example)

  manager = checkpoints.manager(workdir, config.checkpoints_to_keep)
  if manager.latest_step() is not None:
    check_same_model(workdir, config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore_newest_intact(manager, abstract, workdir)
  start_step = int(state.step)
  # Written only now, so a failed resume leaves the earlier run's config.json as it was.
  if main_process:
    storage.write_text(epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))
    storage.write_text(epath.Path(workdir) / DATA_FILE,
                       json.dumps(data_fingerprint(builder), indent=2))

  writer = metric_writer.MetricWriter(workdir, resume_step=start_step) if main_process else None
  def jit_step(ucam):
    return jit_train_step(ucam, sharding.replicated(mesh))

  step_fn = jit_step(config.ucam)
  # Warm-up: the first steps train the baseline (the answer loss alone), then U and the maps.
  warmup_steps = int(config.ucam.warmup * num_steps) if config.ucam.mode != 'none' else 0
  warmup_fn = jit_step(ml_collections.ConfigDict({**config.ucam, 'mode': 'none'}))
  monitor = None
  if 0 < config.monitor_every_steps <= num_steps:
    monitor_batch = sharding.shard_batch(
        evaluate.monitor_batch(builder, vocab, config, answers), mesh)
    monitor_step = jax.jit(functools.partial(
        evaluate.eval_step, apply_fn=state.apply_fn, mc_samples=config.mc_samples,
        ucam=config.ucam))
    monitor_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)

    def monitor(params):
      out = monitor_step(params, batch=monitor_batch, key=monitor_key)
      return evaluate.monitor_metrics(*sharding.to_host((out, monitor_batch)),
                                      with_sigma2=config.ucam.mode != 'none')
  stop_step = min(num_steps, config.stop_at_step or num_steps)
  batches = input_pipeline.train_batches(groups, config, start_step)
  profile = profile_window(config)
  schedule = learning_rate_schedule(config, num_steps)
  pending, last_train, preempted, tracing = [], {}, False, False
  window_start = time.time()
  with (distributed.preemption_notice() as preemption_reached,
        tqdm(total=num_steps, initial=start_step, desc='train', mininterval=2,
             disable=not main_process) as bar):
    for step in range(start_step + 1, stop_step + 1):
      if profile and step == profile[0]:  # Into workdir/plugins/profile/<time>/.
        jax.profiler.start_trace(str(storage.absolute(workdir)), create_perfetto_trace=True)
        tracing = True
      train_fn = warmup_fn if step <= warmup_steps else step_fn
      state, step_metrics = train_fn(state, sharding.shard_batch(next(batches), mesh))
      if tracing and step == profile[1]:
        stop_trace(state)
        tracing = False
      pending.append(step_metrics)
      bar.update()
      preempted = preemption_reached(step)  # Asked at every step: processes agree on the step.
      last_step = preempted or step == stop_step
      checkpoint_due = step % config.checkpoint_every_steps == 0 or last_step
      if checkpoint_due or step % config.log_every_steps == 0:
        pending = jax.device_get(pending)
        stop_if_not_finite(pending, step, manager)  # Before anything from it is saved.
      if step % config.log_every_steps == 0 or last_step:
        # Question-weighted means; a window across the warm-up's end averages each term over
        # the steps that have it.
        last_train = {}
        for k in dict.fromkeys(k for m in pending for k in m if k != 'questions'):
          have = [m for m in pending if k in m]
          last_train[f'train_{k}'] = float(sum(m[k] * m['questions'] for m in have)
                                           / sum(m['questions'] for m in have))
        questions = sum(m['questions'] for m in pending)
        last_train['questions_per_sec'] = float(questions) / (time.time() - window_start)
        last_train['learning_rate'] = float(schedule(step - 1))  # That of the step's update.
        if monitor and step % config.monitor_every_steps == 0:
          last_train.update(monitor(state.params))
        if writer:
          writer.write(step, last_train)
        bar.set_postfix(loss=f"{last_train['train_loss']:.3f}",
                        acc=f"{last_train['train_accuracy']:.3f}")
        pending, window_start = [], time.time()
      if checkpoint_due:
        checkpoints.save(manager, step, state)
      if preempted:
        break
  if tracing:  # Stopped (stop_at_step, SIGTERM) before the window's last step.
    stop_trace(state)
  manager.wait_until_finished()
  manager.close()

  results = {'step': int(state.step), 'num_train_steps': num_steps, **last_train}
  if int(state.step) < num_steps:
    if main_process:
      print(f'Stopped at step {int(state.step)} of {num_steps} '
            f"({'SIGTERM' if preempted else 'stop_at_step'}); the checkpoint is saved: rerun the "
            'same command to resume.')
      writer.close()
    return results
  test = evaluate.evaluate_and_report(state.params, state.apply_fn, builder, vocab, mesh, config,
                                      workdir, answers=answers, writer=writer, step=num_steps)
  results.update(test=test, wall_time_s=time.time() - start_time)
  if main_process:
    writer.write(num_steps, {f'test_{k}': test[k] for k in ('accuracy', 'loss', 'ece')})
    writer.close()
    metric_writer.plot_curves(workdir)
    storage.write_text(epath.Path(workdir) / 'metrics.json', json.dumps(results, indent=2))
  return results


# Switches that change what a trained model computes at test time: --mode=eval must use the ones
# it was trained with.
_EVALUATION_KEYS = ('dataset', 'dataset_kwargs', 'features', 'max_question_length', 'ucam')
# Builder settings that say where the data is, not what it is: the data may move (DATA_FILE
# compares it by content).
_LOCATION_KEYS = ('manual_dir', 'features_dir', 'source_dir')


def data_fingerprint(builder) -> dict:
  """What a run's data is, independent of where it lies: the dataset, its builder config and
  version, and (VQA) a digest of each official file it is built from (`Vqa.fingerprint`)."""
  out = {'dataset': builder.name, 'config': builder.builder_config.name if
         builder.builder_config else None, 'version': str(builder.version)}
  if hasattr(builder, 'fingerprint'):
    out['files'] = builder.fingerprint()
  return out


def _evaluation_settings(config_json: dict) -> dict:
  """The _EVALUATION_KEYS of a config, without the data's location and unset settings."""
  out = {k: config_json.get(k) for k in _EVALUATION_KEYS}
  kwargs = out.get('dataset_kwargs')
  if isinstance(kwargs, dict):
    out['dataset_kwargs'] = {k: v for k, v in kwargs.items()
                             if k not in _LOCATION_KEYS and v is not None} or None
  if isinstance(out.get('ucam'), dict):  # How MC dropout is sampled is the evaluation's choice.
    out['ucam'] = {k: v for k, v in out['ucam'].items() if k != 'mc_scope'}
  return out


def check_same_evaluation(workdir: str, config, builder=None) -> None:
  """Raises ConfigError naming the `_EVALUATION_KEYS` in which `config` differs from the
  training run's config.json (the checkpoint would be evaluated as it was not trained), or,
  with `builder`, the way its data differs from the training data's DATA_FILE. Paths are not
  compared: the data may move (or be copied) to another directory."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = _evaluation_settings(storage.read_json(path))
  current = _evaluation_settings(json.loads(config.to_json_best_effort()))
  changed = [f'{k} was {saved.get(k)!r}, now {current.get(k)!r}' for k in _EVALUATION_KEYS
             if saved.get(k) != current.get(k)]
  if changed:
    raise ConfigError(f'The checkpoints in {workdir} were trained with another config: '
                      + '; '.join(changed) + f'. Evaluate with the config of {path}.')
  data_path = epath.Path(workdir) / DATA_FILE
  if builder is None or not data_path.exists():  # Runs from before DATA_FILE: paths not compared.
    return
  trained, now = storage.read_json(data_path), data_fingerprint(builder)
  differs = [f'{k} was {trained.get(k)!r}, now {now.get(k)!r}'
             for k in ('dataset', 'config', 'version') if trained.get(k) != now.get(k)]
  files, current_files = trained.get('files') or {}, now.get('files') or {}
  differs += [f'{name} has other contents' for name in sorted(files.keys() & current_files.keys())
              if files[name] != current_files[name]]
  if differs:
    raise ConfigError(f'The data is not what the checkpoints in {workdir} were trained on ('
                      + '; '.join(differs) + f'; see {data_path}). Point '
                      '--config.dataset_kwargs.manual_dir at the files of that run.')


def latest_checkpoint_step(workdir: str, train_command: str | None = None) -> int:
  """The latest checkpoint's step; NoCheckpoint, having written nothing, when there is none."""
  directory = storage.absolute(workdir) / 'checkpoints'
  step = None
  if directory.exists():
    with checkpoints.manager(workdir, read_only=True) as manager:
      step = manager.latest_step()
  if step is None:
    raise NoCheckpoint(
        f'No checkpoint in {directory}: --mode=eval and --mode=predict use a trained model. Train '
        'one first with --mode=train (the default) and the same --config and --workdir'
        + (f': {train_command}' if train_command else '.'))
  return step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        train_command: str | None = None) -> dict:
  """--mode=eval: evaluates the latest checkpoint in `workdir` on the test split.

  Writes what the end of `train_and_evaluate` writes: metrics.json (its 'test' entry, with
  'evaluated_step'; the training entries stay) and report/. The checkpoints are only read.
  Raises NoCheckpoint (a FileNotFoundError), having written nothing, when `workdir` holds no
  checkpoint (`train_command`: the command to name), and checkpoints.DamagedCheckpoint when the
  latest one fails verification (it moves nothing). Returns the contents of metrics.json.
  """
  start_time = time.time()
  check_config(config)
  step = latest_checkpoint_step(workdir, train_command)
  with storage.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _evaluate_checkpoint(config, workdir, step, start_time)


def load_trained(config, workdir: str, step: int):
  """The trained model of a workdir at `step`, checked against `config` (model, evaluation
  settings, data by content): (state, builder, vocab, answer names, VQA answers or None, mesh)."""
  check_same_model(workdir, config)
  check_same_evaluation(workdir, config)
  builder = input_pipeline.get_builder(config)
  check_same_evaluation(workdir, config, builder)
  vocab = Vocabulary.load(epath.Path(workdir) / 'vocabulary.json')
  answer_names, answers = answer_setup(builder, workdir, None, config)
  mesh = sharding.make_mesh()
  model = models.get_model(config, vocab.size, len(answer_names))
  if input_pipeline.check_features(config) == 'grid':
    visual = jax.ShapeDtypeStruct((1, *config.grid_shape), jnp.float16)
  else:
    visual = jax.ShapeDtypeStruct((1, *builder.info.features['image'].shape), jnp.uint8)
  abstract = abstract_train_state(config, model, visual, mesh)
  with checkpoints.manager(workdir, read_only=True) as manager:
    try:
      state = checkpoints.restore_verified(manager, step, abstract)
    except checkpoints.DamagedCheckpoint as e:
      raise checkpoints.DamagedCheckpoint(
          f'{e} --mode=eval evaluates the latest checkpoint only (as --mode=predict does), and '
          'moves nothing: rerun training (--mode=train), which moves it aside and resumes from '
          'the newest intact one.') from e
  return state, builder, vocab, answer_names, answers, mesh


def _evaluate_checkpoint(config, workdir: str, step: int, start_time: float) -> dict:
  state, builder, vocab, _, answers, mesh = load_trained(config, workdir, step)
  test = evaluate.evaluate_and_report(state.params, state.apply_fn, builder, vocab, mesh, config,
                                      workdir, answers=answers)
  path = epath.Path(workdir) / 'metrics.json'
  results = storage.read_json(path) if path.exists() else {}
  results.update(test=test, evaluated_step=step, eval_wall_time_s=time.time() - start_time)
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps(results, indent=2))
  return results
