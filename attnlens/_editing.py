"""Prompt-based editing: :func:`edit` (generated images) and :func:`edit_image` (real images) execute one
:class:`~attnlens._methods.EditPlan` of a method (:mod:`attnlens._methods`) on the controller mechanism.

Source and target are generated together (a batch of two prompts, source first) from the same start
noise; a real image is inverted first (:mod:`attnlens._inversion`) and its source branch follows the
inversion path.

Imports the methods, inversion, image I/O, capture and control; imported by the package's front
(``attnlens``), the CLI, the widgets and the Shapes edit benchmark.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ._cache import AttentionCache
from ._capture import capture as _capture
from ._control import control
from ._errors import AttnlensError, check_int
from ._images import to_pil as _to_pil
from ._inversion import DEFAULT_GUIDANCE, DEFAULT_STEPS, Inversion, invert
from ._layers import get_denoiser, get_unet
from ._methods import (METHODS, CrossOptions, EditPlan, FPEOptions, MasaCtrlOptions, NoneOptions, P2POptions,
                       default_layers, options_for, plan as _plan)
from ._prompts import batch_row, check_prompt as _check_prompt, token_indices, tokenize

__all__ = ["EditResult", "edit", "edit_image", "start_noise", "METHODS", "FPEOptions", "P2POptions", "CrossOptions",
           "MasaCtrlOptions", "NoneOptions", "Inversion", "invert", "default_layers"]


# ------------------------------------------------------------------------------------------ result
@dataclass
class EditResult:
    """An edit: ``source`` and ``edited`` images, the settings used, the start noise, optional maps.

    Attributes:
        source, edited: PIL images.
        method: the method's name; ``settings``: every option and sampling setting actually used.
        latents: the start noise ``(1, C, h, w)``, Flux's packed ``(1, tokens, C)`` (``pipe(prompt,
            latents=result.latents)`` reproduces a branch).
        cache: the :class:`~attnlens.AttentionCache` captured during the edit (``capture=...``), else ``None``.
        seconds: wall time of the edit.
        inversion: the :class:`Inversion` a real-image edit used.
        pixels: ``(2, 3, H, W)`` float images in [0, 1], source then edited (before 8-bit rounding).
    """

    source: Image.Image
    edited: Image.Image
    method: str
    settings: dict
    latents: torch.Tensor
    cache: AttentionCache | None = None
    seconds: float = 0.0
    inversion: Inversion | None = None
    pixels: torch.Tensor | None = None

    def _repr_html_(self) -> str:  # pragma: no cover - notebook display
        import base64
        import io

        parts = []
        for name, img in (("source", self.source), ("edited", self.edited)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode()
            parts.append(f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}" '
                         f'width="{max(128, img.width)}" style="image-rendering:pixelated"/><figcaption>{name}'
                         f'</figcaption></figure>')
        return "".join(parts)


def start_noise(pipe: Any, seed: int = 0, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The start latents ``(1, C, h, w)`` that ``pipe(prompt, generator=torch.Generator().manual_seed(seed))``
    draws (a CPU generator, so a seed means the same noise on every device). On Flux, in the packed form its
    pipeline's ``latents=`` takes, ``(1, h/2 * w/2, 4 C)``."""
    from diffusers.utils.torch_utils import randn_tensor

    from ._dit import is_dit, start_latents

    seed = check_int("seed", seed, minimum=0)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_int(name, value, minimum=1)
    if is_dit(getattr(pipe, "transformer", None)):
        return start_latents(pipe, torch.Generator().manual_seed(int(seed)), height, width)
    unet = get_unet(pipe)
    scale = getattr(pipe, "vae_scale_factor", 8)
    h = (height or unet.config.sample_size * scale) // scale
    w = (width or unet.config.sample_size * scale) // scale
    gen = torch.Generator().manual_seed(int(seed))
    return randn_tensor((1, unet.config.in_channels, h, w), generator=gen, device=torch.device("cpu"),
                        dtype=unet.dtype)


def _check_sampling(num_inference_steps: Any, guidance_scale: Any) -> None:
    """An :class:`AttnlensError` unless the step count is an int >= 1 and the guidance scale a number."""
    import numbers

    check_int("num_inference_steps", num_inference_steps, minimum=1)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise AttnlensError(f"guidance_scale must be a number, not {type(guidance_scale).__name__} {guidance_scale!r}")


