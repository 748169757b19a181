"""The book's sources and, when a build exists, its HTML.

Chapters are MyST Markdown notebooks in book/ and lab notebooks in notebooks/; every one must be in
_toc.yml, have the course's sections, load its model through the one switch, keep no outputs, and take
every number in its prose from the build (glue), not from the keyboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scripts import check_book

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
TOC = ROOT / "_toc.yml"


def pages() -> list[Path]:
    return sorted(ROOT.glob("book/*.md")) + sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("notebooks/*.md"))


def text_cells(path: Path) -> tuple[str, list[str]]:
    """(markdown prose, code cells) of a chapter or lab."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        md = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        return md, code
    text = path.read_text()
    code = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S), flags=re.S)
    return prose, code


def is_notebook(path: Path) -> bool:
    return path.suffix == ".ipynb" or "kernelspec:" in path.read_text().split("\n---", 1)[0]


NOTEBOOKS = [p for p in pages() if is_notebook(p)]


def test_toc_lists_every_page_and_only_existing_ones():
    listed = check_book.toc_pages(TOC)
    on_disk = {str(p.relative_to(ROOT).with_suffix("")) for p in pages()}
    assert sorted(on_disk - set(listed)) == [], "pages missing from _toc.yml"
    missing = [p for p in listed if not any((ROOT / f"{p}{ext}").exists() for ext in (".md", ".ipynb"))]
    assert missing == [], "_toc.yml lists files that do not exist"
    assert len(set(listed)) == len(listed), "a page is listed twice"


