"""The aleatoric variance head shared by the models: sigma2 = softplus(Linear(x)), one scalar per
example, where x is the classifier's logits (the published head) or its hidden layer (CADA's),
optionally through a hidden ReLU layer of its own (a linear read-out of the logits cannot tell a
confident answer from an unsure one: the largest logit's margin is not linear in them)."""

import flax.linen as nn
import jax

INPUTS = ('logits', 'hidden')


def sigma2(head: nn.Module, logits, hidden, source: str, detach: bool, head_hidden=None):
  """logits [n, answers], hidden [n, k] -> sigma2 [n] > 0.

  head_hidden: None (the published linear head) or the Dense layer of the head's own hidden
  ReLU layer, applied first.

  source: 'logits' | 'hidden', the head's input. detach: stop the gradient at that input, so a
  loss on sigma2 trains the head alone and sends nothing into the trunk (without it, the cheapest
  way for the published loss to shrink sigma2 is to push every logit down).
  """
  if source not in INPUTS:
    raise ValueError(f'config.model.variance_input is {source!r}; choose one of {list(INPUTS)}.')
  x = {'logits': logits, 'hidden': hidden}[source]
  if detach:
    x = jax.lax.stop_gradient(x)
  if head_hidden is not None:
    x = nn.relu(head_hidden(x))
  return nn.softplus(head(x)[:, 0])
