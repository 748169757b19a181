#!/usr/bin/env bash
# Build the book in its own virtual environment (created or updated first), executing every chapter,
# then check the HTML works offline (no script, stylesheet or frame from the network).
#   scripts/book.sh                  # CPU, the embedded Shapes model; HTML in _build/html/
#   ATTNLENS_MODEL=... scripts/book.sh   # any diffusers folder or hub id (GPU when present)
# Execution: locally a jupyter-cache (_build/.jupyter_cache) keeps unchanged chapters from running again;
# on CI (CI=true) every chapter runs (force). ATTNLENS_BOOK_EXECUTE=force|cache|off chooses either way.
# A failing cell fails the build (exit status non-zero) but every other page is still written.
# Downloads per executable page (book/_ext/attnlens_book.py): _build/html/_notebooks/<page>.ipynb (no outputs,
# to run) and, when chapters were executed, <page>.outputs.ipynb (the executed notebook with every glued value
# pasted into its text, to read in JupyterLab or Colab without running).
# Torch threads: ATTNLENS_THREADS (default: the cores minus one, see attnlens.set_threads).
# The browser check (headless Chromium: figures and widgets drew, no console error, screenshots) is
#   .venv-book/bin/python scripts/check_book.py       (needs `apt-get install -y chromium`; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv-book book
if [ ! -f _toc.yml ]; then
  echo "no book yet (_toc.yml missing): the environment is ready, nothing to build"
  exit 0
fi
if [ -z "${ATTNLENS_BOOK_EXECUTE:-}" ]; then
  if [ "${CI:-}" = true ]; then ATTNLENS_BOOK_EXECUTE=force; else ATTNLENS_BOOK_EXECUTE=cache; fi
fi
export ATTNLENS_BOOK_EXECUTE
start=$(date +%s)
status=0
.venv-book/bin/jupyter-book build . --all -W -n --keep-going || status=$?
echo "book built in $(( $(date +%s) - start )) s (execution: $ATTNLENS_BOOK_EXECUTE, exit status $status): _build/html/index.html"
.venv-book/bin/python scripts/check_book.py --no-browser || status=$?
exit "$status"
