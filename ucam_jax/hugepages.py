"""Transparent huge pages for the buffers XLA:CPU allocates, which glibc must know at start-up.

XLA:CPU allocates each run's temporary buffers with malloc, and glibc serves large blocks with
fresh mappings: every SAN training step on easy-VQA touched about 17,000 new 4 KB pages, and the
page faults were a third of the step's CPU time on 2 cores (sys 34 of 103 ms). glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask the kernel for transparent huge pages (madvise): 520
faults a step, and the step went from 58 to 46 ms. glibc reads tunables only when a process
starts, so the commands re-execute themselves once with it set (`reexec_with_huge_pages`).

Whether it pays depends on the workload, so each command has its own default (measured at HEAD,
docs/performance.md): on for `ucam_jax.main` and `ucam_jax.ablation` (the default job, SAN on
easy-VQA: 1.4x the training questions a second, a third of the kernel time), off for
`ucam_jax.bench` (the official-scale model: training at batch 220 up to 1.4x slower with it;
batch 32 and the maps 0.85-1.04x the time, MC dropout 1.01-1.04x).
Why: on this machine (a Firecracker VM) the balloon device reports free 2 MB blocks to the host
(virtio free page reporting, order 9), which takes them back; a huge page that faults on such a
block is faulted in and zeroed by the host again. Measured with an mmap-touch-unmap loop: 0.04
s of kernel time per GB when the freed block is reused at once, 1.5-1.7 s per GB once it was
reported (2 s or more later), 0.35 s per GB for 4 KB pages either way. A short step (SAN: 46 ms)
reuses its blocks before they are reported; a step of seconds (batch 220 at official scale)
does not.

Where it cannot act it costs nothing: older glibc ignores an unknown tunable, a kernel with
transparent huge pages off ignores the advice, and other systems are left alone.
UCAM_HUGE_PAGES=1 / 0 turns it on / off whatever the command's default.
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
