#!/usr/bin/env bash
# Every check CI runs: formatting, clippy with warnings denied, and all tests (unit,
# property, UI, snapshot, CLI, examples, doc tests). Run from anywhere inside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

# NVRTC without a GPU: the pinned wheel (13.0.x, to match the 580 driver of the GPU machine).
nvrtc_dir=.tools/nvrtc
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc_dir" nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH="$PWD/$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The pinned NVRTC writes the ptxas report; the spill checks in runtime/tests/nvrtc_compile.rs need it.
export WEFT_REQUIRE_PTXAS_REPORT=1

cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"

# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
