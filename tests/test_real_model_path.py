"""The real-model path on SD 1.5's published configuration (meta device or random weights: shapes and
budgets, not quality): the chapters' captures fit the default budget, the architecture figure draws any
UNet, a real model is told apart from the Shapes model whose images the oracle reads, and on it the chapters
score edits with CLIP (a tiny random CLIPModel here)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import attnlens
from attnlens import viz
from attnlens._capture import DEFAULT_BUDGET

from test_architectures import SD15, SDXL, meta_unet


def sd15_meta():
    return types.SimpleNamespace(unet=meta_unet(SD15), vae_scale_factor=8)


def _bytes(pipe, items, steps, **fit):
    """What capture would check: the same estimate, for a full-size (512x512) SD 1.5 run."""
    from attnlens._capture import _MIN_CHUNK, _Recorder
    from attnlens._select import Selector

    sel = Selector(kind="self")
    chosen = sel.match(attnlens.layers(pipe))
    rec = _Recorder(sel, None, torch.float16, fit.get("reduce"), fit.get("store_resolution"), DEFAULT_BUDGET, chosen)
    rec.clock = types.SimpleNamespace(latent_hw=(64, 64), text_len=None)
    rec.steps, rec.rows, rec.batch = set(range(steps)), [None] * items, 2 * items
    return sum(rec.memory(_MIN_CHUNK))  # stored maps + the smallest working set capture shrinks its chunks to


@pytest.mark.parametrize("chapter, items, steps", [("04 self-attention", 3, 20), ("07 free-prompt editing", 2, 20)])
def test_chapter_captures_fit_the_default_budget_on_sd15(chapter, items, steps):
    pipe = sd15_meta()
    assert _bytes(pipe, items, steps) > DEFAULT_BUDGET, "the full capture no longer exceeds the budget: re-check the premise"
    fit = attnlens.capture_settings(pipe, kind="self", items=items, num_inference_steps=steps)
    assert fit == {"store_resolution": 32}, fit  # per-step maps kept (the chapters need them), grids pooled
    assert _bytes(pipe, items, steps, **fit) <= DEFAULT_BUDGET


def test_capture_settings_keep_full_maps_on_the_embedded_model():
    pipe = attnlens.load_pipeline()
    assert attnlens.capture_settings(pipe, kind="self", items=3, num_inference_steps=20) == {}
    assert attnlens.is_shapes_model(pipe)
    assert not attnlens.is_shapes_model(sd15_meta())


def test_capture_settings_say_when_nothing_fits():
    with pytest.raises(attnlens.AttnlensError, match="no capture setting fits.*MiB"):
        attnlens.capture_settings(sd15_meta(), kind="self", items=64, num_inference_steps=50, budget=1 << 20)


@pytest.mark.parametrize("config, blocks", [(SD15, 9), (SDXL, 7)], ids=["sd15", "sdxl"])
def test_architecture_figure_draws_published_unets(config, blocks):
    img = viz.architecture(types.SimpleNamespace(unet=meta_unet(config), vae_scale_factor=8), box=120)
    assert img.size[0] >= 150 + blocks * 132  # one column per block: down blocks, mid, up blocks


@pytest.mark.slow  # the 860M-parameter SD 1.5 UNet with random weights (built once, shared with test_architectures)
def test_pooled_self_attention_capture_on_the_sd15_architecture():
    """The store_resolution the chapters fall back to, on the real architecture: pooled grids, rows that
    still sum to 1, and the chapter's figures draw from them."""
    from test_architectures import sd15_pipeline

    pipe = sd15_pipeline()
    with torch.no_grad(), attnlens.capture(pipe, kind="self", store_resolution=4) as cache:
        image = pipe("a red star", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(0)).images[0]
    top = [i.name for i in attnlens.layers(pipe) if i.kind == "self"][0]
    maps = cache[top, 0]
    assert maps.shape == (1, 1, 4, 4, 16)  # an 8x8 grid at these latents, pooled to 4x4 queries and keys
    torch.testing.assert_close(maps.float().sum(-1), torch.ones(maps.shape[:-1]), atol=2e-3, rtol=0)
    assert viz.self_attention_grid(cache, image, top, tile=32).size[0] > 0
    assert viz.self_attention_pca(cache, [top]).shape == (4, 4, 3)


# ------------------------------------------------------------------ the chapters' edit scores on a real model
def _images(n, size=16):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_edit_scorer_reads_the_shapes_model_with_the_oracle():
    from attnlens.shapes import editbench

    pipe = attnlens.load_pipeline()
    scorer = viz.edit_scorer(pipe)
    assert scorer.oracle and scorer.clip is None and scorer.notice() is None
    pair = editbench.edit_pairs(seeds=1, kinds=("colour",))[0]
    from attnlens import shapes

    a = editbench.render(pair.scene)[0]
    b = editbench.render(shapes.with_attribute(pair.scene, colour=pair.target_value))[0]
    got, oracle = scorer.score(pair, a, b), editbench.score(pair, a, b)
    assert oracle["success"] and got == oracle  # exactly the oracle's scores: the Shapes pages are unchanged
    with pytest.raises(attnlens.AttnlensError, match="needs CLIP"):
        scorer.clip_table([a], [b], ["x"], ["y"])


