"""VQA models. Each is a Flax linen module with three stages, applied separately by name:

  encode_image(images) -> v [batch, h, w, d]        no dropout: computed once per input
  encode_question(e, lengths, deterministic) -> (q [batch, d], words [batch, length, d])
  answer(v, q, certainty, deterministic, detach_variance) -> {'logits': [batch, answers], 'sigma2': [batch],
                                  'attention': [batch, glimpses, h, w]}

`__call__` chains them. Dropout acts in `answer` and, with deterministic=False, on the word
embeddings in `encode_question` (the published model's). MC dropout of the 'answer' scope and
gradients with respect to the features v and q re-run only the answer stage; the 'full' scope
(`config.ucam.mc_scope`) re-runs the question encoder too (`gca.mc_sampler`).
"""

import jax

from ucam_jax.models.attention_net import AttentionNet
from ucam_jax.models.bilinear import MCB, MLB
from ucam_jax.models.san import SAN

MODELS = {'san': SAN, 'attention_net': AttentionNet, 'mcb': MCB, 'mlb': MLB}

# Parameters that hold fixed random tables (MCB's count sketches) and never train: the model
# stops their gradient and `train.make_optimizer` zeroes their updates, whatever the optimiser.
FIXED_PARAMS = ('sketch_hash', 'sketch_sign')


def get_model(config, vocab_size: int, num_answers: int):
  """The model named by `config.model.name`, sized for the vocabulary and the answers."""
  kwargs = dict(config.model)
  name = kwargs.pop('name')
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known: {sorted(MODELS)}.')
  return MODELS[name](vocab_size=vocab_size, num_answers=num_answers, **kwargs)


def has_fixed_params(name: str) -> bool:
  """Whether the model `name` has FIXED_PARAMS."""
  return getattr(MODELS.get(name), 'HAS_FIXED_PARAMS', False)


def fixed_mask(params):
  """A pytree of bools like `params`: True at the FIXED_PARAMS leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], 'key', '')) in FIXED_PARAMS, params)
