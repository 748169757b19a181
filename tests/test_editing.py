"""Editing: controllers, the five methods, real-image inversion. Invariants on tiny pipelines built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import attnlens
from attnlens import AttnlensError, Controller, Selector, capture, control, edit, edit_image, invert
from attnlens._editing import start_noise
from attnlens._prompts import alignment
from attnlens._testing import tiny_pipeline

STEPS = 4


def plain(pipe, prompt, latents, guidance=7.5, steps=STEPS):
    return pipe(prompt, latents=latents, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images


def test_identity_controller_reproduces_the_image(pipe):
    z = start_noise(pipe, 3)
    ref = plain(pipe, ["a red star", "a blue star"], z.expand(2, -1, -1, -1))
    before = dict(pipe.unet.attn_processors)
    with control(pipe, Controller()):
        out = plain(pipe, ["a red star", "a blue star"], z.expand(2, -1, -1, -1))
    assert torch.equal(out, ref)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_controller_restored_after_exception(pipe):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError):
        with control(pipe, Controller(Selector(kind="self"))):
            raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_seed_draws_the_pipelines_noise_and_source_equals_generating_it_alone(pipe):
    r = edit(pipe, "a red star on the left", "a blue star on the left", seed=5, num_inference_steps=STEPS)
    alone = pipe("a red star on the left", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5),
                 output_type="pt").images
    assert torch.allclose(r.pixels[:1], alone, atol=1e-5)
    assert r.settings["seed"] == 5 and r.source.size == (16, 16)


@pytest.mark.parametrize("method", sorted(attnlens.METHODS))
def test_every_method_keeps_the_source(pipe, method):
    z = start_noise(pipe, 1)
    alone = plain(pipe, "a red star", z)
    r = edit(pipe, "a red star", "a blue star", method=method, latents=z, num_inference_steps=STEPS)
    assert torch.allclose(r.pixels[:1], alone, atol=1e-5)
    assert r.settings["seed"] is None  # explicit latents


def test_fpe_with_no_steps_equals_none(pipe):
    a = edit(pipe, "a red star", "a green heart", method="fpe", steps=[], num_inference_steps=STEPS)
    b = edit(pipe, "a red star", "a green heart", method="none", num_inference_steps=STEPS)
    assert torch.allclose(a.pixels, b.pixels, atol=1e-6)
    c = edit(pipe, "a red star", "a green heart", method="fpe", num_inference_steps=STEPS)
    assert not torch.allclose(c.pixels[1], b.pixels[1], atol=1e-4)  # and the default does change the target


def test_fpe_fused_equals_explicit_reference(pipe):
    kw = dict(seed=2, num_inference_steps=STEPS, max_resolution=8, steps=(0.0, 1.0))
    fused = edit(pipe, "a red star", "a blue circle", method="fpe", path="fused", **kw)
    ref = edit(pipe, "a red star", "a blue circle", method="fpe", path="explicit", **kw)
    assert (fused.pixels - ref.pixels).abs().max() < 1e-4


def test_fpe_target_uses_the_source_map(pipe):
    """Captured while editing: at an edited layer and step the target's self-attention map is the source's."""
    r = edit(pipe, "a red star", "a blue circle", method="fpe", seed=0, num_inference_steps=STEPS, max_resolution=8,
             capture=dict(kind="self", prompts=[0, 1]))
    cache = r.cache
    name = "down.0.0.self"
    for step in cache.steps:
        m = cache[name, step].float()
        same = torch.allclose(m[0], m[1], atol=1e-3)
        assert same == (step < 0.8 * STEPS)  # steps (0.0, 0.8): indices 0..3 of 4
    # the unconditional branch keeps its own maps (cond only by default); at step 0 both unconditional
    # rows have the same input, so look later, once the latents have diverged
    r2 = edit(pipe, "a red star", "a blue circle", method="fpe", num_inference_steps=STEPS, max_resolution=8,
              capture=dict(kind="self", prompts=[0, 1], branch="uncond"))
    m = r2.cache[name, STEPS - 1].float()
    assert not torch.allclose(m[0], m[1], atol=1e-3)


def test_p2p_identical_prompts_reproduce_the_source(pipe):
    r = edit(pipe, "a red star", "a red star", method="p2p", num_inference_steps=STEPS, self_max_resolution=8)
    assert torch.allclose(r.pixels[0], r.pixels[1], atol=1e-5)


def test_p2p_replace_copies_the_source_cross_maps(pipe):
    r = edit(pipe, "a red star", "a blue star", method="cross", mode="replace", cross_replace_steps=1.0,
             num_inference_steps=STEPS, capture=dict(kind="cross", prompts=[0, 1]))
    for key in r.cache.keys():
        m = r.cache[key].float()
        assert torch.allclose(m[0], m[1], atol=1e-4)


def test_refine_alignment_maps_shared_words(pipe):
    mapper, alpha, mode = alignment(pipe.tokenizer, "a red star", "a big red star", "auto")
    assert mode == "refine"
    # target tokens: <s> a big red star </s>; "big" is new, the rest take the source's maps
    assert alpha[:6].tolist() == [1, 1, 0, 1, 1, 1]
    assert mapper[[0, 1, 3, 4, 5]].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(AttnlensError, match="same number of tokens"):
        alignment(pipe.tokenizer, "a red star", "a big red star", "replace")


def test_reweight_changes_only_the_target(pipe):
    r = edit(pipe, "a red star", "a red star", method="p2p", reweight={"red": 3.0}, num_inference_steps=STEPS,
             capture=dict(kind="cross", prompts=[0, 1]))
    idx = r.cache.token_indices("red", 1)
    key = r.cache.keys()[0]
    m = r.cache[key].float()
    assert torch.allclose(m[1][..., idx], 3 * m[0][..., idx], atol=1e-3)
    with pytest.raises(AttnlensError, match="not a word"):
        edit(pipe, "a red star", "a red star", method="p2p", reweight={"green": 2.0}, num_inference_steps=2)


def test_local_blend_with_an_empty_mask_keeps_the_source(pipe):
    kw = dict(method="p2p", num_inference_steps=STEPS, local_blend=("red", "blue"), blend_start=0.0)
    empty = edit(pipe, "a red star", "a blue star", blend_threshold=1.01, **kw)
    assert torch.allclose(empty.pixels[0], empty.pixels[1], atol=1e-5)
    full = edit(pipe, "a red star", "a blue star", blend_threshold=-1.0, **kw)
    no_blend = edit(pipe, "a red star", "a blue star", method="p2p", num_inference_steps=STEPS)
    assert torch.allclose(full.pixels, no_blend.pixels, atol=1e-5)


def test_masactrl_edits_decoder_self_attention(pipe):
    r = edit(pipe, "a red star", "a blue star", method="masactrl", num_inference_steps=STEPS)
    layers = r.settings["edited_layers"]["InjectKV"]
    assert layers and all(n.startswith("up.") and n.endswith(".self") for n in layers)
    assert not torch.allclose(r.pixels[1], edit(pipe, "a red star", "a blue star", method="none",
                                                num_inference_steps=STEPS).pixels[1], atol=1e-4)


@pytest.mark.parametrize("method", sorted(attnlens.METHODS))
def test_guidance_one_works(pipe, method):
    r = edit(pipe, "a red star", "a blue star", method=method, guidance_scale=1.0, num_inference_steps=3)
    alone = plain(pipe, "a red star", r.latents, guidance=1.0, steps=3)
    assert torch.allclose(r.pixels[:1], alone, atol=1e-5)


def test_bad_input_is_named(pipe):
    with pytest.raises(AttnlensError, match="unknown editing method 'ppp'.*fpe"):
        edit(pipe, "a", "b", method="ppp")
    with pytest.raises(AttnlensError, match="unknown option.*max_res.*valid.*max_resolution"):
        edit(pipe, "a", "b", method="fpe", max_res=3)
    with pytest.raises(AttnlensError, match="branch"):
        edit(pipe, "a", "b", method="fpe", branch="left")
    with pytest.raises(AttnlensError, match="latents must be"):
        edit(pipe, "a", "b", latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(AttnlensError, match="must be a string"):
        edit(pipe, ["a"], "b")
    with pytest.raises(AttnlensError, match="matches no layer|no layer"):
        edit(pipe, "a", "b", method="fpe", max_resolution=1, num_inference_steps=2)
    with pytest.raises(AttnlensError, match="image must be"):
        invert(pipe, 42)


def test_inversion_reconstructs_and_converts_input(pipe):
    img = Image.fromarray((np.random.default_rng(0).random((16, 16, 4)) * 255).astype(np.uint8), "RGBA")
    with pytest.warns(UserWarning, match="RGBA to RGB"):
        inv = invert(pipe, img, num_inference_steps=STEPS)
    assert inv.latents.shape == (STEPS + 1, 4, 8, 8)
    assert inv.error is not None and inv.vae_error is not None and inv.error >= 0
    with pytest.warns(UserWarning, match="resized 20x12"):
        inv2 = invert(pipe, Image.new("L", (20, 12), 90), num_inference_steps=2, check=False)
    assert inv2.image.size == (16, 16) and inv2.image.mode == "RGB" and len(inv2.notices) == 2


def test_inversion_is_the_exact_inverse_of_ddim_sampling():
    """With a noise prediction that does not depend on the latent, DDIM inversion then DDIM sampling
    returns exactly to the image's encoding: the reconstruction equals the VAE round trip."""
    from attnlens._images import decode as _decode

    pipe = tiny_pipeline(seed=1)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()  # eps = the output bias: the same for every latent
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    inv = invert(pipe, img, num_inference_steps=10)
    floor = np.asarray(_decode(pipe, inv.latents[-1:]), dtype=np.float32)
    assert np.abs(np.asarray(inv.reconstruction, dtype=np.float32) - floor).max() <= 1.0
    assert abs(inv.error - inv.vae_error) < 2e-3


