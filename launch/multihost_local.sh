#!/usr/bin/env bash
# Start N JAX processes of the pretraining CLI on this machine, each with D simulated CPU
# devices, joined by jax.distributed on a loopback port: a multi-host run to try out on one CPU.
#
#   launch/multihost_local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] -- \
#     --config=configs/pretrain.py:test --workdir=/tmp/vismae_multihost
#
# Everything after `--` goes to `python -m vismae_jax.pretrain` in every process. The workdir
# needs a corpus prepared at the config's image size (for `test`:
# `python -m vismae_jax.data.prepare --demo --image_size=64 --output_dir=WORKDIR/corpus`).
# Process 0 prints to this terminal; process i > 0 writes LOG_DIR/process_i.log (LOG_DIR
# defaults to a new temporary folder). The script exits with the first non-zero status of any
# process. Ctrl-C stops all processes.

set -euo pipefail

num_processes=2
devices_per_process=4
python="${PYTHON:-.venv/bin/python}"

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

while getopts "n:d:h" option; do
  case "${option}" in
    n) num_processes="${OPTARG}" ;;
    d) devices_per_process="${OPTARG}" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "Missing pretraining flags after --, e.g. --config=configs/pretrain.py:test --workdir=DIR." >&2
  usage
fi

cd "$(dirname "$0")/.."
log_dir="${LOG_DIR:-$(mktemp -d -t vismae_multihost.XXXXXX)}"
mkdir -p "${log_dir}"
port="$("${python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# Each process gets its own simulated CPU devices. The coordinator listens on loopback only.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices_per_process}"
export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:${port}"

echo "Starting ${num_processes} processes x ${devices_per_process} CPU devices," \
  "coordinator 127.0.0.1:${port}, logs of processes 1.. in ${log_dir}."

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "${pid}" 2>/dev/null || true
  done
}
trap stop_all INT TERM

for ((process_id = num_processes - 1; process_id >= 0; process_id--)); do
  command=("${python}" -m vismae_jax.pretrain
    --coordinator_address="127.0.0.1:${port}"
    --num_processes="${num_processes}"
    --process_id="${process_id}"
    "$@")
  if ((process_id == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"${log_dir}/process_${process_id}.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  code=0
  wait "${pid}" || code=$?
  if ((code != 0 && status == 0)); then
    status=${code}
    echo "Process with pid ${pid} exited with status ${code}; stopping the others." >&2
    stop_all
  fi
done
exit "${status}"
