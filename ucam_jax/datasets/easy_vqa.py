"""TFDS builder for easy-VQA, read from the files shipped inside the PyPI package `easy-vqa`.

Nothing is downloaded: the images and questions come with `pip install easy-vqa==1.0`. The builder
writes array_record, so the data is read back with `tfds.data_source` and grain, without TensorFlow.
"""

import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ucam_jax.errors import MissingFiles

IMAGE_SIZE = 64
# A pixel belongs to the shape when some channel differs from the background by more than this.
# The shapes are saturated colours on a pale background; anti-aliased edge pixels fall either side.
MASK_THRESHOLD = 48


def default_source_dir() -> str:
  """The `data/` folder inside the installed `easy_vqa` package."""
  try:
    import easy_vqa
  except ImportError as e:
    raise ImportError(
        'easy-VQA is read from the PyPI package `easy-vqa`; install it with '
        '`pip install -r requirements.txt`.') from e
  return os.path.join(os.path.dirname(easy_vqa.__file__), 'data')


def shape_mask(image: np.ndarray) -> np.ndarray:
  """Ground-truth attention: pixels whose colour differs from the background.

  Args:
    image: [h, w, 3] uint8, one shape on a uniform background.
  Returns:
    [h, w] bool. The background colour is the most frequent colour of the image border.
  """
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  colours, counts = np.unique(border, axis=0, return_counts=True)
  background = colours[np.argmax(counts)].astype(np.int16)
  return np.abs(image.astype(np.int16) - background).max(axis=-1) > MASK_THRESHOLD


def read_image(path: str) -> tuple[bytes, np.ndarray]:
  """Returns the PNG bytes of one image and its decoded [64, 64, 3] uint8 pixels.

  Raises a ValueError that names the file when it is missing, unreadable or not 64x64 RGB.
  """
  reinstall = ('The easy-VQA files come from the `easy-vqa` package: reinstall it with '
               '`pip install --force-reinstall easy-vqa==1.0`.')
  if not os.path.exists(path):
    raise MissingFiles(f'easy-VQA image {path} is missing. {reinstall}')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as im:
      pixels = np.asarray(im.convert('RGB'))
  except Exception as e:  # PIL raises several types for broken files.
    raise ValueError(f'easy-VQA image {path} is corrupt and cannot be decoded ({e}). '
                     f'{reinstall}') from e
  if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f'easy-VQA image {path} has shape {pixels.shape}, expected '
                     f'({IMAGE_SIZE}, {IMAGE_SIZE}, 3). {reinstall}')
  return data, pixels


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of a [h, w] or [h, w, 3] uint8 array (TFDS would need TensorFlow to encode it)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


class EasyVqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """easy-VQA: 64x64 images of one coloured shape, templated questions, 13 answers."""

  # A name of our own, and no entry in TFDS's global registry (we build the class directly): an
  # import never collides with another library's builder of the same dataset.
  name = 'ucam_easy_vqa'

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'easy-vqa 1.0 from PyPI, with shape masks.'}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir or default_source_dir()
    kwargs.setdefault('file_format', tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(**kwargs)

  def answers(self) -> list[str]:
    with open(os.path.join(self._source_dir, 'answers.txt')) as f:
      return [line.strip() for line in f if line.strip()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'mask': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format='png'),
            'question': tfds.features.Text(),
            'answer': tfds.features.ClassLabel(names=self.answers()),
            'image_id': np.int32,
        }),
        homepage='https://github.com/vzhou842/easy-VQA',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split):
    questions_path = os.path.join(self._source_dir, split, 'questions.json')
    try:
      with open(questions_path) as f:
        questions = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f'Cannot read the easy-VQA questions {questions_path} ({e}); reinstall '
                       'the package with `pip install --force-reinstall easy-vqa==1.0`.') from e
    images = {}  # image id -> (png bytes, mask png bytes); about ten questions share an image.
    for index, (question, answer, image_id) in enumerate(questions):
      if image_id not in images:
        path = os.path.join(self._source_dir, split, 'images', f'{image_id}.png')
        png, pixels = read_image(path)
        images[image_id] = png, encode_png(shape_mask(pixels).astype(np.uint8) * 255)
      png, mask = images[image_id]
      yield index, {'image': png, 'mask': mask, 'question': question, 'answer': answer,
                    'image_id': image_id}
