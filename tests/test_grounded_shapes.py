"""Grounded shapes: determinism, exact masks, answers checked by an independent oracle, the
pipeline reading it, and clear errors for settings that cannot work."""

import collections
import glob
import os
import re

import ml_collections
import numpy as np
import pytest

from configs import grounded_shapes as gs_config
from tests.conftest import tiny_config
from ucam_jax import input_pipeline
from ucam_jax.datasets import grounded_shapes as gs
from ucam_jax.text import Vocabulary, tokenize

SETTINGS = dict(seed=3, num_train_images=6, num_test_images=4, image_size=48, min_objects=2,
                max_objects=4, questions_per_image=6)


def _build(data_dir, **overrides):
  builder = gs.GroundedShapes(data_dir=str(data_dir), **{**SETTINGS, **overrides})
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('grounded_shapes'))


def _examples(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


# An oracle written apart from the generator: it reads the question text and answers it from the
# objects' pixels. It returns (family, answer, indices of the objects the mask must cover).

def _matching(objects, words):
  """The objects that a description such as 'red', 'circles', 'blue square' fits."""
  colours = [w for w in words if w in gs.COLOURS]
  shapes = [w.removesuffix('s') for w in words if w.removesuffix('s') in gs.SHAPES]
  assert len(colours) + len(shapes) + words.count('object') + words.count('objects') == len(words)
  return [i for i, o in enumerate(objects)
          if all(o.colour == c for c in colours) and all(o.shape == s for s in shapes)]


def _pixels(o):
  rows, cols = np.nonzero(o.mask)
  return rows.min(), rows.max(), cols.min(), cols.max()


def _oracle(objects, question):
  everything = list(range(len(objects)))
  if m := re.fullmatch(r'what colour is the (\w+)\?', question):
    [i] = _matching(objects, [m[1]])  # Exactly one object: the question is unambiguous.
    return 'attribute', objects[i].colour, [i]
  if m := re.fullmatch(r'what shape is the (\w+) object\?', question):
    [i] = _matching(objects, [m[1]])
    return 'attribute', objects[i].shape, [i]
  if m := re.fullmatch(r'is there an? (.+)\?', question):
    found = _matching(objects, m[1].split())
    return 'existence', 'yes' if found else 'no', found or everything
  if m := re.fullmatch(r'how many (.+) are there\?', question):
    found = _matching(objects, m[1].split())
    return 'counting', str(len(found)), found or everything
  m = re.fullmatch(r'what (shape|colour) is (?:the object )?(left of|right of|above|below) '
                   r'the (.+)\?', question)
  assert m, question
  [anchor] = _matching(objects, m[3].split())
  top, bottom, left, right = _pixels(objects[anchor])
  strict, partial = [], []
  for i, o in enumerate(objects):
    if i == anchor:
      continue
    t, b, l, r = _pixels(o)
    side, beyond = {'left of': (l + r < left + right, r < left),
                    'right of': (l + r > left + right, l > right),
                    'above': (t + b < top + bottom, b < top),
                    'below': (t + b > top + bottom, t > bottom)}[m[2]]
    (strict if beyond else partial if side else []).append(i)
  assert len(strict) == 1 and not partial, question
  target = objects[strict[0]]
  return 'spatial', target.shape if m[1] == 'shape' else target.colour, [anchor, strict[0]]


def _union(objects, indices):
  return np.any([objects[i].mask for i in indices], axis=0)


def _check_objects(scene, image_size):
  """The image is the objects on the background, each pixel one object's colour, each mask the
  shape it names (area relative to its bounding box)."""
  masks = np.array([o.mask for o in scene.objects])
  assert masks.shape == (len(scene.objects), image_size, image_size)
  assert masks.sum(0).max() == 1  # Disjoint.
  np.testing.assert_array_equal(masks.any(0), np.any(scene.image != gs.BACKGROUND, axis=-1))
  for o in scene.objects:
    assert np.all(scene.image[o.mask] == gs.COLOURS[o.colour])
    top, bottom, left, right = _pixels(o)
    fill = o.mask.sum() / ((bottom - top + 1) * (right - left + 1))
    expected = {'square': 1.0, 'circle': np.pi / 4, 'triangle': 0.5}[o.shape]
    assert abs(fill - expected) < 0.12, (o.shape, fill)


def test_features_match_easy_vqa_plus_family(shapes):
  features = shapes.info.features
  assert set(features.keys()) == {'image', 'mask', 'question', 'answer', 'image_id', 'family'}
  assert features['answer'].names == list(gs.ANSWERS)
  assert features['family'].names == list(gs.FAMILIES)
  example = shapes.as_data_source('train')[0]
  assert example['image'].shape == (48, 48, 3) and example['image'].dtype == np.uint8
  assert example['mask'].shape == (48, 48, 1) and example['mask'].dtype == np.uint8
  assert isinstance(example['question'], bytes)


def test_stored_examples_are_the_scenes_with_oracle_answers_and_masks(shapes):
  config = shapes.builder_config
  for split, num_images in (('train', 6), ('test', 4)):
    examples = _examples(shapes, split)
    asked = collections.defaultdict(set)
    for example in examples:
      image_id = int(example['image_id'])
      scene = gs.generate_scene(config, split, image_id)
      np.testing.assert_array_equal(example['image'], scene.image)
      _check_objects(scene, 48)
      question = example['question'].decode()
      family, answer, referred = _oracle(scene.objects, question)
      assert gs.FAMILIES[example['family']] == family, question
      assert gs.ANSWERS[example['answer']] == answer, question
      assert set(np.unique(example['mask'])) <= {0, 255}
      mask = example['mask'][..., 0] > 0
      assert mask.any(), question
      np.testing.assert_array_equal(mask, _union(scene.objects, referred), err_msg=question)
      asked[image_id].add(question)
    assert sorted(asked) == list(range(num_images))
    for image_id, questions in asked.items():
      scene = gs.generate_scene(config, split, image_id)
      assert questions == {q.question for q in scene.questions}
      assert len(questions) == len(scene.questions) == 6  # Distinct questions, all kept.


def test_oracle_agrees_on_many_scenes():
  config = gs.make_config(**{**SETTINGS, 'image_size': 64, 'max_objects': 5})
  families = collections.Counter()
  for image_id in range(300):
    scene = gs.generate_scene(config, 'train', image_id)
    _check_objects(scene, 64)
    for q in scene.questions:
      family, answer, referred = _oracle(scene.objects, q.question)
      assert (q.family, q.answer) == (family, answer), q
      np.testing.assert_array_equal(scene.mask(q), _union(scene.objects, referred))
      families[family] += 1
  assert min(families.values()) > 0.15 * sum(families.values()), families


def test_answers_are_balanced():
  config = gs.make_config(**SETTINGS)
  questions = [q for i in range(300) for q in gs.generate_scene(config, 'train', i).questions]
  existence = [q.answer for q in questions if q.family == 'existence']
  assert 0.4 < existence.count('yes') / len(existence) < 0.6
  counts = collections.Counter(q.answer for q in questions if q.family == 'counting')
  assert len(counts) >= 4 and max(counts.values()) < 0.45 * sum(counts.values()), counts
  summary = gs.summary('train', 300, questions)
  assert 'existence' in summary and 'yes:' in summary


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, shapes):
  again = _build(tmp_path / 'again')
  files = sorted(glob.glob(os.path.join(shapes.data_dir, '*.array_record*')))
  assert len(files) == 2
  for path in files:
    with open(path, 'rb') as f, open(os.path.join(again.data_dir, os.path.basename(path)),
                                     'rb') as g:
      assert f.read() == g.read(), path
  other = _build(tmp_path / 'other', seed=4).as_data_source('train')
  first = shapes.as_data_source('train')
  assert not all(np.array_equal(other[i]['image'], first[i]['image']) for i in range(6))


