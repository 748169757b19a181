"""The editing methods: their option types, their layer rules and their controllers, planned once per edit.

Every method generates the source and the target together from the same start noise (a batch of two
prompts, source first) and differs only in what it does to the target's attention:

============ ==================================================================================
``fpe``      self-attention at every level but the highest-resolution one, first 80% of steps,
             conditional branch: target output = softmax(Q_src K_src^T / sqrt(d)) V_tgt
``p2p``      Prompt-to-Prompt: cross-attention maps replaced (word swap) or aligned (refine), optional
             reweighting and local blend, plus a self-attention map copy at the low-resolution levels
``cross``    cross-attention replacement only (the configuration the paper blames for leakage)
``masactrl`` target queries attend to the source's keys and values in the decoder's upper levels
``none``     the target prompt from the same noise, nothing injected
============ ==================================================================================

Defaults are the reference codes' settings expressed relative to the model (levels by their size
relative to the model's finest attention level, steps as fractions of the schedule), so they mean the
same on SD 1.5 at 512x512 (64x64 latents) and on the Shapes model (16x16 latents). :func:`plan` turns a
method, its options and the two prompts into one :class:`EditPlan` (settings, limits, alignment and
controllers computed once, against one layer table) that :func:`attnlens.edit` executes;
:func:`default_layers` lists the layers a method edits on a given model.

Diffusion transformers (PixArt, SD3, Flux; :mod:`attnlens._dit`) have one token grid at every depth, so
a resolution rule selects all of their layers or none: there the layers are chosen by block depth.

* ``fpe``: the image->image attention of **every block** (``*.self``: PixArt's self-attention, the image
  view of SD3's and Flux's joint and single-stream attention, SD3.5's second image-only attention). Why:
  Stable Flow (Avrahami et al., CVPR 2025, arXiv 2411.14430) observes that a DiT lacks the UNet's
  coarse-to-fine structure, so the UNet-era injection rules do not carry over, and finds the layers that
  matter for image formation in Flux ("vital layers": bypass one layer, measure how much the image
  changes) to be a model-specific set spread over the depth rather than one contiguous band; it injects
  the reference image's attention keys and values only there. No depth band is known to carry layout
  across PixArt, SD3 and Flux, so the default is the neutral one, every block (the analogue of FPE's
  "every level but one"), and ``layers=`` restricts it to a measured set (e.g. Stable Flow's vital layers
  of a given model, or ``"joint.*.self"``).
* ``masactrl``: the image->image attention of the **deeper half** of the blocks (block depth
  ``>= depth // 2``, :func:`attnlens._dit.block_depth`): the reference edits the second half of SD 1.5's
  16 attention layers (the decoder's upper levels, "from the 10th layer"), and depth is the axis that
  rule keeps on a transformer.
* ``p2p`` / ``cross``: the image->text quadrant of every block (``*.cross``), word swap only (``mode``
  ``"replace"``, prompts with the same number of tokens under every tokenizer whose tokens are text
  keys), no reweighting, local blend or self-attention copy; on joint attention the swapped text part is
  renormalised to the target's own text mass (:mod:`attnlens._joint`).

How a controller acts on joint attention (the image tokens' q/k/v, the text part of the softmax) is
documented in :mod:`attnlens._joint`.

Imports the mechanism (``_control``, ``_select``, ``_layers``, ``_prompts``); imported by ``_editing``
(which runs plans) and by the cache (the P2P layer rule).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ._control import Controller, Site
from ._hooks import MapEdit
from ._errors import AttnlensError, choices
from ._layers import LayerInfo, LayerTable, layers as list_layers
from ._prompts import alignment, token_indices, tokenize
from ._select import Selector, fraction_window


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
        path: ``"fused"`` (source Q, K into fused attention) or ``"explicit"`` (materialised map, the reference;
            UNets and PixArt only).
        layers: the self-attention layers to edit instead of the default rule: a glob, a list of names or a
            callable, as :class:`Selector`'s ``layers`` (``"block.1[0-9].self"``, ``["joint.3.self"]``); every layer
            it picks must be a ``*.self`` layer. The default on a diffusion transformer is every block's image->image
            attention (the module docstring says why); ``max_resolution`` has no meaning there.
    """

    max_resolution: int | None = None
    steps: Any = (0.0, 0.8)
    branch: str = "cond"
    path: str = "fused"
    layers: Any = None


