#!/usr/bin/env bash
# Run the test suite (all but the book's tests) against the OLDEST versions pyproject.toml allows, in its
# own virtual environment (.venv-oldest), so a lower bound we declare is one we have run.
#   scripts/test_oldest.sh [pytest args]
# The constraints are made from pyproject.toml at each run (every "name>=X" becomes "name==X"), so the
# bounds have one home. Two exceptions, printed when the script runs:
# - torch: the CPU build 2.13.0 is installed (the oldest CPU-only wheel this machine's index serves;
#   older torch wheels on PyPI are CUDA builds of several GB), so torch's own bound is not exercised.
# - transitive packages that the oldest diffusers/transformers need at their own contemporary versions
#   (newer huggingface_hub releases removed APIs that diffusers 0.30 imports), pinned below.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-oldest
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python3 - "$constraints" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
lines = []
for req in reqs:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req.strip())
    if not m:
        sys.exit(f"test_oldest.sh: cannot read a lower bound from {req!r} in pyproject.toml")
    name, version = m.groups()
    if name == "torch":
        continue
    lines.append(f"{name}=={version}")
# contemporaries of diffusers 0.30 / transformers 4.44 (see the header)
lines += ["huggingface_hub==0.24.0", "tokenizers==0.19.1"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("oldest versions:", ", ".join(lines), "(torch: the CPU build 2.13.0)")
PY
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -m pip install -q -c "$constraints" -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
print("oldest environment:", ", ".join(f"{p} {version(p)}" for p in
      ["torch", "diffusers", "transformers", "safetensors", "numpy", "scipy", "scikit-learn", "pandas", "pillow"]))
PY
exec "$venv/bin/python" -m pytest --ignore=tests/test_book.py "$@"
