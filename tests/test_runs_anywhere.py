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
