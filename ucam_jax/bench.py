"""Speed of the published base model, and of MCB and MLB, at official scale, against this
machine's matmul roof.

  python -m ucam_jax.bench                        # configs/base_vqa.py, official shapes
  python -m ucam_jax.bench --quick                # small shapes: a smoke test in seconds
  python -m ucam_jax.bench --dtype=bfloat16 --out=workdir/bench_bf16
  # docs/performance.md's figures, every case with and without huge pages:
  python -m ucam_jax.bench --huge_pages=compare --reps=3 --sweep_reps=1 \
      --markdown=docs/performance.md

Prints one JSON object on stdout (progress and the scaling table go to stderr) and writes it,
the table and a plot to --out. Cases, on synthetic grid features (`ucam_jax.datasets.synthetic`):

  train_<mode>_b<n>    `train.train_step` on n questions (one per image) with the aleatoric
                       loss, config.ucam.mode 'mask' (GCA, the config's default) and 'loss_only',
                       jitted as training does (`train.jit_train_step`: the state donated)
  predictive_T<T>_b<n> predictive uncertainty, mc_scope 'answer': the image and question encoded
                       once, T MC-dropout samples of the answer stage (`gca.mc_sampler`,
                       `uncertainty.mc_dropout`, a vmap over keys), `uncertainty.predictive_stats`
  predictive_full_T<T>_b<n>  the same, mc_scope 'full' (the published computation: the word
                       embeddings dropped out too, the LSTM rerun per sample; still one vmap)
  ucam_maps_b<n>       U-CAM maps over 'grid' (`explain.explain`, method 'ucam'): the gradient of
                       each question's aleatoric uncertainty L_AU of its own answer
  naive_T<T>_b<n>      the published way: T full forward passes with every dropout on (each a
                       jitted call of the whole model; mc_scope 'full'), a Python loop, then the
                       statistics
  (sweep)              predictive, mc_scope 'answer', over T x batch
  mcb_*, mlb_*         (the 'bilinear' group) the two bilinear base models,
                       `ucam_jax.models.bilinear`, with configs/mcb.py:vqa_v1's and
                       configs/mlb.py:vqa_v1's sizes (MCB: sketch 16,000, attention 512; MLB:
                       attention and joint 1200) on the same data: train_loss_only_b<n> and
                       ucam_maps_b<n> as above, and for MCB the attention's compact bilinear
                       pooling alone (every cell with its question, forward):
    mcb_pooling_b<n>   both count sketches, then rfft, product, irfft
    mcb_fft_b<n>       the FFT part alone (`bilinear.circular_convolution`) on the same sketches

--cases picks case groups (train, predictive, ucam_maps, naive, sweep, bilinear).
--huge_pages=compare runs each group but the sweep in two child processes, with and without
glibc's huge pages (`ucam_jax.hugepages`; this command's default is off), in alternating order,
and records the kernel's THP and page-fault counters around each; --markdown writes the figures
into a file between its bench markers (docs/performance.md): the bilinear group's into a block
of its own, so a run rewrites only the blocks of the groups it ran.

Timing: each case is compiled, run once (warm-up), then run `reps` times. A shared machine's
load changes from second to second, so every run is bracketed by two windows of back-to-back
fp32 [m, m] x [m, m] jnp.dots (the roof), each as long as the warm-up run (up to 2 s): run i's
fraction of the roof is its GFLOP/s over the mean of the roof just before and after it. Each
run's user and kernel CPU time and minor page faults are recorded too.
Reported per case: median seconds, examples/s, the median roof, and two FLOP counts of one
call, both from the compiled program:
  gflop        XLA's cost analysis (`compiled.cost_analysis()['flops']`): every op counts,
               elementwise ones too
  matmul_gflop the dot instructions of the compiled HLO alone (2 m n k each)
with fraction_of_roof and matmul_fraction_of_roof (medians over the runs). XLA counts a loop
body once, so FLOPs come from loop-free programs: the model unrolls its LSTM, and a case that
runs its MC samples in chunks (`lax.map`) takes the FLOPs of the same samples in one vmap (the
chunked random draws of `ucam_jax.threefry` count one chunk: integer ops, never matmuls).
vmap_speedup compares predictive and naive at equal load: their times times their roofs;
mcb_fft_share likewise the FFTs' time over the whole compact bilinear pooling's.
"""

import functools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import mcb, mlb, san
from ucam_jax import explain, gca, hugepages, models, train, uncertainty
from ucam_jax.datasets import synthetic
from ucam_jax.models import bilinear

FLAGS = flags.FLAGS

MAX_ROOF_WINDOW = 2.0  # Seconds of matmuls around each timed run.
TARGET = 0.6  # Fraction of the roof that training, MC dropout and U-CAM maps should reach.
# glibc's huge pages for this command, unless UCAM_HUGE_PAGES says (ucam_jax.hugepages): off,
# as measured at official scale (docs/performance.md).
HUGE_PAGES_DEFAULT = False

# The cases and their sizes. 'quick' shrinks the model too (see `quick_config`).
SIZES = {
    'full': dict(train_batches=(32, 220), batch=32, samples=50, sweep_samples=(1, 10, 50, 100),
                 sweep_batches=(8, 32, 128), memory_batch=64, roof_size=2048),
    'quick': dict(train_batches=(4,), batch=4, samples=2, sweep_samples=(2,),
                  sweep_batches=(2, 4), memory_batch=4, roof_size=512),
}


def quick_config(config):
  """The config at toy sizes: every code path of the full run, in seconds."""
  config.model.update(embed_dim=16, question_dim=32, attention_dim=16, classifier_dim=32)
  config.num_answers = 50
  config.max_question_length = 4
  config.ucam.aleatoric_samples = 10
  config.grid_shape = (4, 4, 64)
  config.vocab_size = 100
  return config


