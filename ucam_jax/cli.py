"""What the commands (`main`, `extract_features`) share: quiet backend probing and faults as one
message without a traceback."""

import logging
import sys

from ucam_jax.errors import RunError


class _QuietBackendProbes(logging.Filter):
  """Drops JAX's INFO line for each accelerator backend it probes and does not find (e.g.
  "Unable to initialize backend 'tpu': ... libtpu.so" on every CPU or GPU machine). JAX logs it
  only for backends it may skip (`fail_quietly`, at INFO); a backend that JAX_PLATFORMS names
  and that fails still raises, with its message."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO
                and str(record.msg).startswith('Unable to initialize backend'))


_FILTER = _QuietBackendProbes()


def quiet_backend_probes() -> None:
  """Installs the filter on JAX's backend logger (idempotent). The platform choice is JAX's as
  before: nothing is forced, so GPU and TPU machines pick their accelerator as usual."""
  logger = logging.getLogger('jax._src.xla_bridge')
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)


def run(fn, *args, **kwargs):
  """fn(*args, **kwargs), with a `RunError` (a missing file, a bad config, a damaged checkpoint)
  printed as its message alone, exit status 1."""
  try:
    return fn(*args, **kwargs)
  except RunError as e:
    sys.exit(str(e))
