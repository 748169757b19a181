"""The real-model path on SD 1.5's published configuration (meta device or random weights: shapes and
budgets, not quality): the chapters' captures fit the default budget, the architecture figure draws any
UNet, and a real model is told apart from the Shapes model whose images the oracle reads."""

from __future__ import annotations

import types

import pytest
import torch

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
