"""A per-image store of precomputed grid features, read without loading it into memory.

A store is a directory:
  features.npy   [num_images, h, w, c] float16 (half the size of float32; the features are
                 L2-normalised per cell, so float16's ~3 significant digits are uniform)
  index.json     {"image_ids": [...] (row order), "grid_shape": [h, w, c], "dtype": "float16",
                  plus how it was made: weights, image_size, l2_normalised, ...}
`GridStore` memory-maps features.npy: opening reads only the index, `store[image_id]` reads one
image's rows from disk, and the OS page cache, not the process, holds what was read (at 448 px
and 2048 channels an image is 784 kB; the 82,783 train2014 images are 65 GB).

`GridStoreWriter` writes into `<path>.partial` and renames it to `<path>` when every image is
there, so a store at `<path>` is always complete; an interrupted run resumes from its last
committed batch.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

FEATURES = 'features.npy'
INDEX = 'index.json'
PROGRESS = 'progress.json'  # Only in a .partial store: {"done": n}, rows [0, n) are written.
DTYPE = np.float16
PARTIAL_SUFFIX = '.partial'


def partial_path(path: str) -> str:
  return os.fspath(path).rstrip(os.sep) + PARTIAL_SUFFIX


def is_store(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, f)) for f in (FEATURES, INDEX))


def make_index(image_ids: Sequence[int], grid_shape: Sequence[int], meta: Mapping) -> dict:
  """The index.json of a store, as read back (through JSON, so that it compares equal)."""
  return json.loads(json.dumps({
      **meta, 'image_ids': [int(i) for i in image_ids],
      'grid_shape': [int(d) for d in grid_shape], 'dtype': np.dtype(DTYPE).name}))


class GridStore:
  """Read access by image id to one store: `store[image_id]` -> [h, w, c] float16."""

  def __init__(self, path: str):
    if not is_store(path):
      state = (f'an interrupted extraction is at {partial_path(path)}; rerun the command that '
               'wrote it to finish it' if os.path.isdir(partial_path(path)) else
               'nothing is there')
      raise FileNotFoundError(f'{path} is not a grid-feature store ({FEATURES} and {INDEX}): '
                              f'{state}. Stores are written by `python -m '
                              'ucam_jax.extract_features` (docs/grid_features.md).')
    self.path = path
    with open(os.path.join(path, INDEX)) as f:
      self.meta = json.load(f)
    self.image_ids = [int(i) for i in self.meta['image_ids']]
    self._rows = {image_id: row for row, image_id in enumerate(self.image_ids)}
    # mmap: nothing is read until a row is indexed.
    self._features = np.load(os.path.join(path, FEATURES), mmap_mode='r')
    self.grid_shape = tuple(self._features.shape[1:])
    if (self._features.shape[0] != len(self.image_ids)
        or list(self.grid_shape) != list(self.meta['grid_shape'])):
      raise ValueError(f'{path}: {FEATURES} has shape {self._features.shape}, but {INDEX} lists '
                       f'{len(self.image_ids)} images of grid {self.meta["grid_shape"]}; '
                       'extract the store again.')

  def __len__(self) -> int:
    return len(self.image_ids)

  def __contains__(self, image_id) -> bool:
    return int(image_id) in self._rows

  def __getitem__(self, image_id) -> np.ndarray:
    """The grid of one image, [h, w, c] float16, copied out of the memory map."""
    try:
      row = self._rows[int(image_id)]
    except KeyError:
      raise KeyError(f'Image {image_id} is not in the grid-feature store {self.path}.') from None
    return np.array(self._features[row])


class GridStoreWriter:
  """Writes a store of `image_ids` (in this row order), resuming an interrupted run.

  meta: what defines the features (weights, image size, ...); a .partial store written with
  other meta or other ids is discarded rather than resumed. Use: `for each batch: write(rows,
  grids); commit()`, then `finish()`.
  """

  def __init__(self, path: str, image_ids: Sequence[int], grid_shape: Sequence[int],
               meta: Mapping):
    self.path = os.fspath(path).rstrip(os.sep)
    self.partial = partial_path(self.path)
    self.index = make_index(image_ids, grid_shape, meta)
    shape = (len(image_ids), *grid_shape)
    self.done = self._resumable_rows()
    if self.done is None:
      shutil.rmtree(self.partial, ignore_errors=True)
      os.makedirs(self.partial)
      self.done = 0
      self._features = np.lib.format.open_memmap(
          os.path.join(self.partial, FEATURES), mode='w+', dtype=DTYPE, shape=shape)
      with open(os.path.join(self.partial, INDEX), 'w') as f:
        json.dump(self.index, f)
      self.commit()
    else:
      self._features = np.load(os.path.join(self.partial, FEATURES), mmap_mode='r+')

  def _resumable_rows(self) -> int | None:
    try:
      with open(os.path.join(self.partial, INDEX)) as f:
        index = json.load(f)
      with open(os.path.join(self.partial, PROGRESS)) as f:
        done = json.load(f)['done']
    except (OSError, ValueError, KeyError):
      return None
    return done if index == self.index else None

  def write(self, start: int, grids: np.ndarray) -> None:
    """grids: [k, h, w, c], the rows start .. start + k."""
    self._features[start:start + len(grids)] = grids
    self.done = max(self.done, start + len(grids))

  def commit(self) -> None:
    """Makes rows [0, done) durable: a rerun after an interruption starts at `done`."""
    self._features.flush()
    tmp = os.path.join(self.partial, PROGRESS + '.tmp')
    with open(tmp, 'w') as f:
      json.dump({'done': self.done}, f)
    os.replace(tmp, os.path.join(self.partial, PROGRESS))

  def finish(self) -> str:
    """Renames the complete .partial store to `path` (replacing a store there) and returns it."""
    if self.done != len(self.index['image_ids']):
      raise ValueError(f'{self.partial} holds {self.done} of {len(self.index["image_ids"])} '
                       'images; write the rest before finishing.')
    self._features.flush()
    del self._features
    os.remove(os.path.join(self.partial, PROGRESS))
    old = self.path + '.old'
    if os.path.exists(self.path):
      shutil.rmtree(old, ignore_errors=True)
      os.rename(self.path, old)
    os.rename(self.partial, self.path)
    shutil.rmtree(old, ignore_errors=True)
    return self.path
