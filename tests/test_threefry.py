"""ucam_jax.threefry: the same values as jax.random, for every kind of key and shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucam_jax import threefry

SHAPES = [(7,), (3, 100_001), (2, threefry.CHUNK), (4, 5, 6)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('make_key', [jax.random.key, jax.random.PRNGKey])
def test_bits_and_normal_are_jax_randoms(shape, make_key):
  key = make_key(3)
  np.testing.assert_array_equal(jax.jit(lambda k: threefry.bits(k, shape))(key),
                                jax.random.bits(key, shape, jnp.uint32))
  np.testing.assert_array_equal(jax.jit(lambda k: threefry.normal(k, shape))(key),
                                jax.random.normal(key, shape))


def test_the_cipher_is_jaxs():
  rng = np.random.default_rng(0)
  k1, k2, x1, x2 = (rng.integers(0, 2 ** 32, 1000, dtype=np.uint32) for _ in range(4))
  from jax._src.random.threefry2x32 import threefry2x32_p  # The primitive jax.random uses.
  want = jax.vmap(lambda *a: threefry2x32_p.bind(*a))(k1, k2, x1, x2)
  got = threefry.threefry2x32(k1, k2, x1, x2)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_vmapped_keys_and_other_cases_fall_back_or_agree():
  keys = jax.random.split(jax.random.key(1), 3)
  np.testing.assert_array_equal(
      jax.jit(jax.vmap(lambda k: threefry.normal(k, (5, 70_000))))(keys),
      jax.vmap(lambda k: jax.random.normal(k, (5, 70_000)))(keys))
  rbg = jax.random.key(2, impl='rbg')  # Another implementation: jax.random itself.
  np.testing.assert_array_equal(threefry.normal(rbg, (3, 4)), jax.random.normal(rbg, (3, 4)))
  key = jax.random.key(4)
  np.testing.assert_array_equal(threefry.normal(key, (3, 4), jnp.bfloat16),
                                jax.random.normal(key, (3, 4), jnp.bfloat16))
