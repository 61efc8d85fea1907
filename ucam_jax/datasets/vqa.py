"""TFDS builder for VQA v1 / v2 and the VQA-HAT human attention maps, from the official files.

Nothing is downloaded: the official archives are unzipped by the user into a manual directory,
passed as `Vqa(manual_dir=...)` or as TFDS's `DownloadConfig(manual_dir=...)`. Layout, with
the official file names (v2 prefixes the JSON files with `v2_`):

  <manual_dir>/
    OpenEnded_mscoco_train2014_questions.json   questions (Questions_Train_mscoco.zip)
    OpenEnded_mscoco_val2014_questions.json     (Questions_Val_mscoco.zip)
    mscoco_train2014_annotations.json           answers (Annotations_Train_mscoco.zip)
    mscoco_val2014_annotations.json             (Annotations_Val_mscoco.zip)
    train2014/COCO_train2014_<12-digit image id>.jpg    COCO images (train2014.zip)
    val2014/COCO_val2014_<12-digit image id>.jpg        (val2014.zip)
    optional, questions without answers (splits 'test' and 'test_dev', for --mode=predict):
      OpenEnded_mscoco_test2015_questions.json, OpenEnded_mscoco_test-dev2015_questions.json
      (Questions_Test_mscoco.zip), test2015/COCO_test2015_<12-digit image id>.jpg; a test split
      whose images (grid configs: store) are not there is left out of the build, with a warning
    config 'v1_hat' only: vqahat_val/<question_id>_<n>.png, n = 1, 2, ...: one grey-scale
      map per annotator (vqahat_val.zip of VQA-HAT, Das et al. 2016)

Configs: 'v1' and 'v2' (splits train, validation, and test / test_dev when their questions are
present); 'v1_hat' (split validation: only the VQA v1 val questions that have VQA-HAT maps);
'v1_grid', 'v2_grid', 'v1_hat_grid': the same with ResNet-152 grid features instead of images;
'v1_questions', 'v2_questions', 'v1_hat_questions': the same with neither (the examples keep
`image_id`; training and evaluation read each grid from its store, see below).
A missing file is one `MissingFilesError` naming every missing file, where it comes from and
the doc to read. `Vqa.fingerprint` digests the official files, so a run can check that moved
data is the data it was trained on.

Grid configs read the features from the stores that `python -m ucam_jax.extract_features`
writes (docs/grid_features.md), one per image folder, `Vqa(features_dir=...)` (default
<manual_dir>/grid_features):
    <features_dir>/train2014/, val2014/, test2015/     (`grid_store.GridStore`)
and need no COCO image.

One example per question (key: question_id):
  image [S, S, 3] uint8   the COCO image resized to S = config.image_size (448: ResNet-152 at
                          448 px gives the published 14x14 grid), squashed, not cropped, so the
                          grid and the HAT maps cover the whole image; stored as JPEG (q=90).
  question, question_type ("what color is the"), answer_type ('yes/no', 'number', 'other')
  question_id int64, image_id int32
  answers                 the 10 human answers, as the official evaluation compares them
                          (`vqa_answers.ground_truth_answers`); [] for the test splits
  multiple_choice_answer  the most common human answer, as released
  hat_maps [m, S, S, 1]   ('v1_hat', 'v1_hat_grid') the m annotators' maps on the image's
                          pixel grid
  grid [h, w, c] float16  (grid configs, instead of image) the image's grid features, each cell
                          L2-normalised over channels (SPEC section 3), as stored
Every image is stored once per question: about 50 kB at 448 px, or 784 kB for a 14x14x2048
float16 grid (v1 train: 248k questions, about 190 GB). The '_questions' configs store neither:
`ucam_jax.input_pipeline` (config.features = 'grid') looks each question's grid up by `image_id`
in the store of its split's image folder (`Vqa.open_grid_store`: memory-mapped, each image
once on disk); they need only the JSON files (and the HAT maps) to build.

`Vqa(image_size=S)` builds any config at another image size S (its name gains `_<S>px`, so
builds at different sizes never share a directory): e.g. small images for a from-scratch stem.
"""

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from ucam_jax import vqa_answers
from ucam_jax.datasets import grid_store
from ucam_jax.errors import MissingFiles

