"""Faults that the user or operator acts on, reported as one line without a traceback."""


class RunError(Exception):
  """The run cannot go on, for a reason its message names with what to do. `main` prints the
  message alone and exits with status 1; what the workdir held before is intact."""


class ConfigError(RunError, ValueError):
  """A config value outside its range; raised before anything is written."""


class MissingFiles(RunError, FileNotFoundError):
  """Input files are missing: the message names each, where it comes from and the doc to read.
  The same one message in training, evaluation and feature extraction (`cli.run`)."""
