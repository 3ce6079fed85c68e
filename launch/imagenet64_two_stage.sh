#!/usr/bin/env bash
# ImageNet-64, the paper's best run: reverse KL, then forward KL from SWITCH_KIMG (default 20000; the paper does not
# state the switch point). The paper reports FID 1.02 for it; that is the paper's number, not this project's.
# Usage: [SWITCH_KIMG=20000] TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/imagenet64_two_stage.sh [--config.x=y ...]
source "$(dirname "$0")/common.sh"
experiment imagenet64_rkl_fkl imagenet64.py edm-imagenet-64x64-cond-adm.pkl imagenet-64x64.zip \
  imagenet-64x64.npz --config.loss.schedule="0:reverse_kl,${SWITCH_KIMG:-20000}:forward_kl" "$@"
