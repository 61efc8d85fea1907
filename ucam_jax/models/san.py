"""Stacked Attention Networks (Yang et al., CVPR 2016) with a small conv stem for raw images."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucam_jax.models import stem, variance
from ucam_jax.models.common import at_least_float32, renormalise


class AttentionHop(nn.Module):
  """One SAN hop: attend over the grid with query u, return u + attended features."""
  dim: int
  dtype: str = 'float32'  # Computation; parameters are float32.

  @nn.compact
  def __call__(self, v, u, certainty=None):
    """v: [batch, cells, d], u: [batch, d] -> (u' [batch, d], attention [batch, cells]).

    certainty: optional [batch, cells] map >= 0 (GCA): the attention becomes
    normalise(attention * certainty); where that product is all zero the attention is kept.
    """
    h = jnp.tanh(nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name='image')(v)
                 + nn.Dense(self.dim, dtype=self.dtype, name='query')(u)[:, None])
    # No bias on the score: softmax ignores it, so its gradient would be pure round-off.
    score = nn.Dense(1, use_bias=False, dtype=self.dtype, name='score')(h)[..., 0]
    attention = jax.nn.softmax(at_least_float32(score), axis=-1)  # bfloat16 keeps 3 digits.
    attention = renormalise(attention, certainty)
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
  # Mixed precision: 'bfloat16' computes the layers in bfloat16 (TPU, recent GPUs). Parameters,
  # the LSTM state and the logits (so the losses) stay float32.
  dtype: str = 'float32'
  variance_input: str = 'logits'  # The variance head reads: logits (published) | hidden (CADA).
  variance_hidden_dim: int = 0  # > 0: the variance head's own hidden ReLU layer (0: linear).

  def setup(self):
    self.stem = stem.convs(self.stem_features, self.grid_convs, self.dtype)
    self.image_proj = nn.Dense(self.hidden_dim, dtype=self.dtype)
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    # The carry is created in param_dtype and stays so: gates in dtype, state in float32 (float64
    # when dtype is float64, for gradient checks).
    cell = nn.OptimizedLSTMCell(self.hidden_dim, dtype=self.dtype,
                                param_dtype=jnp.promote_types(self.dtype, jnp.float32))
    self.lstm = nn.RNN(cell, return_carry=True)
    self.hops = [AttentionHop(self.attention_dim, self.dtype) for _ in range(self.num_hops)]
    self.dropout = nn.Dropout(self.dropout_rate)
    # A hidden layer: a linear read-out of u = q + attended v cannot test whether the colour or
    # shape asked about equals the one seen (the yes/no questions).
    self.hidden = nn.Dense(self.classifier_dim, dtype=self.dtype)
    # No dtype: the logits (so the losses) are float32 under bfloat16, float64 under float64.
    self.classifier = nn.Dense(self.num_answers)
    self.variance = nn.Dense(1)  # The aleatoric variance head (SPEC section 3).
    self.variance_hidden = (nn.Dense(self.variance_hidden_dim)
                            if self.variance_hidden_dim else None)

  def encode_image(self, images):
    """images: [batch, H, W, 3] uint8 -> v: [batch, H/2^k, W/2^k, hidden_dim], k stride-2 convs
    (`ucam_jax.models.stem.grid`)."""
    return stem.grid(self.stem, self.image_proj, images)

  def embed_question(self, tokens):
    """tokens: [batch, length] int -> word embeddings e [batch, length, embed_dim]."""
    return self.embed(tokens)

  def encode_question(self, e, lengths, *, deterministic: bool = True):
    """e: [batch, length, embed_dim] (embed_question), lengths: [batch] ->
    (q [batch, d], words [batch, length, d]).

    e is exposed to `ucam_jax.explain` as the intermediate 'words': a map over it weights the
    question's words. deterministic=False drops out the word embeddings (the 'full' MC scope,
    `config.ucam.mc_scope`; training runs the encoder deterministically).
    """
    e = self.perturb('words', e)
    self.sow('intermediates', 'words', e)
    e = self.dropout(e, deterministic=deterministic)
    (_, q), words = self.lstm(e, seq_lengths=lengths)
    return q, words

  def answer(self, v, q, certainty=None, *, deterministic: bool = True,
             detach_variance: bool = False):
    """v: [batch, h, w, d], q: [batch, d] -> {'logits': [batch, answers], 'sigma2': [batch],
    'attention': [batch, hops, h, w]}.

    certainty: optional [batch, h, w] map >= 0 that multiplies every hop's attention (GCA).
    v is exposed to `ucam_jax.explain` as the intermediate 'grid' (perturb + sow), so Grad-CAM
    and U-CAM maps are taken with respect to it. sigma2 = softplus(Linear(logits or hidden))
    is the per-example aleatoric variance (`ucam_jax.models.variance`); detach_variance stops
    the gradient at the head's input.
    """
    v = self.perturb('grid', v)
    self.sow('intermediates', 'grid', v)
    batch, h, w, d = v.shape
    v = self.dropout(v, deterministic=deterministic).reshape(batch, h * w, d)
    u = self.dropout(q, deterministic=deterministic)
    if certainty is not None:
      certainty = certainty.reshape(batch, h * w)
    maps = []
    for hop in self.hops:
      u, attention = hop(v, u, certainty)
      maps.append(attention.reshape(batch, h, w))
    hidden = self.hidden(self.dropout(u, deterministic=deterministic))
    hidden = nn.relu(hidden)
    logits = self.classifier(self.dropout(hidden, deterministic=deterministic))
    sigma2 = variance.sigma2(self.variance, logits, hidden, self.variance_input, detach_variance,
                             self.variance_hidden)
    return {'logits': logits, 'sigma2': sigma2, 'attention': jnp.stack(maps, axis=1)}

  def __call__(self, images, tokens, lengths, *, deterministic: bool = True):
    q, _ = self.encode_question(self.embed_question(tokens), lengths,
                                deterministic=deterministic)
    return self.answer(self.encode_image(images), q, deterministic=deterministic)