VQA_URL = 'https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/'
VQA_PAGES = {'v1': 'https://visualqa.org/vqa_v1_download.html',
             'v2': 'https://visualqa.org/download.html'}
COCO_URL = 'http://images.cocodataset.org/zips/'
COCO_PAGE = 'https://cocodataset.org/#download'
HAT_URL = 'http://s3.amazonaws.com/vqa-hat/vqahat_val.zip'
HAT_PAGE = 'https://abhishekdas.com/vqa-hat/'
HAT_DIR = 'vqahat_val'
FEATURES_DIR = 'grid_features'  # default store root, inside the manual directory
EXTRACT_COMMAND = 'python -m ucam_jax.extract_features'
DOC = 'README.md (Real VQA) and the layout in ucam_jax/datasets/vqa.py'
FEATURES_DOC = 'docs/grid_features.md'
JPEG_QUALITY = 90
# Missing images of a folder that is there are listed up to this many, then counted.
MAX_LISTED_IMAGES = 20


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """One TFDS split and the official files it is read from."""
  name: str            # TFDS split name
  subtype: str         # `data_subtype` in the official file names
  image_subtype: str   # folder of its images (test-dev2015 is a subset of test2015)
  archive: str         # the official question / annotation archives: <v2_>Questions_<archive>
  annotated: bool      # train and val have answers; test2015 has questions only


SPLITS = (
    SplitFiles('train', 'train2014', 'train2014', 'Train', annotated=True),
    SplitFiles('validation', 'val2014', 'val2014', 'Val', annotated=True),
    SplitFiles('test', 'test2015', 'test2015', 'Test', annotated=False),
    SplitFiles('test_dev', 'test-dev2015', 'test2015', 'Test', annotated=False),
)


def _prefix(version: str) -> str:
  return 'v2_' if version == 'v2' else ''


def question_file(version: str, subtype: str) -> str:
  return f'{_prefix(version)}OpenEnded_mscoco_{subtype}_questions.json'


def annotation_file(version: str, subtype: str) -> str:
  return f'{_prefix(version)}mscoco_{subtype}_annotations.json'


def image_file(subtype: str, image_id: int) -> str:
  return os.path.join(subtype, f'COCO_{subtype}_{image_id:012d}.jpg')


@dataclasses.dataclass(frozen=True)
class Missing:
  """A missing file or folder and where it comes from."""
  path: str
  source: str


class MissingFilesError(MissingFiles):
  """Files of the manual directory are missing; `missing` lists them all. One message, without
  a traceback, in training, evaluation and extraction (`errors.MissingFiles`)."""

  def __init__(self, what: str, manual_dir: str, missing: Sequence[Missing]):
    self.missing = list(missing)
    lines = [f'{what} cannot be built: {len(self.missing)} file(s) or folder(s) are missing '
             f'from the manual directory {manual_dir}:']
    for m in self.missing:
      lines += [f'  {m.path}', f'      from {m.source}']
    stores = any(EXTRACT_COMMAND in m.source for m in self.missing)
    files = any(EXTRACT_COMMAND not in m.source for m in self.missing)
    steps = []
    if files:
      steps.append(f'download each archive and unzip it into {manual_dir} so that the files '
                   'have exactly these paths (JSON files at the top, images in their '
                   '<split>2014 folders)')
    if stores:
      steps.append('run each extract_features command named above')
    docs = ([DOC] if files else []) + ([FEATURES_DOC] if stores else [])
    lines.append(f'To fix: {" and ".join(steps)}, then run again. See {" and ".join(docs)}.')
    super().__init__('\n'.join(lines))


