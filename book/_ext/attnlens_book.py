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
  ``_notebooks/<page>.ipynb`` (jupytext), to download, open in any Jupyter and run.
- **Notebook with outputs (.ipynb)**: the notebook the build executed (myst-nb keeps it in
  ``_build/jupyter_execute/<page>.ipynb``, its glued values beside it in ``<page>.glue.json``) with every
  ``{glue}``, ``{glue:any}``, ``{glue:text}`` and ``{glue:md}`` role of its Markdown cells replaced by the
  glued value's text (:func:`paste_glue`), written to ``_notebooks/<page>.outputs.ipynb``: it reads right
  in JupyterLab or Colab without running (nothing there renders MyST roles; issue 21). A role whose key
  was never glued fails the build, naming the page and the key. Its plotly figures also carry plotly's
  own MIME type (:func:`plotly_json`), so JupyterLab draws them without the site's plotly.js. Not written
  when execution is off.
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

import json
import os
import re
import shutil
from ast import literal_eval
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Sphinx only for annotations: the glue functions are tested without Sphinx or myst-nb
    from sphinx.application import Sphinx


NOTEBOOKS_DIR = "_notebooks"
OUTPUTS_SUFFIX = ".outputs.ipynb"  # _notebooks/<page>.outputs.ipynb: the executed notebook, glue pasted
EXECUTED_DIR = "jupyter_execute"  # myst-nb's folder of executed notebooks, beside the HTML folder
SOURCE_DEFAULT = 'os.environ.get("ATTNLENS_SOURCE", "")'


