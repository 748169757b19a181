"""Load a diffusers pipeline safely: safetensors only, no remote code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._errors import AttnlensError

EMBEDDED_MODEL = Path(__file__).parent / "models" / "shapes"
"""Where the embedded Shapes model lives (a diffusers folder)."""


def default_device_dtype(device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """CUDA in fp16 when available, else CPU in fp32 (either can be given explicitly)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **kwargs: Any):
    """Load a Stable Diffusion-family pipeline from a hub id or a local folder (safetensors only).

    ``model`` defaults to ``$ATTNLENS_MODEL`` and then to the embedded Shapes model. Device and dtype
    are chosen once here; everything in attnlens follows the pipeline.

    Example (needs the model on disk, so not run here)::

        pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")
    """
    from diffusers import DiffusionPipeline

    model = model or os.environ.get("ATTNLENS_MODEL") or EMBEDDED_MODEL
    device, dtype = default_device_dtype(device, dtype)
    local = Path(model)
    if Path(model) == EMBEDDED_MODEL and not (local / "model_index.json").exists():
        raise AttnlensError(
            f"the embedded Shapes model is not in {EMBEDDED_MODEL} yet. Train and export it with "
            "`python -m attnlens.shapes.train vae|unet|export --out attnlens/models/shapes`, or pass a hub id or "
            "a local diffusers folder (or set ATTNLENS_MODEL)."
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False, **kwargs)
    except (OSError, EnvironmentError, ValueError) as exc:
        raise AttnlensError(f"could not load a pipeline from {str(model)!r} with safetensors weights: {exc}") from exc
    from ._layers import get_unet

    get_unet(pipe)  # unsupported architectures fail here, with the supported list
    return pipe.to(device)
