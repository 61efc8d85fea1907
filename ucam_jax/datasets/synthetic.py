"""Random VQA batches at the official shapes, for benchmarks and tests (no data needed).

The shapes are those the published base model reads (SPEC section 3): ResNet-152 grid features
at 448 px, 14x14x2048, each cell L2-normalised over its channels, non-negative and mostly zero
as after ResNet's last ReLU; questions of up to `max_question_length` tokens; 3000 answers.
The values are random: these batches measure speed and check plumbing, never accuracy.

Batches have the layouts of `ucam_jax.input_pipeline`: grouped for `train.train_step`
(`questions_per_image` given), per question for `train.eval_step` (it is None).
"""

import numpy as np

GRID_SHAPE = (14, 14, 2048)
NUM_ANSWERS = 3000
VOCAB_SIZE = 15_000  # VQA-sized; the embedding is a gather, so its size barely moves speed.
MAX_QUESTION_LENGTH = 14  # VQA questions average about 6 words.


def grid_features(rng: np.random.Generator, n: int, grid_shape=GRID_SHAPE,
                  dtype=np.float32) -> np.ndarray:
  """[n, h, w, c]: ReLU of standard normals (half the channels 0), L2-normalised per cell."""
  x = np.maximum(rng.standard_normal((n, *grid_shape), dtype=np.float32), 0)
  x /= np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8
  return x.astype(dtype)


def batch(seed: int, batch_size: int, questions_per_image: int | None = None, *,
          grid_shape=GRID_SHAPE, num_answers: int = NUM_ANSWERS, vocab_size: int = VOCAB_SIZE,
          max_question_length: int = MAX_QUESTION_LENGTH, dtype=np.float32) -> dict:
  """A random batch, deterministic in `seed`.

  Returns, with q = questions_per_image (groups) or no such axis (None, per question):
    'image' [batch_size, h, w, c] grid features (`grid_features`), 'question' [batch_size, (q,)
    max_question_length] int32 tokens in [2, vocab_size) then 0 padding, 'length' [...]
    int32 in [3, max_question_length] (at most max_question_length), 'answer' [...] int32,
    'weight' [...] float32, all 1.
  """
  rng = np.random.default_rng(seed)
  questions = (batch_size,) if questions_per_image is None else (batch_size, questions_per_image)
  length = rng.integers(min(3, max_question_length), max_question_length + 1, questions)
  tokens = rng.integers(2, vocab_size, (*questions, max_question_length))
  tokens = np.where(np.arange(max_question_length) < length[..., None], tokens, 0)
  return {'image': grid_features(rng, batch_size, grid_shape, dtype),
          'question': tokens.astype(np.int32), 'length': length.astype(np.int32),
          'answer': rng.integers(0, num_answers, questions).astype(np.int32),
          'weight': np.ones(questions, np.float32)}
