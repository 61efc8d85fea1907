"""Metrics to the workdir: one JSON object per line, and a plot of the curves."""

import json

from etils import epath
from matplotlib.figure import Figure

from ucam_jax import storage

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl`.

  It keeps the lines and rewrites the file whole at each write: a bucket has no append, and a
  reader never sees half a line. A run logs hundreds of lines, not millions.
  """

  def __init__(self, workdir: epath.PathLike, resume_step: int = 0):
    self.path = epath.Path(workdir) / METRICS_FILE
    # A resumed run repeats the steps after its checkpoint: drop the stale lines first.
    self.lines = [json.dumps(r) + '\n' for r in read_metrics(workdir) if r['step'] <= resume_step]
    storage.write_text(self.path, ''.join(self.lines))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self.lines.append(json.dumps(record) + '\n')
    storage.write_text(self.path, ''.join(self.lines))


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


def curves_figure(workdir: epath.PathLike) -> Figure:
  """One panel per metric name of metrics.jsonl, value against step. A bare Figure, not pyplot:
  no backend is chosen here, so a notebook keeps its inline plots."""
  records = read_metrics(workdir)
  names = sorted({k for r in records for k in r if k != 'step'})
  fig = Figure(figsize=(3.2 * max(len(names), 1), 2.8))
  axes = fig.subplots(1, max(len(names), 1), squeeze=False)
  for ax, name in zip(axes[0], names):
    points = [(r['step'], r[name]) for r in records if name in r]
    ax.plot(*zip(*points), marker='.' if len(points) < 20 else None)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
  fig.tight_layout()
  return fig


def plot_curves(workdir: epath.PathLike, filename: str = 'curves.png') -> str:
  """Writes `curves_figure` to workdir/filename; returns the path of the PNG."""
  path = epath.Path(workdir) / filename
  storage.savefig(curves_figure(workdir), path, dpi=90)
  return str(path)
