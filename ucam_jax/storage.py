"""The workdir's files, on a local (or NFS) disk or in a Cloud Storage bucket (`gs://...`).

Every read and write of the workdir goes through etils.epath, the path library that Orbax uses:
the same calls reach a directory and, through gcsfs, a bucket. Orbax writes the checkpoints'
arrays itself (tensorstore).
"""

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from etils import epath

from ucam_jax.errors import RunError

LOCK_FILE = 'run.lock'


class WorkdirLocked(RunError):
  """Another live run holds the workdir."""


class DamagedFile(RunError):
  """A workdir file that an earlier run wrote and that no longer parses."""


def is_local(path: epath.PathLike) -> bool:
  """False for a URL such as gs://bucket/dir."""
  return '://' not in os.fspath(path)


def absolute(path: epath.PathLike) -> epath.Path:
  """A local path made absolute, a URL as it is (os.path.abspath would make gs://b/x the local
  directory ./gs:/b/x)."""
  return epath.Path(os.path.abspath(path) if is_local(path) else path)


def write_text(path: epath.PathLike, text: str) -> None:
  """Writes the file whole (see `write_bytes`), UTF-8 (epath's gs:// text mode uses the
  locale)."""
  write_bytes(path, text.encode())


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Writes the file whole, so that no reader (another process, a run after a crash) sees half
  of it: locally via a rename; a Cloud Storage upload is whole by itself (a rename there would
  be a copy and a delete)."""
  path = epath.Path(path)
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(data)
  tmp.replace(path)


def savefig(fig, path: epath.PathLike, **kwargs) -> None:
  """`fig.savefig` to any path that epath opens; the format is the file's suffix."""
  path = epath.Path(path)
  with path.open('wb') as f:
    fig.savefig(f, format=path.suffix[1:], **kwargs)


def read_json(path: epath.PathLike):
  """The JSON file at `path`, or DamagedFile naming it (a bare JSONDecodeError names no file)."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedFile(f'{path} is damaged ({e}); it was written by an earlier run: restore it '
                      'from a copy, delete it to have it rebuilt, or use a new --workdir.') from e


@contextlib.contextmanager
def workdir_lock(workdir: epath.PathLike) -> Iterator[None]:
  """Holds an advisory lock (flock) on workdir/run.lock while the block runs, or raises
  WorkdirLocked naming the process that holds it. The kernel drops the lock when its process
  dies, however it dies, so a killed run's lock never blocks the next one. On NFS, Linux
  emulates flock with fcntl byte-range locks, which lockd shares between hosts. A Cloud Storage
  bucket has no locks: gs:// workdirs are not locked (one job per workdir is up to you)."""
  if not is_local(workdir):
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise WorkdirLocked(f'The workdir {workdir} is in use by another run (process {holder}, '
                          f'which holds {path}): wait for it to end, or pass another '
                          '--workdir.') from None
    f.truncate(0)
    f.write(f'{os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    yield  # Closing the file releases the lock.
