"""VQA end to end: the answer vocabulary and soft targets in training batches, grids read by
image id, the official accuracy per answer type in the evaluation, the step schedule, and one
short training run (with VQA-HAT) on fixture files in the official formats, evaluated from a
moved copy of its data and answering test-dev in the evaluation server's format."""

import inspect
import json
import os
import shutil

import numpy as np
import optax
import pytest

from configs import base_vqa, san, vqa_v1_san, vqa_v2_san
from tests.test_vqa import TEST, VAL, make_manual_dir, question_id, write_split
from ucam_jax import evaluate, input_pipeline, main, predict, train
from ucam_jax import vqa_answers as va
from ucam_jax.datasets import easy_vqa, grid_store, grounded_shapes, vqa
from ucam_jax.text import Vocabulary

GRID = (2, 2, 8)
TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES = (9, 25), (42, 73), (1,)


def grid_of(image_id):
  """The fixture's grid of one image: distinct per image, cells L2-normalised."""
  x = np.random.default_rng(image_id).random(GRID) + 0.1
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope='module')
def fixture_dir(tmp_path_factory):
  """The official v1 files (with VQA-HAT maps and the test2015 / test-dev2015 questions) and
  grid stores for train2014, val2014 and test2015."""
  root = tmp_path_factory.mktemp('vqa_train')
  manual_dir = make_manual_dir(root / 'manual', 'v1', test=True, hat=True)
  write_split(manual_dir, 'v1', 'test-dev2015', 'test2015', TEST, annotated=False)
  features_dir = str(root / 'grids')
  for subtype, image_ids in (('train2014', TRAIN_IMAGES), ('val2014', VAL_IMAGES),
                             ('test2015', TEST_IMAGES)):
    writer = grid_store.GridStoreWriter(os.path.join(features_dir, subtype), image_ids, GRID,
                                        {'weights': 'fixture'})
    writer.write(0, np.stack([grid_of(i) for i in image_ids]))
    writer.commit()
    writer.finish()
  return dict(manual_dir=manual_dir, features_dir=features_dir, data_dir=str(root / 'tfds'))


def tiny_config(fixture_dir, **overrides):
  """configs/base_vqa.py shrunk to the fixture: 2x2x8 grids, 3 answers, tiny sizes."""
  config = base_vqa.get_config()
  config.data_dir = fixture_dir['data_dir']
  config.dataset_kwargs.update(manual_dir=fixture_dir['manual_dir'],
                               features_dir=fixture_dir['features_dir'])
  config.grid_shape = GRID
  config.num_answers = 3
  config.max_question_length = 4  # The LSTM is unrolled: short questions compile fast.
  config.model.update(embed_dim=8, question_dim=16, attention_dim=8, classifier_dim=16)
  config.ucam.aleatoric_samples = 4
  config.update(batch_size=8, eval_batch_size=8, num_train_steps=2, log_every_steps=1,
                checkpoint_every_steps=2, mc_samples=1, faithfulness_questions=2,
                faithfulness_steps=2, report_questions=2, decay_every_steps=1)
  config.update(overrides)
  return config


def test_vocabulary_soft_targets_and_grids_by_image_id(fixture_dir):
  config = tiny_config(fixture_dir, num_answers=2, questions_per_image=3)
  builder = input_pipeline.get_builder(config)
  # The examples hold no pixels and no grid: a grid is stored once per image, in its store.
  assert not set(input_pipeline.VISUAL_KEYS) & set(builder.info.features)
  table = input_pipeline.question_table(builder, 'train')
  answers = va.AnswerVocabulary.build(table.human_answers, config.num_answers)
  assert answers.answers == ('yes', '2')  # yes: 10 answers, 2: 6, black: 5.
  table = input_pipeline.label_answers(table, answers)
  source = input_pipeline.data_source(builder, 'train', features='grid')
  reader = input_pipeline.visual_reader(builder, 'train', source, table, config)
  assert isinstance(reader.store._features, np.memmap)  # Read from disk, not loaded.
  groups = input_pipeline.QuestionGroups(source, table, Vocabulary.build(table.question), 3,
                                         config.max_question_length, answers, reader)
  # Image 25's only question ('black' x5, 'black and white' x3, ...) has no answer among the 2:
  # left out of training. Image 9: 'yes' x10 and '2' x6 + '3' x3 + '4'.
  assert len(groups) == 1
  group = groups[0]
  np.testing.assert_array_equal(group['image'], grid_of(9))
  assert group['image_id'] == 9
  np.testing.assert_allclose(group['targets'], [[1, 0], [0, 0.6], [0, 0]])  # count / 10
  np.testing.assert_array_equal(group['answer'], [0, 1, 0])
  np.testing.assert_array_equal(group['weight'], [1, 1, 0])
  assert [input_pipeline.top_answer(answers, h) for h in table.human_answers] == [0, 1, -1]
  # A config whose grid shape is not the store's is an error that says so.
  wrong = tiny_config(fixture_dir, grid_shape=(14, 14, 2048))
  with pytest.raises(ValueError, match=r'this config expects \(14, 14, 2048\)'):
    input_pipeline.visual_reader(builder, 'train', source, table, wrong)


