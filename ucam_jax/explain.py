"""Gradient-based class activation maps for any Flax linen model (SPEC section 5).

Contract with a model: it exposes an intermediate `x` under a name by writing, inside any of
its methods,

    x = self.perturb(name, x)
    self.sow('intermediates', name, x)

`perturb` adds `x` to a zero variable in the 'perturbations' collection, so the gradient with
respect to that variable is the gradient with respect to `x`; `sow` records the value. Both are
no-ops when the collections are not passed, so training code is unaffected. Expose each name
once per call (a second `sow` would append a second value). `layer` below is that name, or a
'/'-joined path ('hop0/v') when the name alone is ambiguous across submodules.

Maps: a method turns activations A and gradients G of one example, `[spatial..., k]` with all
axes but the last spatial, into channel weights w `[k]` (one small function per method, as
pytorch-grad-cam); `cam` gives ReLU(sum_k w_k A_k) `[spatial...]`, vmapped over the batch. The
same code serves an image grid `[h, w, k]` and question words `[length, k]`: a map over a
word-state intermediate is the per-word weighting, so there is no separate word-level API.

- Grad-CAM: G is the gradient of the answer score; w_k = mean_spatial(G_k).
- Grad-CAM++ (Chattopadhay et al., 2018): closed form under the exp(score) assumption.
- U-CAM: G is the gradient of an uncertainty (e.g. predictive entropy); the certainty gradient
  is -G and w_k = mean_spatial(-G_k).
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

WeightsFn = Callable[[jax.Array, jax.Array], jax.Array]

_EXPOSED = ('perturbations', 'intermediates')


# --------------------------------------------------------------------------- activations, gradients


def _find(tree: Mapping, layer: str, collection: str):
  """The one leaf of a nested dict whose '/'-joined path is `layer` or ends with '/layer'."""
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  hits = [path for path in flat if path == layer or path.endswith('/' + layer)]
  if len(hits) != 1:
    raise ValueError(f'Expected one {collection!r} entry named {layer!r}, found {hits} '
                     f'among {sorted(flat)}.')
  return hits[0]


def activations_and_gradients(apply_fn: Callable, variables: Mapping, inputs: tuple, layer: str,
                              target_fn: Callable[..., jax.Array], *,
                              apply_kwargs: Mapping | None = None, targets: Any = None
                              ) -> tuple[jax.Array, jax.Array]:
  """The exposed intermediate `layer` and the gradient of each example's target w.r.t. it.

  Args:
    apply_fn: `apply_fn(variables, *inputs, **apply_kwargs)` returns the model outputs (any
      pytree) and accepts flax's `mutable=`; `model.apply` will do.
    variables: the model variables; any 'perturbations' / 'intermediates' (as `model.init`
      returns them) are dropped and rebuilt for one example.
    inputs: arrays (or pytrees) with a leading batch axis.
    layer: the name the model gave `perturb` and `sow`.
    target_fn: model outputs -> `[batch]` scalars to differentiate (an answer logit, an
      uncertainty); with `targets`, `target_fn(outputs, targets)`.
    apply_kwargs: extra keyword arguments for `apply_fn`, e.g. `{'deterministic': True}`.
    targets: optional per-example arguments of `target_fn` (e.g. classes `[batch]`), any pytree
      with a leading batch axis. Each example's call gets its own rows: a `target_fn` that
      closed over `[batch]` classes would see a batch of one and index them wrongly.

  Returns:
    (activation, gradient), both `[batch, ..., k]`: d target_n / d activation_n.

  Each example runs through the model alone, with a batch axis of 1, under `jax.vmap`, so its
  map cannot depend on the rest of the batch, even for a model that mixes examples (batch
  statistics); the price is that such a model is explained as if given a batch of one. Jit it
  with `apply_fn`, `layer` and `target_fn` static (close over them with `functools.partial`).
  """
  apply_kwargs = dict(apply_kwargs or {})
  variables = {c: v for c, v in variables.items() if c not in _EXPOSED}

  def one(example, target_args):
    example, target_args = jax.tree.map(lambda x: x[None], (example, target_args))

    # Zero perturbations of the right shapes, for every exposed name, from an abstract pass.
    _, shapes = jax.eval_shape(
        lambda v, e: apply_fn(v, *e, mutable=list(_EXPOSED), **apply_kwargs), variables, example)
    missing = [c for c in _EXPOSED if c not in shapes]
    if missing:
      raise ValueError(
          f'The model exposes no intermediate (no {missing} collection): inside the model, '
          f"write `x = self.perturb({layer!r}, x)` and `self.sow('intermediates', {layer!r}, x)` "
          'on the activation to explain (see the ucam_jax.explain docstring).')
    perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['perturbations'])
    p_path = _find(perturbations, layer, 'perturbations')
    a_path = _find(shapes['intermediates'], layer, 'intermediates')
    sown = flax.traverse_util.flatten_dict(shapes['intermediates'], sep='/')[a_path]
    if len(sown) != 1:
      raise ValueError(f'{layer!r} was sown {len(sown)} times in one call; expose it once.')

    def target(perturbations):
      outputs, state = apply_fn({**variables, 'perturbations': perturbations}, *example,
                                mutable=['intermediates'], **apply_kwargs)
      sown = flax.traverse_util.flatten_dict(state['intermediates'], sep='/')[a_path]
      value = target_fn(outputs) if targets is None else target_fn(outputs, target_args)
      if jnp.shape(value) != (1,):
        raise ValueError(
            f'target_fn must return one scalar per example, [batch]; on a batch of one it '
            f'returned shape {jnp.shape(value)}. Reduce over classes, not the batch, and pass '
            'per-example classes as `targets=` rather than closing over them.')
      return value[0], sown[0]

    grads, activation = jax.grad(target, has_aux=True)(perturbations)
    gradient = flax.traverse_util.flatten_dict(grads, sep='/')[p_path]
    return activation[0], gradient[0]

  return jax.vmap(one)(tuple(inputs), targets)


# --------------------------------------------------------------------------- channel weights
# One example: A, G [spatial..., k] -> w [k]. Spatial axes are all axes but the last.


def _spatial(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def gradcam_weights(A: jax.Array, G: jax.Array) -> jax.Array:
  """Grad-CAM (Selvaraju et al., 2017): w_k = mean_spatial(G_k)."""
  del A
  return G.mean(axis=_spatial(G))


def gradcam_plus_plus_weights(A: jax.Array, G: jax.Array) -> jax.Array:
  """Grad-CAM++ (Chattopadhay et al., 2018), closed form for score = exp(S).

  alpha = G^2 / (2 G^2 + sum_spatial(A_k) G^3), set to 0 where the denominator is 0 (as
  pytorch-grad-cam); w_k = sum_spatial(alpha * ReLU(G)).
  """
  g2 = G ** 2
  denominator = 2 * g2 + A.sum(axis=_spatial(A), keepdims=True) * G ** 3
  nonzero = denominator != 0
  alpha = jnp.where(nonzero, g2 / jnp.where(nonzero, denominator, 1), 0)
  return (alpha * jax.nn.relu(G)).sum(axis=_spatial(G))


def ucam_weights(A: jax.Array, G: jax.Array) -> jax.Array:
  """U-CAM: G is d(uncertainty)/dA; the certainty gradient is -G; w_k = mean_spatial(-G_k)."""
  return gradcam_weights(A, -G)


METHODS: dict[str, WeightsFn] = {
    'gradcam': gradcam_weights,
    'gradcam++': gradcam_plus_plus_weights,
    'ucam': ucam_weights,
}


# --------------------------------------------------------------------------- maps


def cam(A: jax.Array, G: jax.Array, weights_fn: WeightsFn, normalise: bool = True) -> jax.Array:
  """A, G [batch, spatial..., k] -> maps [batch, spatial...] = ReLU(sum_k w_k A_k).

  With `normalise`, each example's map is divided by its max so it lies in [0, 1]; a map that
  is all zero (every cell clipped by the ReLU) stays all zero rather than becoming nan.
  """
  def one(a, g):
    m = jax.nn.relu(jnp.einsum('...k,k->...', a, weights_fn(a, g)))
    if not normalise:
      return m
    peak = m.max()
    return jnp.where(peak > 0, m / jnp.where(peak > 0, peak, 1), 0)

  return jax.vmap(one)(A, G)


def explain(apply_fn: Callable, variables: Mapping, inputs: tuple, layer: str,
            target_fn: Callable[..., jax.Array], method: str = 'gradcam',
            apply_kwargs: Mapping | None = None, targets: Any = None) -> jax.Array:
  """Normalised maps [batch, spatial...] of `method` (a key of METHODS) over `layer`.

  For 'ucam', `target_fn` should return an uncertainty; for the others, a score. `targets`:
  per-example arguments of `target_fn`, see `activations_and_gradients`.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; expected one of {sorted(METHODS)}.')
  A, G = activations_and_gradients(apply_fn, variables, inputs, layer, target_fn,
                                   apply_kwargs=apply_kwargs, targets=targets)
  return cam(A, G, METHODS[method])