def _check_capture(capture: Any) -> None:
    """``capture=`` of an edit is ``None``/``False``, ``True`` or a dict of :func:`attnlens.capture` keywords."""
    if not (capture is None or isinstance(capture, (bool, dict))):
        raise AttnlensError(f"capture must be None, True or a dict of attnlens.capture arguments (e.g. "
                            f"{{'layers': 'up.*.cross'}}), not {type(capture).__name__} {capture!r}")


def _check_latents(pipe: Any, latents: Any) -> None:
    """An :class:`AttnlensError` unless ``latents`` is a float tensor ``(1, C, h, w)`` with the UNet's ``C`` (Flux:
    its packed ``(1, tokens, C)``)."""
    from diffusers import FluxTransformer2DModel

    denoiser = get_denoiser(pipe)
    channels = getattr(denoiser.config, "in_channels", None)
    if isinstance(denoiser, FluxTransformer2DModel):
        want = f"a float torch.Tensor of shape (1, tokens, {channels}) (start_noise(pipe, seed) makes one)"
        if not torch.is_tensor(latents):
            raise AttnlensError(f"latents must be {want}, not {type(latents).__name__}")
        if latents.ndim != 3 or latents.shape[0] != 1 or latents.shape[2] != channels or not latents.is_floating_point():
            raise AttnlensError(f"latents must be {want}, not a {latents.dtype} tensor of shape {tuple(latents.shape)}")
        return
    want = f"a float torch.Tensor of shape (1, {channels or 'C'}, h, w) (start_noise(pipe, seed) makes one)"
    if not torch.is_tensor(latents):
        raise AttnlensError(f"latents must be {want}, not {type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[0] != 1 or (channels is not None and latents.shape[1] != channels) \
            or not latents.is_floating_point():
        raise AttnlensError(f"latents must be {want}, not a {latents.dtype} tensor of shape {tuple(latents.shape)}")


def _settings(p: EditPlan, hw: tuple[int, int], steps: int, guidance: float, seed: Any) -> dict:
    """Every option and sampling setting an edit used, in one flat dict."""
    out = {**p.settings, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
           "latent_size": list(hw), **p.limits}
    if p.mode is not None:
        out["mode"] = p.mode  # the mode used, "auto" resolved
    return out


def _run(pipe: Any, p: EditPlan, source: str, target: str, latents: torch.Tensor, steps: int, guidance: float,
         capture: Any, negative_prompt: Any, callbacks: list, embeds: dict | None, height: int | None,
         width: int | None, pipe_kwargs: dict | None = None) -> tuple[torch.Tensor, AttentionCache | None]:
    """Run the plan: ``(pixels (2, 3, H, W) in [0, 1], the user's capture cache or None)``."""
    blend = getattr(p.options, "local_blend", None)
    with contextlib.ExitStack() as stack:
        for ctrl in p.controllers:
            stack.enter_context(control(pipe, ctrl))
        user_cache = None
        if capture:
            kwargs = {} if capture is True else dict(capture)
            kwargs.setdefault("prompts", None)
            user_cache = stack.enter_context(_capture(pipe, **kwargs))
        if blend is not None:
            callbacks = callbacks + [_local_blend(pipe, stack, p, source, target, steps)]

        def on_step_end(_pipe: Any, i: int, t: Any, kw: dict) -> dict:
            out = {}
            for cb in callbacks:
                out.update(cb(i, {**kw, **out}) or {})
            return out

        call = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    latents=latents.expand(2, *latents.shape[1:]).to(pipe.device, get_denoiser(pipe).dtype))
        if height or width:
            call.update(height=height, width=width)
        call.update(pipe_kwargs or {})
        if embeds is not None:
            call.update(embeds)
        else:
            call["prompt"] = [source, target]
            if negative_prompt is not None:
                call["negative_prompt"] = [negative_prompt] * 2 if isinstance(negative_prompt, str) else negative_prompt
        if callbacks:
            call["callback_on_step_end"] = on_step_end
            call["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds"]
        images = pipe(**call).images
    return images, user_cache


