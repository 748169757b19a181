"""The attnlens book's local Sphinx extension (see _config.yml): launch buttons, and one fix so that
pages log no console error.

**Scripts once.** sphinx-thebe (which Jupyter Book always loads) registers its inline configuration
script at every ``env-before-read-docs``; on a full build it lands in every page twice, and the second
copy throws "Identifier 'THEBE_JS_URL' has already been declared". Each page's scripts are
de-duplicated (same file or same inline body, same attributes) before it is written.

**Launch buttons.** Every executable page (a MyST Markdown notebook or an .ipynb) gets a rocket menu with:

- **JupyterLab**: the page's source in the JupyterLab that ``scripts/lab.sh`` starts at the
  repository root (``$ATTNLENS_LAB_URL``, default ``http://localhost:8888``); lab.sh makes
  JupyterLab open MyST Markdown notebooks as notebooks.
- **Colab** (``.ipynb`` pages only): when the book is built with ``$ATTNLENS_REPO_URL`` set to the
  GitHub repository it is published from (``$ATTNLENS_REPO_BRANCH``, default ``main``).

The theme's own launch buttons need a repository URL in _config.yml; these read it from the
environment at build time, so a clone builds without one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx.application import Sphinx


def _is_notebook(app: Sphinx, pagename: str, context: dict) -> bool:
    meta = app.env.metadata.get(pagename, {})
    return "kernelspec" in meta or context.get("page_source_suffix", "") == ".ipynb"


def _add_launch_buttons(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if doctree is None or "header_buttons" not in context or not _is_notebook(app, pagename, context):
        return
    source = Path(app.env.doc2path(pagename, False)).as_posix()
    lab = os.environ.get("ATTNLENS_LAB_URL", "http://localhost:8888").rstrip("/")
    buttons = [{
        "type": "link",
        "text": "JupyterLab",
        "tooltip": "Open in the JupyterLab started by scripts/lab.sh",
        "icon": "fas fa-flask",
        "url": f"{lab}/lab/tree/{source}",
        "label": "launch-jupyterlab-button",
    }]
    repo = os.environ.get("ATTNLENS_REPO_URL", "")
    m = re.match(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?$", repo)
    if m and source.endswith(".ipynb"):
        branch = os.environ.get("ATTNLENS_REPO_BRANCH", "main")
        buttons.append({
            "type": "link",
            "text": "Colab",
            "tooltip": "Open on Google Colab",
            "icon": "_static/images/logo_colab.png",
            "url": f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{branch}/{source}",
            "label": "launch-colab-button",
        })
    context["header_buttons"].append({
        "type": "group",
        "tooltip": "Launch interactive content",
        "icon": "fas fa-rocket",
        "buttons": buttons,
        "label": "launch-buttons",
    })


def _script_key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    return (str(getattr(script, "filename", script) or ""), tuple(sorted((k, str(v)) for k, v in attributes.items())))


def _unique_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: handlers after this one add their page's scripts to the same list


def setup(app: Sphinx) -> dict:
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _unique_scripts, priority=100)
    # after sphinx-book-theme prepares header_buttons (priority 500) and adds its own (501)
    app.connect("html-page-context", _add_launch_buttons, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
