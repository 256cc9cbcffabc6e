#!/usr/bin/env bash
# Builds the GPU test binaries (and the weft CLI) on a build machine into gpu-bin/, to be
# copied to a GPU machine (which needs no Rust toolchain). There, one command runs them all:
#     bash scripts/gpu-run.sh            (logs under $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
# (gpu-bin/python, from scripts/gpu-python.sh, is kept.)
mkdir -p gpu-bin && find gpu-bin -maxdepth 1 -type f -delete
cargo build --release --locked --bin weft && cargo build --release --locked -p weft-bench
cp target/release/weft target/release/weft-bench target/release/search-bench target/release/index-bench gpu-bin/
cargo test --release --locked -p weft-runtime -p weft-autotune --features gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, os, sys, shutil
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        crate = os.path.basename(os.path.dirname(m["manifest_path"]))
        name = "gpu-bin/test-%s-%s" % (crate, m["target"]["name"])
        shutil.copy(m["executable"], name)
        print(name)
'
ls -la gpu-bin
