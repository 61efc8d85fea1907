"""The workdir's files, on a local (or NFS) disk or in a Cloud Storage bucket (`gs://...`).

Every read and write of the workdir goes through etils.epath, the path library that Orbax uses:
the same calls reach a directory and, through gcsfs, a bucket. Orbax writes the checkpoints'
arrays itself (tensorstore).
"""

import os

from etils import epath


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
