"""Capture's memory: the budget bounds the measured peak, and chunked reduction gives the same maps.

The peak is measured, not assumed: every call of the capture hook runs under ``torch.profiler`` with
``profile_memory=True`` (CPU), whose allocation and free events give the bytes the hook holds at each moment;
the capture's peak is the largest ``kept before the call + held during the call``. Chunks are made tiny
(``_CHUNK_ELEMENTS`` patched) so that even the tiny pipeline's maps span many chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from attnlens import AttnlensError, capture
from attnlens import _capture, _hooks

STEPS = 2


def run(pipe, steps=STEPS):
    return pipe("a red star", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")


def _held_peak(fn) -> int:
    """The largest number of bytes allocated and not yet freed while ``fn()`` runs (CPU allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def _kept(cache) -> int:
    return sum(m.untyped_storage().nbytes() for m in {id(m): m for m in cache.maps.values()}.values())


@pytest.fixture
def measure(monkeypatch):
    """Patch the hook to measure; collects the peak, the recorder and the largest working set of one call (what it
    held at most, less what it keeps)."""
    out = {"peak": 0, "call": 0, "recorder": None}
    original = _capture._Recorder.on_attention

    def on_attention(self, *args, **kwargs):
        out["recorder"] = self
        before = _kept(self.cache)
        call = _held_peak(lambda: original(self, *args, **kwargs))
        out["peak"] = max(out["peak"], before + call)
        out["call"] = max(out["call"], call - (_kept(self.cache) - before))  # less the map this call keeps

    monkeypatch.setattr(_capture._Recorder, "on_attention", on_attention)
    return out


@pytest.fixture
def measured(monkeypatch, measure):
    """:func:`measure` with chunks of 512 scores."""
    monkeypatch.setattr(_hooks, "_CHUNK_ELEMENTS", 512)
    return measure


CASES = [
    dict(kind="self", heads="all", branch="both"),
    dict(kind="self", heads="all", store_resolution=4),
    dict(kind="self", heads="mean", store_resolution=3, reduce="mean"),
    dict(kind="cross", heads="all", reduce="sum", dtype=torch.float16),
    dict(kind="self", heads="all", reduce="sum", store_resolution=4, branch="both"),
]


@pytest.mark.parametrize("kwargs", CASES, ids=[str(i) for i in range(len(CASES))])
def test_the_budget_bounds_the_measured_peak(pipe, measured, kwargs):
    with capture(pipe, **kwargs) as cache:
        run(pipe)
    rec = measured["recorder"]
    kept, work = rec.memory()
    assert kept == _kept(cache)  # stored maps counted exactly: fp32 running sums with reduce, whatever dtype
    assert 0 < measured["peak"] <= kept + work
    assert measured["call"] <= work
    # and it stays below one full-size fp32 map of the largest layer's selection (which concatenating the chunks
    # into a full map before pooling or reducing held on its own, on top of the chunks)
    def full_map(info):
        h, w = info.grid(rec.clock.latent_hw)
        return len(rec.rows) * (info.heads if kwargs["heads"] == "all" else 1) * h * w * (77 if info.kind == "cross" else h * w) * 4

    full = max(full_map(info) for info in rec.chosen)
    assert measured["call"] < full


@pytest.mark.parametrize("method", ["cross", "p2p"])
def test_the_budget_bounds_the_peak_inside_an_edit_with_map_edits(pipe, measured, method):
    """With map edits in force every row and head is computed (edits mix rows): still within the estimate."""
    from attnlens import edit

    options = {"self_max_resolution": 8} if method == "p2p" else {}  # p2p also copies self-attention maps
    r = edit(pipe, "a red star", "a blue star", method=method, num_inference_steps=STEPS,
             capture=dict(heads="all", prompts=[0, 1], layers="*"), **options)
    rec = measured["recorder"]
    kept, work = rec.memory()
    assert r.cache is rec.cache and kept == _kept(r.cache)
    assert 0 < measured["peak"] <= kept + work and measured["call"] <= work


def test_a_tight_budget_shrinks_the_chunks_and_still_bounds_the_peak(pipe, monkeypatch, measure):
    monkeypatch.setattr(_capture, "_MIN_CHUNK", 256)
    kwargs = dict(kind="self", heads="all", branch="both")
    with capture(pipe, **kwargs):
        run(pipe)
    rec = measure["recorder"]
    kept, work = rec.memory()
    small = rec.memory(256)[1]
    assert rec.chunk is None and small < work  # the default chunks hold a whole layer here; 256-score chunks less
    measure["peak"] = 0
    with capture(pipe, budget=kept + small, **kwargs):
        run(pipe)
    assert measure["recorder"].chunk is not None and measure["peak"] <= kept + small
    with pytest.raises(AttnlensError, match="over the budget"):  # below what is kept, no chunk size helps
        with capture(pipe, budget=kept - 1, **kwargs):
            run(pipe)


def test_reduce_counts_fp32_sums_in_the_budget(pipe):
    """An fp16 reduce="sum" capture keeps fp32 sums: a budget that fits the fp16 size but not the fp32 one fails."""
    with capture(pipe, kind="cross", reduce="sum", dtype=torch.float16) as cache:
        run(pipe)
    fp32 = _kept(cache)
    with pytest.raises(AttnlensError, match="fp32 running sums.*store_resolution=16"):
        with capture(pipe, kind="cross", reduce="sum", dtype=torch.float16, budget=fp32 // 2 + 1):
            run(pipe)


@pytest.mark.parametrize("side", [4, 3])
def test_chunked_pooling_equals_pooling_the_full_map(pipe, monkeypatch, side):
    """Pooled and reduced chunk by chunk (tiny chunks, overlapping bins for side 3) equals pooling the full map."""
    with capture(pipe, kind="self", heads="all", dtype=torch.float32) as full:
        run(pipe)
    monkeypatch.setattr(_hooks, "_CHUNK_ELEMENTS", 512)
    with capture(pipe, kind="self", heads="all", dtype=torch.float32, store_resolution=side) as pooled, \
            capture(pipe, kind="self", heads="all", store_resolution=side, reduce="mean") as mean:
        run(pipe)
    for name in pooled.layers:
        acc = 0
        for step in range(STEPS):
            m = full[name, step]  # (n, heads, h, w, h*w)
            n, hd, h, w, _ = m.shape
            g = (max(1, h * side // max(h, w)), max(1, w * side // max(h, w))) if max(h, w) > side else (h, w)
            keys = F.adaptive_avg_pool2d(m.reshape(-1, 1, h, w), g).reshape(n, hd, h, w, -1) * (h * w / (g[0] * g[1]))
            q = F.adaptive_avg_pool2d(keys.permute(0, 1, 4, 2, 3).reshape(-1, 1, h, w), g)
            expect = q.reshape(n, hd, -1, *g).permute(0, 1, 3, 4, 2)
            torch.testing.assert_close(pooled[name, step], expect, atol=1e-6, rtol=1e-5)
            acc = acc + expect
        torch.testing.assert_close(mean[name, None], acc / STEPS, atol=1e-6, rtol=1e-5)
