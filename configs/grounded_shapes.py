"""SAN on grounded shapes (procedural, exact ground-truth attention; SPEC section 6).

  python -m ucam_jax.main --config=configs/grounded_shapes.py
  python -m ucam_jax.main --config=configs/grounded_shapes.py \
      --config.dataset_kwargs.num_train_images=8000 --config.dataset_kwargs.seed=1

The dataset is generated on first use (seconds) into `data_dir`, in a folder named after
`dataset_kwargs`, so other settings never reuse a stale build. Its seed is separate from
`config.seed`: runs with several training seeds share one dataset.
"""

import ml_collections

from configs import san


def get_config() -> ml_collections.ConfigDict:
  config = san.get_config()
  config.dataset = 'grounded_shapes'
  # See ucam_jax/datasets/grounded_shapes.py. 8 questions per image, so one training group is one
  # image: 16,000 train / 4,000 test questions.
  config.dataset_kwargs = ml_collections.ConfigDict(dict(
      seed=0, num_train_images=2000, num_test_images=500, image_size=64, min_objects=2,
      max_objects=4, questions_per_image=8,
      # The question families, a bit mask: 1 attribute, 2 existence, 4 counting, 8 spatial.
      families=15))
  config.max_question_length = 10  # "what colour is the object left of the red square" is 10.
  config.num_epochs = 10.0
  return config
