"""Fixtures shared by the test modules: tiny, offline, seeded.

- ``pipe``: a random SD 1.x-shaped pipeline (:func:`attnlens._testing.tiny_pipeline`, seed 0), one per module;
- ``saved``: that pipeline written by ``save_pretrained`` (safetensors) to a folder, one per module;
- ``copy``: a fresh copy of ``saved`` per test, free to damage.

A module that needs another pipeline (``tests/test_cuda.py``: fp16 on the GPU) defines its own ``pipe``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnlens._testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def pytest_collection_modifyitems(config, items):
    """Diffusion transformers need a newer diffusers than UNets (``attnlens._dit.MIN_DIFFUSERS``): under an older
    one (scripts/test_oldest.sh) their tests and doctests are skipped, and tests/test_dit.py checks the clear error."""
    from attnlens._dit import MIN_DIFFUSERS, _diffusers_version

    if _diffusers_version() >= MIN_DIFFUSERS:
        return
    skip = pytest.mark.skip(reason=f"diffusion transformers need diffusers >= {MIN_DIFFUSERS}")
    for item in items:
        if ("needs_dit_diffusers" in item.keywords and "dit_version_check" not in item.keywords) or item.name.startswith(
                ("attnlens._dit.", "attnlens._joint.", "attnlens._concepts.", "attnlens._testing.tiny_sd3", "attnlens._testing.tiny_flux",
                 "attnlens._testing.tiny_pixart", "attnlens._testing.t5_style")):
            item.add_marker(skip)

