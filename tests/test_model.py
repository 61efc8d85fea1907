import functools

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from ucam_jax import evaluate, explain, gca, models, sharding, train


def _batch(batch_size=16, seed=0):
  """Per-question model inputs."""
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8),
          'question': rng.integers(2, 20, (batch_size, 12)).astype(np.int32),
          'length': rng.integers(1, 13, batch_size).astype(np.int32),
          'answer': rng.integers(0, 13, batch_size).astype(np.int32)}


def _groups(batch_size=8, group_size=3, seed=0):
  """A training batch: batch_size images, each with group_size questions, some padding."""
  rng = np.random.default_rng(seed)
  batch = _batch(batch_size * group_size, seed)
  grouped = {k: v.reshape(batch_size, group_size, *v.shape[1:]) for k, v in batch.items()
             if k != 'image'}
  grouped['image'] = batch['image'][:batch_size]
  grouped['weight'] = (rng.random((batch_size, group_size)) < 0.8).astype(np.float32)
  grouped['weight'][:, 0] = 1.0
  return grouped


def _state(config, num_steps=100):
  model = models.get_model(config, vocab_size=20, num_answers=13)
  return train.create_train_state(config, model, num_steps, _groups())


def test_output_shapes_and_stages():
  config = tiny_config(None)
  state = _state(config)
  batch = _batch()
  outputs = state.apply_fn(state.params, batch['image'], batch['question'], batch['length'])
  logits, attention = outputs['logits'], outputs['attention']
  assert logits.shape == (16, 13)
  assert outputs['sigma2'].shape == (16,) and (outputs['sigma2'] > 0).all()
  assert attention.shape == (16, 2, 16, 16)  # Two hops over a 64 / 4 grid (two stride-2 convs).
  np.testing.assert_allclose(attention.sum((-1, -2)), 1.0, rtol=1e-5)
  # The stages compose to the full model.
  model = models.get_model(config, vocab_size=20, num_answers=13)
  v = model.apply(state.params, batch['image'], method='encode_image')
  e = model.apply(state.params, batch['question'], method='embed_question')
  q, words = model.apply(state.params, e, batch['length'], method='encode_question')
  assert e.shape == (16, 12, 16)
  assert v.shape == (16, 16, 16, 32) and q.shape == (16, 32) and words.shape == (16, 12, 32)
  staged = model.apply(state.params, v, q, method='answer')['logits']
  np.testing.assert_allclose(staged, logits, rtol=1e-5, atol=1e-6)


def test_question_padding_is_ignored():
  config = tiny_config(None)
  state = _state(config)
  batch = _batch()
  other = dict(batch, question=np.where(np.arange(12) < batch['length'][:, None],
                                        batch['question'], 7).astype(np.int32))
  a = state.apply_fn(state.params, batch['image'], batch['question'], batch['length'])['logits']
  b = state.apply_fn(state.params, other['image'], other['question'], other['length'])['logits']
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_group_features_equal_per_question_features():
  config = tiny_config(None)
  state = _state(config)
  batch = _groups()
  features = train.group_features(state.apply_fn, state.params, batch)
  grouped = gca.answer(state.apply_fn, state.params,
                       gca.answer_inputs(state.apply_fn, state.params, features))['logits']
  images = np.repeat(batch['image'], 3, axis=0)
  single = state.apply_fn(state.params, images, batch['question'].reshape(24, 12),
                          batch['length'].reshape(-1))['logits']
  np.testing.assert_allclose(grouped, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['none', 'mask'])
def test_padding_questions_do_not_count(mode):
  config = tiny_config(None)
  config.ucam.mode = mode
  state = _state(config)
  batch = _groups()
  step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
  _, metrics = step(state, batch)
  changed = dict(batch, answer=np.where(batch['weight'] > 0, batch['answer'], 0))
  _, metrics_changed = step(state, changed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), metrics,
               metrics_changed)
  assert metrics['questions'] == batch['weight'].sum()


