r"""Frozen, pretrained grid features for the synthetic datasets (grounded shapes, easy-VQA).

  python -m ucam_jax.pretrain_features --config=configs/grounded_shapes_grid.py

The published model reads *frozen* ImageNet grid features, whose cells already mean something
before the VQA model is trained. The synthetic datasets' stand-in: a small CNN (`ShapeNet`)
trained on a disjoint task and draw, then frozen. The task: for each cell of its `grid` x `grid`
output, the share of the cell's pixels that each of the 16 classes covers (background, or one of
the 3 shapes x 5 colours of grounded shapes): segmentation pooled to the cells, a soft-target
cross-entropy. The draw: grounded-shapes images of dataset seed `config.extractor.seed` (100; the
tables use seeds 0 (test draw) and 1 (validation draw)), drawn with `generate_scene`, never read
from a VQA split. The extractor is then applied to every image of the config's dataset splits;
each cell's `features` channels (the last ReLU layer) are L2-normalised, as the published ResNet
features are, and written to a grid store (`datasets.grid_store`) read by image id.

Where things go (`<root>`: `config.data_dir`, else TFDS's default data directory):
  <root>/ucam_grid_features/extractors/<id>/params.msgpack     the frozen extractor
  <root>/ucam_grid_features/<builder>/<builder config>/<id>/<split>/   one store per split
<id> is a hash of `config.extractor`, so other settings never reuse a stale extractor or store.
Deterministic by `config.extractor` (the draw, the initialisation and the batches all follow its
seeds). A rerun resumes: a finished store is read, a finished extractor is reused, and a store
interrupted while being written resumes from its last committed batch. The training entry point
(`input_pipeline.visual_reader`) calls `open_store`, which builds what is missing, so
`python -m ucam_jax.main --config=configs/grounded_shapes_grid.py` works from a fresh checkout;
this command only builds the stores ahead of time.
"""

import fcntl
import hashlib
import json
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import app, flags

from ucam_jax.datasets import grid_store, grounded_shapes

VERSION = 1  # Bump on any change to what the extractor computes: it is part of <id>.
NUM_CLASSES = 1 + len(grounded_shapes.SHAPES) * len(grounded_shapes.COLOURS)
NORM_EPSILON = 1e-8  # As extract_features: v / (||v|| + 1e-8).
ROOT = 'ucam_grid_features'


def default_extractor() -> ml_collections.ConfigDict:
  """config.extractor: what defines the features (all of it goes into the extractor's id)."""
  return ml_collections.ConfigDict(dict(
      seed=100,  # Dataset seed of the pretraining draw: no train, validation or test split's.
      num_images=2000, image_size=64, min_objects=2, max_objects=4,
      grid=8,  # Output cells per side: image_size / grid pixels a cell.
      width=32, features=64,  # Channels of the stem and of the grid.
      steps=1000, batch_size=64, learning_rate=3e-3, object_weight=10.0, train_seed=0))


def extractor_id(extractor) -> str:
  text = json.dumps({'version': VERSION, **extractor.to_dict()}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


class ShapeNet(nn.Module):
  """images [n, S, S, 3] uint8 -> (grid [n, g, g, features] >= 0, logits [n, g, g, classes]).
  Three stride-2 3x3 convolutions (S = 8 g) and one 3x3 at the grid, which gives each cell its
  neighbours' context (receptive field 31 px)."""
  width: int = 32
  features: int = 64

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 255.0 - 0.5
    for channels in (self.width, self.features, self.features):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=2)(x))
    grid = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return grid, nn.Dense(NUM_CLASSES)(grid)


