"""MLB (Kim et al. 2017; ucam_jax/models/bilinear.py) under the U-CAM switches, on one of the
datasets of configs/mcb.py, chosen the same way:

  python -m ucam_jax.main --config=configs/mlb.py                  # easy-VQA, raw images
  python -m ucam_jax.main --config=configs/mlb.py:grounded_shapes
  python -m ucam_jax.main --config=configs/mlb.py:vqa_v1 --config.dataset_kwargs.manual_dir=...
  python -m ucam_jax.main --config=configs/mlb.py:vqa_v2 --config.dataset_kwargs.manual_dir=...

On VQA the paper's sizes (attention and joint 1200, 2 glimpses); differences from the paper: the
question is the published base model's LSTM of 1024 (Kim et al. read skip-thought GRU vectors of
2400) and the published base model's optimisation.
"""

import ml_collections

from configs import mcb


def get_config(variant: str = 'easy_vqa') -> ml_collections.ConfigDict:
  config = mcb.dataset_config(variant)
  raw = mcb.is_raw(variant)
  config.model = ml_collections.ConfigDict(dict(
      name='mlb', **(mcb.RAW_IMAGE_MODEL if raw else mcb.GRID_MODEL),
      attention_dim=32 if raw else 1200, joint_dim=64 if raw else 1200,
      variance_input='hidden', variance_hidden_dim=64,  # As configs/mcb.py.
      dtype='float32'))  # 'bfloat16': mixed precision (TPU, recent GPUs); parameters float32.
  return config
