"""ucam_jax.api on a tiny trained run: load -> answer reproduces the evaluation, explain's maps,
the figures, the errors, and imports without side effects."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from ucam_jax import api, evaluate, input_pipeline, sharding, train


@pytest.fixture(scope='module')
def workdir(small_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('api') / 'run')
  train.train_and_evaluate(tiny_config(small_data_dir), workdir)
  return workdir


@pytest.fixture(scope='module')
def test_split(workdir):
  """Every test question of the small split, in record order: images, questions, labels."""
  run = api.load(workdir)
  source = input_pipeline.data_source(input_pipeline.get_builder(run.config), 'test')
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]), [e['question'].decode() for e in examples],
          np.array([e['answer'] for e in examples]))


def test_load_then_answer_reproduces_the_reported_test_accuracy(workdir, test_split):
  run = api.load(workdir)
  reported = json.loads(open(os.path.join(workdir, 'metrics.json')).read())['test']
  assert run.step == 20 and run.config.ucam.mode == 'mask'
  images, questions, labels = test_split
  out = api.answer(run, images, questions)
  predicted = np.array([run.answers.index(a) for a in out['answer']])
  assert len(predicted) == reported['num_examples']
  # GCA's second pass, with the evaluation's batches and keys: the reported accuracy exactly,
  # and the evaluation's probabilities question for question (model.apply's one pass is not it).
  assert (predicted == labels).mean() == pytest.approx(reported['accuracy'], abs=1e-9)
  source = input_pipeline.data_source(input_pipeline.get_builder(run.config), 'test')
  batches, num_batches = input_pipeline.eval_batches(source, run.vocab, run.config)
  _, evaluated = evaluate.evaluate(run.params, run.apply_fn, batches, num_batches,
                                   sharding.make_mesh(), run.config)
  np.testing.assert_allclose(out['probs'], evaluated['probs'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out['predictive_entropy'], evaluated['predictive_entropy'],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out['probability'], out['probs'].max(-1))
  for score in ('predictive_entropy', 'mutual_information', 'sigma2', 'predictive_variance'):
    assert out[score].shape == (len(questions),) and np.isfinite(out[score]).all()
  mc = api.answer(run, images[:3], questions[:3], mc_dropout=True)
  # Another batch: the same masks and keys, up to float rounding (U is a mean over the batch).
  np.testing.assert_allclose(mc['probability'], out['mc_probs'][:3].max(-1), rtol=1e-3)


def test_explain_gives_every_map_at_image_resolution(workdir, test_split):
  run = api.load(workdir)
  images, questions, _ = test_split
  out = api.explain(run, images[:4], questions[:4])
  assert sorted(out['maps']) == sorted(api.MAPS[:-1])
  for name, maps in out['maps'].items():
    assert maps.shape == (4, *images.shape[1:3]), name
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
  assert out['answer'] == api.answer(run, images[:4], questions[:4])['answer']
  assert [len(w) for w in out['words']] == [len(q.rstrip('?').split()) for q in questions[:4]]
  assert out['word_certainty'].shape == (4, run.config.max_question_length)
  # A question alone is padded into a batch of its own: its maps match within float noise.
  alone = api.explain(run, images[2:3], questions[2:3], methods=['ucam'])
  np.testing.assert_allclose(alone['maps']['ucam'][0], out['maps']['ucam'][2], atol=1e-4)
  fig = api.figure(images[0], {k: m[0] for k, m in out['maps'].items()}, questions[0])
  assert len(fig.axes) == len(out['maps']) + 1
  assert len(api.overlay(images[0], out['maps']['ucam'][0]).axes) == 1


def test_errors_say_what_to_do(workdir, tmp_path, test_split):
  with pytest.raises(FileNotFoundError, match='No ucam_jax run.*--workdir'):
    api.load(str(tmp_path))
  (tmp_path / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='no checkpoint yet'):
    api.load(str(tmp_path))
  with pytest.raises(ValueError, match=r'No checkpoint at step 3 .*\[10, 20\]'):
    api.load(workdir, step=3)
  run = api.load(workdir, step=10)
  assert run.step == 10
  images, questions, _ = test_split
  with pytest.raises(ValueError, match='one question per image'):
    api.answer(run, images[:2], questions[:3])
  with pytest.raises(ValueError, match="Unknown map types \\['cam'\\]"):
    api.explain(run, images[:1], questions[:1], methods=['cam'])


def test_importing_sets_no_global_state():
  # After importing everything: no matplotlib backend chosen, and another library may still
  # register TFDS builders named like ours.
  code = '''
import matplotlib
import ucam_jax, ucam_jax.api, ucam_jax.train, ucam_jax.input_pipeline, ucam_jax.distributed
assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.get_backend()
import tensorflow_datasets as tfds
for name in ('EasyVqa', 'Vqa', 'GroundedShapes'):
  type(name, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version('1.0.0'), _info=None, _split_generators=None,
      _generate_examples=None, __module__='other_library'))
'''
  env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}
  subprocess.run([sys.executable, '-c', code], check=True, env=env)