def test_toc_is_a_course_with_parts():
    toc = yaml.safe_load(TOC.read_text())
    assert toc["format"] == "jb-book" and toc["parts"]
    assert all(part.get("caption") and part.get("chapters") for part in toc["parts"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_the_course_sections(path):
    prose, code = text_cells(path)
    headings = [h.strip().lower() for h in re.findall(r"^##\s+(.+)$", prose, flags=re.M)]
    for required in ("what you will learn", "set-up", "summary", "exercises"):
        assert required in headings, f"{path.name}: no '## {required}' section"
    assert headings.index("what you will learn") < headings.index("set-up") < headings.index("summary") < headings.index("exercises")
    exercises = prose.split("## Exercises", 1)[1]
    n_solutions = exercises.count(":::{dropdown} Solution") + exercises.count("<summary>Solution</summary>")
    assert n_solutions >= 1, f"{path.name}: exercises without a hidden solution"
    assert re.search(r"^\s*1\.\s", exercises, flags=re.M), f"{path.name}: no numbered exercise"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_set_up_uses_the_one_model_switch(path):
    _, code = text_cells(path)
    setup = code[0]
    assert "viz.setup_notebook()" in setup, f"{path.name}: the set-up cell must call viz.setup_notebook()"
    assert "attnlens.load_pipeline()" in setup, f"{path.name}: load the model with load_pipeline() (ATTNLENS_MODEL picks it)"
    assert not re.search(r"load_pipeline\([^)]", "\n".join(code)), f"{path.name}: load_pipeline with an argument"


CHAPTERS = [p for p in NOTEBOOKS if p.parent.name == "book"]
LEVELS = ("easy", "medium", "hard")


def exercise_items(path: Path) -> list[tuple[int, str, str]]:
    """``(number, level, text up to the next numbered exercise)`` of each exercise of a chapter."""
    text = path.read_text().split("\n## Exercises\n", 1)[1]
    starts = list(re.finditer(r"^(\d+)\.\s+\*\*\[(\w+)\]", text, flags=re.M))
    return [(int(m[1]), m[2], text[m.start():(starts[i + 1].start() if i + 1 < len(starts) else len(text))])
            for i, m in enumerate(starts)]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_graded_exercises_with_an_implement_it_one(path):
    """Every numbered exercise carries a level, easy to hard; at least one is 'Implement it': a stub that raises
    NotImplementedError and is checked by this chapter's checker, then a hidden cell running it on the solution."""
    import attnlens_exercises

    text = path.read_text().split("\n## Exercises\n", 1)[1]
    numbered = re.findall(r"^(\d+)\.\s", text, flags=re.M)
    items = exercise_items(path)
    assert [n for n, _, _ in items] == [int(n) for n in numbered] == list(range(1, len(numbered) + 1)), \
        f"{path.name}: every numbered exercise starts with its level, **[easy]**, **[medium]** or **[hard]**"
    assert all(level in LEVELS for _, level, _ in items), f"{path.name}: levels are {LEVELS}"
    ranks = [LEVELS.index(level) for _, level, _ in items]
    assert ranks == sorted(ranks), f"{path.name}: exercises go from easy to hard"
    chapter = str(path.relative_to(ROOT).with_suffix(""))
    own = {name for name, ch in attnlens_exercises.CHECKERS.items() if ch == chapter}
    implement = [body for _, _, body in items if "Implement it" in body.split("\n", 1)[0]]
    assert implement, f"{path.name}: no 'Implement it' exercise"
    for body in implement:
        cells = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", body, flags=re.S)
        assert len(cells) >= 2, f"{path.name}: an implement-it exercise needs a stub cell and a solution cell"
        stub, solution = cells[0], cells[-1]
        called = set(re.findall(r"^(check_\w+)\(", stub, flags=re.M))
        assert called and called <= own, f"{path.name}: the stub must call this chapter's checker ({sorted(own)})"
        assert "raise NotImplementedError" in stub and ":tags:" not in stub.split("\n", 1)[0]
        assert solution.startswith(":tags: [hide-cell]"), f"{path.name}: the solution cell is hidden"
        assert re.search(rf"^({'|'.join(called)})\(solutions\.\w+\)", solution, flags=re.M), \
            f"{path.name}: the hidden cell must run the checker on the reference solution"
        assert ":::{dropdown} Solution" in body


def test_every_checker_belongs_to_a_chapter_that_uses_it():
    import attnlens_exercises

    for name, chapter in attnlens_exercises.CHECKERS.items():
        assert f"{name}(solutions." in (ROOT / f"{chapter}.md").read_text(), f"{chapter} does not run {name}"


def test_level_check_catches_an_unmarked_exercise(tmp_path):
    page = tmp_path / "ch.md"
    page.write_text("# T\n\n## Exercises\n\n1. **[easy]** One.\n\n2. Two, no level.\n")
    items = exercise_items(page)
    assert [n for n, _, _ in items] == [1]   # the unmarked second exercise is not counted, so the test above fails


@pytest.mark.parametrize("path", [p for p in pages() if p.suffix == ".ipynb"], ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name} has outputs"
    assert "widgets" not in nb["metadata"], f"{path.name} carries saved widget state"


# Numbers that may appear in prose: model and paper names, dtypes, list markers, and the definitional 0 and 1
# ("sums to 1", "from 0 to 1"). Everything else must come from a {glue} role.
ALLOWED = re.compile(r"\b(?:fp|bf|float)(?:16|32)\b|(?:SD|Stable Diffusion|diffusers)\s*\d(?:\.\d)?|CVPR \d{4}|\b(?:19|20)\d{2}\b|Lab \d|\b[01]\b|^\s*\d+\.\s",
                     re.M)


def prose_numbers(prose: str) -> list[str]:
    text = re.sub(r"\$\$.*?\$\$(?:\s*\([\w-]+\))?|\$[^$\n]+\$", "", prose, flags=re.S)  # math (and labels): notation
    text = re.sub(r"\{glue(?::\w+)?\}`[^`]*`", "", text)    # glued values
    text = re.sub(r"`[^`]*`", "", text)                      # inline code
    text = re.sub(r"\]\([^)]*\)|<[^>]+>|\{doc\}`[^`]*`", "", text)  # link targets, HTML tags
    text = re.sub(r"^#+ .*$", "", text, flags=re.M)          # headings
    text = ALLOWED.sub("", text)
    return re.findall(r"[^\s]*\d[^\s]*", text)


def test_prose_number_check_catches_typed_numbers():
    assert prose_numbers("The map covers 12.5% of the image.") == ["12.5%"]
    assert prose_numbers("It has {glue}`n_layers` layers on a 4x4 grid.") == ["4x4"]
    assert prose_numbers("Stable Diffusion 1.5 rows sum to 1, see `cache[0, 3]`.\n1. An exercise") == []
    assert prose_numbers("The share $\\tau_c N$ of steps, $$x = 2y$$ (eq), and 80% of them.") == ["80%"]


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.name)
def test_no_number_typed_by_hand_in_prose(path):
    prose, _ = text_cells(path)
    assert prose_numbers(prose) == [], f"{path.name}: numbers in prose must come from glue"


def test_remote_load_check_catches_cdn_scripts_and_stylesheets():
    page = ('<script src="https://cdn.example/x.js"></script><script src="../_static/y.js"></script>'
            '<link rel="stylesheet" href="//fonts.example/css"><link rel="canonical" href="https://a.example/">'
            '<a href="https://github.com">ok</a>')
    assert check_book.remote_loads(page) == ["<script> https://cdn.example/x.js", "<link> //fonts.example/css"]


def test_plotly_check_wants_one_site_copy_and_no_inlined_bundle(tmp_path):
    figure = '<div class="plotly-graph-div" id="x"></div>'
    (tmp_path / "_static").mkdir()
    page = tmp_path / "p.html"
    assert check_book.plotly_problems("<p>no figure</p>", page, tmp_path) == []
    assert check_book.plotly_problems(figure, page, tmp_path) == [
        "has a plotly figure but does not load _static/plotly.min.js"]
    loads = '<script src="_static/plotly.min.js?v=1"></script>' + figure
    assert check_book.plotly_problems(loads, page, tmp_path) == ["_static/plotly.min.js is missing from the build"]
    (tmp_path / "_static" / "plotly.min.js").write_text("x")
    assert check_book.plotly_problems(loads, page, tmp_path) == []
    inlined = "<script>/**\n* plotly.js v3.1.0\n* Copyright</script>" + loads
    assert check_book.plotly_problems(inlined, page, tmp_path) == [
        "inlines plotly.js (figures must use the site's _static/plotly.min.js)"]


def test_notebook_check_wants_every_offered_notebook_and_no_raw_glue(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "_notebooks" / "book").mkdir(parents=True)
    page = tmp_path / "book" / "p.html"
    links = ('<a href="../_notebooks/book/p.ipynb">n</a><a href="../_notebooks/book/p.outputs.ipynb">o</a>'
             '<a href="../_notebooks/book/p.ipynb">again</a>')
    assert check_book.notebook_problems(links, page) == [
        "offers ../_notebooks/book/p.ipynb but the build has no such notebook",
        "offers ../_notebooks/book/p.outputs.ipynb but the build has no such notebook"]
    (tmp_path / "_notebooks" / "book" / "p.ipynb").write_text("{}")
    nb = {"cells": [{"cell_type": "markdown", "source": ["Accuracy {glue:text}`acc:.2f` and ", "{glue}`n`."]},
                    {"cell_type": "code", "source": "glue('acc', 0.5)"}]}
    (tmp_path / "_notebooks" / "book" / "p.outputs.ipynb").write_text(json.dumps(nb))
    assert check_book.notebook_problems(links, page) == [
        "../_notebooks/book/p.outputs.ipynb shows 2 raw glue role(s) (first: {glue:text}`...)"]
    nb["cells"][0]["source"] = "Accuracy 0.50 and 3."
    (tmp_path / "_notebooks" / "book" / "p.outputs.ipynb").write_text(json.dumps(nb))
    assert check_book.notebook_problems(links, page) == []


BUILT = sorted((ROOT / "_build" / "html").rglob("*.html"))


@pytest.mark.skipif(not BUILT, reason="no book build in _build/html (scripts/book.sh makes one)")
def test_built_html_loads_nothing_from_the_network():
    bad = {str(p.relative_to(ROOT)): check_book.remote_loads(p.read_text(errors="replace")) for p in BUILT}
    assert {k: v for k, v in bad.items() if v} == {}


def test_results_dir_finds_the_record_and_names_what_is_missing(tmp_path, monkeypatch):
    from attnlens import viz

    assert (viz.results_dir("shapes_quality.json") / "shapes_quality.json").is_file()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"benchmarks/results/no_such_record\.json not found"):
        viz.results_dir("no_such_record.json")
