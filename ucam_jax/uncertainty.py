"""Uncertainty (SPEC section 4): aleatoric losses, MC dropout sampling, predictive statistics.

Pure JAX, jit-able. Conventions: `n` examples, `c` classes, `T` Monte Carlo samples;
`sigma2 [n]` is the variance head's output (> 0), one scalar variance per example, shared by
its c logits. `targets [n, c]` are soft targets (rows sum to 1; one-hot for single-answer data;
all-zero rows are allowed for padding). Natural logarithms throughout (entropies in nats).
Arguments of the wrong static shape raise `ValueError` naming the argument and shapes.

Definition choices that a reader must know:
- Every mean over examples is weighted by `weights [n]` when given (0 marks a padding
  question): sum_n w_n x_n / sum_n w_n, and 0 when all weights are 0.
- The published recipe puts ELU on batch means (L_ud - L_d(t) are batch-level scalars), not per
  example, as SPEC section 4 says.
- Predictive variance uses the population variance over samples (divide by T, not T - 1).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ucam_jax import threefry

# --------------------------------------------------------------------------- helpers


def _check_shape(name: str, x, shape: tuple) -> None:
  """Raises unless x has `shape`; None in `shape` matches any size."""
  got = jnp.shape(x)
  if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
    want = tuple('?' if s is None else s for s in shape)
    raise ValueError(f'{name} must have shape {want}, got {got}.')


def _check_loss_args(logits, sigma2, targets, noise, weights) -> None:
  _check_shape('logits', logits, (None, None))
  n, c = logits.shape
  _check_shape('sigma2', sigma2, (n,))
  _check_shape('targets', targets, (n, c))
  _check_shape('noise', noise, (None, n, c))
  if weights is not None:
    _check_shape('weights', weights, (n,))


def _mean_over_examples(x, weights=None):
  """x: [..., n] -> [...]: the mean over the last axis, weighted by `weights [n]` when given."""
  if weights is None:
    return jnp.mean(x, axis=-1)
  total = jnp.sum(weights)
  # The `where` keeps the value (and its gradient) finite when every weight is 0.
  return jnp.sum(x * weights, axis=-1) / jnp.where(total > 0, total, 1.0)


def _cross_entropy(logits, targets):
  """logits [..., n, c], targets [n, c] -> [..., n]: sum_c -t_c log softmax(z)_c."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _std(sigma2):
  """sqrt(sigma2), whose gradient is 0, not nan, where sigma2 is 0 (or below the smallest normal
  float): sqrt's derivative is infinite at 0, and a variance head's softplus underflows to exactly
  0 once its input is below about -104, as it did for a confident answer late in an A-GCA run
  on easy-VQA (nan loss at step 2353). Equal to sqrt(sigma2) wherever sigma2 is a normal float."""
  return jnp.sqrt(jnp.maximum(sigma2, jnp.finfo(sigma2.dtype).tiny))


def _noisy_logits(logits, sigma2, noise):
  """[n, T, c]: z_n + sqrt(sigma2_n) noise[t, n], the samples on the middle axis.

  Why not [T, n, c]: the backward pass sums over the samples, and XLA:CPU sums over the leading
  axis of a large array about 10x slower than over an inner one (100 ms against 8 ms for
  [100, 32, 3000] on 2 cores). The transpose of the noise costs one copy.
  """
  return logits[:, None] + _std(sigma2)[:, None, None] * jnp.swapaxes(noise, 0, 1)


def _noisy_cross_entropy(logits, sigma2, targets, noise):
  """[T, n]: `_cross_entropy` of every noise sample of the logits (see `_noisy_logits`).

  As logsumexp(z + eps) - t.z - sqrt(sigma2) t.noise (for targets summing to 1; in general
  the logsumexp is weighted by sum_c t_c): the [n, T, c] log-probabilities are never formed.
  """
  lse = jax.nn.logsumexp(_noisy_logits(logits, sigma2, noise), axis=-1)  # [n, T]
  picked = (jnp.sum(targets * logits, axis=-1)[:, None]
            + _std(sigma2)[:, None] * jnp.einsum('tnc,nc->nt', noise, targets))
  return (jnp.sum(targets, axis=-1)[:, None] * lse - picked).T


