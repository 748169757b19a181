#!/usr/bin/env bash
# Open the lab notebooks (notebooks/) in JupyterLab with everything installed: the same environment
# as scripts/book.sh (.venv-book, created or updated first). JupyterLab serves the repository root, so
# the book's chapters (book/*.md, MyST Markdown notebooks) open too, as notebooks through jupytext, and
# the book's "JupyterLab" launch links (http://localhost:8888/lab/tree/...) land here.
#   scripts/lab.sh                       # the embedded Shapes model, CPU
#   ATTNLENS_MODEL=/path/to/sd scripts/lab.sh   # any diffusers folder or hub id (GPU when present)
#   ATTNLENS_LAB_PORT=8899 scripts/lab.sh [jupyter lab options...]   (as root, JupyterLab wants --allow-root)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv-book book
settings=.venv-book/share/jupyter/lab/settings
mkdir -p "$settings"
cat > "$settings/overrides.json" <<'JSON'
{
  "@jupyterlab/docmanager-extension:plugin": {
    "defaultViewers": {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
  }
}
JSON
exec .venv-book/bin/jupyter lab --ServerApp.root_dir="$PWD" --ServerApp.port="${ATTNLENS_LAB_PORT:-8888}" \
  --LabApp.default_url=/lab/tree/notebooks "$@"
