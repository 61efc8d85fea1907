"""Certainty gradients and gradient-based certainty attention, GCA (SPEC section 5).

One forward pass of a staged VQA model (see `ucam_jax.models`) under `config.ucam`:

  mode 'none'       the baseline: the answer loss only.
  mode 'loss_only'  answer loss + U, where U is the aleatoric uncertainty L_AU (the published
                    recipe, the Kendall & Gal likelihood, the temperature likelihood or CADA's
                    form; `uncertainty_term`), the predictive one L_PU (the same loss with sigma^2
                    replaced by the MC-dropout predictive variance), or both.
  mode 'mask'       GCA: the certainty gradients -dU/dv (image grid) and -dU/de (word embeddings),
                    U taken with the model's own answer as its target (never the true answer,
                    which the maps would otherwise pass on to the second pass),
                    give certainty maps M = ReLU(sum_k mean(-dU/dA)_k A_k), normalised to [0, 1]
                    (the U-CAM weighting of `ucam_jax.explain`); the answer stage runs again with
                    them: every attention hop's alpha becomes normalise(alpha * M_v) ('multiply'),
                    or v becomes v * (1 + M_v) ('residual'); the words become e * M_q or
                    e * (1 + M_q). The loss is the answer loss + U, both of the second pass.
                    'first' order stops the gradient at dU/dA; 'second' differentiates through it.
                    Two more switches of the map itself: sign 'uncertainty' weights the channels
                    by +dU/dA instead of the certainty gradient, and normalisation 'min_max'
                    rescales the map's [min, max] to [0, 1] instead of ReLU and max.

The switches of CADA (the same lab's released sibling method) and of the uncertainty's training:
map_source 'variance' differentiates the predicted variance instead of U; map_weighting
'elementwise' keeps each position's own gradient; normalisation 'softmax'; variance_factor scales
each map by clip(1 - variance, 0, 1); map_gradient 'stop' holds the maps fixed in the loss (they
depend on A even at first order). variance_detach stops sigma2's gradient at the variance head's
input; uncertainty_trains 'variance_head' holds the logits fixed in U; uncertainty_weight scales
U in the loss; predictive_variance 'normalised' bounds L_PU; mc_scope 'full' draws the MC-dropout
samples (of L_PU here, of the evaluation's predictive statistics) with every dropout of the
model, the word embeddings' included, instead of the answer stage's alone ('answer'). The maps always see every path of
their source (no detach): they are gradients with respect to the features, not the parameters.

The same function serves training (dropout on) and evaluation (dropout off): the maps, and so
the answers, depend on the input only; the targets enter the loss terms alone.
"""

import jax
import jax.numpy as jnp
import optax

from ucam_jax import uncertainty

SWITCHES = {
    'mode': ('none', 'loss_only', 'mask'),
    'uncertainty': ('aleatoric', 'predictive', 'both'),
    'branch': ('image', 'question', 'both'),
    'combine': ('multiply', 'residual'),
    'order': ('first', 'second'),
    'sign': ('certainty', 'uncertainty'),
    'normalisation': ('max', 'min_max', 'softmax'),
    'aleatoric_loss': tuple(uncertainty.ALEATORIC_LOSSES),
    'map_source': ('uncertainty', 'variance'),
    'map_weighting': ('gradcam', 'elementwise'),
    'map_gradient': ('through', 'stop'),
    'predictive_variance': ('raw', 'normalised'),
    'variance_optimizer': ('main', 'sgd'),
    'uncertainty_trains': ('all', 'variance_head'),
    'mc_scope': ('answer', 'full'),
}


def check_config(ucam) -> None:
  """Raises ValueError naming a `config.ucam` switch whose value is not one of its choices, or a
  number out of its range."""
  for key, choices in SWITCHES.items():
    if ucam[key] not in choices:
      raise ValueError(f'config.ucam.{key} is {ucam[key]!r}; choose one of {list(choices)}.')
  for key in ('aleatoric_samples', 'predictive_samples'):
    if ucam[key] < 1:
      raise ValueError(f'config.ucam.{key} must be at least 1, got {ucam[key]}.')
  if not 0 <= ucam.warmup < 1:
    raise ValueError(f'config.ucam.warmup must be in [0, 1) (a fraction of the training steps), '
                     f'got {ucam.warmup}.')
  for key in ('uncertainty_weight', 'variance_learning_rate'):
    if not ucam[key] > 0:
      raise ValueError(f'config.ucam.{key} must be positive, got {ucam[key]}.')


