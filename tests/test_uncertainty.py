"""Uncertainty losses and statistics against plain NumPy; gradients against finite differences."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from ucam_jax import uncertainty

N, C, T = 5, 4, 7


def random_inputs(seed=0, dtype=np.float32):
  """logits [N, C], sigma2 [N], soft targets [N, C], noise [T, N, C], weights [N] with zeros."""
  rng = np.random.default_rng(seed)
  logits = 2.0 * rng.normal(size=(N, C))
  sigma2 = rng.uniform(0.1, 2.0, size=N)
  targets = rng.dirichlet(np.ones(C), size=N)
  noise = rng.normal(size=(T, N, C))
  weights = np.array([1.0, 0.0, 2.0, 1.0, 0.0])
  return [x.astype(dtype) for x in (logits, sigma2, targets, noise, weights)]


def np_cross_entropy(z, t, w):
  """Weighted batch mean of sum_c -t log softmax(z)."""
  per_example = -np.sum(t * scipy.special.log_softmax(z, axis=-1), axis=-1)
  return np.sum(w * per_example) / np.sum(w)


def np_aleatoric(logits, sigma2, targets, noise, w):
  answer = np_cross_entropy(logits, targets, w)
  gce, variance = 0.0, 0.0
  for t in range(len(noise)):
    distorted = np_cross_entropy(logits + np.sqrt(sigma2)[:, None] * noise[t], targets, w)
    gce += distorted / len(noise)
    diff = answer - distorted
    elu = diff if diff > 0 else np.exp(diff) - 1.0
    variance += -elu / len(noise)
  depressor = np.sum(w * (np.exp(sigma2) - 1.0)) / np.sum(w)
  aleatoric = gce + variance + depressor
  return {'total': answer + aleatoric, 'answer': answer, 'aleatoric': aleatoric,
          'gce': gce, 'variance': variance, 'depressor': depressor}


@pytest.mark.parametrize('use_weights', [True, False])
def test_aleatoric_loss_matches_numpy(use_weights):
  logits, sigma2, targets, noise, weights = random_inputs()
  w = weights if use_weights else np.ones(N, np.float32)
  got = jax.jit(uncertainty.aleatoric_loss)(logits, sigma2, targets, noise,
                                            weights if use_weights else None)
  want = np_aleatoric(*(x.astype(np.float64) for x in (logits, sigma2, targets, noise, w)))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  # Both ELU branches occur across t, so both are exercised.
  assert want['variance'] != 0.0


def test_aleatoric_loss_padding_is_ignored():
  logits, sigma2, targets, noise, weights = random_inputs()
  kept = weights > 0
  full = uncertainty.aleatoric_loss(logits, sigma2, targets, noise, weights)
  garbage = logits.copy()
  garbage[~kept] = 1e3
  changed = uncertainty.aleatoric_loss(garbage, sigma2, targets, noise, weights)
  for name in full:
    np.testing.assert_allclose(changed[name], full[name], rtol=1e-6, err_msg=name)


def test_kendall_gal_loss_matches_numpy():
  logits, sigma2, targets, noise, weights = random_inputs(seed=1)
  got = jax.jit(uncertainty.kendall_gal_loss)(logits, sigma2, targets, noise, weights)
  x = [a.astype(np.float64) for a in (logits, sigma2, targets, noise, weights)]
  logits, sigma2, targets, noise, weights = x
  per_example = np.zeros(N)
  for n in range(N):
    mean_probs = np.mean([scipy.special.softmax(logits[n] + np.sqrt(sigma2[n]) * noise[t, n])
                          for t in range(T)], axis=0)
    per_example[n] = -np.sum(targets[n] * np.log(mean_probs))
  np.testing.assert_allclose(got['total'], np.sum(weights * per_example) / np.sum(weights),
                             rtol=1e-5)
  np.testing.assert_allclose(got['answer'], np_cross_entropy(logits, targets, weights), rtol=1e-5)


def test_kendall_gal_loss_is_stable_for_large_logits():
  logits = np.array([[500.0, -500.0, 0.0]], np.float32)
  targets = np.array([[0.0, 1.0, 0.0]], np.float32)
  noise = np.zeros((3, 1, 3), np.float32)
  got = uncertainty.kendall_gal_loss(logits, np.ones(1, np.float32), targets, noise)
  np.testing.assert_allclose(got['total'], 1000.0, rtol=1e-6)


@pytest.mark.parametrize('loss_name', sorted(uncertainty.ALEATORIC_LOSSES))
def test_aleatoric_losses_have_finite_gradients_when_the_variance_underflows(loss_name):
  """A softplus variance head gives sigma2 = 0 exactly for inputs below about -104; sqrt's
  infinite derivative there used to make the gradient nan (a diverged A-GCA run)."""
  logits, _, targets, noise, _ = random_inputs(seed=3, dtype=np.float32)
  head = np.linspace(-200.0, 2.0, len(logits)).astype(np.float32)  # Some underflow, some not.
  assert (jax.nn.softplus(head) == 0).any() and (jax.nn.softplus(head) > 0).any()

  def loss(logits, head):
    terms = uncertainty.ALEATORIC_LOSSES[loss_name](logits, jax.nn.softplus(head), targets,
                                                    noise)
    return terms['total']

  # The failure: sqrt of the underflowed softplus has a nan gradient.
  assert np.isnan(jax.grad(lambda h: jnp.sqrt(jax.nn.softplus(h)))(np.float32(-200.0)))
  grad_logits, grad_head = jax.grad(loss, argnums=(0, 1))(logits, head)
  assert np.isfinite(grad_logits).all() and np.isfinite(grad_head).all()
  # The temperature loss floors sigma2 higher (uncertainty.TEMPERATURE_FLOOR), with the same
  # zero gradient below.
  floor = (uncertainty.TEMPERATURE_FLOOR if loss_name == 'temperature'
           else np.finfo(np.float32).tiny)
  underflow = np.asarray(jax.nn.softplus(head) < floor)
  assert (grad_head[underflow] == 0).all() and (grad_head[~underflow] != 0).all()


def test_aleatoric_loss_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    logits, sigma2, targets, noise, weights = random_inputs(seed=2, dtype=np.float64)

    @jax.jit
    def loss(logits, sigma2):
      return uncertainty.aleatoric_loss(logits, sigma2, targets, noise, weights)['total']

    grad_logits, grad_sigma2 = jax.grad(loss, argnums=(0, 1))(logits, sigma2)
    assert grad_logits.dtype == jnp.float64
    h = 1e-6
    for arg, grad in ((0, grad_logits), (1, grad_sigma2)):
      args = [logits, sigma2]
      fd = np.zeros_like(args[arg])
      for i in np.ndindex(fd.shape):
        up, down = [a.copy() for a in args], [a.copy() for a in args]
        up[arg][i] += h
        down[arg][i] -= h
        fd[i] = (loss(*up) - loss(*down)) / (2 * h)
      np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
      # Padding examples get no gradient; kept ones do.
      assert np.all(np.asarray(grad)[weights == 0] == 0)
      assert np.all(np.abs(np.asarray(grad)[weights > 0]) > 0)


def test_loss_shape_errors_name_the_argument():
  logits, sigma2, targets, noise, weights = random_inputs()
  with pytest.raises(ValueError, match=r'sigma2 must have shape \(5,\), got \(4,\)'):
    uncertainty.aleatoric_loss(logits, sigma2[:4], targets, noise)
  with pytest.raises(ValueError, match='noise'):
    uncertainty.kendall_gal_loss(logits, sigma2, targets, noise[0])
  with pytest.raises(ValueError, match='targets'):
    uncertainty.aleatoric_loss(logits, sigma2, targets[:, :3], noise)
  with pytest.raises(ValueError, match='weights'):
    uncertainty.aleatoric_loss(logits, sigma2, targets, noise, weights[:, None])


def test_sample_noise_shape():
  noise = uncertainty.sample_noise(jax.random.key(0), 100, (N, C))
  assert noise.shape == (100, N, C)
  np.testing.assert_array_equal(noise, jax.random.normal(jax.random.key(0), (100, N, C)))


# --------------------------------------------------------------------------- predictive stats


def test_predictive_stats_match_numpy():
  rng = np.random.default_rng(3)
  sample_logits = (2.0 * rng.normal(size=(T, N, C))).astype(np.float32)
  sample_sigma2 = rng.uniform(0.1, 1.0, size=(T, N)).astype(np.float32)
  got = jax.jit(uncertainty.predictive_stats)(sample_logits, sample_sigma2)

  p = scipy.special.softmax(sample_logits.astype(np.float64), axis=-1)
  p_bar = p.mean(axis=0)
  predictive = scipy.stats.entropy(p_bar, axis=-1)
  expected = scipy.stats.entropy(p, axis=-1).mean(axis=0)
  votes = p.argmax(axis=-1)  # [T, N]
  modal_count = np.array([np.bincount(votes[:, n], minlength=C).max() for n in range(N)])
  variance = sample_logits.astype(np.float64).var(axis=0).mean(axis=-1) + sample_sigma2.mean(0)
  np.testing.assert_allclose(got['probs'], p_bar, rtol=1e-5)
  np.testing.assert_allclose(got['predictive_entropy'], predictive, rtol=1e-5)
  np.testing.assert_allclose(got['expected_entropy'], expected, rtol=1e-5)
  np.testing.assert_allclose(got['mutual_information'], predictive - expected, atol=1e-5)
  assert np.all(predictive - expected > 1e-3)  # real disagreement, so the clip is not in play
  np.testing.assert_allclose(got['variation_ratio'], 1.0 - modal_count / T, atol=1e-6)
  assert np.any(modal_count < T)
  np.testing.assert_allclose(got['sigma2'], sample_sigma2.mean(0), rtol=1e-6)
  np.testing.assert_allclose(got['predictive_variance'], variance, rtol=1e-5)
  for name, value in got.items():
    assert value.shape == ((N, C) if name == 'probs' else (N,)), name


def test_predictive_stats_identical_samples_have_no_epistemic_uncertainty():
  logits = np.random.default_rng(4).normal(size=(N, C)).astype(np.float32)
  got = uncertainty.predictive_stats(np.broadcast_to(logits, (T, N, C)))
  np.testing.assert_allclose(got['mutual_information'], 0.0, atol=1e-6)
  np.testing.assert_array_equal(got['variation_ratio'], 0.0)
  np.testing.assert_allclose(got['predictive_variance'], 0.0, atol=1e-6)
  np.testing.assert_allclose(got['predictive_entropy'],
                             scipy.stats.entropy(scipy.special.softmax(logits, -1), axis=-1),
                             rtol=1e-5)


def test_predictive_stats_shape_errors():
  with pytest.raises(ValueError, match='sample_logits'):
    uncertainty.predictive_stats(np.zeros((N, C)))
  with pytest.raises(ValueError, match=r'sample_sigma2 must have shape \(7, 5\), got \(5,\)'):
    uncertainty.predictive_stats(np.zeros((T, N, C)), np.zeros(N))


# --------------------------------------------------------------------------- MC dropout


class TinyHead(nn.Module):
  """features [n, d] -> (logits [n, C], sigma2 [n]), dropout on the features."""

  @nn.compact
  def __call__(self, features, *, deterministic):
    x = nn.Dropout(0.5)(features, deterministic=deterministic)
    return nn.Dense(C)(x), nn.softplus(nn.Dense(1)(x)[:, 0])


@functools.cache
def tiny_head():
  """TinyHead, its params and its input features, built once."""
  model = TinyHead()
  features = jax.random.normal(jax.random.key(1), (N, 8))
  params = jax.jit(model.init, static_argnames='deterministic')(
      jax.random.key(2), features, deterministic=True)
  return model, params, features


def tiny_answer_fn(deterministic=False):
  model, params, features = tiny_head()

  def answer_fn(key):
    return model.apply(params, features, deterministic=deterministic, rngs={'dropout': key})
  return answer_fn


def assert_trees_close(got, want):
  # 1e-6: a matmul over a different batch of samples may round differently (1 ulp seen on CPU).
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mc_dropout_matches_a_python_loop_and_chunking():
  answer_fn = tiny_answer_fn()
  key = jax.random.key(0)
  samples = jax.jit(uncertainty.mc_dropout, static_argnums=(0, 2))(answer_fn, key, 6)
  assert samples[0].shape == (6, N, C) and samples[1].shape == (6, N)
  loop = [jax.jit(answer_fn)(k) for k in jax.random.split(key, 6)]
  assert_trees_close(samples, jax.tree.map(lambda *x: np.stack(x), *loop))
  assert_trees_close(uncertainty.mc_dropout(answer_fn, key, 6, chunk_size=3), samples)
  # Dropout is on: the samples differ.
  assert not np.allclose(samples[0][0], samples[0][1])
  with pytest.raises(ValueError, match='chunk_size'):
    uncertainty.mc_dropout(answer_fn, key, 6, chunk_size=4)


def test_mc_dropout_masks_are_the_same_with_and_without_chunking():
  features = jnp.ones((N, 8))

  def dropped(key):  # the dropout mask itself (scaled by 1/keep): exact, no round-off
    return nn.Dropout(0.5).apply({}, features, deterministic=False, rngs={'dropout': key})

  key = jax.random.key(3)
  masks = uncertainty.mc_dropout(dropped, key, 6)
  loop = [jax.jit(dropped)(k) for k in jax.random.split(key, 6)]
  np.testing.assert_array_equal(masks, np.stack(loop))
  np.testing.assert_array_equal(uncertainty.mc_dropout(dropped, key, 6, chunk_size=3), masks)
  assert 0 < np.mean(masks == 0) < 1


def test_mc_dropout_deterministic_samples_are_identical():
  logits, sigma2 = uncertainty.mc_dropout(tiny_answer_fn(deterministic=True), jax.random.key(0), 4)
  np.testing.assert_array_equal(logits, np.broadcast_to(logits[0], logits.shape))
  np.testing.assert_array_equal(sigma2, np.broadcast_to(sigma2[0], sigma2.shape))
  stats = uncertainty.predictive_stats(logits, sigma2)
  np.testing.assert_allclose(stats['mutual_information'], 0.0, atol=1e-6)
  np.testing.assert_array_equal(stats['variation_ratio'], 0.0)