def _local_blend(pipe: Any, stack: contextlib.ExitStack, p: EditPlan, source: str, target: str,
                 steps: int) -> Callable[[int, dict], dict]:
    """A step-end callback: outside the union of the two words' masks, the target latent := the source's.

    The masks come from the maps summed over every step so far (steps ``0..i`` at step ``i``, blending or
    not), as the reference notebooks' ``LocalBlend`` reads the ``AttentionStore``'s running sum.
    """
    opts = p.options
    ws, wt = opts.local_blend
    names = p.blend_layers  # the P2P recipe's layers
    tokens = tokenize(pipe.tokenizer, [source, target])
    # a running sum over steps (fp32), updated as each step's maps are computed: at the step-end callback of
    # step i it holds steps 0..i
    cache = stack.enter_context(_capture(pipe, layers=names, prompts=[0, 1], dtype=torch.float32, reduce="sum"))
    start = int(opts.blend_start * steps)

    def cb(i: int, kw: dict) -> dict:
        if i < start:
            return {}
        maps = torch.stack([cache[name, None].mean(dim=1) for name in names]).mean(dim=0)  # (2, h, w, 77)
        masks = []
        for prompt, word in ((0, ws), (1, wt)):
            idx = token_indices(tokens[prompt], word, prompt)
            m = maps[cache._item(prompt, "cond")][..., idx].sum(-1)[None, None]
            m = F.max_pool2d(m, 3, stride=1, padding=1)
            masks.append(m)
        lat = kw["latents"]
        m = F.interpolate(torch.cat(masks), size=lat.shape[-2:], mode="nearest")
        m = m / m.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None, None]
        m = (m.max(dim=0, keepdim=True).values > opts.blend_threshold).to(lat.dtype).to(lat.device)
        lat = lat.clone()
        lat[1:] = lat[:1] + m * (lat[1:] - lat[:1])
        return {"latents": lat}

    return cb


def edit(pipe: Any, source_prompt: str, target_prompt: str, method: str = "fpe", *, seed: int = 0,
         latents: torch.Tensor | None = None, num_inference_steps: int = DEFAULT_STEPS,
         guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | None = None, capture: Any = None,
         height: int | None = None, width: int | None = None, pipe_kwargs: dict | None = None,
         **options: Any) -> EditResult:
    """Edit the image of ``source_prompt`` into ``target_prompt`` with ``method`` (see :data:`METHODS`).

    Source and target are generated together (a batch ``[source, target]``) from the same start noise:
    ``latents`` ``(1, C, h, w)`` if given, else drawn from ``seed`` exactly as
    ``pipe(source_prompt, generator=torch.Generator().manual_seed(seed))`` draws it. The source image is
    the one the pipeline makes for the source prompt alone. ``options`` are the method's (see
    :class:`FPEOptions`, :class:`P2POptions`, :class:`CrossOptions`, :class:`MasaCtrlOptions`).
    ``capture=True`` (or a dict of :func:`attnlens.capture` arguments) records the maps used while editing.
    ``pipe_kwargs``: more keyword arguments of the pipeline call (``max_sequence_length``, PixArt's
    ``use_resolution_binning``, ...).

    Diffusion transformers (PixArt, SD3, Flux) take ``fpe``, ``masactrl`` and ``p2p``/``cross`` word swap,
    their layers chosen by block depth (the rule and its reasons: ``attnlens._methods``; what an injection does to a
    joint attention's text part: ``attnlens._joint``); on Flux, ``latents`` are its packed
    ``(1, tokens, C)`` (:func:`start_noise`). Real-image editing (:func:`edit_image`) needs a UNet so far.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> r = edit(pipe, "a red star", "a blue star", method="fpe", num_inference_steps=4)
        >>> r.source.size, r.settings["steps"], r.settings["max_resolution"]
        ((16, 16), (0.0, 0.8), 4)
    """
    _check_prompt("source_prompt", source_prompt)
    _check_prompt("target_prompt", target_prompt)
    _check_sampling(num_inference_steps, guidance_scale)
    _check_capture(capture)
    if pipe_kwargs is not None and not isinstance(pipe_kwargs, dict):
        raise AttnlensError(f"pipe_kwargs must be None or a dict of pipeline keyword arguments, not "
                            f"{type(pipe_kwargs).__name__}")
    taken = sorted(set(pipe_kwargs or {}) & {"prompt", "latents", "num_inference_steps", "guidance_scale",
                                              "output_type", "negative_prompt", "height", "width"})
    if taken:
        raise AttnlensError(f"pipe_kwargs may not set {taken}: edit's own arguments set them")
    opts = options_for(method, options)
    given = latents is not None
    if latents is None:
        latents = start_noise(pipe, seed, height, width)
    else:
        _check_latents(pipe, latents)
    t0 = time.perf_counter()
    from ._dit import latents_hw

    hw = latents_hw(pipe, latents, height, width)
    p = _plan(pipe, method, opts, source_prompt, target_prompt, hw)
    pixels, cache = _run(pipe, p, source_prompt, target_prompt, latents, num_inference_steps, guidance_scale,
                         capture, negative_prompt, [], None, height, width, pipe_kwargs)
    src, out = _to_pil(pixels)
    settings = _settings(p, hw, num_inference_steps, guidance_scale, None if given else seed)
    settings.update(source_prompt=source_prompt, target_prompt=target_prompt, edited_layers=p.layers)
    return EditResult(src, out, method, settings, latents, cache, time.perf_counter() - t0, pixels=pixels.cpu())


