#!/usr/bin/env bash
# Create .venv if needed, install the project with its test tools, then run the test suite.
# Extra arguments go to pytest, for example: bash scripts/test.sh -k policy
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
python -m ruff check watcher trainer tests bench
python -m ruff format --check watcher trainer tests bench
exec python -m pytest -q "$@"
