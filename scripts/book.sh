#!/usr/bin/env bash
# Build the book in its own virtual environment (created or updated first), executing every chapter,
# then check the HTML works offline (no script, stylesheet or frame from the network).
#   scripts/book.sh                  # CPU, the embedded Shapes model; HTML in _build/html/
#   ATTNLENS_MODEL=... scripts/book.sh   # any diffusers folder or hub id (GPU when present)
# The browser check (headless Chromium: figures and widgets drew, no console error, screenshots) is
#   .venv-book/bin/python scripts/check_book.py       (needs `apt-get install -y chromium`; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv-book book
if [ ! -f _toc.yml ]; then
  echo "no book yet (_toc.yml missing): the environment is ready, nothing to build"
  exit 0
fi
start=$(date +%s)
.venv-book/bin/jupyter-book build . --all -W -n --keep-going
echo "book built in $(( $(date +%s) - start )) s: _build/html/index.html"
exec .venv-book/bin/python scripts/check_book.py --no-browser
