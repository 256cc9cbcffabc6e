#!/usr/bin/env bash
# Builds the Python package's wheel (and pytest's, for a machine without them) into
# gpu-bin/python/, to be copied to a GPU machine with torch. There:
#     bash scripts/gpu-python-run.sh         (the GPU pytest suite and the call-overhead benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-bin/python && mkdir -p gpu-bin/python
venv=.tools/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -w gpu-bin/python ./python
# Pure-Python wheels: they install on the GPU machine's Python whatever its version.
"$venv/bin/pip" download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --platform any -d gpu-bin/python pytest
ls -la gpu-bin/python
