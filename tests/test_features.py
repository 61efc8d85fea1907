"""Grid features: the Flax ResNet against a torch-layout reference, the torchvision weight
conversion, the extraction command and its store, and the VQA builder reading the store."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_vqa import TRAIN, VAL, by_question, make_manual_dir, question_id
from ucam_jax import cli, extract_features
from ucam_jax.datasets import grid_store, vqa
from ucam_jax.models import resnet

STAGES, WIDTH, SIZE = (1, 1, 1, 1), 2, 64  # grid 2x2x64
GRID = (2, 2, 8 * resnet.EXPANSION * WIDTH)  # the last stage is 8x as wide as the first


def torchvision_state_dict(stage_sizes, width, num_classes, seed=0):
  """Random weights with torchvision's names and shapes (torchvision/models/resnet.py)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, out, inp, k):
    sd[f'{name}.weight'] = rng.normal(0, np.sqrt(2 / (inp * k * k)), (out, inp, k, k))

  def bn(name, c):
    sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, c)
    sd[f'{name}.bias'] = rng.normal(0, 0.1, c)
    sd[f'{name}.running_mean'] = rng.normal(0, 0.1, c)
    sd[f'{name}.running_var'] = rng.uniform(0.5, 1.5, c)
    sd[f'{name}.num_batches_tracked'] = np.array(7)

  conv('conv1', width, 3, 7)
  bn('bn1', width)
  inplanes = width
  for k, blocks in enumerate(stage_sizes):
    planes = width * 2 ** k
    for i in range(blocks):
      p = f'layer{k + 1}.{i}'
      conv(f'{p}.conv1', planes, inplanes, 1)
      bn(f'{p}.bn1', planes)
      conv(f'{p}.conv2', planes, planes, 3)
      bn(f'{p}.bn2', planes)
      conv(f'{p}.conv3', 4 * planes, planes, 1)
      bn(f'{p}.bn3', 4 * planes)
      if i == 0:
        conv(f'{p}.downsample.0', 4 * planes, inplanes, 1)
        bn(f'{p}.downsample.1', 4 * planes)
      inplanes = 4 * planes
  sd['fc.weight'] = rng.normal(0, 0.05, (num_classes, inplanes))
  sd['fc.bias'] = rng.normal(0, 0.1, num_classes)
  return {k: v.astype(np.float32) if v.ndim else v for k, v in sd.items()}


def torch_forward(sd, stage_sizes, images):
  """torchvision's ResNet.forward in numpy float64, NCHW / OIHW with torch's paddings.

  Returns (grid [n, h, w, c] (NHWC, to compare), logits [n, classes]).
  """
  windows = np.lib.stride_tricks.sliding_window_view

  def conv(x, name, stride=1, pad=0):
    w = sd[f'{name}.weight'].astype(np.float64)
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    patches = windows(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum('ncyxij,ocij->noyx', patches, w, optimize=True)

  def bn(x, name):
    c = lambda leaf: sd[f'{name}.{leaf}'][None, :, None, None].astype(np.float64)
    return (x - c('running_mean')) / np.sqrt(c('running_var') + 1e-5) * c('weight') + c('bias')

  relu = lambda x: np.maximum(x, 0)
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2) / 255.0
  x = (x - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array(
      [0.229, 0.224, 0.225])[:, None, None]
  x = relu(bn(conv(x, 'conv1', 2, 3), 'bn1'))
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  x = windows(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))  # MaxPool2d(3, 2, 1)
  for k, blocks in enumerate(stage_sizes):
    for i in range(blocks):
      p, stride = f'layer{k + 1}.{i}', 2 if k > 0 and i == 0 else 1
      y = relu(bn(conv(x, f'{p}.conv1'), f'{p}.bn1'))
      y = relu(bn(conv(y, f'{p}.conv2', stride, 1), f'{p}.bn2'))
      y = bn(conv(y, f'{p}.conv3'), f'{p}.bn3')
      if f'{p}.downsample.0.weight' in sd:
        x = bn(conv(x, f'{p}.downsample.0', stride), f'{p}.downsample.1')
      x = relu(x + y)
  logits = x.mean(axis=(2, 3)) @ sd['fc.weight'].T.astype(np.float64) + sd['fc.bias']
  return x.transpose(0, 2, 3, 1), logits


