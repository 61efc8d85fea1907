"""The published base model (ucam_jax/models/attention_net.py) at toy sizes: the staged contract,
attention, where dropout acts, the LSTM's hand-written backward, the bit-packed dropout, and the
synthetic source at official shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base_vqa
from ucam_jax import gca, models, train, uncertainty
from ucam_jax.datasets import synthetic
from ucam_jax.models import attention_net, dropout

GRID = (4, 4, 12)
VOCAB, ANSWERS, LENGTH = 20, 13, 6
SIZES = dict(embed_dim=8, question_dim=16, attention_dim=8, classifier_dim=16)


def tiny_config(**model):
  config = base_vqa.get_config()
  config.model.update(**SIZES, **model)
  config.ucam.update(aleatoric_samples=8, predictive_samples=3)
  return config


def _model(**overrides):
  return models.get_model(tiny_config(**overrides), VOCAB, ANSWERS)


def _batch(n=5, seed=0, questions_per_image=None):
  return synthetic.batch(seed, n, questions_per_image, grid_shape=GRID, num_answers=ANSWERS,
                         vocab_size=VOCAB, max_question_length=LENGTH)


@functools.cache
def _setup(dtype='float32'):
  model = _model(dtype=dtype)
  batch = _batch()
  variables = model.init(jax.random.key(0), batch['image'], batch['question'], batch['length'])
  return model, {'params': variables['params']}, batch


def test_registered_with_the_published_sizes():
  config = base_vqa.get_config()
  model = models.get_model(config, VOCAB, synthetic.NUM_ANSWERS)
  assert isinstance(model, attention_net.AttentionNet)
  assert (model.embed_dim, model.question_dim, model.attention_dim, model.glimpses,
          model.classifier_dim, model.dropout_rate) == (300, 1024, 512, 2, 1024, 0.5)
  assert config.batch_size == 220 and config.learning_rate == 1e-3
  assert tuple(config.grid_shape) == (14, 14, 2048) and config.num_answers == 3000


def test_shapes_attention_and_normalised_grid():
  model, params, batch = _setup()
  out = model.apply(params, batch['image'], batch['question'], batch['length'])
  assert out['logits'].shape == (5, ANSWERS) and out['sigma2'].shape == (5,)
  assert (out['sigma2'] > 0).all()
  assert out['attention'].shape == (5, 2, 4, 4)
  np.testing.assert_allclose(out['attention'].sum((-1, -2)), 1.0, rtol=1e-5)
  v = model.apply(params, batch['image'] * 3.0, method='encode_image')
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)


def test_stages_compose_to_the_full_model():
  model, params, batch = _setup()
  full = model.apply(params, batch['image'], batch['question'], batch['length'])
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  q, words = model.apply(params, e, batch['length'], method='encode_question')
  assert e.shape == (5, LENGTH, 8) and q.shape == (5, 16) and words.shape == (5, LENGTH, 16)
  staged = model.apply(params, v, q, method='answer')
  for k in ('logits', 'sigma2', 'attention'):
    np.testing.assert_allclose(staged[k], full[k], rtol=1e-5, atol=1e-6)
  # With dropout on, the full model (the published pass: the embeddings dropped out too) is the
  # 'full' MC scope's sample with the same key.
  key = jax.random.key(3)
  full = model.apply(params, batch['image'], batch['question'], batch['length'],
                     deterministic=False, rngs={'dropout': key})
  sample = gca.mc_sampler(model.apply, params, (v, e, batch['length']), scope='full')
  np.testing.assert_allclose(sample(key)[0], full['logits'], rtol=1e-5, atol=1e-6)


def test_dropout_acts_in_the_answer_stage_and_on_the_embeddings_when_asked():
  model, params, batch = _setup()
  # The encoders take no dropout key and are deterministic: MC samples may share them.
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  q, _ = model.apply(params, e, batch['length'], method='encode_question')
  rngs = {'dropout': jax.random.key(1)}
  np.testing.assert_array_equal(
      model.apply(params, e, batch['length'], method='encode_question', rngs=rngs)[0], q)

  def answer(key, deterministic=False):
    return model.apply(params, v, q, method='answer', deterministic=deterministic,
                       rngs={'dropout': key})['logits']
  a, b = answer(jax.random.key(1)), answer(jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(answer(jax.random.key(1)), a)
  np.testing.assert_array_equal(answer(jax.random.key(1), True), answer(jax.random.key(2), True))
  # The published model's embedding dropout, on only when asked (the 'full' MC scope).
  dropped = model.apply(params, e, batch['length'], method='encode_question',
                        deterministic=False, rngs=rngs)[0]
  assert not np.allclose(dropped, q)


def test_question_padding_is_ignored():
  model, params, batch = _setup()
  padded = np.where(np.arange(LENGTH) < batch['length'][:, None], batch['question'], 7)
  a = model.apply(params, batch['image'], batch['question'], batch['length'])['logits']
  b = model.apply(params, batch['image'], padded.astype(np.int32), batch['length'])['logits']
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_certainty_multiplies_and_renormalises_each_glimpse():
  model, params, batch = _setup()
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  q, _ = model.apply(params, e, batch['length'], method='encode_question')
  base = np.asarray(model.apply(params, v, q, method='answer')['attention'])
  certainty = np.random.default_rng(0).uniform(size=(5, 4, 4)).astype(np.float32)
  certainty[1] = 0.0  # All zero: that example keeps its attention.
  got = model.apply(params, v, q, certainty, method='answer')['attention']
  want = base * certainty[:, None]
  want[1] = base[1]
  want = want / want.sum((-1, -2), keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_init_is_xavier_uniform_with_zero_biases():
  _, params, _ = _setup()
  flat = jax.tree_util.tree_flatten_with_path(params['params'])[0]
  for path, x in flat:
    name = jax.tree_util.keystr(path)
    if 'bias' in name:
      np.testing.assert_array_equal(x, 0.0)
    elif 'embedding' not in name:
      # LSTM kernels: Xavier per gate block [in, hidden] (fan_out = hidden, not 4 hidden).
      fan_out = x.shape[1] // 4 if 'lstm' in name else x.shape[1]
      assert np.abs(x).max() <= np.sqrt(6 / (x.shape[0] + fan_out)) + 1e-6, name


def test_lstm_backward_matches_autodiff_to_second_order():
  """The hand-written backward (one matmul for d w_hh) against autodiff of the same loop."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    length, n, h = 5, 3, 4
    gates = rng.normal(size=(length, n, 4 * h))
    w = 0.5 * rng.normal(size=(h, 4 * h))
    live = (np.arange(length)[:, None] < np.array([5, 2, 3]))[..., None]

    def loss(recurrence):
      def f(gates, w):
        c, hs = recurrence(gates, w, live)
        return jnp.sum(jnp.sin(c)) + jnp.sum(jnp.cos(hs) * jnp.arange(h))
      return f

    def autodiff(gates, w, live):
      return attention_net._lstm_forward(gates, w, live)[0]

    ours, ref = loss(attention_net.lstm_recurrence), loss(autodiff)
    for a, b in zip(jax.grad(ours, (0, 1))(gates, w), jax.grad(ref, (0, 1))(gates, w)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    def second(f):  # GCA's 'second' order differentiates through a gradient.
      return jax.grad(lambda w: jnp.sum(jax.grad(f)(gates, w) ** 2))(w)
    np.testing.assert_allclose(second(ours), second(ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('mode', ['mask', 'loss_only'])
def test_gca_forward_runs(mode):
  model, params, batch = _setup()
  ucam = tiny_config().ucam
  ucam.mode = mode
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  forward = jax.jit(lambda params, v, e, key: gca.forward(
      model.apply, params, (v, e, batch['length']), batch['answer'], batch['weight'], key, ucam,
      train=True))
  terms, out = forward(params, v, e, jax.random.key(0))
  assert np.isfinite(terms['loss']) and np.isfinite(terms['uncertainty'])
  assert out['logits'].shape == (5, ANSWERS)
  if mode == 'mask':
    assert out['certainty_image'].shape == (5, 4, 4)
    assert out['certainty_question'].shape == (5, LENGTH)
    assert out['model_attention'].shape == out['attention'].shape == (5, 2, 4, 4)


def test_a_training_step_on_question_groups():
  config = tiny_config()  # ucam.mode 'mask', the default.
  model = models.get_model(config, VOCAB, ANSWERS)
  groups = _batch(2, seed=1, questions_per_image=3)
  state = train.create_train_state(config, model, 10, groups)
  state, metrics = jax.jit(functools.partial(train.train_step, ucam=config.ucam))(state, groups)
  assert int(state.step) == 1 and np.isfinite(metrics['loss'])


def test_mc_dropout_over_the_answer_stage():
  model, params, batch = _setup()
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  inputs = gca.answer_inputs(model.apply, params, (v, e, batch['length']))

  def sample(key):
    out = gca.answer(model.apply, params, inputs, key)
    return out['logits'], out['sigma2']
  logits, sigma2 = uncertainty.mc_dropout(sample, jax.random.key(0), 4)
  chunked = uncertainty.mc_dropout(sample, jax.random.key(0), 4, chunk_size=2)
  np.testing.assert_allclose(chunked[0], logits, rtol=1e-5, atol=1e-6)
  stats = uncertainty.predictive_stats(logits, sigma2)
  assert (stats['mutual_information'] > 0).any()


def _mc_stats(model, params, batch, scope, maps=None):
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  sample = gca.mc_sampler(model.apply, params, (v, e, batch['length']), maps, 'multiply', scope)
  return uncertainty.mc_dropout(sample, jax.random.key(0), 4)


def test_mc_scope_full_is_the_answer_scope_without_dropout_and_differs_with_it():
  batch = _batch()
  maps = {'image': np.random.default_rng(1).uniform(size=(5, 4, 4)).astype(np.float32),
          'question': np.random.default_rng(2).uniform(size=(5, LENGTH)).astype(np.float32)}
  for rate, equal in ((0.0, True), (0.5, False)):
    model = _model(dropout_rate=rate)
    params = _setup()[1]
    answer = _mc_stats(model, params, batch, 'answer', maps)
    full = _mc_stats(model, params, batch, 'full', maps)
    if equal:
      for a, b in zip(answer, full):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    else:  # Same keys; the embedding dropout (and its masks' order) changes every sample.
      assert not np.allclose(full[0], answer[0], rtol=1e-3)
      assert (uncertainty.predictive_stats(*full)['mutual_information'] > 0).any()
  with pytest.raises(ValueError, match='mc_scope'):
    gca.mc_sampler(model.apply, params, (None, None, None), scope='all')


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_logits():
  model, params, batch = _setup('bfloat16')
  out = model.apply(params, batch['image'], batch['question'], batch['length'])
  assert out['logits'].dtype == jnp.float32 and out['attention'].dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  ref = _setup()[0].apply(params, batch['image'], batch['question'], batch['length'])
  np.testing.assert_allclose(out['logits'], ref['logits'], atol=0.05)


# --------------------------------------------------------------------------- dropout


def test_field_bits_are_the_fewest_exact_ones():
  assert [dropout.field_bits(r) for r in (0.5, 0.25, 0.75, 0.125, 3 / 256)] == [1, 2, 2, 4, 8]
  assert dropout.field_bits(0.1) is None and dropout.field_bits(0.2) is None


@pytest.mark.parametrize('rate', [0.5, 0.25, 0.1])
def test_keep_mask_has_the_rate_and_independent_elements(rate):
  mask = np.asarray(dropout.keep_mask(jax.random.key(0), rate, (500, 401)))  # Not a multiple.
  assert mask.shape == (500, 401) and mask.dtype == bool
  kept = mask.mean()
  assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / mask.size)
  # Neighbours (which share a random word) are uncorrelated.
  a, b = mask[:, :-1].ravel().astype(float), mask[:, 1:].ravel().astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_dropout_scales_the_kept_elements_and_is_off_when_deterministic():
  x = jnp.arange(1.0, 65.0).reshape(8, 8)
  layer = dropout.Dropout(0.25)
  y = layer.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(0)})
  kept = y != 0
  np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
  assert 0 < kept.mean() < 1
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