def certainty_map(A, G, lengths=None, sign='certainty', normalisation='max',
                  weighting='gradcam'):
  """A, G [n, spatial..., k] (activations, d uncertainty / dA) -> [n, spatial...] in [0, 1].

  The U-CAM map: w_k = mean_spatial(-G_k), ReLU(sum_k w_k A_k), divided by its maximum. With
  `lengths [n]` the spatial axis is a word axis and positions past each question's length are
  zeroed before normalising (padding never reaches the answer, so it must not set the scale).
  sign 'uncertainty': w_k = mean_spatial(+G_k). weighting 'elementwise' (CADA): every position
  keeps its own gradient, sum_k -G_ijk A_ijk, instead of the channel means.
  normalisation 'min_max': no ReLU; the map less its minimum, divided by its range. 'softmax'
  (CADA): a softmax over the positive positions, the others 0. A map with nothing left (all
  clipped, or constant) is 0.
  """
  spatial = tuple(range(1, A.ndim - 1))
  weights = -G if sign == 'certainty' else G
  if weighting == 'gradcam':
    maps = jnp.einsum('n...k,nk->n...', A, weights.mean(axis=spatial))
  else:
    maps = jnp.sum(A * weights, axis=-1)
  valid = (jnp.ones(maps.shape, bool) if lengths is None
           else jnp.arange(maps.shape[1]) < lengths[:, None])
  axes = tuple(range(1, maps.ndim))
  if normalisation == 'softmax':
    keep = valid & (maps > 0)
    logits = jnp.where(keep, maps, -jnp.inf)
    top = jnp.where(keep.any(axis=axes, keepdims=True), logits.max(axis=axes, keepdims=True), 0)
    exp = jnp.where(keep, jnp.exp(logits - jax.lax.stop_gradient(top)), 0)
    total = exp.sum(axis=axes, keepdims=True)
    return exp / jnp.where(total > 0, total, 1)
  if normalisation == 'max':
    maps, low = jax.nn.relu(maps), 0
  else:
    low = jnp.where(valid, maps, jnp.inf).min(axis=axes, keepdims=True)
  maps = jnp.where(valid, maps - low, 0)
  peak = maps.max(axis=axes, keepdims=True)
  return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1), 0)


def masked_features(features, maps=None, combine='multiply'):
  """(v, e, lengths, certainty): the features with the certainty maps applied.

  features: (v [n, h, w, d], e [n, length, k], lengths [n]); maps: {'image': [n, h, w],
  'question': [n, length]}, either optional. 'multiply' hands the image map to the attention
  (certainty, else None), 'residual' scales v by 1 + M; the question map scales e.
  """
  v, e, lengths = features
  maps = maps or {}
  certainty = None
  if 'image' in maps:
    if combine == 'multiply':
      certainty = maps['image']
    else:
      v = v * (1 + maps['image'][..., None])
  if 'question' in maps:
    words = maps['question'][..., None]
    e = e * (words if combine == 'multiply' else 1 + words)
  return v, e, lengths, certainty


def answer_inputs(apply_fn, params, features, maps=None, combine='multiply'):
  """The answer stage's inputs (v, q, certainty) from precomputed features and optional maps
  (`masked_features`). The question encoder runs here, once and deterministically: the answer
  stage's samples (training, the 'answer' MC scope) share these inputs."""
  v, e, lengths, certainty = masked_features(features, maps, combine)
  q, _ = apply_fn(params, e, lengths, method='encode_question')
  return v, q, certainty


def _question_and_answer(module, v, e, lengths, certainty=None, *, deterministic=True,
                         detach_variance=False):
  """The question encoder and the answer stage as one call: one dropout key serves both."""
  q, _ = module.encode_question(e, lengths, deterministic=deterministic)
  return module.answer(v, q, certainty, deterministic=deterministic,
                       detach_variance=detach_variance)


