"""Train and evaluate: python -m ucam_jax.main --config=configs/san.py [--config.key=value ...].

--mode=eval evaluates the latest checkpoint in --workdir instead (metrics.json and report/);
--mode=predict writes its answers on --split (VQA: the official results file for the evaluation
server, and every question's probability and uncertainty scores; `ucam_jax.predict`).
"""

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ucam_jax import cli, distributed, hugepages, predict, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/san.py, or the name '
                                'of a shipped one, e.g. san.',
                                lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'train: train (or resume), then '
                  'evaluate on the test split. eval: only evaluate the latest checkpoint in '
                  '--workdir. predict: write its answers on --split (VQA: the results file for the '
                  'evaluation server).')
flags.DEFINE_string('split', None, '--mode=predict: the split to answer, e.g. validation, test, '
                    'test_dev (VQA); default: the split that evaluation uses.')
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and reports go here; a rerun resumes. '
                    'Default: workdir/<config file name>.')
# Several processes outside SLURM, Open MPI and Cloud TPU (which JAX detects by itself).
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a run of several '
                    'processes; default: $JAX_COORDINATOR_ADDRESS.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, with --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes - 1.')
flags.mark_flags_as_required(['config'])


def shipped_config(value: str) -> str:
  """--config's file: as given when it exists, else the shipped config of that name (`san`,
  `configs/san.py`, `san.py:arg`) from the installed `configs` package, so a pip-installed
  package runs its configs from any directory."""
  path, colon, arg = value.partition(':')
  if os.path.exists(path):
    return value
  import configs  # pylint: disable=import-outside-toplevel
  name = os.path.basename(path)
  shipped = os.path.join(os.path.dirname(configs.__file__),
                         name if name.endswith('.py') else name + '.py')
  return shipped + colon + arg if os.path.exists(shipped) else value


def parse_flags(argv):
  """absl parsing, with a clear message for a --config.key that the config does not have."""
  argv = [f'--config={shipped_config(a[len("--config="):])}' if a.startswith('--config=') else a
          for a in argv]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help.')
  except (AttributeError, KeyError) as e:
    if "has no attribute 'get_config'" in str(e):
      config_file = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
      sys.exit(f'The config file {config_file} defines no get_config(): a config file is Python '
               'with a function get_config() that returns an ml_collections.ConfigDict (see '
               'configs/san.py).')
    overrides = ' '.join(a.split('=')[0] for a in argv if a.startswith('--config.'))
    key = re.findall(r"\w+", str(e))
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f"Unknown config key '{key[0] if key else e}' in {overrides}."
             + (f' Did you mean {hint.group(1)!r}?' if hint else '')
             + ' Only keys that the config file defines can be set; see the file given to '
             '--config.')


def _fmt(value) -> str:
  return 'n/a' if value is None else f'{value:.4f}'


def summary(test: dict, run: str) -> str:
  """The printed summary of metrics.json's 'test', each figure with the questions it is over.
  VQA: the official accuracy over every question, and per answer type; exact match, loss and ECE
  over the questions whose top answer is in the vocabulary."""
  n = test['num_examples']
  labelled = test.get('num_labelled', n)
  rest = f"loss {test['loss']:.4f}  ECE {test['ece']:.4f}"
  if 'vqa_accuracy_per_answer_type' in test:
    counts = test.get('vqa_questions_per_answer_type', {})
    per_type = ', '.join(f'{t} {v:.4f} ({counts[t]})' if t in counts else f'{t} {v:.4f}'
                         for t, v in test['vqa_accuracy_per_answer_type'].items())
    lines = [f"VQA accuracy {test['vqa_accuracy']:.4f} over {n} {test.get('split', 'test')} "
             f'questions ({run}); per answer type: {per_type}',
             f"exact match {test['accuracy']:.4f}  {rest}  over the {labelled} questions whose "
             'top answer is in the answer vocabulary']
  else:
    lines = [f"test accuracy {test['accuracy']:.4f}  {rest}  ({n} questions, {run})"]
  entropy = test['uncertainty']['predictive_entropy']
  lines.append(f"predictive entropy (MC dropout): correct {_fmt(entropy['mean_correct'])}, wrong "
               f"{_fmt(entropy['mean_wrong'])}, AUROC for wrong answers "
               f"{entropy['auroc_wrong']:.3f}")
  maps = test.get('maps', {})
  if 'spearman' in next(iter(maps.values()), {}):
    lines.append('Spearman with the ground-truth attention: ' + ', '.join(
        f"{name} {_fmt(values['spearman'])}" for name, values in maps.items()))
  if 'pointing_game_top' in next(iter(maps.values()), {}):
    mass, chance = test['pointing_game_top_mass'], test.get('pointing_game_top_chance')
    lines.append(f"pointing game (peak in the ground truth's top {mass:.0%} mass; chance "
                 f'{_fmt(chance)}): ' + ', '.join(f"{name} {_fmt(values['pointing_game_top'])}"
                                                  for name, values in maps.items()))
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; --verbosity=0 shows it.
  cli.quiet_backend_probes()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.ERROR)  # Process 0 speaks for all.
  config_file = config_flags.get_config_filename(FLAGS['config'])
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  workdir = FLAGS.workdir or os.path.join('workdir', config_name)
  train_command = f'python -m ucam_jax.main --config={config_file} --workdir={workdir}'
  if FLAGS.mode == 'predict':
    written = cli.run(predict.predict_checkpoint, FLAGS.config, workdir, FLAGS.split,
                      train_command=train_command)
    if jax.process_index() == 0:
      print(predict.describe(written))
    return
  if FLAGS.mode == 'eval':
    results = cli.run(train.evaluate_checkpoint, FLAGS.config, workdir,
                      train_command=train_command)
    run = f"step {results['evaluated_step']}, {results['eval_wall_time_s']:.0f} s"
  else:
    results = cli.run(train.train_and_evaluate, FLAGS.config, workdir)
    run = f"{results['num_train_steps']} steps, {results.get('wall_time_s', 0):.0f} s"
  if jax.process_index() == 0 and 'test' in results:
    print(summary(results['test'], run))
    print(f"wrote {os.path.join(workdir, 'metrics.json')} and {os.path.join(workdir, 'report')}")


if __name__ == '__main__':
  hugepages.reexec_with_huge_pages()
  app.run(main, flags_parser=parse_flags)
