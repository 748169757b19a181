"""Time the book's build per chapter, on an idle machine and with one core held by another program.

Each page of _toc.yml (or --pages) is converted as the build converts it (jupytext: MyST Markdown ->
notebook) and executed as the build executes it (nbclient, a fresh kernel per page, run in the page's
folder, ``$ATTNLENS_BOOK_BUILD`` set, ``$ATTNLENS_THREADS`` from --threads); its wall time and each
code cell's seconds are recorded (cells numbered from 1, the longest also named by its first line).
Mode ``busy`` first starts one busy-loop process (a pure-Python ``while True``) that holds one core
for the whole mode, then stops it. ``--build`` also times one whole
``jupyter-book build --all`` (every chapter executed, no cache) per mode into a temporary folder.

Targets this checks (issue 21): the whole book in at most 600 s on 2 idle cores; no cell longer than
about a minute (``--cell-limit``, default 60 s); with one core busy, each page slows by a factor the
record states (``slowdown``), which the thread setting is meant to keep near the share of the machine
the busy program takes, not 10x.

Run it on an otherwise idle machine (the timings mean nothing under other load); it writes
benchmarks/results/book_build_time.json (or --out):

    .venv-book/bin/python -m benchmarks.book_build_time                      # every page, idle and busy
    .venv-book/bin/python -m benchmarks.book_build_time --build              # + whole-build times
    .venv-book/bin/python -m benchmarks.book_build_time --pages book/02_unet_anatomy --modes idle --out /tmp/t.json
    ATTNLENS_THREADS=2 .venv-book/bin/python -m benchmarks.book_build_time  # or --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "book_build_time.json"
MODES = ("idle", "busy")


def toc_pages() -> list[str]:
    """The pages of _toc.yml in order (without extension), through scripts/check_book.py's reader."""
    from scripts.check_book import toc_pages as read_toc

    return read_toc(ROOT / "_toc.yml")


def page_file(page: str) -> Path:
    for ext in (".md", ".ipynb"):
        path = ROOT / f"{page}{ext}"
        if path.is_file():
            return path
    raise SystemExit(f"book_build_time: no page {page}.md or {page}.ipynb (pages are _toc.yml entries, e.g. book/02_unet_anatomy)")


def is_executable(path: Path) -> bool:
    return path.suffix == ".ipynb" or "kernelspec:" in path.read_text().split("\n---", 1)[0]


def _cell_seconds(cell) -> float | None:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def time_page(path: Path, timeout: int, env: dict[str, str]) -> dict:
    """Execute one page in a fresh kernel; wall seconds, longest cell, and whether it failed."""
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(path)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the environment of this process
    error = None
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as exc:  # the page fails: recorded, never a silent skip
        error = str(exc).strip().splitlines()[-1][:300]
    except Exception as exc:  # a timeout or a dead kernel
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        seconds = time.perf_counter() - t0
        os.environ.clear()
        os.environ.update(saved)
    code = [c for c in nb.cells if c.cell_type == "code"]
    timed = [(k, _cell_seconds(c), c.source.strip().splitlines()[0][:80] if c.source.strip() else "")
             for k, c in enumerate(code, start=1)]
    timed = [t for t in timed if t[1] is not None]
    longest = max(timed, key=lambda t: t[1]) if timed else (None, None, None)
    return {"seconds": round(seconds, 2), "code_cells": len(code), "longest_cell": longest[0],
            "longest_cell_starts": longest[2], "longest_cell_s": None if longest[1] is None else round(longest[1], 2),
            "cell_seconds": [round(t[1], 2) for t in timed], "error": error}


def time_build(env: dict[str, str], timeout: int) -> dict:
    """One whole ``jupyter-book build --all`` (every chapter executed, no cache) into a temporary folder."""
    jb = Path(sys.executable).with_name("jupyter-book")
    out = Path(tempfile.mkdtemp(prefix="attnlens-book-time-"))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(jb), "build", str(ROOT), "--all", "-W", "-n", "--keep-going", "--path-output", str(out)],
                              env={**os.environ, **env, "ATTNLENS_BOOK_EXECUTE": "force"}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(seconds, 1), "exit_status": status}


class BusyCore:
    """One process spinning on one core for as long as the context lasts."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it get scheduled
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", nargs="+", default=None, help="_toc.yml entries to time (default: every executable page)")
    ap.add_argument("--modes", default="idle,busy", help="comma-separated: idle, busy (default both)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the kernels ($ATTNLENS_THREADS; default: attnlens.set_threads' choice)")
    ap.add_argument("--build", action="store_true", help="also time one whole jupyter-book build per mode")
    ap.add_argument("--timeout", type=int, default=900, help="seconds a cell may take before the page counts as failed")
    ap.add_argument("--cell-limit", type=float, default=60.0, help="the longest a cell should take (s), reported")
    ap.add_argument("--book-limit", type=float, default=600.0, help="the longest the whole book should take idle (s)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    pages = args.pages or [p for p in toc_pages() if is_executable(page_file(p))]
    files = {p: page_file(p) for p in pages}
    from attnlens._notebook import default_threads

    threads = args.threads or default_threads()
    env = {"ATTNLENS_BOOK_BUILD": "1", "ATTNLENS_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    record: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "commit": _git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "threads": threads, "cell_limit_s": args.cell_limit, "book_limit_s": args.book_limit,
        "modes": {},
    }
    try:
        import torch

        record["machine"]["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    for mode in modes:
        print(f"--- {mode} ({threads} torch thread(s)){'; one core held by a busy loop' if mode == 'busy' else ''}")
        result: dict = {"pages": {}}
        with BusyCore() if mode == "busy" else _Nothing():
            for page, path in files.items():
                res = time_page(path, args.timeout, env)
                result["pages"][page] = res
                flag = " FAILED: " + res["error"] if res["error"] else ""
                print(f"{page:45s} {res['seconds']:8.1f} s, longest cell {res['longest_cell_s']} s{flag}", flush=True)
            if args.build:
                result["build"] = time_build(env, timeout=max(args.timeout, 3 * int(args.book_limit)))
                print(f"whole build: {result['build']}")
        result["total_s"] = round(sum(r["seconds"] for r in result["pages"].values()), 1)
        result["slow_cells"] = {p: r["longest_cell_s"] for p, r in result["pages"].items()
                                if r["longest_cell_s"] is not None and r["longest_cell_s"] > args.cell_limit}
        result["failed"] = [p for p, r in result["pages"].items() if r["error"]]
        record["modes"][mode] = result
        print(f"{mode}: {result['total_s']} s over {len(files)} page(s)")
    if {"idle", "busy"} <= set(record["modes"]):
        idle, busy = record["modes"]["idle"]["pages"], record["modes"]["busy"]["pages"]
        record["slowdown"] = {p: round(busy[p]["seconds"] / idle[p]["seconds"], 2) for p in files if idle[p]["seconds"] > 0}
    if "idle" in record["modes"] and args.pages is None:
        record["book_within_limit"] = record["modes"]["idle"]["total_s"] <= args.book_limit
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(r["failed"] for r in record["modes"].values()) else 0


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    sys.exit(main())
