"""What the base models share: float32 where precision matters, the published per-cell L2
normalisation of grid features, and GCA's renormalisation of attention by a certainty map."""

import jax.numpy as jnp


def at_least_float32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalise_cells(features):
  """features [..., d] (any float dtype) -> float32, each cell divided by its L2 norm + 1e-8."""
  v = at_least_float32(features)
  return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)


def renormalise(attention, certainty):
  """attention [..., cells] (summing to 1), certainty None or broadcastable to it, >= 0 ->
  normalise(attention * certainty) over the cells; where that product is all zero (and with no
  certainty) the attention is kept."""
  if certainty is None:
    return attention
  masked = attention * certainty
  total = masked.sum(-1, keepdims=True)
  return jnp.where(total > 0, masked / jnp.where(total > 0, total, 1), attention)
