"""Prompt-based editing: Free-Prompt Editing and its baselines, on one mechanism (:mod:`attnlens._control`).

Every method generates the source and the target together from the same start noise (a batch of two
prompts, source first) and differs only in what it does to the target's attention:

========== ==================================================================================
``fpe``    self-attention at every level but the highest-resolution one, first 80% of steps,
           conditional branch: target output = softmax(Q_src K_src^T / sqrt(d)) V_tgt
``p2p``    Prompt-to-Prompt: cross-attention maps replaced (word swap) or aligned (refine), optional
           reweighting and local blend, plus a self-attention map copy at the low-resolution levels
``cross``  cross-attention replacement only (the configuration the paper blames for leakage)
``masactrl`` target queries attend to the source's keys and values in the decoder's upper levels
``none``   the target prompt from the same noise, nothing injected
========== ==================================================================================

Defaults are the reference codes' settings expressed relative to the model (levels by their size
relative to the model's finest attention level, steps as fractions of the schedule), so they mean the
same on SD 1.5 at 512x512 (64x64 latents) and on the Shapes model (16x16 latents);
:func:`default_layers` lists the layers a method edits on a given model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._cache import AttentionCache
from ._capture import capture as _capture
from ._control import Controller, CopyMap, CrossMapEdit, InjectKV, InjectQK, control
from ._errors import AttnlensError, choices
from ._layers import get_unet, layers as list_layers
from ._select import Selector

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class FPEOptions:
    """``fpe``: Free-Prompt Editing (Liu et al. 2024).

    Args:
        max_resolution: edit self-attention layers whose query grid side is at most this (default: half the side
            of the model's finest attention level, i.e. every level but that one: 32, 16 and 8 on SD 1.5 at
            512x512, the official code's rule; 32 on SDXL at 1024x1024, which has no attention at 128).
        steps: which denoising steps (anything a :class:`Selector` takes; default the first 80%).
        branch: ``"cond"`` (the official code), ``"uncond"`` or ``"both"``.
        path: ``"fused"`` (source Q, K into fused attention) or ``"explicit"`` (materialised map, the reference).
    """

    max_resolution: int | None = None
    steps: Any = (0.0, 0.8)
    branch: str = "cond"
    path: str = "fused"


@dataclass(frozen=True)
class P2POptions:
    """``p2p``: Prompt-to-Prompt (Hertz et al. 2022).

    Args:
        mode: ``"replace"`` (prompts with the same number of tokens: every target token takes the source's map),
            ``"refine"`` (token alignment: aligned tokens take the source's map, new tokens keep their own), or
            ``"auto"`` (replace when the token counts match, else refine).
        cross_replace_steps: steps (fraction of the schedule, or a Selector step spec) of cross-attention editing.
        self_replace_steps: steps of the self-attention map copy (``0`` or ``None``: no copy).
        self_max_resolution: self-attention levels copied (default: a quarter of the side of the finest attention
            level: 16 and 8 on SD 1.5 at 512x512, the reference code's rule).
        reweight: ``{word of the target prompt: factor}`` scaling that word's cross-attention.
        local_blend: ``(source word, target word)``: outside their cross-attention masks the target latent
            is reset to the source's after each step (from ``blend_start`` of the schedule).
        blend_threshold: mask threshold on the max-normalised map (0.3 in the reference code).
        blend_start: fraction of the steps before blending starts (0.2).
    """

    mode: str = "auto"
    cross_replace_steps: Any = 0.8
    self_replace_steps: Any = 0.4
    self_max_resolution: int | None = None
    reweight: dict | None = None
    local_blend: tuple[str, str] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2


@dataclass(frozen=True)
class CrossOptions:
    """``cross``: cross-attention replacement only (P2P's cross part, no self copy, no blend).

    Args:
        mode: ``"replace"``, ``"refine"`` or ``"auto"`` as for ``p2p``.
        cross_replace_steps: steps of replacement (default the first 80%).
    """

    mode: str = "auto"
    cross_replace_steps: Any = 0.8


@dataclass(frozen=True)
class MasaCtrlOptions:
    """``masactrl``: mutual self-attention (Cao et al. 2023).

    Args:
        start_step: first edited step, as a fraction of the schedule (4 of 50 in the reference code: 0.08).
        min_resolution: decoder self-attention layers whose query grid side is at least this (default: half the
            side of the finest attention level, i.e. the decoder's two upper attention levels: the reference's
            "from the 10th layer" on SD 1.5).
        branch: ``"both"`` (the reference code edits both halves), ``"cond"`` or ``"uncond"``.
    """

    start_step: float = 0.08
    min_resolution: int | None = None
    branch: str = "both"


@dataclass(frozen=True)
class NoneOptions:
    """``none``: regenerate with the target prompt from the same noise."""


METHODS: dict[str, type] = {"fpe": FPEOptions, "p2p": P2POptions, "cross": CrossOptions,
                            "masactrl": MasaCtrlOptions, "none": NoneOptions}
"""The editing methods and their option types."""


def _options(method: str, options: dict) -> Any:
    if method not in METHODS:
        raise AttnlensError(f"unknown editing method {method!r}; valid: {choices(METHODS)}")
    cls = METHODS[method]
    names = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in options if k not in names]
    if bad:
        raise AttnlensError(f"unknown option(s) {bad} for method {method!r}; valid: {choices(names) if names else 'none'}")
    opts = cls(**options)
    for key in ("branch",):
        if hasattr(opts, key) and getattr(opts, key) not in ("cond", "uncond", "both"):
            raise AttnlensError(f"{key} must be 'cond', 'uncond' or 'both', not {getattr(opts, key)!r}")
    if getattr(opts, "path", "fused") not in ("fused", "explicit"):
        raise AttnlensError(f"path must be 'fused' or 'explicit', not {opts.path!r}")
    if getattr(opts, "mode", "auto") not in ("auto", "replace", "refine"):
        raise AttnlensError(f"mode must be 'auto', 'replace' or 'refine', not {opts.mode!r}")
    return opts


def _fraction_steps(spec: Any) -> Any:
    """A bare number ``f`` means the first ``f`` of the schedule; anything else is a Selector step spec."""
    if isinstance(spec, float) or (isinstance(spec, int) and not isinstance(spec, bool) and spec in (0, 1)):
        return (0.0, float(spec))
    return spec


# ------------------------------------------------------------------------------------------ tokens
def _ids(pipe: Any, prompt: str) -> list[int]:
    tok = pipe.tokenizer
    return list(tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)


def _content(ids: list[int], end_id: int) -> int:
    """Index of the end token."""
    return ids.index(end_id, 1) if end_id in ids[1:] else len(ids) - 1


def _alignment(pipe: Any, source: str, target: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(mapper, alpha, mode)``: for each target token, the source token whose map it takes and whether it does."""
    s, t = _ids(pipe, source), _ids(pipe, target)
    end_id = pipe.tokenizer.eos_token_id
    es, et = _content(s, end_id), _content(t, end_id)
    n = len(t)
    if mode == "auto":
        mode = "replace" if es == et else "refine"
    if mode == "replace":
        if es != et:
            raise AttnlensError(
                f"p2p mode 'replace' needs prompts with the same number of tokens (source {es - 1}, target {et - 1}); "
                "use mode='refine' (or 'auto')")
        return torch.arange(n), torch.ones(n), mode
    mapper, alpha = torch.arange(n), torch.zeros(n)
    mapper[0], alpha[0] = 0, 1.0
    for block in difflib.SequenceMatcher(None, s[1:es], t[1:et], autojunk=False).get_matching_blocks():
        for j in range(block.size):
            mapper[1 + block.b + j], alpha[1 + block.b + j] = 1 + block.a + j, 1.0
    for p in range(et, n):  # end and padding tokens follow the source's end and padding
        mapper[p], alpha[p] = min(len(s) - 1, es + (p - et)), 1.0
    return mapper, alpha, mode


def _word_tokens(pipe: Any, prompt: str, word: str) -> list[int]:
    """Token positions of a word or phrase of ``prompt`` (the cache's own lookup, with its error listing the words)."""
    cache = AttentionCache({})
    cache.tokens = [pipe.tokenizer.convert_ids_to_tokens(_ids(pipe, prompt))]
    return cache.token_indices(word, 0)


# ------------------------------------------------------------------------------------------ result
@dataclass
class EditResult:
    """An edit: ``source`` and ``edited`` images, the settings used, the start noise, optional maps.

    Attributes:
        source, edited: PIL images.
        method: the method's name; ``settings``: every option and sampling setting actually used.
        latents: the start noise ``(1, C, h, w)`` (``pipe(prompt, latents=result.latents)`` reproduces a branch).
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
    cache: Any = None
    seconds: float = 0.0
    inversion: Any = None
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


# ------------------------------------------------------------------------------------------ controllers
def _limits(method: str, opts: Any, table: Any, hw: tuple[int, int]) -> dict[str, int]:
    """The resolution thresholds in force, defaults resolved against the model's finest attention level."""
    sides = [max(i.grid(hw)) for i in table if i.kind == "self"]
    top = max(sides) if sides else max(hw)  # SD 1.5 at 512: 64; SDXL at 1024: 64 (no attention at 128)
    if method == "fpe":
        return {"max_resolution": opts.max_resolution if opts.max_resolution is not None else top // 2}
    if method == "masactrl":
        return {"min_resolution": opts.min_resolution if opts.min_resolution is not None else top // 2}
    if method == "p2p":
        return {"self_max_resolution": opts.self_max_resolution if opts.self_max_resolution is not None else top // 4}
    return {}


def _selectors(method: str, opts: Any, table: Any, hw: tuple[int, int]) -> list[tuple[str, Selector]]:
    """``(controller kind, selector)`` for each controller of a method."""
    lim = _limits(method, opts, table, hw)

    def res(i: Any) -> int:  # the layer's query grid side at this latent size
        return max(i.grid(hw))

    if method == "fpe":
        limit = lim["max_resolution"]
        return [("fpe", Selector(kind="self", layers=lambda i: res(i) <= limit, steps=_fraction_steps(opts.steps),
                                 branch=opts.branch))]
    if method == "masactrl":
        limit = lim["min_resolution"]
        return [("kv", Selector(kind="self", layers=lambda i: i.name.startswith("up.") and res(i) >= limit,
                                steps=(float(opts.start_step), 1.0), branch=opts.branch))]
    if method in ("p2p", "cross"):
        out = [("cross", Selector(kind="cross", steps=_fraction_steps(opts.cross_replace_steps)))]
        if method == "p2p" and opts.self_replace_steps:
            limit = lim["self_max_resolution"]
            # the default level may not exist on a small model: then there is no self copy (an explicit
            # self_max_resolution that matches nothing is an error, from the selector)
            if opts.self_max_resolution is not None or any(res(i) <= limit for i in table if i.kind == "self"):
                out.append(("copy", Selector(kind="self", layers=lambda i: res(i) <= limit,
                                             steps=_fraction_steps(opts.self_replace_steps))))
        return out
    return []


def _controllers(pipe: Any, method: str, opts: Any, source: str, target: str, hw: tuple[int, int]) -> list[Controller]:
    out: list[Controller] = []
    for tag, sel in _selectors(method, opts, list_layers(pipe), hw):
        if tag == "fpe":
            out.append(InjectQK(sel) if opts.path == "fused" else CopyMap(sel))
        elif tag == "kv":
            out.append(InjectKV(sel))
        elif tag == "copy":
            out.append(CopyMap(sel))
        else:
            mapper, alpha, _ = _alignment(pipe, source, target, opts.mode)
            scale = None
            if getattr(opts, "reweight", None):
                factors = torch.ones(len(mapper))
                for word, f in opts.reweight.items():
                    factors[_word_tokens(pipe, target, word)] = float(f)
                scale = {1: factors}
            out.append(CrossMapEdit(sel, {1: mapper}, {1: alpha}, scale, None))
    return out


def default_layers(pipe_or_unet: Any, method: str = "fpe", latent_size: tuple[int, int] | None = None,
                   **options: Any) -> list[str]:
    """The attention layers ``method`` edits on a model with these options (names, in execution order).

    The defaults are relative to the model's finest attention level: ``fpe`` edits self-attention at every
    level but that one, ``p2p`` copies self-attention at a quarter of its side and below, ``masactrl``
    edits the decoder's self-attention at half its side and above. Works on a pipeline or a bare UNet
    (also on the ``meta`` device). ``latent_size``: ``(h, w)`` of the latents (default: the UNet's).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> default_layers(tiny_pipeline(), "fpe")
        ['mid.0.self']
        >>> default_layers(tiny_pipeline(), "masactrl")
        ['up.1.0.self', 'up.1.1.self']
    """
    opts = _options(method, options)
    table = list_layers(pipe_or_unet)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    hw = tuple(latent_size) if latent_size is not None else (unet.config.sample_size, unet.config.sample_size)
    names = set()
    for _, sel in _selectors(method, opts, table, hw):
        names |= {i.name for i in sel.match(table)}
    return [i.name for i in table if i.name in names]


def _settings(method: str, opts: Any, hw: tuple[int, int], steps: int, guidance: float, seed: Any, pipe: Any,
              source: str = "", target: str = "") -> dict:
    out = {"method": method, **dataclasses.asdict(opts), "num_inference_steps": steps, "guidance_scale": guidance,
           "seed": seed, "latent_size": list(hw)}
    out.update(_limits(method, opts, list_layers(pipe), hw))
    if method in ("p2p", "cross"):
        out["mode"] = _alignment(pipe, source, target, opts.mode)[2]  # the mode used, "auto" resolved
    return out


def _edited_layers(pipe: Any, ctrls: list[Controller]) -> dict[str, list[str]]:
    table = list_layers(pipe)
    return {type(c).__name__: [i.name for i in c.selector.match(table)] for c in ctrls}


def start_noise(pipe: Any, seed: int = 0, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The start latents ``(1, C, h, w)`` that ``pipe(prompt, generator=torch.Generator().manual_seed(seed))``
    draws (a CPU generator, so a seed means the same noise on every device)."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = get_unet(pipe)
    scale = getattr(pipe, "vae_scale_factor", 8)
    h = (height or unet.config.sample_size * scale) // scale
    w = (width or unet.config.sample_size * scale) // scale
    gen = torch.Generator().manual_seed(int(seed))
    return randn_tensor((1, unet.config.in_channels, h, w), generator=gen, device=torch.device("cpu"),
                        dtype=unet.dtype)


def _to_pil(images: Any) -> list[Image.Image]:
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return images
    arr = images if isinstance(images, np.ndarray) else images.float().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arr]


# ------------------------------------------------------------------------------------------ edit
def _check_prompt(name: str, prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise AttnlensError(f"{name} must be a string, not {type(prompt).__name__}")


def _run(pipe: Any, method: str, opts: Any, source: str, target: str, latents: torch.Tensor, steps: int,
         guidance: float, capture: Any, negative_prompt: Any, callbacks: list, embeds: dict | None,
         height: int | None, width: int | None) -> tuple[list[Image.Image], Any]:
    ctrls = _controllers(pipe, method, opts, source, target, tuple(latents.shape[-2:]))
    blend = getattr(opts, "local_blend", None)
    with contextlib.ExitStack() as stack:
        for ctrl in ctrls:
            stack.enter_context(control(pipe, ctrl))
        user_cache = None
        if capture:
            kwargs = {} if capture is True else dict(capture)
            kwargs.setdefault("prompts", None)
            user_cache = stack.enter_context(_capture(pipe, **kwargs))
        if blend is not None:
            callbacks = callbacks + [_local_blend(pipe, stack, opts, source, target, steps)]

        def on_step_end(p, i, t, kw):
            out = {}
            for cb in callbacks:
                out.update(cb(i, {**kw, **out}) or {})
            return out

        call = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    latents=latents.expand(2, *latents.shape[1:]).to(pipe.device, get_unet(pipe).dtype))
        if height or width:
            call.update(height=height, width=width)
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
    return images, user_cache, _edited_layers(pipe, ctrls)


def _local_blend(pipe: Any, stack: contextlib.ExitStack, opts: P2POptions, source: str, target: str, steps: int):
    """A step-end callback: outside the union of the two words' masks, the target latent := the source's."""
    ws, wt = opts.local_blend
    cands = [i for i in list_layers(pipe) if i.kind == "cross" and not i.name.startswith("mid")]
    names = [i.name for i in cands if i.level == max(c.level for c in cands)]  # the P2P recipe's layers
    cache = stack.enter_context(_capture(pipe, layers=names, prompts=[0, 1], dtype=torch.float32))
    start = int(opts.blend_start * steps)

    def cb(i: int, kw: dict) -> dict:
        if i < start:
            return {}
        maps = torch.stack([cache[name, i].mean(dim=1) for name in names]).mean(dim=0)  # (2, h, w, 77)
        masks = []
        for prompt, word, text in ((0, ws, source), (1, wt, target)):
            idx = _word_tokens(pipe, text, word)
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
         height: int | None = None, width: int | None = None, **options: Any) -> EditResult:
    """Edit the image of ``source_prompt`` into ``target_prompt`` with ``method`` (see :data:`METHODS`).

    Source and target are generated together (a batch ``[source, target]``) from the same start noise:
    ``latents`` ``(1, C, h, w)`` if given, else drawn from ``seed`` exactly as
    ``pipe(source_prompt, generator=torch.Generator().manual_seed(seed))`` draws it. The source image is
    the one the pipeline makes for the source prompt alone. ``options`` are the method's (see
    :class:`FPEOptions`, :class:`P2POptions`, :class:`CrossOptions`, :class:`MasaCtrlOptions`).
    ``capture=True`` (or a dict of :func:`attnlens.capture` arguments) records the maps used while editing.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> r = edit(pipe, "a red star", "a blue star", method="fpe", num_inference_steps=4)
        >>> r.source.size, r.settings["steps"], r.settings["max_resolution"]
        ((16, 16), (0.0, 0.8), 4)
    """
    _check_prompt("source_prompt", source_prompt)
    _check_prompt("target_prompt", target_prompt)
    opts = _options(method, options)
    given = latents is not None
    if latents is None:
        latents = start_noise(pipe, seed, height, width)
    elif latents.ndim != 4 or latents.shape[0] != 1:
        raise AttnlensError(f"latents must be (1, C, h, w), not {tuple(latents.shape)}")
    t0 = time.perf_counter()
    pixels, cache, edited = _run(pipe, method, opts, source_prompt, target_prompt, latents, num_inference_steps,
                                 guidance_scale, capture, negative_prompt, [], None, height, width)
    src, out = _to_pil(pixels)
    settings = _settings(method, opts, tuple(latents.shape[-2:]), num_inference_steps, guidance_scale,
                         None if given else seed, pipe, source_prompt, target_prompt)
    settings.update(source_prompt=source_prompt, target_prompt=target_prompt, edited_layers=edited)
    return EditResult(src, out, method, settings, latents, cache, time.perf_counter() - t0, pixels=pixels.cpu())


# ------------------------------------------------------------------------------------------ real images
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


def _prepare_image(pipe: Any, image: Any, size: tuple[int, int] | None) -> tuple[Image.Image, list[str]]:
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


def _encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = pipe.vae
    x = x.to(pipe.device, vae.dtype)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return z * vae.config.scaling_factor


def _decode(pipe: Any, z: torch.Tensor) -> Image.Image:
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    return _to_pil((x / 2 + 0.5).clamp(0, 1))[0]


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
    _check_prompt("prompt", prompt)
    img, notices = _prepare_image(pipe, image, size)
    unet = get_unet(pipe)
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=pipe.device)
    ts = [int(t) for t in sched.timesteps]
    n = len(ts)
    t0 = time.perf_counter()
    emb = _embed(pipe, prompt)
    z = _encode_image(pipe, img)
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
        inv.vae_error = float(np.abs(np.asarray(_decode(pipe, z), dtype=np.float32) / 255 - target).mean())
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
    return _decode(pipe, x)


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
    opts = _options(method, options)
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
            pe[: pe.shape[0] // 2] = inv.null_embeddings[i + 1].to(pe.device, pe.dtype)
            out["prompt_embeds"] = pe
        return out

    embeds = None
    if inv.null_embeddings is not None and guidance_scale > 1:
        with torch.no_grad():
            pe, _ = pipe.encode_prompt([source_prompt, target_prompt], pipe.device, 1, False)
        neg = inv.null_embeddings[:1].to(pe.device, pe.dtype).expand(2, -1, -1)
        embeds = {"prompt_embeds": pe, "negative_prompt_embeds": neg}
    pixels, cache, edited = _run(pipe, method, opts, source_prompt, target_prompt, path[:1], num_inference_steps,
                                 guidance_scale, capture, None, [follow], embeds, None, None)
    src, out = _to_pil(pixels)
    settings = _settings(method, opts, tuple(path.shape[-2:]), num_inference_steps, guidance_scale, None, pipe,
                         source_prompt, target_prompt)
    settings.update(source_prompt=source_prompt, target_prompt=target_prompt,
                    inversion="null-text" if inv.null_embeddings is not None else "ddim", edited_layers=edited)
    return EditResult(src, out, method, settings, path[:1].cpu(), cache, time.perf_counter() - t0, inv, pixels.cpu())