# ------------------------------------------------------------------------ visual input


class CocoImages:
  """Visual input from the COCO JPEGs: each image resized (squashed, not cropped) to
  [size, size, 3] and re-encoded as JPEG.

  The builder talks to its visual input only through `features`, `missing` and `encode`; a
  grid-feature store (e.g. 14x14xC ResNet features indexed by image id) is another class with
  the same three methods.
  """

  def __init__(self, size: int):
    self.size = size

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {'image': tfds.features.Image(shape=(self.size, self.size, 3),
                                         encoding_format='jpeg')}

  def missing(self, manual_dir: str, subtype: str, image_ids: Sequence[int]) -> list[Missing]:
    """The images of `image_ids` that are not there: the folder when it is missing, else the
    first MAX_LISTED_IMAGES missing files and a count of the rest."""
    source = f'COCO {subtype} images, {COCO_URL}{subtype}.zip (see {COCO_PAGE})'
    folder = os.path.join(manual_dir, subtype)
    if not os.path.isdir(folder):
      return [Missing(folder + os.sep, source)]
    absent = [p for p in (os.path.join(manual_dir, image_file(subtype, i))
                          for i in sorted(set(image_ids))) if not os.path.exists(p)]
    out = [Missing(p, source) for p in absent[:MAX_LISTED_IMAGES]]
    if len(absent) > MAX_LISTED_IMAGES:
      out.append(Missing(f'... and {len(absent) - MAX_LISTED_IMAGES} more images in {folder} '
                         f'({len(absent)} of the {len(set(image_ids))} its questions use)',
                         source))
    return out

  def encode(self, manual_dir: str, subtype: str, image_id: int) -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.fromarray(load_coco_image(manual_dir, subtype, image_id, self.size)).save(
        buffer, format='JPEG', quality=JPEG_QUALITY)
    return {'image': buffer.getvalue()}


def load_coco_image(manual_dir: str, subtype: str, image_id: int, size: int) -> np.ndarray:
  """[size, size, 3] uint8 RGB: the COCO image squashed (not cropped) to size x size, bicubic.
  The image configs store it, `extract_features` computes the grid from it."""
  path = os.path.join(manual_dir, image_file(subtype, image_id))
  try:
    with Image.open(path) as im:
      # COCO has some grey-scale and CMYK JPEGs.
      im = im.convert('RGB').resize((size, size), Image.Resampling.BICUBIC)
  except OSError as e:
    raise ValueError(f'COCO image {path} cannot be decoded ({e}); download it again from '
                     f'{COCO_URL}{subtype}.zip.') from e
  return np.asarray(im)


def split_of(image_subtype: str) -> SplitFiles:
  """The first split whose images are in this folder (test2015: 'test', a superset of
  'test_dev')."""
  return next(s for s in SPLITS if s.image_subtype == image_subtype)


