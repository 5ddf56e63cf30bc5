#!/usr/bin/env bash
# The test suite: installs what it needs into .venv, then runs pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest tests -q -n 2 -p no:cacheprovider "$@"
