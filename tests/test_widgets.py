"""The widgets, headless: build each on a tiny pipeline, change controls, check the outputs change."""

import pytest

pytest.importorskip("ipywidgets")

import attnlens  # noqa: E402
from attnlens import AttnlensError  # noqa: E402
from attnlens.widgets import AttentionExplorer, EditingLab, _edit_options  # noqa: E402


def png(image_widget) -> bytes:
    value = image_widget.value
    assert value[:8] == b"\x89PNG\r\n\x1a\n", "output is not a PNG"
    return bytes(value)


def test_explorer_generates_and_every_control_redraws(pipe):
    ex = AttentionExplorer(pipe, "a red star on the left", num_inference_steps=3, tile=32)
    assert ex.word.options == ("a", "red", "star", "on", "the", "left")
    assert ex.word.value == "red"  # the first word that is not an article
    assert [v for _, v in ex.step.options] == ["all", 0, 1, 2]
    assert len(ex.layer.options) == 1 + 4  # "all" and the tiny UNet's four cross-attention layers
    seen = {png(ex.overlay)}
    for control, value in ((ex.word, "star"), (ex.step, 1), (ex.layer, "mid.0.cross"), (ex.step, "all")):
        control.value = value
        now = png(ex.overlay)
        assert now not in seen, f"setting {control.description}={value!r} did not change the overlay"
        seen.add(now)
    assert "mid.0.cross" in ex.caption.value and "all 3 steps" in ex.caption.value
    assert ex.heat.value != b""


def test_explorer_regenerates_on_click_and_keeps_the_chosen_word(pipe):
    ex = AttentionExplorer(pipe, "a blue circle", num_inference_steps=2, tile=32)
    ex.word.value = "circle"
    first = png(ex.image)
    ex.prompt.value, ex.seed.value = "a blue circle at the top", 3
    ex.generate_button.click()
    assert png(ex.image) != first
    assert ex.word.options[-2:] == ("the", "top") and ex.word.value == "circle"
    assert "seed 3" in ex.caption.value


def test_explorer_without_generating_shows_nothing_until_asked(pipe):
    ex = AttentionExplorer(pipe, "a red star", num_inference_steps=2, generate=False)
    assert ex.cache is None and ex.overlay.value == b""
    ex.generate()
    assert ex.cache is not None and png(ex.overlay)


def test_edit_options_follow_the_controls():
    assert _edit_options("fpe", 8, 0.5, 10) == {"num_inference_steps": 10, "max_resolution": 8, "steps": (0.0, 0.5)}
    assert _edit_options("p2p", 4, 0.6, 10) == {"num_inference_steps": 10, "cross_replace_steps": 0.6,
                                               "self_max_resolution": 4}
    assert _edit_options("none", 4, 0.6, 10) == {"num_inference_steps": 10}
    with pytest.raises(AttnlensError, match="method must be one of"):
        _edit_options("swap", 4, 0.6, 10)


def test_editing_lab_runs_edit_and_reads_both_images(pipe):
    assert hasattr(attnlens, "edit")
    lab = EditingLab(pipe, "a red star", "a blue star", num_inference_steps=3, tile=32)
    assert lab.resolution.options == (("≤ 8x8 (4 layers)", 8), ("≤ 4x4 (1 layer)", 4))
    assert lab.resolution.value == 4  # every level but the highest-resolution one
    assert lab.result.settings["max_resolution"] == 4 and lab.result.settings["steps"] == (0.0, 0.8)
    assert "<table>" in lab.readings.value and "max_resolution=4" in lab.settings.value
    source, edited = png(lab.source_image), png(lab.edited_image)
    lab.resolution.value, lab.step_fraction.value = 8, 1.0
    lab.run_button.click()
    assert lab.result.settings["max_resolution"] == 8 and lab.result.settings["steps"] == (0.0, 1.0)
    assert png(lab.source_image) == source  # same seed: the source does not move
    assert png(lab.edited_image) != edited
    lab.method.value = "none"
    assert lab.resolution.disabled and lab.step_fraction.disabled
    lab.run()
    assert lab.result.method == "none"


def test_editing_lab_refuses_bad_settings(pipe):
    with pytest.raises(AttnlensError, match="method must be one of"):
        EditingLab(pipe, method="swap", run=False)
    with pytest.raises(AttnlensError, match="resolution must be one of"):
        EditingLab(pipe, resolution=5, run=False)
    with pytest.raises(AttnlensError, match="step_fraction"):
        EditingLab(pipe, step_fraction=1.5, run=False)