# ------------------------------------------------------------------------ the ResNet


def test_published_grid_is_14x14x2048_at_448_px():
  assert resnet.grid_shape(resnet.ResNet(), 448) == (14, 14, 2048)
  assert resnet.grid_shape(resnet.ResNet(resnet.STAGE_SIZES[50]), 224) == (7, 7, 2048)


def test_converted_torchvision_weights_compute_what_torch_computes():
  stages = (2, 1, 1, 1)  # a block without downsample too
  sd = torchvision_state_dict(stages, 4, num_classes=5)
  variables = resnet.convert_torchvision_state_dict(sd)
  # Known transposes: conv kernels OIHW -> HWIO, fc [out, in] -> [in, out]; BN renamed.
  np.testing.assert_array_equal(variables['params']['layer2_0']['conv2']['kernel'],
                                sd['layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], sd['fc.weight'].T)
  np.testing.assert_array_equal(variables['batch_stats']['layer1_0']['downsample_bn']['var'],
                                sd['layer1.0.downsample.1.running_var'])
  np.testing.assert_array_equal(variables['params']['bn1']['scale'], sd['bn1.weight'])
  # 72 px: odd sizes (9 -> 5 -> 3) on the way, where asymmetric 'SAME' padding would differ.
  images = np.random.default_rng(1).integers(0, 256, (2, 72, 72, 3), np.uint8)
  grid, logits = torch_forward(sd, stages, images)
  model = resnet.ResNet(stages, width=4, num_classes=5)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, images), logits, rtol=1e-4,
                             atol=1e-4)
  ours = jax.jit(model.clone(num_classes=None).apply)(variables, images)
  assert ours.shape == grid.shape == (2, 3, 3, 128)
  np.testing.assert_allclose(ours, grid, rtol=1e-4, atol=1e-4 * np.abs(grid).max())


