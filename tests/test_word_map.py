"""The default word-map aggregation (chosen by benchmarks/word_map_quality.py) and heads chosen on read."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnlens
from attnlens import AttentionCache, AttnlensError, capture

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red hexagon on the left"


def run(pipe, steps=2, seed=0):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def by_hand(cache, names, idx, heads=None):
    """Equal-weight mean over layers, steps and heads of the word's summed token columns, at the largest grid."""
    size = max(tuple(cache.layers[n].resolution) for n in names)
    acc, count = torch.zeros(size), 0
    for n in names:
        for s in cache.steps:
            m = cache[n, s][0].float()  # (heads, h, w, 77)
            m = (m if heads is None else m[heads]).mean(dim=0)[..., idx].sum(dim=-1)
            if tuple(m.shape) != size:
                m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            acc += m
            count += 1
    return acc / count


@pytest.fixture(scope="module")
def full(pipe):
    with capture(pipe, heads="all", dtype=torch.float32) as cache:
        run(pipe)
    return cache


def test_default_is_the_finest_captured_levels_layers_averaged(pipe, full):
    table = {i.name: i for i in attnlens.layers(pipe) if i.kind == "cross"}
    finest = min(i.level for i in table.values())
    assert full.word_map_layers() == [n for n, i in table.items() if i.level == finest]
    assert all(not n.startswith("mid.") for n in full.word_map_layers())  # the coarse mid block is left out
    idx = full.token_indices("hexagon")
    torch.testing.assert_close(full.word_map("hexagon"), by_hand(full, full.word_map_layers(), idx))
    # explicit layers: exactly those, equal weights (the mid block upsampled to the common grid)
    every = list(table)
    torch.testing.assert_close(full.word_map("hexagon", layers=every), by_hand(full, every, idx))


def test_default_word_maps_are_distributions_over_the_tokens(full):
    every_token = sum(full.word_map(i) for i in range(77))  # each position's maps sum to 1 over the 77 keys
    torch.testing.assert_close(every_token, torch.ones_like(every_token), atol=1e-4, rtol=0)
    heat = full.word_map("red")
    assert heat.min() >= 0 and heat.shape == tuple(full.layers[full.word_map_layers()[0]].resolution)


def test_default_follows_what_was_captured(pipe):
    with capture(pipe, layers="mid.*", kind="cross", dtype=torch.float32) as cache:  # only the coarsest level
        run(pipe)
    assert cache.word_map_layers() == ["mid.0.cross"]
    idx = cache.token_indices("red")
    torch.testing.assert_close(cache.word_map("red"), by_hand(cache, ["mid.0.cross"], idx))
    with capture(pipe, kind="self", layers="down.0.0.self") as selfonly:
        run(pipe)
    with pytest.raises(AttnlensError, match="no cross-attention layer was captured"):
        selfonly.word_map("red")


def test_heads_selected_on_read(pipe, full, tmp_path):
    name = full.word_map_layers()[0]
    n = full.layers[name].heads
    assert n > 1
    idx = full.token_indices("red")
    torch.testing.assert_close(full.word_map("red", heads=list(range(n))), full.word_map("red"))
    for heads in ([1], 1, [0, n - 1]):
        want = by_hand(full, full.word_map_layers(), idx, heads=[heads] if isinstance(heads, int) else heads)
        torch.testing.assert_close(full.word_map("red", heads=heads), want)
    assert not torch.allclose(full.word_map("red", heads=[0]), full.word_map("red", heads=[1]))
    back = AttentionCache.load(full.save(tmp_path / "c.safetensors"))
    torch.testing.assert_close(back.word_map("red", heads=[1]), full.word_map("red", heads=[1]))
    for bad, msg in (([n], r"head\(s\) \[%d\] out of range.*has %d heads" % (n, n)), ([], "non-empty list"),
                     ([0.5], "head index"), ("all", "head index"), (True, "head index")):
        with pytest.raises(AttnlensError, match=msg):
            full.word_map("red", heads=bad)


def test_heads_on_read_need_every_head_captured(pipe):
    with capture(pipe) as mean:  # heads="mean"
        run(pipe)
    with pytest.raises(AttnlensError, match=r"captured with heads='mean'.*heads='all'"):
        mean.word_map("red", heads=[0])
    with capture(pipe, heads=[0, 1]) as some:
        run(pipe)
    with pytest.raises(AttnlensError, match=r"captured with heads=\[0, 1\].*heads='all'"):
        some.word_map("red", heads=[0])
    assert some.word_map("red").shape == mean.word_map("red").shape  # reading without heads= still works


def test_recorded_benchmark_backs_the_default_and_its_docstring():
    from attnlens._identity import fingerprint
    from attnlens._pipeline import EMBEDDED_MODEL

    r = json.loads((ROOT / "benchmarks" / "results" / "word_map_quality.json").read_text())
    if (EMBEDDED_MODEL / "model_index.json").exists():
        assert r["model_fingerprint"] == fingerprint(EMBEDDED_MODEL), (
            "the embedded model changed since benchmarks/results/word_map_quality.json was recorded: rerun "
            "python -m benchmarks.word_map_quality and check word_map's default and docstring against it")
    assert r["n_scored"] >= 30 and r["chosen"] == "level 0"
    assert r["check"]["otsu"]["pass"] and r["check"]["half_max"]["pass"]
    assert r["chosen"] in r["library_word_map_equals"]  # the library's default is the chosen rule
    doc = AttentionCache.word_map.__doc__
    c = r["candidates"]
    for name in ("level 0", "DAAM-style", "all layers (former default)", "level 2"):
        assert f"{c[name]['otsu']['mean']:.3f}" in doc, name
    lo, hi = c["level 0"]["otsu"]["ci95"]
    assert f"{lo:.3f}-{hi:.3f}" in doc and f"{r['n_scored']} generations" in doc
