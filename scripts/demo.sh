#!/usr/bin/env bash
# The main job: installs what it needs into .venv, then runs the offline end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python examples/demo.py "$@"
