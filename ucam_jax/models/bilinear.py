"""Bilinear-pooling VQA models with glimpse attention over the grid, in the staged contract of
`ucam_jax.models`, so U-CAM's recipe can be tried on more than one base model:

  MCB  (Fukui et al., EMNLP 2016, multimodal compact bilinear pooling)
       attention  per cell z = MCB(drop(v_cell), drop(q)) to sketch_dim, signed sqrt, L2 norm;
                  1x1 conv -> attention_dim, ReLU, drop, 1x1 conv -> glimpses; softmax over cells
       answer     MCB(drop([pooled glimpses]), drop(q)), signed sqrt, L2 norm -> drop -> answers
  MLB  (Kim et al., ICLR 2017, low-rank bilinear pooling with the Hadamard product)
       attention  tanh(V drop(v_cell)) * tanh(U drop(q)) (attention_dim) -> drop -> 1x1 conv ->
                  glimpses; softmax over cells
       answer     tanh(V' drop(pooled)) * tanh(U' drop(q)) (joint_dim) -> drop -> answers

Shared: the question as the published base model reads it (embedding -> tanh -> LSTM,
`attention_net.LSTM`), q its final hidden state, as both papers; the image as grid features, each
cell L2-normalised (stem_features empty), or raw images through SAN's conv stem
(`ucam_jax.models.stem`); the glimpses' attended features concatenated; the variance head
(`ucam_jax.models.variance`) on the logits or on the fused vector ('hidden'). As in
`attention_net`, dropout lives only in `answer` (so MC samples share the encoders), and a
certainty map (GCA) renormalises every glimpse.

MCB's count sketches (Charikar et al. 2002) are random tables, a bucket h(i) and a sign s(i) per
input dimension, drawn at init and stored as parameters ('sketch_hash', 'sketch_sign'), so a
checkpoint holds them: they get no gradient (stop_gradient) and `train.make_optimizer` leaves
them out (`models.FIXED_PARAMS`). The compact bilinear pooling of x and y is the count sketch of
vec(x y^T) under the bucket h_x(i) + h_y(j) mod sketch_dim and the sign s_x(i) s_y(j); that is
the circular convolution of the two sketches, computed with real FFTs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucam_jax.models import stem, variance
from ucam_jax.models.common import at_least_float32, l2_normalise_cells, renormalise
from ucam_jax.models.attention_net import LSTM
from ucam_jax.models.dropout import Dropout

xavier = nn.initializers.xavier_uniform()

SIGNED_SQRT_EPS = 1e-6  # x / sqrt(|x| + eps): sign(x) sqrt(|x|) with a finite gradient at 0.


def count_sketch(x, index, sign, dim: int):
  """x [..., d], index [d] int in [0, dim), sign [d] +-1 -> [..., dim]:
  y_j = sum_{i: index_i = j} sign_i x_i."""
  return jnp.zeros((*x.shape[:-1], dim), x.dtype).at[..., index].add(x * sign)


def circular_convolution(a, b):
  """a [..., dim], b (broadcastable) -> [..., dim]: c_k = sum_{i + j = k mod dim} a_i b_j, by
  real FFTs (float32 or wider)."""
  a, b = at_least_float32(a), at_least_float32(b)
  dim = a.shape[-1]
  return jnp.fft.irfft(jnp.fft.rfft(a) * jnp.fft.rfft(b), n=dim)


def signed_sqrt_l2(z):
  """z [..., k] -> sign(z) sqrt(|z|) (smoothed at 0, SIGNED_SQRT_EPS), then L2-normalised."""
  z = z * jax.lax.rsqrt(jnp.abs(z) + SIGNED_SQRT_EPS)
  return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)


class CountSketch(nn.Module):
  """x [..., d] -> its count sketch [..., dim] under a random table drawn at init.

  The tables are parameters that do not train: 'sketch_hash' (the buckets, integers held
  exactly in float32, since gradients of a pytree of parameters need float leaves) and
  'sketch_sign' (+-1).
  """
  dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    index = self.param('sketch_hash', lambda key, shape: jax.random.randint(
        key, shape, 0, self.dim).astype(jnp.float32), (d,))
    sign = self.param('sketch_sign', lambda key, shape: jax.random.rademacher(
        key, shape, jnp.float32), (d,))
    index = jax.lax.stop_gradient(index).astype(jnp.int32)
    return count_sketch(at_least_float32(x), index, jax.lax.stop_gradient(sign), self.dim)


class CompactBilinear(nn.Module):
  """MCB(x, y) = the circular convolution of their count sketches: x [..., dx], y [..., dy]
  (broadcastable batch axes) -> [..., dim]. y's sketch is transformed once however many x
  rows share it (the grid's cells)."""
  dim: int

  def setup(self):
    self.sketch_x = CountSketch(self.dim)
    self.sketch_y = CountSketch(self.dim)

  def __call__(self, x, y):
    return circular_convolution(self.sketch_x(x), self.sketch_y(y))


class GlimpseVQA(nn.Module):
  """What MCB and MLB share: the encoders and the answer stage around two hooks, `attend`
  (the per-cell joint features that score the glimpses) and `fuse` (the joint vector the
  classifier reads). Sizes default to the published ones; configs shrink them."""
  vocab_size: int
  num_answers: int
  embed_dim: int = 300
  question_dim: int = 1024
  glimpses: int = 2
  dropout_rate: float = 0.5
  # () reads grid features [n, h, w, d]; otherwise raw uint8 images through SAN's conv stem
  # with these widths, then a dense layer to image_dim.
  stem_features: tuple = ()
  grid_convs: int = 1
  image_dim: int = 64
  # Mixed precision: 'bfloat16' computes the matmuls in bfloat16. Parameters, the LSTM state,
  # the count sketches and FFTs, the softmax of the attention and the logits stay float32.
  dtype: str = 'float32'
  variance_input: str = 'logits'  # The variance head reads: logits (published) | hidden.
  variance_hidden_dim: int = 0  # > 0: the variance head's own hidden ReLU layer (0: linear).

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=xavier,
                          dtype=self.dtype)
    self.lstm = LSTM(self.question_dim, self.dtype)
    if self.stem_features:
      self.stem = stem.convs(self.stem_features, self.grid_convs, self.dtype)
      self.image_proj = nn.Dense(self.image_dim, dtype=self.dtype)
    # No bias: softmax over the cells ignores a per-glimpse constant (its gradient is round-off).
    self.glimpse_proj = self._dense(self.glimpses, use_bias=False)
    # No dtype: the logits (so the losses) are float32 under bfloat16, float64 under float64.
    self.classifier = nn.Dense(self.num_answers, kernel_init=xavier)
    self.variance = nn.Dense(1, kernel_init=xavier)  # The aleatoric variance head.
    self.variance_hidden = (nn.Dense(self.variance_hidden_dim, kernel_init=xavier)
                            if self.variance_hidden_dim else None)
    self.dropout = Dropout(self.dropout_rate)

  def _dense(self, features: int, **kwargs) -> nn.Dense:
    return nn.Dense(features, kernel_init=xavier, dtype=self.dtype, **kwargs)

  def encode_image(self, images):
    """Grid features [n, h, w, d] (any float dtype) -> v [n, h, w, d] float32, each cell divided
    by its L2 norm + 1e-8; or, with stem_features, uint8 images [n, H, W, 3] -> v
    [n, H/2^k, W/2^k, image_dim] (`stem.grid`)."""
    if self.stem_features:
      return stem.grid(self.stem, self.image_proj, images)
    return l2_normalise_cells(images)

  def embed_question(self, tokens):
    """tokens: [n, length] int -> word embeddings e [n, length, embed_dim]."""
    return self.embed(tokens)

  def encode_question(self, e, lengths, *, deterministic: bool = True):
    """e: [n, length, embed_dim] (embed_question), lengths: [n] >= 1 ->
    (q [n, question_dim] the LSTM's last hidden state, words [n, length, question_dim]).

    e is exposed to `ucam_jax.explain` as the intermediate 'words'. deterministic=False drops
    out the embeddings before the tanh, as the attention network does (the 'full' MC scope).
    """
    e = self.perturb('words', e)
    self.sow('intermediates', 'words', e)
    _, words = self.lstm(jnp.tanh(self.dropout(e, deterministic=deterministic)), lengths)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    return jnp.take_along_axis(words, last, axis=1)[:, 0], words

  def attend(self, v, q):
    """v [n, cells, d] (dropped out), q [n, question_dim] (dropped out) -> [n, cells, k]."""
    raise NotImplementedError

  def fuse(self, pooled, q):
    """pooled [n, glimpses * d], q [n, question_dim] (both dropped out) -> [n, k]."""
    raise NotImplementedError

  def answer(self, v, q, certainty=None, *, deterministic: bool = True,
             detach_variance: bool = False):
    """v: [n, h, w, d], q: [n, question_dim] -> {'logits': [n, answers], 'sigma2': [n],
    'attention': [n, glimpses, h, w]}.

    certainty: optional [n, h, w] map >= 0 (GCA): each glimpse becomes
    normalise(attention * certainty); where that product is all zero the attention is kept.
    v is exposed to `ucam_jax.explain` as the intermediate 'grid'. sigma2 and detach_variance:
    see `ucam_jax.models.variance`; its 'hidden' input is the fused vector.
    """
    v = self.perturb('grid', v)
    self.sow('intermediates', 'grid', v)
    n, h, w, d = v.shape
    v = v.reshape(n, h * w, d)
    drop = functools.partial(self.dropout, deterministic=deterministic)
    joint = self.attend(drop(v.astype(self.dtype)), drop(q))
    scores = at_least_float32(self.glimpse_proj(drop(joint)))  # [n, cells, glimpses]
    attention = jax.nn.softmax(scores, axis=1).transpose(0, 2, 1)  # [n, glimpses, cells]
    attention = renormalise(attention, None if certainty is None
                            else certainty.reshape(n, 1, h * w))
    pooled = jnp.einsum('ngc,ncd->ngd', attention, at_least_float32(v)).reshape(n, -1)
    hidden = self.fuse(drop(pooled), drop(q))
    logits = self.classifier(drop(hidden))
    sigma2 = variance.sigma2(self.variance, logits, hidden, self.variance_input, detach_variance,
                             self.variance_hidden)
    return {'logits': logits, 'sigma2': sigma2,
            'attention': attention.reshape(n, self.glimpses, h, w)}

  def __call__(self, images, tokens, lengths, *, deterministic: bool = True):
    q, _ = self.encode_question(self.embed_question(tokens), lengths,
                                deterministic=deterministic)
    return self.answer(self.encode_image(images), q, deterministic=deterministic)


