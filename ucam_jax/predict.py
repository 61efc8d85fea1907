"""--mode=predict: a trained model's answers on any split, in the files users submit and analyse.

  python -m ucam_jax.main --config=configs/base_vqa.py --mode=predict --split=test_dev \
      --config.dataset_kwargs.manual_dir=/data/vqa --workdir=workdir/base_vqa

Writes, into <workdir>/predictions/<split>/:

  <v2_>OpenEnded_mscoco_<subtype>_<alg>_results.json   (VQA) the official results format of the
      evaluation server, `[{"question_id": int, "answer": str}, ...]`: one entry for every
      question of the split, the answer a string of the answer vocabulary (answers.json). <alg>
      is the workdir's name with '-' for '_' (the official name uses '_' as its separator).
  questions.jsonl   one JSON object per question, in record order: question_id (VQA; else
      'record', its index), image_id, question, answer, probability (the answer's softmax
      probability, deterministic pass), mc_probability (its MC-dropout mean probability,
      `config.mc_samples` passes), and every uncertainty score of `uncertainty.predictive_stats`
      (predictive_entropy, expected_entropy, mutual_information, variation_ratio, sigma2,
      predictive_variance; sigma2 and the predictive variance mean something only when an
      uncertainty loss trained the variance head, config.ucam.mode != 'none').

The answers are those of `evaluate.eval_step` (with the GCA mask in mode 'mask'), the same as
the evaluation scores. Any split of the dataset: VQA's 'validation', 'train', and 'test' (all of
test2015, for the test-standard and challenge phases) and 'test_dev' (its test-dev subset), which
the builder has when their question files and images (or grid store) were there at build time.
"""

import contextlib
import functools
import json
import os

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from ucam_jax import evaluate, input_pipeline, sharding, storage, train
from ucam_jax.datasets import vqa
from ucam_jax.errors import RunError

PREDICTIONS_DIR = 'predictions'
QUESTIONS_FILE = 'questions.jsonl'
SCORES = ('predictive_entropy', 'expected_entropy', 'mutual_information', 'variation_ratio',
          'sigma2', 'predictive_variance')


class SplitNotBuilt(RunError):
  """The split asked for is not in the built dataset."""


def results_file_name(version: str, subtype: str, alg: str) -> str:
  """The official name: <v2_>OpenEnded_mscoco_<data subtype>_<alg>_results.json."""
  prefix = 'v2_' if version == 'v2' else ''
  return f"{prefix}OpenEnded_mscoco_{subtype}_{alg.replace('_', '-')}_results.json"


def check_results(results, question_ids) -> None:
  """Raises ValueError where `results` would fail the official loader (the VQA API's
  `loadRes`, which asserts that the results' question ids are exactly the split's) or the
  format of https://visualqa.org/evaluation.html: a list of {'question_id': int, 'answer': str},
  one for every question of the split, none for another."""
  if not isinstance(results, list):
    raise ValueError(f'Results must be a JSON list, got {type(results).__name__}.')
  for entry in results:
    if (not isinstance(entry, dict) or set(entry) != {'question_id', 'answer'}
        or type(entry['question_id']) is not int or not isinstance(entry['answer'], str)):
      raise ValueError(f'Each result must be {{"question_id": int, "answer": str}}, got {entry!r}.')
  ids = [entry['question_id'] for entry in results]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{len(ids) - len(set(ids))} question ids are answered more than once.')
  expected = {int(i) for i in question_ids}
  if set(ids) != expected:
    raise ValueError(f'The results answer {len(set(ids) - expected)} questions outside the split '
                     f'and miss {len(expected - set(ids))} of its {len(expected)}.')


