"""Uncertainty that carries signal: the variance head's detached input and its own optimiser,
CADA's loss and map, the Kendall & Gal likelihood's incentive, the bounded L_PU, the map's
stop-gradient, and the training logs that follow the head."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax

from tests.conftest import tiny_config
from tests.test_gca import _setup, _ucam
from ucam_jax import gca, train, uncertainty


def _trunk_gradient(grads):
  """The largest |gradient| over every parameter but the variance head's."""
  return max(float(jnp.abs(g).max()) for path, g in jax.tree_util.tree_leaves_with_path(grads)
             if 'variance' not in jax.tree_util.keystr(path))


@pytest.mark.parametrize('variance_input', ['logits', 'hidden'])
def test_detached_variance_sends_no_gradient_into_the_trunk(variance_input):
  model, params, features, labels = _setup()
  model = model.clone(variance_input=variance_input)
  params = {'params': model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8),
                                 jnp.ones((1, 5), jnp.int32), jnp.array([5]))['params']}
  v, e, lengths = features
  inputs = gca.answer_inputs(model.apply, params, (v, e, lengths))

  def of_sigma2(params, detach):  # A loss of sigma2 alone: only its own path carries gradient.
    return gca.answer(model.apply, params, inputs, detach_variance=detach)['sigma2'].sum()

  attached = jax.grad(of_sigma2)(params, False)
  detached = jax.grad(of_sigma2)(params, True)
  assert _trunk_gradient(attached) > 1e-4
  assert _trunk_gradient(detached) == 0
  # The head itself still learns, with the same gradient either way.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               {k: v for k, v in detached['params'].items() if k.startswith('variance')},
               {k: v for k, v in attached['params'].items() if k.startswith('variance')})
  # And U's gradient on the trunk is then the answer path's alone: the same as with sigma2 fixed.
  noise = uncertainty.sample_noise(jax.random.PRNGKey(1), 8, (len(labels), 13))
  targets = jax.nn.one_hot(labels, 13)

  def U(params, detach, frozen=None):
    out = gca.answer(model.apply, params, inputs, detach_variance=detach)
    sigma2 = out['sigma2'] if frozen is None else frozen
    return uncertainty.kendall_gal_loss(out['logits'], sigma2, targets, noise)['total']

  sigma2 = gca.answer(model.apply, params, inputs)['sigma2']
  got = jax.grad(U)(params, True)['params']
  want = jax.grad(U)(params, True, sigma2)['params']
  for name in [k for k in got if k.startswith('variance')]:
    del got[name], want[name]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), got, want)


def test_uncertainty_that_trains_the_variance_head_alone_leaves_the_trunk_to_the_answer_loss():
  model, params, features, labels = _setup()
  weights, key = jnp.ones(len(labels)), jax.random.PRNGKey(3)

  def grads(term, **switches):
    ucam = _ucam(mode='loss_only', aleatoric_loss='temperature', variance_detach=True, **switches)
    return jax.grad(lambda p: gca.forward(model.apply, p, features, labels, weights, key, ucam,
                                          train=False)[0][term])(params)

  head_only = grads('loss', uncertainty_trains='variance_head')
  answer = grads('answer', uncertainty_trains='variance_head')
  assert _trunk_gradient(grads('uncertainty')) > 1e-4  # 'all': U reaches the trunk via logits.
  assert float(jnp.abs(head_only['params']['variance']['kernel']).max()) > 0
  for name in [k for k in answer['params'] if k.startswith('variance')]:
    del head_only['params'][name], answer['params'][name]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               head_only, answer)