# The bilinear base models at official sizes: configs/<name>.py:vqa_v1's model ('quick': these).
BILINEAR_CONFIGS = {'mcb': mcb, 'mlb': mlb}
QUICK_BILINEAR = {'mcb': dict(embed_dim=16, question_dim=32, attention_dim=16, sketch_dim=64),
                  'mlb': dict(embed_dim=16, question_dim=32, attention_dim=16, joint_dim=32)}


def bilinear_config(config, name: str, quick: bool):
  """The bench's config (its data sizes, config.ucam, dtype) with configs/<name>.py:vqa_v1's
  model."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model = BILINEAR_CONFIGS[name].get_config('vqa_v1').model
  out.model.dtype = config.model.dtype
  if quick:
    out.model.update(QUICK_BILINEAR[name])
  return out


_START = time.perf_counter()


def log(message: str) -> None:
  print(f'[{time.perf_counter() - _START:6.1f} s] {message}', file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measuring


_HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]')
_HLO_DOT = re.compile(r'=\s*\w+\[([\d,]*)\][^=]*?\sdot\(%?([\w.\-]+),\s*%?([\w.\-]+)\)(.*)$')


def matmul_flops(hlo_text: str) -> float:
  """2 * m * n * k summed over the dot instructions of an HLO module's text (fused or not;
  a loop body counts once)."""
  shapes = {}
  for line in hlo_text.splitlines():
    if m := _HLO_INSTRUCTION.match(line):
      shapes[m.group(1)] = [int(d) for d in m.group(2).split(',') if d]
  total = 0
  for line in hlo_text.splitlines():
    if not (m := _HLO_DOT.search(line)):
      continue
    out = [int(d) for d in m.group(1).split(',') if d]
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', m.group(4))
    dims = contracting.group(1).split(',') if contracting else []
    total += 2 * math.prod(out) * math.prod(shapes[m.group(2)][int(i)] for i in dims if i)
  return float(total)


def program_flops(compiled) -> dict:
  """{'xla': cost-analysis FLOPs, 'matmul': dot FLOPs} of one call of a compiled program."""
  return {'xla': float(compiled.cost_analysis()['flops']),
          'matmul': matmul_flops(compiled.as_text())}


def compile_with_flops(jitted, *args):
  """(the compiled `jitted` for these arguments, `program_flops` of it)."""
  compiled = jitted.lower(*args).compile()
  return compiled, program_flops(compiled)


class Roof:
  """Times one [m, m] x [m, m] matmul: the machine's attainable matmul GFLOP/s, now."""

  def __init__(self, size: int, dtype=jnp.float32):
    self.size = size
    self.dot = jax.jit(jnp.dot)
    key_a, key_b = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(key_a, (size, size), dtype)
    self.b = jax.random.normal(key_b, (size, size), dtype)
    self.dot(self.a, self.b).block_until_ready()

  def sample(self, seconds: float = 0.0) -> float:
    """GFLOP/s of back-to-back matmuls over at least `seconds` (at least one matmul)."""
    count, start = 0, time.perf_counter()
    while True:
      self.dot(self.a, self.b).block_until_ready()
      count += 1
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        return count * 2 * self.size ** 3 / elapsed / 1e9


def measure(fn, args, examples: int, flops: dict, roof: Roof, reps: int, **extra) -> dict:
  """Warm-up once, then `reps` runs of fn(*args), each between two roof windows as long as the
  warm-up run (at most MAX_ROOF_WINDOW seconds), so that both see the same load."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  window = min(time.perf_counter() - start, MAX_ROOF_WINDOW)
  times, cpu, roofs = [], [], [roof.sample(window)]
  for _ in range(reps):
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                after.ru_minflt - before.ru_minflt))
    roofs.append(roof.sample(window))
  around = [(before + after) / 2 for before, after in zip(roofs, roofs[1:])]
  seconds = statistics.median(times)

  def fraction(count):
    return statistics.median(count / t / 1e9 / r for t, r in zip(times, around))
  return {**extra, 'examples': examples, 'seconds': seconds, 'examples_per_s': examples / seconds,
          'gflop': flops['xla'] / 1e9, 'gflop_per_s': flops['xla'] / seconds / 1e9,
          'matmul_gflop': flops['matmul'] / 1e9,
          'roof_gflop_per_s': statistics.median(roofs),
          'fraction_of_roof': fraction(flops['xla']),
          'matmul_fraction_of_roof': fraction(flops['matmul']),
          'user_s': statistics.median(c[0] for c in cpu),
          'sys_s': statistics.median(c[1] for c in cpu),
          'page_faults': statistics.median(c[2] for c in cpu),
          'times': times, 'roof_samples': roofs}


# --------------------------------------------------------------------------- workloads


def make_batch(config, n: int, seed: int = 0, questions_per_image=None):
  batch = synthetic.batch(seed, n, questions_per_image, grid_shape=config.grid_shape,
                          num_answers=config.num_answers, vocab_size=config.vocab_size,
                          max_question_length=config.max_question_length)
  return jax.device_put(batch)


def init_params(model, batch):
  init = jax.jit(lambda k, f, t, l: model.init(k, f, t, l)['params'])
  return {'params': init(jax.random.key(0), batch['image'][:1], batch['question'][:1],
                         batch['length'][:1])}


def encode(model, params, batch):
  """(v, e, lengths): what the answer stage's inputs are made from, computed once."""
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  return v, e, batch['length']


