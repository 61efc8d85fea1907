"""Dropout whose mask costs as few random bits as its rate needs.

A keep mask of rate r = m / 2^k (k in 1, 2, 4, 8, 16) is exact from k random bits per element:
a k-bit field u is uniform on {0, ..., 2^k - 1}, and P(u >= m) = 1 - r. One 32-bit word then
masks 32 / k elements, so rate 0.5 draws 1/32 of the words that `flax.linen.Dropout` draws (it
compares a 32-bit uniform float per element). On CPU the threefry words were what dropout cost:
drawing one per element of a batch of 14x14x2048 grids took longer than the 2048 -> 512
projection that follows (docs/performance.md). Other rates draw one word per element, as flax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucam_jax import threefry

_FIELD_BITS = (1, 2, 4, 8, 16)  # Divisors of 32, so no field straddles two words.


def field_bits(rate: float) -> int | None:
  """The fewest bits k with rate * 2^k an integer (an exact mask from k bits), else None."""
  for k in _FIELD_BITS:
    if float(rate * 2 ** k).is_integer():
      return k
  return None


def keep_mask(key, rate: float, shape: tuple) -> jax.Array:
  """A bool mask of `shape`, each element True with probability 1 - rate, independently."""
  k = field_bits(rate)
  if k is None:
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  size = 1
  for s in shape:
    size *= s
  per_word = 32 // k
  words = threefry.bits(key, (-(-size // per_word),))  # jax.random.bits, faster on CPU.
  shifts = jnp.arange(0, 32, k, dtype=jnp.uint32)
  fields = (words[:, None] >> shifts) & jnp.uint32(2 ** k - 1)  # [words, per_word]
  keep = fields >= jnp.uint32(round(rate * 2 ** k))
  return keep.reshape(-1)[:size].reshape(shape)


class Dropout(nn.Module):
  """`flax.linen.Dropout` (inverted: kept elements scaled by 1 / (1 - rate)), drawing the mask
  with `keep_mask`. Same rng collection ('dropout'), same call."""
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng(self.rng_collection), self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
