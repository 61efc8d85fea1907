import numpy as np
import pytest

from tests.conftest import tiny_config
from ucam_jax import input_pipeline
from ucam_jax.text import Vocabulary, tokenize


def test_tokenize_and_unknown_words():
  assert tokenize('What colour is the Shape?') == ['what', 'colour', 'is', 'the', 'shape']
  vocab = Vocabulary.build(['is there a red shape?', 'what shape is in the image?'])
  tokens, length = vocab.encode('is there a purple shape?', max_length=8)
  assert length == 5
  assert vocab.decode(tokens, length) == ['is', 'there', 'a', '<unk>', 'shape']
  assert tokens[length:].tolist() == [0, 0, 0]
  tokens, length = vocab.encode('a a a a a a a a a a', max_length=4)
  assert length == 4 and tokens.tolist() == [vocab.words.index('a')] * 4


def test_vocabulary_round_trip(tmp_path):
  vocab = Vocabulary.build(['is there a red shape?'])
  vocab.save(tmp_path / 'v.json')
  assert Vocabulary.load(tmp_path / 'v.json') == vocab


@pytest.fixture(scope='module')
def table(builder):
  return input_pipeline.question_table(builder, 'train')


@pytest.fixture(scope='module')
def groups(builder, table):
  vocab = Vocabulary.build(table.question)
  source = input_pipeline.data_source(builder, 'train')
  return input_pipeline.QuestionGroups(source, table, vocab, size=8, max_question_length=10)


def test_question_table_and_vocabulary(builder, table):
  assert len(table.question) == len(table.answer) == len(table.image_id) == 38_575
  source = builder.as_data_source('train')
  for index in (0, 1234, 38_574):
    example = source[index]
    assert table.question[index] == example['question'].decode()
    assert table.answer[index] == example['answer']
    assert table.image_id[index] == example['image_id']
  vocab = Vocabulary.build(table.question)
  assert vocab.words[:2] == ('<pad>', '<unk>')
  assert {'circle', 'rectangle', 'triangle', 'teal', 'not', 'contain'} <= set(vocab.words)


def test_question_groups_hold_every_question_once_with_its_image(builder, table, groups):
  records = [r for group in groups.groups for r in group]
  assert sorted(records) == list(range(38_575))
  assert max(len(g) for g in groups.groups) == 8
  source = builder.as_data_source('train')
  for index in (0, 17, len(groups) - 1):
    group, item = groups.groups[index], groups[index]
    for record in group:
      assert table.image_id[record] == table.image_id[group[0]]
    np.testing.assert_array_equal(item['image'], source[group[0]]['image'])
    n = len(group)
    assert item['weight'].tolist() == [1.0] * n + [0.0] * (8 - n)
    np.testing.assert_array_equal(item['answer'][:n], table.answer[group])
    words = groups.vocab.decode(item['question'][0], item['length'][0])
    assert ' '.join(words) == ' '.join(tokenize(table.question[group[0]]))


def _batches(groups, config, start_step, n):
  it = input_pipeline.train_batches(groups, config, start_step)
  return [next(it) for _ in range(n)]


def test_train_batches_are_deterministic_and_resumable(groups, data_dir):
  config = tiny_config(data_dir)
  first = _batches(groups, config, 0, 4)
  again = _batches(groups, config, 0, 4)
  resumed = _batches(groups, config, 2, 2)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = _batches(groups, tiny_config(data_dir, seed=1), 0, 1)[0]
  assert not np.array_equal(other_seed['question'], first[0]['question'])
  batch = first[0]
  assert batch['image'].shape == (config.batch_size, 64, 64, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['question'].shape == (config.batch_size, 8, config.max_question_length)
  assert batch['answer'].shape == batch['weight'].shape == (config.batch_size, 8)
  assert (batch['length'][batch['weight'] > 0] > 0).all()


def test_epochs_are_shuffled_differently(builder, table, data_dir):
  small = input_pipeline.QuestionTable(table.question[:200], table.answer[:200],
                                       table.image_id[:200])
  groups = input_pipeline.QuestionGroups(input_pipeline.data_source(builder, 'train'), small,
                                         Vocabulary.build(small.question), 8, 10)
  config = tiny_config(data_dir, batch_size=8)
  n = len(groups)
  ids = np.concatenate([b['image_id'] for b in _batches(groups, config, 0, (2 * n) // 8 + 1)])
  first, second = ids[:n], ids[n:2 * n]
  expected = sorted(small.image_id[g[0]] for g in groups.groups)
  assert sorted(first) == sorted(second) == expected  # Each epoch sees every group once...
  assert not np.array_equal(first, second)  # ...in a new order.


def test_eval_batches_cover_the_split_once(builder, data_dir, table):
  vocab = Vocabulary.build(table.question)
  config = tiny_config(data_dir, eval_batch_size=2048)
  source = input_pipeline.data_source(builder, 'test', with_mask=True)
  batches, num_batches = input_pipeline.eval_batches(source, vocab, config, with_mask=True)
  batches = list(batches)
  assert len(batches) == num_batches == 5
  weights = np.concatenate([b['weight'] for b in batches])
  assert weights.sum() == 9_673 and weights[:9_673].all()
  assert batches[-1]['mask'].shape == (2048, 64, 64)