def test_image_models_read_the_images_of_an_image_config(fixture_dir):
  config = vqa_v1_san.get_config()
  config.data_dir = fixture_dir['data_dir']
  config.dataset_kwargs.manual_dir = fixture_dir['manual_dir']
  config.dataset_kwargs.image_size = 16  # Small images; the name gains '_16px'.
  builder = input_pipeline.get_builder(config)
  assert builder.builder_config.name == 'v1_16px'
  table = input_pipeline.question_table(builder, 'train')
  source = input_pipeline.data_source(builder, 'train')
  reader = input_pipeline.visual_reader(builder, 'train', source, table, config)
  assert reader(0, int(table.image_id[0])).shape == (16, 16, 3)
  config.features = 'grid'
  with pytest.raises(ValueError, match='needs config.grid_shape'):
    input_pipeline.visual_reader(builder, 'train', source, table, config)
  config.grid_shape = GRID  # No store in <manual_dir>/grid_features: the command that writes it.
  with pytest.raises(vqa.MissingFilesError, match='extract_features'):
    input_pipeline.visual_reader(builder, 'train', source, table, config)
  assert vqa_v2_san.get_config().dataset == 'vqa/v2'
  assert vqa_v1_san.get_config().num_answers == 1000 == vqa_v2_san.get_config().num_answers


def test_official_accuracy_per_answer_type_in_the_summary():
  names = ['no', 'umbrella', '3', 'yes']
  humans = [[a for qa in VAL[42] for a in qa[3]][:10],  # 'no' x9, 'yes'
            VAL[42][1][3],  # 'umbrella' x4, 'umbrella.', 'red umbrella' x3, 'cane', 'stick'
            VAL[73][0][3],  # '3' x5, '4' x5
            ['zebra'] * 10]  # No answer in the vocabulary.
  humans = [va.ground_truth_answers(h) for h in humans]  # As the builder stores them.
  types = ['yes/no', 'other', 'number', 'other']
  labels = np.array([0, 1, 2, -1])
  predicted = np.array([3, 1, 2, 0])  # 'yes' (1 of 10 annotators), right, right, 'no'.
  probs = np.full((4, 4), 0.1)
  probs[np.arange(4), predicted] = 0.7
  n = len(labels)
  rng = np.random.default_rng(0)
  out = {'probs': probs, 'mc_probs': probs, 'loss': np.ones(n), 'answer': labels,
         **{score: rng.random(n) for score in evaluate.uncertainty_scores(san.get_config().ucam)}}
  results = evaluate.summarise(out, san.get_config(), names, human_answers=humans,
                               answer_types=types)
  # 'yes' matches 1 annotator: 9 of the 10 leave-one-out subsets score 1/3, one scores 0.
  assert results['vqa_accuracy_per_answer_type'] == pytest.approx(
      {'yes/no': 0.3, 'number': 1.0, 'other': 0.5})
  assert results['vqa_accuracy'] == pytest.approx((0.3 + 1 + 1 + 0) / 4)
  # The label metrics are over the 3 questions with a top answer: 2 of them right.
  assert results['num_examples'] == 4 and results['num_labelled'] == 3
  assert results['accuracy'] == pytest.approx(2 / 3)


def test_step_schedule_halves_every_period_and_cosine_stays_the_default():
  config = base_vqa.get_config()
  schedule = train.learning_rate_schedule(config, config.num_train_steps)
  for step, rate in ((0, 1e-3), (49_999, 1e-3), (50_000, 5e-4), (99_999, 5e-4),
                     (100_000, 2.5e-4)):
    assert float(schedule(step)) == pytest.approx(rate), step
  default = san.get_config()
  assert 'learning_rate_schedule' not in default
  cosine = optax.cosine_decay_schedule(default.learning_rate, 100,
                                       alpha=default.final_learning_rate_factor)
  for step in (0, 37, 100):
    assert float(train.learning_rate_schedule(default, 100)(step)) == float(cosine(step))
  bad = base_vqa.get_config()
  bad.learning_rate_schedule = 'linear'
  with pytest.raises(ValueError, match="learning_rate_schedule is 'linear'"):
    train.make_optimizer(bad, 10)


