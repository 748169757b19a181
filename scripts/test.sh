#!/usr/bin/env bash
# Run the test suite in its own virtual environment (created or updated first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv-test dev
exec .venv-test/bin/python -m pytest "$@"
