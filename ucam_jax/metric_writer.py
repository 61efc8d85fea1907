"""Metrics to the workdir: one JSON object per line, and a plot of the curves."""

import json
import os

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    # A resumed run repeats the steps after its checkpoint: drop the stale lines first.
    records = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, filename: str = 'curves.png') -> str:
  """One panel per metric name, value against step; returns the path of the PNG."""
  records = read_metrics(workdir)
  names = sorted({k for r in records for k in r if k != 'step'})
  fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 2.8),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    points = [(r['step'], r[name]) for r in records if name in r]
    ax.plot(*zip(*points), marker='.' if len(points) < 20 else None)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
