"""Training and evaluation: jitted, data parallel over every device, resumable from Orbax
checkpoints.

A run is a pure function of its config: the batch at step s and the dropout key at step s are
derived from the seed and the checkpointed state, so a run stopped and resumed ends with the same
parameters as one that never stopped.
"""

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

from ucam_jax import (distributed, evaluate, gca, input_pipeline, metric_writer, models, sharding,
                      storage, vqa_answers)
from ucam_jax.text import Vocabulary

ANSWERS_FILE = 'answers.json'  # VQA's answer vocabulary, beside vocabulary.json.


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
  if name == 'step':
    if config.decay_every_steps < 1 or not 0 < config.decay_factor <= 1:
      raise ValueError('The step schedule needs config.decay_every_steps >= 1 and 0 < '
                       f'config.decay_factor <= 1; got {config.decay_every_steps} and '
                       f'{config.decay_factor}.')
    return optax.exponential_decay(config.learning_rate, config.decay_every_steps,
                                   config.decay_factor, staircase=True)
  raise ValueError(f'config.learning_rate_schedule is {name!r}; choose one of {list(SCHEDULES)}.')


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(config, num_steps))


def create_train_state(config, model: nn.Module, num_steps: int, batch) -> TrainState:
  """Fresh parameters and optimiser; `batch` is a training batch (question groups)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_rng, batch['image'], batch['question'][:, 0], batch['length'][:, 0])
  params = {'params': variables['params']}  # Not the explanation-only 'perturbations'.
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=make_optimizer(config, num_steps), rng=train_rng)


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
    return terms['loss'], (terms, out['logits'])

  (_, (terms, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, rng=rng)
  correct = (logits.argmax(-1) == labels) * weights
  return state, {**terms, 'accuracy': correct.sum() / weights.sum(), 'questions': weights.sum()}


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
    return vqa_answers.AnswerVocabulary(tuple(json.loads(path.read_text())['answers']))
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
    raise FileNotFoundError(f'No {ANSWERS_FILE} in {workdir}: it is written by training. '
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
  saved = json.loads(path.read_text()).get('model', {})
  current = json.loads(config.model.to_json_best_effort())
  # The compute dtype leaves the parameters as they are: a run may resume in another precision.
  changed = sorted(k for k in (saved.keys() | current.keys()) - {'dtype'}
                   if saved.get(k) != current.get(k))
  if changed:
    raise ValueError(
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


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoints_to_keep, create=True)
  return ocp.CheckpointManager(storage.absolute(workdir) / 'checkpoints', options=options)


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
  """
  start_time = time.time()
  gca.check_config(config.ucam)
  evaluate.check_config(config)
  profile = profile_window(config)
  main_process = jax.process_index() == 0
  prepare_workdir(workdir)
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

  mesh = sharding.make_mesh()
  model = models.get_model(config, vocab.size, num_answers)
  example = next(input_pipeline.train_batches(groups, config))
  state = jax.jit(lambda batch: create_train_state(config, model, num_steps, batch),
                  out_shardings=sharding.replicated(mesh))(example)

  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    check_same_model(workdir, config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f'The checkpoint at step {manager.latest_step()} in {workdir} does not fit this config '
          f'(it was written by a run with another model or optimiser; see its config.json): {e}. '
          'Resume with the same config, or start afresh with a new --workdir.') from e
  start_step = int(state.step)
  # Written only now, so a failed resume leaves the earlier run's config.json as it was.
  if main_process:
    storage.write_text(epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))

  writer = metric_writer.MetricWriter(workdir, resume_step=start_step) if main_process else None
  step_fn = jax.jit(functools.partial(train_step, ucam=config.ucam), donate_argnums=0,
                    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  stop_step = min(num_steps, config.stop_at_step or num_steps)
  batches = input_pipeline.train_batches(groups, config, start_step)
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
      state, step_metrics = step_fn(state, sharding.shard_batch(next(batches), mesh))
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
        questions = sum(m['questions'] for m in pending)
        last_train = {f'train_{k}': float(sum(m[k] * m['questions'] for m in pending) / questions)
                      for k in pending[0] if k != 'questions'}
        last_train['questions_per_sec'] = float(questions) / (time.time() - window_start)
        last_train['learning_rate'] = float(schedule(step - 1))  # That of the step's update.
        if writer:
          writer.write(step, last_train)
        bar.set_postfix(loss=f"{last_train['train_loss']:.3f}",
                        acc=f"{last_train['train_accuracy']:.3f}")
        pending, window_start = [], time.time()
      if checkpoint_due:
        manager.save(step, args=ocp.args.StandardSave(state))
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


def check_same_evaluation(workdir: str, config) -> None:
  """Raises ValueError naming the `_EVALUATION_KEYS` in which `config` differs from the
  training run's config.json: the checkpoint would be evaluated as it was not trained."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return
  saved, current = json.loads(path.read_text()), json.loads(config.to_json_best_effort())
  changed = [f'{k} was {saved.get(k)!r}, now {current.get(k)!r}' for k in _EVALUATION_KEYS
             if saved.get(k) != current.get(k)]
  if changed:
    raise ValueError(f'The checkpoints in {workdir} were trained with another config: '
                     + '; '.join(changed) + f'. Evaluate with the config of {path}.')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: evaluates the latest checkpoint in `workdir` on the test split.

  Writes what the end of `train_and_evaluate` writes: metrics.json (its 'test' entry, with
  'evaluated_step'; the training entries stay) and report/. The checkpoints are only read.
  Raises FileNotFoundError, having written nothing, when `workdir` holds no checkpoint.
  Returns the contents of metrics.json.
  """
  start_time = time.time()
  gca.check_config(config.ucam)
  evaluate.check_config(config)
  directory = storage.absolute(workdir) / 'checkpoints'
  # Only restore is called and create=False: nothing is written. (read_only=True would say so
  # too, with a warning per option it overrides.)
  options = ocp.CheckpointManagerOptions(create=False)
  step = None
  if directory.exists():
    with ocp.CheckpointManager(directory, options=options) as manager:
      step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'No checkpoint in {directory}: --mode=eval evaluates a trained model. Train one first '
        'with --mode=train (the default) and the same --config and --workdir.')
  check_same_model(workdir, config)
  check_same_evaluation(workdir, config)
  builder = input_pipeline.get_builder(config)
  vocab = Vocabulary.load(epath.Path(workdir) / 'vocabulary.json')
  answer_names, answers = answer_setup(builder, workdir, None, config)
  mesh = sharding.make_mesh()
  model = models.get_model(config, vocab.size, len(answer_names))
  if input_pipeline.check_features(config) == 'grid':
    visual = jax.ShapeDtypeStruct((1, *config.grid_shape), jnp.float16)
  else:
    visual = jax.ShapeDtypeStruct((1, *builder.info.features['image'].shape), jnp.uint8)
  example = {'image': visual,
             'question': jax.ShapeDtypeStruct((1, 1, config.max_question_length), jnp.int32),
             'length': jax.ShapeDtypeStruct((1, 1), jnp.int32)}
  abstract = jax.eval_shape(lambda batch: create_train_state(config, model, 1, batch), example)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=sharding.replicated(mesh)),
                          abstract)
  with ocp.CheckpointManager(directory, options=options) as manager:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  test = evaluate.evaluate_and_report(state.params, state.apply_fn, builder, vocab, mesh, config,
                                      workdir, answers=answers)
  path = epath.Path(workdir) / 'metrics.json'
  results = json.loads(path.read_text()) if path.exists() else {}
  results.update(test=test, evaluated_step=step, eval_wall_time_s=time.time() - start_time)
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps(results, indent=2))
  return results
