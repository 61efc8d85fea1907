import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.conftest import make_source_dir
from ucam_jax.datasets import easy_vqa


def test_counts_answers_and_features(builder):
  info = builder.info
  assert info.splits['train'].num_examples == 38_575
  assert info.splits['test'].num_examples == 9_673
  assert info.features['answer'].num_classes == 13
  example = builder.as_data_source('test')[0]
  assert example['image'].shape == (64, 64, 3) and example['image'].dtype == np.uint8
  assert example['mask'].shape == (64, 64, 1)
  assert isinstance(example['question'], bytes)
  assert int(example['image_id']) >= 0


def test_masks_cover_the_shape_and_nothing_else(builder):
  source = builder.as_data_source('train')
  rng = np.random.default_rng(0)
  for index in rng.choice(len(source), 200, replace=False):
    example = source[int(index)]
    mask = example['mask'][..., 0] > 0
    area = mask.mean()
    # A shape covers from about 0.5% (a 6x6 triangle) to a quarter of the image.
    assert 0.005 < area < 0.6, (index, area)
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert border.mean() < 0.5
    # Pixels inside the mask share (roughly) one colour that differs from the background.
    image = example['image'].astype(float)
    inside, outside = image[mask].mean(0), image[~mask].mean(0)
    assert np.abs(inside - outside).max() > easy_vqa.MASK_THRESHOLD


def test_shape_mask_on_a_drawn_square():
  image = np.full((64, 64, 3), 240, np.uint8)
  image[10:20, 30:50] = (200, 0, 0)
  mask = easy_vqa.shape_mask(image)
  expected = np.zeros((64, 64), bool)
  expected[10:20, 30:50] = True
  np.testing.assert_array_equal(mask, expected)


def _build(source_dir, data_dir):
  builder = easy_vqa.EasyVqa(source_dir=source_dir, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def test_build_is_deterministic(tmp_path):
  source = make_source_dir(tmp_path / 'source')
  first = _build(source, tmp_path / 'a').as_data_source('train')
  second = _build(source, tmp_path / 'b').as_data_source('train')
  assert len(first) == len(second) == 6
  for i in range(len(first)):
    a, b = first[i], second[i]
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_missing_image_names_the_file(tmp_path):
  source = make_source_dir(tmp_path / 'source')
  missing = os.path.join(source, 'train', 'images', '1.png')
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=r'1\.png is missing.*pip install'):
    _build(source, tmp_path / 'data')


def test_corrupt_image_names_the_file(tmp_path):
  source = make_source_dir(tmp_path / 'source')
  corrupt = os.path.join(source, 'test', 'images', '2.png')
  with open(corrupt, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n this is not an image')
  with pytest.raises(ValueError, match=r'2\.png is corrupt'):
    _build(source, tmp_path / 'data')


def test_unreadable_questions_file(tmp_path):
  source = make_source_dir(tmp_path / 'source')
  with open(os.path.join(source, 'train', 'questions.json'), 'w') as f:
    f.write('[["what shape', )
  with pytest.raises(ValueError, match='questions.json'):
    _build(source, tmp_path / 'data')
