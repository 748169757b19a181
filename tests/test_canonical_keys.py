"""The training tool writes the text encoder under the key names every supported transformers reads, and
re-keying a folder keeps what was measured on it valid (same tensors, same images, restamped records)."""

import json

import numpy as np
import torch
from safetensors.torch import load_file

from attnlens import load_pipeline
from attnlens._identity import fingerprint
from tools.shapes_model.train import canonicalise


def _image(folder):
    pipe = load_pipeline(folder, device="cpu")
    return pipe("a red star", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_canonicalise_prefixes_keys_and_restamps_records(copy, tmp_path):
    te = copy / "text_encoder" / "model.safetensors"
    # the image as the installed transformers reads the folder it saved itself
    before_image = _image(copy)
    old = {k: v.clone() for k, v in load_file(te).items()}  # copies: the file is rewritten below
    if all(k.startswith("text_model.") for k in old):  # a transformers (4.x) that saves prefixed names already:
        # write the names 5.x writes (which 4.x cannot read), the case canonicalise exists for
        from safetensors.torch import save_file

        old = {k.removeprefix("text_model."): v for k, v in old.items()}
        save_file(old, str(te.with_suffix(".tmp")), metadata={"format": "pt"})
        te.with_suffix(".tmp").replace(te)
    before_fp = fingerprint(copy)
    results = tmp_path / "results"
    results.mkdir()
    (results / "measured_here.json").write_text(json.dumps({"model_fingerprint": before_fp, "x": 1}))
    (results / "elsewhere.json").write_text(json.dumps({"model_fingerprint": "0" * 64}))

    restamped = canonicalise(copy, results)

    new = load_file(te)
    assert sorted(new) == sorted("text_model." + k for k in old)
    assert all(torch.equal(new["text_model." + k], v) for k, v in old.items())
    assert restamped == [results / "measured_here.json"]
    assert json.loads(restamped[0].read_text())["model_fingerprint"] == fingerprint(copy) != before_fp
    assert json.loads((results / "elsewhere.json").read_text())["model_fingerprint"] == "0" * 64
    np.testing.assert_array_equal(_image(copy), before_image)
    assert canonicalise(copy, results) == []  # already canonical: nothing to do
