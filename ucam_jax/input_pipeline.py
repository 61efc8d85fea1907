"""Data in: TFDS array_record sources read with grain, tokenised, batched, deterministic by seed.

Training reads *question groups*: one image with up to `questions_per_image` of its questions, so
the image stem runs once for all of them (easy-VQA has ~10 questions per image; the stem is most
of the cost). A training batch is a pure function of (seed, step): the pipeline is a random-access
grain `MapDataset`, so resuming at step s starts reading at batch s, with no iterator state.
Evaluation reads one question at a time, in order.

VQA (`datasets.vqa`): the answers are the top `config.num_answers` normalised human answers of
the training split (`vqa_answers.AnswerVocabulary`); a training question carries 'targets'
[K], the share of its 10 annotators who gave each answer (SPEC section 4: count / 10), and
'answer', the most common of them in the vocabulary (-1 when none is: such questions are left
out of training and count as wrong in evaluation). `config.features` says what the model reads:
'image' (the examples' pixels) or 'grid' (features looked up by `image_id` in the grid store of
the split's image folder, `Vqa.open_grid_store`: memory-mapped, read once per question group,
never copied per question). The batches keep the key 'image' for either: it is the model's
visual input (`encode_image`).
"""

import collections
import dataclasses
import fcntl
import glob
import os
import shutil

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_sources

from ucam_jax import pretrain_features, storage, vqa_answers
from ucam_jax.datasets import vqa
from ucam_jax.datasets.easy_vqa import EasyVqa
from ucam_jax.datasets.grounded_shapes import GroundedShapes
from ucam_jax.errors import RunError
from ucam_jax.text import Vocabulary

BUILDERS = {'easy_vqa': EasyVqa, 'grounded_shapes': GroundedShapes, 'vqa': vqa.Vqa}
FEATURES = ('image', 'grid')  # config.features: what the model reads.
VISUAL_KEYS = ('image', 'grid')  # The examples' visual input (vqa: one of them, or neither).
SKIP = tfds.decode.SkipDecoding()


