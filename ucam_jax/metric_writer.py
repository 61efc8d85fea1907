"""Metrics to the workdir: one JSON object per line (metrics.jsonl), TensorBoard event files
(`tensorboard --logdir workdir`), and a plot of the curves (curves.png).

TensorBoard's tags are the JSON keys with their split as a group: 'train_loss' is 'train/loss',
'test_accuracy' is 'test/accuracy'; the others ('learning_rate', 'questions_per_sec') as they
are. Only process 0 makes a writer (see `train.train_and_evaluate`).
"""

import json
import math
import os
import time
import weakref

import numpy as np
import tensorboardX
from etils import epath
from matplotlib.figure import Figure
from tensorboardX import record_writer

from ucam_jax import storage

METRICS_FILE = 'metrics.jsonl'


class _BucketFile:
  """An event file in a bucket (gs://), kept in memory and rewritten whole at each flush: a
  bucket has no append (as metrics.jsonl)."""

  def __init__(self, path: str):
    self.path, self.data = path, bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    storage.write_bytes(self.path, bytes(self.data))

  def close(self) -> None:
    self.flush()


class _BucketFiles:
  def open(self, path: str) -> _BucketFile:
    return _BucketFile(path)

  def directory_check(self, path: str) -> None:
    del path  # A bucket has no directories to make.


# tensorboardX's own gs:// writer talks to google-cloud-storage directly: this one reaches the
# bucket through etils.epath, as every other file of the workdir does.
record_writer.register_writer_factory('gs', _BucketFiles())


def tensorboard_tag(name: str) -> str:
  split, _, metric = name.partition('_')
  return f'{split}/{metric}' if split in ('train', 'test') and metric else name


class MetricWriter:
  """Writes `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and the same
  scalars, and images, to TensorBoard event files in `workdir`.

  It keeps the lines and rewrites the file whole at each write: a bucket has no append, and a
  reader never sees half a line. A run logs hundreds of lines, not millions.
  """

  def __init__(self, workdir: epath.PathLike, resume_step: int = 0):
    self.path = epath.Path(workdir) / METRICS_FILE
    # A resumed run repeats the steps after its checkpoint: drop the stale lines first, and
    # have TensorBoard hide the stale events (purge_step).
    self.lines = [json.dumps(r) + '\n' for r in read_metrics(workdir) if r['step'] <= resume_step]
    storage.write_text(self.path, ''.join(self.lines))
    # A file name is 'events.out.tfevents.<second>.<host>': the suffix (the rest of the time)
    # keeps a writer made in the same second (a quick resume) from truncating the last one's
    # file, in the order that TensorBoard reads them (by name).
    # Its thread writes the events and flushes them every flush_secs; `close` (or, on an error
    # that skips it, the finalizer at exit) writes the rest.
    self.events = tensorboardX.SummaryWriter(
        os.fspath(workdir), purge_step=resume_step + 1 if resume_step else None, flush_secs=30,
        filename_suffix=f'.{time.time_ns() % 10**9:09d}')
    weakref.finalize(self, self.events.close)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self.lines.append(json.dumps(record) + '\n')
    storage.write_text(self.path, ''.join(self.lines))
    for name, value in record.items():
      if name != 'step':
        self.events.add_scalar(tensorboard_tag(name), value, int(step))

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """TensorBoard only: {tag: [h, w, 3] uint8}."""
    for tag, image in images.items():
      self.events.add_image(tag, image, int(step), dataformats='HWC')

  def close(self) -> None:
    self.events.close()


def read_metrics(workdir: epath.PathLike) -> list[dict]:
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  try:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise storage.DamagedFile(f'{path} is damaged ({e}); it was written by an earlier run: '
                              'delete it (the curves restart from this run) or use a new '
                              '--workdir.') from e


def curves_figure(workdir: epath.PathLike, columns: int = 4) -> Figure:
  """A grid of panels, one per metric, value against step: the training loss first, then the
  other training metrics, then the rest; a test metric is drawn on the panel of its training
  metric where there is one ('test_loss' on 'train_loss'). A bare Figure, not pyplot: no
  backend is chosen here, so a notebook keeps its inline plots."""
  records = read_metrics(workdir)
  names = sorted({k for r in records for k in r if k != 'step'})
  panels = sorted((n for n in names if not (n.startswith('test_') and 'train_' + n[5:] in names)),
                  key=lambda n: (n != 'train_loss', not n.startswith('train_'), n))
  columns = max(min(columns, len(panels)), 1)
  rows = max(math.ceil(len(panels) / columns), 1)
  fig = Figure(figsize=(3.6 * columns, 2.8 * rows), layout='constrained')
  for i, name in enumerate(panels):
    ax = fig.add_subplot(rows, columns, i + 1)
    metric = name.removeprefix('train_').removeprefix('test_')
    for series in (name, 'test_' + metric if name.startswith('train_') else None):
      points = [(r['step'], r[series]) for r in records if series in r]
      if not points:
        continue
      test = series.startswith('test_')
      ax.plot(*zip(*points), 'o' if test else 'o-' if len(points) < 20 else '-',
              color='tab:red' if test else 'tab:blue', ms=4, label=series.partition('_')[0])
    if name.startswith('train_') and 'test_' + metric in names:
      ax.legend(fontsize=8)
    ax.set_title(name.replace('_', ' '), fontsize=10)
    ax.set_xlabel('step', fontsize=9)
    ax.set_ylabel(metric.replace('_', ' '), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  return fig


def plot_curves(workdir: epath.PathLike, filename: str = 'curves.png') -> str:
  """Writes `curves_figure` to workdir/filename; returns the path of the PNG."""
  path = epath.Path(workdir) / filename
  storage.savefig(curves_figure(workdir), path, dpi=90)
  return str(path)