@pytest.fixture(scope='module')
def trained(fixture_dir, tmp_path_factory):
  """attention_net on grids, 2 steps, evaluated against VQA-HAT: (config, workdir, results)."""
  # The method on (GCA, the default); no faithfulness: test_evaluate covers it. (At these toy
  # sizes XLA:CPU's default optimisation level compiled the GCA step for minutes, in LLVM's loop
  # vectorizer; the tests compile at level 0, see conftest.)
  config = tiny_config(fixture_dir, eval_dataset='vqa/v1_hat_questions',
                       faithfulness_questions=0, report_questions=1)
  workdir = str(tmp_path_factory.mktemp('vqa_run') / 'run')
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_train_and_evaluate_on_vqa_with_hat(trained):
  """Trains on soft targets, evaluates the official accuracy per answer type and the maps
  against VQA-HAT (the validation questions with maps), and prints the official figure."""
  config, workdir, results = trained
  assert config.ucam.mode == 'mask'
  with open(os.path.join(workdir, 'metrics.json')) as f:
    test = json.load(f)['test']
  assert json.dumps(test) == json.dumps(results['test']) and results['step'] == 2
  assert test['split'] == 'validation' and test['num_examples'] == 2  # Questions 420, 421.
  assert 0 <= test['vqa_accuracy'] <= 1
  assert set(test['vqa_accuracy_per_answer_type']) == {'yes/no', 'other'}
  assert test['vqa_questions_per_answer_type'] == {'yes/no': 1, 'other': 1}
  assert test['map_grid'] == [2, 2]
  assert {'model_attention', 'gca_attention', 'gradcam', 'ucam', 'random'} == set(test['maps'])
  assert {'spearman', 'pointing_game', 'pointing_game_top'} <= set(test['maps']['ucam'])
  assert test['pointing_game_top_mass'] == 0.15 and 0 < test['pointing_game_top_chance'] < 1
  # The summary leads with the official accuracy, each figure with its number of questions.
  printed = main.summary(test, 'run').splitlines()
  per_type = ', '.join(f'{t} {v:.4f} (1)' for t, v in test['vqa_accuracy_per_answer_type'].items())
  assert printed[0] == (f"VQA accuracy {test['vqa_accuracy']:.4f} over 2 validation questions "
                        f'(run); per answer type: {per_type}')
  assert printed[1].startswith(f"exact match {test['accuracy']:.4f}") and printed[1].endswith(
      f"over the {test['num_labelled']} questions whose top answer is in the answer vocabulary")
  # The answers of training, saved for --mode=eval and resuming; the data, by content.
  with open(os.path.join(workdir, train.ANSWERS_FILE)) as f:
    assert json.load(f)['answers'] == ['yes', '2', 'black']
  with open(os.path.join(workdir, train.DATA_FILE)) as f:
    data = json.load(f)
  assert data['config'] == 'v1_questions' and vqa.annotation_file('v1', 'val2014') in data['files']
  assert os.path.exists(os.path.join(workdir, 'report', 'index.html'))


def moved_copy(fixture_dir, root):
  """The fixture's manual directory and stores copied to another place."""
  manual_dir, features_dir = str(root / 'manual'), str(root / 'grids')
  shutil.copytree(fixture_dir['manual_dir'], manual_dir)
  shutil.copytree(fixture_dir['features_dir'], features_dir)
  return manual_dir, features_dir


