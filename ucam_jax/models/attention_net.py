"""The published U-CAM base model (SPEC section 3): Kazemi & Elqursh 2017, "Show, Ask, Attend,
and Answer", on precomputed grid features, with the aleatoric variance head.

  image   grid features [n, 14, 14, 2048], each cell L2-normalised over its channels
  question  embedding 300 -> tanh -> LSTM 1024; q = the final *cell* state
  attention relu(conv1x1(drop(v)) + linear(drop(q))) -> drop -> conv1x1 to 2 glimpses,
            softmax over the 196 cells per glimpse; each glimpse pools v (2 x 2048)
  answer    [pooled; q] -> drop -> 1024 -> ReLU -> drop -> 3000 logits;
            sigma2 = softplus(Linear(logits -> 1))

The published model also drops out the word embeddings before the tanh. That dropout makes q
(and the LSTM) differ per MC sample, so a sample that includes it reruns the question encoder:
`encode_question(..., deterministic=False)` applies it, as `__call__(deterministic=False)` (the
published forward pass) and the 'full' MC scope (`config.ucam.mc_scope`, `gca.mc_sampler`) do.
Training and the 'answer' scope run the encoder deterministically, once, and share q.

The 1x1 convolutions are dense layers over the channel axis: under `jax.vmap` over MC keys the
2048 -> 512 projection of every sample, example and cell is one matmul. Dropout masks take one
random bit per element at rate 0.5 (`ucam_jax.models.dropout`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucam_jax.models import variance
from ucam_jax.models.common import at_least_float32, l2_normalise_cells, renormalise
from ucam_jax.models.dropout import Dropout

xavier = nn.initializers.xavier_uniform()


def _gate_xavier(gates: int):
  """Xavier-uniform per gate block of a [in, gates * hidden] kernel, as PyTorch's reference
  initialises each of the LSTM's four [hidden, in] chunks."""
  def init(key, shape, dtype=jnp.float32):
    blocks = jax.vmap(lambda k: xavier(k, (shape[0], shape[1] // gates), dtype))(
        jax.random.split(key, gates))
    return jnp.concatenate(list(blocks), axis=1)
  return init


def _lstm_forward(gates_in, w_hh, live):
  """The recurrence, and what its backward needs. gates_in [length, n, 4h] (x W_ih + b;
  float32 or wider: the gates and the state are computed in its dtype), w_hh [h, 4h] (h @ w_hh
  is computed in its dtype), live [length, n, 1] bool (t < length_n) ->
  ((c [n, h], hs [length, n, h]), residuals). Gates in the order i, f, g, o."""
  length, n, _ = gates_in.shape
  c = h = jnp.zeros((n, w_hh.shape[0]), gates_in.dtype)
  hs, h_prevs, c_prevs, acts, c_news = [], [], [], [], []
  for t in range(length):
    pre = gates_in[t] + (h.astype(w_hh.dtype) @ w_hh).astype(gates_in.dtype)
    i, f, g, o = jnp.split(pre, 4, axis=-1)
    i, f, g, o = nn.sigmoid(i), nn.sigmoid(f), jnp.tanh(g), nn.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    h_prevs.append(h)
    c_prevs.append(c)
    acts.append(jnp.concatenate([i, f, g, o], axis=-1))
    c_news.append(c_new)
    c, h = jnp.where(live[t], c_new, c), jnp.where(live[t], h_new, h)
    hs.append(jnp.where(live[t], h_new, 0))
  residuals = (jnp.stack(h_prevs), jnp.stack(c_prevs), jnp.stack(acts), jnp.stack(c_news),
               w_hh, live)
  return (c, jnp.stack(hs)), residuals


@jax.custom_vjp
def lstm_recurrence(gates_in, w_hh, live):
  """See `_lstm_forward`; the backward computes d w_hh as one matmul over every step."""
  return _lstm_forward(gates_in, w_hh, live)[0]


def _lstm_backward(residuals, cotangents):
  """Backpropagation through time, step by step for the state; then, with every step's gate
  gradients stacked, d w_hh = sum_t h_{t-1}^T d gates_t as one [h, length n] x [length n, 4h]
  matmul (autodiff of the loop makes one small matmul per step and sums them)."""
  h_prevs, c_prevs, acts, c_news, w_hh, live = residuals
  dc_final, dhs = cotangents
  length = h_prevs.shape[0]
  dc, dh = dc_final, jnp.zeros_like(h_prevs[0])
  d_gates = [None] * length
  for t in reversed(range(length)):
    i, f, g, o = jnp.split(acts[t], 4, axis=-1)
    tanh_c = jnp.tanh(c_news[t])
    dh_new = jnp.where(live[t], dh + dhs[t], 0)
    dc_new = jnp.where(live[t], dc, 0) + dh_new * o * (1 - tanh_c ** 2)
    d_pre = jnp.concatenate([dc_new * g * i * (1 - i), dc_new * c_prevs[t] * f * (1 - f),
                             dc_new * i * (1 - g ** 2), dh_new * tanh_c * o * (1 - o)], axis=-1)
    d_gates[t] = d_pre
    dc = dc_new * f + jnp.where(live[t], 0, dc)
    dh = ((d_pre.astype(w_hh.dtype) @ w_hh.T).astype(dh.dtype) + jnp.where(live[t], 0, dh))
  d_gates = jnp.stack(d_gates)  # [length, n, 4h]
  d_w = jnp.einsum('tnh,tng->hg', h_prevs.astype(w_hh.dtype), d_gates.astype(w_hh.dtype),
                   preferred_element_type=jnp.promote_types(w_hh.dtype, jnp.float32))
  return d_gates, d_w.astype(w_hh.dtype), None


lstm_recurrence.defvjp(lambda *args: _lstm_forward(*args), _lstm_backward)


class LSTM(nn.Module):
  """One-layer LSTM over padded sequences (gates i, f, g, o; zero biases, no peepholes).

  The input projection of every step is one matmul before the recurrence; the recurrence is
  unrolled over the (static, short) question length, so XLA's cost analysis, which counts a
  loop body once, counts every step; its backward (`lstm_recurrence`) takes the recurrent
  weights' gradient in one matmul.
  """
  features: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, lengths):
    """x: [n, length, d], lengths: [n] -> (c [n, features] final cell state,
    h [n, length, features] hidden states, 0 past each length). The state is float32."""
    length = x.shape[1]
    gates_in = nn.Dense(4 * self.features, kernel_init=_gate_xavier(4), dtype=self.dtype,
                        name='input')(x.swapaxes(0, 1))  # Time-major: [length, n, 4 features].
    w_hh = self.param('recurrent', _gate_xavier(4), (self.features, 4 * self.features))
    live = (jnp.arange(length)[:, None] < lengths[None, :])[..., None]
    c, hs = lstm_recurrence(at_least_float32(gates_in), w_hh.astype(self.dtype), live)
    return c, hs.swapaxes(0, 1)


class AttentionNet(nn.Module):
  """Show, Ask, Attend, and Answer with a variance head; the stages of `ucam_jax.models`.

  Sizes default to the published ones; tests shrink them.
  """
  vocab_size: int
  num_answers: int
  embed_dim: int = 300
  question_dim: int = 1024
  attention_dim: int = 512
  glimpses: int = 2
  classifier_dim: int = 1024
  dropout_rate: float = 0.5
  # Mixed precision: 'bfloat16' computes the matmuls in bfloat16. Parameters, the LSTM state,
  # the softmax of the attention and the logits (so the losses) stay float32.
  dtype: str = 'float32'
  variance_input: str = 'logits'  # The variance head reads: logits (published) | hidden (CADA).
  variance_hidden_dim: int = 0  # > 0: the variance head's own hidden ReLU layer (0: linear).

  def setup(self):
    dense = functools.partial(nn.Dense, kernel_init=xavier, dtype=self.dtype)
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=xavier,
                          dtype=self.dtype)
    self.lstm = LSTM(self.question_dim, self.dtype)
    self.image_proj = dense(self.attention_dim, use_bias=False)  # The 1x1 conv 2048 -> 512.
    self.question_proj = dense(self.attention_dim)
    # No bias: softmax over the cells ignores a per-glimpse constant (its gradient is round-off).
    self.glimpse_proj = dense(self.glimpses, use_bias=False)
    self.hidden = dense(self.classifier_dim)
    # No dtype: the logits (so the losses) are float32 under bfloat16, float64 under float64.
    self.classifier = nn.Dense(self.num_answers, kernel_init=xavier)
    self.variance = nn.Dense(1, kernel_init=xavier)  # The aleatoric variance head.
    self.variance_hidden = (nn.Dense(self.variance_hidden_dim, kernel_init=xavier)
                            if self.variance_hidden_dim else None)
    self.dropout = Dropout(self.dropout_rate)

  def encode_image(self, features):
    """features: [n, h, w, d] grid features (any float dtype) -> v [n, h, w, d] float32, each
    cell divided by its L2 norm + 1e-8 (as the reference; stored grids are normalised already,
    and normalising twice changes them only by float round-off)."""
    return l2_normalise_cells(features)

  def embed_question(self, tokens):
    """tokens: [n, length] int -> word embeddings e [n, length, embed_dim]."""
    return self.embed(tokens)

  def encode_question(self, e, lengths, *, deterministic: bool = True):
    """e: [n, length, embed_dim] (embed_question), lengths: [n] ->
    (q [n, question_dim] the LSTM's final cell state, words [n, length, question_dim]).

    e is exposed to `ucam_jax.explain` as the intermediate 'words'. deterministic=False drops
    out the embeddings before the tanh, as the published model does (see the module docstring).
    """
    e = self.perturb('words', e)
    self.sow('intermediates', 'words', e)
    return self.lstm(jnp.tanh(self.dropout(e, deterministic=deterministic)), lengths)

  def answer(self, v, q, certainty=None, *, deterministic: bool = True,
             detach_variance: bool = False):
    """v: [n, h, w, d], q: [n, question_dim] -> {'logits': [n, answers], 'sigma2': [n],
    'attention': [n, glimpses, h, w]}.

    certainty: optional [n, h, w] map >= 0 (GCA): each glimpse becomes
    normalise(attention * certainty); where that product is all zero the attention is kept.
    v is exposed to `ucam_jax.explain` as the intermediate 'grid'. sigma2 and detach_variance:
    see `ucam_jax.models.variance`.
    """
    v = self.perturb('grid', v)
    self.sow('intermediates', 'grid', v)
    n, h, w, d = v.shape
    v = v.reshape(n, h * w, d)
    drop = functools.partial(self.dropout, deterministic=deterministic)
    # Cast before dropout: under bfloat16 the masked copy of v (the largest tensor) is half size.
    x = nn.relu(self.image_proj(drop(v.astype(self.dtype)))
                + self.question_proj(drop(q))[:, None])  # [n, cells, attention_dim]
    scores = at_least_float32(self.glimpse_proj(drop(x)))  # [n, cells, glimpses]
    attention = jax.nn.softmax(scores, axis=1).transpose(0, 2, 1)  # [n, glimpses, cells]
    attention = renormalise(attention, None if certainty is None
                            else certainty.reshape(n, 1, h * w))
    pooled = jnp.einsum('ngc,ncd->ngd', attention, at_least_float32(v)).reshape(n, -1)
    combined = jnp.concatenate([pooled, at_least_float32(q)], axis=-1)
    hidden = nn.relu(self.hidden(drop(combined)))
    logits = self.classifier(drop(hidden))
    sigma2 = variance.sigma2(self.variance, logits, hidden, self.variance_input, detach_variance,
                             self.variance_hidden)
    return {'logits': logits, 'sigma2': sigma2,
            'attention': attention.reshape(n, self.glimpses, h, w)}

  def __call__(self, features, tokens, lengths, *, deterministic: bool = True):
    q, _ = self.encode_question(self.embed_question(tokens), lengths,
                                deterministic=deterministic)
    return self.answer(self.encode_image(features), q, deterministic=deterministic)
