#!/usr/bin/env bash
# Runs on the GPU machine: every GPU test binary in gpu-bin/, logs to $OUT (or ./gpu-logs).
# Arguments, when given, name the binaries to run (globs under gpu-bin/), so that a suite
# longer than one device call can be split:
#     bash scripts/gpu-run.sh test-runtime-gpu
#     bash scripts/gpu-run.sh 'test-autotune-*' test-runtime-nvrtc_compile test-runtime-layer_plan
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
patterns=("${@:-test-*}")
binaries=$(for p in "${patterns[@]}"; do ls -d gpu-bin/$p 2>/dev/null; done)
if [ -z "$binaries" ]; then
    echo "no test binaries in gpu-bin/ match: ${patterns[*]} (run scripts/gpu.sh on the build machine first)" >&2
    exit 1
fi
for t in $binaries; do
    name=$(basename "$t")
    echo "== $name"
    "$t" --nocapture --test-threads=1 2>&1 | tee "$out/$name.log" | grep -E "^(ok|FAIL|GPU|test |test result)" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