def _entropy_from_log_probs(log_probs):
  """[..., c] -> [...]: -sum_c p log p; finite log_probs make p = 0 terms exactly 0."""
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


# --------------------------------------------------------------------------- aleatoric losses


def sample_noise(key, num_samples: int, logits_shape: tuple, dtype=jnp.float32):
  """Standard-normal draws `[num_samples, *logits_shape]` for the aleatoric losses: those of
  `jax.random.normal`, drawn 2-3x faster on CPU (`ucam_jax.threefry`)."""
  return threefry.normal(key, (num_samples, *logits_shape), dtype)


def aleatoric_loss(logits, sigma2, targets, noise, weights=None) -> dict:
  """The published aleatoric recipe (SPEC section 4), with the answer loss.

  With eps_t = sqrt(sigma2)[:, None] * noise[t] (so eps_t ~ N(0, sigma_n^2 I) per example):
    L_ud    = mean_n sum_c -t_nc log softmax(z_n)_c                 (the answer loss)
    L_d(t)  = mean_n sum_c -t_nc log softmax(z_n + eps_tn)_c        (a batch mean, one per t)
    L_gce   = mean_t L_d(t)
    L_var   = mean_t -ELU(L_ud - L_d(t))
    L_vd    = mean_n (exp(sigma2_n) - 1)                            (variance depressor)
    L_AU    = L_gce + L_var + L_vd;   total = L_ud + L_AU.

  Args:
    logits: [n, c].
    sigma2: [n] predicted variances, > 0.
    targets: [n, c] soft targets.
    noise: [T, n, c] standard-normal draws (`sample_noise`; T_a = 100 by default).
    weights: optional [n] example weights (0 for padding), used in every mean over n.

  Returns:
    Scalars {'total', 'answer' (L_ud), 'aleatoric' (L_AU), 'gce', 'variance', 'depressor'}.
  """
  _check_loss_args(logits, sigma2, targets, noise, weights)
  answer = _mean_over_examples(_cross_entropy(logits, targets), weights)
  distorted = _mean_over_examples(_noisy_cross_entropy(logits, sigma2, targets, noise),
                                  weights)  # [T]
  gce = jnp.mean(distorted)
  variance = jnp.mean(-jax.nn.elu(answer - distorted))
  depressor = _mean_over_examples(jnp.expm1(sigma2), weights)
  aleatoric = gce + variance + depressor
  return {'total': answer + aleatoric, 'answer': answer, 'aleatoric': aleatoric,
          'gce': gce, 'variance': variance, 'depressor': depressor}


def kendall_gal_loss(logits, sigma2, targets, noise, weights=None) -> dict:
  """Kendall & Gal (2017) per-example Monte Carlo likelihood, the alternative to the recipe.

    total = -mean_n sum_c t_nc log (1/T sum_t softmax(z_n + eps_tn)_c),
  eps_t as in `aleatoric_loss`, computed stably as logsumexp_t log_softmax(...) - log T.
  Same arguments as `aleatoric_loss`. Returns scalars {'total', 'answer'}; 'answer' is L_ud
  (the noise-free answer loss), reported for comparison and not part of 'total'.
  """
  _check_loss_args(logits, sigma2, targets, noise, weights)
  noisy = _noisy_logits(logits, sigma2, noise)  # [n, T, c]
  log_mean_probs = (jax.nn.logsumexp(jax.nn.log_softmax(noisy, axis=-1), axis=1)
                    - jnp.log(noise.shape[0]))
  total = _mean_over_examples(-jnp.sum(targets * log_mean_probs, axis=-1), weights)
  answer = _mean_over_examples(_cross_entropy(logits, targets), weights)
  return {'total': total, 'answer': answer}


