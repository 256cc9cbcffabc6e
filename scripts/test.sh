#!/usr/bin/env bash
# Every check CI runs: formatting, clippy with warnings denied, and all tests (unit,
# property, UI, snapshot, CLI, examples, doc tests, and the Python package's pytest suite).
# Run from anywhere inside the checkout.
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

# The Python package, built by pip through maturin (python/pyproject.toml) into a venv, and its
# tests; the CPU tests compare with the `weft` binary the Rust tests built. The GPU tests
# (python/tests/test_torch.py) say they skipped where torch or a GPU is missing.
venv=.tools/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check numpy pytest safetensors ./python
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
WEFT_BIN="$PWD/target/debug/weft" "$venv/bin/python" -m pytest -q -rs python/tests 2>&1 | tee "$pylog"

# One closing line over every test binary and the pytest run.
read -r rp rf rs < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d %d %d\n", p, f, s }' "$log")
# pytest's last line: "22 passed, 3 skipped in 3.40s".
read -r pp pf ps < <(awk '/ in [0-9.]+s/ { for (i = 1; i <= NF; i++) { w = $(i+1); sub(/,$/, "", w); if (w == "passed") p += $i; if (w == "failed" || w == "error" || w == "errors") f += $i; if (w == "skipped") s += $i } }
     END { printf "%d %d %d\n", p, f, s }' "$pylog")
printf '%d passed, %d failed, %d skipped\n' $((rp + pp)) $((rf + pf)) $((rs + ps))
