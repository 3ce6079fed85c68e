#!/usr/bin/env bash
# Usage: TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/$(basename "$0") [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
fid() { [ -n "${INCEPTION:-}" ] && echo "--config.eval.every_ticks=50 --config.eval.detector_path=$INCEPTION --config.eval.ref=$FID_REFS/$1"; true; }
# Speed of one distillation iteration: DDPM++ batch 64 and ADM-64 batch 32, bf16 and fp32.
for spec in "cifar10.py 64" "imagenet64.py 32"; do set -- $spec; for dt in bfloat16 float32; do python3 -m uni_instruct_jax.bench --config=configs/$1 --batch=$2 --compute_dtype=$dt; done; done
