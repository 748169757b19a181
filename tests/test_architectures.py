"""Layer names and resolutions on the published SD 1.5, SD 2.1 and SDXL UNet configurations (meta device)."""

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


def test_non_unet_denoisers_are_refused_by_name():
    fake = types.SimpleNamespace(transformer=torch.nn.Linear(1, 1))
    with pytest.raises(AttnlensError, match="UNet2DConditionModel.*SD3, Flux, PixArt"):
        layers(fake)


def test_table_prints_and_converts():
    table = layers(meta_unet(SD15))
    df = table.to_pandas()
    assert list(df.columns)[:3] == ["name", "path", "kind"] and len(df) == 32
    assert "down.0.0.self" in str(table)
