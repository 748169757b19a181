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