def edit_image(pipe: Any, image: Any, target_prompt: str, source_prompt: str = "", method: str = "fpe", *,
               num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
               inversion: Inversion | str = "ddim", size: tuple[int, int] | None = None, capture: Any = None,
               **options: Any) -> EditResult:
    """Edit a real image: invert it, then edit with the source branch following the inversion.

    The image is inverted with ``source_prompt`` (empty by default, as in the official FPE code). The
    source and target branches start from the inverted noise, and after every step the source latent
    is reset to the stored inversion latent of that step (the MasaCtrl trick), so the source retraces
    the inversion path and its maps describe the real image. ``inversion`` is ``"ddim"``,
    ``"null-text"`` (the target branch also uses the optimised unconditional embeddings) or an
    :class:`Inversion` already computed with the same number of steps.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> r = edit_image(tiny_pipeline(), Image.new("RGB", (16, 16), "red"), "a blue square",
        ...                num_inference_steps=3)
        >>> r.edited.size, r.inversion.latents.shape[0]
        ((16, 16), 4)
    """
    _check_prompt("target_prompt", target_prompt)
    _check_prompt("source_prompt", source_prompt)
    _check_sampling(num_inference_steps, guidance_scale)
    _check_capture(capture)
    opts = options_for(method, options)
    t0 = time.perf_counter()
    if isinstance(inversion, Inversion):
        inv = inversion
        if len(inv.timesteps) != num_inference_steps:
            raise AttnlensError(f"the inversion has {len(inv.timesteps)} steps but num_inference_steps={num_inference_steps}")
    elif inversion in ("ddim", "null-text"):
        inv = invert(pipe, image, source_prompt, num_inference_steps=num_inference_steps, size=size,
                     check=False, null_text=inversion == "null-text", guidance_scale=guidance_scale)
    else:
        raise AttnlensError(f"inversion must be 'ddim', 'null-text' or an Inversion, not {inversion!r}")
    path = inv.latents.to(pipe.device)
    n = len(inv.timesteps)

    def follow(i: int, kw: dict) -> dict:
        lat = kw["latents"].clone()
        lat[0] = path[i + 1].to(lat.dtype)
        out = {"latents": lat}
        if inv.null_embeddings is not None and i + 1 < n and guidance_scale > 1:
            pe = kw["prompt_embeds"].clone()
            n_prompts = pe.shape[0] // 2
            uncond = [batch_row(q, "uncond", n_prompts, True) for q in range(n_prompts)]
            pe[uncond] = inv.null_embeddings[i + 1].to(pe.device, pe.dtype)
            out["prompt_embeds"] = pe
        return out

    embeds = None
    if inv.null_embeddings is not None and guidance_scale > 1:
        with torch.no_grad():
            pe, _ = pipe.encode_prompt([source_prompt, target_prompt], pipe.device, 1, False)
        neg = inv.null_embeddings[:1].to(pe.device, pe.dtype).expand(2, -1, -1)
        embeds = {"prompt_embeds": pe, "negative_prompt_embeds": neg}
    hw = tuple(path.shape[-2:])
    p = _plan(pipe, method, opts, source_prompt, target_prompt, hw)
    pixels, cache = _run(pipe, p, source_prompt, target_prompt, path[:1], num_inference_steps, guidance_scale,
                         capture, None, [follow], embeds, None, None)
    src, out = _to_pil(pixels)
    settings = _settings(p, hw, num_inference_steps, guidance_scale, None)
    settings.update(source_prompt=source_prompt, target_prompt=target_prompt,
                    inversion="null-text" if inv.null_embeddings is not None else "ddim", edited_layers=p.layers)
    return EditResult(src, out, method, settings, path[:1].cpu(), cache, time.perf_counter() - t0, inv, pixels.cpu())