def answer_split(params, apply_fn, builder, vocab, mesh, config, split: str, answers=None):
  """The model's answers on every question of `split`, in record order: ({'answer' [n] index,
  'probability', 'mc_probability' and each of SCORES [n]}, the split's question table (VQA) or
  None)."""
  source, preprocess, table = evaluate.evaluation_source(builder, split, vocab, config, answers)
  batches, num_batches = input_pipeline.eval_batches(source, vocab, config, preprocess=preprocess)
  step = jax.jit(functools.partial(evaluate.eval_step, apply_fn=apply_fn,
                                   mc_samples=config.mc_samples, ucam=config.ucam))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)  # As `evaluate.evaluate`.
  outputs = []
  for i, batch in enumerate(tqdm(batches, total=num_batches, desc=split, leave=False,
                                 mininterval=2, disable=jax.process_index() > 0)):
    batch = sharding.shard_batch(batch, mesh)
    out = step(params, batch=batch, key=jax.random.fold_in(key, i))
    out = {k: out[k] for k in ('probs', 'mc_probs', *SCORES)}
    out, weight = sharding.to_host((out, batch['weight']))
    keep = weight > 0
    answer = out['probs'][keep].argmax(-1)
    rows = np.arange(len(answer))
    outputs.append({'answer': answer, 'probability': out['probs'][keep][rows, answer],
                    'mc_probability': out['mc_probs'][keep][rows, answer],
                    **{k: out[k][keep] for k in SCORES}})
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs), table


def write_predictions(directory: epath.Path, builder, split: str, answers_out, answer_names,
                      table, alg: str) -> dict:
  """Writes QUESTIONS_FILE and (VQA, whose `table` has question ids) the official results file
  into `directory`; returns {'questions': path, 'results': path}."""
  names = [answer_names[int(a)] for a in answers_out['answer']]
  vqa_ids = table.question_id is not None
  lines = []
  for i, name in enumerate(names):
    ident = {'question_id': int(table.question_id[i])} if vqa_ids else {'record': i}
    lines.append(json.dumps({
        **ident, 'image_id': int(table.image_id[i]), 'question': table.question[i],
        'answer': name,
        **{k: float(answers_out[k][i]) for k in ('probability', 'mc_probability', *SCORES)}}))
  written = {'questions': directory / QUESTIONS_FILE}
  storage.write_text(written['questions'], '\n'.join(lines) + '\n')
  if vqa_ids:  # The evaluation server's file.
    results = [{'question_id': int(q), 'answer': a} for q, a in zip(table.question_id, names)]
    check_results(results, table.question_id)
    written['results'] = directory / results_file_name(
        builder.builder_config.vqa_version, builder.split_files(split).subtype, alg)
    storage.write_text(written['results'], json.dumps(results))
  return written


def predict_checkpoint(config, workdir: str, split: str | None = None,
                       train_command: str | None = None) -> dict:
  """--mode=predict: the latest checkpoint's answers on `split` (default: the evaluation split),
  written to <workdir>/predictions/<split>/ (see the module docstring). Returns {'split',
  'questions', 'step', 'files': {kind: path}}. Raises train.NoCheckpoint without a checkpoint
  and SplitNotBuilt for a split the dataset was built without."""
  train.check_config(config)
  step = train.latest_checkpoint_step(workdir, train_command)
  with storage.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    state, builder, vocab, answer_names, answers, mesh = train.load_trained(config, workdir, step)
    split = split or input_pipeline.evaluation_split(builder)
    if split not in builder.info.splits:
      why = builder.why_left_out(split) if isinstance(builder, vqa.Vqa) else ''
      raise SplitNotBuilt(
          f'{builder.name}/{builder.builder_config.name} has no split {split!r}; it has '
          f'{sorted(builder.info.splits)}.' + (f' It was left out of the build: {why}.' if why else
                                                ' Its files were not there when it was built.')
          + f' Add the files and delete the build ({builder.data_dir}) to build it again.')
    out, table = answer_split(state.params, state.apply_fn, builder, vocab, mesh, config, split,
                              answers)
    written = {}
    if jax.process_index() == 0:
      directory = storage.absolute(workdir) / PREDICTIONS_DIR / split
      directory.mkdir(parents=True, exist_ok=True)
      if table is None:  # Not VQA: the questions and image ids, in record order.
        table = input_pipeline.question_table(builder, split)
      alg = os.path.basename(os.path.normpath(os.fspath(workdir))) or 'ucam'
      written = write_predictions(directory, builder, split, out, answer_names, table, alg)
  return {'split': split, 'questions': len(out['answer']), 'step': step,
          'files': {kind: os.fspath(path) for kind, path in written.items()}}


def describe(written: dict) -> str:
  """The line `main` prints."""
  files = ' and '.join(str(p) for p in written['files'].values())
  return (f"answered {written['questions']} {written['split']} questions (step "
          f"{written['step']}): wrote {files}")
