#!/usr/bin/env bash
# Runs on the GPU machine: every GPU test binary in gpu-bin/, logs to $OUT (or ./gpu-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
for t in gpu-bin/test-*; do
    name=$(basename "$t")
    echo "== $name"
    "$t" --nocapture --test-threads=1 2>&1 | tee "$out/$name.log" | grep -E "^(ok|FAIL|GPU|test |test result)" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
