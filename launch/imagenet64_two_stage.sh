#!/usr/bin/env bash
# Usage: TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/$(basename "$0") [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fid() { [ -n "${INCEPTION:-}" ] && echo "--config.eval.every_ticks=50 --config.eval.detector_path=$INCEPTION --config.eval.ref=$FID_REFS/$1"; true; }
# ImageNet-64, the paper's best run: reverse KL, then forward KL from SWITCH_KIMG (default 20000).
exec python3 -m uni_instruct_jax.main --config=configs/imagenet64.py --workdir="${RUNS:-runs}/imagenet64_rkl_fkl" --config.teacher.path="$TEACHERS/edm-imagenet-64x64-cond-adm.pkl" --config.data.path="$DATASETS/imagenet-64x64.zip" --config.loss.schedule="0:reverse_kl,${SWITCH_KIMG:-20000}:forward_kl" $(fid imagenet-64x64.npz) "$@"
