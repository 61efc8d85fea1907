"""Data in: TFDS array_record sources read with grain, tokenised, batched, deterministic by seed.

Training reads *question groups*: one image with up to `questions_per_image` of its questions, so
the image stem runs once for all of them (easy-VQA has ~10 questions per image; the stem is most
of the cost). A training batch is a pure function of (seed, step): the pipeline is a random-access
grain `MapDataset`, so resuming at step s starts reading at batch s, with no iterator state.
Evaluation reads one question at a time, in order.
"""

import collections
import dataclasses

import os

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from ucam_jax.datasets.easy_vqa import EasyVqa
from ucam_jax.datasets.grounded_shapes import GroundedShapes
from ucam_jax.text import Vocabulary

BUILDERS = {'easy_vqa': EasyVqa, 'grounded_shapes': GroundedShapes}


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared (built once into `config.data_dir`) on first use.

  An optional `config.dataset_kwargs` (a ConfigDict) holds the builder's own settings.
  """
  if config.dataset not in BUILDERS:
    raise ValueError(f'Unknown dataset {config.dataset!r}; known: {sorted(BUILDERS)}.')
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  builder = BUILDERS[config.dataset](data_dir=data_dir, **(config.get('dataset_kwargs') or {}))
  builder.download_and_prepare()
  return builder


def data_source(builder, split: str, with_mask: bool = False):
  """Random-access source of decoded examples; training skips decoding the attention mask."""
  decoders = None if with_mask else {'mask': tfds.decode.SkipDecoding()}
  return builder.as_data_source(split, decoders=decoders)


@dataclasses.dataclass(frozen=True)
class QuestionTable:
  """Every question of a split, without the images: [n] arrays in record order."""
  question: list[str]
  answer: np.ndarray
  image_id: np.ndarray


def question_table(builder, split: str) -> QuestionTable:
  skip = tfds.decode.SkipDecoding()
  source = builder.as_data_source(split, decoders={'image': skip, 'mask': skip})
  # Chunked reads: array_record reads a list of records several times faster than one by one.
  chunks = (range(i, min(i + 4096, len(source))) for i in range(0, len(source), 4096))
  examples = [example for chunk in chunks for example in source.__getitems__(chunk)]
  return QuestionTable(question=[e['question'].decode() for e in examples],
                       answer=np.array([e['answer'] for e in examples], np.int32),
                       image_id=np.array([e['image_id'] for e in examples], np.int32))


class QuestionGroups:
  """Random-access source of (image, up to `size` of its questions); grain reads it like a list.

  Each image's questions, in record order, are cut into groups of at most `size`; a group is
  padded to `size` questions with `weight` 0. The order of groups is fixed (by image id).
  """

  def __init__(self, source, table: QuestionTable, vocab: Vocabulary, size: int,
               max_question_length: int):
    by_image = collections.defaultdict(list)
    for index, image_id in enumerate(table.image_id):
      by_image[int(image_id)].append(index)
    self.groups = [records[i:i + size] for _, records in sorted(by_image.items())
                   for i in range(0, len(records), size)]
    self.source, self.table, self.vocab = source, table, vocab
    self.size, self.max_question_length = size, max_question_length

  def __len__(self) -> int:
    return len(self.groups)

  def __getitem__(self, index: int):
    records = self.groups[index]
    tokens = np.zeros((self.size, self.max_question_length), np.int32)
    lengths = np.zeros(self.size, np.int32)
    for i, record in enumerate(records):
      tokens[i], lengths[i] = self.vocab.encode(self.table.question[record],
                                                self.max_question_length)
    answers = np.zeros(self.size, np.int32)
    answers[:len(records)] = self.table.answer[records]
    return {'image': self.source[records[0]]['image'], 'question': tokens, 'length': lengths,
            'answer': answers, 'weight': (np.arange(self.size) < len(records)).astype(np.float32),
            'image_id': self.table.image_id[records[0]]}


class Preprocess(grain.transforms.Map):
  """TFDS example -> model inputs: uint8 image, question ids and length, answer id; with_mask:
  the ground-truth attention 'mask' [H, W] bool; the question 'family' where the split has it."""

  def __init__(self, vocab: Vocabulary, max_question_length: int, with_mask: bool = False):
    self.vocab = vocab
    self.max_question_length = max_question_length
    self.with_mask = with_mask

  def map(self, example):
    tokens, length = self.vocab.encode(example['question'].decode(), self.max_question_length)
    out = {'image': example['image'], 'question': tokens, 'length': np.int32(length),
           'answer': np.int32(example['answer']), 'image_id': np.int32(example['image_id'])}
    if self.with_mask:
      out['mask'] = example['mask'][..., 0] > 0
    if 'family' in example:  # Grounded shapes: the evaluation reports accuracy per family.
      out['family'] = np.int32(example['family'])
    return out


def local_batch_size(global_batch_size: int) -> int:
  processes, devices = jax.process_count(), jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'batch_size {global_batch_size} must be a multiple of the number of devices '
                     f'({devices}); set --config.batch_size accordingly.')
  return global_batch_size // processes


def train_batches(groups: QuestionGroups, config, start_step: int = 0):
  """Endless training batches of `config.batch_size` question groups from `start_step` on, each
  process reading its own slice. Arrays: image [b, H, W, 3] uint8; question [b, g, length];
  length, answer, weight [b, g] (g = questions_per_image).

  Every epoch is shuffled differently; the order depends only on `config.seed`. Process p reads
  rows [p * b_local, (p + 1) * b_local) of each global batch, so the global batch, row for row, is
  the one that a single process reads: dropout masks, which follow the row, do not depend on the
  number of processes.
  """
  ds = grain.MapDataset.source(groups).seed(config.seed).shuffle().repeat()
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  ds = ds[jax.process_index()::jax.process_count()]
  return iter(ds[start_step:].to_iter_dataset(read_options(config)))


def eval_batches(source, vocab: Vocabulary, config, with_mask: bool = False):
  """The whole split once, in order, in batches of `config.eval_batch_size`; the last one is
  padded to full size, with `weight` 0 on the padding. Each process reads its rows of every
  batch (as in `train_batches`); returns (this process's batches, number of batches)."""
  batch_size = local_batch_size(config.eval_batch_size)
  local = grain.MapDataset.source(source).map(
      Preprocess(vocab, config.max_question_length, with_mask))
  local = local.batch(batch_size, drop_remainder=False).map(lambda b: pad_batch(b, batch_size))
  processes, index = jax.process_count(), jax.process_index()
  num_batches = -(-len(local) // processes)

  def nth(k):
    # Every process must run every batch (each is a collective): past the end of the split, a
    # process repeats the last batch with weight 0.
    if k * processes + index < len(local):
      return local[k * processes + index]
    return {**local[len(local) - 1], 'weight': np.zeros(batch_size, np.float32)}

  ds = grain.MapDataset.range(num_batches).map(nth)
  return ds.to_iter_dataset(read_options(config)), num_batches


def pad_batch(batch, size: int):
  n = len(batch['answer'])
  padded = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}
  padded['weight'] = (np.arange(size) < n).astype(np.float32)
  return padded


def read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=config.data_threads, prefetch_buffer_size=4)
