"""The book's extension (book/_ext/attnlens_book.py) without a book build: the notebook with outputs pastes every
glued value into its Markdown (issue 21: chapters opened in JupyterLab or Colab show values, not raw roles).

The executed notebooks here are built the way myst-nb's ``glue`` writes them (IPython's display formatter, a
``scrapbook`` record per value, hidden values under a MIME prefix that myst-nb later moves to ``<page>.glue.json``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extension():
    spec = importlib.util.spec_from_file_location("attnlens_book", ROOT / "book" / "_ext" / "attnlens_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext = _extension()
PREFIX = "application/papermill.record/"  # myst-nb's GLUE_PREFIX for glue(..., display=False)


def glued(name: str, value, display: bool = False) -> dict:
    """The output cell myst_nb.glue(name, value, display) writes."""
    from IPython.core.formatters import format_display_data

    bundle, metadata = format_display_data(value)
    prefix = "" if display else PREFIX
    return {"output_type": "display_data", "data": {prefix + k: v for k, v in bundle.items()},
            "metadata": {**metadata, "scrapbook": {"name": name, "mime_prefix": prefix}}}


def notebook(markdown: list[str], outputs: list[dict]) -> dict:
    cells = [{"cell_type": "code", "source": "glue(...)", "metadata": {}, "execution_count": 1, "outputs": outputs}]
    cells += [{"cell_type": "markdown", "source": m, "metadata": {}} for m in markdown]
    return {"cells": cells, "metadata": {"jupytext": {"x": 1}}, "nbformat": 4, "nbformat_minor": 5}


FORMATS = [("0.123456", ".2f", "0.12"), ("0.5", "+.2f", "+0.50"), ("12", "d", "12"), ("12.0", ".0f", "12"),
           ("'star'", "", "star"), ("0.25", ".0%", "25%"), ("3", "", "3")]


def test_format_plain_text_formats_as_the_spec_says():
    assert [ext.format_plain_text(t, s) for t, s, _ in FORMATS] == [w for _, _, w in FORMATS]


def test_format_plain_text_is_myst_nbs():
    myst = pytest.importorskip("myst_nb.core.variables")  # in the book's environment: myst-nb's own function
    assert [myst.format_plain_text(t, s) for t, s, _ in FORMATS] == [w for _, _, w in FORMATS]


def test_glue_roles_are_pasted_with_their_values():
    from IPython.display import Markdown

    nb = notebook(
        ["Accuracy {glue:text}`acc:.2f`, shift {glue:text}`acc:+.3f`, raw {glue:text}`acc`.",
         "We collected {glue}`n` generations at {glue:md}`sites`; plain {glue}`sites` and {glue:any}`n`.",
         "Untouched: `code`, {cite:p}`liu2024towards`, and a literal ``{glue}`` mention."],
        [glued("acc", 0.87654), glued("n", 48, display=True), glued("sites", Markdown("`down.0` and `mid.0`"))])
    # myst-nb moves hidden values out of the notebook into <page>.glue.json
    hidden = {o["metadata"]["scrapbook"]["name"]: {**o, "data": {k[len(PREFIX):]: v for k, v in o["data"].items()}}
              for o in nb["cells"][0]["outputs"] if o["metadata"]["scrapbook"]["mime_prefix"]}
    nb["cells"][0]["outputs"] = [o for o in nb["cells"][0]["outputs"] if not o["metadata"]["scrapbook"]["mime_prefix"]]
    data = ext.glue_data(nb, hidden)
    assert set(data) == {"acc", "n", "sites"} and "text/markdown" in data["sites"]
    md = [c["source"] for c in ext.paste_glue(nb, data, "p")["cells"][1:]]
    assert md[0] == "Accuracy 0.88, shift +0.877, raw 0.87654."
    assert md[1] == "We collected 48 generations at `down.0` and `mid.0`; plain `down.0` and `mid.0` and 48."
    assert md[2] == "Untouched: `code`, {cite:p}`liu2024towards`, and a literal ``{glue}`` mention."


@pytest.mark.parametrize("markdown, message", [
    ("{glue:text}`missing:.2f`", r"p: \{glue:text\}`missing:.2f`: no value glued as 'missing' \(glued: acc, title\)"),
    ("{glue}`missing`", "no value glued as 'missing'"),
    ("{glue:md}`acc`", "'acc' has no text/markdown"),
    ("{glue:text}`title:.2f`", "cannot format"),
    ("{glue}`other.md::acc`", "from another page"),
    ("```{glue:figure} acc\n```", "glue directive"),
])
def test_an_unpasteable_role_fails_the_build_naming_it(markdown, message):
    nb = notebook([markdown], [glued("acc", 0.5, display=True), glued("title", "a red star", display=True)])
    with pytest.raises(ext.GlueError, match=message):
        ext.paste_glue(nb, ext.glue_data(nb), "p")


def test_the_outputs_notebook_is_written_from_myst_nbs_files(tmp_path):
    """From jupyter_execute/<page>.ipynb and <page>.glue.json: values pasted, outputs kept, install source set."""
    from IPython.display import Markdown

    nb = notebook(["Best {glue:text}`acc:.1%` at {glue:md}`site`."], [glued("acc", 0.756, display=True)])
    nb["cells"].insert(0, {"cell_type": "code", "metadata": {}, "execution_count": 0, "outputs": [],
                           "source": f"ATTNLENS_SOURCE = {ext.SOURCE_DEFAULT}\nprint(1)"})
    nb["cells"][1]["outputs"].append({"output_type": "stream", "name": "stdout", "text": "kept\n"})
    executed = tmp_path / "jupyter_execute" / "book" / "05_probing.ipynb"
    executed.parent.mkdir(parents=True)
    executed.write_text(json.dumps(nb))
    site = glued("site", Markdown("`mid.0`"))
    site["data"] = {k[len(PREFIX):]: v for k, v in site["data"].items()}
    executed.with_name("05_probing.glue.json").write_text(json.dumps({"site": site}))
    out = ext.write_outputs_notebook(executed, tmp_path / "html" / "_notebooks" / "book" / "05_probing.outputs.ipynb",
                                     "book/05_probing", source="attnlens[book] @ git+https://example.org/a.git@main")
    written = json.loads(out.read_text())
    assert written["cells"][2]["source"] == "Best 75.6% at `mid.0`."
    assert written["cells"][1]["outputs"][-1]["text"] == "kept\n" and "jupytext" not in written["metadata"]
    assert 'os.environ.get("ATTNLENS_SOURCE", "attnlens[book] @ git+https://example.org/a.git@main")' in \
        written["cells"][0]["source"]
    assert "{glue" not in out.read_text()


def test_plotly_figures_get_plotlys_own_mime_type_for_jupyterlab():
    """The build's figures are HTML without plotly.js (the site loads it once); the outputs notebook also gives
    each the figure itself, read back from its Plotly.newPlot call, with its frames."""
    import plotly.graph_objects as go
    from plotly.io import to_html

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]), frames=[go.Frame(data=[go.Scatter(y=[5, 6])], name="f1")])
    fig.update_layout(title="shape from the map")
    html = to_html(fig, include_plotlyjs=False, full_html=False, include_mathjax=False)
    nb = notebook([], [{"output_type": "display_data", "metadata": {}, "data": {"text/html": html}},
                       {"output_type": "display_data", "metadata": {}, "data": {"text/html": "<b>no figure</b>"}}])
    assert ext.plotly_json(nb) == 1
    first, second = (o["data"] for o in nb["cells"][0]["outputs"])
    figure = first[ext.PLOTLY_MIME]
    assert figure["data"][0]["y"] == [3, 4] and figure["layout"]["title"]["text"] == "shape from the map"
    assert [f["name"] for f in figure["frames"]] == ["f1"] and first["text/html"] == html
    assert ext.PLOTLY_MIME not in second and ext.plotly_json(nb) == 0  # once only
