#!/usr/bin/env bash
# Usage: TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/$(basename "$0") [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fid() { [ -n "${INCEPTION:-}" ] && echo "--config.eval.every_ticks=50 --config.eval.detector_path=$INCEPTION --config.eval.ref=$FID_REFS/$1"; true; }
# ImageNet-64 conditional (ADM teacher), forward KL, global batch 8192, bf16 compute (paper: FID 1.34).
exec python3 -m uni_instruct_jax.main --config=configs/imagenet64.py --workdir="${RUNS:-runs}/imagenet64" --config.teacher.path="$TEACHERS/edm-imagenet-64x64-cond-adm.pkl" --config.data.path="$DATASETS/imagenet-64x64.zip" $(fid imagenet-64x64.npz) "$@"