def test_moved_data_directory_evaluates(trained, fixture_dir, tmp_path):
  """--mode=eval compares the data by content, not by path: a moved copy evaluates, to the
  same answers; a question file with other contents is refused."""
  config, workdir, results = trained
  moved = config.copy_and_resolve_references()
  manual_dir, features_dir = moved_copy(fixture_dir, tmp_path / 'moved')
  moved.dataset_kwargs.update(manual_dir=manual_dir, features_dir=features_dir)
  again = train.evaluate_checkpoint(moved, workdir)['test']
  assert again['vqa_accuracy'] == results['test']['vqa_accuracy'] and again['num_labelled'] == 1
  # Same files, other contents: not the data the run was trained on.
  path = os.path.join(manual_dir, vqa.question_file('v1', 'val2014'))
  with open(path) as f:
    questions = json.load(f)
  questions['questions'][0]['question'] = 'Is it snowing?'
  with open(path, 'w') as f:
    json.dump(questions, f)
  with pytest.raises(train.ConfigError, match='OpenEnded_mscoco_val2014_questions.json has '
                                              'other contents'):
    train.check_same_evaluation(workdir, moved, input_pipeline.get_builder(moved))


def official_question_ids(manual_dir, subtype):
  """The question ids of an official question file, read without ucam_jax."""
  with open(os.path.join(manual_dir, f'OpenEnded_mscoco_{subtype}_questions.json')) as f:
    return [q['question_id'] for q in json.load(f)['questions']]


def test_predict_writes_the_official_results_file(trained, fixture_dir):
  config, workdir, _ = trained
  written = predict.predict_checkpoint(config, workdir, 'test_dev')
  directory = os.path.join(workdir, predict.PREDICTIONS_DIR, 'test_dev')
  results_path = os.path.join(directory, 'OpenEnded_mscoco_test-dev2015_run_results.json')
  assert written['files'] == {'questions': os.path.join(directory, predict.QUESTIONS_FILE),
                              'results': results_path} and written['questions'] == 1
  with open(results_path) as f:
    results = json.load(f)
  # The official format (visualqa.org/evaluation.html) and what the VQA API's loadRes asserts:
  # a list of {question_id: int, answer: str}, exactly the split's question ids.
  ids = official_question_ids(fixture_dir['manual_dir'], 'test-dev2015')
  assert ids == [question_id('v1', 1, 0)]
  assert isinstance(results, list) and sorted(r['question_id'] for r in results) == sorted(ids)
  with open(os.path.join(workdir, train.ANSWERS_FILE)) as f:
    vocabulary = json.load(f)['answers']
  for r in results:
    assert set(r) == {'question_id', 'answer'} and type(r['question_id']) is int
    assert r['answer'] in vocabulary
  predict.check_results(results, ids)
  with open(written['files']['questions']) as f:
    [line] = [json.loads(line) for line in f]
  assert line['question_id'] == ids[0] and line['answer'] == results[0]['answer']
  assert line['question'] == TEST[1][0][0] and line['image_id'] == 1
  assert 0 < line['probability'] <= 1 and 0 < line['mc_probability'] <= 1
  assert set(predict.SCORES) <= set(line)
  # What the official loader would refuse.
  for bad, match in (([{'question_id': ids[0], 'answer': 3}], 'question_id'),
                     (results + results, 'more than once'), ([], 'miss 1 of its 1'),
                     ([{'question_id': 5, 'answer': 'yes'}], 'outside the split')):
    with pytest.raises(ValueError, match=match):
      predict.check_results(bad, ids)
  assert predict.results_file_name('v2', 'test2015', 'base_vqa') == (
      'v2_OpenEnded_mscoco_test2015_base-vqa_results.json')


def builder_settings(builder_class) -> set[str]:
  """The settings a builder takes beyond TFDS's own (data_dir, config, ...)."""
  if builder_class is grounded_shapes.GroundedShapes:
    return set(grounded_shapes.SETTINGS)
  return {name for name, p in inspect.signature(builder_class.__init__).parameters.items()
          if p.kind is p.KEYWORD_ONLY}


def test_every_builder_setting_is_a_config_key():
  """--config.dataset_kwargs.X works for every setting of the config's builder (a key the
  config file does not define is refused by the command line)."""
  import configs  # pylint: disable=import-outside-toplevel
  shipped = [n[:-3] for n in os.listdir(os.path.dirname(configs.__file__))
             if n.endswith('.py') and n != '__init__.py']
  assert {'san', 'vqa_v1_san', 'base_vqa', 'grounded_shapes'} <= set(shipped)
  assert builder_settings(vqa.Vqa) == {'manual_dir', 'features_dir', 'image_size'}
  assert builder_settings(easy_vqa.EasyVqa) == {'source_dir'}
  for name in shipped:
    config = __import__(f'configs.{name}', fromlist=['get_config']).get_config()
    builder_class = input_pipeline.BUILDERS[config.dataset.partition('/')[0]]
    assert builder_settings(builder_class) <= set(config.dataset_kwargs), name
