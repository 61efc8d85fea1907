r"""Grid features of the COCO images of a VQA split, with a Flax ResNet from a local weights file.

  python -m ucam_jax.extract_features --manual_dir=/data/vqa --version=v1 --split=train \
      --weights=resnet152_imagenet.npz [--features_dir=/data/vqa/grid_features] [--image_size=448] \
      [--batch_size=32] [--dtype=float32]

Reads the questions of the split (the layout of `datasets/vqa.py`), and for every image they use
(for 'test' / 'test_dev': both splits' questions, which share test2015/) squashes it to
image_size x image_size as the image configs do, applies the ResNet (jitted, data parallel over
every device: training's ('data',) mesh; bfloat16 with --dtype), L2-normalises each cell over
channels (SPEC section 3: the store holds what the model consumes) and writes the grid as
float16 to the store <out>/<image folder>, e.g. <out>/train2014 (`datasets.grid_store`).
ResNet-152 at 448 px: 14x14x2048, 784 kB per image.

Interrupted runs resume: rerun the same command. The store appears under its name only when
complete. A progress bar shows images/s and the time left. How to convert the ImageNet weights,
measured speeds and batch sizes: docs/grid_features.md and `models/resnet.py`. A missing weights
file, question file or image is one message without a traceback (`errors.MissingFiles`).
"""

import concurrent.futures
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging

from ucam_jax import cli, sharding
from ucam_jax.datasets import grid_store, vqa
from ucam_jax.errors import MissingFiles
from ucam_jax.models import resnet

# As Cyanogenoid/pytorch-vqa's model: v / (||v|| + 1e-8), which keeps all-zero cells zero.
NORM_EPSILON = 1e-8
# A crash loses at most this many batches; each commit flushes the memory map to disk.
COMMIT_EVERY = 20


@functools.partial(jax.jit, static_argnums=0)
def grid_features(model: resnet.ResNet, variables, images: jax.Array) -> jax.Array:
  """images: [n, S, S, 3] uint8 -> [n, h, w, c] float16 grids, each cell unit L2 norm.

  Variables are an argument, not a closure: closed-over arrays would be baked into the program.
  """
  v = model.apply(variables, images).astype(jnp.float32)
  v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + NORM_EPSILON)
  return v.astype(grid_store.DTYPE)


def split_image_ids(manual_dir: str, version: str, split: str) -> tuple[str, list[int]]:
  """(image folder, sorted ids of the images its questions use) of a TFDS split name; the
  questions of every split that shares the folder count, so one store serves them all."""
  names = [s.name for s in vqa.SPLITS]
  if split not in names:
    raise ValueError(f'Unknown split {split!r}; known: {names}.')
  subtype = next(s for s in vqa.SPLITS if s.name == split).image_subtype
  ids, missing = set(), []
  for s in vqa.SPLITS:
    if s.image_subtype != subtype:
      continue
    path = os.path.join(manual_dir, vqa.question_file(version, s.subtype))
    if os.path.exists(path):
      ids.update(q['image_id'] for q in vqa._load_json(path, 'questions'))
    elif s.name == split:
      missing.append(vqa.Missing(path, f'VQA {version} {s.subtype} questions, see '
                                       f'{vqa.VQA_PAGES[version]}'))
  missing += vqa.CocoImages(size=0).missing(manual_dir, subtype, sorted(ids))  # size unused
  if missing:
    raise vqa.MissingFilesError(f'Grid features of VQA {version} {split}', manual_dir, missing)
  return subtype, sorted(ids)


def check_weights(weights: str | None) -> None:
  """Raises MissingFiles, naming where the file comes from, when the weights file is not there."""
  if weights and os.path.isfile(weights):
    return
  raise MissingFiles(
      f'The ResNet weights file {weights!r} does not exist (--weights). It is made once from '
      "torchvision's ImageNet ResNet-152 with resnet.convert_torchvision_state_dict and "
      'resnet.save_variables (torch is needed for that step only; nothing is downloaded at run '
      'time): see docs/grid_features.md, section 1.')