def test_settings_name_the_build_directory(tmp_path):
  directories = {gs.GroundedShapes(data_dir=str(tmp_path), **{**SETTINGS, key: value}).data_dir
                 for key, value in [('seed', 3), ('seed', 4), ('num_train_images', 7),
                                    ('num_test_images', 5), ('image_size', 64),
                                    ('min_objects', 3), ('max_objects', 3),
                                    ('questions_per_image', 2)]}
  assert len(directories) == 8


def test_pipeline_reads_it(tmp_path):
  config = tiny_config(str(tmp_path))
  config.dataset = 'grounded_shapes'
  config.dataset_kwargs = ml_collections.ConfigDict(SETTINGS)
  builder = input_pipeline.get_builder(config)
  table = input_pipeline.question_table(builder, 'train')
  vocab = Vocabulary.build(table.question)
  groups = input_pipeline.QuestionGroups(input_pipeline.data_source(builder, 'train'), table,
                                         vocab, config.questions_per_image,
                                         config.max_question_length)
  assert len(groups) == 6  # 6 questions per image fit one group of 8.
  group = groups[0]
  assert group['image'].shape == (48, 48, 3) and group['weight'].sum() == 6
  test = input_pipeline.data_source(builder, 'test', with_mask=True)
  batches, num_batches = input_pipeline.eval_batches(test, vocab, config, with_mask=True)
  [batch] = list(batches)
  assert num_batches == 1 and batch['weight'].sum() == 24
  assert batch['mask'].shape == (config.eval_batch_size, 48, 48) and batch['mask'].dtype == bool
  assert batch['mask'][:24].any(axis=(1, 2)).all()


def test_project_config_questions_fit_without_truncation():
  config = gs_config.get_config()
  settings = config.dataset_kwargs.to_dict()
  gs.make_config(**settings)  # Valid.
  scenes = [gs.generate_scene(gs.make_config(**settings), 'train', i) for i in range(200)]
  longest = max(len(tokenize(q.question)) for s in scenes for q in s.questions)
  assert longest <= config.max_question_length


@pytest.mark.parametrize('overrides, message', [
    (dict(image_size=16), r'image_size=16 is too small'),
    (dict(max_objects=6), r'max_objects=6 objects do not fit in image_size=48'),
    (dict(max_objects=7, image_size=200), r'max_objects=7 exceeds 6'),
    (dict(min_objects=3, max_objects=2), r'max_objects=2 is below min_objects=3'),
    (dict(num_train_images=0), r'num_train_images=0 must be at least 1'),
    (dict(questions_per_image=0), r'questions_per_image=0 must be at least 1'),
    (dict(image_size=64.0), r'image_size must be an integer'),
])
def test_bad_settings_name_the_setting(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    gs.GroundedShapes(data_dir=str(tmp_path), **{**SETTINGS, **overrides})


def test_families_mask_picks_the_families_asked_and_names_the_build():
  assert '_families' not in gs.make_config(**SETTINGS).name  # Every family: the old name.
  config = gs.make_config(**{**SETTINGS, 'families': 0b0101})  # attribute and counting
  assert config.name.endswith('_families5')
  everything = gs.make_config(**SETTINGS)
  for image_id in range(20):
    scene = gs.generate_scene(config, 'train', image_id)
    assert scene.questions and {q.family for q in scene.questions} <= {'attribute', 'counting'}
    # The image and objects do not depend on the families asked.
    np.testing.assert_array_equal(scene.image, gs.generate_scene(everything, 'train',
                                                                 image_id).image)
  with pytest.raises(ValueError, match='families'):
    gs.make_config(**{**SETTINGS, 'families': 16})
