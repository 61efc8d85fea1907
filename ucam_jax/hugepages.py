"""Transparent huge pages for the buffers XLA:CPU allocates, which glibc must know at start-up.

XLA:CPU allocates each run's temporary buffers with malloc, and glibc serves large blocks with
fresh mappings: every SAN training step on easy-VQA touched about 17,000 new 4 KB pages, and the
page faults were a third of the step's CPU time on 2 cores (sys 34 of 103 ms). glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask the kernel for transparent huge pages (madvise): 520
faults a step, and the step went from 58 to 46 ms. glibc reads tunables only when a process
starts, so the commands re-execute themselves once with it set (`reexec_with_huge_pages`).

Where it cannot act it costs nothing: older glibc ignores an unknown tunable, a kernel with
transparent huge pages off ignores the advice, and other systems are left alone.
UCAM_HUGE_PAGES=0 turns it off.
"""

import os
import sys

TUNABLE = 'glibc.malloc.hugetlb'


def active() -> bool:
  """Whether this process started with glibc's huge-page tunable set to 1."""
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '').split(':')


def reexec_with_huge_pages(default: bool = True) -> None:
  """Re-executes this command (same interpreter, options and arguments, same process id) with
  `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES when huge pages are wanted: UCAM_HUGE_PAGES=1
  wants them, UCAM_HUGE_PAGES=0 does not, unset leaves it to `default` (the command's own
  choice, from measurements: docs/performance.md). Nothing happens if the tunable is set
  already or this is not Linux. Call it first in a command's `__main__` block."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  wanted = {'1': True, '0': False}.get(os.environ.get('UCAM_HUGE_PAGES', ''), default)
  if not sys.platform.startswith('linux') or TUNABLE in tunables or not wanted:
    return
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, f'{TUNABLE}=1']))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
