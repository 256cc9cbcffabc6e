#!/usr/bin/env bash
# Runs on the GPU machine: every GPU test binary in gpu-bin/, logs to $OUT (or ./gpu-logs).
# Arguments, when given, name the binaries to run (globs under gpu-bin/), each optionally with
# test-name filters after a colon (comma-separated; `--skip` filters with a leading `!`), so
# that a long suite can be run in parts (e.g. under a time limit per run):
#     bash scripts/gpu-run.sh 'test-runtime-gpu:wgmma,block_indexes,layer'
#     bash scripts/gpu-run.sh 'test-runtime-gpu:!wgmma,!block_indexes,!layer'
#     bash scripts/gpu-run.sh 'test-autotune-*' test-runtime-nvrtc_compile test-runtime-layer_plan
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
patterns=("${@:-test-*}")
runs=0
for p in "${patterns[@]}"; do
    glob=${p%%:*}
    filters=()
    if [[ $p == *:* ]]; then
        IFS=',' read -r -a parts <<<"${p#*:}"
        for f in "${parts[@]}"; do
            if [[ $f == !* ]]; then filters+=(--skip "${f#!}"); else filters+=("$f"); fi
        done
    fi
    for t in $(ls -d gpu-bin/$glob 2>/dev/null); do
        name=$(basename "$t")
        log="$out/$name${filters[*]:+-part$runs}.log"
        runs=$((runs + 1))
        echo "== $name ${filters[*]}"
        "$t" --nocapture --test-threads=1 "${filters[@]}" 2>&1 | tee "$log" | grep -E "^(ok|FAIL|GPU|test |test result)" || true
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
done
if [ "$runs" -eq 0 ]; then
    echo "no test binaries in gpu-bin/ match: ${patterns[*]} (run scripts/gpu.sh on the build machine first)" >&2
    exit 1
fi
exit $status