def test_conversion_names_every_missing_unexpected_or_misshapen_key():
  sd = torchvision_state_dict(STAGES, WIDTH, num_classes=3)
  del sd['layer2.0.bn2.running_var']
  sd['layer1.0.conv2.weight'] = sd['layer1.0.conv2.weight'][:, :, :2]
  sd['layer1.0.conv4.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ValueError) as error:
    resnet.convert_torchvision_state_dict(sd)
  message = str(error.value)
  assert '3 problem(s)' in message
  assert f'missing: layer2.0.bn2.running_var (shape ({2 * WIDTH},))' in message
  assert 'unexpected: layer1.0.conv4.weight' in message
  assert (f'misshapen: layer1.0.conv2.weight has shape ({WIDTH}, {WIDTH}, 2, 3), expected '
          f'({WIDTH}, {WIDTH}, 3, 3)') in message
  with pytest.raises(ValueError, match='conv1.weight is missing'):
    resnet.convert_torchvision_state_dict({'fc.weight': np.zeros((3, 4))})


def test_weights_file_round_trip_and_errors(tmp_path):
  sd = torchvision_state_dict(STAGES, WIDTH, num_classes=3)
  path = str(tmp_path / 'w.npz')
  resnet.save_variables(path, resnet.convert_torchvision_state_dict(sd))
  model, variables = resnet.load_resnet(path)
  assert (model.stage_sizes, model.width, model.num_classes) == (STAGES, WIDTH, 3)
  extractor, grid_variables = resnet.load_resnet(path, num_classes=None)
  assert 'fc' not in grid_variables['params']
  images = np.random.default_rng(2).integers(0, 256, (1, SIZE, SIZE, 3), np.uint8)
  np.testing.assert_allclose(jax.jit(extractor.apply)(grid_variables, images),
                             torch_forward(sd, STAGES, images)[0], rtol=1e-4, atol=1e-4)
  with np.load(path) as data:
    flat = dict(data)
  flat['params/layer3_0/conv1/kernel'] = flat['params/layer3_0/conv1/kernel'][..., :1]
  del flat['batch_stats/bn1/mean']
  with open(path, 'wb') as f:
    np.savez(f, **flat)
  with pytest.raises(ValueError) as error:
    resnet.load_resnet(path)
  assert path in str(error.value)
  assert 'missing: batch_stats/bn1/mean' in str(error.value)
  assert 'misshapen: params/layer3_0/conv1/kernel' in str(error.value)


# ------------------------------------------------------------- extraction and the store


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
  """A tiny VQA v1 manual dir, random ResNet weights and the train / validation stores."""
  root = tmp_path_factory.mktemp('features')
  manual_dir = make_manual_dir(root / 'manual', 'v1')
  model = resnet.ResNet(STAGES, WIDTH)
  # Random weights through the converter: numpy only, and faster than compiling model.init.
  variables = resnet.convert_torchvision_state_dict(
      torchvision_state_dict(STAGES, WIDTH, num_classes=3))
  del variables['params']['fc']
  weights = str(root / 'resnet.npz')
  resnet.save_variables(weights, variables)
  out = str(root / 'grids')
  paths = {split: extract_features.extract(manual_dir, 'v1', split, weights, out,
                                           image_size=SIZE, batch_size=4)
           for split in ('train', 'validation')}
  return dict(root=root, manual_dir=manual_dir, model=model, variables=variables,
              weights=weights, out=out, paths=paths)


def test_store_holds_the_normalised_model_output(extracted):
  assert extracted['paths'] == {'train': os.path.join(extracted['out'], 'train2014'),
                                'validation': os.path.join(extracted['out'], 'val2014')}
  apply = jax.jit(extracted['model'].apply)
  for split, subtype, table in (('train', 'train2014', TRAIN), ('validation', 'val2014', VAL)):
    store = grid_store.GridStore(extracted['paths'][split])
    assert store.image_ids == sorted(table) and store.grid_shape == GRID
    assert store.meta['l2_normalised'] and store.meta['image_size'] == SIZE
    for image_id in table:
      image = vqa.load_coco_image(extracted['manual_dir'], subtype, image_id, SIZE)
      raw = np.asarray(apply(extracted['variables'], image[None]))[0]
      expected = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
      grid = store[image_id]
      assert grid.dtype == np.float16 and grid.shape == GRID
      np.testing.assert_allclose(grid, expected, atol=1e-3, rtol=1e-3)  # float16
      np.testing.assert_allclose(np.linalg.norm(grid.astype(np.float32), axis=-1), 1, atol=2e-3)


def test_store_is_memory_mapped_not_loaded(extracted):
  store = grid_store.GridStore(extracted['paths']['train'])
  # Opening maps the file; each lookup copies one image out, so nothing keeps the map's pages.
  assert isinstance(store._features, np.memmap)
  grid = store[9]
  assert type(grid) is np.ndarray and not np.shares_memory(grid, store._features)
  assert 9 in store and 42 not in store and len(store) == 2
  with pytest.raises(KeyError, match='Image 42 is not in'):
    store[42]


def test_extraction_is_deterministic_and_the_command_runs(extracted, tmp_path):
  argv = [f'--manual_dir={extracted["manual_dir"]}', '--version=v1', '--split=train',
          f'--weights={extracted["weights"]}', f'--features_dir={tmp_path}',
          f'--image_size={SIZE}', '--batch_size=8']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-m', 'ucam_jax.extract_features', *argv], cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  again = np.load(os.path.join(tmp_path, 'train2014', grid_store.FEATURES))
  first = np.load(os.path.join(extracted['paths']['train'], grid_store.FEATURES))
  np.testing.assert_array_equal(again, first)


def test_writer_is_atomic_and_resumes(tmp_path):
  path = str(tmp_path / 'store')
  grids = np.random.default_rng(0).random((5, 2, 2, 3)).astype(np.float16)
  writer = grid_store.GridStoreWriter(path, [5, 3, 9, 1, 7], (2, 2, 3), {'weights': 'w'})
  writer.write(0, grids[:2])
  writer.commit()
  writer.write(2, grids[2:4])  # not committed: lost in the "crash"
  del writer
  assert not os.path.exists(path) and not grid_store.is_store(path)
  with pytest.raises(FileNotFoundError, match='interrupted extraction'):
    grid_store.GridStore(path)
  writer = grid_store.GridStoreWriter(path, [5, 3, 9, 1, 7], (2, 2, 3), {'weights': 'w'})
  assert writer.done == 2
  with pytest.raises(ValueError, match='holds 2 of 5'):
    writer.finish()
  writer.write(2, grids[2:])
  writer.commit()
  assert writer.finish() == path and not os.path.exists(grid_store.partial_path(path))
  store = grid_store.GridStore(path)
  for row, image_id in enumerate([5, 3, 9, 1, 7]):
    np.testing.assert_array_equal(store[image_id], grids[row])
  # Other meta: the .partial is not resumed but started over.
  writer = grid_store.GridStoreWriter(path, [5, 3], (2, 2, 3), {'weights': 'other'})
  assert writer.done == 0


def test_interrupted_extraction_resumes_and_is_not_mistaken_for_a_store(extracted, tmp_path,
                                                                       monkeypatch):
  manual_dir, weights = extracted['manual_dir'], extracted['weights']

  def crash(self):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(grid_store.GridStoreWriter, 'finish', crash)
    with pytest.raises(KeyboardInterrupt):
      extract_features.extract(manual_dir, 'v1', 'validation', weights, str(tmp_path),
                               image_size=SIZE)
  path = os.path.join(tmp_path, 'val2014')
  assert not os.path.exists(path) and os.path.isdir(grid_store.partial_path(path))
  [missing] = vqa.GridFeatures(GRID, str(tmp_path)).missing(manual_dir, 'val2014', [42, 73])
  assert missing.path == path + os.sep and 'interrupted' in missing.source
  # Every row was committed: the rerun decodes no image, and a complete store is not redone.
  decoded = []
  load = vqa.load_coco_image
  monkeypatch.setattr(vqa, 'load_coco_image', lambda *a, **k: decoded.append(a) or load(*a, **k))
  for _ in range(2):
    assert extract_features.extract(manual_dir, 'v1', 'validation', weights, str(tmp_path),
                                     image_size=SIZE) == path
  assert decoded == []
  np.testing.assert_array_equal(
      np.load(os.path.join(path, grid_store.FEATURES)),
      np.load(os.path.join(extracted['paths']['validation'], grid_store.FEATURES)))


def test_extraction_needs_the_questions_and_images(tmp_path, extracted):
  with pytest.raises(vqa.MissingFilesError) as error:
    extract_features.extract(str(tmp_path), 'v2', 'train', extracted['weights'])
  assert [m.path for m in error.value.missing] == [
      str(tmp_path / vqa.question_file('v2', 'train2014')), str(tmp_path / 'train2014') + os.sep]
  # The command prints the message alone (cli.run), as training and evaluation do.
  with pytest.raises(SystemExit) as stop:
    cli.run(extract_features.extract, str(tmp_path), 'v2', 'train', extracted['weights'])
  assert stop.value.code == str(error.value) and vqa.DOC in stop.value.code


def test_missing_weights_point_to_the_conversion(tmp_path, extracted):
  missing = str(tmp_path / 'resnet152_imagenet.npz')
  with pytest.raises(SystemExit) as stop:
    cli.run(extract_features.extract, extracted['manual_dir'], 'v1', 'train', missing)
  assert stop.value.code.startswith(f"The ResNet weights file '{missing}' does not exist")
  assert 'docs/grid_features.md, section 1' in stop.value.code


def test_backend_probe_lines_are_dropped_and_other_lines_kept(caplog):
  cli.quiet_backend_probes()
  cli.quiet_backend_probes()  # Idempotent.
  logger = logging.getLogger('jax._src.xla_bridge')
  assert logger.filters.count(cli._FILTER) == 1  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO, logger='jax._src.xla_bridge'):
    logger.info("Unable to initialize backend '%s': %s", 'tpu', 'INTERNAL: Failed to open '
                'libtpu.so')
    logger.warning('An NVIDIA GPU may be present on this machine, but ...')
  assert [r.getMessage()[:9] for r in caplog.records] == ['An NVIDIA']


