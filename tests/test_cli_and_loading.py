import os

import pytest
import torch
from PIL import Image

from attnlens import AttnlensError, load_pipeline
from attnlens._pipeline import EMBEDDED_MODEL
from attnlens.cli import main


def test_load_pipeline_from_a_local_folder(saved):
    pipe = load_pipeline(saved, device="cpu")
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32


def test_missing_embedded_model_says_how_to_build_it(monkeypatch):
    monkeypatch.delenv("ATTNLENS_MODEL", raising=False)
    if (EMBEDDED_MODEL / "model_index.json").exists():
        pytest.skip("the embedded model is present")
    with pytest.raises(AttnlensError, match="python -m tools.shapes_model.train"):
        load_pipeline()


def test_pickle_only_folders_are_refused(saved, tmp_path):
    with pytest.raises(AttnlensError, match="safetensors"):
        load_pipeline(tmp_path / "nothing-here", device="cpu")


def test_cli_layers_and_capture(saved, tmp_path, capsys):
    assert main(["--device", "cpu", "layers", str(saved)]) == 0
    assert "down.0.0.cross" in capsys.readouterr().out
    out = tmp_path / "heat.png"
    assert main(["--device", "cpu", "capture", "--model", str(saved), "--prompt", "a red star", "--word", "star",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert main(["--device", "cpu", "capture", "--model", str(saved), "--prompt", "a red star", "--word", "dog",
                 "--steps", "1", "--out", str(out)]) == 2
    assert "not a word" in capsys.readouterr().err
