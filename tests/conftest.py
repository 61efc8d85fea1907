"""Shared fixtures. Tests run on 8 fake CPU devices, so data parallelism is always exercised.

The tests run tiny models, so compiling is most of their time: XLA compiles with its cheapest
backend optimisation (the programs compute the same; only their speed differs;
tests/test_model.py 143 -> 82 s), and into a persistent cache shared by the session and the
processes it starts (tests/test_train.py and test_ablation.py 157 -> 124 s). Subprocesses
inherit every setting here through the environment.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
# The commands that tests start would re-execute themselves for huge pages (ucam_jax.hugepages):
# they start with the tunable set instead.
os.environ.setdefault('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
# One persistent compilation cache for the session and the processes it starts: many tests
# compile the same programs again (each run of train_and_evaluate jits its steps afresh).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ucam_jax_tests_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'

import json  # noqa: E402

import pytest  # noqa: E402

from configs import san  # noqa: E402
from ucam_jax import input_pipeline  # noqa: E402
from ucam_jax.datasets import easy_vqa  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """easy-VQA built once for the whole test session."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def builder(data_dir):
  config = tiny_config(data_dir)
  return input_pipeline.get_builder(config)


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
  """easy-VQA cut to 40 images per split, in its own TFDS directory: `--config.data_dir` finds
  it prepared, so a run spends seconds, not minutes, reading and evaluating."""
  root = tmp_path_factory.mktemp('small_easy_vqa')
  source = make_source_dir(root / 'source', num_images=40, questions_per_image=12)
  data_dir = str(root / 'tfds')
  easy_vqa.EasyVqa(source_dir=source, data_dir=data_dir).download_and_prepare()
  return data_dir


def tiny_config(data_dir, **overrides):
  """configs/san.py shrunk to run in seconds."""
  config = san.get_config()
  config.data_dir = data_dir
  config.model.stem_features = (8, 16)
  config.model.update(embed_dim=16, hidden_dim=32, attention_dim=16, classifier_dim=32)
  config.update(batch_size=8, eval_batch_size=512, num_train_steps=20, log_every_steps=5,
                checkpoint_every_steps=10, mc_samples=2, faithfulness_questions=8,
                faithfulness_steps=4, report_questions=1)
  config.update(overrides)
  return config


def make_source_dir(root, num_images=3, questions_per_image=2):
  """A small copy of the easy-VQA package data: the same file layout, a few images."""
  real = easy_vqa.default_source_dir()
  os.makedirs(root)
  shutil.copy(os.path.join(real, 'answers.txt'), root)
  for split in ('train', 'test'):
    with open(os.path.join(real, split, 'questions.json')) as f:
      questions = json.load(f)
    kept = [q for i in range(num_images)
            for q in [q for q in questions if q[2] == i][:questions_per_image]]
    os.makedirs(os.path.join(root, split, 'images'))
    with open(os.path.join(root, split, 'questions.json'), 'w') as f:
      json.dump(kept, f)
    for image_id in range(num_images):
      shutil.copy(os.path.join(real, split, 'images', f'{image_id}.png'),
                  os.path.join(root, split, 'images'))
  return str(root)
