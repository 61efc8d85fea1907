"""ucam_jax.hugepages: a command re-executes itself once with the huge-page tunable."""

import os
import subprocess
import sys

SCRIPT = ('import os; from ucam_jax import hugepages; print("started", flush=True); '
          'hugepages.reexec_with_huge_pages(default={}); print(os.environ.get("GLIBC_TUNABLES"))')


def _run(default=True, **env):
  clean = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'UCAM_HUGE_PAGES')}
  return subprocess.run([sys.executable, '-c', SCRIPT.format(default)], env={**clean, **env},
                        capture_output=True, text=True, check=True).stdout.split('\n')


def test_reexecutes_once_keeping_other_tunables():
  # 'started' twice: the first process, then the re-executed one, which goes on.
  assert _run() == ['started', 'started', 'glibc.malloc.hugetlb=1', '']
  assert _run(GLIBC_TUNABLES='glibc.malloc.arena_max=2') == [
      'started', 'started', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', '']


def test_set_already_or_turned_off_runs_on():
  assert _run(GLIBC_TUNABLES='glibc.malloc.hugetlb=0') == ['started', 'glibc.malloc.hugetlb=0', '']
  assert _run(UCAM_HUGE_PAGES='0') == ['started', 'None', '']


def test_the_command_default_and_the_environment_override():
  assert _run(default=False) == ['started', 'None', '']
  assert _run(default=False, UCAM_HUGE_PAGES='1') == [
      'started', 'started', 'glibc.malloc.hugetlb=1', '']
  assert _run(default=True, UCAM_HUGE_PAGES='0') == ['started', 'None', '']