@dataclass(frozen=True)
class P2POptions:
    """``p2p``: Prompt-to-Prompt (Hertz et al. 2022).

    Args:
        mode: ``"replace"`` (prompts with the same number of tokens: every target token takes the source's map),
            ``"refine"`` (token alignment: aligned tokens take the source's map, new tokens keep their own), or
            ``"auto"`` (replace when the token counts match, else refine).
        cross_replace_steps: steps (fraction of the schedule, or a Selector step spec) of cross-attention editing.
            A fraction ``f`` (or range) is counted as the reference code counts it, over a table of ``n + 1``
            entries: steps ``i < int(f * (n + 1))`` (40 of 50, 10 of 12 for 0.8); see ``attnlens._methods.p2p_cross_steps``.
        self_replace_steps: steps of the self-attention map copy (``0`` or ``None``: no copy); a fraction ``f``
            means steps ``i < int(f * n)`` as in the reference code (20 of 50, 4 of 12 for 0.4).
        self_max_resolution: self-attention levels copied (default: a quarter of the side of the finest attention
            level: 16 and 8 on SD 1.5 at 512x512, the reference code's rule).
        reweight: ``{word of the target prompt: factor}`` scaling that word's cross-attention.
        local_blend: ``(source word, target word)``: outside their cross-attention masks the target latent
            is reset to the source's after each step (from ``blend_start`` of the schedule). As in the
            reference notebooks, the masks come from the maps summed over every step so far (step 0 to the
            current one), not from the current step's maps alone.
        blend_threshold: mask threshold on the max-normalised map (0.3 in the reference code).
        blend_start: fraction of the steps before blending starts: steps ``i >= int(blend_start * n)`` blend.
            0.2 is the null-text inversion notebook's value (``start_blend=0.2``); the Stable Diffusion
            notebook blends from step 0 (``blend_start=0.0``).

    On a diffusion transformer (PixArt, SD3, Flux) only the word swap runs: ``mode`` ``"replace"`` (or ``"auto"``
    resolving to it), every block's image->text attention, no ``reweight``, ``local_blend`` or self-attention
    copy; on joint attention the swapped distribution over the text keys keeps the target's own text mass.
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
        start_step: first edited step, as a fraction of the schedule (4 of 50 in the reference code: 0.08), rounded
            up: steps ``i >= ceil(start_step * n)`` are edited, so at least the reference's share of the first steps
            keeps its own attention (step 1 of 12, 2 of 20); see :class:`InjectKV`.
        min_resolution: decoder self-attention layers whose query grid side is at least this (default: half the
            side of the finest attention level, i.e. the decoder's two upper attention levels: the reference's
            "from the 10th layer" on SD 1.5).
        branch: ``"both"`` (the reference code edits both halves), ``"cond"`` or ``"uncond"``.
        layers: the self-attention layers to edit instead of the default rule (as :class:`FPEOptions`' ``layers``).
            The default on a diffusion transformer is the deeper half of the blocks' image->image attention;
            ``min_resolution`` has no meaning there.
    """

    start_step: float = 0.08
    min_resolution: int | None = None
    branch: str = "both"
    layers: Any = None


@dataclass(frozen=True)
class NoneOptions:
    """``none``: regenerate with the target prompt from the same noise."""


METHODS: dict[str, type] = {"fpe": FPEOptions, "p2p": P2POptions, "cross": CrossOptions,
                            "masactrl": MasaCtrlOptions, "none": NoneOptions}
"""The editing methods and their option types."""