TEMPERATURE_FLOOR = 1e-3


def temperature_loss(logits, sigma2, targets, noise=None, weights=None) -> dict:
  """Kendall, Gal & Cipolla (CVPR 2018): sigma2 as each example's softmax temperature,

    total = mean_n sum_c -t_nc log softmax(z_n / sigma2_n)_c.

  A proper per-example likelihood with no sampling (`noise` is accepted for a common signature
  and unused): a confident right answer wants sigma2 -> 0 (down to TEMPERATURE_FLOOR), a wrong
  one the temperature that best calibrates it, above 1 where the truth is the runner-up. Same other
  arguments as `aleatoric_loss`. Returns scalars {'total', 'answer'} ('answer' is L_ud, for
  comparison, not part of 'total').
  """
  _check_loss_args(logits, sigma2, targets, noise if noise is not None else logits[None],
                   weights)
  # A floor on the temperature: a right answer drives it toward 0 and a softplus head underflows
  # to exactly 0 (z / 0 is nan); below the floor the gradient is 0, so the head stops there.
  temperature = jnp.maximum(sigma2, TEMPERATURE_FLOOR)[:, None]
  total = _mean_over_examples(_cross_entropy(logits / temperature, targets), weights)
  answer = _mean_over_examples(_cross_entropy(logits, targets), weights)
  return {'total': total, 'answer': answer}


def cada_loss(logits, sigma2, targets, noise, weights=None) -> dict:
  """The Bayesian cross-entropy of CADA (Kurmi, Kumar & Namboodiri, CVPR 2019; the same lab's
  released training code), the published recipe's sibling:

    L_var   = L_ud * mean_t ELU(L_ud - L_d(t))      (+ELU, per draw, scaled by the answer loss)
    total   = L_ud + L_var + L_vd,

  L_ud, L_d(t) and L_vd as in `aleatoric_loss`. Since E[L_d(t)] >= L_ud, ELU's argument is
  mostly negative, so L_var rewards variance, more where the answer loss is high, and the
  depressor L_vd bounds it. Same arguments as `aleatoric_loss`. Returns scalars {'total',
  'answer' (L_ud), 'aleatoric' (L_var + L_vd), 'variance', 'depressor'}.
  """
  _check_loss_args(logits, sigma2, targets, noise, weights)
  answer = _mean_over_examples(_cross_entropy(logits, targets), weights)
  distorted = _mean_over_examples(_noisy_cross_entropy(logits, sigma2, targets, noise),
                                  weights)  # [T]
  variance = answer * jnp.mean(jax.nn.elu(answer - distorted))
  depressor = _mean_over_examples(jnp.expm1(sigma2), weights)
  return {'total': answer + variance + depressor, 'answer': answer,
          'aleatoric': variance + depressor, 'variance': variance, 'depressor': depressor}


ALEATORIC_LOSSES = {'published': aleatoric_loss, 'kendall_gal': kendall_gal_loss,
                    'temperature': temperature_loss, 'cada': cada_loss}


# --------------------------------------------------------------------------- MC dropout


