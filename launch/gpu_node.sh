#!/usr/bin/env bash
# One machine with several GPUs: ONE process drives all of them (the mesh's 'data' axis spans the
# node's GPUs), so no coordinator is involved; XLA/NCCL handle the collectives inside the process.
# GPUS picks a subset (CUDA_VISIBLE_DEVICES syntax); the rest of the command line is a launch
# script or main's flags.
# Usage: [GPUS=0,1,2,3] launch/gpu_node.sh launch/cifar10_uncond.sh [--config.x=y ...]
#        [GPUS=...] launch/gpu_node.sh --config=configs/cifar10.py --workdir=runs/x [...]
source "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || die "usage: launch/gpu_node.sh SCRIPT|--main-flags [...]"
command -v nvidia-smi > /dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
[ -n "${GPUS:-}" ] && export CUDA_VISIBLE_DEVICES="$GPUS"
export JAX_PLATFORMS=cuda
# Overlap collectives with compute (XLA's GPU latency-hiding scheduler).
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
if [[ "$1" == -* ]]; then
  exec $PYTHON -m uni_instruct_jax.main --num_processes=1 "$@"
fi
MAIN="$PYTHON -m uni_instruct_jax.main --num_processes=1" exec "$@"
