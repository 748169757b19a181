#!/usr/bin/env bash
# Create or update a virtual environment with attnlens and the given extras.
# Usage: scripts/setup_env.sh VENV EXTRAS   (e.g. scripts/setup_env.sh .venv-test dev)
# The CPU build of torch is installed first, so nothing pulls a multi-GB CUDA build; set
# ATTNLENS_TORCH to another requirement (e.g. "torch>=2.4") to choose differently.
set -euo pipefail
venv=${1:?venv folder}
extras=${2:-dev}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q "${ATTNLENS_TORCH:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q -e "$root[$extras]" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import attnlens, torch; print('attnlens ready, torch', torch.__version__)"
