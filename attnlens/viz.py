"""Visualisation: heat maps over images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a heat map ``(h, w)`` (any scale; normalised to [0, 1]) over ``image``, upsampled to its size.

    Example:
        >>> img = Image.new("RGB", (64, 64))
        >>> overlay(img, np.eye(8)).size
        (64, 64)
    """
    h = heat.detach().float().cpu().numpy() if torch.is_tensor(heat) else np.asarray(heat, dtype=np.float32)
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    big = np.asarray(Image.fromarray((h * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR), dtype=np.float32) / 255
    # a perceptual blue -> yellow ramp
    colour = np.stack([big, 0.2 + 0.6 * big, 1.0 - big], axis=-1) * 255
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip((1 - alpha) * base + alpha * colour, 0, 255).astype(np.uint8))
