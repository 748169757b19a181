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
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import attnlens, pathlib; d = attnlens.results_dir('shapes_quality.json'); "
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
