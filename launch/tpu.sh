#!/usr/bin/env bash
# Cloud TPU VMs and pod slices with gcloud. Every worker of a slice is one JAX process; JAX finds
# the slice's coordinator itself, so the same command runs on all of them (--worker=all).
#
# Usage: ZONE=... [PROJECT=...] [DRY_RUN=1] launch/tpu.sh COMMAND NAME [...]
#   create NAME TYPE [RUNTIME]   create the TPU VM / pod slice (e.g. v4-8, v5litepod-16, v5p-64)
#   setup NAME                   copy this checkout (git archive of HEAD) to every worker and
#                                pip install it there with jax[tpu] and gcsfs
#   run NAME SCRIPT [args...]    run a launch script (or any command) in the checkout on every
#                                worker, e.g. launch/imagenet64.sh with RUNS=gs://BUCKET/runs
#   delete NAME
# Examples (pick a zone that has the type; RUNTIME defaults to the type's usual software version):
#   ZONE=us-central2-b launch/tpu.sh create uij-v4 v4-8
#   ZONE=us-west4-a    launch/tpu.sh create uij-v5e v5litepod-16
#   ZONE=us-east5-a    launch/tpu.sh create uij-v5p v5p-64
#   ZONE=us-central2-b launch/tpu.sh setup uij-v4
#   ZONE=us-central2-b RUNS=gs://my-bucket/runs TEACHERS=/mnt/teachers DATASETS=/mnt/datasets \
#     launch/tpu.sh run uij-v4 launch/imagenet64.sh --config.training.batch_size=2048
# Teachers and datasets must be readable on every worker (a persistent disk, or copies made by a
# `run NAME gsutil cp ...`). The workdir (RUNS) belongs on GCS: every worker writes the checkpoint
# collectively and a slice's local disks die with it.
source "$(dirname "$0")/common.sh"
need ZONE
gcloud_tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
  if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
}
# on_all NAME COMMAND: runs a shell command on every worker of the slice.
on_all() { gcloud_tpu ssh "$1" --worker=all --command="$2"; }

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for $1; pass RUNTIME" ;;
  esac
}

command="${1:-}"
name="${2:-}"
[ -n "$command" ] && [ -n "$name" ] || die "usage: launch/tpu.sh create|setup|run|delete NAME ..."
shift 2
remote_dir=uni_instruct_jax
case "$command" in
  create)
    [ $# -ge 1 ] || die "usage: launch/tpu.sh create NAME TYPE [RUNTIME]"
    gcloud_tpu create "$name" --accelerator-type="$1" --version="${2:-$(default_runtime "$1")}"
    ;;
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$archive" HEAD
    gcloud_tpu scp "$archive" "$name:~/uni_instruct_jax.tar.gz" --worker=all
    rm -f "$archive"
    on_all "$name" "mkdir -p $remote_dir && tar -xzf uni_instruct_jax.tar.gz -C $remote_dir && \
      cd $remote_dir && pip install -U 'jax[tpu]' && pip install -e '.[gcs]'"
    ;;
  run)
    [ $# -ge 1 ] || die "usage: launch/tpu.sh run NAME SCRIPT [args...]"
    env_vars=""
    for v in RUNS TEACHERS DATASETS INCEPTION FID_REFS METHOD SWITCH_KIMG; do
      [ -n "${!v:-}" ] && env_vars+="$v=$(printf %q "${!v}") "
    done
    on_all "$name" "cd $remote_dir && $env_vars$(printf '%q ' "$@")"
    ;;
  delete)
    gcloud_tpu delete "$name" --quiet
    ;;
  *)
    die "unknown command $command (create, setup, run, delete)"
    ;;
esac
