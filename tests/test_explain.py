"""ucam_jax.explain on tiny models: activations by hand, gradients by finite differences, maps
against NumPy re-implementations, and per-example independence."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucam_jax import explain

BATCH = 3


class GridModel(nn.Module):
  """images [batch, 4, 4, 2] -> conv grid [batch, 4, 4, 3] (exposed as 'grid') -> logits."""
  head: str = 'mlp'  # 'linear': one logit sum_ijk W_ijk A_ijk; 'mlp': nonlinear, 4 logits
  mix_batch: bool = False  # mix in the batch mean of the grid, as batch statistics would

  @nn.compact
  def __call__(self, images):
    grid = nn.Conv(3, (3, 3), name='conv')(images)
    grid = self.perturb('grid', grid)
    self.sow('intermediates', 'grid', grid)
    if self.mix_batch:
      grid = grid + jnp.tanh(grid.mean(axis=0))
    flat = grid.reshape(grid.shape[0], -1)
    if self.head == 'linear':
      return nn.Dense(1, use_bias=False, name='head')(flat)
    return nn.Dense(4, name='out')(jnp.tanh(nn.Dense(8, name='hidden')(flat)))


class WordModel(nn.Module):
  """tokens [batch, 5] -> word states [batch, 5, 3] (exposed as 'words') -> logits [batch, 4]."""

  @nn.compact
  def __call__(self, tokens):
    words = nn.Dense(3, name='proj')(nn.Embed(10, 6, name='embed')(tokens))
    words = self.perturb('words', words)
    self.sow('intermediates', 'words', words)
    pooled = jnp.tanh(words).mean(axis=1)
    return nn.Dense(4, name='out')(pooled ** 2 + pooled)


def target(outputs):
  """The logit of class 1, per example."""
  return outputs[:, 1]


def entropy(outputs):
  probs = jax.nn.softmax(outputs)
  return -(probs * jnp.log(probs)).sum(-1)


def grid_setup(dtype=jnp.float32, seed=0, **kwargs):
  model = GridModel(**kwargs)
  images = jax.random.normal(jax.random.key(seed), (BATCH, 4, 4, 2), dtype)
  variables = model.init(jax.random.key(1), images)  # with the batch-shaped perturbations
  variables = jax.tree.map(lambda x: x.astype(dtype), variables)
  return model, variables, images


def word_setup(dtype=jnp.float32):
  model = WordModel()
  tokens = jax.random.randint(jax.random.key(0), (BATCH, 5), 0, 10)
  variables = jax.tree.map(lambda x: x.astype(dtype), model.init(jax.random.key(1), tokens))
  return model, variables, tokens


def by_hand(model, variables, inputs):
  """The exposed intermediate, computed from the first layers applied separately."""
  params = variables['params']
  if isinstance(model, GridModel):
    return nn.Conv(3, (3, 3)).apply({'params': params['conv']}, inputs)
  embedded = nn.Embed(10, 6).apply({'params': params['embed']}, inputs)
  return nn.Dense(3).apply({'params': params['proj']}, embedded)


SETUPS = {'grid': (grid_setup, 'grid'), 'words': (word_setup, 'words')}


@pytest.mark.parametrize('name', SETUPS)
def test_activations_are_the_intermediate(name):
  setup, layer = SETUPS[name]
  model, variables, inputs = setup()
  A, G = explain.activations_and_gradients(model.apply, variables, (inputs,), layer, target)
  expected = by_hand(model, variables, inputs)
  assert A.shape == G.shape == expected.shape
  np.testing.assert_allclose(A, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', SETUPS)
@pytest.mark.parametrize('target_fn', [target, entropy])
def test_gradients_match_finite_differences(name, target_fn):
  setup, layer = SETUPS[name]
  with jax.enable_x64(True):
    model, variables, inputs = setup(jnp.float64)
    _, G = explain.activations_and_gradients(model.apply, variables, (inputs,), layer, target_fn)
    assert G.dtype == jnp.float64
    params = {'params': variables['params']}
    shape = by_hand(model, variables, inputs).shape
    f = jax.jit(lambda delta: target_fn(model.apply({**params, 'perturbations': {layer: delta}},
                                                    inputs)))
    eps = 1e-6
    rng = np.random.default_rng(0)
    # Random cells of every example: d target_n / d A_n at that cell.
    for n in range(BATCH):
      for _ in range(4):
        cell = (n,) + tuple(rng.integers(0, s) for s in shape[1:])
        delta = np.zeros(shape)
        delta[cell] = eps
        fd = (f(delta)[n] - f(-delta)[n]) / (2 * eps)
        np.testing.assert_allclose(G[cell], fd, rtol=1e-6, atol=1e-9)
    assert np.abs(G).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize('method', sorted(explain.METHODS))
def test_map_of_an_example_does_not_depend_on_the_batch(method):
  # The model mixes in the batch mean, so a batched gradient would see the other examples.
  model, variables, images = grid_setup(mix_batch=True)
  _, _, others = grid_setup(seed=7)
  run = functools.partial(explain.explain, model.apply, variables, layer='grid',
                          target_fn=entropy, method=method)
  alone = run((images[:1],))
  with_first = run((images,))
  with_others = run((jnp.concatenate([others[:2], images[:1]]),))
  np.testing.assert_allclose(with_first[0], alone[0], atol=1e-6)
  np.testing.assert_allclose(with_others[2], alone[0], atol=1e-6)
  assert np.abs(with_others[0] - alone[0]).max() > 1e-3  # other examples give other maps


def test_gradcam_with_a_linear_head_is_the_hand_computed_map():
  model, variables, images = grid_setup(head='linear')
  maps = explain.explain(model.apply, variables, (images,), 'grid', lambda y: y[:, 0])
  W = np.asarray(variables['params']['head']['kernel']).reshape(4, 4, 3)
  A = np.asarray(by_hand(model, variables, images))
  weights = W.mean(axis=(0, 1))  # G = W for every example
  expected = np.maximum(np.einsum('nijk,k->nij', A, weights), 0)
  expected /= expected.max(axis=(1, 2), keepdims=True)
  assert maps.shape == (BATCH, 4, 4)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


def numpy_gradcam_plus_plus(A, G):
  """Per example A, G [n, h, w, k] -> w [n, k], as pytorch-grad-cam's GradCAMPlusPlus."""
  g2, g3 = G ** 2, G ** 3
  sum_a = A.sum(axis=(1, 2), keepdims=True)
  denominator = 2 * g2 + sum_a * g3
  denominator = np.where(denominator != 0, denominator, 1)
  alpha = np.where(G != 0, g2 / denominator, 0)
  return (alpha * np.maximum(G, 0)).sum(axis=(1, 2))