def test_edit_image_source_follows_the_inversion(pipe):
    img = Image.new("RGB", (16, 16), (30, 200, 30))
    r = edit_image(pipe, img, "a blue square", num_inference_steps=STEPS)
    from attnlens._images import decode as _decode

    expect = _decode(pipe, r.inversion.latents[-1:].to(pipe.device))
    assert np.abs(np.asarray(r.source, dtype=int) - np.asarray(expect, dtype=int)).max() <= 1
    assert r.settings["inversion"] == "ddim"
    inv = invert(pipe, img, num_inference_steps=STEPS, check=False)
    again = edit_image(pipe, img, "a blue square", inversion=inv, num_inference_steps=STEPS)
    assert torch.allclose(again.pixels, r.pixels, atol=1e-5)
    with pytest.raises(AttnlensError, match="has 4 steps"):
        edit_image(pipe, img, "a blue square", inversion=inv, num_inference_steps=3)


def test_null_text_inversion(pipe):
    img = Image.new("RGB", (16, 16), (30, 30, 200))
    inv = invert(pipe, img, "a blue square", num_inference_steps=3, null_text=True, inner_steps=3)
    assert inv.null_embeddings.shape[:2] == (3, 77)
    r = edit_image(pipe, img, "a red square", "a blue square", inversion=inv, num_inference_steps=3)
    assert r.settings["inversion"] == "null-text"


def test_every_method_and_the_real_image_path_on_the_shapes_model():
    """The shipped Shapes model (a real SD pipeline): every method keeps the source, real images invert and edit."""
    from attnlens import load_pipeline
    from attnlens.shapes import Scene, render

    pipe = load_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    z = start_noise(pipe, 0)
    src = "a large red star on the left on a black background"
    alone = plain(pipe, src, z, steps=3)
    for method in sorted(attnlens.METHODS):
        r = edit(pipe, src, src.replace("red", "blue"), method=method, latents=z, num_inference_steps=3)
        assert r.edited.size == (64, 64)
        assert torch.allclose(r.pixels[:1], alone, atol=1e-4), method
    image, _ = render(Scene("star", "red", "large", "left", "black"))
    r = edit_image(pipe, image, "a large blue star on the left on a black background", num_inference_steps=3)
    assert r.edited.size == (64, 64) and r.inversion.latents.shape == (4, 4, 16, 16)
