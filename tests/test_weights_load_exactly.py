"""Every tensor of the shipped model reaches the pipeline as it is stored, with every supported library
version (scripts/test_oldest.sh runs this against the oldest versions pyproject.toml allows).

A transformers release that does not recognise a checkpoint's key names does not fail: it initialises
the missing weights at random and logs a warning, and the pipeline still generates (noise-like
images). So the check compares values, not just that loading succeeded.
"""

import pytest
import torch
from safetensors.torch import load_file

from attnlens import load_pipeline
from attnlens._pipeline import EMBEDDED_MODEL


def _canonical(key: str) -> str:
    # CLIPTextModel's own parameter names carry a "text_model." prefix in transformers 4.x and none in 5.x
    # (5.x reads both spellings from a file; 4.x reads only the prefixed one)
    return key.removeprefix("text_model.")


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(), reason="the embedded model is absent")
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae"])
def test_shipped_weights_load_exactly(component):
    pipe = load_pipeline(EMBEDDED_MODEL, device="cpu")
    module = getattr(pipe, component)
    stored = {}
    for f in sorted((EMBEDDED_MODEL / component).glob("*.safetensors")):
        stored.update({_canonical(k): v for k, v in load_file(f).items()})
    params = {_canonical(k): v for k, v in module.state_dict().items()}
    missing = [k for k in params if k not in stored and "position_ids" not in k]
    assert not missing, (f"{component}: {len(missing)} parameters have no stored tensor under their name "
                         f"(so this library version initialised them at random), e.g. {missing[:3]}")
    for key, tensor in params.items():
        if key in stored:
            torch.testing.assert_close(tensor, stored[key].to(tensor.dtype), atol=0, rtol=0, msg=key)