def test_variance_optimizer_sgd_updates_the_head_with_sgd_and_the_rest_with_adam():
  config = tiny_config(None)
  config.ucam.update(variance_optimizer='sgd', variance_learning_rate=2e-4)
  config.learning_rate = 1e-3
  params = {'params': {'variance': {'kernel': jnp.ones((3, 1)), 'bias': jnp.zeros(1)},
                       'classifier': {'kernel': jnp.ones((3, 2))}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = train.make_optimizer(config, num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # SGD: -lr * g for the head.
  np.testing.assert_allclose(updates['params']['variance']['kernel'], -2e-4 * 0.5)
  np.testing.assert_allclose(updates['params']['variance']['bias'], -2e-4 * 0.5)
  # Adam's first step is -lr * sign(g) (m / sqrt(v) = g / |g|), at the schedule's first value.
  np.testing.assert_allclose(updates['params']['classifier']['kernel'], -1e-3, rtol=1e-4)
  config.ucam.variance_optimizer = 'main'  # One Adam for everything.
  tx = train.make_optimizer(config, num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['params']['variance']['kernel'], -1e-3, rtol=1e-4)


def test_cada_loss_matches_a_numpy_transcription_of_the_released_criterion():
  rng = np.random.default_rng(0)
  n, c, T = 5, 7, 16
  logits, targets = rng.normal(size=(n, c)) * 2, np.eye(c)[rng.integers(0, c, n)]
  sigma2, noise = rng.uniform(0.1, 2.0, n), rng.normal(size=(T, n, c))
  got = uncertainty.cada_loss(jnp.array(logits), jnp.array(sigma2), jnp.array(targets),
                              jnp.array(noise))
  # CADA's bayesian_crossentropy.lua: batch-mean cross-entropies, per draw ELU(L_ud - L_d),
  # their mean times L_ud, plus L_ud and mean(exp(var) - 1).
  ce = lambda z: -(targets * log_softmax(z, axis=-1)).sum(-1).mean()  # noqa: E731
  undistorted = ce(logits)
  diffs = [undistorted - ce(logits + np.sqrt(sigma2)[:, None] * noise[t]) for t in range(T)]
  elu = [d if d > 0 else np.expm1(d) for d in diffs]
  want = undistorted * np.mean(elu) + undistorted + np.mean(np.expm1(sigma2))
  np.testing.assert_allclose(got['total'], want, rtol=1e-5)
  np.testing.assert_allclose(got['aleatoric'], want - undistorted, rtol=1e-5)


def test_kendall_gal_rewards_variance_where_the_answer_is_wrong_and_not_where_it_is_right():
  noise = uncertainty.sample_noise(jax.random.PRNGKey(0), 2000, (1, 4))
  target = jnp.eye(4)[:1]
  sigma2 = jnp.linspace(0.01, 25.0, 200)

  def loss(logits):
    return jax.vmap(lambda s: uncertainty.kendall_gal_loss(
        logits, s[None], target, noise)['total'])(sigma2)

  wrong = loss(jnp.array([[-2.0, 4.0, 0.0, 0.0]]))  # Confidently wrong: class 1, truth 0.
  right = loss(jnp.array([[6.0, 0.0, 0.0, 0.0]]))  # Confidently right.
  assert sigma2[jnp.argmin(wrong)] > 5.0
  assert sigma2[jnp.argmin(right)] < 0.5
  # The published recipe, by contrast, is smallest at the smallest variance either way.
  published = jax.vmap(lambda s: uncertainty.aleatoric_loss(
      jnp.array([[-2.0, 4.0, 0.0, 0.0]]), s[None], target, noise)['aleatoric'])(sigma2)
  assert jnp.argmin(published) == 0


def test_temperature_loss_matches_numpy_and_separates_wrong_from_right():
  rng = np.random.default_rng(1)
  logits, sigma2 = rng.normal(size=(6, 5)) * 3, rng.uniform(0.2, 3.0, 6)
  targets = np.eye(5)[rng.integers(0, 5, 6)]
  got = uncertainty.temperature_loss(jnp.array(logits), jnp.array(sigma2), jnp.array(targets))
  want = -(targets * log_softmax(logits / sigma2[:, None], axis=-1)).sum(-1).mean()
  np.testing.assert_allclose(got['total'], want, rtol=1e-5)
  # Its minimiser: the floor for a right answer; a temperature above 1 for a wrong one.
  sigma2 = jnp.linspace(1e-3, 10.0, 1000)
  target = jnp.eye(6)[:1]
  wrong = jnp.array([[1.0, 2.0, -3.0, -3.0, -3.0, -3.0]])  # p(truth) = 0.27 > 1/6.
  right = jnp.array([[2.0, 1.0, -3.0, -3.0, -3.0, -3.0]])

  def best(logits, loss):
    values = jax.vmap(lambda s: loss(logits, s[None], target)['total'])(sigma2)
    return float(sigma2[jnp.argmin(values)])

  assert best(right, uncertainty.temperature_loss) == pytest.approx(1e-3)
  assert best(wrong, uncertainty.temperature_loss) > 1.5


def test_normalised_predictive_loss_stays_bounded_where_the_raw_one_explodes():
  """A model whose MC-dropout logits vary a lot: L_PU with the raw predictive variance grows
  like exp(variance); the normalised form stays within a few answer losses."""
  rng = np.random.default_rng(0)
  logits = jnp.array(rng.normal(size=(8, 13)))
  targets = jax.nn.one_hot(jnp.array(rng.integers(0, 13, 8)), 13)
  noise = uncertainty.sample_noise(jax.random.PRNGKey(0), 32, (8, 13))
  answer = float(optax.softmax_cross_entropy(logits, targets).mean())
  for variance in (1.5, 10.0, 1e3):
    pv = jnp.full(8, variance)
    for loss in ('published', 'cada', 'kendall_gal', 'temperature'):
      raw = gca.uncertainty_term(_ucam(aleatoric_loss=loss), logits,
                                 gca.predictive_variance(_ucam(), pv), targets, noise)
      bounded = gca.uncertainty_term(_ucam(aleatoric_loss=loss), logits, gca.predictive_variance(
          _ucam(predictive_variance='normalised'), pv), targets, noise)
      assert jnp.isfinite(bounded) and abs(float(bounded)) < 3 * answer + 2, (loss, variance)
      if loss == 'published' and variance >= 10:
        assert raw > 100 * answer  # exp(variance) - 1: the explosion the switch removes.


def test_cada_map_matches_numpy():
  rng = np.random.default_rng(2)
  A, G = rng.normal(size=(2, 3, 4, 4, 6))
  got = gca.certainty_map(A, G, weighting='elementwise', normalisation='softmax')
  raw = (A * -G).sum(-1)  # Activation x certainty gradient, per cell.
  want = np.where(raw > 0, np.exp(raw - raw.max(axis=(1, 2), keepdims=True)), 0)
  want = want / want.sum(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Nothing positive: the map is 0, not nan.
  assert (gca.certainty_map(np.abs(A), np.abs(G), weighting='elementwise',
                            normalisation='softmax') == 0).all()


def test_variance_maps_and_their_factor():
  """map_source 'variance' differentiates the predicted variance (not U): a map of -d sigma2/dv
  weighted elementwise; variance_factor scales each example's map by clip(1 - sigma2, 0, 1)."""
  model, params, (v, e, lengths), labels = _setup()
  weights, key = jnp.ones(len(labels)), jax.random.PRNGKey(3)
  switches = dict(mode='mask', branch='image', map_source='variance',
                  map_weighting='elementwise')
  ucam = _ucam(**switches)
  _, out = gca.forward(model.apply, params, (v, e, lengths), labels, weights, key, ucam, False)
  inputs = lambda v: gca.answer_inputs(model.apply, params, (v, e, lengths))  # noqa: E731
  grad = jax.grad(lambda v: gca.answer(model.apply, params, inputs(v))['sigma2'].sum())(v)
  np.testing.assert_allclose(out['certainty_image'], gca.certainty_map(
      v, grad, weighting='elementwise'), rtol=1e-5, atol=1e-6)
  _, scaled = gca.forward(model.apply, params, (v, e, lengths), labels, weights, key,
                          _ucam(**switches, variance_factor=True), False)
  sigma2 = gca.answer(model.apply, params, inputs(v))['sigma2']
  np.testing.assert_allclose(scaled['certainty_image'], out['certainty_image']
                             * np.clip(1 - sigma2, 0, 1)[:, None, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('map_gradient', ['through', 'stop'])
def test_map_gradient_switch_cuts_the_path_through_the_map(map_gradient):
  """With first order, the map still depends on v through its activations A (M = ReLU(sum_k
  w_k A_k)): 'through' lets the loss differentiate that, 'stop' cuts it. The gradient of the
  loss with respect to v then equals that of the second pass with the map held fixed."""
  model, params, (v, e, lengths), labels = _setup()
  weights, key = jnp.ones(len(labels)), jax.random.PRNGKey(3)
  ucam = _ucam(mode='mask', branch='image', map_gradient=map_gradient)

  def loss(v):
    return gca.forward(model.apply, params, (v, e, lengths), labels, weights, key, ucam,
                       False)[0]['loss']

  _, out = gca.forward(model.apply, params, (v, e, lengths), labels, weights, key, ucam, False)

  def second_pass(v):  # The loss with the map held at its value.
    inputs = gca.answer_inputs(model.apply, params, (v, e, lengths),
                               {'image': out['certainty_image']}, ucam.combine)
    o = gca.answer(model.apply, params, inputs)
    noise = uncertainty.sample_noise(jax.random.split(key, 3)[1], ucam.aleatoric_samples,
                                     o['logits'].shape)
    targets = jax.nn.one_hot(labels, 13)
    return (optax.softmax_cross_entropy(o['logits'], targets).mean()
            + gca.uncertainty_term(ucam, o['logits'], o['sigma2'], targets, noise, weights))

  got, held = jax.grad(loss)(v), jax.grad(second_pass)(v)
  if map_gradient == 'stop':
    np.testing.assert_allclose(got, held, rtol=1e-4, atol=1e-7)
  else:
    assert np.abs(got - held).max() > 1e-4 * np.abs(held).max()


def test_training_logs_follow_the_variance_head(small_data_dir, tmp_path):
  """metrics.jsonl holds sigma2's mean and quantiles, U's share of the loss, U before the mask
  for the true targets, and the monitor's AUROC on a fixed test batch; the warm-up trains the
  baseline first; the evaluation compares the certainty map with Grad-CAM."""
  config = tiny_config(small_data_dir, num_train_steps=20, log_every_steps=5,
                       monitor_every_steps=10)
  config.ucam.update(warmup=0.5, aleatoric_loss='kendall_gal', variance_detach=True,
                     variance_optimizer='sgd')
  config.model.variance_input = 'hidden'
  results = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  by_step = {r['step']: r for r in rows if 'train_loss' in r}
  assert 'train_uncertainty' not in by_step[5] and 'train_uncertainty' not in by_step[10]
  late = by_step[20]
  for key in ('train_sigma2_mean', 'train_sigma2_p10', 'train_sigma2_p50', 'train_sigma2_p90',
              'train_uncertainty_ratio', 'train_uncertainty_before_mask'):
    assert np.isfinite(late[key]), key
  assert late['train_sigma2_p10'] <= late['train_sigma2_p50'] <= late['train_sigma2_p90']
  np.testing.assert_allclose(late['train_uncertainty_ratio'],
                             late['train_uncertainty'] / late['train_answer'], rtol=0.3)
  assert {'monitor_accuracy', 'monitor_auroc_sigma2',
          'monitor_auroc_predictive_entropy'} <= set(by_step[10]) | set(by_step[20])
  assert -1 <= results['test']['certainty_vs_gradcam_spearman'] <= 1
