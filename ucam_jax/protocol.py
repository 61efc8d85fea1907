r"""The fair protocol of the ablation (`python -m ucam_jax.ablation --preset=paper`).

  python -m ucam_jax.ablation --preset=paper [--figures=docs]

The published base model (attention_net) on frozen pretrained grid features of grounded shapes
(configs/grounded_shapes_grid.py), where the exact masks measure attention. Three steps, each
run in <out>/<step>/<variant>/<setting or seed>, resumable (a run whose metrics.json exists is
read, not rerun):

1. search: every variant of `PAPER_VARIANTS` trains once (training seed 0) with each setting of
   its grid (`search_grid`: the learning rates x two uncertainty weights; the baseline, which
   has no uncertainty weight, x two dropout rates; 2 settings a variant at the default single
   learning rate) on the *validation draw* (dataset seed 1), evaluated on that draw's test split.
2. pick: each variant keeps the setting of its highest validation accuracy (ties: the first in
   grid order). Nothing is chosen on the test draw.
3. test: the picked setting of each variant trains with seeds 0-4 on the *test draw* (dataset
   seed 0). Per claim (`CLAIMS`), each comparison is the per-seed paired difference
   (variant - reference, same training seed) with its mean, a 95% Student-t interval and the
   one-sided exact Wilcoxon signed-rank p-value in the claimed direction. A comparison is
   "shown" when the interval excludes 0 on the claimed side *and* p < 0.05 (with 5 seeds the
   smallest one-sided p is 1/32: all five differences on the claimed side); a claim is shown when
   all its comparisons are, "partly shown (k of n)" when some are, else "not shown".

`--figures=DIR` writes one figure per claim, DIR/ablation_claim<k>.png: each comparison's
per-seed differences, their mean and 95% interval.

  python -m ucam_jax.ablation --preset=paper_bilinear [--figures=docs]

runs the same three steps with MCB and MLB as the base model (baseline and A-GCA each, the
'model' of each variant replacing the published one) and reports claim 5 (`TRANSFER_CLAIMS`):
A-GCA minus the same base model's baseline.
"""

import itertools
import json
import math
import os
import statistics

import ml_collections

from ucam_jax import train

# The settings each variant searches: the learning rates x two of its own knobs. One rate, 3e-3,
# configs/grounded_shapes_grid.py's (chosen for the baseline on the validation draw), so 2 runs a
# variant; --learning_rates=1e-3,3e-3 doubles the search. The protocol at one rate is 49 runs,
# about 75 minutes on 2 quiet cores (docs/results.md).
LEARNING_RATES = (3e-3,)
UNCERTAINTY_WEIGHTS = (0.3, 1.0)
BASELINE_DROPOUTS = (0.1, 0.2)  # The baseline has no uncertainty weight: its dropout instead.


def search_grid(ucam: dict, learning_rates=LEARNING_RATES) -> list[tuple[str, dict]]:
  """[(name, overrides)] of a variant's search; overrides: top-level config keys plus 'ucam'
  and 'model' dicts."""
  grid = []
  for lr in learning_rates:
    if ucam.get('mode') == 'none':
      for rate in BASELINE_DROPOUTS:
        grid.append((f'lr{lr:g}_dropout{rate:g}',
                     dict(learning_rate=lr, model=dict(dropout_rate=rate))))
    else:
      for weight in UNCERTAINTY_WEIGHTS:
        grid.append((f'lr{lr:g}_uw{weight:g}',
                     dict(learning_rate=lr, ucam=dict(uncertainty_weight=weight))))
  return grid


# The paper's claims (SPEC section 1, the abstract in seed/) and the authors' branch ablation,
# each as comparisons (variant, reference, column, direction: +1 the variant should be higher,
# -1 lower). The columns are `METRICS`.
GCA = ('A-GCA', 'P-GCA', 'A+P-GCA')
CLAIMS = (
    dict(claim='1. Certainty estimates separate wrong from correct answers and are calibrated '
               '(GCA vs baseline: AUROC of the predictive entropy for wrong answers higher, '
               'ECE lower)',
         comparisons=[(v, 'baseline', 'AUROC wrong (pred. entropy)', +1) for v in GCA]
         + [(v, 'baseline', 'ECE', -1) for v in GCA]),
    dict(claim='2. Certainty-gradient attention matches the exact attention better (GCA '
               'attention vs the baseline\'s attention: Spearman with the masks higher)',
         comparisons=[(v, 'baseline', 'Spearman, attention used', +1) for v in GCA]),
    dict(claim='3. The improved attention raises accuracy (GCA vs baseline)',
         comparisons=[(v, 'baseline', 'accuracy', +1) for v in GCA]),
    dict(claim='4. Both branches help more than one (A-GCA vs image only, vs question only: '
               'accuracy)',
         comparisons=[('A-GCA', 'A-GCA, image only', 'accuracy', +1),
                      ('A-GCA', 'A-GCA, question only', 'accuracy', +1)]),
)


