"""A gs:// workdir, offline: Cloud Storage is replaced by an in-memory fsspec filesystem that
etils.epath reaches exactly as it would reach gcsfs. Orbax's arrays go through tensorstore, not
fsspec, so the checkpoints stay local here; what is checked is that their path stays a URL."""

import json
import os

import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.registry import _registry
from fsspec.spec import AbstractBufferedFile

from tests.conftest import tiny_config
from tests.test_train import read_events
from ucam_jax import checkpoints, metric_writer, storage, train

WORKDIR = 'gs://bucket/runs/san'


class Upload(AbstractBufferedFile):
  """A file opened for writing as gcsfs opens one: no seek, the object whole at close."""

  def _initiate_upload(self):
    self.parts = []

  def _upload_chunk(self, final=False):
    self.parts.append(self.buffer.getvalue())
    if final:
      self.fs.store[self.path] = MemoryFile(self.fs, self.path, b''.join(self.parts))
    return True


class FakeGCS(MemoryFileSystem):
  """A bucket in memory, under the names 'gs' and 'gcs' that epath asks fsspec for."""
  protocol = ('gs', 'gcs')
  store = {}  # Its own, not MemoryFileSystem's.
  pseudo_dirs = ['']

  def _open(self, path, mode='rb', **kwargs):
    if 'w' in mode:
      return Upload(self, self._strip_protocol(path), mode=mode)
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """The fake bucket's files by URL; the test runs in an empty local directory, so that a
  gs:// path mistaken for a local one shows up as ./gs:."""
  monkeypatch.chdir(tmp_path)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = ['']
  for name in FakeGCS.protocol:
    monkeypatch.setitem(_registry, name, FakeGCS)
  backend.fsspec_backend._get_filesystem.cache_clear()  # It caches gcsfs's filesystem.
  assert type(backend.fsspec_backend.fs(WORKDIR)) is FakeGCS
  yield FakeGCS.store
  backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.path.exists('gs:'), 'a gs:// path was written as a local directory'


def files(store) -> dict[str, bytes]:
  """The fake bucket's files under WORKDIR, by their path relative to it."""
  return {path[len(WORKDIR) + 1:]: f.getvalue() for path, f in store.items()
          if path.startswith(WORKDIR + '/')}


def test_write_text_is_whole_and_leaves_no_temporary_file(fake_gcs, tmp_path):
  for directory in (WORKDIR, str(tmp_path / 'local')):
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    path = epath.Path(directory) / 'a.json'
    storage.write_text(path, 'first')
    storage.write_text(path, 'second, café')
    assert path.read_bytes().decode() == 'second, café'  # UTF-8 whatever the locale.
    assert [p.name for p in epath.Path(directory).iterdir()] == ['a.json']


def test_absolute_keeps_urls_and_resolves_local_paths(tmp_path):
  assert str(storage.absolute('gs://b/x')) == 'gs://b/x'
  assert str(storage.absolute('gs://b/x') / 'checkpoints') == 'gs://b/x/checkpoints'
  assert str(storage.absolute('run')) == os.path.join(os.getcwd(), 'run')
  assert storage.is_local(tmp_path) and storage.is_local('run') and not storage.is_local('gs://b')


def test_checkpoints_of_a_gs_workdir_go_to_the_bucket(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  directories = []
  monkeypatch.setattr(ocp, 'CheckpointManager', lambda directory, options, item_handlers:
                      directories.append(os.fspath(directory)))
  checkpoints.manager(WORKDIR)
  checkpoints.manager('run')
  assert directories == [f'{WORKDIR}/checkpoints', str(tmp_path / 'run' / 'checkpoints')]


def test_metric_writer_rewrites_the_bucket_file_and_drops_stale_lines(fake_gcs, tmp_path):
  writer = metric_writer.MetricWriter(WORKDIR)
  for step in (5, 10, 15):
    writer.write(step, {'loss': 1.0 / step})
  resumed = metric_writer.MetricWriter(WORKDIR, resume_step=10)
  resumed.write(12, {'loss': 0.5})
  writer.close()
  resumed.close()
  assert [r['step'] for r in metric_writer.read_metrics(WORKDIR)] == [5, 10, 12]
  path = metric_writer.plot_curves(WORKDIR)
  assert path == f'{WORKDIR}/curves.png'
  assert files(fake_gcs)['curves.png'].startswith(b'\x89PNG')
  written = files(fake_gcs)
  events = sorted(name for name in written if name.startswith('events.out.tfevents.'))
  assert sorted(set(written) - set(events)) == ['curves.png', 'metrics.jsonl']
  # TensorBoard's events, in the bucket: one file per writer; the resumed one hides step 15.
  assert len(events) == 2
  for name in events:
    (tmp_path / name).write_bytes(written[name])
  assert [e.step for e in read_events(tmp_path).Scalars('loss')] == [5, 10, 12]


def test_train_resume_and_report_in_a_gs_workdir(fake_gcs, small_data_dir, tmp_path,
                                                 monkeypatch):
  """Every file of a run but the checkpoints, in the bucket, through a stop and a resume."""
  local_checkpoints = tmp_path / 'local'
  manager = checkpoints.manager
  monkeypatch.setattr(checkpoints, 'manager',
                      lambda workdir, *args, **kwargs: manager(str(local_checkpoints), *args,
                                                               **kwargs))
  config = tiny_config(small_data_dir, num_train_steps=4, log_every_steps=1,
                       checkpoint_every_steps=2, mc_samples=2, eval_batch_size=64,
                       report_questions=1)
  config.ucam.mode = 'none'  # Compiles fastest; the files are the same.
  stopping = config.copy_and_resolve_references()
  stopping.stop_at_step = 2
  assert train.train_and_evaluate(stopping, WORKDIR)['step'] == 2
  assert sorted(name for name in files(fake_gcs) if not name.startswith('events.')) == [
      'config.json', 'data.json', 'metrics.jsonl', 'vocabulary.json']

  results = train.train_and_evaluate(config, WORKDIR)  # Reads config.json, the vocabulary...
  written = files(fake_gcs)
  assert json.loads(written['metrics.json'])['test'] == results['test']
  steps = [json.loads(line)['step'] for line in written['metrics.jsonl'].decode().splitlines()]
  assert steps == [1, 2, 3, 4, 4]  # ... and the stopped run's lines; the last is the test's.
  pngs = [name for name in written if name.startswith('report/question_')]
  assert 1 <= len(pngs) <= 4  # A question in each of the 4 sections, some in several.
  assert all(written[name].startswith(b'\x89PNG') for name in pngs)
  assert len([name for name in written if name.startswith('events.out.tfevents.')]) == 2
  assert b'<!doctype html>' in written['report/index.html']
  assert written['curves.png'].startswith(b'\x89PNG')
  assert not [name for name in written if name.endswith('.tmp') or 'write_test' in name]
  assert sorted(os.listdir(local_checkpoints / 'checkpoints')) == ['2', '4']