def predictive_fn(model, num_samples: int, chunk_size=None, scope: str = 'answer'):
  """(params, batch, key) -> `uncertainty.predictive_stats` of num_samples MC-dropout samples
  of `config.ucam.mc_scope` `scope` (`gca.mc_sampler`); the encoders run once."""
  def fn(params, batch, key):
    sample = gca.mc_sampler(model.apply, params, encode(model, params, batch), scope=scope)
    return uncertainty.predictive_stats(
        *uncertainty.mc_dropout(sample, key, num_samples, chunk_size))
  return jax.jit(fn)


def ucam_maps_fn(model, aleatoric_samples: int):
  """(params, batch, key) -> U-CAM maps [n, h, w] of each question's L_AU of its own answer.

  The aleatoric noise [samples, 1, answers] is drawn once per call and shared by the questions
  (common random numbers): a map is a function of its question and the draw, as in the
  training step, at 1/n of the random numbers.
  """
  def fn(params, batch, key):
    v, q, _ = gca.answer_inputs(model.apply, params, encode(model, params, batch))
    noise = uncertainty.sample_noise(key, aleatoric_samples, (1, model.num_answers))

    def uncertainty_of_own_answer(out):
      logits = out['logits']
      own = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
      return uncertainty.aleatoric_loss(logits, out['sigma2'], own, noise)['aleatoric'][None]
    return explain.explain(functools.partial(model.apply, method='answer'), params, (v, q),
                           'grid', uncertainty_of_own_answer, method='ucam')
  return jax.jit(fn)


def naive_fn(model, num_samples: int):
  """The predictive statistics from num_samples full passes, one jitted call each: the
  published evaluation code's loop and computation (every dropout of the model, the word
  embeddings' included: mc_scope 'full'). Returns (fn, pass, stats) for the FLOP count."""
  full = jax.jit(lambda params, batch, key: model.apply(
      params, batch['image'], batch['question'], batch['length'], deterministic=False,
      rngs={'dropout': key}))
  stats = jax.jit(lambda outs: uncertainty.predictive_stats(
      jnp.stack([o['logits'] for o in outs]), jnp.stack([o['sigma2'] for o in outs])))

  def fn(params, batch, key):
    return stats([full(params, batch, k) for k in jax.random.split(key, num_samples)])
  return fn, full, stats


def masked_grid_bytes(config, batch: int) -> int:
  """Bytes of one MC sample's dropped-out copy of the grid features (the largest tensor)."""
  itemsize = jnp.dtype(config.model.dtype).itemsize
  return batch * int(np.prod(config.grid_shape)) * itemsize


# --------------------------------------------------------------------------- cases


def train_cases(config, model, n: int, modes, roof, reps) -> dict:
  """{mode: result}: `train.train_step` on n questions, one per image, aleatoric U, jitted as
  training jits it: the state's buffers donated (`train.jit_train_step`), each step's state
  fed to the next."""
  batch = make_batch(config, n, questions_per_image=1)
  init = jax.jit(lambda b: train.create_train_state(config, model, 1, b))
  results = {}
  for mode in modes:
    ucam = ml_collections.ConfigDict(config.ucam.to_dict())
    ucam.update(mode=mode, uncertainty='aleatoric')
    state = init(batch)
    step, flops = compile_with_flops(train.jit_train_step(ucam), state, batch)
    held = [state]

    def run_step():
      held[0], metrics = step(held[0], batch)
      return metrics
    results[mode] = measure(run_step, (), n, flops, roof, reps, batch=n, mode=mode,
                            uncertainty='aleatoric', aleatoric_samples=ucam.aleatoric_samples,
                            donated=True)
  return results