def random_pair(seed=0, shape=(BATCH, 4, 4, 3)):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=shape).astype(np.float32)
  G = rng.normal(size=shape).astype(np.float32)
  G[..., 0, 0, :] = 0  # some zero gradients, where alpha's denominator is 0
  return A, G


def test_gradcam_plus_plus_matches_numpy():
  A, G = random_pair()
  got = jax.vmap(explain.gradcam_plus_plus_weights)(A, G)
  np.testing.assert_allclose(got, numpy_gradcam_plus_plus(A, G), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(got))
  maps = explain.cam(A, G, explain.gradcam_plus_plus_weights, normalise=False)
  expected = np.maximum(np.einsum('nijk,nk->nij', A, numpy_gradcam_plus_plus(A, G)), 0)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)


def test_ucam_weights_are_negated_gradcam_weights():
  A, G = random_pair()
  for a, g in zip(A, G):
    np.testing.assert_array_equal(explain.ucam_weights(a, g), -explain.gradcam_weights(a, g))
    np.testing.assert_allclose(explain.gradcam_weights(a, g), g.mean(axis=(0, 1)), rtol=1e-6)


def test_normalisation_puts_the_max_at_one_and_keeps_zeros():
  A, G = random_pair()
  G[1] = 0  # an all-zero map: must stay zero, not nan
  raw = explain.cam(A, G, explain.gradcam_weights, normalise=False)
  maps = explain.cam(A, G, explain.gradcam_weights)
  np.testing.assert_array_equal(maps[1], 0)
  for n in (0, 2):
    assert raw[n].max() > 0 and np.any(raw[n] == 0)  # the ReLU clipped some cells
    np.testing.assert_allclose(maps[n].max(), 1, rtol=1e-6)
    np.testing.assert_array_equal(maps[n] == 0, raw[n] == 0)
    np.testing.assert_allclose(maps[n], raw[n] / raw[n].max(), rtol=1e-6)


@pytest.mark.parametrize('name', SETUPS)
@pytest.mark.parametrize('method', sorted(explain.METHODS))
def test_explain_jits_and_gives_maps_over_the_spatial_axes(name, method):
  setup, layer = SETUPS[name]
  model, variables, inputs = setup()
  target_fn = entropy if method == 'ucam' else target
  run = functools.partial(explain.explain, model.apply, layer=layer, target_fn=target_fn,
                          method=method)
  maps = jax.jit(run)(variables, (inputs,))
  assert maps.shape == {'grid': (BATCH, 4, 4), 'words': (BATCH, 5)}[name]
  np.testing.assert_allclose(maps, run(variables, (inputs,)), rtol=1e-5, atol=1e-6)
  assert np.all((maps >= 0) & (maps <= 1))


def logit_of(outputs, classes):
  """The logit of each example's own class: classes [batch]."""
  return jnp.take_along_axis(outputs, classes[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize('method', ['gradcam', 'ucam'])
def test_per_example_targets_give_each_example_its_own_map(method):
  model, variables, images = grid_setup()
  classes = jnp.array([1, 3, 0])
  maps = explain.explain(model.apply, variables, (images,), 'grid', logit_of, method,
                         targets=classes)
  for n in range(BATCH):
    alone = explain.explain(model.apply, variables, (images,), 'grid',
                            lambda y, c=int(classes[n]): y[:, c], method)
    np.testing.assert_allclose(maps[n], alone[n], rtol=1e-5, atol=1e-6)
  first = explain.explain(model.apply, variables, (images,), 'grid', target, method)
  assert np.abs(maps[1] - first[1]).max() > 1e-3  # not class 1's map for every example


class Opaque(nn.Module):
  """A model without the perturb / sow contract."""

  @nn.compact
  def __call__(self, images):
    return nn.Dense(4)(images.reshape(images.shape[0], -1))


def test_errors_name_the_problem():
  model, variables, images = grid_setup()
  with pytest.raises(ValueError, match='nope'):
    explain.activations_and_gradients(model.apply, variables, (images,), 'nope', target)
  with pytest.raises(ValueError, match='Unknown method'):
    explain.explain(model.apply, variables, (images,), 'grid', target, method='cam')
  with pytest.raises(ValueError, match='one scalar per example'):
    explain.explain(model.apply, variables, (images,), 'grid', lambda y: y[:, 1].sum() * 0 + 1.0)
  classes = jnp.array([1, 3, 0])  # Closed over: each example sees a batch of one.
  with pytest.raises(ValueError, match='targets='):
    explain.explain(model.apply, variables, (images,), 'grid',
                    lambda y: y[jnp.arange(BATCH), classes])
  opaque = Opaque()
  with pytest.raises(ValueError, match=r'self\.perturb'):
    explain.explain(opaque.apply, opaque.init(jax.random.key(0), images), (images,), 'grid',
                    target)
