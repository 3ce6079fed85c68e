#!/usr/bin/env bash
# CIFAR-10 unconditional, Jeffreys (JKL): the paper's row with the released code's mechanics (configs/cifar10.py).
# The paper reports FID 1.46; that is the paper's number, not this project's.
# Usage: TEACHERS=... DATASETS=... [RUNS=runs] [INCEPTION=... FID_REFS=...] launch/cifar10_uncond.sh [--config.x=y ...]
source "$(dirname "$0")/common.sh"
experiment cifar10_uncond cifar10.py edm-cifar10-32x32-uncond-vp.pkl cifar10-32x32.zip \
  cifar10-32x32.npz "$@"
