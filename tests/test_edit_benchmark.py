"""ShapesEdit pairs and scoring, CLIP metrics on a tiny random CLIP, and the `attnlens edit` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnlens import AttnlensError, CLIPMetrics
from attnlens._testing import tiny_pipeline
from attnlens.cli import main
from attnlens.shapes import ATTRIBUTES, render
from attnlens.shapes import editbench


def test_pairs_are_fixed_and_change_one_attribute():
    a, b = editbench.edit_pairs(3), editbench.edit_pairs(3)
    assert a == b and len(a) == 3 * len(editbench.KINDS)
    for p in a:
        assert p.target_value != p.source_value and p.target_value in ATTRIBUTES[p.kind]
        diff = [k for k in ATTRIBUTES if getattr(p.scene, k) != getattr(p.target_scene, k)]
        assert diff == [p.kind] and p.source_prompt != p.target_prompt
    with pytest.raises(AttnlensError, match="unknown edit kind.*colour"):
        editbench.edit_pairs(1, kinds=["hue"])
    with pytest.raises(AttnlensError, match="version"):
        editbench.edit_pairs(1, version="v0")


@pytest.mark.parametrize("kind", editbench.KINDS)
def test_scoring_a_perfect_edit_and_no_edit(kind):
    pair = [p for p in editbench.edit_pairs(4) if p.kind == kind][1]
    src, _ = render(pair.scene)
    tgt, _ = render(pair.target_scene)
    good = editbench.score(pair, src, tgt)
    assert good["success"] and good["kept"] and not good["leak"] and good["source_ok"]
    if kind in ("colour", "background"):
        assert good["iou"] > 0.95
    if kind in ("colour", "shape", "size", "position"):
        assert good["bg_change"] < 0.02
    same = editbench.score(pair, src, src)
    assert same["leak"] and not same["success"] and same["kept"] and same["iou"] == 1.0 and same["bg_change"] == 0.0


def test_run_on_a_tiny_pipeline():
    pipe = tiny_pipeline()
    df = editbench.run(pipe, ["none", "fpe"], seeds=1, kinds=["colour"], num_inference_steps=2, progress=False)
    assert list(df.method) == ["none", "fpe"] and set(df.track) == {"generated"}
    assert {"success", "kept", "leak", "iou", "bg_change", "source_ok"} <= set(df.columns)
    s = editbench.summarise(df)
    assert set(s.kind) == {"colour", "all"}
    real = editbench.run(pipe, ["fpe"], seeds=1, kinds=["size"], real=True, num_inference_steps=2, progress=False)
    assert list(real.track) == ["real"]
    with pytest.raises(AttnlensError, match="unknown editing method"):
        editbench.run(pipe, ["sdedit"], seeds=1)


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel
    import torch

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=49408),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    return CLIPMetrics(CLIPModel(cfg))


def test_clip_score_and_directional_similarity(clip):
    imgs = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    prompts = ["a red square", "a blue square", "a green square"]
    s = clip.score(imgs, prompts)
    assert s.shape == (3,) and ((0 <= s) & (s <= 100)).all()
    cos = (clip.image_embeddings(imgs) * clip.text_embeddings(prompts)).sum(-1).numpy()
    assert np.allclose(s, 100 * np.clip(cos, 0, None), atol=1e-4)
    d = clip.directional(imgs[:2], imgs[1:], prompts[:2], prompts[1:])
    assert d.shape == (2,) and ((-1 <= d) & (d <= 1)).all()
    # swapping both the images and the prompts gives the same direction; swapping one negates it
    assert np.allclose(clip.directional(imgs[1:], imgs[:2], prompts[1:], prompts[:2]), d, atol=1e-5)
    assert np.allclose(clip.directional(imgs[:2], imgs[1:], prompts[1:], prompts[:2]), -d, atol=1e-5)
    with pytest.raises(AttnlensError, match="one prompt per image"):
        clip.score(imgs, prompts[:2])
    with pytest.raises(AttnlensError, match="CLIPModel"):
        CLIPMetrics(object())


def test_cli_edit(tmp_path, capsys):
    model = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(model, safe_serialization=True)
    out = tmp_path / "edits"
    code = main(["--device", "cpu", "edit", "--model", str(model), "--source", "a red star", "--target", "a blue star",
                 "--steps", "2", "--option", "max_resolution=4", "--option", "steps=[0.0,0.5]", "--out", str(out)])
    assert code == 0
    assert (out / "source.png").exists() and (out / "edited.png").exists()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["max_resolution"] == 4 and settings["steps"] == [0.0, 0.5]
    assert main(["--device", "cpu", "edit", "--model", str(model), "--source", "a", "--target", "b",
                 "--method", "sdedit"]) == 2
    assert "unknown editing method" in capsys.readouterr().err
    img = tmp_path / "gray.png"
    Image.new("L", (16, 16), 100).save(img)
    assert main(["--device", "cpu", "edit", "--model", str(model), "--image", str(img), "--target", "a blue star",
                 "--steps", "2", "--out", str(out)]) == 0