class GridFeatures:
  """Visual input from precomputed grid features: one `grid_store.GridStore` per image folder,
  at <root>/<image subtype> (root: `Vqa(features_dir=...)`, default <manual_dir>/grid_features).

  grid_shape: the [h, w, c] the config expects, checked against the store's; version: only
  for the command named when a store is missing.
  """

  def __init__(self, grid_shape: Sequence[int], root: str | None = None, version: str = 'v1'):
    self.grid_shape = tuple(grid_shape)
    self.root = root
    self.version = version
    self._stores = {}

  def store_path(self, manual_dir: str, subtype: str) -> str:
    return os.path.join(self.root or os.path.join(manual_dir, FEATURES_DIR), subtype)

  def command(self, manual_dir: str, subtype: str) -> str:
    """The command that writes the store of `subtype`."""
    out = self.root or os.path.join(manual_dir, FEATURES_DIR)
    return (f'{EXTRACT_COMMAND} --manual_dir={manual_dir} '
            f'--version={self.version} --split={split_of(subtype).name} --features_dir={out} '
            '--weights=<ResNet .npz, see docs/grid_features.md>')

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {'grid': tfds.features.Tensor(shape=self.grid_shape, dtype=grid_store.DTYPE)}

  def store(self, manual_dir: str, subtype: str) -> grid_store.GridStore:
    """The store of `subtype` (opened once), checked to hold grids of `grid_shape`."""
    path = self.store_path(manual_dir, subtype)
    if path not in self._stores:
      store = grid_store.GridStore(path)
      if store.grid_shape != self.grid_shape:
        raise ValueError(f'The grid-feature store {path} holds grids of shape '
                         f'{store.grid_shape}; this config expects {self.grid_shape}. Extract '
                         f'them again with `{self.command(manual_dir, subtype)}` and the '
                         'weights and --image_size the config is for, or choose the config '
                         'that fits.')
      self._stores[path] = store
    return self._stores[path]

  def missing(self, manual_dir: str, subtype: str, image_ids: Sequence[int]) -> list[Missing]:
    """The store when it is not there (or interrupted), else the first MAX_LISTED_IMAGES image
    ids it lacks and a count of the rest."""
    path = self.store_path(manual_dir, subtype)
    source = (f'the grid-feature store of {subtype}, written by '
              f'`{self.command(manual_dir, subtype)}`')
    if not grid_store.is_store(path):
      if os.path.isdir(grid_store.partial_path(path)):
        source += f' (interrupted at {grid_store.partial_path(path)}: run it again to resume)'
      return [Missing(path + os.sep, source)]
    store = self.store(manual_dir, subtype)
    absent = [i for i in sorted(set(image_ids)) if i not in store]
    out = [Missing(f'{path}: image {i}', source) for i in absent[:MAX_LISTED_IMAGES]]
    if len(absent) > MAX_LISTED_IMAGES:
      out.append(Missing(f'... and {len(absent) - MAX_LISTED_IMAGES} more images in {path} '
                         f'({len(absent)} of the {len(set(image_ids))} its questions use)',
                         source))
    return out

  def encode(self, manual_dir: str, subtype: str, image_id: int) -> dict[str, np.ndarray]:
    return {'grid': self.store(manual_dir, subtype)[image_id]}


class NoVisualInput:
  """No visual input in the examples ('_questions' configs): only their `image_id`."""

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {}

  def missing(self, manual_dir: str, subtype: str, image_ids: Sequence[int]) -> list[Missing]:
    del manual_dir, subtype, image_ids  # Readers check the store (`Vqa.open_grid_store`).
    return []

  def encode(self, manual_dir: str, subtype: str, image_id: int) -> dict:
    del manual_dir, subtype, image_id
    return {}


# --------------------------------------------------------------------------- VQA-HAT


def hat_index(hat_dir: str) -> dict[int, list[str]]:
  """question_id -> paths of its VQA-HAT maps `<question_id>_<n>.png|jpg`, ordered by n."""
  found = {}
  for name in os.listdir(hat_dir):
    match = re.fullmatch(r'(\d+)_(\d+)\.(?:png|jpe?g)', name, re.IGNORECASE)
    if match:
      found.setdefault(int(match[1]), []).append((int(match[2]), os.path.join(hat_dir, name)))
  return {qid: [path for _, path in sorted(maps)] for qid, maps in found.items()}


def encode_hat_map(path: str, size: int) -> bytes:
  """PNG bytes of one HAT map, grey-scale, resized (squashed, like the image) to [size, size]."""
  try:
    with Image.open(path) as im:
      im = im.convert('L').resize((size, size), Image.Resampling.BILINEAR)
  except OSError as e:
    raise ValueError(f'VQA-HAT map {path} cannot be decoded ({e}); download {HAT_URL} '
                     'again.') from e
  buffer = io.BytesIO()
  im.save(buffer, format='PNG')
  return buffer.getvalue()