def test_edit_scorer_switches_to_clip_on_another_model():
    from attnlens._testing import tiny_clip, tiny_pipeline
    from attnlens.shapes import editbench

    scorer = viz.edit_scorer(tiny_pipeline(), clip=tiny_clip())
    assert not scorer.oracle and isinstance(scorer.clip, attnlens.CLIPMetrics)
    pair = editbench.edit_pairs(seeds=1, kinds=("colour",))[0]
    row = scorer.score(pair, *_images(2))
    assert set(row) == {"clip_source", "clip_edit", "directional"} and all(np.isfinite(v) for v in row.values())
    assert 0 <= row["clip_edit"] <= 100 and -1 <= row["directional"] <= 1
    table = scorer.clip_table(_images(3), _images(3)[::-1], ["a red star"] * 3, ["a blue star"] * 3)
    assert table.shape == (3, 3) and np.isfinite(table.to_numpy()).all()
    notice = scorer.notice().data
    assert "CLIPMetrics" in notice and "does not switch" not in notice and "a CLIP model given in code" in notice


def test_edit_scorer_loads_clip_from_the_env_var(tmp_path, monkeypatch):
    from attnlens._testing import tiny_clip, tiny_pipeline

    tiny_clip().save_pretrained(tmp_path / "clip", safe_serialization=True)
    monkeypatch.setenv("ATTNLENS_CLIP", str(tmp_path / "clip"))
    scorer = viz.edit_scorer(tiny_pipeline())
    assert scorer.clip.size == 32 and str(tmp_path / "clip") in scorer.notice().data


def test_a_missing_clip_is_an_error_naming_the_env_var(tmp_path, monkeypatch):
    from attnlens._testing import tiny_pipeline

    monkeypatch.setenv("ATTNLENS_CLIP", str(tmp_path / "no-clip-here"))
    with pytest.raises(attnlens.AttnlensError, match=r"\$ATTNLENS_CLIP.*safetensors"):
        viz.edit_scorer(tiny_pipeline())
    assert viz.edit_scorer(attnlens.load_pipeline()).oracle  # the Shapes model needs no CLIP


def test_not_measured_glues_only_off_the_shapes_model(monkeypatch):
    from attnlens._testing import tiny_clip, tiny_pipeline

    glued = {}  # myst_nb (the book's) need not be installed: a stand-in records what would be glued
    fake = types.SimpleNamespace(glue=lambda name, value, display=True: glued.__setitem__(name, value))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    viz.edit_scorer(attnlens.load_pipeline()).not_measured(numbers=["n"], texts=["verdict"])
    assert glued == {}
    viz.edit_scorer(tiny_pipeline(), clip=tiny_clip()).not_measured(numbers=["n"], texts=["verdict"])
    assert np.isnan(glued["n"]) and "not measured on this model" in glued["verdict"].data


def test_oracle_notice_scopes():
    from attnlens._testing import tiny_pipeline

    pipe = tiny_pipeline()
    assert "seen_*" in viz.oracle_notice(pipe, "probing").data
    assert "scores no edits" in viz.oracle_notice(pipe, "readings").data
    with pytest.raises(attnlens.AttnlensError, match="scope must be one of"):
        viz.oracle_notice(pipe, "everything")


def test_benchmark_slice_scores_with_clip_off_the_shapes_model():
    """Chapter 9's live slice on another model: editbench.run with the scorer gives CLIP rows, generated and
    real-image track, and no oracle readings."""
    from attnlens._testing import tiny_clip, tiny_pipeline
    from attnlens.shapes import editbench

    pipe = tiny_pipeline()
    scorer = viz.edit_scorer(pipe, clip=tiny_clip())
    live = pd.concat([editbench.run(pipe, ("none", "fpe"), seeds=[0], kinds=("colour",), real=real, num_inference_steps=2,
                                    progress=False, scorer=scorer.score) for real in (False, True)], ignore_index=True)
    assert len(live) == 4 and "success" not in live.columns and not any(c.startswith("edited_") for c in live.columns)
    assert np.isfinite(live[["clip_source", "clip_edit", "directional"]].to_numpy()).all()
    assert scorer.summary(live, ["track", "method"]).shape == (4, 3)


@pytest.mark.slow  # the 860M-parameter SD 1.5 UNet with random weights (built once, shared with test_architectures)
def test_chapter_scoring_path_runs_on_the_sd15_configuration():
    """What chapters 6-8 do on a real model, end to end on SD 1.5's configuration with random weights and a
    tiny random CLIP, at 64x64 (8x8 latents) and 2 steps: a ShapesEdit pair edited with `none` and FPE,
    scored by the scorer, then the page's table, summary and "this model and the paper" box. Shapes and
    budgets, not quality."""
    from attnlens._testing import tiny_clip
    from attnlens.shapes import editbench
    from test_architectures import sd15_pipeline

    pipe = sd15_pipeline()
    scorer = viz.edit_scorer(pipe, clip=tiny_clip())
    assert not scorer.oracle
    pair = editbench.edit_pairs(seeds=1, kinds=("colour",))[0]
    rows = []
    with torch.no_grad():
        for m in ("none", "fpe"):
            r = attnlens.edit(pipe, pair.source_prompt, pair.target_prompt, method=m, seed=pair.seed,
                              num_inference_steps=2, height=64, width=64)
            assert r.edited.size == (64, 64)
            rows.append({"kind": pair.kind, "method": m, **scorer.score(pair, r.source, r.edited)})
    scores = pd.DataFrame(rows)
    figures = scorer.view(scores, ["kind", "method", "success", "iou"])
    assert list(figures.columns) == ["kind", "method", "clip_source", "clip_edit", "directional"]
    assert np.isfinite(figures[["clip_source", "clip_edit", "directional"]].to_numpy()).all()
    assert scorer.summary(scores).shape == (2, 3)
    box = scorer.box(scores, "method").data
    assert "Not measured on" in box and "`fpe`: CLIP score" in box and "`none`: CLIP score" in box
