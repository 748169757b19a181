"""The repository and the package work outside a clone: no symbolic links in the repository (they break
checkouts on Windows), and the embedded model's tokenizer files are real copies of the package's own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_symlinks() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.split("\t", 1)[1] for line in out.splitlines() if line.startswith("120000")]


def test_no_symbolic_links_in_the_repository():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert _tracked_symlinks() == []


def test_embedded_tokenizer_files_are_the_packages_own():
    from attnlens._pipeline import EMBEDDED_MODEL
    from attnlens._tokenizer import TOKENIZER_DIR

    for name in ("vocab.json", "merges.txt", "LICENSE"):
        f = EMBEDDED_MODEL / "tokenizer" / name
        assert f.is_file() and not f.is_symlink(), f
        assert f.read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_every_attnlens_package_is_listed_for_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ROOT.glob("attnlens*") if top.is_dir()
             for p in top.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "attnlens.results" in listed


@pytest.mark.slow
def test_wheel_ships_the_results_and_a_plain_install_finds_them(tmp_path):
    """A non-editable install, used from a folder outside the clone, finds every recorded result."""
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "w")], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("attnlens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recorded = [p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.suffix in (".json", ".csv", ".png")]
    assert recorded and {f"attnlens/results/{n}" for n in recorded} <= names
    assert not [n for n in names if n.startswith("benchmarks/") or (n.startswith("attnlens/results/") and n.endswith(".py"))]
    assert "attnlens/models/shapes/tokenizer/vocab.json" in names
    assert "attnlens/shapes/probestudy.py" in names  # chapter 5's recipe (benchmarks/probing_study.py is not shipped)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import attnlens, pathlib; from attnlens.shapes import probestudy; "
            "d = attnlens.results_dir('shapes_quality.json'); assert probestudy.balanced_scenes(4, 0); "
            "print(pathlib.Path(attnlens.__file__).parent, d)")
    out = subprocess.run([sys.executable, "-c", code], cwd=outside, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}).stdout.split()
    package, found = map(Path, out)
    assert package.is_relative_to(site) and found == package / "results", out


def _executable_pages() -> list[Path]:
    md = [p for p in sorted((ROOT / "book").glob("*.md")) if "kernelspec:" in p.read_text().split("\n---", 1)[0]]
    return md + sorted((ROOT / "notebooks").glob("*.ipynb"))


def _first_code_cell(path: Path) -> str:
    import json
    import re

    if path.suffix == ".ipynb":
        return next("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    return re.search(r"```\{code-cell\}[^\n]*\n(.*?)```", path.read_text(), flags=re.S).group(1)


@pytest.mark.parametrize("path", _executable_pages(), ids=lambda p: p.name)
def test_every_chapter_installs_attnlens_first_when_it_is_missing(path):
    """Colab or a fresh JupyterLab: the first cell installs attnlens before importing it, from
    $ATTNLENS_SOURCE (the book's _notebooks/ copies fill in the repository); never a guessed PyPI name."""
    cell = _first_code_cell(path)
    guard = cell.find('importlib.util.find_spec("attnlens") is None')
    assert guard != -1, f"{path.name}: the first cell must install attnlens when it is missing"
    assert guard < cell.find("import attnlens"), f"{path.name}: install before importing attnlens"
    assert 'os.environ.get("ATTNLENS_SOURCE", "")' in cell and '"pip", "install"' in cell


def test_the_install_cell_runs_and_names_what_to_set(tmp_path):
    """Without attnlens and without $ATTNLENS_SOURCE the cell stops with a message naming the variable."""
    import sys

    cell = _first_code_cell(ROOT / "book" / "02_unet_anatomy.md")
    install = cell[: cell.index("import numpy")]
    code = "import sys; sys.modules['attnlens'] = None\nimport importlib.util\nimportlib.util.find_spec = lambda name: None\n" + install
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "set ATTNLENS_SOURCE" in out.stderr, out.stderr


TOOLING = ("benchmarks", "tools", "scripts", "tests")  # the repository's folders, never in the wheel


def _code_cells(path: Path) -> list[str]:
    import json
    import re

    if path.suffix == ".ipynb":
        return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    return re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", path.read_text(), flags=re.S)


def _clone_only(source: str) -> tuple[list[str], list[str]]:
    """What a cell's code needs from a clone: ``(the repository tooling it imports or reads by path, the
    attnlens modules it imports)``. Magics (``%``, ``!``) are skipped; a cell's ``:tags:`` header is YAML."""
    import ast

    code = "\n".join("" if line.lstrip().startswith(("%", "!", ":")) else line for line in source.splitlines())
    reads, modules = [], []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            names = []
        reads += [n for n in names if n.split(".")[0] in TOOLING]
        modules += [n for n in names if n.split(".")[0] == "attnlens"]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split("/")[0] in TOOLING:
            reads.append(node.value)  # a path built from the clone's folders: ROOT / "benchmarks" / ...
        if isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "run_path"):
            reads.append(node.attr)  # a module loaded from a file path
    return reads, modules


def test_the_clone_finder_sees_each_way_of_reading_the_clone():
    source = ('import importlib.util\nspec = importlib.util.spec_from_file_location("s", ROOT / "benchmarks" / "x.py")\n'
              "from benchmarks import probing_study\nfrom attnlens.shapes import probestudy\n%matplotlib inline\n")
    reads, modules = _clone_only(source)
    assert sorted(reads) == ["benchmarks", "benchmarks", "benchmarks.probing_study", "spec_from_file_location"]
    assert modules == ["attnlens.shapes", "attnlens.shapes.probestudy"]
    assert _clone_only("x = RESULTS / 'probing_study.csv'  # benchmarks/results\n") == ([], [])


def _wheel_modules() -> set[str]:
    """Dotted names of every package and module the wheel ships (pyproject's package list, their .py files)."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = set(listed)
    for package in listed:
        folder = ROOT.joinpath(*package.split("."))
        found |= {f"{package}.{f.stem}" for f in folder.glob("*.py") if f.stem != "__init__"}
    return found


@pytest.mark.parametrize("path", _executable_pages(), ids=lambda p: p.name)
def test_every_chapter_runs_without_the_clones_tooling(path):
    """A chapter imports nothing from benchmarks/, tools/ or scripts/ and loads no file of them by path (a pip
    install has none of them), and every attnlens module it imports is in the wheel."""
    import importlib

    reads, modules = [], []
    for cell in _code_cells(path):
        r, m = _clone_only(cell)
        reads += r
        modules += m
    assert not reads, f"{path.name} needs the clone: {reads}"
    shipped = _wheel_modules()
    for name in modules:  # `from attnlens.shapes import X`: X a shipped module, or a name defined in a shipped one
        if name in shipped:
            continue
        package, _, attr = name.rpartition(".")
        is_module = ROOT.joinpath(*name.split(".")).with_suffix(".py").is_file() or ROOT.joinpath(*name.split(".")).is_dir()
        assert package in shipped and not is_module and hasattr(importlib.import_module(package), attr), \
            f"{path.name} imports {name}, which the wheel does not ship"


def test_chapter_5_uses_the_recipe_the_wheel_ships():
    """The probing chapter imports the study's recipe from the package (issue 21), not benchmarks/probing_study.py."""
    source = "\n".join(_code_cells(ROOT / "book" / "05_probing.md"))
    assert "from attnlens.shapes import probestudy" in source and "probing_study.py\"" not in source
    assert "attnlens.shapes.probestudy" in _wheel_modules()
    assert (ROOT / "attnlens" / "shapes" / "probestudy.py").is_file()
