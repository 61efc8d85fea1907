"""Stacked Attention Networks (Yang et al., CVPR 2016) with a small conv stem for raw images."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class AttentionHop(nn.Module):
  """One SAN hop: attend over the grid with query u, return u + attended features."""
  dim: int

  @nn.compact
  def __call__(self, v, u):
    """v: [batch, cells, d], u: [batch, d] -> (u' [batch, d], attention [batch, cells])."""
    h = jnp.tanh(nn.Dense(self.dim, use_bias=False, name='image')(v)
                 + nn.Dense(self.dim, name='query')(u)[:, None])
    # No bias on the score: softmax ignores it, so its gradient would be pure round-off.
    attention = jax.nn.softmax(nn.Dense(1, use_bias=False, name='score')(h)[..., 0], axis=-1)
    return u + jnp.einsum('bn,bnd->bd', attention, v), attention


class SAN(nn.Module):
  vocab_size: int
  num_answers: int
  stem_features: Sequence[int] = (16, 32, 64)
  grid_convs: int = 1
  embed_dim: int = 64
  hidden_dim: int = 128
  attention_dim: int = 64
  num_hops: int = 2
  classifier_dim: int = 256
  dropout_rate: float = 0.2

  def setup(self):
    # Stride-2 convs down to the grid, then stride-1 convs on the grid, which widen what each
    # cell sees (receptive field 15 -> 31 pixels with three + one) at little cost.
    self.stem = ([nn.Conv(f, (3, 3), strides=2, name=f'conv{i}')
                  for i, f in enumerate(self.stem_features)]
                 + [nn.Conv(self.stem_features[-1], (3, 3), name=f'grid_conv{i}')
                    for i in range(self.grid_convs)])
    self.image_proj = nn.Dense(self.hidden_dim)
    self.embed = nn.Embed(self.vocab_size, self.embed_dim)
    self.lstm = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim), return_carry=True)
    self.hops = [AttentionHop(self.attention_dim) for _ in range(self.num_hops)]
    self.dropout = nn.Dropout(self.dropout_rate)
    # A hidden layer: a linear read-out of u = q + attended v cannot test whether the colour or
    # shape asked about equals the one seen (the yes/no questions).
    self.hidden = nn.Dense(self.classifier_dim)
    self.classifier = nn.Dense(self.num_answers)
    self.variance = nn.Dense(1)  # The aleatoric variance head (SPEC section 3).

  def encode_image(self, images):
    """images: [batch, H, W, 3] uint8 -> v: [batch, H/2^k, W/2^k, hidden_dim], k stride-2 convs.

    Each image's mean colour is subtracted first: a uniform background of any colour becomes ~0,
    so the cells that hold an object stand out and attention learns to single them out (without
    it, easy-VQA attention stays near uniform and yes/no questions stay at their prior for epochs).
    """
    x = images.astype(jnp.float32) / 255.0
    x = x - x.mean(axis=(1, 2), keepdims=True)
    for conv in self.stem:
      x = nn.relu(conv(x))
    return jnp.tanh(self.image_proj(x))

  def encode_question(self, tokens, lengths):
    """tokens: [batch, length] int, lengths: [batch] -> (q [batch, d], words [batch, length, d])."""
    (_, q), words = self.lstm(self.embed(tokens), seq_lengths=lengths)
    return q, words

  def answer(self, v, q, *, deterministic: bool = True):
    """v: [batch, h, w, d], q: [batch, d] -> {'logits': [batch, answers], 'sigma2': [batch],
    'attention': [batch, hops, h, w]}.

    v is exposed to `ucam_jax.explain` as the intermediate 'grid' (perturb + sow), so Grad-CAM
    and U-CAM maps are taken with respect to it. sigma2 = softplus(Linear(logits)) is the
    per-example aleatoric variance.
    """
    v = self.perturb('grid', v)
    self.sow('intermediates', 'grid', v)
    batch, h, w, d = v.shape
    v = self.dropout(v, deterministic=deterministic).reshape(batch, h * w, d)
    u = self.dropout(q, deterministic=deterministic)
    maps = []
    for hop in self.hops:
      u, attention = hop(v, u)
      maps.append(attention.reshape(batch, h, w))
    hidden = self.hidden(self.dropout(u, deterministic=deterministic))
    hidden = nn.relu(hidden)
    logits = self.classifier(self.dropout(hidden, deterministic=deterministic))
    sigma2 = nn.softplus(self.variance(logits)[:, 0])
    return {'logits': logits, 'sigma2': sigma2, 'attention': jnp.stack(maps, axis=1)}

  def __call__(self, images, tokens, lengths, *, deterministic: bool = True):
    q, _ = self.encode_question(tokens, lengths)
    return self.answer(self.encode_image(images), q, deterministic=deterministic)