def test_a_few_steps_lower_the_loss():
  config = tiny_config(None, learning_rate=3e-3)
  state = _state(config)
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch(_groups(), mesh)
  step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  # Random labels on one batch: the model starts memorising them.
  assert np.mean(losses[-5:]) < 0.85 * losses[0], losses  # Chance is ln(13) = 2.56.


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8, 'conftest asks XLA for 8 CPU devices'
  config = tiny_config(None)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    state = jax.device_put(_state(config), sharding.replicated(mesh))
    step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
    losses = []
    for i in range(4):
      state, metrics = step(state, sharding.shard_batch(_groups(seed=i), mesh))
      losses.append(float(metrics['loss']))
    assert len(state.params['params']['classifier']['kernel'].sharding.device_set) == len(devices)
    results.append((np.array(losses), jax.device_get(state.params)))
  (loss_1, params_1), (loss_8, params_8) = results
  # Same maths, different reduction order across devices: float32 round-off only. Losses agree
  # to 1e-5; parameters to 1e-5 absolute (4 Adam steps at learning rate 2e-3 move a parameter
  # by up to 8e-3).
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params_8, params_1)


def test_batch_size_must_divide_over_devices(data_dir):
  from ucam_jax import input_pipeline
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    input_pipeline.local_batch_size(12)


def test_grad_cam_and_u_cam_on_the_san_grid():
  """The explanation API works on SAN's exposed 'grid' intermediate, one example at a time."""
  config = tiny_config(None)
  model = models.get_model(config, vocab_size=20, num_answers=13)
  state = _state(config)
  batch = _batch(4)
  e = model.apply(state.params, batch['question'], method='embed_question')
  q, _ = model.apply(state.params, e, batch['length'], method='encode_question')
  v = model.apply(state.params, batch['image'], method='encode_image')

  def apply_answer(variables, v, q, **kwargs):
    return model.apply(variables, v, q, method='answer', **kwargs)

  def score(outputs):
    return outputs['logits'].max(-1)

  def uncertainty(outputs):
    return -(jax.nn.softmax(outputs['logits']) * jax.nn.log_softmax(outputs['logits'])).sum(-1)

  activation, gradient = explain.activations_and_gradients(apply_answer, state.params, (v, q),
                                                           'grid', score)
  np.testing.assert_allclose(activation, v, rtol=1e-6)
  # The gradient of example 0's score, taken directly on the staged model.
  direct = jax.grad(lambda x: score(apply_answer(state.params, x, q[:1]))[0])(v[:1])
  np.testing.assert_allclose(gradient[:1], direct, rtol=1e-4, atol=1e-7)
  for method, target in (('gradcam', score), ('ucam', uncertainty)):
    maps = explain.explain(apply_answer, state.params, (v, q), 'grid', target, method=method)
    assert maps.shape == (4, 16, 16) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    alone = explain.explain(apply_answer, state.params, (v[2:3], q[2:3]), 'grid', target,
                            method=method)
    np.testing.assert_allclose(maps[2:3], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('rate', [0.0, 0.5])
def test_eval_step_mc_dropout(rate):
  config = tiny_config(None)
  config.model.dropout_rate = rate
  state = _state(config)
  batch = dict(_batch(8), weight=np.ones(8, np.float32))
  out = evaluate.eval_step(state.params, state.apply_fn, batch, jax.random.PRNGKey(0), 10,
                           config.ucam)
  assert out['mc_probs'].shape == out['probs'].shape == (8, 13)
  if rate == 0:  # Every pass is the deterministic one: no disagreement at all.
    np.testing.assert_allclose(out['mc_probs'], out['probs'], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out['mutual_information'], 0.0, atol=1e-6)
    assert (out['variation_ratio'] == 0).all()
  else:
    assert (out['mutual_information'] > 1e-6).all()


def test_eval_step_runs_mc_samples_in_chunks_that_fit_the_memory_bound(monkeypatch):
  config = tiny_config(None)
  state = _state(config)
  batch = dict(_batch(8), weight=np.ones(8, np.float32))
  run = jax.jit(lambda batch: evaluate.eval_step(state.params, state.apply_fn, batch,
                                                 jax.random.PRNGKey(0), 10, config.ucam))
  whole = run(batch)
  v = state.apply_fn(state.params, batch['image'], method='encode_image')
  monkeypatch.setattr(evaluate, 'MC_MEMORY_BYTES', 2 * v.nbytes)  # Chunks of 2 samples.
  calls = []
  mc_dropout = evaluate.uncertainty.mc_dropout
  monkeypatch.setattr(evaluate.uncertainty, 'mc_dropout',
                      lambda *args: calls.append(args[3]) or mc_dropout(*args))
  chunked = jax.jit(lambda batch: evaluate.eval_step(state.params, state.apply_fn, batch,
                                                     jax.random.PRNGKey(0), 10, config.ucam))(batch)
  assert calls == [2]
  for key in ('mc_probs', 'mutual_information', 'predictive_entropy'):  # Same keys, same masks.
    np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-4, atol=1e-6)
