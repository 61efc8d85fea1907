"""The published base model (attention_net, 2 glimpses) on frozen pretrained grid features of
easy-VQA (configs/grounded_shapes_grid.py's model and extractor; SPEC section 6's data).

  python -m ucam_jax.main --config=configs/easy_vqa_grid.py

The extractor is the one of configs/grounded_shapes_grid.py (pretrained on grounded shapes of
dataset seed 100, then frozen: a disjoint task and draw for easy-VQA too), applied to easy-VQA's
64 px images. The first run writes the stores (ucam_jax/pretrain_features.py).
"""

import ml_collections

from configs import grounded_shapes_grid, san


def get_config() -> ml_collections.ConfigDict:
  config = san.get_config()  # easy-VQA, config.ucam and the bookkeeping.
  grid = grounded_shapes_grid.get_config()
  for key in ('features', 'extractor', 'grid_shape', 'model', 'batch_size', 'learning_rate',
              'mc_samples', 'log_every_steps', 'monitor_every_steps', 'checkpoint_every_steps',
              'report_questions', 'faithfulness_questions', 'faithfulness_steps'):
    config[key] = grid[key]
  config.num_epochs = 8.0
  return config
