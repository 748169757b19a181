#!/usr/bin/env bash
# Build the book in its own virtual environment (created or updated first), executing every chapter.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv-book book
if [ ! -f _toc.yml ]; then
  echo "no book yet (_toc.yml missing): the environment is ready, nothing to build"
  exit 0
fi
exec .venv-book/bin/jupyter-book build . --all -W -n --keep-going
