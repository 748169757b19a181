"""Layer names and resolutions on the published SD 1.5, SD 2.1 and SDXL UNet configurations (meta device), and a
capture on the SD 1.5 architecture at full width with random weights (CPU, 64x64 images)."""

import functools
import types
from collections import Counter

import pytest
import torch
from diffusers import UNet2DConditionModel

from attnlens import AttnlensError, Selector, layers

SD15 = dict(sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, upcast_attention=True)
SDXL = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
            layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sd15_layers_match_the_paper():
    table = layers(meta_unet(SD15))
    selfs = [i for i in table if i.kind == "self"]
    assert len(selfs) == 16 and len(table) == 32
    assert Counter(i.resolution[0] for i in selfs) == {64: 5, 32: 5, 16: 5, 8: 1}
    # FPE's official rule: self-attention maps with at most 32*32 queries, 11 of 16 layers
    assert sum(i.resolution[0] * i.resolution[1] <= 32 * 32 for i in selfs) == 11
    first = table[1]
    assert (first.name, first.path) == ("down.0.0.cross", "down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    assert (first.heads, first.head_dim, first.factor) == (8, 40, 8)
    assert [i.name for i in table if i.kind == "cross"][-1] == "up.3.2.cross"
    assert [i.name for i in Selector(resolution=8).match(table)] == ["mid.0.self", "mid.0.cross"]


def test_sd21_resolutions_at_768():
    table = layers(meta_unet(SD21))
    assert sorted({i.resolution[0] for i in table}) == [12, 24, 48, 96]
    assert {(i.level, i.heads) for i in table if i.name.startswith("down.0")} == {(0, 5)}


def test_sdxl_names_carry_the_transformer_index():
    table = layers(meta_unet(SDXL))
    selfs = [i for i in table if i.kind == "self"]
    assert len(selfs) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2 == 70
    names = table.names()
    assert "down.1.0.0.self" in names and "down.2.1.9.cross" in names and "mid.0.9.self" in names
    assert len(set(names)) == len(names)
    assert Counter(i.resolution[0] for i in selfs) == {64: 10, 32: 60}


def test_unsupported_denoisers_are_refused_by_name():
    fake = types.SimpleNamespace(transformer=torch.nn.Linear(1, 1))
    with pytest.raises(AttnlensError, match="denoiser Linear.*UNet2DConditionModel.*PixArtTransformer2DModel"
                                            ".*SD3Transformer2DModel.*FluxTransformer2DModel"):
        layers(fake)


def test_table_prints_and_converts():
    table = layers(meta_unet(SD15))
    df = table.to_pandas()
    assert list(df.columns)[:3] == ["name", "path", "kind"] and len(df) == 32
    assert "down.0.0.self" in str(table)


@functools.lru_cache(maxsize=1)
def sd15_pipeline():
    """SD 1.5's UNet at full width with random weights, behind a tiny VAE (still 8x downsampling) and a
    one-layer CLIP text encoder of SD 1.5's width 768, so captures run on CPU at 64x64 (8x8 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnlens._tokenizer import load_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=UNet2DConditionModel(**SD15),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow  # about 20 s on 2 busy CPU cores (most of it building the 860M-parameter UNet), peak ~4 GB RSS
def test_capture_on_the_sd15_architecture_matches_the_layer_table():
    from attnlens import capture

    pipe = sd15_pipeline()
    assert sum(p.numel() for p in pipe.unet.parameters()) > 850e6  # the real channel widths
    table = layers(pipe)
    with torch.no_grad(), capture(pipe, kind=None, layers="*", heads="all", dtype=torch.float32) as cache:
        image = pipe("a red star on the left", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and cache.latent_hw == (8, 8)
    assert len(cache) == 2 * len(table) == 64
    shrink = table[0].resolution[0] // 8  # the table is at SD 1.5's default 64x64 latents; this run has 8x8
    for info in table:
        h, w = info.resolution[0] // shrink, info.resolution[1] // shrink
        assert (h, w) == info.grid((8, 8))
        for step in (0, 1):
            maps = cache[info.name, step]
            assert maps.shape == (1, info.heads, h, w, 77 if info.kind == "cross" else h * w), info.name
            torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-4, rtol=0)
    assert Counter(cache[i.name, 0].shape[2] for i in table if i.kind == "self") == {8: 5, 4: 5, 2: 5, 1: 1}
    assert cache.word_map("star").shape == (8, 8)


@pytest.mark.slow  # the same 860M-parameter UNet, five edits of two steps
def test_every_editing_method_on_the_sd15_architecture():
    """The defaults land on the reference codes' layers: FPE edits the 11 self-attention layers at the 32x32,
    16x16 and 8x8 levels of a 512x512 run (here 4x4, 2x2, 1x1 at 8x8 latents), P2P copies self-attention at
    the 16x16 and 8x8 levels (6 layers), MasaCtrl the decoder's two upper levels (6 layers)."""
    import attnlens

    pipe = sd15_pipeline()
    z = attnlens._editing.start_noise(pipe, 0, 64, 64)
    with torch.no_grad():
        alone = pipe("a red star", latents=z, height=64, width=64, num_inference_steps=2, output_type="pt").images
    counts = {}
    for method in sorted(attnlens.METHODS):
        with torch.no_grad():
            r = attnlens.edit(pipe, "a red star", "a blue star", method=method, latents=z, num_inference_steps=2,
                              height=64, width=64)
        assert r.source.size == (64, 64)
        torch.testing.assert_close(r.pixels[:1], alone, atol=1e-4, rtol=0)
        counts[method] = {k: len(v) for k, v in r.settings["edited_layers"].items()}
    assert counts["fpe"] == {"InjectQK": 11}
    assert counts["p2p"] == {"CrossMapEdit": 16, "CopyMap": 6}
    assert counts["cross"] == {"CrossMapEdit": 16}
    assert counts["masactrl"] == {"InjectKV": 6}
    assert counts["none"] == {}


def test_default_edit_layers_follow_the_reference_rules():
    """FPE: every self-attention level but the finest attention level (SD 1.5: the official 32*32 rule);
    on SDXL, which has no attention at its full latent grid, that leaves the 32x32 level, not all 70 layers."""
    from attnlens import default_layers

    sd15 = meta_unet(SD15)
    official = [i.name for i in layers(sd15) if i.kind == "self" and i.resolution[0] * i.resolution[1] <= 32 * 32]
    assert default_layers(sd15, "fpe") == official and len(official) == 11
    assert len(default_layers(sd15, "masactrl")) == 6 and all(n.startswith("up.") for n in default_layers(sd15, "masactrl"))
    assert [n for n in default_layers(sd15, "p2p") if n.endswith(".self")] == [
        i.name for i in layers(sd15) if i.kind == "self" and i.resolution[0] <= 16]
    sdxl = meta_unet(SDXL)
    xl = default_layers(sdxl, "fpe")
    assert len(xl) == 60 and {i.resolution[0] for i in layers(sdxl) if i.name in xl} == {32}
    assert default_layers(sdxl, "fpe", max_resolution=64) == [i.name for i in layers(sdxl) if i.kind == "self"]
    assert default_layers(sd15, "none") == []
    with pytest.raises(AttnlensError, match="unknown option"):
        default_layers(sd15, "fpe", max_res=3)
