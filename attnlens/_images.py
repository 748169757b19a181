"""Image I/O for editing and inversion: images in, latents out and back, tensors to PIL.

Imports ``_layers`` and ``_errors``; imported by ``_inversion`` and ``_editing``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._errors import AttnlensError
from ._layers import get_unet


def prepare_image(pipe: Any, image: Any, size: tuple[int, int] | None) -> tuple[Image.Image, list[str]]:
    """``(RGB image at the pipeline's size or size=(h, w), notices)`` from a PIL image, an array or a path; each
    conversion is warned about and noted."""
    notices = []
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr.squeeze())
    if not isinstance(image, Image.Image):
        raise AttnlensError(f"image must be a PIL image, a numpy array or a path, not {type(image).__name__}")
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P") and "A" in image.getbands() or image.mode == "P":
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            notices.append(f"converted {image.mode} to RGB (transparency composited on white)")
            image = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            notices.append(f"converted {image.mode} to RGB")
            image = image.convert("RGB")
    unet = get_unet(pipe)
    scale = getattr(pipe, "vae_scale_factor", 8)
    want = size or (unet.config.sample_size * scale, unet.config.sample_size * scale)
    want = (want[0] // scale * scale, want[1] // scale * scale)
    if (image.height, image.width) != tuple(want):
        notices.append(f"resized {image.width}x{image.height} to {want[1]}x{want[0]} (the pipeline's size; pass size=)")
        image = image.resize((want[1], want[0]), Image.BICUBIC)
    for note in notices:
        warnings.warn(f"attnlens: {note}", stacklevel=3)
    return image, notices


def encode(pipe: Any, image: Image.Image) -> torch.Tensor:
    """The VAE's latent ``(1, C, h, w)`` of an RGB image (the distribution's mean, scaled)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = pipe.vae
    x = x.to(pipe.device, vae.dtype)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return z * vae.config.scaling_factor


def decode(pipe: Any, z: torch.Tensor) -> Image.Image:
    """The image of a latent ``(1, C, h, w)``."""
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    return to_pil((x / 2 + 0.5).clamp(0, 1))[0]


def to_pil(images: Any) -> list[Image.Image]:
    """PIL images from ``(n, 3, H, W)`` floats in [0, 1] (a tensor), ``(n, H, W, 3)`` arrays, or PIL images.

    Example:
        >>> [im.size for im in to_pil(torch.zeros(2, 3, 4, 6))]
        [(6, 4), (6, 4)]
    """
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return images
    arr = images if isinstance(images, np.ndarray) else images.float().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arr]
