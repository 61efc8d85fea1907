"""MCB (Fukui et al. 2016; ucam_jax/models/bilinear.py) under the U-CAM switches, on one of four
datasets, chosen by the argument after the file name:

  python -m ucam_jax.main --config=configs/mcb.py                  # easy-VQA, raw images
  python -m ucam_jax.main --config=configs/mcb.py:grounded_shapes  # raw images
  python -m ucam_jax.main --config=configs/mcb.py:vqa_v1 \
      --config.dataset_kwargs.manual_dir=/data/vqa                  # 14x14x2048 grid features
  python -m ucam_jax.main --config=configs/mcb.py:vqa_v2 --config.dataset_kwargs.manual_dir=...

Everything but the model comes from the dataset's SAN or published-model config (configs/san.py,
grounded_shapes.py, base_vqa.py): the U-CAM switches, the optimisation, the bookkeeping. On the
raw-image datasets the model reads the images through SAN's conv stem at small sizes (a sketch of
512: CPU-sized); on VQA it reads the ResNet-152 grids with the paper's sizes (sketch 16,000,
attention 512, 2 glimpses). Differences from the paper: a 1-layer LSTM of 1024 (Fukui et al.
concatenate two layers' states) and the published base model's optimisation.
"""

import ml_collections

from configs import base_vqa, grounded_shapes, san

VARIANTS = ('easy_vqa', 'grounded_shapes', 'vqa_v1', 'vqa_v2')


def dataset_config(variant: str) -> ml_collections.ConfigDict:
  """The config of `variant` (one of VARIANTS) without its model."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown config variant {variant!r}; choose one of {list(VARIANTS)} '
                     '(e.g. --config=configs/mcb.py:vqa_v1).')
  if variant == 'easy_vqa':
    return san.get_config()
  if variant == 'grounded_shapes':
    return grounded_shapes.get_config()
  config = base_vqa.get_config()
  config.dataset = f'vqa/{variant[-2:]}_questions'
  return config


def is_raw(variant: str) -> bool:
  """Whether the variant's model reads raw images (else grid features)."""
  return variant in ('easy_vqa', 'grounded_shapes')


# What both bilinear models share on raw images: SAN's stem and sizes (configs/san.py).
RAW_IMAGE_MODEL = dict(stem_features=(16, 32, 64), grid_convs=1, image_dim=64, embed_dim=32,
                       question_dim=64, glimpses=2, dropout_rate=0.1)
# And on grid features: no stem, the published base model's question encoder.
GRID_MODEL = dict(stem_features=(), embed_dim=300, question_dim=1024, glimpses=2,
                  dropout_rate=0.5)


def get_config(variant: str = 'easy_vqa') -> ml_collections.ConfigDict:
  config = dataset_config(variant)
  config.model = ml_collections.ConfigDict(dict(
      name='mcb', **(RAW_IMAGE_MODEL if is_raw(variant) else GRID_MODEL),
      sketch_dim=512 if is_raw(variant) else 16_000,
      attention_dim=32 if is_raw(variant) else 512,
      # As configs/san.py: the variance head reads the fused vector through a hidden layer.
      variance_input='hidden', variance_hidden_dim=64,
      dtype='float32'))  # 'bfloat16': mixed precision (TPU, recent GPUs); parameters float32.
  return config
