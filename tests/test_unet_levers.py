"""train.py's architecture levers (issue 17): the defaults build the shipped layout, a run keeps its levers on
resuming without the flags, and the exported pipeline has them."""

import json
from dataclasses import replace

from tools.shapes_model import train


def test_defaults_build_the_shipped_layout():
    unet = train.build_unet(train.TINY_UNET)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert unet.config.layers_per_block == 2 and unet.config.transformer_layers_per_block == 1
    heavy = train.build_unet(replace(train.TINY_UNET, layers_per_block=1, transformer_layers=2, attention_levels=(0, 1, 2)))
    assert heavy.config.down_block_types == ("CrossAttnDownBlock2D",) * 3
    assert heavy.config.up_block_types == ("CrossAttnUpBlock2D",) * 3
    assert len(heavy.down_blocks[0].attentions[0].transformer_blocks) == 2


def test_a_run_keeps_its_levers_when_resumed_without_flags(tmp_path):
    import attnlens

    work = tmp_path / "run"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1",
                "--layers-per-block", "1", "--transformer-layers", "2", "--attention-levels", "0", "1", "2"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1"])
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 2
    assert (meta["config"]["layers_per_block"], meta["config"]["transformer_layers"], meta["config"]["attention_levels"]) \
        == (1, 2, [0, 1, 2])
    pipe = attnlens.load_pipeline(train.export(work, tmp_path / "pipe"), device="cpu")
    names = [i.name for i in attnlens.layers(pipe) if i.kind == "self"]
    assert "down.2.0.0.self" in names and "down.2.0.1.self" in names  # attention at the lowest level, two blocks deep
    # packed, unpacked on another machine and resumed there without the flags: the same architecture
    pack, elsewhere = tmp_path / "pack.safetensors", tmp_path / "next_machine"
    train.main(["pack", "--workdir", str(work), "--pack", str(pack)])
    elsewhere.mkdir()
    for suffix in ("", ".json"):
        (elsewhere / f"vae.safetensors{suffix}").write_bytes((work / f"vae.safetensors{suffix}").read_bytes())
    train.main(["unpack", "--workdir", str(elsewhere), "--pack", str(pack)])
    train.main(["unet", "--tiny", "--workdir", str(elsewhere), "--steps", "3", "--save-every", "1"])
    meta = json.loads((elsewhere / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["config"]["attention_levels"] == [0, 1, 2]


def test_image_size_renders_the_world_larger_for_the_unet_through_the_same_vae(tmp_path):
    import attnlens
    from attnlens.shapes import ShapesDataset

    assert ShapesDataset(4, seed=1, size=128)[0]["pixels"].shape == (3, 128, 128)
    assert ShapesDataset(4, seed=1, size=128)[0]["prompt"] == ShapesDataset(4, seed=1)[0]["prompt"]  # same scenes
    work = tmp_path / "run"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--image-size", "128"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1"])  # resumed: kept
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 2 and meta["config"]["image_size"] == 128
    pipe = attnlens.load_pipeline(train.export(work, tmp_path / "pipe"), device="cpu")
    assert pipe.unet.config.sample_size == 32  # the tiny VAE downsamples by 4: 128 -> 32
    assert max(max(i.resolution) for i in attnlens.layers(pipe)) == 32
    image = pipe("a red star", num_inference_steps=1).images[0]
    assert image.size == (128, 128)


def test_block_out_channels_sets_the_levels_and_a_resumed_run_keeps_them(tmp_path):
    import attnlens

    work = tmp_path / "run"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--image-size", "128",
                "--block-out-channels", "16", "16", "16", "16", "--layers-per-block", "1", "--attention-heads", "1",
                "--attention-levels", "1", "2", "3"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1"])  # resumed: kept
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 2 and meta["config"]["block_out_channels"] == [16, 16, 16, 16]
    assert meta["config"]["attention_heads"] == 1
    pipe = attnlens.load_pipeline(train.export(work, tmp_path / "pipe"), device="cpu")
    assert tuple(pipe.unet.config.down_block_types) == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    grids = {i.resolution for i in attnlens.layers(pipe) if i.kind == "self"}
    assert grids == {(16, 16), (8, 8), (4, 4)}  # 32x32 latents, no attention at the latent's own grid
