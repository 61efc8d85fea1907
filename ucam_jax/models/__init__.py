"""VQA models. Each is a Flax linen module with three stages, applied separately by name:

  encode_image(images) -> v [batch, h, w, d]        no dropout: computed once per input
  encode_question(tokens, lengths) -> (q [batch, d], words [batch, length, d])
  answer(v, q, certainty, deterministic, detach_variance) -> {'logits': [batch, answers], 'sigma2': [batch],
                                  'attention': [batch, glimpses, h, w]}

`__call__` chains them. Dropout lives only in `answer`, so MC dropout and gradients with respect to
the features v and q re-run only that stage.
"""

from ucam_jax.models.attention_net import AttentionNet
from ucam_jax.models.san import SAN

MODELS = {'san': SAN, 'attention_net': AttentionNet}


def get_model(config, vocab_size: int, num_answers: int):
  """The model named by `config.model.name`, sized for the vocabulary and the answers."""
  kwargs = dict(config.model)
  name = kwargs.pop('name')
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known: {sorted(MODELS)}.')
  return MODELS[name](vocab_size=vocab_size, num_answers=num_answers, **kwargs)
