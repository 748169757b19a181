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
