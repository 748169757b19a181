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
- **Notebook (.ipynb)**: the page as a notebook without outputs, written by the build to
  ``_notebooks/<page>.ipynb`` (jupytext), to download and open in any Jupyter.
- **Colab**: when the book is built with ``$ATTNLENS_REPO_URL`` set to the GitHub repository it is
  published from, the same ``_notebooks/`` copy on the branch the site is published to
  (``$ATTNLENS_PAGES_BRANCH``, default ``gh-pages``: publish ``_build/html/`` at that branch's root).
  Each copy's first cell installs attnlens when it is missing: the build writes the repository
  (``attnlens[book] @ git+$ATTNLENS_REPO_URL@$ATTNLENS_REPO_BRANCH``, branch default ``main``) into it as
  the default of ``$ATTNLENS_SOURCE``.

The theme's own launch buttons need a repository URL in _config.yml; these read it from the
environment at build time, so a clone builds without one.

**Execution mode.** ``$ATTNLENS_BOOK_EXECUTE`` (``cache``, ``force``, ``auto``, ``off``) overrides
``execute_notebooks`` of _config.yml: scripts/book.sh passes ``force`` on CI (``CI=true``) and
``cache`` (jupyter-cache: an unchanged chapter is not executed again) elsewhere. The cache lives in
``_build/.jupyter_cache/<key>``, the key a digest of the attnlens sources, the recorded results, the
embedded model's record and ``$ATTNLENS_MODEL``: change any of them and every chapter runs again.

**Kernels know they are in the build.** ``$ATTNLENS_BOOK_BUILD`` is set for the executing kernels
(they inherit the environment), so :func:`attnlens.viz.setup_notebook` picks the page renderer.

**plotly.js once per site.** Figures carry no plotly.js of their own (the page renderer); the
installed plotly's ``plotly.min.js`` is copied once to ``_static/`` and loaded, before require.js,
by each page that has a plotly figure. The pages still work offline (nothing from a CDN).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from sphinx.application import Sphinx


NOTEBOOKS_DIR = "_notebooks"
SOURCE_DEFAULT = 'os.environ.get("ATTNLENS_SOURCE", "")'


def _github(url: str):
    return re.match(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?$", url)


def _write_notebooks(app: Sphinx, exception) -> None:
    """Every executable page as ``_notebooks/<page>.ipynb`` (no outputs), the install source filled in."""
    if exception is not None or app.builder.format != "html":
        return
    import jupytext

    repo = os.environ.get("ATTNLENS_REPO_URL", "").rstrip("/")
    source = None
    if _github(repo):
        branch = os.environ.get("ATTNLENS_REPO_BRANCH", "main")
        source = f"attnlens[book] @ git+{repo.removesuffix('.git')}.git@{branch}"
    for docname in app.env.found_docs:
        path = Path(app.env.doc2path(docname))
        if path.suffix not in (".md", ".ipynb") or not path.is_file():
            continue
        meta = app.env.metadata.get(docname, {})
        if path.suffix == ".md" and "kernelspec" not in meta:
            continue
        nb = jupytext.read(path)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
                if source and SOURCE_DEFAULT in cell.source:
                    cell.source = cell.source.replace(SOURCE_DEFAULT, f'os.environ.get("ATTNLENS_SOURCE", "{source}")')
        nb.metadata.pop("widgets", None)
        nb.metadata.pop("jupytext", None)
        out = Path(app.outdir) / NOTEBOOKS_DIR / f"{docname}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(nb, out, fmt="ipynb")


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
    depth = pagename.count("/")
    buttons.append({
        "type": "link",
        "text": "Notebook (.ipynb)",
        "tooltip": "Download this page as a notebook (no outputs); its first cell installs attnlens when missing",
        "icon": "fas fa-download",
        "url": "../" * depth + f"{NOTEBOOKS_DIR}/{pagename}.ipynb",
        "label": "download-notebook-button",
    })
    m = _github(os.environ.get("ATTNLENS_REPO_URL", ""))
    if m:
        branch = os.environ.get("ATTNLENS_PAGES_BRANCH", "gh-pages")
        buttons.append({
            "type": "link",
            "text": "Colab",
            "tooltip": "Open on Google Colab",
            "icon": "_static/images/logo_colab.png",
            "url": f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{branch}/{NOTEBOOKS_DIR}/{pagename}.ipynb",
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


EXECUTION_MODES = ("cache", "force", "auto", "off", "inline")
PLOTLY_JS = "plotly.min.js"


def _execution_mode(app: Sphinx, config) -> None:
    mode = os.environ.get("ATTNLENS_BOOK_EXECUTE", "").strip()
    if mode:
        if mode not in EXECUTION_MODES:
            raise ValueError(f"$ATTNLENS_BOOK_EXECUTE must be one of {', '.join(EXECUTION_MODES)}, not {mode!r}")
        config.nb_execution_mode = mode
    if config.nb_execution_mode == "cache":
        # jupyter-cache keys a notebook by its code only: keep one cache per state of what else decides the
        # outputs (the package, the recorded results, the model), so a stale output is never reused
        config.nb_execution_cache_path = str(Path(app.outdir).parent / ".jupyter_cache" / _inputs_key(Path(app.srcdir)))


def _inputs_key(root: Path) -> str:
    """A short digest of the attnlens sources, the embedded model's record, the recorded results and
    ``$ATTNLENS_MODEL``: what the chapters' outputs depend on besides their own code."""
    import hashlib

    digest = hashlib.sha256(os.environ.get("ATTNLENS_MODEL", "").encode())
    files = sorted((root / "attnlens").rglob("*.py")) + sorted((root / "benchmarks" / "results").glob("*"))
    files.append(root / "attnlens" / "models" / "shapes" / "training.json")
    for f in files:
        if f.is_file():
            digest.update(str(f.relative_to(root)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _plotly_source() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _copy_plotly(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_plotly_source(), static / PLOTLY_JS)


def _plotly_once(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if 'class="plotly-graph-div"' in context.get("body", ""):
        # before require.js (myst-nb's widget scripts, priority 500): plotly.js then defines window.Plotly
        app.add_js_file(PLOTLY_JS, priority=100)


def setup(app: Sphinx) -> dict:
    os.environ["ATTNLENS_BOOK_BUILD"] = "1"  # the executing kernels inherit it
    app.connect("config-inited", _execution_mode)
    app.connect("builder-inited", _copy_plotly)
    app.connect("build-finished", _write_notebooks)
    app.connect("html-page-context", _plotly_once, priority=50)
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _unique_scripts, priority=100)
    # after sphinx-book-theme prepares header_buttons (priority 500) and adds its own (501)
    app.connect("html-page-context", _add_launch_buttons, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