# Whether the recipe transfers (issue 20; the 'paper_bilinear' preset of ucam_jax/ablation.py):
# per other base model, A-GCA against that model's own baseline.
BASE_MODELS = ('MCB', 'MLB')
TRANSFER_CLAIMS = (
    dict(claim='5. The recipe transfers to other base models (A-GCA vs the same base model\'s '
               'baseline, MCB and MLB: accuracy, Spearman of the attention used with the masks, '
               'AUROC of the predictive entropy for wrong answers, all higher)',
         comparisons=[(f'{m} A-GCA', f'{m} baseline', column, +1) for m in BASE_MODELS
                      for column in ('accuracy', 'Spearman, attention used',
                                     'AUROC wrong (pred. entropy)')]),
)


def _attention_used(test: dict):
  """The attention the answer used: GCA's after the mask (mode 'mask'), else the model's."""
  maps = test.get('maps', {})
  return (maps.get('gca_attention') or maps.get('model_attention') or {}).get('spearman')


METRICS = {
    'accuracy': lambda t: t['accuracy'],
    'ECE': lambda t: t['ece'],
    'AUROC wrong (pred. entropy)': lambda t: t['uncertainty']['predictive_entropy'][
        'auroc_wrong'],
    'Spearman, attention used': _attention_used,
    'Spearman, model attention': lambda t: t['maps']['model_attention']['spearman'],
    'pointing, model attention': lambda t: t['maps']['model_attention']['pointing_game'],
}

# Two-sided 95% quantiles of Student's t for 1-10 degrees of freedom; the normal's 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_interval(differences) -> tuple[float, float, float]:
  """(mean, low, high): the mean and its two-sided 95% Student-t interval (n >= 2)."""
  n = len(differences)
  mean = statistics.mean(differences)
  if n < 2:
    return mean, math.nan, math.nan
  half = (T95[n - 2] if n - 1 <= len(T95) else 1.96) * statistics.stdev(differences) / n ** 0.5
  return mean, mean - half, mean + half


def _average_ranks(values) -> list[float]:
  order = sorted(range(len(values)), key=lambda i: values[i])
  ranks = [0.0] * len(values)
  i = 0
  while i < len(order):
    j = i
    while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
      j += 1
    for k in range(i, j + 1):
      ranks[order[k]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def wilcoxon_greater(differences) -> float:
  """One-sided exact Wilcoxon signed-rank p-value that the differences are centred above 0:
  P(W+ >= observed) over the 2^n equally likely signs of the ranks of |d| (zeros dropped,
  Wilcoxon's convention; ties take average ranks). 1.0 when every difference is 0."""
  d = [x for x in differences if x != 0]
  if not d:
    return 1.0
  ranks = _average_ranks([abs(x) for x in d])
  observed = sum(r for r, x in zip(ranks, d) if x > 0)
  hits = sum(sum(r for r, s in zip(ranks, signs) if s) >= observed - 1e-9
             for signs in itertools.product((0, 1), repeat=len(d)))
  return hits / 2 ** len(d)


def compare(differences, direction: int) -> dict:
  """The paired statistics of per-seed differences in the claimed direction (+1: above 0)."""
  mean, low, high = t_interval(differences)
  p = wilcoxon_greater([direction * x for x in differences])
  beyond = low > 0 if direction > 0 else high < 0
  return dict(n=len(differences), mean=mean, low=low, high=high, p=p,
              differences=list(differences), shown=bool(beyond and p < 0.05))


def verdict(rows: list[dict]) -> str:
  present = [r for r in rows if r.get('n', 0) >= 2]
  shown = sum(r['shown'] for r in present)
  if not present:
    return 'n/a (no runs)'
  if shown == len(rows):
    return 'shown'
  return f'partly shown ({shown} of {len(rows)})' if shown else 'not shown'


def claim_rows(records: list[dict], claims=CLAIMS) -> list[dict]:
  """Per claim of `claims` (a preset's: CLAIMS, TRANSFER_CLAIMS): its comparisons' statistics
  from the test step's records (dicts with variant, seed, test)."""
  runs = {(r['variant'], r['seed']): r['test'] for r in records if 'test' in r}
  out = []
  for claim in claims:
    rows = []
    for variant, reference, column, direction in claim['comparisons']:
      diffs = []
      for (v, seed), test in sorted(runs.items(), key=lambda kv: kv[0][1]):
        if v != variant or (reference, seed) not in runs:
          continue
        try:
          a, b = METRICS[column](test), METRICS[column](runs[reference, seed])
        except (KeyError, TypeError):
          continue
        if a is not None and b is not None and math.isfinite(a - b):
          diffs.append(float(a - b))
      row = compare(diffs, direction) if diffs else dict(n=0, shown=False)
      rows.append(dict(row, variant=variant, reference=reference, column=column,
                       direction=direction))
    out.append(dict(claim=claim['claim'], rows=rows, verdict=verdict(rows)))
  return out


def _cell(x) -> str:
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:+.4f}'


