"""Inversion of real images: DDIM inversion and null-text inversion (Mokady et al. 2023).

Imports ``_images``, ``_layers``, ``_prompts`` and ``_errors``; imported by ``_editing`` (real-image edits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._errors import AttnlensError, check_int
from ._images import decode, encode, prepare_image
from ._layers import get_unet
from ._prompts import check_prompt

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


@dataclass
class Inversion:
    """DDIM inversion of an image.

    Attributes:
        image: the input after conversion (RGB, the pipeline's size).
        prompt: the prompt inverted with; ``guidance_scale``: 1 for plain DDIM inversion.
        latents: ``(n + 1, C, h, w)``; ``latents[i]`` is the latent at the start of sampling step ``i``
            (``latents[0]`` the inverted noise, ``latents[n]`` the image's encoding).
        timesteps: the sampling schedule (``n`` values, descending).
        reconstruction: the image regenerated from ``latents[0]`` (``None`` if not checked).
        error: mean absolute pixel error (0..1) of the reconstruction; ``vae_error`` the same for the VAE
            round trip alone, the floor any inversion can reach.
        null_embeddings: ``(n, tokens, width)`` optimised unconditional embeddings (null-text inversion) or ``None``.
        notices: what was converted on input.
    """

    image: Image.Image
    prompt: str
    latents: torch.Tensor
    timesteps: list[int]
    reconstruction: Image.Image | None = None
    error: float | None = None
    vae_error: float | None = None
    null_embeddings: torch.Tensor | None = None
    guidance_scale: float = 1.0
    notices: list[str] = field(default_factory=list)
    seconds_per_step: float = 0.0


def _embed(pipe: Any, prompt: str) -> torch.Tensor:
    if not hasattr(pipe, "encode_prompt") or pipe.text_encoder is None:
        raise AttnlensError("invert needs a Stable Diffusion 1.x/2.x-style pipeline (tokenizer + text_encoder)")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise AttnlensError("invert supports SD 1.x / 2.x pipelines; SDXL's two text encoders are not supported yet")
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    return emb


def _alpha(sched: Any, t: int | None) -> torch.Tensor:
    return sched.alphas_cumprod[t] if t is not None and t >= 0 else sched.final_alpha_cumprod


def _ddim(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of ``x`` from level ``a_from`` to ``a_to`` with noise estimate ``eps``."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def _eps(pipe: Any, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    out = get_unet(pipe)(x, t, encoder_hidden_states=emb).sample
    if getattr(pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        a = pipe.scheduler.alphas_cumprod[t].to(x.device, x.dtype)
        out = a.sqrt() * out + (1 - a).sqrt() * x
    return out


def invert(pipe: Any, image: Any, prompt: str = "", *, num_inference_steps: int = DEFAULT_STEPS,
           size: tuple[int, int] | None = None, check: bool = True, null_text: bool = False,
           guidance_scale: float = DEFAULT_GUIDANCE, inner_steps: int = 10, early_stop: float = 1e-5) -> Inversion:
    """DDIM inversion of ``image`` with ``prompt``, keeping every intermediate latent.

    Any PIL image, array or path is accepted; grayscale and RGBA are converted to RGB and the size is
    brought to the pipeline's (or ``size=(h, w)``), with a warning and a note in ``notices`` saying what
    was converted. ``check`` regenerates from the inverted noise and reports the reconstruction error.
    ``null_text=True`` adds null-text inversion (Mokady et al. 2023): per step, the unconditional
    embedding is optimised (``inner_steps`` Adam steps, stop below ``early_stop``) so that sampling with
    ``guidance_scale`` retraces the inversion path.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> inv = invert(tiny_pipeline(), Image.new("L", (16, 16), 128), num_inference_steps=3)
        >>> tuple(inv.latents.shape), inv.notices
        ((4, 4, 8, 8), ['converted L to RGB'])
    """
    check_prompt("prompt", prompt)
    check_int("num_inference_steps", num_inference_steps, minimum=1)
    check_int("inner_steps", inner_steps, minimum=1)
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2
                                 and all(not isinstance(x, bool) and isinstance(x, int) and x > 0 for x in size)):
        raise AttnlensError(f"size must be None (the pipeline's size) or (height, width) in pixels, not {size!r}")
    img, notices = prepare_image(pipe, image, size)
    unet = get_unet(pipe)
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=pipe.device)
    ts = [int(t) for t in sched.timesteps]
    n = len(ts)
    t0 = time.perf_counter()
    emb = _embed(pipe, prompt)
    z = encode(pipe, img)
    lat = [z]
    with torch.no_grad():
        x = z
        for i in reversed(range(n)):
            a_from = _alpha(sched, ts[i + 1] if i + 1 < n else None).to(x.device, torch.float32)
            a_to = _alpha(sched, ts[i]).to(x.device, torch.float32)
            eps = _eps(pipe, x, ts[i], emb).float()
            x = _ddim(x.float(), eps, a_from, a_to).to(unet.dtype)
            lat.append(x)
    latents = torch.cat(lat[::-1])  # latents[0] = noise ... latents[n] = encoding
    per_step = (time.perf_counter() - t0) / n
    inv = Inversion(img, prompt, latents.cpu(), ts, notices=notices, seconds_per_step=per_step)
    if null_text:
        inv.null_embeddings = _null_text(pipe, latents, ts, emb, guidance_scale, inner_steps, early_stop).cpu()
        inv.guidance_scale = guidance_scale
    if check:
        target = np.asarray(img, dtype=np.float32) / 255
        inv.vae_error = float(np.abs(np.asarray(decode(pipe, z), dtype=np.float32) / 255 - target).mean())
        inv.reconstruction = _sample_back(pipe, inv, emb)
        inv.error = float(np.abs(np.asarray(inv.reconstruction, dtype=np.float32) / 255 - target).mean())
    return inv


def _sample_back(pipe: Any, inv: Inversion, emb: torch.Tensor) -> Image.Image:
    """Regenerate from ``inv.latents[0]`` (plain DDIM at guidance 1, or with the null-text embeddings)."""
    sched, ts = pipe.scheduler, inv.timesteps
    x = inv.latents[:1].to(pipe.device)
    with torch.no_grad():
        for i, t in enumerate(ts):
            a_from = _alpha(sched, t).to(x.device, torch.float32)
            a_to = _alpha(sched, ts[i + 1] if i + 1 < len(ts) else None).to(x.device, torch.float32)
            eps = _eps(pipe, x, t, emb).float()
            if inv.null_embeddings is not None:
                eps_u = _eps(pipe, x, t, inv.null_embeddings[i : i + 1].to(x.device, emb.dtype)).float()
                eps = eps_u + inv.guidance_scale * (eps - eps_u)
            x = _ddim(x.float(), eps, a_from, a_to).to(x.dtype)
    return decode(pipe, x)


def _null_text(pipe: Any, latents: torch.Tensor, ts: list[int], emb: torch.Tensor, w: float, inner: int,
               early_stop: float) -> torch.Tensor:
    sched = pipe.scheduler
    uncond = _embed(pipe, "").float()
    x = latents[:1].to(pipe.device)
    out = []
    unet = get_unet(pipe)
    for i, t in enumerate(ts):
        a_from = _alpha(sched, t).to(x.device, torch.float32)
        a_to = _alpha(sched, ts[i + 1] if i + 1 < len(ts) else None).to(x.device, torch.float32)
        goal = latents[i + 1 : i + 2].to(x.device).float()
        with torch.no_grad():
            eps_c = _eps(pipe, x, t, emb).float()
        u = uncond.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
        for _ in range(inner):
            eps_u = _eps(pipe, x, t, u.to(unet.dtype)).float()
            nxt = _ddim(x.float(), eps_u + w * (eps_c - eps_u), a_from, a_to)
            loss = F.mse_loss(nxt, goal)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        u = u.detach()
        out.append(u)
        uncond = u
        with torch.no_grad():
            eps_u = _eps(pipe, x, t, u.to(unet.dtype)).float()
            x = _ddim(x.float(), eps_u + w * (eps_c - eps_u), a_from, a_to).to(x.dtype)
    return torch.cat(out)