def extract(manual_dir: str, version: str, split: str, weights: str, out: str | None = None,
            image_size: int = 448, batch_size: int = 32, dtype: str = 'float32',
            num_threads: int = 8) -> str:
  """Writes the grid-feature store of a split's images and returns its path (see the module
  docstring). Resumes an interrupted run with the same arguments."""
  check_weights(weights)
  subtype, image_ids = split_image_ids(manual_dir, version, split)
  path = os.path.join(out or os.path.join(manual_dir, vqa.FEATURES_DIR), subtype)
  model, variables = resnet.load_resnet(weights, num_classes=None, dtype=dtype)
  shape = resnet.grid_shape(model, image_size)
  meta = {'weights': os.path.abspath(weights), 'weights_bytes': os.path.getsize(weights),
          'architecture': {'stage_sizes': list(model.stage_sizes), 'width': model.width},
          'image_size': image_size, 'resize': 'squashed, bicubic', 'dtype_compute': dtype,
          'l2_normalised': True, 'norm_epsilon': NORM_EPSILON}
  if grid_store.is_store(path) and grid_store.GridStore(path).meta == grid_store.make_index(
      image_ids, shape, meta):
    logging.info('%s is complete; nothing to do.', path)
    return path
  writer = grid_store.GridStoreWriter(path, image_ids, shape, meta)
  if writer.done:
    logging.info('Resuming %s at image %d of %d.', writer.partial, writer.done, len(image_ids))

  mesh = sharding.make_mesh()  # Training's mesh: every device, the batch split over them.
  batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
  variables = jax.device_put(variables, sharding.replicated(mesh))
  load = functools.partial(vqa.load_coco_image, manual_dir, subtype, size=image_size)

  def batches(pool):
    """(first row, number of real images, [batch_size, S, S, 3]) from row writer.done on; the
    last batch is padded so that every call has one shape (one compilation)."""
    for start in range(writer.done, len(image_ids), batch_size):
      ids = image_ids[start:start + batch_size]
      images = np.stack(list(pool.map(load, ids)))
      pad = batch_size - len(ids)
      yield start, len(ids), np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool, tqdm.tqdm(
      total=len(image_ids), initial=writer.done, unit='img', desc=f'grid features {subtype}',
      dynamic_ncols=True) as bar:
    pending = None
    # Dispatch is asynchronous: batch k + 1 is decoded while the device computes batch k.
    for k, (start, count, images) in enumerate(batches(pool)):
      grids = grid_features(model, variables,
                            jax.device_put(images, sharding.data_parallel(mesh)))
      if pending is not None:
        _write(writer, bar, *pending)
        if k % COMMIT_EVERY == 0:
          writer.commit()
      pending = start, count, grids
    if pending is not None:
      _write(writer, bar, *pending)
    writer.commit()
  return writer.finish()


def _write(writer, bar, start, count, grids):
  writer.write(start, np.asarray(grids)[:count])
  bar.update(count)


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when it runs, so that importing this module (tests, a
  notebook) beside another command's module defines no clashing flag."""
  flags.DEFINE_string('manual_dir', None, 'The VQA manual directory (layout: datasets/vqa.py).')
  flags.DEFINE_enum('version', 'v1', ['v1', 'v2'], 'VQA version: which question files to read.')
  flags.DEFINE_enum('split', 'train', [s.name for s in vqa.SPLITS],
                    'TFDS split whose images to extract; test and test_dev share one store.')
  flags.DEFINE_string('weights', None, 'ResNet weights .npz (resnet.save_variables); see '
                      'docs/grid_features.md for converting torchvision ImageNet weights.')
  flags.DEFINE_string('features_dir', None, 'Root of the stores (default '
                      '<manual_dir>/grid_features); the store is <features_dir>/<image folder>, '
                      'e.g. <features_dir>/train2014.')
  flags.DEFINE_integer('image_size', 448, 'Images are squashed to this square size.')
  flags.DEFINE_integer('batch_size', 32, 'Images per step (rounded up to the device count).')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'ResNet computation dtype.')
  flags.DEFINE_integer('num_threads', 8, 'Threads decoding and resizing JPEGs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_backend_probes()
  start = time.time()
  path = cli.run(extract, FLAGS.manual_dir, FLAGS.version, FLAGS.split, FLAGS.weights,
                 FLAGS.features_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.dtype,
                 FLAGS.num_threads)
  with open(os.path.join(path, grid_store.INDEX)) as f:
    index = json.load(f)
  print(f'wrote {path}: {len(index["image_ids"])} images, grid {index["grid_shape"]} float16 '
        f'({time.time() - start:.0f} s with compilation)')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['manual_dir', 'weights'])
  app.run(main)
