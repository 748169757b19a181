"""benchmarks/shapes_self_attention.py: the ablation really zeroes and restores, and the verdicts can say both."""

from pathlib import Path

import numpy as np
import pytest
import torch

import attnlens
from attnlens._testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    from benchmarks import shapes_self_attention

    return shapes_self_attention


def _image(pipe, seed=0):
    return pipe("a red star", num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_zeroed_layers_output_zeros_and_the_processors_come_back(bench):
    pipe = tiny_pipeline()
    unet = pipe.unet
    before = dict(unet.attn_processors)
    names = [i.name for i in attnlens.layers(pipe) if i.kind == "self"]
    info = next(i for i in attnlens.layers(pipe) if i.kind == "self")
    x = torch.randn(2, 16, info.module.to_q.in_features)
    plain = _image(pipe)
    with bench.zeroed(pipe, names):
        pipe(["a red star"], num_inference_steps=1)  # start the step clock, so the layers act on a call of their own
        out = info.module(x)
        assert out.shape == x.shape and torch.count_nonzero(out) == 0
        ablated = _image(pipe)
    assert not np.allclose(plain, ablated)  # the layers did contribute, and zeroing them shows
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())  # the exact original objects
    np.testing.assert_array_equal(_image(pipe), plain)
    with pytest.raises(RuntimeError):
        with bench.zeroed(pipe, names):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(attnlens.AttnlensError, match="valid"):
        with bench.zeroed(pipe, ["down.9.9.self"]):
            pass


def test_groups_cover_every_level_and_the_fpe_layers(bench):
    pipe = tiny_pipeline()
    groups = bench.ablation_groups(pipe)
    assert groups["fpe_self"] == attnlens.default_layers(pipe, "fpe")
    levels = [g for g in groups if g != "fpe_self"]
    assert {g.split()[0] for g in levels} == {"self", "cross"}
    assert sorted(n for g in levels for n in groups[g]) == sorted(i.name for i in attnlens.layers(pipe))


def _abl(changed, images=8):
    return [{"group": "self 8x8", "readings_changed": 0, "images": images, "pixel_change": 0.0, "layers": []},
            {"group": "fpe_self", "readings_changed": changed, "images": images, "pixel_change": 0.1, "layers": ["x"]}]


def _edit(method, kept, success, found=True):
    return {"method": method, "kept": kept, "success": success, "source_found": found}


def test_verdicts_can_pass_and_fail(bench):
    good = [_edit("none", i % 2 == 0, True) for i in range(10)] + [_edit("fpe", i < 9, i < 9) for i in range(10)]
    v = bench.verdicts(_abl(4), good)
    assert v["load_bearing_self_attention"]["pass"] and v["free_structure"]["pass"] and v["fpe_keeps_structure"]["pass"]
    bad = [_edit("none", i < 9, True) for i in range(10)] + [_edit("fpe", i < 9, i < 5) for i in range(10)]
    v = bench.verdicts(_abl(3), bad)
    assert not v["load_bearing_self_attention"]["pass"]
    assert not v["free_structure"]["pass"] and v["free_structure"]["kept"] == pytest.approx(0.9)
    assert not v["fpe_keeps_structure"]["pass"]  # structure kept, but the edit lands in only half
    # a pair whose source has no object is left out, and counted
    v = bench.verdicts(None, good + [_edit("none", True, True, found=False)])
    assert "load_bearing_self_attention" not in v
    assert v["free_structure"]["pairs_without_source_object"] == 1 and v["free_structure"]["n"] == 10


def test_structure_rule_on_rendered_scenes(bench):
    from attnlens import shapes

    scene = shapes.Scene("square", "red", "large", "left", "gray")
    same_place = shapes.render(shapes.with_attribute(scene, colour="blue"))[0]
    moved = shapes.render(shapes.with_attribute(scene, position="right"))[0]
    smaller = shapes.render(shapes.with_attribute(scene, size="small"))[0]
    src = shapes.render(scene)[0]
    assert bench.structure(src, same_place)["kept"]
    assert not bench.structure(src, moved)["kept"]
    assert not bench.structure(src, smaller)["kept"]


def test_under_specified_prompts_name_neither_place_nor_size(bench):
    from attnlens import shapes

    pairs = bench.under_specified_pairs(2)
    assert len(pairs) == 6 and {p["kind"] for p in pairs} == set(bench.EDIT_KINDS)
    words = {w for vals in (shapes.SIZES, shapes.POSITIONS) for v in vals for w in v.split()} - {"a", "the"}
    for p in pairs:
        assert p["source_prompt"] != p["target_prompt"]
        assert p["target_value"] in p["target_prompt"]
        for prompt in (p["source_prompt"], p["target_prompt"]):
            assert not set(prompt.split()) & words, prompt


def test_a_tiny_run_writes_the_record(bench, tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    monkeypatch.setattr(bench.attnlens, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(bench, "STEPS", 2)
    monkeypatch.setattr(bench, "_generate", lambda p, prompts, seeds, steps, guidance: (
        np.clip(p([q for _ in seeds for q in prompts], num_inference_steps=2, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds for _ in prompts]).images, 0, 1)
        * 255).astype(np.uint8))
    bench.main(["--quick", "--ablation-only", "--out", str(tmp_path)])
    import json

    rec = json.loads((tmp_path / "shapes_self_attention_quick.json").read_text())
    assert rec["ablation"][-1]["group"] == "fpe_self" and rec["edits"] is None
    assert set(rec["targets"]) == {"load_bearing_self_attention"} and "timing_note" in rec


def test_diagnostic_variants_edit_every_level_and_stay_out_of_the_targets(bench):
    pipe = tiny_pipeline()
    finest = max(max(i.resolution) for i in bench.attnlens.layers(pipe) if i.kind == "self")
    assert bench.variant(pipe, "fpe") == ("fpe", {})
    method, options = bench.variant(pipe, "fpe_every_level")
    assert method == "fpe" and options == {"max_resolution": finest}
    assert bench.variant(pipe, "fpe_every_level_all_steps")[1]["steps"] == (0.0, 1.0)
    with pytest.raises(ValueError):
        bench.variant(pipe, "fpe_everywhere")
    rows = ([_edit("none", False, True) for _ in range(4)] + [_edit("fpe", False, True) for _ in range(4)]
            + [_edit("fpe_every_level", True, True) for _ in range(4)])
    v = bench.verdicts(None, rows)
    assert not v["fpe_keeps_structure"]["pass"]  # a diagnostic never rescues the target
    assert v["diagnostics"] == {"fpe_every_level": {"pairs": 4, "pairs_without_source_object": 0, "kept": 1.0,
                                                    "success": 1.0, "n": 4}}


def test_a_shape_swap_in_place_counts_as_kept(bench):
    from attnlens import shapes

    scene = shapes.Scene("square", "red", "large", "left", "gray")
    src = shapes.render(scene)[0]
    tri = shapes.render(shapes.with_attribute(scene, shape="triangle"))[0]
    small_tri = shapes.render(shapes.with_attribute(scene, shape="triangle", size="small"))[0]
    assert bench.structure(src, tri)["kept"] and bench.structure(src, tri)["area_ratio"] < 0.8
    assert not bench.structure(src, small_tri)["kept"]
