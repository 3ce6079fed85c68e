# Sourced by every launch script: strict mode, repo root as cwd, paths from the environment, and
# `experiment`, the one command every experiment script runs.
#
#   PYTHON   interpreter (default python3)
#   MAIN     the training command (default "$PYTHON -m uni_instruct_jax.main"); e.g.
#            MAIN="launch/local_multiprocess.sh 2" runs any experiment script as 2 processes
#   RUNS     where work directories go (default runs; a gs:// prefix on Cloud TPU)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
MAIN="${MAIN:-$PYTHON -m uni_instruct_jax.main}"
RUNS="${RUNS:-runs}"

die() { echo "error: $*" >&2; exit 2; }

# need VAR...: every named environment variable is set and non-empty.
need() { local v; for v; do [ -n "${!v:-}" ] || die "set $v (see launch/README.md)"; done; }

# fid REF.npz: the flags enabling FID during training when INCEPTION is set.
fid() {
  [ -n "${INCEPTION:-}" ] || return 0
  need FID_REFS
  echo "--config.eval.every_ticks=50 --config.eval.detector_path=$INCEPTION --config.eval.ref=$FID_REFS/$1"
}

# experiment NAME CONFIG TEACHER_PKL DATASET_ZIP FID_REF [flags...]: trains (or resumes) $RUNS/NAME.
experiment() {
  need TEACHERS DATASETS
  local name=$1 config=$2 teacher=$3 dataset=$4 ref=$5
  shift 5
  # shellcheck disable=SC2046,SC2086  # MAIN and fid's flags are word lists
  exec $MAIN --config="configs/$config" --workdir="$RUNS/$name" \
    --config.teacher.path="$TEACHERS/$teacher" --config.data.path="$DATASETS/$dataset" \
    $(fid "$ref") "$@"
}