def peak_bytes(compiled) -> int:
  """Bytes XLA allocates for one call: compiled `memory_analysis()` argument + output + temp
  bytes, less the aliased (donated) ones."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def predictive_programs(config, model, params, n, num_samples, budget, scope='answer'):
  """(args, chunk_size, compiled as run, the same samples compiled in one vmap)."""
  args = (params, make_batch(config, n), jax.random.key(1))
  chunk = uncertainty.chunk_size_within(num_samples, masked_grid_bytes(config, n), budget)
  one_vmap = predictive_fn(model, num_samples, scope=scope).lower(*args).compile()
  as_run = (one_vmap if chunk == num_samples
            else predictive_fn(model, num_samples, chunk, scope).lower(*args).compile())
  return args, chunk, as_run, one_vmap


def predictive_case(config, model, params, n, num_samples, roof, reps, budget, scope='answer'):
  """Run in chunks of samples when one vmap would not fit the budget; the FLOPs are those of
  the loop-free program in one vmap (the same samples)."""
  args, chunk, as_run, one_vmap = predictive_programs(config, model, params, n, num_samples,
                                                      budget, scope)
  return measure(as_run, args, n, program_flops(one_vmap), roof, reps,
                 batch=n, samples=num_samples, mc_scope=scope, chunk_size=chunk,
                 peak_bytes=peak_bytes(as_run), peak_bytes_one_vmap=peak_bytes(one_vmap))


def ucam_case(config, model, params, n, roof, reps):
  batch = make_batch(config, n)
  key = jax.random.key(2)
  fn, flops = compile_with_flops(ucam_maps_fn(model, config.ucam.aleatoric_samples),
                                 params, batch, key)
  return measure(fn, (params, batch, key), n, flops, roof, reps, batch=n,
                 aleatoric_samples=config.ucam.aleatoric_samples)


def naive_case(config, model, params, n, num_samples, roof, reps):
  batch = make_batch(config, n)
  key = jax.random.key(1)
  fn, full, stats = naive_fn(model, num_samples)
  outs = [full(params, batch, k) for k in jax.random.split(key, num_samples)]
  one_pass = compile_with_flops(full, params, batch, key)[1]
  statistics_ = compile_with_flops(stats, outs)[1]
  flops = {k: num_samples * one_pass[k] + statistics_[k] for k in one_pass}
  return measure(fn, (params, batch, key), n, flops, roof, reps, batch=n, samples=num_samples)


def mcb_pooling_cases(config, model, params, n, roof, reps) -> dict:
  """{'pooling': result, 'fft': result}: MCB's attention pooling alone, forward, of the cells
  [n, h * w, d] with their questions [n, 1, question_dim] -> [n, h * w, sketch_dim] under the
  model's tables (`bilinear.CompactBilinear`: two count sketches, then rfft, product, irfft),
  and its FFT part alone on the same sketches."""
  h, w, d = config.grid_shape
  key_v, key_q = jax.random.split(jax.random.key(3))
  v = jax.random.normal(key_v, (n, h * w, d), config.model.dtype)
  q = jax.random.normal(key_q, (n, 1, model.question_dim), config.model.dtype)
  layer = bilinear.CompactBilinear(model.sketch_dim)
  tables = {'params': params['params']['attention_pooling']}
  pooling = jax.jit(layer.apply)
  sketches = jax.jit(lambda t, v, q: layer.apply(
      t, v, q, method=lambda m, x, y: (m.sketch_x(x), m.sketch_y(y))))
  parts = (('pooling', pooling, (tables, v, q)),
           ('fft', jax.jit(bilinear.circular_convolution), sketches(tables, v, q)))
  out = {}
  for part, fn, args in parts:
    compiled, flops = compile_with_flops(fn, *args)
    out[part] = measure(compiled, args, n, flops, roof, reps, batch=n, cells=h * w,
                        sketch_dim=model.sketch_dim)
  return out


def predictive_memory(config, model, params, n, num_samples, budget) -> dict:
  """The memory of one predictive call, compiled and not run (see `peak_bytes`)."""
  _, chunk, as_run, one_vmap = predictive_programs(config, model, params, n, num_samples,
                                                   budget)
  return {'batch': n, 'samples': num_samples, 'chunk_size': chunk,
          'peak_bytes': peak_bytes(as_run), 'peak_bytes_one_vmap': peak_bytes(one_vmap)}


# --------------------------------------------------------------------------- report


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    cpu = next(line.split(':', 1)[1].strip() for line in lscpu.splitlines()
               if line.startswith('Model name'))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  device = jax.devices()[0]
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'backend': jax.default_backend(),
          'device': device.device_kind, 'jax': jax.__version__}


def scaling_table(rows) -> str:
  """Markdown: one row per (T, batch). Examples/s moves with the machine's load: the roof
  column says what the load allowed; 'at median roof' and the fraction are normalised by it."""
  lines = ['| T | batch | chunk | examples/s | at median roof | GFLOP/s | roof GFLOP/s | '
           'fraction of roof | peak memory |', '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in sorted(rows, key=lambda r: (r['samples'], r['batch'])):
    lines.append(f"| {r['samples']} | {r['batch']} | {r['chunk_size']} | "
                 f"{r['examples_per_s']:.2f} | {r['examples_per_s_at_median_roof']:.2f} | "
                 f"{r['gflop_per_s']:.1f} | "
                 f"{r['roof_gflop_per_s']:.1f} | {r['fraction_of_roof']:.0%} | "
                 f"{r['peak_bytes'] / 2 ** 20:.0f} MiB |")
  return '\n'.join(lines)


def plot_scaling(rows, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for b in sorted({r['batch'] for r in rows}):
    mine = sorted((r for r in rows if r['batch'] == b), key=lambda r: r['samples'])
    ts = [r['samples'] for r in mine]
    left.plot(ts, [r['examples_per_s_at_median_roof'] for r in mine], 'o-', label=f'batch {b}')
    right.plot(ts, [r['fraction_of_roof'] for r in mine], 'o-', label=f'batch {b}')
  left.set(xscale='log', yscale='log', xlabel='MC-dropout samples T',
           ylabel='examples / s (at the median roof)', title='Predictive uncertainty')
  right.set(xscale='log', xlabel='MC-dropout samples T', ylabel='fraction of matmul roof',
            ylim=(0, 1.05), title='Achieved / measured fp32 matmul roof')
  for ax in (left, right):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


GROUPS = ('train', 'predictive', 'ucam_maps', 'naive', 'sweep', 'bilinear')  # --cases: any.


def run(config, quick: bool, reps: int, sweep_reps: int, budget_bytes: int,
        groups=GROUPS) -> dict:
  """The cases of `groups` (GROUPS; all by default); returns the report (module docstring)."""
  sizes = SIZES['quick' if quick else 'full']
  if 'vocab_size' not in config:  # Built from the data in training.
    config.vocab_size = synthetic.VOCAB_SIZE
  model = models.get_model(config, config.vocab_size, config.num_answers)
  roof = Roof(sizes['roof_size'])
  roof_samples = [roof.sample() for _ in range(max(reps, 5))]
  log(f'roof: {statistics.median(roof_samples):.1f} GFLOP/s')
  report = {'machine': {**machine(), 'load_average_at_start': os.getloadavg()},
            'settings': {'quick': quick, 'dtype': config.model.dtype, 'reps': reps,
                         'sweep_reps': sweep_reps, 'grid_shape': list(config.grid_shape),
                         'num_answers': config.num_answers, 'vocab_size': config.vocab_size,
                         'max_question_length': config.max_question_length,
                         'aleatoric_samples': config.ucam.aleatoric_samples,
                         'model': config.model.to_dict(), 'memory_budget_bytes': budget_bytes,
                         'cases': list(groups), 'huge_pages': hugepages.active()},
            'roof': {'matmul': [sizes['roof_size']] * 2, 'dtype': 'float32',
                     'gflop_per_s': statistics.median(roof_samples), 'samples': roof_samples},
            'cases': {}}
  if config.model.dtype != 'float32':  # For reference; fractions stay against fp32.
    low = Roof(sizes['roof_size'], config.model.dtype)
    report['roof'][f'{config.model.dtype}_gflop_per_s'] = statistics.median(
        low.sample() for _ in range(max(reps, 5)))
  cases = report['cases']

  def record(name, result, group):
    cases[name] = dict(result, group=group)
    log(f"{name}: {result['examples_per_s']:.2f} examples/s, {result['gflop_per_s']:.1f} GFLOP/s"
        f" = {result['fraction_of_roof']:.0%} of {result['roof_gflop_per_s']:.1f} (matmuls alone "
        f"{result['matmul_fraction_of_roof']:.0%}), kernel {result['sys_s']:.3f} s a call")

  if 'train' in groups:
    for n in sizes['train_batches']:
      for mode, result in train_cases(config, model, n, ('mask', 'loss_only'), roof,
                                      reps).items():
        record(f'train_{mode}_b{n}', result, 'train')
  n, t = sizes['batch'], sizes['samples']
  params = init_params(model, make_batch(config, 1))
  predictive = {}  # (samples, batch) -> result of the 'answer' scope: the sweep reuses it.
  if 'predictive' in groups:
    predictive[t, n] = predictive_case(config, model, params, n, t, roof, reps, budget_bytes)
    record(f'predictive_T{t}_b{n}', predictive[t, n], 'predictive')
    record(f'predictive_full_T{t}_b{n}', predictive_case(
        config, model, params, n, t, roof, reps, budget_bytes, scope='full'), 'predictive')
  if 'ucam_maps' in groups:
    record(f'ucam_maps_b{n}', ucam_case(config, model, params, n, roof, reps), 'ucam_maps')
  if 'naive' in groups:
    record(f'naive_T{t}_b{n}', naive_case(config, model, params, n, t, roof, reps), 'naive')
  if 'bilinear' in groups:
    for name in BILINEAR_CONFIGS:
      other = bilinear_config(config, name, quick)
      other_model = models.get_model(other, other.vocab_size, other.num_answers)
      record(f'{name}_train_loss_only_b{n}', train_cases(
          other, other_model, n, ('loss_only',), roof, reps)['loss_only'], 'bilinear')
      other_params = init_params(other_model, make_batch(other, 1))
      record(f'{name}_ucam_maps_b{n}', ucam_case(other, other_model, other_params, n, roof,
                                                 reps), 'bilinear')
      if name == 'mcb':
        for part, result in mcb_pooling_cases(other, other_model, other_params, n, roof,
                                              reps).items():
          record(f'mcb_{part}_b{n}', result, 'bilinear')
  report.update(speedups(cases, t, n))

  if 'sweep' in groups:
    rows = []
    for b in sizes['sweep_batches']:
      for s in sizes['sweep_samples']:
        if (s, b) not in predictive:
          predictive[s, b] = predictive_case(config, model, params, b, s, roof, sweep_reps,
                                             budget_bytes)
        result = predictive[s, b]
        log(f"sweep T={s} batch={b}: {result['examples_per_s']:.2f} examples/s "
            f"({result['fraction_of_roof']:.0%})")
        rows.append({k: result[k] for k in (
            'samples', 'batch', 'chunk_size', 'examples_per_s', 'gflop_per_s',
            'roof_gflop_per_s', 'fraction_of_roof', 'matmul_fraction_of_roof', 'peak_bytes')})
        # Comparable across rows: examples/s had the roof been the run's median roof.
        rows[-1]['examples_per_s_at_median_roof'] = (
            result['examples_per_s'] * report['roof']['gflop_per_s']
            / result['roof_gflop_per_s'])
    report['scaling'] = rows
    m = sizes['memory_batch']
    if (t, m) in predictive:
      report['memory'] = {k: predictive[t, m][k] for k in (
          'batch', 'samples', 'chunk_size', 'peak_bytes', 'peak_bytes_one_vmap')}
    else:
      report['memory'] = predictive_memory(config, model, params, m, t, budget_bytes)
    report['memory']['how'] = (
        'XLA compiled memory_analysis(): argument + output + temp - alias bytes, as run (in '
        'chunks of chunk_size samples) and with every sample in one vmap')
  report['machine']['load_average_at_end'] = os.getloadavg()
  report['target'] = targets(cases)
  return report


def speedups(cases, t, n) -> dict:
  """vmap_speedup: the naive loop against one vmap of the same computation (mc_scope 'full'),
  at equal load (times x roofs, as the two ran minutes apart); full_scope_cost: the 'full'
  scope's time over the 'answer' scope's, likewise; mcb_fft_share: MCB's FFTs' time over its
  whole compact bilinear pooling's, likewise. Only what `cases` has."""
  def scaled(name):
    return cases[name]['seconds'] * cases[name]['roof_gflop_per_s']
  answer, full, naive = (f'predictive_T{t}_b{n}', f'predictive_full_T{t}_b{n}',
                         f'naive_T{t}_b{n}')
  out = {}
  if naive in cases and full in cases:
    out['vmap_speedup'] = scaled(naive) / scaled(full)
    out['vmap_speedup_raw'] = cases[full]['examples_per_s'] / cases[naive]['examples_per_s']
  if answer in cases and full in cases:
    out['full_scope_cost'] = scaled(full) / scaled(answer)
  if f'mcb_fft_b{n}' in cases and f'mcb_pooling_b{n}' in cases:
    out['mcb_fft_share'] = scaled(f'mcb_fft_b{n}') / scaled(f'mcb_pooling_b{n}')
  return out


