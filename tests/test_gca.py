"""GCA (ucam_jax/gca.py): certainty maps against NumPy and finite differences, every switch, the
mask's effect on attention, and evaluation that never sees the answer."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import san
from tests.conftest import tiny_config
from ucam_jax import evaluate, gca, models, uncertainty


def _ucam(**overrides):
  """config.ucam with the published recipe's switches (what these tests were written for), small
  sample counts and `overrides`."""
  ucam = san.get_config().ucam
  ucam.update(san.PUBLISHED_UCAM)
  ucam.update(aleatoric_samples=8, predictive_samples=3, **overrides)
  return ucam


def _setup(image_size=16, n=3, length=5, seed=0, dtype='float32'):
  """A tiny SAN (grid 4x4 from 16 px images) and per-question features (v, e, lengths)."""
  config = tiny_config(None)
  config.model.dtype = dtype
  model = models.get_model(config, vocab_size=20, num_answers=13)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
  tokens = rng.integers(2, 20, (n, length)).astype(np.int32)
  lengths = np.array([length, 2, 4][:n], np.int32)
  variables = model.init(jax.random.PRNGKey(seed), images, tokens, lengths)
  params = {'params': variables['params']}
  v = model.apply(params, images, method='encode_image')
  e = model.apply(params, tokens, method='embed_question')
  labels = rng.integers(0, 13, n).astype(np.int32)
  return model, params, (v, e, lengths), labels


def test_certainty_map_matches_numpy():
  rng = np.random.default_rng(0)
  A, G = rng.normal(size=(2, 3, 5, 4, 6))  # Two stacks of [n=3, 5, 4, k=6].
  got = gca.certainty_map(A, G)
  w = -G.mean(axis=(1, 2))  # [n, k]
  want = np.maximum(np.einsum('nijk,nk->nij', A, w), 0)
  want = want / want.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Words: positions past the length are zeroed before the maximum is taken.
  words, grads, lengths = A[:, :, 0], G[:, :, 0], np.array([5, 2, 3])
  got = gca.certainty_map(words, grads, lengths)
  want = np.maximum(np.einsum('nlk,nk->nl', words, -grads.mean(1)), 0)
  want = want * (np.arange(5) < lengths[:, None])
  peak = want.max(1, keepdims=True)
  want = np.where(peak > 0, want / np.where(peak > 0, peak, 1), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (got[1, 2:] == 0).all()


def test_certainty_map_sign_and_min_max_match_numpy():
  rng = np.random.default_rng(1)
  A, G = rng.normal(size=(2, 3, 5, 4, 6))
  raw = np.einsum('nijk,nk->nij', A, G.mean(axis=(1, 2)))  # The uncertainty sign: +G.
  got = gca.certainty_map(A, G, sign='uncertainty', normalisation='min_max')
  low, high = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(got, (raw - low) / (high - low), rtol=1e-5, atol=1e-6)
  # The two signs' ReLU maps have disjoint support: each keeps the cells the other clips.
  plus = gca.certainty_map(A, G, sign='uncertainty')
  minus = gca.certainty_map(A, G)
  assert ((plus > 0) & (minus > 0)).sum() == 0 and (plus > 0).any() and (minus > 0).any()
  # Words: min and max over each question's own words; padding is 0; a constant map is 0.
  words, grads, lengths = A[:, :, 0], G[:, :, 0], np.array([5, 2, 1])
  got = gca.certainty_map(words, grads, lengths, normalisation='min_max')
  raw = np.einsum('nlk,nk->nl', words, -grads.mean(1))
  for i, n in enumerate(lengths):
    span = raw[i, :n].max() - raw[i, :n].min()
    want = (raw[i, :n] - raw[i, :n].min()) / span if span > 0 else np.zeros(n)
    np.testing.assert_allclose(got[i, :n], want, rtol=1e-5, atol=1e-6)
    assert (got[i, n:] == 0).all()


@pytest.mark.parametrize('uncertainty_kind', ['aleatoric', 'predictive', 'both'])
def test_certainty_maps_match_finite_differences(uncertainty_kind):
  """The maps of mode 'mask' are the U-CAM maps of finite-difference gradients of U.

  Only the channel weights w_k = mean_cells(-dU/dA_k) enter a map, and each is a directional
  derivative: along the direction that adds 1/cells to every cell of channel k.
  """
  with jax.enable_x64(True):
    model, params, (v, e, lengths), labels = _setup(dtype='float64')
    assert v.dtype == e.dtype == jnp.float64
    weights = np.ones(len(labels))
    key = jax.random.PRNGKey(3)

    # The maps' U takes the model's own answers as targets.
    own = gca.answer(model.apply, params, gca.answer_inputs(model.apply, params,
                                                            (v, e, lengths)))['logits'].argmax(-1)

    @jax.jit
    def U(v, e):
      terms, _ = gca.forward(model.apply, params, (v, e, lengths), own, weights, key,
                             _ucam(mode='loss_only', uncertainty=uncertainty_kind), train=False)
      return terms['uncertainty']

    _, out = gca.forward(model.apply, params, (v, e, lengths), labels, weights, key,
                         _ucam(mode='mask', uncertainty=uncertainty_kind), train=False)

    def fd_weights(x, which):
      """[n, k]: -(U(x + h D) - U(x - h D)) / 2h for D = example n, channel k, every cell."""
      n, k = x.shape[0], x.shape[-1]
      cells = np.prod(x.shape[1:-1])
      h = 1e-5
      w = np.zeros((n, k))
      for i, c in itertools.product(range(n), range(k)):
        D = np.zeros(x.shape)
        D[i, ..., c] = 1.0 / cells
        plus = U(v + h * D, e) if which == 'image' else U(v, e + h * D)
        minus = U(v - h * D, e) if which == 'image' else U(v, e - h * D)
        w[i, c] = -(plus - minus) / (2 * h)
      return w

    for which, x, mask in (('image', v, None), ('question', e, lengths)):
      w = fd_weights(x, which)
      maps = np.maximum(np.einsum('n...k,nk->n...', np.asarray(x), w), 0)
      if mask is not None:
        maps = maps * (np.arange(x.shape[1]) < mask[:, None])
      maps = maps / maps.reshape(len(maps), -1).max(1).reshape(-1, *[1] * (maps.ndim - 1))
      np.testing.assert_allclose(out[f'certainty_{which}'], maps, rtol=1e-5, atol=1e-7)


def _loss_along(model, params, features, labels, ucam, direction):
  """t -> the training loss with v moved by t * direction (dropout off, fixed key)."""
  v, e, lengths = features
  weights = np.ones(len(labels))

  def loss(t):
    terms, _ = gca.forward(model.apply, params, (v + t * direction, e, lengths), labels,
                           weights, jax.random.PRNGKey(1), ucam, train=False)
    return terms['loss']
  return loss


def test_second_order_is_the_true_gradient_and_first_order_is_not():
  with jax.enable_x64(True):
    model, params, features, labels = _setup(dtype='float64')
    direction = np.random.default_rng(1).normal(size=features[0].shape)
    h = 1e-5
    for order in ('first', 'second'):
      loss = _loss_along(model, params, features, labels, _ucam(order=order), direction)
      analytic = float(jax.grad(loss)(0.0))
      numeric = float((loss(h) - loss(-h)) / (2 * h))
      if order == 'second':
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5)
      else:  # The stopped dU/dv changes the maps too, which first order ignores.
        assert abs(analytic - numeric) > 1e-4 * abs(numeric), (analytic, numeric)


# Every value of every switch at least once, and each mask branch with each combination.
SWITCH_GRID = [
    dict(mode='none'),
    dict(mode='loss_only', uncertainty='both'),
    dict(mode='loss_only', aleatoric_loss='kendall_gal'),
    dict(mode='mask', uncertainty='aleatoric', branch='image', combine='multiply'),
    dict(mode='mask', uncertainty='predictive', branch='question', combine='residual'),
    dict(mode='mask', uncertainty='both', branch='both', combine='multiply', mc_scope='full'),
    dict(mode='mask', uncertainty='both', branch='both', combine='residual', order='second'),
    dict(mode='mask', uncertainty='aleatoric', branch='question', combine='multiply',
         aleatoric_loss='kendall_gal'),
    dict(mode='mask', uncertainty='aleatoric', branch='both', sign='uncertainty',
         normalisation='min_max', order='second'),
]


@pytest.mark.parametrize('switches', SWITCH_GRID, ids=lambda s: '-'.join(s.values()))
def test_every_switch_gives_finite_terms_and_gradients(switches):
  model, params, features, labels = _setup()
  ucam = _ucam(**switches)
  weights = np.array([1.0, 1.0, 0.0])

  def loss(params):
    terms, out = gca.forward(model.apply, params, features, labels, weights,
                             jax.random.PRNGKey(0), ucam, train=True)
    return terms['loss'], (terms, out)

  (value, (terms, out)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  expected = {'loss', 'answer'}
  if ucam.mode != 'none':
    expected |= {'uncertainty'} | ({'aleatoric', 'predictive'} if ucam.uncertainty == 'both'
                                   else {ucam.uncertainty})
  if ucam.mode == 'mask':
    expected |= {'uncertainty_before_mask'}
    branches = {'image', 'question'} if ucam.branch == 'both' else {ucam.branch}
    assert {k for k in out if k.startswith('certainty_')} == {f'certainty_{b}'
                                                              for b in branches}
    assert 'model_attention' in out
  assert set(terms) == expected
  np.testing.assert_allclose(terms['loss'], terms['answer'] + terms.get('uncertainty', 0.0),
                             rtol=1e-6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((terms, grads)))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_loss_only_terms_are_the_uncertainty_module_losses():
  model, params, features, labels = _setup()
  weights = np.array([1.0, 0.0, 1.0])
  ucam = _ucam(mode='loss_only', uncertainty='aleatoric')
  key = jax.random.PRNGKey(5)
  terms, out = gca.forward(model.apply, params, features, labels, weights, key, ucam,
                           train=False)
  noise_key = jax.random.split(key, 3)[1]
  noise = uncertainty.sample_noise(noise_key, ucam.aleatoric_samples, out['logits'].shape)
  want = uncertainty.aleatoric_loss(out['logits'], out['sigma2'], jax.nn.one_hot(labels, 13),
                                    noise, weights)
  np.testing.assert_allclose(terms['answer'], want['answer'], rtol=1e-6)
  np.testing.assert_allclose(terms['aleatoric'], want['aleatoric'], rtol=1e-6)
  np.testing.assert_allclose(terms['loss'], want['total'], rtol=1e-6)
  # Soft targets give the same terms as the indices they encode.
  soft, _ = gca.forward(model.apply, params, features, jax.nn.one_hot(labels, 13), weights, key,
                        ucam, train=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), soft, terms)


def test_mask_changes_attention_as_specified():
  model, params, (v, e, lengths), _ = _setup()
  rng = np.random.default_rng(2)
  certainty = rng.random(v.shape[:3]) * (rng.random(v.shape[:3]) < 0.5)
  plain = gca.answer(model.apply, params, gca.answer_inputs(model.apply, params, (v, e, lengths)))
  inputs = gca.answer_inputs(model.apply, params, (v, e, lengths), {'image': certainty},
                             'multiply')
  masked = gca.answer(model.apply, params, inputs)
  # Hop 1 sees the same query either way: its attention is normalise(alpha * M).
  alpha = plain['attention'][:, 0] * certainty
  np.testing.assert_allclose(masked['attention'][:, 0],
                             alpha / alpha.sum((1, 2), keepdims=True), rtol=1e-5, atol=1e-7)
  # A map of ones changes nothing; a map of zeros keeps the model's own attention.
  for ones_or_zeros in (np.ones, np.zeros):
    inputs = gca.answer_inputs(model.apply, params, (v, e, lengths),
                               {'image': ones_or_zeros(v.shape[:3])}, 'multiply')
    np.testing.assert_allclose(gca.answer(model.apply, params, inputs)['logits'],
                               plain['logits'], rtol=1e-5, atol=1e-6)
  # Residual: the grid becomes v * (1 + M); the words e * (1 + M_q).
  words = rng.random(e.shape[:2])
  inputs = gca.answer_inputs(model.apply, params, (v, e, lengths),
                             {'image': certainty, 'question': words}, 'residual')
  by_hand = gca.answer_inputs(model.apply, params, (v * (1 + certainty[..., None]),
                                                    e * (1 + words[..., None]), lengths))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), inputs, by_hand)


def test_evaluation_never_sees_the_answer():
  model, params, (v, e, lengths), labels = _setup(image_size=64, n=3)
  config = tiny_config(None)
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  tokens = np.random.default_rng(1).integers(2, 20, (3, 5)).astype(np.int32)
  batch = {'image': images, 'question': tokens, 'length': lengths, 'answer': labels,
           'weight': np.ones(3, np.float32)}
  step = jax.jit(lambda b: evaluate.eval_step(params, model.apply, b, jax.random.PRNGKey(0), 4,
                                              config.ucam))
  out = step(batch)
  other = step(dict(batch, answer=(labels + 1) % 13))
  for key in out:
    if key != 'loss':
      np.testing.assert_array_equal(out[key], other[key], err_msg=key)
  assert {'certainty_image', 'certainty_question', 'model_attention',
          'sigma2', 'predictive_variance'} <= set(out)


def test_predictive_uncertainty_of_the_full_mc_scope():
  """L_PU's samples under mc_scope 'full' (the embeddings dropped out too): the 'answer' scope's
  without dropout, another value with it."""
  model, params, features, labels = _setup()
  weights = np.ones(3)

  def terms(model, scope):
    return gca.forward(model.apply, params, features, labels, weights, jax.random.PRNGKey(0),
                       _ucam(mode='loss_only', uncertainty='predictive', mc_scope=scope),
                       train=False)[0]['uncertainty']
  assert not np.isclose(terms(model, 'full'), terms(model, 'answer'), rtol=1e-4)
  config = tiny_config(None)
  config.model.dropout_rate = 0.0
  still = models.get_model(config, vocab_size=20, num_answers=13)
  np.testing.assert_allclose(terms(still, 'full'), terms(still, 'answer'), rtol=1e-6)


@pytest.mark.parametrize('key,value', [('mode', 'gca'), ('combine', 'add'), ('order', 'third'),
                                       ('sign', 'minus'), ('normalisation', 'softplus'),
                                       ('aleatoric_samples', 0), ('mc_scope', 'all')])
def test_bad_switch_is_a_clear_error(key, value):
  ucam = _ucam()
  ucam[key] = value
  with pytest.raises(ValueError, match=f'config.ucam.{key}'):
    gca.check_config(ucam)


def test_default_config_is_valid_and_runs_the_method():
  ucam = san.get_config().ucam
  gca.check_config(ucam)
  assert ucam.mode == 'mask'
  assert isinstance(ucam, ml_collections.ConfigDict)
