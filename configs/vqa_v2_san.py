"""SAN on VQA v2, top 1000 answers: configs/vqa_v1_san.py on the v2 files.

  python -m ucam_jax.main --config=configs/vqa_v2_san.py \
      --config.dataset_kwargs.manual_dir=/data/vqa
"""

import ml_collections

from configs import vqa_v1_san


def get_config() -> ml_collections.ConfigDict:
  config = vqa_v1_san.get_config()
  config.dataset = 'vqa/v2'
  config.questions_per_image = 6  # VQA v2 asks 5.4 questions per image on average.
  config.batch_size = 16  # Images per batch: about 86 questions.
  config.num_epochs = 10.0  # v2 has 1.8x the questions of v1.
  return config
