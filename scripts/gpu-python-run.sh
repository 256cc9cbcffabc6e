#!/usr/bin/env bash
# Runs on the GPU machine (torch with CUDA installed): installs the wheel from
# scripts/gpu-python.sh into a scratch folder, runs the GPU pytest suite and the Python call
# overhead benchmark; logs to $OUT (or ./gpu-logs). Arguments go to pytest (e.g. -k compile);
# WEFT_PYTEST=0 skips the tests.
# The package stays installed in $WEFT_SITE (default /tmp/weft-site) for what runs next, e.g.
#     PYTHONPATH=/tmp/weft-site python3 bench/model_ttft.py
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
site=${WEFT_SITE:-/tmp/weft-site}
rm -rf "$site" && mkdir -p "$site"
python3 -m pip install --quiet --no-index --no-deps --target "$site" gpu-bin/python/*.whl
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install --quiet --no-index --find-links gpu-bin/python --target "$site" pytest
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export WEFT_DB=${WEFT_DB:-$(mktemp -d)/db}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)' | tee -a "$out/gpu.txt"
status=0
if [ "${WEFT_PYTEST:-1}" != 0 ]; then
    python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_torch.py python/tests/test_hf.py "$@" 2>&1 \
        | tee "$out/pytest-torch.log" || status=1
fi
python3 bench/torch_overhead.py 2>&1 | tee "$out/torch-overhead.log" || status=1
exit $status
