"""benchmarks/book_build_time.py without running a chapter: its cell timing, its busy core and its pages."""

from __future__ import annotations

import pytest

from benchmarks import book_build_time as bbt


def test_cell_seconds_from_nbclient_timing():
    cell = {"metadata": {"execution": {"iopub.execute_input": "2026-12-01T02:00:00.000000Z",
                                       "shell.execute_reply": "2026-12-01T02:01:02.500000Z"}}}
    assert bbt._cell_seconds(cell) == pytest.approx(62.5)
    assert bbt._cell_seconds({"metadata": {}}) is None


def test_busy_core_runs_only_inside_its_block():
    with bbt.BusyCore() as busy:
        assert busy.proc.poll() is None
    assert busy.proc.poll() is not None


def test_pages_are_the_executable_toc_entries_and_bad_input_is_refused():
    pages = [p for p in bbt.toc_pages() if bbt.is_executable(bbt.page_file(p))]
    assert "book/02_unet_anatomy" in pages and "book/index" not in pages
    with pytest.raises(SystemExit, match="no page book/nope"):
        bbt.page_file("book/nope")
    with pytest.raises(SystemExit):
        bbt.main(["--modes", "sometimes", "--pages", "book/02_unet_anatomy"])