DERIVED = ('vmap_speedup', 'vmap_speedup_raw', 'full_scope_cost', 'mcb_fft_share')


def targets(cases) -> dict:
  """The issue's target: training, predictive uncertainty and U-CAM maps at >= TARGET of the
  roof (by XLA's count and by the matmuls alone); not the naive loop or MCB's pooling parts."""
  return {name: {'fraction_of_roof': c['fraction_of_roof'],
                 'matmul_fraction_of_roof': c['matmul_fraction_of_roof'],
                 'met': min(c['fraction_of_roof'], c['matmul_fraction_of_roof']) >= TARGET}
          for name, c in cases.items()
          if not re.match(r'naive|mcb_pooling|mcb_fft', name)}


# --------------------------------------------------------------------------- huge pages


THP_COUNTERS = ('thp_fault_alloc', 'thp_fault_fallback', 'compact_stall', 'compact_success',
                'compact_fail', 'thp_collapse_alloc', 'pgfault', 'pgmajfault')


def vmstat() -> dict:
  """The kernel's counters of THP_COUNTERS (/proc/vmstat, system wide); {} off Linux."""
  try:
    with open('/proc/vmstat') as f:
      pairs = (line.split() for line in f)
      return {k: int(v) for k, v in pairs if k in THP_COUNTERS}
  except OSError:
    return {}