def mc_dropout(answer_fn: Callable, key, num_samples: int, chunk_size: int | None = None):
  """Runs the dropout stage `num_samples` times, one dropout key each.

  Args:
    answer_fn: key -> (logits [n, c], sigma2 [n]) (any pytree of arrays works): the dropout
      stage once, closed over params and the features dropout does not touch.
    key: PRNG key; sample t uses `jax.random.split(key, num_samples)[t]`.
    num_samples: T.
    chunk_size: if given, run chunks of this many samples in sequence (`jax.lax.map`), so
      memory holds one chunk; must divide `num_samples`. Sample t gets the same key either
      way, so its dropout masks are bit-identical; its outputs agree to float round-off only
      (XLA may order a matmul's sums differently for a different batch of samples).

  Returns:
    answer_fn's outputs stacked on a leading axis: (sample_logits [T, n, c], sample_sigma2 [T, n]).
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be positive, got {num_samples}.')
  keys = jax.random.split(key, num_samples)
  if chunk_size is None:
    return jax.vmap(answer_fn)(keys)
  if chunk_size < 1 or num_samples % chunk_size:
    raise ValueError(f'chunk_size must be a positive divisor of num_samples={num_samples}, '
                     f'got {chunk_size}.')
  return jax.lax.map(answer_fn, keys, batch_size=chunk_size)


def chunk_size_within(num_samples: int, bytes_per_sample: int, budget_bytes: int) -> int:
  """A `chunk_size` for `mc_dropout` that bounds memory: the largest divisor of num_samples
  with chunk * bytes_per_sample <= budget_bytes, and 1 if none fits.

  bytes_per_sample: what one sample holds at once, e.g. its dropped-out copy of the features
  (at 14x14x2048 float32, 1.6 MB a question: 50 samples of 256 questions in one vmap is 20 GB).
  """
  fits = [c for c in range(1, num_samples + 1)
          if num_samples % c == 0 and c * bytes_per_sample <= budget_bytes]
  return max(fits, default=1)


def predictive_stats(sample_logits, sample_sigma2=None) -> dict:
  """Predictive uncertainty from T stochastic passes (natural log, entropies in nats).

  With p_t = softmax(sample_logits[t]) and p_bar = mean_t p_t, per example:
    'probs'               [n, c] p_bar
    'predictive_entropy'  H[p_bar] = -sum_c p_bar log p_bar
    'expected_entropy'    mean_t H[p_t]
    'mutual_information'  max(H[p_bar] - mean_t H[p_t], 0): >= 0 by Jensen, the clip removes
                          float round-off only (it is -1e-8 or so when the samples agree)
    'variation_ratio'     1 - (count over t of the modal argmax_c p_t) / T
    'sigma2'              mean_t sigma2_t (0 if sample_sigma2 is None)
    'predictive_variance' mean_c var_t(sample_logits) + mean_t sigma2_t (population variance)

  Args:
    sample_logits: [T, n, c].
    sample_sigma2: [T, n], or None for a model without a variance head.

  Returns:
    A dict of [n] arrays ('probs' is [n, c]).
  """
  _check_shape('sample_logits', sample_logits, (None, None, None))
  num_samples, n, c = sample_logits.shape
  if sample_sigma2 is None:
    sample_sigma2 = jnp.zeros((num_samples, n), sample_logits.dtype)
  _check_shape('sample_sigma2', sample_sigma2, (num_samples, n))
  # [n, T, c]: XLA:CPU reduces over a leading axis ~10x slower than over an inner one (see
  # `_noisy_logits`); one transposed copy makes every sum over samples an inner one.
  sample_logits = jnp.swapaxes(sample_logits, 0, 1)
  log_probs = jax.nn.log_softmax(sample_logits, axis=-1)
  log_mean_probs = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(num_samples)
  predictive = _entropy_from_log_probs(log_mean_probs)
  expected = jnp.mean(_entropy_from_log_probs(log_probs), axis=1)
  votes = jnp.sum(jax.nn.one_hot(jnp.argmax(sample_logits, axis=-1), c), axis=1)  # [n, c]
  sigma2 = jnp.mean(sample_sigma2, axis=0)
  return {
      'probs': jnp.exp(log_mean_probs),
      'predictive_entropy': predictive,
      'expected_entropy': expected,
      'mutual_information': jnp.maximum(predictive - expected, 0.0),
      'variation_ratio': 1.0 - jnp.max(votes, axis=-1) / num_samples,
      'sigma2': sigma2,
      'predictive_variance': jnp.mean(jnp.var(sample_logits, axis=1), axis=-1) + sigma2,
  }
