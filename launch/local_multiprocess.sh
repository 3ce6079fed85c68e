#!/usr/bin/env bash
# N processes of one job on this machine, the code path of a pod: CPU backend, a localhost
# coordinator, explicit --coordinator_address/--num_processes/--process_id, each process with its
# own DEVICES_PER_PROCESS fake CPU devices (default 2). Output lines are prefixed "[p] "; the first
# process to fail stops the others and its exit code is the launcher's.
# Usage: [DEVICES_PER_PROCESS=2] launch/local_multiprocess.sh N [main flags...]
#   launch/local_multiprocess.sh 2 --config=configs/toy2d.py --workdir=/tmp/toy2d_2proc
#   MAIN="launch/local_multiprocess.sh 2" launch/cifar10_uncond.sh   # any experiment script
source "$(dirname "$0")/common.sh"
[[ "${1:-}" =~ ^[1-9][0-9]*$ ]] || die "usage: launch/local_multiprocess.sh N [main flags...] (N >= 1)"
num=$1
shift
devices="${DEVICES_PER_PROCESS:-2}"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$devices is not a positive integer"
port=$($PYTHON -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM HUP
# prefix P: each input line as "[P] line", at once (sed would hold lines back in its buffer).
prefix() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '[%s] %s\n' "$1" "$line"; done
}

for ((p = 0; p < num; p++)); do
  # The device count last in XLA_FLAGS (the last occurrence wins) and in JAX_NUM_CPU_DEVICES
  # (which overrides the flag), so that neither set in the caller's environment changes it.
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    JAX_NUM_CPU_DEVICES="$devices" PYTHONUNBUFFERED=1 $PYTHON -m uni_instruct_jax.main \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$p" "$@" \
    > >(prefix "$p") 2>&1 &
  pids+=("$!")
done

declare -A index
for p in "${!pids[@]}"; do index[${pids[$p]}]=$p; done
running=("${pids[@]}")
while ((${#running[@]})); do
  rc=0
  wait -n -p done_pid "${running[@]}" || rc=$?
  if ((rc != 0)); then
    echo "error: process ${index[$done_pid]} of $num exited with code $rc; stopping the others" >&2
    stop_all
    wait 2>/dev/null || true
    exit "$rc"
  fi
  left=()
  for pid in "${running[@]}"; do [ "$pid" = "$done_pid" ] || left+=("$pid"); done
  running=("${left[@]}")
done
wait  # the output filters