def thp_settings() -> dict:
  """/sys/kernel/mm/transparent_hugepage/{enabled,defrag}: the kernel's THP policy."""
  settings = {}
  for name in ('enabled', 'defrag'):
    try:
      with open(f'/sys/kernel/mm/transparent_hugepage/{name}') as f:
        settings[name] = f.read().strip()
    except OSError:
      pass
  return settings


def child_environment(huge: bool) -> dict:
  """os.environ for a child bench with glibc's huge-page tunable on or off, and a shared
  compilation cache (the pair's second process loads the first one's programs)."""
  tunables = [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':')
              if t and not t.startswith(hugepages.TUNABLE + '=')]
  if huge:
    tunables.append(f'{hugepages.TUNABLE}=1')
  env = dict(os.environ, UCAM_HUGE_PAGES='1' if huge else '0',
             GLIBC_TUNABLES=':'.join(tunables),
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.abspath(FLAGS.out), 'xla_cache'))
  if not tunables:
    del env['GLIBC_TUNABLES']
  return env


_OWN_FLAGS = ('--huge_pages', '--markdown', '--cases', '--out')


def compare_huge_pages(groups) -> dict:
  """{group: {'on': report, 'off': report}}: each case group in two child processes, one with
  huge pages and one without, the order alternating from group to group (so a drift in the
  machine's load favours neither), with the kernel's THP counters and the children's CPU
  time (user / kernel) around each."""
  passed = [a for a in sys.argv[1:] if not a.startswith(_OWN_FLAGS)]
  out = {}
  for i, group in enumerate(groups):
    out[group] = {}
    for huge in ((True, False) if i % 2 == 0 else (False, True)):
      label = 'on' if huge else 'off'
      directory = os.path.join(FLAGS.out, f'{group}_{label}')
      before, times, start = vmstat(), os.times(), time.perf_counter()
      result = subprocess.run(
          [sys.executable, '-m', 'ucam_jax.bench', f'--cases={group}', f'--out={directory}',
           *passed], env=child_environment(huge), stdout=subprocess.PIPE, text=True, check=True)
      after, times_after = vmstat(), os.times()
      report = json.loads(result.stdout)
      report['process'] = {
          'wall_s': time.perf_counter() - start,
          'user_s': times_after.children_user - times.children_user,
          'sys_s': times_after.children_system - times.children_system,
          'vmstat': {k: after[k] - before[k] for k in after if k in before}}
      out[group][label] = report
      log(f"{group}, huge pages {label}: {report['process']['wall_s']:.0f} s, kernel "
          f"{report['process']['sys_s']:.1f} s, THP faults {report['process']['vmstat'].get('thp_fault_alloc')}")
  return out


# --------------------------------------------------------------------------- markdown


MARK_BEGIN = '<!-- bench:begin (generated by python -m ucam_jax.bench --markdown; edit the code) -->'
MARK_END = '<!-- bench:end -->'
# The generated blocks of a --markdown file, by name ('': the one above), and their case groups.
BLOCKS = {'': ('train', 'predictive', 'ucam_maps', 'naive', 'sweep'), 'bilinear': ('bilinear',)}


def markers(block: str) -> tuple[str, str]:
  """(begin, end) markers of the generated block `block` (BLOCKS)."""
  if not block:
    return MARK_BEGIN, MARK_END
  return (MARK_BEGIN.replace('bench:begin', f'bench:begin {block}'),
          MARK_END.replace('bench:end', f'bench:end {block}'))

CASE_TITLES = [
    (r'train_mask_b(\d+)', 'training step, GCA mask, batch {}'),
    (r'train_loss_only_b(\d+)', 'training step, loss only, batch {}'),
    (r'predictive_T(\d+)_b(\d+)', 'predictive, T = {} MC samples, mc_scope answer, batch {}'),
    (r'predictive_full_T(\d+)_b(\d+)', 'predictive, T = {} MC samples, mc_scope full, batch {}'),
    (r'ucam_maps_b(\d+)', 'U-CAM maps over the grid, batch {}'),
    (r'naive_T(\d+)_b(\d+)', 'naive: the published way, {} full passes in a loop, batch {}'),
    (r'(mcb|mlb)_train_loss_only_b(\d+)', '{}: training step, loss only, batch {}'),
    (r'(mcb|mlb)_ucam_maps_b(\d+)', '{}: U-CAM maps over the grid, batch {}'),
    (r'mcb_pooling_b(\d+)', 'MCB: attention pooling alone (count sketches + FFTs), batch {}'),
    (r'mcb_fft_b(\d+)', 'MCB: its FFTs alone (rfft, product, irfft), batch {}'),
]