def mc_sampler(apply_fn, params, features, maps=None, combine='multiply', scope='answer',
               detach_variance=False):
  """key -> (logits [n, c], sigma2 [n]): one MC-dropout sample, for `uncertainty.mc_dropout`.

  scope 'answer': the answer stage's dropout on inputs computed once (`answer_inputs`).
  'full': every dropout of the model, the word embeddings' included, as the published
  evaluation runs it; the question encoder (its LSTM) runs in every sample, on the embeddings
  and grid computed once (`masked_features`). Both are one vmap over keys in `mc_dropout`.
  """
  if scope == 'answer':
    inputs = answer_inputs(apply_fn, params, features, maps, combine)

    def sample(key):
      out = answer(apply_fn, params, inputs, key, detach_variance)
      return out['logits'], out['sigma2']
    return sample
  if scope != 'full':
    raise ValueError(f'config.ucam.mc_scope is {scope!r}; choose one of '
                     f"{list(SWITCHES['mc_scope'])}.")
  inputs = masked_features(features, maps, combine)

  def sample(key):
    out = apply_fn(params, *inputs, method=_question_and_answer, deterministic=False,
                   detach_variance=detach_variance, rngs={'dropout': key})
    return out['logits'], out['sigma2']
  return sample


def answer(apply_fn, params, inputs, dropout_key=None, detach_variance=False):
  """The answer stage on `answer_inputs`: {'logits', 'sigma2', 'attention'}; dropout_key None
  runs it deterministically. detach_variance: no gradient from sigma2 into the trunk."""
  if dropout_key is None:
    return apply_fn(params, *inputs, method='answer', detach_variance=detach_variance)
  return apply_fn(params, *inputs, method='answer', deterministic=False,
                  detach_variance=detach_variance, rngs={'dropout': dropout_key})


def uncertainty_term(ucam, logits, sigma2, targets, noise, weights=None):
  """U for one variance: the aleatoric part of the published recipe or of CADA's (without their
  answer loss), or the whole Kendall & Gal or temperature likelihood, as `ucam.aleatoric_loss`
  says. Shapes as `uncertainty.aleatoric_loss`."""
  terms = uncertainty.ALEATORIC_LOSSES[ucam.aleatoric_loss](logits, sigma2, targets, noise,
                                                             weights)
  return terms['aleatoric'] if 'aleatoric' in terms else terms['total']


def predictive_variance(ucam, variance):
  """The variance that L_PU uses in place of sigma^2: the MC-dropout predictive variance [n] as
  it is ('raw', the published form), or v / (1 + v) in [0, 1) ('normalised'), which keeps the
  depressor exp(v) - 1 below e - 1 where a trained model's logit variance (1.4-1.8 measured)
  made L_PU about 12x the answer loss."""
  return variance if ucam.predictive_variance == 'raw' else variance / (1 + variance)


