#!/usr/bin/env bash
# Usage: TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/$(basename "$0") [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fid() { [ -n "${INCEPTION:-}" ] && echo "--config.eval.every_ticks=50 --config.eval.detector_path=$INCEPTION --config.eval.ref=$FID_REFS/$1"; true; }
# CIFAR-10 conditional, forward KL, the released recipe (paper: FID 1.43 from scratch, 1.38 with longer training).
exec python3 -m uni_instruct_jax.main --config=configs/cifar10_cond.py --workdir="${RUNS:-runs}/cifar10_cond" --config.teacher.path="$TEACHERS/edm-cifar10-32x32-cond-vp.pkl" --config.data.path="$DATASETS/cifar10-32x32.zip" $(fid cifar10-32x32.npz) "$@"
