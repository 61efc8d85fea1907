#!/usr/bin/env bash
# Write an sbatch script for a multi-node GPU run of ucam_jax and submit it.
#
# One SLURM task per node; each task drives all of its node's GPUs and
# jax.distributed.initialize() finds the other nodes from SLURM's environment.
# --dry-run prints the batch script and the commands instead of running them.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh [flags] [-- MAIN_ARGS...]

Flags (--flag VALUE or --flag=VALUE):
  --nodes N            number of nodes                                [required]
  --gpus-per-node N    GPUs per node (default: 8)
  --partition NAME     SLURM partition                                [required]
  --time LIMIT         wall-clock limit, e.g. 24:00:00 (default: 24:00:00)
  --account NAME       SLURM account to charge
  --job-name NAME      default: ucam_jax
  --config PATH        config file, relative to the repo (default: configs/san.py)
  --workdir DIR        checkpoints and metrics, on a filesystem (or gs://
                       bucket) every node shares                      [required]
  --venv DIR           venv with `pip install -r requirements.txt -e .` done,
                       on the shared filesystem                       [required]
  --log-dir DIR        where the batch script and slurm-<jobid>.out go
                       (default: --workdir; required if that is not a local path)
  --dry-run            print the batch script and commands, submit nothing
  -h, --help           show this help

Arguments after `--` are passed to ucam_jax.main, e.g. -- --config.batch_size=512

Example (2 nodes x 8 GPUs):
  launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=12:00:00 \
    --venv=/shared/venvs/ucam --workdir=/shared/runs/ucam-san -- --config.num_epochs=50
EOF
}

require() {
  local flag=$1 value=$2
  [[ -n $value ]] || die "missing required flag $flag"
}

NODES='' GPUS_PER_NODE=8 PARTITION='' TIME='24:00:00' ACCOUNT='' JOB_NAME='ucam_jax'
CONFIG='configs/san.py' WORKDIR='' VENV='' LOG_DIR='' DRY_RUN=0
MAIN_ARGS=()

parse_args() {
  while (( $# )); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --flag=value -> --flag value
    esac
    case $1 in
      -h | --help) usage; exit 0 ;;
      --nodes) need_value "$@"; NODES=$2; shift ;;
      --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$2; shift ;;
      --partition) need_value "$@"; PARTITION=$2; shift ;;
      --time) need_value "$@"; TIME=$2; shift ;;
      --account) need_value "$@"; ACCOUNT=$2; shift ;;
      --job-name) need_value "$@"; JOB_NAME=$2; shift ;;
      --config) need_value "$@"; CONFIG=$2; shift ;;
      --workdir) need_value "$@"; WORKDIR=$2; shift ;;
      --venv) need_value "$@"; VENV=$2; shift ;;
      --log-dir) need_value "$@"; LOG_DIR=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; MAIN_ARGS=("$@"); break ;;
      -*) die "unknown flag $1" ;;
      *) die "unexpected argument $1 (arguments for ucam_jax.main go after --)" ;;
    esac
    shift
  done
}

# The job runs from the repo root, so local paths are made absolute first.
absolute() {
  if [[ $1 == /* || $1 == *://* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

check_flags() {
  require --nodes "$NODES"
  require --partition "$PARTITION"
  require --workdir "$WORKDIR"
  require --venv "$VENV"
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
  if [[ -z $LOG_DIR ]]; then
    [[ $WORKDIR != *://* ]] || die "--log-dir is required when --workdir ($WORKDIR) is not a local path"
    LOG_DIR=$WORKDIR
  fi
  [[ $LOG_DIR != *[[:space:]]* ]] || die "--log-dir must not contain spaces (it goes into #SBATCH lines)"
  WORKDIR=$(absolute "$WORKDIR")
  VENV=$(absolute "$VENV")
  LOG_DIR=$(absolute "$LOG_DIR")
}

# --signal=TERM@120: every task gets SIGTERM two minutes before the time limit, so training
# checkpoints at the next step and exits 0; submitting again resumes.
batch_script() {
  local device_ids main_args=(--config="$CONFIG" --workdir="$WORKDIR")
  if (( ${#MAIN_ARGS[@]} )); then main_args+=("${MAIN_ARGS[@]}"); fi  # bash 3.2 (macOS) safe
  device_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  cat <<EOF
#!/bin/bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --partition=$PARTITION
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120
EOF
  if [[ -n $ACCOUNT ]]; then echo "#SBATCH --account=$ACCOUNT"; fi
  cat <<EOF
#SBATCH --output=$LOG_DIR/slurm-%j.out
set -euo pipefail

cd $(quoted "$REPO_ROOT")
export PATH=$(quoted "$VENV/bin"):\$PATH
# On SLURM, jax.distributed.initialize() would give each process only the GPU
# numbered SLURM_LOCALID; with one process per node it must see all of them.
export JAX_LOCAL_DEVICE_IDS=$device_ids
# The one task per node gets all of the node's CPUs (for input pipelines).
export SRUN_CPUS_PER_TASK=\$SLURM_CPUS_ON_NODE
# Headroom for NCCL and cuDNN workspaces; callers can override at submit time.
export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

srun python -m ucam_jax.main $(quoted "${main_args[@]}")
EOF
}

main() {
  parse_args "$@"
  check_flags
  if (( ! DRY_RUN )) && [[ ! -x $VENV/bin/python ]]; then
    echo "gpu_slurm.sh: $VENV/bin/python not found (create the venv first, see launch/README.md)" >&2
    exit 1
  fi
  local script_file
  script_file="$LOG_DIR/$JOB_NAME-$(date +%Y%m%d-%H%M%S).sbatch"
  run mkdir -p "$LOG_DIR"
  if (( DRY_RUN )); then
    echo "# ---- $script_file ----"
    batch_script
    echo "# ---- end ----"
  else
    batch_script > "$script_file"
    echo "wrote $script_file" >&2
  fi
  run sbatch "$script_file"
}

main "$@"
