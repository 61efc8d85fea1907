"""`jax.random.bits` and `jax.random.normal`, bit for bit, at compute speed on CPU.

On CPU, JAX lowers the threefry2x32 hash as a loop of 5 iterations over the whole array (to
keep compile times down), so a large draw is memory bound: 50-75 M normals/s on 2 cores, and
the aleatoric loss draws 300,000 per question (T_a = 100 samples of 3000 logits). Here the hash
is unrolled and the draw made in cache-sized chunks (a `lax.map`): each chunk is one fused,
vectorised loop, and the draw lands in one buffer that its consumers read (unrolled but not
chunked, XLA fuses the hash into every consumer and computes it again there). 2-3x the
throughput on CPU; other platforms keep JAX's own lowering (`lax.platform_dependent`).

Same values as jax.random: the counters, the hash and the bits-to-float steps are those of
jax's partitionable threefry (`jax_threefry_partitionable`, the default since JAX 0.5). Keys of
another implementation, that flag off, other dtypes or arrays of 2^32 or more elements take
jax.random itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CHUNK = 1 << 16  # Elements per chunk: the chunk's temporaries stay in the L2 cache.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
  """The threefry2x32 block cipher (20 rounds) of jax.random, unrolled; all uint32."""
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x1, x2


def _key_words(key):
  """(k1, k2) uint32 of a threefry key (typed or raw uint32[2]), or None for another kind."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != 'threefry2x32':
      return None
    key = jax.random.key_data(key)
  elif jax.config.jax_default_prng_impl != 'threefry2x32':
    return None
  return key[..., 0], key[..., 1]


def _fast_path(key, shape) -> bool:
  return (jax.config.jax_threefry_partitionable and _key_words(key) is not None
          and key.ndim == (0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1)
          and math.prod(shape) < 2 ** 32)


def _chunked(key, shape, from_bits):
  """from_bits(uint32 words of one chunk) for every chunk of the flat draw, reshaped."""
  k1, k2 = _key_words(key)
  size = math.prod(shape)
  chunk = min(CHUNK, size)

  def one(start):
    counts = start + jnp.arange(chunk, dtype=jnp.uint32)
    b1, b2 = threefry2x32(k1, k2, jnp.zeros_like(counts), counts)
    return from_bits(b1 ^ b2)  # 32-bit draws of partitionable threefry: the halves' xor.

  starts = jnp.arange(0, size, chunk, dtype=jnp.uint32)
  return lax.map(one, starts).reshape(-1)[:size].reshape(shape)


def bits(key, shape) -> jax.Array:
  """`jax.random.bits(key, shape, jnp.uint32)`, the same values."""
  shape = tuple(shape)
  if not _fast_path(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)
  return lax.platform_dependent(
      key, cpu=lambda key: _chunked(key, shape, lambda b: b),
      default=lambda key: jax.random.bits(key, shape, jnp.uint32))


def _normal_from_bits(b):
  """jax.random.normal's float32 transform: a uniform on (-1, 1) from 23 mantissa bits, then
  sqrt(2) erfinv."""
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  floats = lax.bitcast_convert_type((b >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                    jnp.float32) - np.float32(1.0)
  u = lax.max(lo, floats * (np.float32(1.0) - lo) + lo)
  return np.float32(np.sqrt(2)) * lax.erf_inv(u)


def normal(key, shape, dtype=jnp.float32) -> jax.Array:
  """`jax.random.normal(key, shape, dtype)`, the same values."""
  shape = tuple(shape)
  if jnp.dtype(dtype) != jnp.float32 or not _fast_path(key, shape):
    return jax.random.normal(key, shape, dtype)
  return lax.platform_dependent(
      key, cpu=lambda key: _chunked(key, shape, _normal_from_bits),
      default=lambda key: jax.random.normal(key, shape, dtype))
