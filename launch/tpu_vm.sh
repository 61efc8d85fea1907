#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), install ucam_jax on every
# worker, and launch training on all workers at once.
#
# Every gcloud command goes through `run`, so --dry-run prints exactly what
# would be executed. See launch/README.md for a full pod example.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# Paths on each TPU worker, relative to the remote home directory.
readonly REMOTE_REPO='ucam_jax'
readonly REMOTE_VENV='ucam_venv'
readonly REMOTE_LOG='ucam_jax.log'
# TPU VM images ship Python 3.10; the pinned jax needs >= 3.11, so the venv is
# created by uv with a managed interpreter.
readonly PYTHON_VERSION='3.12'

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND [flags] [-- MAIN_ARGS...]

Subcommands:
  create   create the TPU VM (or queued resource with --queued) and wait for it
  setup    copy the repo to every worker, create a venv, install requirements
           and jax[tpu] (version pinned in requirements.txt)
  run      start `python -m ucam_jax.main` on every worker with nohup;
           each worker logs to ~/ucam_jax.log
  logs     follow worker 0's log
  delete   delete the TPU VM (the queued resource with --queued)
  all      create, setup, run

Flags (--flag VALUE or --flag=VALUE):
  --name NAME              TPU VM name (all subcommands)                [required]
  --zone ZONE              e.g. us-central2-b (all subcommands)          [required]
  --accelerator-type TYPE  e.g. v4-8, v4-32 (create)                     [required]
  --version VERSION        TPU software version, e.g. tpu-ubuntu2204-base
                           (create)                                      [required]
  --project PROJECT        GCP project (default: gcloud config)
  --queued                 use a queued resource (pass again to delete)
  --spot                   request Spot TPUs
  --repo PATH_OR_URL       local path to copy, or git URL to clone (setup)
                           (default: this checkout)
  --config PATH            config file, relative to the repo (run)
                           (default: configs/san.py)
  --workdir DIR            checkpoints and metrics (run)                 [required]
                           multi-host runs need one every worker shares:
                           an NFS (Filestore) mount or gs://BUCKET/DIR
  --dry-run                print the commands instead of running them
  -h, --help               show this help

Arguments after `--` are passed to ucam_jax.main, e.g. -- --config.batch_size=512

Example:
  launch/tpu_vm.sh all --name=ucam --zone=us-central2-b --accelerator-type=v4-32 \
    --version=tpu-ubuntu2204-base --queued --workdir=/mnt/ucam/san \
    -- --config.num_epochs=50
EOF
}

require() {
  local flag=$1 value=$2
  [[ -n $value ]] || die "missing required flag $flag for '$SUBCOMMAND'"
}

SUBCOMMAND='' NAME='' ZONE='' ACCELERATOR_TYPE='' VERSION='' PROJECT='' REPO="$REPO_ROOT"
CONFIG='configs/san.py' WORKDIR='' QUEUED=0 SPOT=0 DRY_RUN=0
MAIN_ARGS=()

parse_args() {
  while (( $# )); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --flag=value -> --flag value
    esac
    case $1 in
      -h | --help) usage; exit 0 ;;
      --name) need_value "$@"; NAME=$2; shift ;;
      --zone) need_value "$@"; ZONE=$2; shift ;;
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift ;;
      --version) need_value "$@"; VERSION=$2; shift ;;
      --project) need_value "$@"; PROJECT=$2; shift ;;
      --repo) need_value "$@"; REPO=$2; shift ;;
      --config) need_value "$@"; CONFIG=$2; shift ;;
      --workdir) need_value "$@"; WORKDIR=$2; shift ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; MAIN_ARGS=("$@"); break ;;
      -*) die "unknown flag $1" ;;
      *)
        [[ -z $SUBCOMMAND ]] || die "unexpected argument $1 (subcommand is already '$SUBCOMMAND')"
        SUBCOMMAND=$1 ;;
    esac
    shift
  done
}

# v2/v3/v4/v5p count TensorCores, v5e/v6e count chips; either way a host has at
# most 8, so e.g. v4-32 is 4 hosts and v5litepod-8 is one.
is_multi_host() {
  [[ $ACCELERATOR_TYPE =~ -([0-9]+)$ ]] && (( BASH_REMATCH[1] > 8 ))
}