# --------------------------------------------------------------------------- synthetic source


def test_synthetic_batches_have_the_official_layout():
  batch = synthetic.batch(0, 2, 3, grid_shape=(14, 14, 64), vocab_size=50)
  assert batch['image'].shape == (2, 14, 14, 64) and batch['image'].dtype == np.float32
  assert (batch['image'] >= 0).all()
  np.testing.assert_allclose(np.linalg.norm(batch['image'], axis=-1), 1.0, rtol=1e-5)
  assert batch['question'].shape == (2, 3, synthetic.MAX_QUESTION_LENGTH)
  assert batch['length'].shape == batch['answer'].shape == batch['weight'].shape == (2, 3)
  assert (batch['length'] >= 3).all() and (batch['length'] <= synthetic.MAX_QUESTION_LENGTH).all()
  past = np.arange(synthetic.MAX_QUESTION_LENGTH) >= batch['length'][..., None]
  assert (batch['question'][past] == 0).all() and (batch['question'][~past] >= 2).all()
  assert (batch['answer'] < synthetic.NUM_ANSWERS).all()
  again = synthetic.batch(0, 2, 3, grid_shape=(14, 14, 64), vocab_size=50)
  for k in batch:
    np.testing.assert_array_equal(batch[k], again[k])
  flat = synthetic.batch(1, 4, grid_shape=(2, 2, 8))
  assert flat['question'].shape == (4, synthetic.MAX_QUESTION_LENGTH)


def test_chunk_size_within_a_memory_budget():
  assert uncertainty.chunk_size_within(50, 10, 100) == 10
  assert uncertainty.chunk_size_within(50, 10, 240) == 10  # 25 would take 250.
  assert uncertainty.chunk_size_within(50, 10, 10 ** 6) == 50
  assert uncertainty.chunk_size_within(50, 1000, 10) == 1
  assert uncertainty.chunk_size_within(7, 1, 6) == 1
