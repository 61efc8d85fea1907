"""The built wheel, installed in a fresh venv outside the repository, runs a shipped config by name.

What it proves: the wheel holds the package and the configs (grounded_shapes imports san, which
failed outside the checkout with `No module named 'configs'`), declares its dependencies, and
trains and checkpoints from another directory. What it does not: that pip resolves those
dependencies from the index (minutes and a network). The fresh venv sees this interpreter's
packages through a path entry, not its .pth files, so an editable install of the checkout stays
invisible and `ucam_jax` comes from the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, f'{args} failed:\n{result.stdout}\n{result.stderr}'
  return result


def test_the_wheel_runs_a_shipped_config_by_name(tmp_path):
  # Built from a copy of what it ships, so the checkout gets no build/ or egg-info.
  source = tmp_path / 'source'
  ignore = shutil.ignore_patterns('__pycache__')
  for name in ('ucam_jax', 'configs'):
    shutil.copytree(REPO / name, source / name, ignore=ignore)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(REPO / name, source)
  run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
      '-w', str(tmp_path / 'dist'), str(source))
  wheel, = (tmp_path / 'dist').glob('ucam_jax-*.whl')

  venv = tmp_path / 'venv'
  run(sys.executable, '-m', 'venv', '--without-pip', str(venv))
  python = str(venv / 'bin' / 'python')
  site = run(python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout
  Path(site.strip(), 'dependencies.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
  run(sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', str(wheel))

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  where = run(python, '-c', 'import configs, ucam_jax, importlib.metadata as m; '
              'print(configs.__file__, ucam_jax.__file__, *m.requires("ucam_jax"))',
              cwd=elsewhere, env=env).stdout.split()
  assert all(path.startswith(str(venv)) for path in where[:2]), where
  assert {'jax>=0.10.2', 'flax>=0.12.8', 'easy-vqa==1.0'} <= set(where[2:])

  result = run(python, '-m', 'ucam_jax.main', '--config=grounded_shapes',
               f'--workdir={tmp_path / "run"}', f'--config.data_dir={tmp_path / "tfds"}',
               '--config.dataset_kwargs.num_train_images=16',
               '--config.dataset_kwargs.num_test_images=8', '--config.batch_size=8',
               '--config.model.stem_features=(8, 16)', '--config.model.hidden_dim=16',
               '--config.model.classifier_dim=16', '--config.num_train_steps=4',
               '--config.stop_at_step=2', cwd=elsewhere, env=env)
  assert 'Stopped at step 2 of 4' in result.stdout
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()
