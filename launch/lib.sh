# Shell helpers shared by the launch scripts; sourced, not run. The sourcing script defines
# `usage` and sets DRY_RUN.

# Prints the usage and an error naming the problem, then exits 2.
die() {
  usage >&2
  echo >&2
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Joins arguments into one shell-quoted string.
quoted() {
  local out
  printf -v out ' %q' "$@"
  echo "${out# }"
}

# Runs a command, or with --dry-run prints it (shell-quoted, copyable).
run() {
  if (( DRY_RUN )); then
    echo "+ $(quoted "$@")"
  else
    "$@"
  fi
}

need_value() {
  [[ $# -ge 2 && $2 != -* ]] || die "flag $1 needs a value"
}
