"""The benchmark script (ucam_jax/bench.py): a --quick run end to end, and its FLOP counter."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ucam_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_reports_every_case(tmp_path):
  # One CPU device (not the 8 fake ones of conftest); XLA's cheapest optimisation level: the
  # run is mostly compilation at these toy shapes (about 20 s of CPU).
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'ucam_jax.bench', '--quick', f'--out={tmp_path}',
       f'--markdown={tmp_path / "performance.md"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert set(report) >= {'machine', 'settings', 'roof', 'cases', 'vmap_speedup', 'scaling',
                         'memory'}
  bilinear = {'mcb_train_loss_only_b4', 'mcb_ucam_maps_b4', 'mcb_pooling_b4', 'mcb_fft_b4',
              'mlb_train_loss_only_b4', 'mlb_ucam_maps_b4'}
  assert set(report['cases']) == {'train_mask_b4', 'train_loss_only_b4', 'predictive_T2_b4',
                                  'predictive_full_T2_b4', 'ucam_maps_b4',
                                  'naive_T2_b4'} | bilinear
  assert {n for n, c in report['cases'].items() if c['group'] == 'bilinear'} == bilinear
  assert report['cases']['mcb_pooling_b4']['sketch_dim'] == 64 and report['mcb_fft_share'] > 0
  assert report['cases']['predictive_full_T2_b4']['mc_scope'] == 'full'
  assert report['cases']['train_mask_b4']['donated'] and report['full_scope_cost'] > 0
  keys = ('examples_per_s', 'seconds', 'gflop', 'gflop_per_s', 'matmul_gflop',
          'roof_gflop_per_s', 'fraction_of_roof', 'matmul_fraction_of_roof')
  for name, case in report['cases'].items():
    for key in keys:
      no_matmuls = key.startswith('matmul') and name.startswith(('mcb_pooling', 'mcb_fft'))
      assert case[key] > 0 or no_matmuls, (name, key)
    assert len(case['times']) == 5 and len(case['roof_samples']) == 6
  assert report['roof']['gflop_per_s'] > 0 and report['vmap_speedup'] > 0
  assert [(r['samples'], r['batch']) for r in report['scaling']] == [(2, 2), (2, 4)]
  assert all(r['examples_per_s'] > 0 for r in report['scaling'])
  assert report['memory']['peak_bytes'] > 0 and report['memory']['how']
  for name in ('bench.json', 'bench_table.md', 'bench.png'):
    assert os.path.getsize(tmp_path / name) > 0
  # The bilinear group's figures in their own block, the others' in the first.
  text = (tmp_path / 'performance.md').read_text()
  base, bilinear = text.split(bench.markers('bilinear')[0])
  assert 'training step, GCA mask, batch 4' in base and 'MCB:' not in base
  assert 'MCB: its FFTs alone' in bilinear and 'MLB: U-CAM maps' in bilinear
  assert "FFTs' time over" in bilinear and 'GCA mask' not in bilinear
  assert 'a sweep cell' in base and 'a sweep cell' not in bilinear


def test_markdown_replaces_only_the_generated_block(tmp_path):
  path = tmp_path / 'performance.md'
  path.write_text('# Prose before\n')
  bench.write_markdown(str(path), 'first\n')
  text = path.read_text()
  assert text.startswith('# Prose before\n') and 'first' in text
  path.write_text(text + 'Prose after.\n')
  bench.write_markdown(str(path), 'second\n')
  text = path.read_text()
  assert 'first' not in text and 'second' in text and text.endswith('Prose after.\n')
  assert text.count(bench.MARK_BEGIN) == 1
  # Another block (the bilinear group's) is written beside it and leaves it as it is.
  bench.write_markdown(str(path), 'bilinear figures\n', 'bilinear')
  bench.write_markdown(str(path), 'bilinear again\n', 'bilinear')
  text = path.read_text()
  assert 'second' in text and 'bilinear again' in text and 'bilinear figures' not in text
  assert text.count(bench.markers('bilinear')[0]) == 1 and text.endswith('bench:end bilinear -->\n')


def test_a_blocks_report_holds_its_groups_cases_and_figures():
  def case(group, seconds):
    return dict(group=group, seconds=seconds, roof_gflop_per_s=1.0)
  report = {'settings': {}, 'cases': {'predictive_T2_b4': case('predictive', 1.0),
                                      'predictive_full_T2_b4': case('predictive', 2.0),
                                      'mcb_pooling_b4': case('bilinear', 1.0),
                                      'mcb_fft_b4': case('bilinear', 0.25)},
            'scaling': [], 'memory': {}}
  report.update(bench.speedups(report['cases'], 2, 4))
  bilinear = bench.block_report(report, bench.BLOCKS['bilinear'], 2, 4)
  assert set(bilinear['cases']) == {'mcb_pooling_b4', 'mcb_fft_b4'}
  assert bilinear['mcb_fft_share'] == 0.25 and 'full_scope_cost' not in bilinear
  assert 'scaling' not in bilinear
  base = bench.block_report(report, bench.BLOCKS[''], 2, 4)
  assert set(base['cases']) == {'predictive_T2_b4', 'predictive_full_T2_b4'}
  assert base['full_scope_cost'] == 2.0 and 'mcb_fft_share' not in base and 'scaling' in base


def test_matmul_flops_counts_the_dots_of_a_compiled_program():
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((32, 4))
  x = jnp.ones((3, 5, 6))
  compiled = jax.jit(lambda a, b, c, x: (jnp.tanh(a @ b) @ c,
                                         jnp.einsum('bij,bkj->bik', x, x))).lower(
                                             a, b, c, x).compile()
  want = 2 * 8 * 16 * 32 + 2 * 8 * 32 * 4 + 3 * 2 * 5 * 5 * 6
  assert bench.matmul_flops(compiled.as_text()) == want
  flops = bench.program_flops(compiled)
  assert flops['matmul'] == want and flops['xla'] >= want


def test_measure_reports_medians_and_pairs_each_run_with_the_roof():
  roof = bench.Roof(64)
  fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  result = bench.measure(fn, (x,), 64, {'xla': 2.0 * 64 ** 3, 'matmul': 2.0 * 64 ** 3}, roof,
                         reps=5, batch=64)
  assert result['batch'] == 64 and len(result['times']) == 5
  assert result['seconds'] == np.median(result['times'])
  assert result['examples_per_s'] == 64 / result['seconds']
  assert result['fraction_of_roof'] == result['matmul_fraction_of_roof'] > 0
