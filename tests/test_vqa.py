"""VQA v1 / v2 and VQA-HAT: the builder on tiny files in the official formats, the official
answer normalisation and accuracy, the answer vocabulary and soft targets, HAT resizing."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ucam_jax import metrics
from ucam_jax import vqa_answers as va
from ucam_jax.datasets import vqa

# image_id -> questions: (question, question_type, answer_type, 10 answers, multiple choice).
# Answers are as released (already normalised) except 'umbrella.', which the official script
# cleans because the answers disagree.
TRAIN = {
    9: [('Is there a dog?', 'is there a', 'yes/no', ['yes'] * 10, 'yes'),
        ('How many plates are there?', 'how many', 'number', ['2'] * 6 + ['3'] * 3 + ['4'], '2')],
    25: [('What color is the cat?', 'what color is the', 'other',
          ['black'] * 5 + ['black and white'] * 3 + ['gray', 'grey'], 'black')],
}
VAL = {
    42: [('Is it raining?', 'is it', 'yes/no', ['no'] * 9 + ['yes'], 'no'),
         ('What is the man holding?', 'what is the man', 'other',
          ['umbrella'] * 4 + ['umbrella.'] + ['red umbrella'] * 3 + ['cane', 'stick'], 'umbrella')],
    73: [('How many people are there?', 'how many', 'number', ['3'] * 5 + ['4'] * 5, '3')],
}
TEST = {1: [('What is this?',)]}
IMAGE_HW = (24, 32)


def question_id(version, image_id, k):
  # The official ids: image_id * 10 + k in v1, image_id * 1000 + k in v2.
  return image_id * (1000 if version == 'v2' else 10) + k


def write_split(root, version, subtype, image_subtype, table, annotated=True):
  """The official question / annotation JSON of one split and its COCO JPEGs."""
  questions, annotations = [], []
  for image_id, qas in table.items():
    for k, qa in enumerate(qas):
      qid = question_id(version, image_id, k)
      questions.append({'image_id': image_id, 'question': qa[0], 'question_id': qid})
      if annotated:
        _, question_type, answer_type, answers, mc = qa
        annotations.append({
            'question_id': qid, 'image_id': image_id, 'question_type': question_type,
            'answer_type': answer_type, 'multiple_choice_answer': mc,
            'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j + 1}
                        for j, a in enumerate(answers)]})
    folder = os.path.join(root, image_subtype)
    os.makedirs(folder, exist_ok=True)
    pixels = np.random.default_rng(image_id).integers(0, 256, (*IMAGE_HW, 3), np.uint8)
    image = Image.fromarray(pixels)
    if image_id == 25:
      image = image.convert('L')  # COCO has grey-scale JPEGs
    image.save(os.path.join(root, vqa.image_file(image_subtype, image_id)))
  info = {'description': 'tiny fixture', 'version': '1.0', 'year': 2015}
  license_ = {'name': 'Creative Commons Attribution 4.0 International License'}
  with open(os.path.join(root, vqa.question_file(version, subtype)), 'w') as f:
    json.dump({'info': info, 'task_type': 'Open-Ended', 'data_type': 'mscoco',
               'license': license_, 'data_subtype': subtype, 'questions': questions}, f)
  if annotated:
    with open(os.path.join(root, vqa.annotation_file(version, subtype)), 'w') as f:
      json.dump({'info': info, 'license': license_, 'data_subtype': subtype,
                 'annotations': annotations}, f)


def hat_map(quadrant):
  """A 24x32 grey-scale map, bright on one quadrant (0 = top left, 1 = top right)."""
  m = np.zeros(IMAGE_HW, np.uint8)
  h, w = IMAGE_HW[0] // 2, IMAGE_HW[1] // 2
  m[:h, quadrant * w:(quadrant + 1) * w] = 255
  return m


def make_manual_dir(root, version, test=False, hat=False):
  os.makedirs(root, exist_ok=True)
  write_split(root, version, 'train2014', 'train2014', TRAIN)
  write_split(root, version, 'val2014', 'val2014', VAL)
  if test:
    write_split(root, version, 'test2015', 'test2015', TEST, annotated=False)
  if hat:
    os.makedirs(os.path.join(root, vqa.HAT_DIR))
    # Two annotators on question 420, one on 421, none on 730.
    for name, quadrant in (('420_1.png', 0), ('420_2.png', 0), ('421_1.png', 1)):
      Image.fromarray(hat_map(quadrant)).save(os.path.join(root, vqa.HAT_DIR, name))
  return str(root)


def build(manual_dir, data_dir, config):
  builder = vqa.Vqa(config=config, manual_dir=manual_dir, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def by_question(builder, split):
  source = builder.as_data_source(split)
  return {int(e['question_id']): e for e in (source[i] for i in range(len(source)))}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """v1 (train, validation), v2 (with test2015 questions) and v1_hat, built once."""
  root = tmp_path_factory.mktemp('vqa')
  out = {}
  for config, kwargs in (('v1', {'hat': True}), ('v2', {'test': True})):
    out[config] = build(make_manual_dir(root / config, config, **kwargs), root / 'data', config)
  out['v1_hat'] = build(str(root / 'v1'), root / 'data', 'v1_hat')
  return out


# ------------------------------------------------------------------------- builder


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_builder_reads_the_official_files(built, version):
  builder = built[version]
  assert builder.builder_config.name == version
  splits = builder.info.splits
  assert splits['train'].num_examples == 3 and splits['validation'].num_examples == 3
  assert ('test' in splits) == (version == 'v2')  # only v2 was given test2015 questions
  for split, table in (('train', TRAIN), ('validation', VAL)):
    examples = by_question(builder, split)
    for image_id, qas in table.items():
      for k, (question, question_type, answer_type, answers, mc) in enumerate(qas):
        e = examples[question_id(version, image_id, k)]
        assert e['image'].shape == (448, 448, 3) and e['image'].dtype == np.uint8
        assert e['question'].decode() == question
        assert int(e['image_id']) == image_id
        assert e['question_type'].decode() == question_type
        assert e['answer_type'].decode() == answer_type
        assert e['multiple_choice_answer'].decode() == mc
        assert [a.decode() for a in e['answers']] == va.ground_truth_answers(answers)
  # 'umbrella.' is cleaned because the annotators disagree.
  holding = by_question(builder, 'validation')[question_id(version, 42, 1)]
  assert [a.decode() for a in holding['answers']].count('umbrella') == 5
  # The image is the COCO file, resized: compare with the source pixels at low resolution.
  e = by_question(builder, 'validation')[question_id(version, 73, 0)]
  source = np.random.default_rng(73).integers(0, 256, (*IMAGE_HW, 3), np.uint8)
  stored = vqa.resize_attention(np.moveaxis(e['image'], -1, 0), (3, 4))
  expected = vqa.resize_attention(np.moveaxis(source, -1, 0), (3, 4))
  assert np.abs(stored - expected).mean() < 12  # JPEG, twice, on random noise


def test_grey_scale_images_become_rgb(built):
  e = by_question(built['v1'], 'train')[250]
  assert e['image'].shape == (448, 448, 3)
  np.testing.assert_array_equal(e['image'][..., 0], e['image'][..., 1])


def test_test_split_has_questions_without_answers(built):
  [e] = by_question(built['v2'], 'test').values()
  assert int(e['question_id']) == 1000 and e['question'].decode() == 'What is this?'
  assert list(e['answers']) == [] and e['answer_type'].decode() == ''
  assert e['image'].shape == (448, 448, 3)


def test_hat_config_joins_maps_to_their_questions(built):
  builder = built['v1_hat']
  assert list(builder.info.splits.keys()) == ['validation']
  examples = by_question(builder, 'validation')
  assert sorted(examples) == [420, 421]  # 730 has no map
  assert np.shape(examples[420]['hat_maps']) == (2, 448, 448, 1)
  assert np.shape(examples[421]['hat_maps']) == (1, 448, 448, 1)
  assert [a.decode() for a in examples[421]['answers']].count('umbrella') == 5
  for qid, quadrant in ((420, 0), (421, 1)):
    target = vqa.human_attention(examples[qid]['hat_maps'], 2)
    assert target.shape == (2, 2)
    assert target[0, quadrant] > 0.9
    assert np.delete(target.ravel(), quadrant).max() < 0.1
  # At the published 14x14 grid: the source map, squashed to the image's 448 px like the image,
  # then area-averaged; scored with the evaluation suite's rank correlation.
  target = vqa.human_attention(examples[420]['hat_maps'], 14)
  squashed = Image.fromarray(hat_map(0)).resize((448, 448), Image.Resampling.BILINEAR)
  np.testing.assert_allclose(target, vqa.resize_attention(np.asarray(squashed) / 255, 14))
  model = vqa.resize_attention(hat_map(0).astype(float), 14)  # sharp edges, many ties
  assert metrics.spearman_per_example(model[None], target[None])[0] > 0.8
  assert metrics.spearman_per_example(model[None, ::-1], target[None])[0] < 0


def test_hat_index_orders_annotators_and_ignores_other_files(tmp_path):
  for name in ('5_2.png', '5_1.png', '7_1.jpg', 'README.txt', '5_x.png'):
    (tmp_path / name).write_bytes(b'')
  index = vqa.hat_index(str(tmp_path))
  assert index == {5: [str(tmp_path / '5_1.png'), str(tmp_path / '5_2.png')],
                   7: [str(tmp_path / '7_1.jpg')]}


# -------------------------------------------------------------------- missing files


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_empty_manual_dir_lists_every_file_and_its_source(tmp_path, version):
  builder = vqa.Vqa(config=version, manual_dir=str(tmp_path), data_dir=str(tmp_path / 'd'))
  with pytest.raises(vqa.MissingFilesError) as error:
    builder.download_and_prepare()
  prefix = 'v2_' if version == 'v2' else ''
  expected = [f'{prefix}OpenEnded_mscoco_train2014_questions.json',
              f'{prefix}mscoco_train2014_annotations.json', 'train2014' + os.sep,
              f'{prefix}OpenEnded_mscoco_val2014_questions.json',
              f'{prefix}mscoco_val2014_annotations.json', 'val2014' + os.sep]
  assert [m.path for m in error.value.missing] == [os.path.join(tmp_path, e) for e in expected]
  message = str(error.value)
  for name in expected:
    assert os.path.join(tmp_path, name) in message
  for url in (f'https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/{prefix}Questions_Train_mscoco.zip',
              f'https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/{prefix}Annotations_Val_mscoco.zip',
              'http://images.cocodataset.org/zips/train2014.zip',
              'http://images.cocodataset.org/zips/val2014.zip', vqa.VQA_PAGES[version]):
    assert url in message
  assert 'unzip it into' in message
  # No extract_features command is named, so none is asked for; the doc to read is.
  assert 'extract_features' not in message and vqa.DOC in message


def test_missing_files_stop_training_with_one_message(tmp_path):
  """The command's message is the error's alone: no traceback, no unrelated hint."""
  from configs import base_vqa  # pylint: disable=import-outside-toplevel
  from ucam_jax import cli, train  # pylint: disable=import-outside-toplevel
  config = base_vqa.get_config()
  config.update(data_dir=str(tmp_path / 'data'), batch_size=8)
  config.dataset_kwargs.manual_dir = str(tmp_path / 'empty')
  os.makedirs(config.dataset_kwargs.manual_dir)
  with pytest.raises(SystemExit) as stop:
    cli.run(train.train_and_evaluate, config, str(tmp_path / 'run'))
  message = stop.value.code
  assert message.startswith('VQA v1_questions cannot be built: 4 file(s)')
  assert 'Traceback' not in message and 'For example' not in message


def test_test_splits_without_their_images_are_left_out(tmp_path, caplog):
  root = make_manual_dir(tmp_path / 'manual', 'v1', test=True)
  shutil.rmtree(os.path.join(root, 'test2015'))
  with caplog.at_level('WARNING'):
    builder = build(root, tmp_path / 'data', 'v1')
  assert sorted(builder.info.splits) == ['train', 'validation']
  [line] = [r.getMessage() for r in caplog.records if 'optional split' in r.getMessage()]
  assert 'VQA v1: building without the optional split(s) test:' in line
  assert os.path.join(root, 'test2015') + os.sep in line and 'test2015.zip' in line
  assert builder.left_out(root).keys() == {'test'}


def test_partly_missing_files_are_all_listed_in_one_error(tmp_path):
  root = make_manual_dir(tmp_path / 'manual', 'v1', hat=True)
  removed = [vqa.question_file('v1', 'train2014'), vqa.annotation_file('v1', 'val2014'),
             vqa.image_file('val2014', 73)]
  for name in removed:
    os.remove(os.path.join(root, name))
  with pytest.raises(vqa.MissingFilesError) as error:
    build(root, tmp_path / 'data', 'v1')
  assert [m.path for m in error.value.missing] == [os.path.join(root, n) for n in removed]
  assert 'Questions_Train_mscoco.zip' in error.value.missing[0].source
  assert 'val2014.zip' in error.value.missing[2].source
  # The HAT config needs only val, and the maps.
  builder = vqa.Vqa(config='v1_hat', manual_dir=root, data_dir=str(tmp_path / 'd2'))
  os.rename(os.path.join(root, vqa.HAT_DIR), os.path.join(root, 'elsewhere'))
  with pytest.raises(vqa.MissingFilesError) as error:
    builder.check_files(root)
  assert [m.path for m in error.value.missing] == [
      os.path.join(root, n) for n in removed[1:] + [vqa.HAT_DIR + os.sep]]
  assert vqa.HAT_URL in str(error.value)


def test_many_missing_images_are_counted(tmp_path, monkeypatch):
  monkeypatch.setattr(vqa, 'MAX_LISTED_IMAGES', 1)
  root = make_manual_dir(tmp_path / 'manual', 'v1')
  for image_id in (9, 25):
    os.remove(os.path.join(root, vqa.image_file('train2014', image_id)))
  with pytest.raises(vqa.MissingFilesError, match=r'and 1 more images .*2 of the 2'):
    vqa.Vqa(config='v1', manual_dir=root, data_dir=str(tmp_path / 'd')).check_files(root)


def test_questions_without_annotations_are_an_error(tmp_path):
  root = make_manual_dir(tmp_path / 'manual', 'v1')
  path = os.path.join(root, vqa.annotation_file('v1', 'val2014'))
  with open(path) as f:
    data = json.load(f)
  data['annotations'] = data['annotations'][:1]
  with open(path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=r'2 questions .* no annotation'):
    build(root, tmp_path / 'data', 'v1')


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize('raw, normalised', [
    ('Two', '2'),
    ('the dog.', 'dog'),
    ('dont', "don't"),
    ('Whats', "what's"),
    ('10,000', '10000'),  # digit-comma-digit: every punctuation mark is deleted, not spaced
    ('10,000 people, really?', '10000 people really'),
    ('red,blue', 'red blue'),
    ('red, blue', 'red blue'),
    ('hello , world', 'hello world'),
    ('3.5', '3.5'),
    ('1.', '1'),
    ('a.m.', 'am'),
    ('yes!', 'yes'),
    ('(red)', 'red'),
    ('t-shirt', 't shirt'),
    ('left/right', 'left right'),
    ('none', '0'),
    ('one two ten eleven', '1 2 10 eleven'),
    ('An apple', 'apple'),
    ('A', ''),
    ('2:30', '2:30'),
    ("child's", "child's"),
    ("I'm", "i'm"),
    ('Im', 'im'),  # the table's capitalised key "Im" never matches a lower-cased word
    ("somebody'd", 'somebodyd'),  # as published
    ('\tYes \n', 'yes'),
    ('.' * 33, '.'),  # vqaEval passes re.UNICODE (32) as the count of periods to strip
])
def test_normalize_answer_matches_the_official_script(raw, normalised):
  assert va.normalize_answer(raw) == normalised


def test_normalisation_is_idempotent():
  for raw in ('Two dogs.', '10,000', 'the t-shirt!', 'dont', "somebody'd", 'a.m.', '1.5.'):
    once = va.normalize_answer(raw)
    assert va.normalize_answer(once) == once


def test_ground_truth_is_cleaned_only_when_annotators_disagree():
  assert va.ground_truth_answers(['Dog.'] * 10) == ['Dog.'] * 10
  assert va.ground_truth_answers(['dog.', 'dog', 'Two']) == ['dog', 'dog', 'Two']
  # Only punctuation, as published: a lone '!' becomes a space that is not stripped.
  assert va.ground_truth_answers(['yes!', 'yes']) == ['yes ', 'yes']


# ----------------------------------------------------------------------- accuracy


def reference_accuracy(pred, answers):
  """A transcription of vqaEval.evaluate for one question, on answer dicts."""
  gts = [{'answer': a, 'answer_id': j} for j, a in enumerate(answers)]
  res = va.normalize_answer(pred)
  if len({g['answer'] for g in gts}) > 1:
    for g in gts:
      g['answer'] = va.process_punctuation(g['answer'])
  accs = []
  for g in gts:
    others = [o for o in gts if o != g]
    accs.append(min(1, len([o for o in others if o['answer'] == res]) / 3))
  return sum(accs) / len(accs)


def test_official_accuracy_per_answer_type():
  cases = [
      ('Yes', ['yes'] * 10, 'yes/no', 1.0),
      ('no', ['yes'] * 10, 'yes/no', 0.0),
      ('Two', ['2'] * 3 + ['3'] * 7, 'number', 0.9),
      ('3', ['2'] * 3 + ['3'] * 7, 'number', 1.0),
      ('4', ['4'] + ['5'] * 9, 'number', 0.3),
      ('the umbrella.', ['umbrella'] * 2 + ['umbrella.'] + ['cane'] * 7, 'other', 0.9),
      ('dog', ['dog.'] * 10, 'other', 0.0),  # unanimous answers are not cleaned
      ('red', ['red'] * 2 + ['blue'] * 8, 'other', 0.6),
  ]
  preds, humans, types, expected = zip(*cases)
  result = va.official_accuracy(preds, humans, types, question_types=['q'] * len(cases))
  reference = [reference_accuracy(p, h) for p, h in zip(preds, humans)]
  np.testing.assert_allclose(result.per_question, reference)
  np.testing.assert_allclose(result.per_question, expected)
  assert result.overall == pytest.approx(np.mean(expected))
  assert result.per_answer_type == pytest.approx(
      {'yes/no': 0.5, 'number': np.mean([0.9, 1.0, 0.3]), 'other': np.mean([0.9, 0.0, 0.6])})
  assert result.per_question_type == pytest.approx({'q': np.mean(expected)})
  with pytest.raises(ValueError, match='Mismatched lengths'):
    va.official_accuracy(preds, humans, types[:-1])


def test_official_accuracy_on_built_examples(built):
  examples = list(by_question(built['v2'], 'validation').values())
  humans = [[a.decode() for a in e['answers']] for e in examples]
  types = [e['answer_type'].decode() for e in examples]
  preds = [e['multiple_choice_answer'].decode() for e in examples]
  result = va.official_accuracy(preds, humans, types)
  expected = {'no': 1.0, 'umbrella': 1.0, '3': 1.0}
  for e, acc in zip(examples, result.per_question):
    assert acc == pytest.approx(expected[e['multiple_choice_answer'].decode()])
  assert set(result.per_answer_type) == {'yes/no', 'number', 'other'}


# -------------------------------------------------------- vocabulary and soft targets


def test_vocabulary_is_top_k_with_deterministic_ties():
  answers = [['yes'] * 6 + ['Two', '2', 'the cat', 'cat'],
             ['no'] * 5 + ['cat', 'dog', 'dog', 'a', 'bird']]
  vocab = va.AnswerVocabulary.build(answers, 4)
  # counts: yes 6, no 5, 2 2, cat 3, dog 2; '' (from 'a') is dropped; ties by string.
  assert vocab.answers == ('yes', 'no', 'cat', '2')
  assert va.AnswerVocabulary.build([a[::-1] for a in answers[::-1]], 4) == vocab
  assert va.AnswerVocabulary.build(answers, 100).answers == ('yes', 'no', 'cat', '2', 'dog',
                                                             'bird')
  assert vocab.index('The cat.') == 2 and vocab.index('zebra') == -1


def test_vocabulary_from_the_built_training_split(built, tmp_path):
  humans = [[a.decode() for a in e['answers']] for e in by_question(built['v1'], 'train').values()]
  vocab = va.AnswerVocabulary.build(humans, 3)
  assert vocab.answers == ('yes', '2', 'black')
  vocab.save(str(tmp_path / 'answers.json'))
  assert va.AnswerVocabulary.load(str(tmp_path / 'answers.json')) == vocab


def test_soft_targets():
  vocab = va.AnswerVocabulary(('umbrella', 'red umbrella', 'cane', 'yes'))
  answers = ['umbrella'] * 4 + ['umbrella.'] + ['red umbrella'] * 3 + ['cane', 'stick']
  np.testing.assert_allclose(vocab.targets(answers, 'count'), [0.5, 0.3, 0.1, 0.0])
  np.testing.assert_allclose(vocab.targets(answers, 'vqa'), [1.0, 0.9, 0.3, 0.0])
  # Each 'vqa' target is the official accuracy of predicting that answer.
  for k, answer in enumerate(vocab.answers):
    expected = va.official_accuracy([answer], [answers], ['other']).overall
    assert vocab.targets(answers, 'vqa')[k] == pytest.approx(expected)
  batch = vocab.batch_targets([answers, ['yes'] * 10], 'count')
  assert batch.shape == (2, 4) and batch.dtype == np.float32
  np.testing.assert_allclose(batch[1], [0, 0, 0, 1])
  with pytest.raises(ValueError, match='kind'):
    vocab.targets(answers, 'softmax')


# -------------------------------------------------------------- attention resizing


def test_resize_attention_is_average_pooling_on_divisible_grids():
  maps = np.random.default_rng(0).random((3, 28, 42))
  expected = maps.reshape(3, 14, 2, 14, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(vqa.resize_attention(maps, 14), expected)


def test_resize_attention_averages_areas_on_other_grids():
  maps = np.random.default_rng(1).random((2, 10, 7))
  # Independent: repeat every cell 5x5 (areas become whole cells), then average-pool.
  fine = maps.repeat(5, axis=1).repeat(5, axis=2)  # [2, 50, 35]
  expected = fine.reshape(2, 5, 10, 7, 5).mean(axis=(2, 4))
  np.testing.assert_allclose(vqa.resize_attention(maps, (5, 7)), expected)
  # Upsampling keeps values; the mean is preserved either way.
  assert vqa.resize_attention(maps, (20, 14)).mean() == pytest.approx(maps.mean())
  np.testing.assert_allclose(vqa.resize_attention(maps[0], (10, 7)), maps[0])