def claims_table(claims: list[dict]) -> str:
  lines = ['| claim | comparison | metric | seeds | mean difference [95% t] | one-sided '
           'Wilcoxon p | verdict |', '|---|---|---|---:|---:|---:|---|']
  for claim in claims:
    for i, row in enumerate(claim['rows']):
      side = 'higher' if row['direction'] > 0 else 'lower'
      interval = (f"{_cell(row['mean'])} [{_cell(row['low'])}, {_cell(row['high'])}]"
                  if row['n'] else 'n/a')
      p = f"{row['p']:.4f}" if row['n'] else 'n/a'
      mark = 'n/a' if not row['n'] else 'shown' if row['shown'] else 'not shown'
      lines.append(f"| {claim_number(claim) if i else claim['claim']} | "
                   f"{row['variant']} - {row['reference']} | {row['column']} ({side}) | "
                   f"{row['n']} | {interval} | {p} | {mark} |")
    lines.append(f"| **{claim_number(claim)}: {claim['verdict']}** | | | | | | |")
  return '\n'.join(lines)


def claim_number(claim: dict) -> str:
  """'5' of '5. The recipe transfers ...'."""
  return claim['claim'].split('.')[0]


def plot_claims(claims: list[dict], directory: str) -> list[str]:
  """One figure per claim, <directory>/ablation_claim<k>.png (k its number, so the presets'
  figures share a directory); returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  os.makedirs(directory, exist_ok=True)
  paths = []
  for claim in claims:
    rows = claim['rows']
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.6))
    for y, row in enumerate(rows):
      if not row['n']:
        continue
      ax.scatter(row['differences'], [y] * row['n'], s=14, color='grey', zorder=2)
      if row['n'] >= 2:
        ax.plot([row['low'], row['high']], [y, y], color='C3' if row['shown'] else 'C0', lw=3,
                alpha=0.6)
      ax.scatter([row['mean']], [y], marker='D', color='black', zorder=3)
    ax.axvline(0, color='black', lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['variant']} - {r['reference']}\n{r['column']} "
                        f"({'higher' if r['direction'] > 0 else 'lower'})" for r in rows],
                       fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel('per-seed paired difference (dots), mean (diamond), 95% t-interval (bar)')
    ax.set_title(f"Claim {claim_number(claim)}: {claim['verdict']}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, f'ablation_claim{claim_number(claim)}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def apply_setting(config: ml_collections.ConfigDict, setting: dict) -> ml_collections.ConfigDict:
  setting = dict(setting)
  config.model.update(setting.pop('model', {}))
  config.ucam.update(setting.pop('ucam', {}))
  config.update(setting)
  return config


def _run(config, workdir: str, log, label: str, train_missing: bool = True) -> dict:
  """Trains and evaluates `config` in `workdir` unless its metrics.json exists; the record
  (with train_missing=False, {'workdir', 'missing': True} for a run not done)."""
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.exists(path):
    if not train_missing:
      return dict(workdir=workdir, missing=True)
    log(f'{label}: training in {workdir}')
    try:
      train.train_and_evaluate(config, workdir)
    except FloatingPointError as e:
      log(f'{label}: diverged: {e}')
      return dict(workdir=workdir, diverged=str(e))
  with open(path) as f:
    results = json.load(f)
  log(f"{label}: accuracy {results['test']['accuracy']:.4f} ({results['wall_time_s']:.0f} s)")
  return dict(workdir=workdir, wall_time_s=results['wall_time_s'],
              num_train_steps=results['num_train_steps'], test=results['test'])


def _folder(name: str) -> str:
  return name.replace(', ', '_').replace(' ', '_')


def run_protocol(spec: dict, out: str, make_run_config, log=print, variants=None,
                 seeds=None, train_missing: bool = True) -> dict:
  """Search, pick, test (see the module docstring). `spec`: the preset ('variants', 'seeds',
  'search_seed', 'validation' and 'test': the overrides of the two draws, 'learning_rates',
  'claims': default CLAIMS).
  `make_run_config(draw_overrides, ucam, seed)` -> the run's ConfigDict. Returns {'search':
  records, 'picked': {variant: setting name}, 'test': records, 'claims': `claim_rows`}.
  train_missing=False: only the runs already done (a variant picks once its search is done)."""
  known = spec['variants']
  variants = variants or list(known)
  search, picked, settings = [], {}, {}
  for variant in variants:
    best = None
    for name, setting in search_grid(known[variant], spec.get('learning_rates',
                                                               LEARNING_RATES)):
      config = apply_setting(make_run_config(spec['validation'], known[variant],
                                             spec['search_seed']), setting)
      record = _run(config, os.path.join(out, 'search', _folder(variant), name), log,
                    f'search / {variant} / {name}', train_missing)
      record.update(variant=variant, setting=name)
      if record.get('missing'):
        best = None
        break
      search.append(record)
      if 'test' in record and (best is None or record['test']['accuracy'] > best[0]):
        best = (record['test']['accuracy'], name, setting)
    if best is not None:
      picked[variant], settings[variant] = best[1], best[2]
      log(f'{variant}: picked {best[1]} (validation accuracy {best[0]:.4f})')
  test = []
  for seed in seeds or spec['seeds']:
    for variant in variants:
      if variant not in settings:
        continue
      config = apply_setting(make_run_config(spec['test'], known[variant], seed),
                             settings[variant])
      record = _run(config, os.path.join(out, 'test', _folder(variant), f'seed{seed}'), log,
                    f'test / {variant} / seed {seed}', train_missing)
      if record.get('missing'):
        continue
      record.update(variant=variant, seed=seed, setting=picked[variant])
      test.append(record)
  return dict(search=search, picked=picked, test=test,
              claims=claim_rows(test, spec.get('claims', CLAIMS)))


def search_table(search: list[dict], picked: dict) -> str:
  lines = ['| variant | setting | validation accuracy | Spearman, attention used | picked |',
           '|---|---|---:|---:|---|']
  for r in search:
    acc = f"{r['test']['accuracy']:.4f}" if 'test' in r else 'diverged'
    rho = _attention_used(r['test']) if 'test' in r else None
    lines.append(f"| {r['variant']} | {r['setting']} | {acc} | "
                 f"{'n/a' if rho is None else f'{rho:.4f}'} | "
                 f"{'yes' if picked.get(r['variant']) == r['setting'] else ''} |")
  return '\n'.join(lines)


def seeds_table(test: list[dict]) -> str:
  """Per variant: mean ± sd over its test seeds of `METRICS`."""
  columns = list(METRICS)
  lines = ['| variant | setting | seeds | ' + ' | '.join(columns) + ' | s a run |',
           '|---|---|---:|' + '---:|' * (len(columns) + 1)]
  for variant in dict.fromkeys(r['variant'] for r in test):
    runs = [r for r in test if r['variant'] == variant and 'test' in r]
    cells = []
    for column in columns:
      values = []
      for r in runs:
        try:
          values.append(METRICS[column](r['test']))
        except (KeyError, TypeError):
          pass
      values = [float(v) for v in values if v is not None and math.isfinite(v)]
      cells.append('n/a' if not values else f'{statistics.mean(values):.4f}' + (
          f' ± {statistics.stdev(values):.4f}' if len(values) > 1 else ''))
    seconds = statistics.median(r['wall_time_s'] for r in runs) if runs else float('nan')
    setting = next((r['setting'] for r in test if r['variant'] == variant), '')
    lines.append(f'| {variant} | {setting} | {len(runs)} | ' + ' | '.join(cells)
                 + f' | {seconds:.0f} |')
  return '\n'.join(lines)


def report(results: dict) -> str:
  """Markdown: the search, the test table and the claims with their verdicts."""
  return ('### Search on the validation draw (selection: validation accuracy)\n\n'
          + search_table(results['search'], results['picked'])
          + '\n\n### The picked settings on the test draw, one run a seed (mean ± sd)\n\n'
          + seeds_table(results["test"])
          + '\n\n### Claims: paired differences from the reference, same training seed\n\n'
          + claims_table(results['claims']) + '\n')