class MCB(GlimpseVQA):
  """Multimodal compact bilinear pooling with MCB attention (Fukui et al. 2016)."""
  HAS_FIXED_PARAMS = True  # The count sketches' tables (`models.FIXED_PARAMS`).
  sketch_dim: int = 16_000
  attention_dim: int = 512

  def setup(self):
    super().setup()
    self.attention_pooling = CompactBilinear(self.sketch_dim)
    self.attention_proj = self._dense(self.attention_dim)
    self.answer_pooling = CompactBilinear(self.sketch_dim)

  def attend(self, v, q):
    z = signed_sqrt_l2(self.attention_pooling(v, q[:, None]))  # [n, cells, sketch_dim]
    return nn.relu(self.attention_proj(z.astype(self.dtype)))

  def fuse(self, pooled, q):
    return signed_sqrt_l2(self.answer_pooling(pooled, q))


class MLB(GlimpseVQA):
  """Low-rank bilinear pooling with the Hadamard product and MLB attention (Kim et al. 2017)."""
  attention_dim: int = 1200
  joint_dim: int = 1200

  def setup(self):
    super().setup()
    self.attention_image = self._dense(self.attention_dim)
    self.attention_question = self._dense(self.attention_dim)
    self.joint_image = self._dense(self.joint_dim)
    self.joint_question = self._dense(self.joint_dim)

  def attend(self, v, q):
    return (jnp.tanh(self.attention_image(v))
            * jnp.tanh(self.attention_question(q))[:, None])

  def fuse(self, pooled, q):
    return at_least_float32(jnp.tanh(self.joint_image(pooled))
                            * jnp.tanh(self.joint_question(q)))
