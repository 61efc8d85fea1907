"""SAN (2 stacked attention hops) on easy-VQA: the default configuration.

  python -m ucam_jax.main --config=configs/san.py
  python -m ucam_jax.main --config=configs/san.py --config.num_epochs=1 --config.batch_size=128
"""

import ml_collections

# The published recipe (SPEC sections 3-4), which the project trained with until the variance head
# was found to collapse (docs/results.md): the published loss on a linear head over the logits,
# with its gradient flowing into them; GCA maps of U, differentiable. One override each, or
# configs/san_published.py.
PUBLISHED_MODEL = dict(variance_input='logits', variance_hidden_dim=0)
PUBLISHED_UCAM = dict(aleatoric_loss='published', variance_detach=False,
                      map_source='uncertainty', map_gradient='through')


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = 'easy_vqa'
  # The builder's settings (every one settable with --config.dataset_kwargs.*; None: its default).
  config.dataset_kwargs = ml_collections.ConfigDict(dict(
      source_dir=ml_collections.config_dict.placeholder(str),  # None: the easy-vqa package's.
  ))
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default directory.
  config.max_question_length = 10  # easy-VQA questions have at most 9 words.
  config.questions_per_image = 8  # Training groups: one image with up to this many questions.
  config.data_threads = 2

  # Model: see ucam_jax/models/san.py.
  config.model = ml_collections.ConfigDict(dict(
      name='san', stem_features=(16, 32, 64), grid_convs=1, embed_dim=32, hidden_dim=64,
      attention_dim=32, num_hops=2, classifier_dim=128, dropout_rate=0.1,
      # The variance head reads: hidden (the classifier's hidden layer, as CADA) | logits
      # (published), through a hidden ReLU layer of this width (0: linear, as published).
      variance_input='hidden', variance_hidden_dim=64,
      dtype='float32'))  # 'bfloat16': mixed precision (TPU, recent GPUs); parameters float32.

  # U-CAM (SPEC sections 4-5; ucam_jax/gca.py). The baseline: --config.ucam.mode=none.
  config.ucam = ml_collections.ConfigDict(dict(
      mode='mask',  # none (baseline) | loss_only (answer + uncertainty loss) | mask (GCA).
      # U: aleatoric (L_AU) | predictive (L_PU) | both. L_PU samples dropout predictive_samples
      # times per question: ~3x the step time of aleatoric on 2 CPU cores.
      uncertainty='aleatoric',
      branch='both',  # Certainty maps on: image (the grid) | question (the words) | both.
      combine='residual',  # multiply (alpha' = normalise(alpha * M)) | residual (v * (1 + M)).
      order='first',  # first: stop the gradient at dU/dfeatures | second: through it.
      sign='certainty',  # certainty (weights of -dU, the paper's) | uncertainty (of +dU).
      # max (ReLU, / max) | min_max (no ReLU; (M - min) / (max - min)) | softmax (CADA).
      normalisation='max',
      # The maps differentiate: variance (the predicted variance U uses, as CADA) | uncertainty
      # (U of the model's own answer, published).
      map_source='variance',
      map_weighting='gradcam',  # gradcam (channel means) | elementwise (CADA: A * gradient).
      variance_factor=False,  # True: the maps times (1 - variance), clipped to [0, 1] (CADA).
      map_gradient='stop',  # stop | through: the loss differentiates the maps (published).
      # temperature (sigma2 as a per-example softmax temperature, Kendall, Gal & Cipolla 2018) |
      # published | kendall_gal (Gaussian logit noise, Kendall & Gal 2017) | cada.
      aleatoric_loss='temperature',
      aleatoric_samples=100,  # T_a: Gaussian logit samples per question.
      predictive_samples=4,  # MC-dropout passes per training question for L_PU.
      # What an MC-dropout sample (L_PU's, the evaluation's) redraws: answer (the answer stage's
      # dropout, on the image and question encoded once) | full (every dropout of the model, the
      # word embeddings' included, as the published evaluation; reruns the LSTM per sample).
      mc_scope='answer',
      predictive_variance='raw',  # L_PU's variance: raw (published) | normalised (v / (1 + v)).
      uncertainty_weight=1.0,  # loss = answer loss + uncertainty_weight * U.
      warmup=0.0,  # The first fraction of the steps trains the baseline; then U and the maps.
      variance_detach=True,  # True: no gradient from sigma2 into the trunk (False: published).
      # What U trains: all (the variance head and, through the logits, the trunk; published) |
      # variance_head (the logits held fixed in U).
      uncertainty_trains='all',
      # The variance head's optimiser: main (the rest's Adam) | sgd (published: SGD of its own).
      variance_optimizer='main',
      variance_learning_rate=2e-4,  # Of the sgd variance optimiser.
  ))

  # Optimisation.
  config.seed = 0
  config.batch_size = 32  # Question groups (images) per training batch: ~190 questions.
  config.eval_batch_size = 256
  config.mc_samples = 20  # MC-dropout passes per test question (the published evaluation: 50).
  config.learning_rate = 2e-3
  config.final_learning_rate_factor = 0.01  # Cosine decay to this fraction of the peak.
  config.num_epochs = 18.0
  config.num_train_steps = 0  # > 0 overrides num_epochs.

  # Bookkeeping.
  config.log_every_steps = 50
  # Every this many steps (0: never), sigma2's and the predictive entropy's AUROC for wrong
  # answers on a fixed batch of eval_batch_size test questions, in metrics.jsonl (monitoring
  # only: nothing is chosen on it).
  config.monitor_every_steps = 500
  config.checkpoint_every_steps = 500
  config.checkpoints_to_keep = 2
  # The report (workdir/report/): explanation figures of up to this many test questions in each
  # section (a sample, wrong answers, the most uncertain, the most confident wrong ones).
  config.report_questions = 8
  config.report_map_scale = 'shared'  # shared (each map / its sum, one scale) | per_map (/ max).
  # Deletion / insertion AUC of the maps (ucam_jax/evaluate.py): test questions fixed by the seed,
  # and steps; each step is a forward pass of the questions for every map type.
  config.faithfulness_questions = 128
  config.faithfulness_steps = 16
  # Trace steps 'a,b' (first and last, inclusive) with jax.profiler into workdir/plugins/profile/
  # (TensorBoard's profile plugin; Perfetto: perfetto_trace.json.gz there). '': none.
  config.profile_steps = ''
  config.stop_at_step = 0  # > 0: checkpoint and stop there (a time-limited job); rerun resumes.
  return config