def get_builder(config, dataset: str | None = None,
                prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared (built once into `config.data_dir`) on first use.

  `dataset` (default `config.dataset`) is a builder name, or 'name/config' (e.g. 'vqa/v1').
  An optional `config.dataset_kwargs` (a ConfigDict) holds the builder's own settings.
  prepare=False: only its description (features, answer names), nothing read or built.
  """
  name, _, builder_config = (dataset or config.dataset).partition('/')
  if name not in BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; known: {sorted(BUILDERS)}.')
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  # An unset setting (a config's placeholder, None) leaves the builder's default.
  kwargs = {k: v for k, v in (config.get('dataset_kwargs') or {}).items() if v is not None}
  if builder_config:
    kwargs['config'] = builder_config
  builder = BUILDERS[name](data_dir=data_dir, **kwargs)
  if prepare:
    build_once(builder)
  return builder


def build_once(builder) -> None:
  """`builder.download_and_prepare()`, one build at a time per dataset directory (runs with
  other workdirs may share the data directory): an flock on its .build.lock, under which the
  `incomplete.*` directories that killed builds left behind are deleted first (TFDS builds into
  one and renames it when complete, so under the lock none is a live build's). A directory that
  cannot be written (a shared, prepared dataset) is only read."""
  root, lock = os.path.dirname(os.fspath(builder.data_dir)), None
  if storage.is_local(root):
    try:
      os.makedirs(root, exist_ok=True)
      lock = open(os.path.join(root, '.build.lock'), 'a')
    except OSError:
      pass
  if lock is None:
    builder.download_and_prepare()
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Waits for another run's build to end.
    for path in glob.glob(os.path.join(root, 'incomplete.*')):
      shutil.rmtree(path)
    builder.download_and_prepare()


def is_vqa(builder) -> bool:
  """VQA-style answers: 10 human answers per question, no answer label."""
  return 'answers' in builder.info.features


def evaluation_split(builder) -> str:
  """The split evaluation runs on: 'test', or for VQA 'validation' (its test split has no
  answers)."""
  return 'validation' if is_vqa(builder) else 'test'


def data_source(builder, split: str, with_mask: bool = False, features: str = 'image'):
  """Random-access source of decoded examples. Training skips decoding the attention mask;
  with features='grid' the stored image (or grid) is not decoded either. (VQA-HAT maps, a
  sequence, cannot be skipped in numpy decoding; they are only in the small HAT split.)"""
  features_of = builder.info.features
  skipped = [] if with_mask else ['mask']
  if features == 'grid':
    skipped += VISUAL_KEYS
  decoders = {k: SKIP for k in skipped if k in features_of}
  return CheckedSource(builder.as_data_source(split, decoders=decoders or None))


class DamagedDataset(RunError):
  """A dataset record that fails its checksum."""


class CheckedSource:
  """A TFDS data source whose damaged records raise DamagedDataset naming the file and what to
  do: array_record's own error ('Corrupted Riegeli/records file ... at byte N') names neither,
  and every rerun met it again."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getattr__(self, name):
    return getattr(self.source, name)

  def __getitem__(self, index):
    try:
      return self.source[index]
    except RuntimeError as e:
      self._raise_if_damaged(e, index)
      raise

  def __getitems__(self, indices):
    try:
      return self.source.__getitems__(indices)
    except RuntimeError as e:
      for index in indices:  # Which record: only on this rare path.
        self[index]
      self._raise_if_damaged(e, indices[0])
      raise

  def _raise_if_damaged(self, error: RuntimeError, index: int) -> None:
    if 'Riegeli' not in str(error):
      return
    index, path = int(index), None
    for instruction in tfds_sources.file_instructions(self.source.dataset_info, self.source.split):
      if index < instruction.take:
        path = instruction.filename
        break
      index -= instruction.take
    directory = os.path.dirname(path) if path else self.source.dataset_info.data_dir
    raise DamagedDataset(
        f'The dataset file {path or directory} is damaged ({error}). Rebuild the dataset: '
        f'delete {directory} and rerun, which builds it again.') from error


@dataclasses.dataclass(frozen=True)
class QuestionTable:
  """Every question of a split, without the images: [n] arrays in record order.

  VQA also has human_answers (each question's 10, as stored) and answer_type; its `answer`
  is all -1 and `soft_targets` None until `label_answers` sets them.
  """
  question: list[str]
  answer: np.ndarray
  image_id: np.ndarray
  human_answers: list[list[str]] | None = None
  answer_type: list[str] | None = None
  # Per question, the nonzero entries of its soft targets: (answer ids, count / 10).
  soft_targets: list[tuple[np.ndarray, np.ndarray]] | None = None
  question_id: np.ndarray | None = None  # VQA: the official question ids [n] int64.


def question_table(builder, split: str) -> QuestionTable:
  features = builder.info.features
  skipped = ('mask', *VISUAL_KEYS)
  source = CheckedSource(
      builder.as_data_source(split, decoders={k: SKIP for k in skipped if k in features}))
  # Chunked reads: array_record reads a list of records several times faster than one by one.
  chunks = (range(i, min(i + 4096, len(source))) for i in range(0, len(source), 4096))
  examples = [example for chunk in chunks for example in source.__getitems__(chunk)]
  table = QuestionTable(
      question=[e['question'].decode() for e in examples],
      answer=(np.full(len(examples), -1, np.int32) if is_vqa(builder)
              else np.array([e['answer'] for e in examples], np.int32)),
      image_id=np.array([e['image_id'] for e in examples], np.int32))
  if is_vqa(builder):
    table = dataclasses.replace(
        table, human_answers=[[a.decode() for a in e['answers']] for e in examples],
        answer_type=[e['answer_type'].decode() for e in examples],
        question_id=np.array([e['question_id'] for e in examples], np.int64))
  return table


def top_answer(answers: vqa_answers.AnswerVocabulary, human_answers) -> int:
  """The most common of a question's human answers that is in the vocabulary (ties: the more
  frequent one in training), or -1 when none is."""
  return _top(answers.targets(human_answers)) if human_answers else -1


def _top(targets: np.ndarray) -> int:
  """The index of the largest of a question's targets, or -1 when all are 0."""
  return int(targets.argmax()) if targets.any() else -1


def label_answers(table: QuestionTable, answers: vqa_answers.AnswerVocabulary) -> QuestionTable:
  """VQA: `table` with `answer` set to each question's `top_answer` and `soft_targets` to its
  nonzero targets, each from one normalisation of its human answers (not one every epoch)."""
  top, soft = [], []
  for human_answers in table.human_answers:
    targets = answers.targets(human_answers) if human_answers else np.zeros(answers.size)
    top.append(_top(targets))
    ids = np.flatnonzero(targets)
    soft.append((ids, targets[ids]))
  return dataclasses.replace(table, answer=np.array(top, np.int32), soft_targets=soft)


IMAGE_CACHE_BYTES = 1 << 30  # Decoded training images kept in memory (easy-VQA's: 50 MB).


class ImageReader:
  """Visual input from the examples: `reader(record, image_id)` -> the stored image.

  Each image is decoded once: the first `cache_bytes` of decoded images stay in memory, keyed by
  image id (a training run reads every image once an epoch; reading and decoding it again cost
  a third of easy-VQA's training step on 2 cores). Past the budget, images are read each time.
  """

  def __init__(self, source, cache_bytes: int = IMAGE_CACHE_BYTES):
    self.source, self.budget, self.cache = source, cache_bytes, {}

  def __call__(self, record: int, image_id: int):
    image = self.cache.get(image_id)
    if image is None:
      image = self.source[record]['image']
      if image.nbytes * (len(self.cache) + 1) <= self.budget:
        self.cache[image_id] = image
    return image


class GridReader:
  """Visual input from a grid-feature store: `reader(record, image_id)` -> [h, w, c] float16,
  read from the memory map."""

  def __init__(self, store):
    self.store = store

  def __call__(self, record: int, image_id: int):
    return self.store[image_id]


def check_features(config) -> str:
  features = config.get('features', 'image')
  if features not in FEATURES:
    raise ValueError(f'config.features is {features!r}; choose one of {list(FEATURES)}.')
  return features


def visual_reader(builder, split: str, source, table: QuestionTable, config):
  """The reader of the model's visual input for `split` under `config.features`: the examples'
  images, or ('grid') the store of the split's image folder (VQA) or of the frozen extractor
  (`pretrain_features`, the synthetic datasets), checked to hold every image the questions use
  with grids of `config.grid_shape`."""
  if check_features(config) == 'image':
    if 'image' not in builder.info.features:
      raise ValueError(f'vqa/{builder.builder_config.name} stores no images; with '
                       "config.features='image' choose an image config (e.g. 'vqa/v1'), or "
                       "set config.features='grid'.")
    return ImageReader(source)
  if not config.get('grid_shape'):
    raise ValueError("config.features='grid' needs config.grid_shape, the [h, w, c] of the "
                     'stored grids (ResNet-152 at 448 px: (14, 14, 2048)).')
  if not isinstance(builder, vqa.Vqa):  # Synthetic images: the frozen extractor's store.
    if not config.get('extractor'):
      raise ValueError(f"config.features='grid' on {config.dataset} reads the grids of a frozen "
                       'extractor: set config.extractor (ucam_jax/pretrain_features.py).')
    return GridReader(pretrain_features.open_store(builder, split, config, table.image_id))
  return GridReader(builder.open_grid_store(split, tuple(config.grid_shape), table.image_id))


class QuestionGroups:
  """Random-access source of (image, up to `size` of its questions); grain reads it like a list.

  Each image's questions, in record order, are cut into groups of at most `size`; a group is
  padded to `size` questions with `weight` 0. The order of groups is fixed (by image id).
  With `answers` (VQA; `table` labelled by `label_answers`) a group also has 'targets'
  [size, K], and questions without an answer in the vocabulary are left out. `visual` reads
  the visual input (default: the examples' images, `ImageReader(source)`).
  """

  def __init__(self, source, table: QuestionTable, vocab: Vocabulary, size: int,
               max_question_length: int, answers: vqa_answers.AnswerVocabulary | None = None,
               visual=None):
    by_image = collections.defaultdict(list)
    for index, image_id in enumerate(table.image_id):
      if answers is None or table.answer[index] >= 0:
        by_image[int(image_id)].append(index)
    self.groups = [records[i:i + size] for _, records in sorted(by_image.items())
                   for i in range(0, len(records), size)]
    self.source, self.table, self.vocab, self.answers = source, table, vocab, answers
    self.visual = visual or ImageReader(source)
    self.size, self.max_question_length = size, max_question_length
    # Every question tokenised once, not once an epoch: [n, max_question_length], [n].
    encoded = [vocab.encode(q, max_question_length) for q in table.question]
    self.tokens = np.array([t for t, _ in encoded], np.int32).reshape(-1, max_question_length)
    self.lengths = np.array([n for _, n in encoded], np.int32)

  def __len__(self) -> int:
    return len(self.groups)

  def __getitem__(self, index: int):
    records = self.groups[index]
    tokens = np.zeros((self.size, self.max_question_length), np.int32)
    lengths = np.zeros(self.size, np.int32)
    tokens[:len(records)], lengths[:len(records)] = self.tokens[records], self.lengths[records]
    answers = np.zeros(self.size, np.int32)
    answers[:len(records)] = self.table.answer[records]
    image_id = self.table.image_id[records[0]]
    group = {'image': self.visual(records[0], image_id), 'question': tokens, 'length': lengths,
             'answer': answers, 'weight': (np.arange(self.size) < len(records)).astype(np.float32),
             'image_id': image_id}
    if self.answers is not None:
      group['targets'] = np.zeros((self.size, self.answers.size), np.float32)
      for i, record in enumerate(records):
        ids, values = self.table.soft_targets[record]
        group['targets'][i, ids] = values
    return group


class Preprocess(grain.transforms.Map):
  """TFDS example -> model inputs: uint8 image, question ids and length, answer id; with_mask:
  the ground-truth attention 'mask' [H, W] bool; the question 'family' where the split has it.

  VQA: `answers` (the vocabulary) gives 'answer' = `top_answer` (-1: none in the vocabulary);
  `visual` (a `GridReader`) replaces the image with the grid of `image_id`; with_mask and
  `grid` (the model's [h, w]): 'ground_truth' [h, w] float32, the VQA-HAT maps on the grid
  (`vqa.human_attention`).
  """

  def __init__(self, vocab: Vocabulary, max_question_length: int, with_mask: bool = False,
               answers: vqa_answers.AnswerVocabulary | None = None, visual=None,
               grid: tuple[int, int] | None = None):
    self.vocab = vocab
    self.max_question_length = max_question_length
    self.with_mask = with_mask
    self.answers, self.visual, self.grid = answers, visual, grid

  def map(self, example):
    tokens, length = self.vocab.encode(example['question'].decode(), self.max_question_length)
    if self.answers is None:
      answer = example['answer']
    else:
      answer = top_answer(self.answers, [a.decode() for a in example['answers']])
    image = (example['image'] if self.visual is None
             else self.visual(None, int(example['image_id'])))
    out = {'image': image, 'question': tokens, 'length': np.int32(length),
           'answer': np.int32(answer), 'image_id': np.int32(example['image_id'])}
    if self.with_mask and 'hat_maps' in example:
      if self.grid is None:
        raise ValueError('VQA-HAT maps need the model grid: pass Preprocess(grid=(h, w)).')
      out['ground_truth'] = vqa.human_attention(example['hat_maps'], self.grid).astype(
          np.float32)
    elif self.with_mask:
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


def eval_batches(source, vocab: Vocabulary, config, with_mask: bool = False,
                 preprocess: Preprocess | None = None):
  """The whole split once, in order, in batches of `config.eval_batch_size`; the last one is
  padded to full size, with `weight` 0 on the padding. Each process reads its rows of every
  batch (as in `train_batches`); returns (this process's batches, number of batches).
  `preprocess` (default: `Preprocess(vocab, config.max_question_length, with_mask)`) maps each
  example."""
  batch_size = local_batch_size(config.eval_batch_size)
  local = grain.MapDataset.source(source).map(
      preprocess or Preprocess(vocab, config.max_question_length, with_mask))
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