check_flags() {
  require --name "$NAME"
  require --zone "$ZONE"
  case $SUBCOMMAND in
    create | all)
      require --accelerator-type "$ACCELERATOR_TYPE"
      require --version "$VERSION" ;;
  esac
  case $SUBCOMMAND in
    run | all)
      require --workdir "$WORKDIR"
      if is_multi_host && [[ $WORKDIR != /* && $WORKDIR != gs://* ]]; then
        echo "tpu_vm.sh: warning: $ACCELERATOR_TYPE is multi-host;" \
          "--workdir=$WORKDIR must be one all workers share (an NFS mount or gs://BUCKET/DIR)" >&2
      fi ;;
  esac
}

# Flags every gcloud command takes.
gcloud_flags() {
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

cmd_create() {
  local flags=("${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE")
  if (( QUEUED )); then
    flags+=(--runtime-version="$VERSION")
    if (( SPOT )); then flags+=(--spot); fi
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${flags[@]}"
    wait_until_active
  else
    flags+=(--version="$VERSION")
    if (( SPOT )); then flags+=(--spot); fi
    run gcloud compute tpus tpu-vm create "$NAME" "${flags[@]}"
  fi
}

# A queued resource is only usable once ACTIVE, which can take minutes to hours.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}"
    --format='value(state.state)')
  if (( DRY_RUN )); then
    run "${describe[@]}"
    return
  fi
  local state
  while true; do
    state=$("${describe[@]}")
    echo "queued resource $NAME: $state" >&2
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) echo "tpu_vm.sh: queued resource $NAME is $state" >&2; exit 1 ;;
    esac
    sleep 60
  done
}

pinned_jax_version() {
  local version
  version=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n $version ]] || { echo "tpu_vm.sh: no 'jax==' pin in $REPO_ROOT/requirements.txt" >&2; exit 1; }
  echo "$version"
}

cmd_setup() {
  local jax_version
  jax_version=$(pinned_jax_version)
  if [[ -d $REPO ]]; then
    ssh_all "rm -rf ~/$REMOTE_REPO"
    run gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME:$REMOTE_REPO" "${GCLOUD_FLAGS[@]}" --worker=all
  elif [[ $REPO =~ ^(https?|ssh|git):// || $REPO =~ ^[^/]+@[^:]+: ]]; then
    ssh_all "rm -rf ~/$REMOTE_REPO && git clone --depth=1 $(quoted "$REPO") ~/$REMOTE_REPO"
  else
    die "--repo $REPO is neither a directory nor a git URL"
  fi
  # PIP_BREAK_SYSTEM_PACKAGES only lets the user-level uv install through on
  # images whose system Python is marked externally managed.
  ssh_all "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --upgrade uv \
&& ~/.local/bin/uv venv --seed --allow-existing --python $PYTHON_VERSION ~/$REMOTE_VENV \
&& cd ~/$REMOTE_REPO \
&& ~/$REMOTE_VENV/bin/pip install -r requirements.txt -e . \
&& ~/$REMOTE_VENV/bin/pip install 'jax[tpu]==$jax_version'"
}

cmd_run() {
  local main_args=(--config="$CONFIG" --workdir="$WORKDIR")
  if (( ${#MAIN_ARGS[@]} )); then main_args+=("${MAIN_ARGS[@]}"); fi  # bash 3.2 (macOS) safe
  # Redirecting all three streams lets ssh return while training keeps going.
  # jax.distributed.initialize() finds the other workers by itself on Cloud TPU.
  ssh_all "cd ~/$REMOTE_REPO && nohup ~/$REMOTE_VENV/bin/python -m ucam_jax.main \
$(quoted "${main_args[@]}") > ~/$REMOTE_LOG 2>&1 < /dev/null &"
}

cmd_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
    --command="tail -n 200 -F ~/$REMOTE_LOG"
}

cmd_delete() {
  if (( QUEUED )); then
    # --force deletes the TPU VM with its queued resource.
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

main() {
  parse_args "$@"
  case $SUBCOMMAND in
    create | setup | run | logs | delete | all) ;;
    '') die "missing subcommand" ;;
    *) die "unknown subcommand '$SUBCOMMAND'" ;;
  esac
  check_flags
  gcloud_flags
  case $SUBCOMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    delete) cmd_delete ;;
    all) cmd_create; cmd_setup; cmd_run ;;
  esac
}

main "$@"