def pretraining_draw(extractor) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, S, S, 3] uint8, targets [n, g, g, NUM_CLASSES] float32): grounded-shapes scenes
  of dataset seed `extractor.seed` and each class's share of each cell's pixels."""
  config = grounded_shapes.make_config(
      seed=extractor.seed, num_train_images=extractor.num_images, num_test_images=1,
      image_size=extractor.image_size, min_objects=extractor.min_objects,
      max_objects=extractor.max_objects, questions_per_image=1)
  size, g = extractor.image_size, extractor.grid
  colours = list(grounded_shapes.COLOURS)
  images, targets = [], []
  for image_id in range(extractor.num_images):
    scene = grounded_shapes.generate_scene(config, 'train', image_id)
    labels = np.zeros((size, size), np.int32)
    for o in scene.objects:
      labels[o.mask] = 1 + grounded_shapes.SHAPES.index(o.shape) * len(colours) + colours.index(
          o.colour)
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    targets.append(one_hot.reshape(g, size // g, g, size // g, NUM_CLASSES).mean((1, 3)))
    images.append(scene.image)
  return np.stack(images), np.stack(targets)


def train_extractor(extractor) -> dict:
  """The extractor's parameters after `extractor.steps` Adam steps on `pretraining_draw`."""
  if extractor.image_size != 8 * extractor.grid:
    raise ValueError(f'extractor.image_size ({extractor.image_size}) must be 8 x extractor.grid '
                     f'({extractor.grid}): three stride-2 convolutions.')
  images, targets = pretraining_draw(extractor)
  model = ShapeNet(extractor.width, extractor.features)
  init_key, batch_key = jax.random.split(jax.random.PRNGKey(extractor.train_seed))
  params = model.init(init_key, images[:1])
  optimizer = optax.adam(optax.cosine_decay_schedule(extractor.learning_rate, extractor.steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, t):
    def loss_fn(p):
      _, logits = model.apply(p, x)
      # Objects cover ~7% of the cells: weighting a cell by its object share keeps the loss from
      # being mostly background.
      weight = 1 + extractor.object_weight * (1 - t[..., 0])
      return (weight * -(t * jax.nn.log_softmax(logits)).sum(-1)).sum() / weight.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.asarray(jax.random.permutation(batch_key, len(images)))
  for k in range(extractor.steps):
    start = (k * extractor.batch_size) % (len(images) - extractor.batch_size + 1)
    rows = order[start:start + extractor.batch_size]
    params, opt_state, _ = step(params, opt_state, images[rows], targets[rows])
  return params


def _root(config) -> str:
  data_dir = os.path.expanduser(config.data_dir) if config.get('data_dir') else None
  return os.path.join(data_dir or tfds.core.constants.DATA_DIR, ROOT)


def extractor_path(config) -> str:
  return os.path.join(_root(config), 'extractors', extractor_id(config.extractor),
                      'params.msgpack')


def load_or_train_extractor(config) -> dict:
  """The frozen extractor of `config.extractor`: read, or trained and written (atomically)."""
  path = extractor_path(config)
  model = ShapeNet(config.extractor.width, config.extractor.features)
  template = model.init(jax.random.PRNGKey(0), np.zeros(
      (1, config.extractor.image_size, config.extractor.image_size, 3), np.uint8))
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return flax.serialization.from_bytes(template, f.read())
  params = train_extractor(config.extractor)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(flax.serialization.to_bytes(params))
  os.replace(path + '.tmp', path)
  with open(os.path.join(os.path.dirname(path), 'extractor.json'), 'w') as f:
    json.dump(config.extractor.to_dict(), f, indent=2)
  return params


def grid_features(params, images, extractor) -> np.ndarray:
  """images [n, S, S, 3] uint8 -> [n, g, g, features] float16, each cell unit L2 norm (an
  all-zero cell stays zero)."""
  return np.asarray(_grid_fn(extractor.width, extractor.features)(params, images))


_GRID_FNS = {}


def _grid_fn(width: int, features: int):
  if (width, features) not in _GRID_FNS:
    model = ShapeNet(width, features)

    @jax.jit
    def fn(params, images):
      v, _ = model.apply(params, images)
      v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + NORM_EPSILON)
      return v.astype(grid_store.DTYPE)
    _GRID_FNS[width, features] = fn
  return _GRID_FNS[width, features]


def store_path(builder, split: str, config) -> str:
  return os.path.join(_root(config), builder.name, builder.builder_config.name,
                      extractor_id(config.extractor), split)


def grid_shape(config) -> tuple[int, int, int]:
  return (config.extractor.grid, config.extractor.grid, config.extractor.features)


def split_images(builder, split: str):
  """(sorted image ids, {image id: its first record}) of a split, images not decoded."""
  skip = tfds.decode.SkipDecoding()
  features = builder.info.features
  source = builder.as_data_source(split, decoders={k: skip for k in ('image', 'mask')
                                                   if k in features})
  first = {}
  for start in range(0, len(source), 4096):
    records = range(start, min(start + 4096, len(source)))
    for record, example in zip(records, source.__getitems__(records)):
      first.setdefault(int(example['image_id']), record)
  return sorted(first), first


def write_store(builder, split: str, config, batch_size: int = 256) -> str:
  """Writes (or finishes) the grid store of `split`'s images; returns its path."""
  path = store_path(builder, split, config)
  if grid_store.is_store(path):
    return path
  params = load_or_train_extractor(config)
  image_ids, first = split_images(builder, split)
  skip = tfds.decode.SkipDecoding()
  source = builder.as_data_source(
      split, decoders={'mask': skip} if 'mask' in builder.info.features else None)
  size = builder.info.features['image'].shape[0]
  if size != config.extractor.image_size:
    raise ValueError(f'{builder.name} images are {size} px; the extractor reads '
                     f'{config.extractor.image_size} px (config.extractor.image_size).')
  writer = grid_store.GridStoreWriter(path, image_ids, grid_shape(config), dict(
      extractor=config.extractor.to_dict(), extractor_id=extractor_id(config.extractor),
      l2_normalised=True, image_size=size))
  for start in range(writer.done, len(image_ids), batch_size):
    ids = image_ids[start:start + batch_size]
    images = np.stack([source[first[i]]['image'] for i in ids])
    writer.write(start, grid_features(params, images, config.extractor))
    writer.commit()
  return writer.finish()


def open_store(builder, split: str, config, image_ids=()) -> grid_store.GridStore:
  """The grid store of `split` under `config.extractor`, built first when missing (one build at
  a time: an flock beside it), checked to hold `image_ids` with grids of `config.grid_shape`."""
  path = store_path(builder, split, config)
  if not grid_store.is_store(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.lock', 'a') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      write_store(builder, split, config)
  store = grid_store.GridStore(path)
  if tuple(store.grid_shape) != tuple(config.grid_shape):
    raise ValueError(f'config.grid_shape is {tuple(config.grid_shape)}, but the extractor '
                     f'writes {store.grid_shape}: set it to (extractor.grid, extractor.grid, '
                     'extractor.features).')
  missing = [i for i in image_ids if i not in store]
  if missing:
    raise ValueError(f'{path} lacks {len(missing)} images of the split (e.g. {missing[0]}); '
                     'delete it and rerun.')
  return store


def main(argv):
  del argv
  from ucam_jax import input_pipeline  # Which imports this module.
  config = flags.FLAGS.config
  builder = input_pipeline.get_builder(config)
  for split in flags.FLAGS.splits:
    store = open_store(builder, split, config)
    print(f'{split}: {len(store)} images, grid {store.grid_shape}: {store.path}')


if __name__ == '__main__':
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'A config with config.extractor, e.g. '
                                  'configs/grounded_shapes_grid.py.', lock_config=False)
  flags.DEFINE_list('splits', ['train', 'test'], 'The dataset splits to write stores of.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
