"""benchmarks/shapes_text_path.py: the three-arm training runs end to end and its gain reads 0 for an unchanged word."""

import json
import math

import pytest
import torch

from tools.shapes_model.train import TINY_UNET, build_text_encoder, build_unet


@pytest.fixture(scope="module")
def text_path():
    from benchmarks import shapes_text_path

    return shapes_text_path


def test_gain_is_zero_when_the_swapped_prompt_is_the_same(text_path):
    import attnlens

    pipe = attnlens.load_pipeline(device="cpu", dtype=torch.float32)
    held = text_path.held_out(pipe, 4, seed=0)
    assert held["z"].shape == (4, 4, 16, 16)
    for attribute in text_path.SWAPPED:  # one value changed, and only in that attribute's words
        assert all(a != b for a, b in zip(held["prompts"]["right"], held["prompts"][attribute]))
    same = {"z": held["z"], "prompts": {k: held["prompts"]["right"] for k in held["prompts"]}}
    torch.manual_seed(0)
    gains = text_path.swap_gains(build_text_encoder(TINY_UNET), build_unet(TINY_UNET), pipe.tokenizer,
                                 pipe.scheduler.alphas_cumprod[999].float(), same)
    assert all(gains[a] == 0.0 for a in text_path.SWAPPED) and gains["mse"] > 0


def test_word_table_states_depend_on_the_token_only(text_path):
    table = text_path.WordTable(100, 8)
    ids = torch.tensor([[5, 7, 9], [9, 7, 5]])
    h = table(ids).last_hidden_state
    assert h.shape == (2, 3, 8)
    assert torch.equal(h[0, 0], h[1, 2]) and torch.equal(h[0, 1], h[1, 1])  # no position, no mixing


def test_both_arms_train_and_record(text_path, tmp_path):
    out = tmp_path / "text_path.json"
    text_path.main(["--tiny", "--steps", "2", "--table-steps", "1", "--eval-every", "1", "--scenes", "16",
                    "--held-out", "4", "--threads", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["arms"]) == {"clip", "word_table", "clip_table_start"}
    for arm, history in record["arms"].items():  # the table-start arm trains its table steps first
        assert [h["step"] for h in history] == ([1, 2, 3] if arm == "clip_table_start" else [1, 2])
        assert all(math.isfinite(h[a]) for h in history for a in ("position", "colour", "shape", "mse", "loss"))


def test_table_start_arm_keeps_its_text_layers_frozen_then_trains_them(text_path, monkeypatch):
    """The clip_table_start arm's output projections stay 0 through the table steps and move after."""
    import attnlens
    from tools.shapes_model import train as training

    seen = []
    real = training.start_as_word_table

    def spy(text):
        real(text)
        seen.append(text)

    monkeypatch.setattr(text_path, "start_as_word_table", spy)
    pipe = attnlens.load_pipeline(device="cpu", dtype=torch.float32)
    data = {"z": torch.randn(8, 4, 16, 16), "prompts": ["a red circle on the left"] * 8}
    held = text_path.held_out(pipe, 2, seed=0)
    snapshots = []
    monkeypatch.setattr(text_path, "swap_gains", lambda text, *a: snapshots.append(
        [p.detach().clone() for n, p in text.named_parameters() if n.endswith("fc2.weight")]) or
        {"position": 0.0, "colour": 0.0, "shape": 0.0, "mse": 1.0})
    with pytest.raises(ValueError, match="valid: clip, word_table, clip_table_start"):
        text_path.train_arm("clip_table", TINY_UNET, pipe, data, held, 1, 1, 0)
    text_path.train_arm("clip_table_start", TINY_UNET, pipe, data, held, 2, 1, 0, table_steps=2)
    assert len(seen) == 1 and len(snapshots) == 4
    assert all(not w.any() for w in snapshots[0] + snapshots[1])  # frozen at zero during the table steps
    assert any(w.any() for w in snapshots[3])  # trained afterwards
