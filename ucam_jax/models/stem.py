"""The small conv stem that reads raw images into a grid, for models on small raw-image datasets
(SAN; MCB and MLB when they are not given precomputed grid features)."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def convs(features: Sequence[int], grid_convs: int, dtype) -> list[nn.Conv]:
  """Stride-2 3x3 convs down to the grid, then `grid_convs` stride-1 convs on the grid, which
  widen what each cell sees (receptive field 15 -> 31 pixels with three + one) at little cost.
  Built in a module's `setup`; named conv<i> and grid_conv<i>."""
  return ([nn.Conv(f, (3, 3), strides=2, dtype=dtype, name=f'conv{i}')
           for i, f in enumerate(features)]
          + [nn.Conv(features[-1], (3, 3), dtype=dtype, name=f'grid_conv{i}')
             for i in range(grid_convs)])


def grid(stem: Sequence[nn.Module], image_proj: nn.Module, images):
  """images: [batch, H, W, 3] uint8 -> v: [batch, H/2^k, W/2^k, d] in (-1, 1), k stride-2 convs,
  d the features of `image_proj` (a Dense layer).

  Each image's mean colour is subtracted first: a uniform background of any colour becomes ~0,
  so the cells that hold an object stand out and attention learns to single them out (without
  it, easy-VQA attention stays near uniform and yes/no questions stay at their prior for epochs).
  """
  x = images.astype(jnp.float32) / 255.0
  x = x - x.mean(axis=(1, 2), keepdims=True)
  for conv in stem:
    x = nn.relu(conv(x))
  return jnp.tanh(image_proj(x))