def case_title(name: str) -> str:
  for pattern, title in CASE_TITLES:
    if m := re.fullmatch(pattern, name):
      return title.format(*(g.upper() if g in BILINEAR_CONFIGS else g for g in m.groups()))
  return name


def _git_revision() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def cases_table(by_setting: dict) -> str:
  """Markdown: one row per case, each setting's ('on' / 'off' / 'as run') figures."""
  settings = list(by_setting)
  head = '| case | ' + ' | '.join(
      f'{s}: examples/s | {s}: s a call | {s}: fraction of roof (XLA / matmul) | '
      f'{s}: kernel s, page faults a call' for s in settings)
  align = '|---|' + '---:|' * (4 * len(settings))
  if settings == ['on', 'off']:
    head += ' | time on / off |'
    align += '---:|'
  lines = [head + ('' if head.endswith('|') else ' |'), align]
  names = list(dict.fromkeys(n for cases in by_setting.values() for n in cases))
  for name in names:
    row = f'| {case_title(name)} |'
    for s in settings:
      c = by_setting[s].get(name)
      row += (' - | - | - | - |' if c is None else
              f" {c['examples_per_s']:.2f} | {c['seconds']:.3f} | "
              f"**{c['fraction_of_roof']:.0%}** / {c['matmul_fraction_of_roof']:.0%} | "
              f"{c['sys_s']:.2f}, {c['page_faults'] / 1e3:.0f} k |")
    if settings == ['on', 'off'] and all(name in by_setting[s] for s in settings):
      # Raw medians: the roof itself moves with the setting (its 16 MB output is a fresh
      # mapping per call), so scaling by it would credit the setting's own effect to the load.
      on, off = (by_setting[s][name] for s in settings)
      row += f" {on['seconds'] / off['seconds']:.2f} |"
    lines.append(row)
  return '\n'.join(lines)