def forward(apply_fn, params, features, targets, weights, key, ucam, train: bool):
  """One pass under `ucam` (the `config.ucam` switches). See the module docstring.

  Args:
    features: (v [n, h, w, d], e [n, length, k], lengths [n]) from the model's encoders.
    targets: [n] answer indices, or [n, answers] soft targets; weights: [n] (0 marks padding).
    key: PRNG key for dropout, the aleatoric noise and the MC-dropout samples of L_PU.
    train: dropout on in the answer pass (the L_PU samples always use dropout).

  Returns:
    (terms, outputs). terms: scalars 'loss' (answer + uncertainty_weight * U), 'answer' and,
    unless mode is 'none', 'uncertainty' (U) with its parts 'aleatoric' / 'predictive'; in mode
    'mask' also 'uncertainty_before_mask', the first pass's U for the same (true) targets, so
    the pair shows what the mask does to U. outputs: the answer outputs ('logits', 'sigma2',
    'attention'); in mode 'mask' 'attention' is the GCA attention, 'model_attention' that of
    the first pass, and 'certainty_image' [n, h, w] / 'certainty_question' [n, length] the maps
    of the chosen branch.
  """
  dropout_key, noise_key, sample_key = jax.random.split(key, 3)
  dropout_key = dropout_key if train else None

  def soft(logits):
    return jax.nn.one_hot(targets, logits.shape[-1]) if targets.ndim == 1 else targets

  def answer_loss(logits):
    losses = optax.softmax_cross_entropy(logits, soft(logits))
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)

  if ucam.mode == 'none':
    out = answer(apply_fn, params, answer_inputs(apply_fn, params, features), dropout_key)
    loss = answer_loss(out['logits'])
    return {'loss': loss, 'answer': loss}, out

  def run(v, e, maps, detach):
    """The answer pass with the features given explicitly, so it can be differentiated; with
    U predictive, also the variance L_PU uses [n], from MC-dropout samples of
    `ucam.mc_scope` (`mc_sampler`)."""
    inputs = answer_inputs(apply_fn, params, (v, e, features[2]), maps, ucam.combine)
    out = answer(apply_fn, params, inputs, dropout_key, detach)
    if ucam.uncertainty == 'aleatoric':
      return out, None
    if ucam.mc_scope == 'answer':  # The pass's inputs, not encoded twice.
      def sample(k):
        s = answer(apply_fn, params, inputs, k, detach)
        return s['logits'], s['sigma2']
    else:
      sample = mc_sampler(apply_fn, params, (v, e, features[2]), maps, ucam.combine,
                          ucam.mc_scope, detach)
    stats = uncertainty.predictive_stats(
        *uncertainty.mc_dropout(sample, sample_key, ucam.predictive_samples))
    return out, predictive_variance(ucam, stats['predictive_variance'])

  def uncertainty_of(out, predictive, target):
    """U and its parts for `target` [n, answers]. The same noise draws on every call."""
    noise = uncertainty.sample_noise(noise_key, ucam.aleatoric_samples, out['logits'].shape)
    terms = {}
    if ucam.uncertainty in ('aleatoric', 'both'):
      terms['aleatoric'] = uncertainty_term(ucam, out['logits'], out['sigma2'], target, noise,
                                             weights)
    if ucam.uncertainty in ('predictive', 'both'):
      terms['predictive'] = uncertainty_term(ucam, out['logits'], predictive, target, noise,
                                              weights)
    terms['uncertainty'] = sum(terms.values())
    return terms

  def loss_terms(out, predictive):
    # 'variance_head': U trains the variance head alone (its logits are held fixed); the trunk
    # then learns from the answer loss and, in mode 'mask', through the maps only.
    logits = out['logits']
    if ucam.uncertainty_trains == 'variance_head':
      logits = jax.lax.stop_gradient(logits)
    terms = uncertainty_of(dict(out, logits=logits), predictive, soft(logits))
    terms['answer'] = answer_loss(out['logits'])
    terms['loss'] = terms['answer'] + ucam.uncertainty_weight * terms['uncertainty']
    return terms

  v, e, lengths = features
  if ucam.mode == 'loss_only':
    out, predictive = run(v, e, None, ucam.variance_detach)
    return loss_terms(out, predictive), out

  def variance_used(out, predictive):
    """[n]: the variance that U uses (sigma2, the predictive one, or their sum)."""
    if ucam.uncertainty == 'aleatoric':
      return out['sigma2']
    return predictive if ucam.uncertainty == 'predictive' else out['sigma2'] + predictive

  def map_source(v, e):
    """What the maps differentiate: U of the model's own answer (never of the true one, which
    the maps would otherwise pass on to the second pass: training accuracy 99.9%, test accuracy
    at chance on grounded shapes), or the predicted variance (CADA). Summed over examples: each
    example's value depends on its own features only. No detach: the maps see every path."""
    out, predictive = run(v, e, None, detach=False)
    if ucam.map_source == 'variance':
      return jnp.sum(variance_used(out, predictive) * weights), (out, predictive)
    own = jax.nn.one_hot(jnp.argmax(out['logits'], -1), out['logits'].shape[-1])
    return uncertainty_of(out, predictive, own)['uncertainty'], (out, predictive)

  # Only the branches' gradients are taken: the question's goes back through the LSTM.
  branches = ('image', 'question') if ucam.branch == 'both' else (ucam.branch,)
  argnums = tuple({'image': 0, 'question': 1}[b] for b in branches)
  (_, (first, first_predictive)), grads = jax.value_and_grad(
      map_source, argnums=argnums, has_aux=True)(v, e)
  if ucam.order == 'first':
    grads = jax.lax.stop_gradient(grads)
  activations = {'image': (v, None), 'question': (e, lengths)}
  maps = {b: certainty_map(activations[b][0], g, activations[b][1], ucam.sign,
                          ucam.normalisation, ucam.map_weighting)
          for b, g in zip(branches, grads)}
  if ucam.variance_factor:  # CADA: trust the map as much as the answer is certain.
    trust = jnp.clip(1 - variance_used(first, first_predictive), 0, 1)
    maps = {b: m * trust.reshape(-1, *([1] * (m.ndim - 1))) for b, m in maps.items()}
  if ucam.map_gradient == 'stop':
    maps = jax.lax.stop_gradient(maps)
  out, predictive = run(v, e, maps, ucam.variance_detach)
  terms = loss_terms(out, predictive)
  terms['uncertainty_before_mask'] = jax.lax.stop_gradient(
      uncertainty_of(first, first_predictive, soft(first['logits']))['uncertainty'])
  out = dict(out, model_attention=first['attention'],
             **{f'certainty_{branch}': m for branch, m in maps.items()})
  return terms, out