def _github(url: str):
    return re.match(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?$", url)


def _write_notebooks(app: Sphinx, exception) -> None:
    """Every executable page as ``_notebooks/<page>.ipynb`` (no outputs), the install source filled in, and,
    when the build executed it, as ``_notebooks/<page>.outputs.ipynb`` (its outputs, the glue pasted)."""
    if exception is not None or app.builder.format != "html":
        return
    import jupytext

    repo = os.environ.get("ATTNLENS_REPO_URL", "").rstrip("/")
    source = None
    if _github(repo):
        branch = os.environ.get("ATTNLENS_REPO_BRANCH", "main")
        source = f"attnlens[book] @ git+{repo.removesuffix('.git')}.git@{branch}"
    errors: list[str] = []
    for docname in sorted(app.env.found_docs):
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
        executed = _executed(app, docname)
        if _with_outputs(app) and executed.is_file():
            try:
                write_outputs_notebook(executed, out.with_name(out.name.removesuffix(".ipynb") + OUTPUTS_SUFFIX),
                                       docname, source)
            except GlueError as exc:  # every other notebook is still written; the build fails after them
                errors.append(str(exc))
    if errors:
        raise GlueError("notebooks with outputs not written:\n" + "\n".join(errors))


# ------------------------------------------------------------------------------ the notebook with outputs
# A MyST role: {name}`content`, the content in one or more backticks (the same number closes it).
GLUE_ROLE = re.compile(r"\{(?P<role>glue(?::(?:any|text|md)?)?)\}(?P<ticks>`+)(?P<content>.+?)(?<!`)(?P=ticks)(?!`)")
GLUE_DIRECTIVE = re.compile(r"^\s*(?:`{3,}|:{3,})\{glue(?::[a-z]*)?\}", re.M)


class GlueError(ValueError):
    """A glue role of a page that cannot be pasted (its key was never glued, or has no text to show)."""


def format_plain_text(text: str, spec: str) -> str:
    """A ``{glue:text}`` value as myst-nb prints it: the text/plain output read back as a Python literal
    where it is one (a number, a quoted string), converted for the format ``spec``'s type, then formatted.

    >>> format_plain_text("0.12345", ".2f"), format_plain_text("'star'", ""), format_plain_text("7", "+d")
    ('0.12', 'star', '+7')
    """
    try:
        value = literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    if spec == "":
        return str(value)
    kind = spec[-1]
    if kind == "s":
        value = str(value)
    elif kind in "bcdoxX":
        value = int(value)
    elif kind in "eEfFgGn%":
        value = float(value)
    return format(value, spec)


def glue_data(executed: dict, glue_json: dict | None = None) -> dict[str, dict]:
    """``{key: mime bundle}`` of every value a notebook glued: the outputs tagged ``scrapbook`` in ``executed``
    (a notebook as a dict; myst-nb's ``mime_prefix`` stripped), then myst-nb's ``<page>.glue.json``
    (``{key: output}``; myst-nb takes the hidden glue outputs out of the notebook it writes)."""
    found: dict[str, dict] = {}
    for cell in executed.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            meta = (out.get("metadata") or {}).get("scrapbook")
            if meta:
                cut = len(meta.get("mime_prefix", ""))
                found[meta["name"]] = {k[cut:]: v for k, v in out.get("data", {}).items()}
    for key, out in (glue_json or {}).items():
        found[key] = dict(out.get("data", {}))
    return found


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def paste_glue(executed: dict, data: dict[str, dict], page: str = "notebook") -> dict:
    """``executed`` (a notebook as a dict, changed in place and returned) with every glue role of its Markdown
    cells replaced by the glued value: ``{glue}``/``{glue:any}`` by its text/markdown, else its text/plain;
    ``{glue:text}`key:spec``` by its text/plain formatted as myst-nb formats it (:func:`format_plain_text`);
    ``{glue:md}`key``` by its text/markdown. ``data`` is :func:`glue_data`'s.

    Raises:
        GlueError: a role names a key that was never glued, a value lacks the text the role shows, the role
            points at another page (``doc::key``), or a cell holds a glue *directive* (none is pasted); the
            message names the page, the role and what is valid.
    """

    def one(m: re.Match) -> str:
        role, content = m["role"], m["content"].strip()
        where = f"{page}: {m[0]}"
        if "::" in content:
            raise GlueError(f"{where}: a glue role from another page cannot be pasted into this page's notebook")
        if role == "glue:text":
            key, _, spec = content.rpartition(":") if ":" in content else (content, "", "")
        elif role == "glue:md":
            key = content.rsplit(":", 1)[0] if ":" in content else content
        else:
            key = content
        if key not in data:
            raise GlueError(f"{where}: no value glued as {key!r} (glued: {', '.join(sorted(data)) or 'none'})")
        bundle = data[key]
        if role == "glue:text":
            if "text/plain" not in bundle:
                raise GlueError(f"{where}: the value glued as {key!r} has no text/plain (it has {sorted(bundle)})")
            try:
                return format_plain_text(_text(bundle["text/plain"]), spec)
            except (TypeError, ValueError) as exc:
                raise GlueError(f"{where}: cannot format {_text(bundle['text/plain'])!r} with {spec!r}: {exc}") from exc
        if "text/markdown" in bundle:
            return _text(bundle["text/markdown"])
        if role == "glue:md":
            raise GlueError(f"{where}: the value glued as {key!r} has no text/markdown (it has {sorted(bundle)}); "
                            "glue an IPython.display.Markdown")
        if "text/plain" in bundle:
            return _text(bundle["text/plain"])
        raise GlueError(f"{where}: the value glued as {key!r} has neither text/markdown nor text/plain "
                        f"(it has {sorted(bundle)})")

    for cell in executed.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = _text(cell.get("source", ""))
        if GLUE_DIRECTIVE.search(source):
            raise GlueError(f"{page}: a glue directive ({GLUE_DIRECTIVE.search(source)[0].strip()}) cannot be pasted "
                            "into the notebook with outputs; use the glue roles")
        cell["source"] = GLUE_ROLE.sub(one, source)
    return executed


PLOTLY_MIME = "application/vnd.plotly.v1+json"
_NEW_PLOT = re.compile(r"Plotly\.newPlot\(\s*\"[^\"]*\"\s*,\s*")
_ADD_FRAMES = re.compile(r"Plotly\.addFrames\(\s*'[^']*'\s*,\s*")


def _json_args(text: str, start: int, n: int) -> list:
    """``n`` JSON values separated by commas in ``text`` from ``start`` (the arguments of a JS call)."""
    decoder, values, i = json.JSONDecoder(), [], start
    for _ in range(n):
        value, i = decoder.raw_decode(text, i)
        values.append(value)
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
    return values


def plotly_json(executed: dict) -> int:
    """Give every plotly figure of ``executed`` (changed in place) plotly's own MIME type beside its HTML.

    In the build a figure is HTML that expects the page's one copy of plotly.js, so in a notebook it draws
    nothing; with ``application/vnd.plotly.v1+json`` (data, layout, config and frames read back from the
    figure's ``Plotly.newPlot`` call) JupyterLab's plotly renderer draws it, trusted or not. Returns how many
    figures got it; a figure whose call cannot be read keeps its HTML only.

    >>> html = '<div class="plotly-graph-div"></div><script>Plotly.newPlot("x", [{"y": [1]}], {"title": "t"}, {})</script>'
    >>> nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {"text/html": html}}]}]}
    >>> plotly_json(nb), nb["cells"][0]["outputs"][0]["data"][PLOTLY_MIME]["layout"]
    (1, {'title': 't'})
    """
    done = 0
    for cell in executed.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            bundle = out.get("data") or {}
            html = _text(bundle.get("text/html", ""))
            if 'class="plotly-graph-div"' not in html or PLOTLY_MIME in bundle or not (call := _NEW_PLOT.search(html)):
                continue
            try:
                data, layout, config = _json_args(html, call.end(), 3)
                figure = {"data": data, "layout": layout, "config": config}
                if frames := _ADD_FRAMES.search(html, call.end()):
                    figure["frames"] = _json_args(html, frames.end(), 1)[0]
            except (ValueError, IndexError):
                continue
            bundle[PLOTLY_MIME] = figure
            done += 1
    return done


def _executed(app: Sphinx, docname: str) -> Path:
    return Path(app.outdir).parent / EXECUTED_DIR / f"{docname}.ipynb"


def _with_outputs(app: Sphinx) -> bool:
    return getattr(app.config, "nb_execution_mode", "off") != "off"


def write_outputs_notebook(executed_path: Path, out: Path, page: str, source: str | None = None) -> Path:
    """The notebook with outputs of one page: ``executed_path`` (myst-nb's executed notebook, its
    ``.glue.json`` beside it) with the glue pasted (:func:`paste_glue`), the install source filled in when
    ``source`` is given, written to ``out``."""
    nb = json.loads(executed_path.read_text(encoding="utf8"))
    glue_file = executed_path.with_name(executed_path.name.removesuffix(".ipynb") + ".glue.json")
    glue_json = json.loads(glue_file.read_text(encoding="utf8")) if glue_file.is_file() else None
    paste_glue(nb, glue_data(nb, glue_json), page)
    plotly_json(nb)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and source:
            text = _text(cell.get("source", ""))
            if SOURCE_DEFAULT in text:
                cell["source"] = text.replace(SOURCE_DEFAULT, f'os.environ.get("ATTNLENS_SOURCE", "{source}")')
    nb.get("metadata", {}).pop("jupytext", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf8")
    return out


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
    if _with_outputs(app) and _executed(app, pagename).is_file():
        buttons.append({
            "type": "link",
            "text": "Notebook with outputs (.ipynb)",
            "tooltip": "Download this page as the build executed it: outputs and computed values in place, "
                       "to read in JupyterLab or Colab without running",
            "icon": "fas fa-book-open",
            "url": "../" * depth + f"{NOTEBOOKS_DIR}/{pagename}{OUTPUTS_SUFFIX}",
            "label": "download-notebook-outputs-button",
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
