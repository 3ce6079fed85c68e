#!/usr/bin/env bash
# A special case on CIFAR-10 uncond: METHOD=sid|sida|diff_instruct|dmd|dmd2|f_distill|sim (default sid; sid2a also
# needs --config.generator.init=sid --config.generator.sid_path=...). No paper number is claimed for these runs.
# Usage: [METHOD=sid] TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/cifar10_special_case.sh [--config.x=y ...]
source "$(dirname "$0")/common.sh"
METHOD="${METHOD:-sid}"
experiment "cifar10_$METHOD" cifar10.py edm-cifar10-32x32-uncond-vp.pkl cifar10-32x32.zip \
  cifar10-32x32.npz --config.loss.method="$METHOD" "$@"
