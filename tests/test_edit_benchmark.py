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


@pytest.mark.parametrize("version", editbench.VERSIONS)
def test_pairs_are_fixed_and_change_one_attribute(version):
    a, b = editbench.edit_pairs(3, version=version), editbench.edit_pairs(3, version=version)
    assert a == b and len(a) == 3 * len(editbench.KINDS)
    for p in a:
        assert p.target_value != p.source_value and p.target_value in ATTRIBUTES[p.kind]
        diff = [k for k in ATTRIBUTES if getattr(p.scene, k) != getattr(p.target_scene, k)]
        assert diff == [p.kind] and p.source_prompt != p.target_prompt
    with pytest.raises(AttnlensError, match="unknown edit kind.*colour"):
        editbench.edit_pairs(1, kinds=["hue"])
    with pytest.raises(AttnlensError, match="version.*shapesedit-v2"):
        editbench.edit_pairs(1, version="v0")


def test_v2_prompts_leave_the_structure_free():
    from attnlens.shapes import SIZES
    from attnlens.shapes._world import POSITION_PHRASES

    words = set(SIZES) | {ph.split()[-1] for phrases in POSITION_PHRASES.values() for ph in phrases}
    pairs = editbench.edit_pairs(6)
    assert {p.version for p in pairs} == {"shapesedit-v2"}
    for p in pairs:
        named = set(p.source_prompt.split()) & words
        if p.kind in editbench.STRUCTURAL:  # only the edited structural attribute is named, in both prompts
            assert p.mentions == editbench.UNDER_SPECIFIED + (p.kind,) and named
        else:
            assert p.mentions == editbench.UNDER_SPECIFIED and not named, p.source_prompt
        for a in ("shape", "colour", "background"):
            assert getattr(p.scene, a) in p.source_prompt and getattr(p.target_scene, a) in p.target_prompt
        # one template: the prompts differ in the edited attribute's words only
        diff = [(a, b) for a, b in zip(p.source_prompt.split(), p.target_prompt.split())
                if a != b and {a, b} != {"a", "an"}]  # the article follows the word
        assert len(p.source_prompt.split()) - len(p.target_prompt.split()) in (-1, 0, 1) and len(diff) >= 1
        if p.kind != "position":
            assert len(diff) == 1 and diff[0] == (p.source_value, p.target_value), (p.source_prompt, p.target_prompt)
    assert editbench.edit_pairs(1, version="shapesedit-v1")[0].source_prompt == \
        "a small red square on the right on a gray background"  # v1 is unchanged


def test_structure_kept_follows_the_unprompted_attributes():
    from attnlens.shapes import Scene, with_attribute

    scene = Scene("square", "red", "large", "left", "gray")
    src = render(scene)[0]
    moved, smaller = render(with_attribute(scene, position="right"))[0], render(with_attribute(scene, size="small"))[0]
    blue = render(with_attribute(scene, colour="blue"))[0]
    pair = lambda kind, value: editbench.EditPair(kind, 0, scene, value, "s", "t", editbench.UNDER_SPECIFIED)
    colour = editbench.score(pair("colour", "blue"), src, blue)
    assert colour["structure_kept"] and colour["centroid_shift_px"] < 1 and colour["iou"] > 0.95
    assert not editbench.score(pair("colour", "blue"), src, moved)["structure_kept"]   # the object moved
    assert not editbench.score(pair("colour", "blue"), src, smaller)["structure_kept"]  # it shrank
    size = editbench.score(pair("size", "small"), src, smaller)
    assert size["structure_kept"] and size["success"] and np.isnan(size["iou"])  # a size edit keeps its place
    assert not editbench.score(pair("size", "small"), src, moved)["structure_kept"]
    assert editbench.score(pair("position", "right"), src, moved)["structure_kept"]  # and a move keeps its size


@pytest.mark.parametrize("kind", editbench.KINDS)
def test_scoring_a_perfect_edit_and_no_edit(kind):
    pair = [p for p in editbench.edit_pairs(4) if p.kind == kind][1]
    src, _ = render(pair.scene)
    tgt, _ = render(pair.target_scene)
    good = editbench.score(pair, src, tgt)
    assert good["success"] and good["kept"] and not good["leak"] and good["source_ok"]
    if kind in ("colour", "background"):
        assert good["iou"] > 0.95
    assert np.isnan(good["iou"]) == (kind in editbench.STRUCTURAL)
    assert good["structure_kept"]
    if kind in ("colour", "shape", "size", "position"):
        assert good["bg_change"] < 0.02
    same = editbench.score(pair, src, src)
    assert same["leak"] and not same["success"] and same["kept"] and same["bg_change"] == 0.0
    assert same["structure_kept"] and (same["iou"] == 1.0 or kind in editbench.STRUCTURAL)


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
    with pytest.raises(AttnlensError, match=r"\['self_max_resolution'\] are taken by none"):
        editbench.run(pipe, ["fpe", "none"], seeds=1, self_max_resolution=4)  # a P2P option, no P2P in the run
    # an option reaches the methods that take it, and only those (`none` takes no `steps`)
    settings = {}
    editbench.run(pipe, ["fpe", "none"], seeds=1, kinds=["colour"], num_inference_steps=2, progress=False,
                  on_row=lambda row, r: settings.setdefault(row["method"], r.settings), steps=(0.0, 1.0))
    assert settings["fpe"]["steps"] == (0.0, 1.0) and "steps" not in settings["none"]


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


def test_a_shape_swap_at_the_same_place_and_size_keeps_the_structure():
    from attnlens.shapes import Scene, with_attribute

    scene = Scene("square", "red", "large", "left", "gray")
    tri = with_attribute(scene, shape="triangle")
    ratio = editbench.expected_area_ratio(scene, tri)
    assert ratio < 0.8  # a raw area rule would call this perfect edit a size change
    a, b = render(scene)[1], render(tri)[1]
    assert not editbench.structure(a, b)["size_kept"] and editbench.structure(a, b, ratio)["size_kept"]
    small_tri = render(with_attribute(tri, size="small"))[1]
    assert not editbench.structure(a, small_tri, ratio)["size_kept"]
    assert editbench.expected_area_ratio(scene, with_attribute(scene, colour="blue")) == 1.0
