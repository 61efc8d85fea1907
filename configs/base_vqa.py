"""The published U-CAM base model on VQA v1 (SPEC section 3): Kazemi & Elqursh's attention
network on 14x14x2048 ResNet-152 grid features, 3000 answers, with the variance head, trained
with the published hyperparameters (Adam 1e-3 halved every 50k iterations, 220 questions a
batch).

  python -m ucam_jax.extract_features --manual_dir=/data/vqa --version=v1 --split=train \
      --weights=resnet152_imagenet.npz          # and --split=validation; docs/grid_features.md
  python -m ucam_jax.main --config=configs/base_vqa.py \
      --config.dataset_kwargs.manual_dir=/data/vqa

The dataset 'vqa/v1_questions' stores the questions and answers only; each question's grid is
read from the feature store of its image folder by image id (memory-mapped, never copied per
question). Evaluation: the official VQA accuracy on val2014 per answer type; add
--config.eval_dataset=vqa/v1_hat_questions to score the maps against VQA-HAT instead.
The same config sizes the model for the benchmark on synthetic features:

  python -m ucam_jax.bench --config=configs/base_vqa.py
"""

import ml_collections

from configs import san
from ucam_jax.datasets import synthetic


def get_config() -> ml_collections.ConfigDict:
  config = san.get_config()  # The U-CAM switches (config.ucam) and the bookkeeping.
  config.dataset = 'vqa/v1_questions'
  config.dataset_kwargs = ml_collections.ConfigDict(dict(
      manual_dir=ml_collections.config_dict.placeholder(str),  # The official files.
      # The grid-feature stores; None: <manual_dir>/grid_features.
      features_dir=ml_collections.config_dict.placeholder(str),
      # The side of the images the grids were computed from (recorded in the build's name).
      image_size=ml_collections.config_dict.placeholder(int),
  ))
  # Evaluate on another dataset's evaluation split, e.g. 'vqa/v1_hat_questions' (VQA-HAT).
  config.eval_dataset = ml_collections.config_dict.placeholder(str)
  config.features = 'grid'  # The model reads grid features from the stores, by image id.
  config.grid_shape = synthetic.GRID_SHAPE  # ResNet-152 at 448 px, per image.
  config.num_answers = synthetic.NUM_ANSWERS  # The most frequent training answers.
  config.max_question_length = synthetic.MAX_QUESTION_LENGTH
  # One question per group, so a batch is exactly the published 220 questions (VQA v1 has 3
  # per image; 3 would share each grid read but make a batch 660 questions).
  config.questions_per_image = 1

  # Model: see ucam_jax/models/attention_net.py; the published sizes.
  config.model = ml_collections.ConfigDict(dict(
      name='attention_net', embed_dim=300, question_dim=1024, attention_dim=512, glimpses=2,
      classifier_dim=1024, dropout_rate=0.5,
      variance_input='hidden', variance_hidden_dim=64,  # As configs/san.py; published: logits, 0.
      dtype='float32'))  # 'bfloat16': mixed precision (TPU, recent GPUs); parameters float32.

  # Optimisation, as published: Adam 1e-3 halved every 50k iterations, 220 questions a batch.
  config.batch_size = 220
  config.eval_batch_size = 256
  config.learning_rate = 1e-3
  config.learning_rate_schedule = 'step'  # train.learning_rate_schedule.
  config.decay_every_steps = 50_000
  config.decay_factor = 0.5
  # The published number of iterations is not in our sources: ours, 100k (two decay periods,
  # about 90 epochs of VQA v1 train at 220 questions a step).
  config.num_epochs = 0.0
  config.num_train_steps = 100_000
  config.mc_samples = 50  # The published evaluation: T_p = 50 MC-dropout passes.
  config.log_every_steps = 200
  config.monitor_every_steps = 1000  # A multiple of log_every_steps.
  config.checkpoint_every_steps = 5000
  return config
