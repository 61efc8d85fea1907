"""SAN (2 stacked attention hops) on VQA v1, top 1000 answers (Yang et al. 2016).

  python -m ucam_jax.main --config=configs/vqa_v1_san.py \
      --config.dataset_kwargs.manual_dir=/data/vqa

The manual directory holds the official files (layout: ucam_jax/datasets/vqa.py); TFDS builds
'vqa/v1' from it on first use (COCO images squashed to 448 px, stored once per question).
SAN reads the images through its conv stem: five stride-2 convs take 448 px to the 14x14 grid
of the published SAN (which read VGG-16 features instead; `ucam_jax.models.san` has no grid
input). Evaluation: the official VQA accuracy on val2014, per answer type (metrics.json).
"""

import ml_collections

from configs import san


def get_config() -> ml_collections.ConfigDict:
  config = san.get_config()
  config.dataset = 'vqa/v1'
  config.dataset_kwargs = ml_collections.ConfigDict(dict(
      manual_dir=ml_collections.config_dict.placeholder(str),  # The official files.
      features_dir=ml_collections.config_dict.placeholder(str),  # Unused by 'image' models.
      # The stored images' side; None: 448 (the build gains '_<size>px' otherwise).
      image_size=ml_collections.config_dict.placeholder(int),
  ))
  # Evaluate on another dataset's evaluation split, e.g. 'vqa/v1_hat' (VQA-HAT maps).
  config.eval_dataset = ml_collections.config_dict.placeholder(str)
  config.features = 'image'  # The model reads the examples' images.
  config.num_answers = 1000  # The most frequent normalised training answers.
  config.max_question_length = 14  # Longer VQA questions are cut (few are).
  config.questions_per_image = 3  # VQA v1 asks 3 questions per image: one group per image.
  config.model = ml_collections.ConfigDict(dict(
      name='san', stem_features=(32, 64, 128, 256, 512), grid_convs=1, embed_dim=300,
      hidden_dim=512, attention_dim=512, num_hops=2, classifier_dim=1024, dropout_rate=0.5,
      variance_input='hidden', variance_hidden_dim=64,  # As configs/san.py.
      dtype='float32'))
  config.batch_size = 32  # Images per batch: about 96 questions.
  config.learning_rate = 1e-3
  config.num_epochs = 20.0
  config.mc_samples = 50  # The published evaluation: T_p = 50 MC-dropout passes.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
