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
        try:
            image = Image.open(image)
        except (OSError, ValueError) as exc:
            raise AttnlensError(f"image {image!r} cannot be read as an image: {exc}") from None
    if isinstance(image, Image.Image) and image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        bits = "16-bit" if image.mode.startswith("I;16") else f"mode {image.mode}"
        arr = np.asarray(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and arr.size and 0 <= arr.min() and 255 < arr.max() <= 65535):
            arr, bits = arr.astype(np.uint16), "16-bit"  # mode I with values above 255: a 16-bit file (older Pillow)
        image = _from_array(arr, notices, f"a {bits} image")
    elif isinstance(image, np.ndarray):
        image = _from_array(image, notices, "the image array")
    if not isinstance(image, Image.Image):
        raise AttnlensError(f"image must be a PIL image, a numpy array (H, W), (H, W, 3) or (H, W, 4), or a path, "
                            f"not {type(image).__name__}")
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


def _from_array(arr: np.ndarray, notices: list[str], what: str) -> Image.Image:
    """An 8-bit PIL image from an array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (channels last);
    uint8 as is, uint16 scaled from 0..65535, other integers in 0..255, floats in 0..1, bools as black/white.
    Anything else is refused with an :class:`AttnlensError` saying what was found and what is valid."""
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        hint = ""
        if arr.ndim == 3 and shape[0] in (1, 3, 4):
            hint = " (channels first? use arr.transpose(1, 2, 0))"
        elif arr.ndim == 4 and shape[0] == 1:
            hint = " (a batch? pass arr[0])"
        raise AttnlensError(f"{what} has shape {shape}; valid: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels "
                            f"last{hint}")
    if min(arr.shape[:2]) < 1:
        raise AttnlensError(f"{what} has shape {shape}: it is empty")
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        notices.append(f"scaled {what} from 0..65535 to 8 bits")
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif kind in "iu" and arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise AttnlensError(f"{what} is {arr.dtype} with values {lo}..{hi}; valid: uint8 (0..255), uint16 "
                                "(0..65535), other integers in 0..255, or floats in 0..1")
        arr = arr.astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(arr).all():
            raise AttnlensError(f"{what} holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            hint = " (it looks like 0..255: divide by 255)" if lo >= 0 and hi <= 255 else \
                " (it looks like -1..1: use (arr + 1) / 2)" if lo >= -1 and hi <= 1 else ""
            raise AttnlensError(f"{what} is {arr.dtype} with values {lo:g}..{hi:g}; a float image must be in 0..1{hint}")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise AttnlensError(f"{what} has dtype {arr.dtype}; valid: uint8, uint16, integers in 0..255, floats in 0..1 or bool")
    return Image.fromarray(np.ascontiguousarray(arr))


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
