#!/usr/bin/env bash
# Speed of one distillation iteration: DDPM++ batch 64 and ADM-64 batch 32, bf16 and fp32.
# Usage: launch/bench.sh [bench flags...]
source "$(dirname "$0")/common.sh"
for spec in "cifar10.py 64" "imagenet64.py 32"; do
  read -r config batch <<< "$spec"
  for dtype in bfloat16 float32; do
    $PYTHON -m uni_instruct_jax.bench --config="configs/$config" --batch="$batch" \
      --compute_dtype="$dtype" "$@"
  done
done
