"""Capture invariants on CUDA in fp16 (skipped without a CUDA GPU).

The same invariants as tests/test_capture.py holds on CPU in fp32, on the GPU path: the pipeline in
fp16 on CUDA, maps computed in fp32 beside the fused attention and stored on the CPU; and the
embedded Shapes model loaded with ``load_pipeline``'s defaults (CUDA, fp16) when it is present.
"""

import numpy as np
import pytest
import torch

import attnlens
from attnlens import capture, layers
from attnlens._pipeline import EMBEDDED_MODEL
from attnlens._testing import captured_with_inputs, tiny_pipeline

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline().to(DEVICE, torch.float16)


def run(pipe, prompt="a red hexagon on the left", steps=3, seed=0):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                generator=torch.Generator(DEVICE).manual_seed(seed)).images


def test_fp16_capture_does_not_change_the_image(pipe):
    assert pipe.unet.dtype == torch.float16 and pipe.device.type == DEVICE
    plain = run(pipe)
    with capture(pipe, kind=None, layers="*") as cache:
        hooked = run(pipe)
    assert len(cache) == 8 * 3
    assert np.isfinite(hooked).all()
    np.testing.assert_allclose(hooked, plain, atol=1e-3)


def test_fp16_maps_equal_softmax_recomputed_from_the_layer_inputs(pipe):
    cache, expected = captured_with_inputs(pipe, "down.0.0.cross", lambda p: run(p, steps=2), heads="all",
                                           dtype=torch.float32)
    attn = next(i for i in layers(pipe) if i.name == "down.0.0.cross").module
    got = cache["down.0.0.cross", 1]
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert got.shape == (1, attn.heads, 8, 8, 77)
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-3, rtol=0)


def test_fp16_default_storage_reduction_and_word_maps(pipe):
    with capture(pipe) as cache:
        run(pipe, steps=2)
    m = cache["down.0.0.cross", 0]
    assert m.dtype == torch.float16 and m.device.type == "cpu" and torch.isfinite(m).all()
    assert cache.word_map("hexagon").shape == (8, 8)
    with capture(pipe, kind="self", reduce="mean", store_resolution=4) as reduced:
        run(pipe, steps=2)
    maps = reduced["down.0.0.self", None]
    assert maps.shape == (1, 1, 4, 4, 16)
    torch.testing.assert_close(maps.float().sum(-1), torch.ones(1, 1, 4, 4), atol=1e-2, rtol=0)


def test_processors_restored_after_exit_exception_and_nesting_on_cuda(pipe):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe, kind=None, layers="*"):
            raise RuntimeError("boom")
    with capture(pipe, layers="mid.*") as outer:
        with capture(pipe, layers="mid.0.cross", steps=[0]) as inner:
            run(pipe, steps=2)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    torch.testing.assert_close(inner["mid.0.cross", 0], outer["mid.0.cross", 0])


def test_fp16_capture_is_deterministic_under_a_seed(pipe):
    out = []
    for _ in range(2):
        with capture(pipe) as cache:
            run(pipe, steps=2, seed=3)
        out.append(cache.word_map("red"))
    torch.testing.assert_close(out[0], out[1], atol=1e-3, rtol=0)


def test_load_pipeline_defaults_to_cuda_fp16(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "tiny", safe_serialization=True)
    loaded = attnlens.load_pipeline(tmp_path / "tiny")
    assert loaded.device.type == "cuda" and loaded.unet.dtype == torch.float16


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(),
                    reason="the embedded Shapes model is not in attnlens/models/shapes yet")
def test_shapes_model_on_cuda(monkeypatch):
    monkeypatch.delenv("ATTNLENS_MODEL", raising=False)
    shapes = attnlens.load_pipeline()  # CUDA, fp16
    shapes.set_progress_bar_config(disable=True)
    assert shapes.device.type == "cuda" and shapes.unet.dtype == torch.float16
    with capture(shapes, resolution=16) as cache:
        images = shapes(["a small red star on the left", "a blue circle"], num_inference_steps=25, guidance_scale=7.5,
                        output_type="np", generator=torch.Generator("cuda").manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    heat = cache.word_map("star")
    assert heat.shape == (16, 16) and torch.isfinite(heat).all()
    assert cache.word_map("circle", prompt=1).shape == (16, 16)
