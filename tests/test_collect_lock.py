"""The collection directory's lock (issue 19): the config check and config/index writes hold an flock on
DIR/.attnlens.lock with the owner's pid; a second writer with other settings cannot pass the check while the
first is between its check and its write; a dead owner's lock is taken over; a live writer's temp files stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attnlens import AttnlensError
from attnlens import _collect as collect_module
from attnlens._collect import LOCK_NAME, _claim, _clean_temps, _dir_lock, _host, _temp_name

pytest.importorskip("fcntl")

HOLDER = """
import sys
from pathlib import Path
from attnlens._collect import _dir_lock
with _dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test closes stdin
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (pids are not reused this fast)


@pytest.fixture
def holder(tmp_path):
    """A second process holding the directory's lock (the real attnlens lock) until released."""
    root = tmp_path / "feats"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield root, proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)


def test_a_live_writers_lock_is_waited_for_then_named(holder):
    root, proc = holder
    lock = root / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == proc.pid
    t0 = time.monotonic()
    with pytest.raises(AttnlensError, match=f"locked by process {proc.pid} on .*lock file {lock}"):
        with _dir_lock(root, timeout=0.3):
            pass
    assert time.monotonic() - t0 >= 0.3


def test_a_live_writers_temp_files_stay_and_a_dead_owners_lock_and_temps_go(holder):
    root, proc = holder
    shards = root / "shards"
    shards.mkdir(parents=True)
    live = shards / f".shard-000000.safetensors.tmp-{_host()}-{proc.pid}"
    dead = shards / f".shard-000001.safetensors.tmp-{_host()}-{_dead_pid()}"
    legacy = shards / f".shard-000002.safetensors.tmp-{_dead_pid()}"  # the name before hosts were in it
    mine = _temp_name(shards / "shard-000003.safetensors")
    for p in (live, dead, legacy, mine):
        p.write_bytes(b"in flight")
    assert sorted(_clean_temps(shards)) == sorted([dead, legacy, mine])
    assert live.exists()

    proc.stdin.close()  # the holder ends: its lock is free, its file still names it
    proc.wait(timeout=60)
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == proc.pid
    with _dir_lock(root, timeout=0.3) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # taken over at once
    assert _clean_temps(shards) == [live]


def test_two_writers_with_different_settings_cannot_both_pass_the_check(tmp_path, monkeypatch):
    """Forced interleaving: writer A is slowed between its config check and its config write; writer B (other
    settings) starts meanwhile. B must wait for A's lock and then fail on A's config, never write its own."""
    root = tmp_path / "feats"
    real = collect_module._atomic_write_text
    in_write = threading.Event()

    def slow(path, text):
        in_write.set()
        time.sleep(0.5)
        real(path, text)

    monkeypatch.setattr(collect_module, "_atomic_write_text", slow)
    results = {}

    def writer(name, config):
        try:
            _claim(root, config, {"format": collect_module.FORMAT, "collect": config})
            results[name] = "ok"
        except AttnlensError as exc:
            results[name] = str(exc)

    a = threading.Thread(target=writer, args=("a", {"steps": [0, 1]}))
    a.start()
    assert in_write.wait(timeout=30)
    b = threading.Thread(target=writer, args=("b", {"steps": [0]}))
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)
    assert results["a"] == "ok"
    assert "written by another configuration" in results["b"] and str(root / LOCK_NAME) in results["b"]
    assert json.loads((root / "config.json").read_text())["collect"] == {"steps": [0, 1]}
    _claim(root, {"steps": [0, 1]}, {"format": collect_module.FORMAT, "collect": {"steps": [0, 1]}})  # same: resumes
