#!/usr/bin/env bash
# Creates .venv with everything the demo and the tests need. torch is installed first, pinned to the
# CPU build, so that no dependency pulls a multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[train,dev]"
