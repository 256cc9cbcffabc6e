#!/usr/bin/env bash
# On the GPU machine: weft's kernels, then the peers on the same inputs and masks, one table.
#   bash bench/run.sh [SEQ_LENGTHS] [CASES] [weft-bench options...]
#   e.g. bash bench/run.sh 16384,65536 dense,block-10 --dense-configs 128x128x16x2w
set -euo pipefail
cd "$(dirname "$0")/.."
seq=${1:-16384,65536}
cases=${2:-dense,causal,block-10,block-3,vv-10,vv-3,cvv-10,cvv-3}
shift $(( $# < 2 ? $# : 2 ))
data=${BENCH_DATA:-/tmp/weft-bench-data}
out=${OUT:-bench-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/bench-gpu.txt"
gpu-bin/weft-bench --seq "$seq" --cases "$cases" --out "$data" "$@" 2>&1 | tee "$out/bench-weft.log"
PYTHONUNBUFFERED=1 python3 bench/peers.py "$data" 2>&1 | tee "$out/bench-peers.log"