def options_for(method: str, options: dict) -> Any:
    """The option object of ``method`` built from keyword ``options``; a clear error for unknown names or values.

    Example:
        >>> options_for("fpe", {"max_resolution": 8})
        FPEOptions(max_resolution=8, steps=(0.0, 0.8), branch='cond', path='fused', layers=None)
    """
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
    _check_values(method, opts)
    return opts


def _check_values(method: str, opts: Any) -> None:
    """An :class:`AttnlensError` naming the first option of ``opts`` whose value has the wrong type or range."""
    import numbers

    def real(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    for f in dataclasses.fields(opts):
        name, value = f.name, getattr(opts, f.name)
        where = f"option {name} of method {method!r}"
        if name in ("max_resolution", "self_max_resolution", "min_resolution"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise AttnlensError(f"{where} must be None (the default rule) or a grid side >= 1 (int), not {value!r}")
        elif name in ("steps", "cross_replace_steps", "self_replace_steps"):
            if name == "self_replace_steps" and (value is None or (real(value) and value == 0)):
                continue  # no self-attention copy
            if isinstance(value, float) and not 0 <= value <= 1:
                raise AttnlensError(f"{where} must be a fraction of the schedule in 0..1 or a step selection, not {value!r}")
            try:
                Selector(steps=_fraction_steps(value))
            except AttnlensError as exc:
                raise AttnlensError(f"{where}: {exc}") from None
        elif name in ("start_step", "blend_start"):
            if not real(value) or not 0 <= value <= 1:
                raise AttnlensError(f"{where} must be a fraction of the schedule in 0..1, not {value!r}")
        elif name == "blend_threshold":  # any number: above 1 no mask, below 0 all of it
            if not real(value) or value != value:
                raise AttnlensError(f"{where} must be a number (0.3 in the reference code), not {value!r}")
        elif name == "reweight":
            if value is not None and not (isinstance(value, dict) and all(
                    isinstance(k, (str, int)) and not isinstance(k, bool) and real(v) for k, v in value.items())):
                raise AttnlensError(f"{where} must be None or a dict {{word of the target prompt: factor}}, "
                                    f"e.g. {{'red': 2.0}}, not {value!r}")
        elif name == "layers":
            if value is not None:
                try:
                    Selector(layers=value)
                except AttnlensError as exc:
                    raise AttnlensError(f"{where}: {exc}") from None
        elif name == "local_blend":
            if value is not None and not (isinstance(value, (tuple, list)) and len(value) == 2
                                          and all(isinstance(w, str) for w in value)):
                raise AttnlensError(f"{where} must be None or a pair (source word, target word), e.g. "
                                    f"('star', 'circle'), not {value!r}")


def _check_words(pipe: Any, opts: Any, source: str, target: str) -> None:
    """Before anything runs: the local-blend words are words of their prompts and the reweighted words of the target."""
    blend = getattr(opts, "local_blend", None)
    reweight = getattr(opts, "reweight", None)
    if blend is None and not reweight:
        return
    tokens = tokenize(getattr(pipe, "tokenizer", None), [source, target])
    checks = [("local_blend", 0, blend[0]), ("local_blend", 1, blend[1])] if blend is not None else []
    checks += [("reweight", 1, word) for word in reweight or {}]
    for name, prompt, word in checks:
        try:
            token_indices(tokens[prompt], word, prompt)
        except AttnlensError as exc:
            raise AttnlensError(f"option {name}: {exc} (prompt 0 is the source, prompt 1 the target)") from None


def _is_fraction(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, float) for x in spec)


def p2p_cross_steps(spec: Any, n_steps: int) -> set[int]:
    """The steps Prompt-to-Prompt's cross-attention replacement edits in a schedule of ``n_steps``.

    The reference code (``get_time_words_attention_alpha``) builds a table of ``n_steps + 1`` rows and
    sets rows ``int(lo * (n + 1))`` to ``int(hi * (n + 1))`` for a fraction ``hi`` (or a range ``(lo, hi)``);
    step ``i`` reads row ``i``. Any other step spec is a :class:`Selector` step spec.

    Example:
        >>> sorted(p2p_cross_steps(0.8, 12)), len(p2p_cross_steps(0.8, 50)), sorted(p2p_cross_steps([0, 2], 4))
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 40, [0, 2])
    """
    spec = _fraction_steps(spec)
    if not _is_fraction(spec):
        return Selector(steps=spec).step_indices(n_steps)
    lo, hi = spec
    if not 0.0 <= lo <= hi <= 1.0:
        raise AttnlensError(f"a fraction range of steps needs 0 <= start <= end <= 1, got {spec}")
    return set(range(n_steps)[fraction_window(lo, hi, n_steps + 1)])


def _fraction_steps(spec: Any) -> Any:
    """A bare number ``f`` means the first ``f`` of the schedule; anything else is a Selector step spec."""
    if isinstance(spec, float) or (isinstance(spec, int) and not isinstance(spec, bool) and spec in (0, 1)):
        return (0.0, float(spec))
    return spec


# ------------------------------------------------------------------------------------------ layer rules
def p2p_layers(table: list[LayerInfo]) -> list[str]:
    """Prompt-to-Prompt's layers for its word maps (local blend, the cache's :meth:`~attnlens.AttentionCache.p2p_maps`):
    cross-attention of the down and up blocks at the coarsest level they reach, the mid block excluded (relative to
    the model: the 16x16 maps of SD 1.x at 512x512, the 8x8 maps of the Shapes model).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> p2p_layers(list_layers(tiny_pipeline()))
        ['down.0.0.cross', 'up.1.0.cross', 'up.1.1.cross']
    """
    cands = [i for i in table if i.kind == "cross" and not i.name.startswith("mid")]
    if not cands:
        raise AttnlensError("Prompt-to-Prompt's recipe needs cross-attention layers of the down and up blocks; none was captured")
    deepest = max(i.level for i in cands)
    return [i.name for i in cands if i.level == deepest]


def _dit_limits(method: str, opts: Any, table: Any) -> dict[str, int]:
    """A transformer's rules (block depth, :mod:`attnlens._dit`): an error for the options that have no meaning on
    one, and the depth threshold in force for ``masactrl``."""
    from ._dit import block_depth

    for name in ("max_resolution", "min_resolution", "self_max_resolution"):
        if getattr(opts, name, None) is not None:
            raise AttnlensError(f"option {name} of method {method!r} selects UNet levels by resolution; a diffusion "
                                "transformer has one token grid at every depth: choose its layers by name with "
                                "layers= (e.g. 'joint.1*.self'), or leave the default rule (by block depth)")
    if method == "fpe" and opts.path == "explicit" and any(i.stream in ("joint", "single") for i in table):
        raise AttnlensError("FPE's path='explicit' (the materialised map copy) is the UNet and PixArt reference path; "
                            "on joint attention (SD3, Flux) use path='fused'")
    if method == "p2p" and opts.local_blend is not None:
        raise AttnlensError("p2p's local_blend is not supported on diffusion transformers (its masks are the UNet "
                            "recipe's); use local_blend=None")
    if method in ("p2p", "cross") and getattr(opts, "reweight", None):
        raise AttnlensError("p2p's reweight is not supported on diffusion transformers; word swap (mode='replace') is")
    if method == "masactrl":
        depth = block_depth(table)
        return {"min_block": (max(depth.values()) + 1) // 2}
    return {}


def _chosen(method: str, spec: Any, table: Any) -> set[str]:
    """The names an explicit ``layers=`` option picks; an error unless they are all self-attention layers."""
    picked = Selector(layers=spec).match(table)
    wrong = [i.name for i in picked if i.kind != "self"]
    if wrong:
        valid = [i.name for i in table if i.kind == "self"]
        raise AttnlensError(f"option layers of method {method!r} picks {wrong}, which are not self-attention "
                            f"(image->image) layers; valid: {', '.join(valid)}")
    return {i.name for i in picked}


def _limits(method: str, opts: Any, table: Any, hw: tuple[int, int]) -> dict[str, int]:
    """The resolution thresholds in force, defaults resolved against the model's finest attention level."""
    from ._dit import is_dit_table

    if is_dit_table(table):
        return _dit_limits(method, opts, table)
    sides = [max(i.grid(hw)) for i in table if i.kind == "self"]
    top = max(sides) if sides else max(hw)  # SD 1.5 at 512: 64; SDXL at 1024: 64 (no attention at 128)
    if method == "fpe":
        return {"max_resolution": opts.max_resolution if opts.max_resolution is not None else top // 2}
    if method == "masactrl":
        return {"min_resolution": opts.min_resolution if opts.min_resolution is not None else top // 2}
    if method == "p2p":
        return {"self_max_resolution": opts.self_max_resolution if opts.self_max_resolution is not None else top // 4}
    return {}


def _selectors(method: str, opts: Any, table: Any, hw: tuple[int, int], lim: dict[str, int]) -> list[tuple[str, Selector]]:
    """``(controller kind, selector)`` for each controller of a method."""

    def res(i: Any) -> int:  # the layer's query grid side at this latent size
        return max(i.grid(hw))

    from ._dit import block_depth, is_dit_table

    if method in ("fpe", "masactrl") and getattr(opts, "layers", None) is not None:
        names = _chosen(method, opts.layers, table)
        if method == "fpe":
            return [("fpe", Selector(kind="self", layers=lambda i: i.name in names, steps=_fraction_steps(opts.steps),
                                     branch=opts.branch))]
        return [("kv", Selector(kind="self", layers=lambda i: i.name in names, branch=opts.branch))]
    if is_dit_table(table):
        if method == "fpe":
            return [("fpe", Selector(kind="self", steps=_fraction_steps(opts.steps), branch=opts.branch))]
        if method == "masactrl":
            depth, first = block_depth(table), lim["min_block"]
            return [("kv", Selector(kind="self", layers=lambda i: depth[i.name] >= first, branch=opts.branch))]
        if method in ("p2p", "cross"):
            spec = _fraction_steps(opts.cross_replace_steps)
            return [("cross", Selector(kind="cross", steps=None if _is_fraction(spec) else spec))]
        return []

    if method == "fpe":
        limit = lim["max_resolution"]
        return [("fpe", Selector(kind="self", layers=lambda i: res(i) <= limit, steps=_fraction_steps(opts.steps),
                                 branch=opts.branch))]
    if method == "masactrl":
        limit = lim["min_resolution"]
        return [("kv", Selector(kind="self", layers=lambda i: i.name.startswith("up.") and res(i) >= limit,
                                branch=opts.branch))]
    if method in ("p2p", "cross"):
        spec = _fraction_steps(opts.cross_replace_steps)
        # a fraction window is counted by the controller (P2P's n + 1 table), other specs by the selector
        out = [("cross", Selector(kind="cross", steps=None if _is_fraction(spec) else spec))]
        if method == "p2p" and opts.self_replace_steps:
            limit = lim["self_max_resolution"]
            # the default level may not exist on a small model: then there is no self copy (an explicit
            # self_max_resolution that matches nothing is an error, from the selector)
            if opts.self_max_resolution is not None or any(res(i) <= limit for i in table if i.kind == "self"):
                out.append(("copy", Selector(kind="self", layers=lambda i: res(i) <= limit,
                                             steps=_fraction_steps(opts.self_replace_steps))))
        return out
    return []


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class EditPlan:
    """What an edit does, computed once: the method's options and limits, the controllers with their layers.

    Attributes:
        method: the method's name; ``options``: its option object (:class:`FPEOptions`, ...).
        limits: the resolution thresholds in force (defaults resolved against the model); on a diffusion
            transformer, ``min_block`` (MasaCtrl's first edited block depth) or nothing.
        mode: for ``p2p`` and ``cross``, the alignment mode used (``"auto"`` resolved), else ``None``.
        controllers: the controllers to install, in order; ``layers``: ``{controller class name: layer names}``.
        settings: the method and every option as plain values (an edit adds its sampling settings, the limits
            and the mode).
        blend_layers: the layers whose maps a ``p2p`` local blend reads (else empty).
    """

    method: str
    options: Any
    limits: dict
    mode: str | None
    controllers: list
    layers: dict
    settings: dict
    blend_layers: list


def plan(pipe: Any, method: str, options: Any, source: str, target: str, latent_hw: tuple[int, int],
         table: LayerTable | None = None) -> EditPlan:
    """Plan an edit of ``source`` into ``target`` with ``method`` at latents of ``latent_hw`` (``(h, w)``).

    ``options`` is the method's option object or a dict of its keywords.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> p = plan(tiny_pipeline(), "fpe", {}, "a red star", "a blue star", (8, 8))
        >>> p.layers, p.limits
        ({'InjectQK': ['mid.0.self']}, {'max_resolution': 4})
    """
    opts = options_for(method, options) if isinstance(options, dict) else options
    _check_words(pipe, opts, source, target)
    table = list_layers(pipe) if table is None else table
    hw = tuple(latent_hw)
    lim = _limits(method, opts, table, hw)
    mode = None
    mapper = alpha = None
    if method in ("p2p", "cross"):
        from ._dit import is_dit_table

        if is_dit_table(table):
            mode = _dit_word_swap(pipe, source, target, opts.mode)
        else:
            mapper, alpha, mode = alignment(pipe.tokenizer, source, target, opts.mode)
    ctrls: list[Controller] = []
    for tag, sel in _selectors(method, opts, table, hw, lim):
        if tag == "fpe":
            ctrls.append(InjectQK(sel) if opts.path == "fused" else CopyMap(sel))
        elif tag == "kv":
            ctrls.append(InjectKV(sel, start=float(opts.start_step)))
        elif tag == "copy":
            ctrls.append(CopyMap(sel))
        else:
            scale = None
            if getattr(opts, "reweight", None):
                tokens = tokenize(pipe.tokenizer, target)[0]
                factors = torch.ones(len(mapper))
                for word, f in opts.reweight.items():
                    factors[token_indices(tokens, word)] = float(f)
                scale = {1: factors}
            window = _fraction_steps(opts.cross_replace_steps)
            ctrls.append(CrossMapEdit(sel, {1: mapper}, {1: alpha}, scale, window if _is_fraction(window) else None))
            # mapper None (a transformer's word swap): every text key takes the source's map of the same key
    edited = {type(c).__name__: [i.name for i in c.selector.match(table)] for c in ctrls}
    settings = {"method": method, **dataclasses.asdict(opts)}
    blend = p2p_layers(table) if getattr(opts, "local_blend", None) is not None else []
    return EditPlan(method, opts, lim, mode, ctrls, edited, settings, blend)


def _dit_word_swap(pipe: Any, source: str, target: str, mode: str) -> str:
    """Prompt-to-Prompt on a transformer: word swap (``"replace"``) only, and only when the prompts have the same
    number of tokens under every tokenizer whose tokens are text keys (:func:`attnlens._dit.text_tokenizers`)."""
    from ._dit import text_tokenizers

    if mode == "refine":
        raise AttnlensError("p2p mode 'refine' (token alignment) is not supported on diffusion transformers; word swap "
                            "(mode='replace', prompts with the same number of tokens) is, and so are fpe and masactrl")
    for name, tok in text_tokenizers(pipe):
        try:
            alignment(tok, source, target, "replace")
        except AttnlensError:
            counts = [len(tok(p).input_ids) for p in (source, target)]
            raise AttnlensError(
                f"p2p on a diffusion transformer swaps words between prompts with the same number of tokens; under "
                f"pipe.{name} the source has {counts[0]} and the target {counts[1]}. Use prompts whose swapped words "
                "have the same token count, or method='fpe' / 'masactrl', which take any prompts") from None
    return "replace"


def default_layers(pipe_or_unet: Any, method: str = "fpe", latent_size: tuple[int, int] | None = None,
                   **options: Any) -> list[str]:
    """The attention layers ``method`` edits on a model with these options (names, in execution order).

    The defaults are relative to the model's finest attention level: ``fpe`` edits self-attention at every
    level but that one, ``p2p`` copies self-attention at a quarter of its side and below, ``masactrl``
    edits the decoder's self-attention at half its side and above. On a diffusion transformer the rules go by
    block depth (``fpe``: every block, ``masactrl``: the deeper half; see the module docstring). Works on a
    pipeline, a bare UNet or a bare transformer (also on the ``meta`` device). ``latent_size``: ``(h, w)`` of
    the latents (default: the denoiser's).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> default_layers(tiny_pipeline(), "fpe")
        ['mid.0.self']
        >>> default_layers(tiny_pipeline(), "masactrl")
        ['up.1.0.self', 'up.1.1.self']
    """
    opts = options_for(method, options)
    table = list_layers(pipe_or_unet)
    unet = getattr(pipe_or_unet, "unet", None) or getattr(pipe_or_unet, "transformer", None) or pipe_or_unet
    side = getattr(unet.config, "sample_size", None) or getattr(pipe_or_unet, "default_sample_size", 64)
    hw = tuple(latent_size) if latent_size is not None else (side, side)
    names = set()
    for _, sel in _selectors(method, opts, table, hw, _limits(method, opts, table, hw)):
        names |= {i.name for i in sel.match(table)}
    return [i.name for i in table if i.name in names]


# ------------------------------------------------------------------------------------------ controllers
def _pairs(site: Site, branch: str) -> list[tuple[int, int]]:
    """``(source row, target row)`` for every target prompt (1..n-1) in the selected branches."""
    return [(site.row(0, b), site.row(t, b)) for b in site.branches(branch) for t in range(1, site.n_prompts)]


class _InjectRows(Controller):
    """Target rows of two of q, k, v (``parts``) := the source's; attention stays fused."""

    parts: tuple[int, int]  # indices into (q, k, v)

    def rewrite(self, site: Site, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = _pairs(site, self.selector.branch)
        if not pairs:
            return q, k, v
        rows = list(range(q.shape[0]))
        for s, t in pairs:
            rows[t] = s
        index = torch.tensor(rows, device=q.device)
        qkv = [q, k, v]
        for i in self.parts:  # one gather per tensor: every row from itself, targets from their source
            qkv[i] = qkv[i].index_select(0, index)
        return tuple(qkv)


class InjectQK(_InjectRows):
    """Free-Prompt Editing, fused: target queries and keys := the source's, so the target's output is
    ``softmax(Q_src K_src^T / sqrt(d)) V_tgt`` without materialising the map.

    The built-in controllers work on a batch ``[source, target, ...]`` (prompt 0 is the source) and compose
    with :func:`attnlens.control` like any :class:`~attnlens.Controller`.

    Example (FPE by hand on the mid block, source and target in one batch):
        >>> import torch
        >>> from attnlens import Selector, control
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with control(pipe, InjectQK(Selector(kind="self", layers="mid.*", steps=(0.0, 0.8)))):
        ...     out = pipe(["a red star", "a blue star"], num_inference_steps=2, output_type="pt",
        ...                generator=torch.Generator().manual_seed(0)).images
        >>> out.shape
        torch.Size([2, 3, 16, 16])
    """

    parts = (0, 1)


class CopyMap(Controller):
    """The target's attention map := the source's (explicit map: FPE's reference path, P2P's self copy)."""

    def edit_map(self, site: Site) -> MapEdit | None:
        pairs = _pairs(site, self.selector.branch)
        if not pairs:
            return None

        def fn(start: int, probs: torch.Tensor) -> torch.Tensor:
            probs = probs.clone()
            for s, t in pairs:
                probs[t] = probs[s]
            return probs

        return fn


class InjectKV(_InjectRows):
    """MasaCtrl's mutual self-attention: target queries attend to the source's keys and values.

    ``start`` (optional): the first edited step as a fraction of the schedule, rounded up (``ceil(start * n)``:
    the reference code's integer ``start_step``, 4 of 50, as a share that skips at least as many steps);
    ``None``: the selector's steps.
    """

    parts = (1, 2)

    def __init__(self, selector: Selector | None = None, start: float | None = None) -> None:
        super().__init__(selector)
        self.start = start

    def _step_indices(self, n_steps: int) -> set[int]:
        steps = self.selector.step_indices(n_steps)
        if self.start is None:
            return steps
        if not 0.0 <= self.start <= 1.0:
            raise AttnlensError(f"start_step must be a fraction of the schedule in [0, 1], not {self.start!r}")
        first = math.ceil(round(self.start * n_steps, 9))  # 0.08 * 75 is 6.000000000000001 in floats: step 6
        return {i for i in steps if i >= first}


class CrossMapEdit(Controller):
    """Prompt-to-Prompt on cross-attention maps of each target prompt ``t`` (branch per the selector).

    ``mapper[t]``: ``(77,)`` source token index for each target token, or ``None``: every key takes the source's
    map of the same key (word swap on a transformer, whose text keys may be 77 CLIP plus T5 tokens);
    ``alpha[t]``: ``(77,)`` 1 where the target token takes the source's (mapped) map, 0 where it keeps its own; ``scale[t]``: ``(77,)`` factors
    applied afterwards (reweighting). ``window``: a fraction range ``(lo, hi)`` of the schedule counted as
    the reference code counts it (``attnlens._methods.p2p_cross_steps``, over ``n + 1`` entries); ``None``: the
    selector's steps.
    """

    def __init__(self, selector: Selector, mapper: dict[int, torch.Tensor], alpha: dict[int, torch.Tensor],
                 scale: dict[int, torch.Tensor] | None, window: tuple[float, float] | None = None) -> None:
        super().__init__(selector)
        self.mapper, self.alpha, self.scale, self.window = mapper, alpha, scale or {}, window

    def _step_indices(self, n_steps: int) -> set[int]:
        steps = self.selector.step_indices(n_steps)
        return steps if self.window is None else steps & p2p_cross_steps(self.window, n_steps)

    def edit_map(self, site: Site) -> MapEdit | None:
        todo = [(b, t) for b in site.branches(self.selector.branch) for t in range(1, site.n_prompts)
                if t in self.mapper or t in self.scale]
        if not todo:
            return None

        def fn(start: int, probs: torch.Tensor) -> torch.Tensor:
            probs = probs.clone()
            for b, t in todo:
                s_row, t_row = site.row(0, b), site.row(t, b)
                cur = probs[t_row]
                if t in self.mapper and self.mapper[t] is None:  # word swap over every key (transformers)
                    cur = probs[s_row]
                elif t in self.mapper:
                    a = self.alpha[t].to(probs.device)
                    cur = probs[s_row][..., self.mapper[t].to(probs.device)] * a + cur * (1 - a)
                if t in self.scale:
                    cur = cur * self.scale[t].to(probs.device)
                probs[t_row] = cur
            return probs

        return fn


class Ablate(Controller):
    """Ablation: the selected attention layers' output times ``scale`` (default ``0``: each block keeps only its
    residual stream) on the selected steps, for every prompt and branch. The question it answers: does the model
    use these layers, and when? Compare images made with and without it from the same seed.

    The output ``(batch, tokens, channels)`` is scaled after the output projection (its bias included), so
    ``scale=0`` leaves exactly the block's residual; attention itself stays fused.

    Example (no self-attention in the 4x4 mid block for the first half of the steps):
        >>> import torch
        >>> from attnlens import Selector, control
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with control(pipe, Ablate(Selector(kind="self", layers="mid.*", steps=(0.0, 0.5)))):
        ...     out = pipe("a red star", num_inference_steps=2, output_type="pt",
        ...                generator=torch.Generator().manual_seed(0)).images
        >>> out.shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, selector: Selector | None = None, scale: float = 0.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise AttnlensError(f"Ablate: scale must be a real number (0 ablates), not {scale!r}")
        super().__init__(selector)
        self.scale = float(scale)

    def output_scale(self, site: Site) -> float | None:
        return self.scale
