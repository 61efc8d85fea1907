"""The published base model (attention_net, 2 glimpses) on frozen pretrained grid features of
grounded shapes: the paper's regime (frozen features, attention over cells that already mean
something) at CPU size.

  python -m ucam_jax.main --config=configs/grounded_shapes_grid.py
  python -m ucam_jax.main --config=configs/grounded_shapes_grid.py --config.ucam.mode=none

The features (8x8 cells of 64 channels, L2-normalised per cell) come from a small CNN trained on
a disjoint task and draw (per-cell shape and colour on grounded-shapes seed 100) and then frozen
(ucam_jax/pretrain_features.py). The first run builds the extractor and the stores (about a
minute on 2 cores); `python -m ucam_jax.pretrain_features --config=configs/grounded_shapes_grid.py`
builds them ahead of time. The masks of the evaluation are pooled to the 8x8 cells.
Settings chosen on the validation draw (--config.dataset_kwargs.seed=1) only.
"""

import ml_collections

from configs import grounded_shapes
from ucam_jax import pretrain_features


def get_config() -> ml_collections.ConfigDict:
  config = grounded_shapes.get_config()  # The dataset, config.ucam and the bookkeeping.
  # The question families, a bit mask (datasets/grounded_shapes.py): attribute, existence and
  # counting (7). Spatial questions ("what shape is left of the blue circle?") need the target
  # found relative to the anchor; the published model's glimpses are computed from the question
  # alone, so it answered 66% of them (counting 73%, attribute 99%) and 84% of all four families
  # on the validation draw; 90% on these three.
  config.dataset_kwargs.families = 7
  config.features = 'grid'
  config.extractor = pretrain_features.default_extractor()
  config.grid_shape = pretrain_features.grid_shape(config)
  config.model = ml_collections.ConfigDict(dict(
      name='attention_net', embed_dim=64, question_dim=128, attention_dim=64, glimpses=2,
      classifier_dim=128, dropout_rate=0.2,
      variance_input='hidden', variance_hidden_dim=64,  # As configs/san.py.
      dtype='float32'))
  config.batch_size = 32  # Images a batch, 8 questions each.
  config.learning_rate = 3e-3
  config.num_epochs = 20.0
  config.mc_samples = 10
  config.log_every_steps = 100
  config.monitor_every_steps = 0
  config.checkpoint_every_steps = 10_000
  config.report_questions = 2
  config.faithfulness_questions = 64
  config.faithfulness_steps = 8
  return config