def _area_weights(out: int, n: int) -> np.ndarray:
  """[out, n]: the share of input cell y in output cell i (its overlap / the cell's length)."""
  edges = np.arange(out + 1) * (n / out)
  lo = np.maximum(edges[:-1, None], np.arange(n)[None])
  hi = np.minimum(edges[1:, None], np.arange(n)[None] + 1)
  return np.clip(hi - lo, 0, None) / (n / out)


def resize_attention(maps, grid: int | tuple[int, int]) -> np.ndarray:
  """Area-average resize of attention maps: [..., h, w] -> [..., gh, gw] float64.

  Each output cell is the mean of the map over the cell's area, input cells cut by a cell
  border counting by the fraction inside; for h, w multiples of gh, gw this is average pooling.
  `grid` is gh = gw or (gh, gw), e.g. 14 for the published 14x14 grid.
  """
  gh, gw = (grid, grid) if isinstance(grid, int) else grid
  maps = np.asarray(maps, np.float64)
  if maps.ndim < 2:
    raise ValueError(f'maps must be [..., h, w], got shape {maps.shape}.')
  h, w = maps.shape[-2:]
  return np.einsum('ay,...yx,bx->...ab', _area_weights(gh, h), maps, _area_weights(gw, w))


def human_attention(hat_maps, grid: int | tuple[int, int]) -> np.ndarray:
  """The human attention target of one question at the model's grid, [gh, gw] in [0, 1].

  `hat_maps`: [m, S, S, 1] or [m, S, S] uint8, the m annotators' maps (`hat_maps` feature).
  Each is resized with `resize_attention` and the m results averaged; score a model map
  against it with `metrics.spearman_per_example`.
  """
  maps = np.asarray(hat_maps)
  if maps.ndim == 4 and maps.shape[-1] == 1:
    maps = maps[..., 0]
  if maps.ndim != 3 or len(maps) == 0:
    raise ValueError(f'hat_maps must be [m >= 1, S, S(, 1)], got shape {maps.shape}.')
  return resize_attention(maps / 255.0, grid).mean(axis=0)


# --------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class VqaConfig(tfds.core.BuilderConfig):
  """vqa_version: 'v1' or 'v2' (file names); image_size: side S of the stored images and HAT
  maps (grid configs: of the images the features were computed from); hat: keep only the val
  questions with VQA-HAT maps and add them (v1 only); grid_shape: None stores the images,
  (h, w, c) the grid features of that shape from the feature stores instead; questions_only:
  store no visual input at all (readers take the grid from its store by image_id)."""
  vqa_version: str = 'v1'
  image_size: int = 448
  hat: bool = False
  grid_shape: tuple[int, int, int] | None = None
  questions_only: bool = False  # Neither image nor grid: readers look grids up by image_id.


RESNET152_GRID = (14, 14, 2048)  # ResNet-152 at 448 px


def _load_json(path: str, key: str) -> list[dict]:
  try:
    with open(path) as f:
      data = json.load(f)
    return data[key]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path} is not an official VQA file with a {key!r} list ({e!r}); '
                     'download it again.') from e


class Vqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """VQA v1 / v2 (and VQA-HAT) from the official files in a manual directory."""

  name = 'ucam_vqa'  # Not registered with TFDS (whose own 'vqa' names may collide): see EasyVqa.

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VQA v1 / v2 from the official JSON and COCO images; VQA-HAT val.'}
  BUILDER_CONFIGS = [
      VqaConfig(name='v1', vqa_version='v1', description='VQA v1 (Antol et al. 2015).'),
      VqaConfig(name='v2', vqa_version='v2', description='VQA v2 (Goyal et al. 2017).'),
      VqaConfig(name='v1_hat', vqa_version='v1', hat=True,
                description='VQA v1 val questions with VQA-HAT maps (Das et al. 2016).'),
      VqaConfig(name='v1_grid', vqa_version='v1', grid_shape=RESNET152_GRID,
                description='VQA v1 with ResNet-152 grid features.'),
      VqaConfig(name='v2_grid', vqa_version='v2', grid_shape=RESNET152_GRID,
                description='VQA v2 with ResNet-152 grid features.'),
      VqaConfig(name='v1_hat_grid', vqa_version='v1', hat=True, grid_shape=RESNET152_GRID,
                description='VQA-HAT questions with ResNet-152 grid features.'),
      VqaConfig(name='v1_questions', vqa_version='v1', questions_only=True,
                description='VQA v1 questions and answers; grids are read by image_id.'),
      VqaConfig(name='v2_questions', vqa_version='v2', questions_only=True,
                description='VQA v2 questions and answers; grids are read by image_id.'),
      VqaConfig(name='v1_hat_questions', vqa_version='v1', hat=True, questions_only=True,
                description='VQA-HAT questions and maps; grids are read by image_id.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def __init__(self, *, manual_dir: str | None = None, features_dir: str | None = None,
               image_size: int | None = None, **kwargs):
    """features_dir: the root of the grid-feature stores (grid configs, `open_grid_store`;
    default <manual_dir>/grid_features). image_size: build the config at this image size
    instead (see the module docstring)."""
    self._manual_dir = manual_dir
    self._features_dir = features_dir
    self._left_out = {}  # manual_dir -> `left_out`
    if image_size is not None:
      config = kwargs.get('config') or self.BUILDER_CONFIGS[0]
      if isinstance(config, str):
        named = {c.name: c for c in self.BUILDER_CONFIGS}
        if config not in named:
          raise ValueError(f'Unknown VQA config {config!r}; known: {sorted(named)}.')
        config = named[config]
      if image_size != config.image_size:
        config = dataclasses.replace(config, name=f'{config.name}_{image_size}px',
                                     image_size=image_size)
      kwargs['config'] = config
    kwargs.setdefault('file_format', tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(**kwargs)

  @functools.cached_property
  def _visual(self) -> 'CocoImages | GridFeatures | NoVisualInput':
    config = self.builder_config
    if config.questions_only:
      return NoVisualInput()
    if config.grid_shape is None:
      return CocoImages(config.image_size)
    return GridFeatures(config.grid_shape, self._features_dir, config.vqa_version)

  def split_files(self, split: str) -> SplitFiles:
    """The official files of TFDS split `split` ('train', 'validation', ...)."""
    for s in SPLITS:
      if s.name == split:
        return s
    raise ValueError(f'Unknown VQA split {split!r}; known: {[s.name for s in SPLITS]}.')

  def open_grid_store(self, split: str, grid_shape: Sequence[int],
                      image_ids: Sequence[int]) -> grid_store.GridStore:
    """The grid-feature store of `split`'s image folder, checked to hold every image of
    `image_ids` with grids of `grid_shape`; else one MissingFilesError naming the command that
    writes it (or a ValueError for another shape)."""
    if self._manual_dir is None:
      raise ValueError('Reading grid features needs the manual directory: pass '
                       'Vqa(manual_dir=...) (config.dataset_kwargs.manual_dir).')
    manual_dir = os.fspath(self._manual_dir)
    subtype = self.split_files(split).image_subtype
    features = GridFeatures(grid_shape, self._features_dir, self.builder_config.vqa_version)
    missing = features.missing(manual_dir, subtype, [int(i) for i in image_ids])
    if missing:
      raise MissingFilesError(f'VQA {self.builder_config.name} {split} with grid features',
                              manual_dir, missing)
    return features.store(manual_dir, subtype)

  def image_path(self, split: str, image_id: int) -> str | None:
    """The COCO image file of `image_id` in `split`'s folder; None without a manual dir."""
    if self._manual_dir is None:
      return None
    return os.path.join(os.fspath(self._manual_dir),
                        image_file(self.split_files(split).image_subtype, int(image_id)))

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    features = {
        **self._visual.features(),
        'question': tfds.features.Text(),
        'question_id': np.int64,
        'image_id': np.int32,
        'question_type': tfds.features.Text(),
        'answer_type': tfds.features.Text(),
        'answers': tfds.features.Sequence(tfds.features.Text()),
        'multiple_choice_answer': tfds.features.Text(),
    }
    if config.hat:
      size = config.image_size
      features['hat_maps'] = tfds.features.Sequence(
          tfds.features.Image(shape=(size, size, 1), encoding_format='png'))
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds.features.FeaturesDict(features),
        homepage=HAT_PAGE if config.hat else VQA_PAGES[config.vqa_version])

  def _splits(self, manual_dir: str) -> list[SplitFiles]:
    """The splits to build: train and val always (val only for HAT); test and test_dev only
    when their questions and their visual input (test2015 images or store) are all there."""
    return [s for s in self._candidate_splits(manual_dir) if s.name not in
            self.left_out(manual_dir)]

  def _candidate_splits(self, manual_dir: str) -> list[SplitFiles]:
    config = self.builder_config
    if config.hat:
      return [s for s in SPLITS if s.name == 'validation']
    return [s for s in SPLITS if s.annotated or os.path.exists(
        os.path.join(manual_dir, question_file(config.vqa_version, s.subtype)))]

  def left_out(self, manual_dir: str) -> dict[str, str]:
    """{split: why} for the test splits whose questions are there but not their visual input:
    they are optional (they have no answers; only --mode=predict reads them), so the build
    leaves them out instead of failing."""
    if manual_dir in self._left_out:
      return self._left_out[manual_dir]
    out = self._left_out[manual_dir] = {}
    for split in self._candidate_splits(manual_dir):
      if split.annotated:
        continue
      path = os.path.join(manual_dir, question_file(self.builder_config.vqa_version,
                                                    split.subtype))
      ids = [q['image_id'] for q in _load_json(path, 'questions')]
      missing = self._visual.missing(manual_dir, split.image_subtype, ids)
      if missing:
        out[split.name] = (f'{len(missing)} of its inputs are missing, e.g. {missing[0].path} '
                           f'(from {missing[0].source})')
    return out

  def why_left_out(self, split: str) -> str:
    """Why the build leaves out `split` (see `left_out`); '' when it does not or cannot say."""
    if self._manual_dir is None:
      return ''
    return self.left_out(os.fspath(self._manual_dir)).get(split, '')

  def fingerprint(self) -> dict[str, str]:
    """{file name: SHA-256 prefix} of the official files in the manual directory that this
    config reads (the JSON files of its splits; VQA-HAT: a digest of the maps' names and sizes):
    what the data is, wherever it lies. Empty without a manual directory."""
    if self._manual_dir is None:
      return {}
    manual_dir = os.fspath(self._manual_dir)
    version = self.builder_config.vqa_version
    out = {}
    for split in self._candidate_splits(manual_dir):
      for name in (question_file(version, split.subtype), annotation_file(version, split.subtype)):
        path = os.path.join(manual_dir, name)
        if os.path.exists(path):
          digest = hashlib.sha256()
          with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 22), b''):
              digest.update(chunk)
          out[name] = digest.hexdigest()[:16]
    hat_dir = os.path.join(manual_dir, HAT_DIR)
    if self.builder_config.hat and os.path.isdir(hat_dir):
      listing = sorted((n, os.path.getsize(os.path.join(hat_dir, n))) for n in os.listdir(hat_dir))
      out[HAT_DIR] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return out

  def check_files(self, manual_dir: str) -> None:
    """Raises one MissingFilesError naming every missing file of this config."""
    version = self.builder_config.vqa_version
    page = VQA_PAGES[version]
    missing = []
    for split in self._splits(manual_dir):
      files = {'Questions': question_file(version, split.subtype)}
      if split.annotated:
        files['Annotations'] = annotation_file(version, split.subtype)
      for kind, name in files.items():
        if not os.path.exists(os.path.join(manual_dir, name)):
          archive = f'{_prefix(version)}{kind}_{split.archive}_mscoco.zip'
          missing.append(Missing(os.path.join(manual_dir, name),
                                 f'VQA {version} {split.subtype} {kind.lower()}, '
                                 f'{VQA_URL}{archive} (see {page})'))
      questions_path = os.path.join(manual_dir, files['Questions'])
      # Without the questions, which images are needed is unknown: only the folder is checked.
      image_ids = ([q['image_id'] for q in _load_json(questions_path, 'questions')]
                   if os.path.exists(questions_path) else [])
      missing += self._visual.missing(manual_dir, split.image_subtype, image_ids)
    if self.builder_config.hat and not os.path.isdir(os.path.join(manual_dir, HAT_DIR)):
      missing.append(Missing(os.path.join(manual_dir, HAT_DIR) + os.sep,
                             f'VQA-HAT val maps, {HAT_URL} (see {HAT_PAGE})'))
    missing = list({m.path: m for m in missing}.values())  # test and test_dev share test2015
    if missing:
      raise MissingFilesError(f'VQA {self.builder_config.name}', manual_dir, missing)

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(self._manual_dir or dl_manager.manual_dir)
    self.check_files(manual_dir)  # before writing anything
    left_out = self.left_out(manual_dir)
    if left_out:
      logging.warning('VQA %s: building without the optional split(s) %s: %s. Only '
                      '--mode=predict reads them; to add them later, add the files and delete '
                      'the build (%s/%s under the data directory).',
                      self.builder_config.name, ', '.join(left_out),
                      '; '.join(f'{k}: {v}' for k, v in left_out.items()), self.name,
                      self.builder_config.name)
    return {split.name: self._generate_examples(manual_dir, split)
            for split in self._splits(manual_dir)}

  def _generate_examples(self, manual_dir: str, split: SplitFiles):
    config = self.builder_config
    version = config.vqa_version
    questions_path = os.path.join(manual_dir, question_file(version, split.subtype))
    questions = _load_json(questions_path, 'questions')
    annotations = {}
    if split.annotated:
      annotations_path = os.path.join(manual_dir, annotation_file(version, split.subtype))
      annotations = {a['question_id']: a for a in _load_json(annotations_path, 'annotations')}
      unanswered = [q['question_id'] for q in questions if q['question_id'] not in annotations]
      if unanswered:
        raise ValueError(f'{len(unanswered)} questions of {questions_path} have no annotation '
                         f'in {annotations_path} (e.g. question_id {unanswered[:5]}); the two '
                         'files must come from the same VQA version and split.')
    hat = {}
    if config.hat:
      hat = hat_index(os.path.join(manual_dir, HAT_DIR))
      questions = [q for q in questions if q['question_id'] in hat]
      if not questions:
        raise ValueError(f'No VQA-HAT map in {os.path.join(manual_dir, HAT_DIR)} is named '
                         f'<question_id>_<n>.png after a question of {questions_path}.')
    visual = self._visual
    # Questions of one image are consecutive, so each image is decoded and resized once.
    questions = sorted(questions, key=lambda q: (q['image_id'], q['question_id']))
    cached_id, cached = None, None
    for q in questions:
      if q['image_id'] != cached_id:
        cached_id, cached = q['image_id'], visual.encode(
            manual_dir, split.image_subtype, q['image_id'])
      a = annotations.get(q['question_id'], {})
      example = {
          **cached,
          'question': q['question'],
          'question_id': q['question_id'],
          'image_id': q['image_id'],
          'question_type': a.get('question_type', ''),
          'answer_type': a.get('answer_type', ''),
          'answers': vqa_answers.ground_truth_answers(
              [ans['answer'] for ans in a.get('answers', [])]),
          'multiple_choice_answer': a.get('multiple_choice_answer', ''),
      }
      if config.hat:
        example['hat_maps'] = [encode_hat_map(p, config.image_size) for p in hat[q['question_id']]]
      yield q['question_id'], example