# ------------------------------------------------------------------- the VQA builder


def grid_config(name='v1_grid_tiny', **kwargs):
  return vqa.VqaConfig(name=name, vqa_version='v1', image_size=SIZE, grid_shape=GRID, **kwargs)


def json_only_copy(manual_dir, root):
  """The manual dir without its COCO images: grid configs do not need them."""
  os.makedirs(root)
  for name in os.listdir(manual_dir):
    if name.endswith('.json'):
      shutil.copy(os.path.join(manual_dir, name), root)
  return str(root)


def test_builder_with_grid_features(extracted, tmp_path):
  manual_dir = json_only_copy(extracted['manual_dir'], tmp_path / 'manual')
  builder = vqa.Vqa(config=grid_config(), manual_dir=manual_dir, features_dir=extracted['out'],
                    data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare()
  for split, table, path in (('train', TRAIN, extracted['paths']['train']),
                             ('validation', VAL, extracted['paths']['validation'])):
    store = grid_store.GridStore(path)
    examples = by_question(builder, split)
    assert len(examples) == sum(len(q) for q in table.values())
    for image_id, qas in table.items():
      for k in range(len(qas)):
        e = examples[question_id('v1', image_id, k)]
        assert 'image' not in e and e['grid'].dtype == np.float16
        np.testing.assert_array_equal(e['grid'], store[image_id])
        assert e['question'].decode() == qas[k][0]
  assert {c.name: c.grid_shape for c in vqa.Vqa.BUILDER_CONFIGS if c.grid_shape} == {
      'v1_grid': (14, 14, 2048), 'v2_grid': (14, 14, 2048), 'v1_hat_grid': (14, 14, 2048)}


def test_missing_store_names_the_command_that_writes_it(extracted, tmp_path):
  manual_dir = json_only_copy(extracted['manual_dir'], tmp_path / 'manual')
  builder = vqa.Vqa(config=grid_config(), manual_dir=manual_dir, data_dir=str(tmp_path / 'd'))
  with pytest.raises(vqa.MissingFilesError) as error:
    builder.download_and_prepare()
  root = os.path.join(manual_dir, vqa.FEATURES_DIR)
  assert [m.path for m in error.value.missing] == [os.path.join(root, 'train2014') + os.sep,
                                                   os.path.join(root, 'val2014') + os.sep]
  message = str(error.value)
  for split in ('train', 'validation'):
    assert (f'python -m ucam_jax.extract_features --manual_dir={manual_dir} --version=v1 '
            f'--split={split} --features_dir={root}') in message


def test_store_lacking_images_or_of_another_shape_is_an_error(extracted, tmp_path):
  root = str(tmp_path / 'grids')
  writer = grid_store.GridStoreWriter(os.path.join(root, 'train2014'), [9], GRID, {})
  writer.write(0, np.zeros((1, *GRID), np.float16))
  writer.commit()
  writer.finish()
  features = vqa.GridFeatures(GRID, root)
  [missing] = features.missing(extracted['manual_dir'], 'train2014', [9, 25, 25])
  assert missing.path == os.path.join(root, 'train2014') + ': image 25'
  assert '--split=train' in missing.source
  with pytest.raises(ValueError, match=r'holds grids of shape \(2, 2, 64\); this config expects '
                                       r'\(14, 14, 2048\)'):
    vqa.GridFeatures((14, 14, 2048), root).missing(extracted['manual_dir'], 'train2014', [9])