def markdown(report: dict, command: str) -> str:
  """The generated part of docs/performance.md."""
  m = report['machine']
  lines = [f"Generated by `{command}` at git {_git_revision()}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", '',
           f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['backend']} backend, JAX {m['jax']}; "
           f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}"
           f" at the start, {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} at the "
           f"end; transparent huge pages: enabled {m.get('thp', {}).get('enabled', '?')}, "
           f"defrag {m.get('thp', {}).get('defrag', '?')}. Roof: fp32 "
           f"{report['roof']['matmul'][0]}x{report['roof']['matmul'][1]} matmul, median "
           f"{report['roof']['gflop_per_s']:.1f} GFLOP/s. Float {report['settings']['dtype']}, "
           f"{report['settings']['reps']} timed runs a case (medians)"
           + (f", {report['settings']['sweep_reps']} a sweep cell." if 'scaling' in report
              else '.'), '']
  if 'huge_pages' in report:
    lines += ['### Every case, with and without huge pages', '',
              'Each case group ran in two processes, one with `glibc.malloc.hugetlb=1` (on) and '
              'one without (off), in alternating order, the machine otherwise idle (the CPU '
              'lock). "kernel s, page faults a call": medians of one call\'s system CPU time and '
              'minor page faults. "time on / off": the ratio of the two medians.', '',
              cases_table({'on': report['cases_huge_pages']['on'],
                           'off': report['cases_huge_pages']['off']}), '',
              '| group | setting | wall s | user CPU s | kernel CPU s | THP faults | THP '
              'fallbacks | compaction stalls | page faults |',
              '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for group, pair in report['huge_pages'].items():
      for label in ('on', 'off'):
        p = pair[label]['process']
        v = p['vmstat']
        lines.append(f"| {group} | {label} | {p['wall_s']:.0f} | {p['user_s']:.1f} | "
                     f"{p['sys_s']:.1f} | {v.get('thp_fault_alloc', '-')} | "
                     f"{v.get('thp_fault_fallback', '-')} | {v.get('compact_stall', '-')} | "
                     f"{v.get('pgfault', '-')} |")
    lines.append('')
  else:
    lines += ['### Every case', '', cases_table({'as run': report['cases']}), '']
  for key, text in (('vmap_speedup', 'one vmap over the MC keys against the naive loop, the '
                     'same computation (mc_scope full), at equal load'),
                    ('full_scope_cost', "mc_scope 'full' against 'answer', time at equal load"),
                    ('mcb_fft_share', "MCB: its FFTs' time over the whole attention "
                     "pooling's, at equal load")):
    if key in report:
      lines.append(f'- {text}: **{report[key]:.2f}x**')
  if 'scaling' in report:
    lines += ['', f"### Predictive uncertainty (mc_scope answer) as T and the batch grow "
              f"(huge pages {'on' if report['settings']['huge_pages'] else 'off'})", '',
              scaling_table(report['scaling']), '',
              f"Memory at batch {report['memory']['batch']}, T = {report['memory']['samples']}: "
              f"{report['memory']['peak_bytes'] / 2 ** 20:.0f} MiB in chunks of "
              f"{report['memory']['chunk_size']} samples, "
              f"{report['memory']['peak_bytes_one_vmap'] / 2 ** 20:.0f} MiB in one vmap "
              f"({report['memory']['how']})."]
  return '\n'.join(lines) + '\n'


def block_report(report: dict, groups, t: int, n: int) -> dict:
  """The part of `report` that a markdown block of these case groups shows."""
  def pick(cases):
    return {name: c for name, c in cases.items() if c.get('group') in groups}
  out = {k: v for k, v in report.items() if k not in DERIVED and k not in (
      'cases', 'cases_huge_pages', 'huge_pages', 'scaling', 'memory')}
  out['cases'] = pick(report['cases'])
  if 'huge_pages' in report:
    out['huge_pages'] = {g: pair for g, pair in report['huge_pages'].items() if g in groups}
    out['cases_huge_pages'] = {label: pick(c) for label, c in report['cases_huge_pages'].items()}
  if 'sweep' in groups:
    out.update({k: report[k] for k in ('scaling', 'memory') if k in report})
  out.update(speedups(out['cases'], t, n))
  return out


def write_markdown(path: str, text: str, block: str = '') -> None:
  """Replaces what lies between the markers of `block` (BLOCKS; '' MARK_BEGIN and MARK_END) in
  `path` with `text` (appends the block when the file has none), so the prose around it and the
  other blocks stay."""
  begin, end = markers(block)
  old = open(path).read() if os.path.exists(path) else ''
  block = f'{begin}\n{text}{end}'
  if begin in old and end in old:
    new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
  else:
    new = old + ('\n' if old else '') + block + '\n'
  with open(path, 'w') as f:
    f.write(new)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = ml_collections.ConfigDict(FLAGS.config.to_dict())  # Unlocked: bench fields below.
  # The published computation, which the peer's figures are of (SPEC section 8): its variance
  # head and aleatoric loss, whatever the config's defaults.
  config.model.update(san.PUBLISHED_MODEL)
  config.ucam.update(san.PUBLISHED_UCAM)
  config.model.dtype = FLAGS.dtype
  if FLAGS.quick:
    config = quick_config(config)
  groups = GROUPS if FLAGS.cases == 'all' else tuple(FLAGS.cases.split(','))
  if unknown := set(groups) - set(GROUPS):
    raise app.UsageError(f'--cases: unknown {sorted(unknown)}; choose from {list(GROUPS)}.')
  os.makedirs(FLAGS.out, exist_ok=True)
  pairs = None
  if FLAGS.huge_pages == 'compare':  # The case groups in child processes; the sweep here.
    pairs = compare_huge_pages([g for g in groups if g != 'sweep'])
    groups = tuple(g for g in groups if g == 'sweep')
  report = run(config, FLAGS.quick, FLAGS.reps, FLAGS.sweep_reps,
               FLAGS.memory_budget_mb * 2 ** 20, groups)
  t, n = (SIZES['quick' if FLAGS.quick else 'full'][k] for k in ('samples', 'batch'))
  report['machine']['thp'] = thp_settings()
  if pairs:
    report['huge_pages'] = pairs
    report['cases_huge_pages'] = {label: {name: case for pair in pairs.values()
                                          for name, case in pair[label]['cases'].items()}
                                  for label in ('on', 'off')}
    default = 'on' if hugepages.active() else 'off'
    report['cases'] = report['cases_huge_pages'][default]  # This command's own setting.
    report['settings']['cases'] = list(GROUPS if FLAGS.cases == 'all' else FLAGS.cases.split(','))
    report.update(speedups(report['cases'], t, n))
    report['target'] = targets(report['cases'])
  if 'scaling' in report:
    table = scaling_table(report['scaling'])
    log(table)
    with open(os.path.join(FLAGS.out, 'bench_table.md'), 'w') as f:
      f.write('Predictive uncertainty, T MC-dropout samples (ucam_jax.bench)\n\n' + table + '\n')
    plot_scaling(report['scaling'], os.path.join(FLAGS.out, 'bench.png'))
  with open(os.path.join(FLAGS.out, 'bench.json'), 'w') as f:
    json.dump(report, f, indent=2)
  if FLAGS.markdown:
    command = 'python -m ucam_jax.bench ' + ' '.join(
        a for a in sys.argv[1:] if not a.startswith('--out'))
    ran = report['settings']['cases']
    for block, block_groups in BLOCKS.items():
      if set(block_groups) & set(ran):
        write_markdown(FLAGS.markdown, markdown(block_report(report, block_groups, t, n),
                                                command.strip()), block)
  print(json.dumps(report, indent=2))


def define_flags():
  """The command's flags; defined only when it runs, so importing this module (tests do)
  cannot clash with the flags of ucam_jax.main."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'base_vqa.py'),
      'The model and U-CAM config.')
  flags.DEFINE_bool('quick', False, 'Small shapes and few cases: a smoke test of the script.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'The model\'s compute dtype.')
  flags.DEFINE_integer('reps', 5, 'Timed runs per case, after one warm-up run.')
  flags.DEFINE_integer('sweep_reps', 3, 'Timed runs per case of the T x batch sweep (its largest '
                       'case, T=100 at batch 128, is 5.5 TFLOP: a minute or more per run).')
  flags.DEFINE_string('out', 'workdir/bench', 'Writes bench.json, bench_table.md, bench.png here.')
  flags.DEFINE_integer('memory_budget_mb', 256, 'MC samples run in chunks whose masked copies '
                       'of the image features fit this (uncertainty.chunk_size_within).')
  flags.DEFINE_string('cases', 'all', f'Comma-separated case groups to run, of {list(GROUPS)}, '
                      'or all.')
  flags.DEFINE_enum('huge_pages', 'as_run', ['as_run', 'compare'],
                    "as_run: every case in this process, with this command's huge-page setting "
                    '(ucam_jax.hugepages); compare: each case group in two child processes, '
                    'with and without huge pages (the sweep stays in this one).')
  flags.DEFINE_string('markdown', '', 'Also write the figures as markdown into this file, '
                      'between its bench markers (e.g. docs/performance.md).')


if __name__ == '__main__':
  hugepages.reexec_with_huge_pages(default=HUGE_PAGES_DEFAULT)
  define_flags()
  app.run(main)
