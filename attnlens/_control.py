"""Editing controllers: steer attention where it happens, on the capture processors.

A :class:`Controller` sees a layer's query, key and value together with a :class:`Site` (layer, step,
CFG layout, prompts in the batch) and may rewrite ``q, k, v`` (the output stays fused attention) or
edit the attention map (then the map is materialised in chunks). :func:`control` installs one on the
layers a :class:`~attnlens.Selector` picks, with the same restore guarantees as
:func:`attnlens.capture`, and composes with capture and with other controllers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ._capture import _Clock, hooked
from ._errors import AttnlensError
from ._layers import LayerInfo, layers as list_layers
from ._select import Selector

MapEdit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Site:
    """Where an attention call happens.

    The UNet batch is ``[uncond prompt 0..n-1, cond prompt 0..n-1]`` with classifier-free guidance and
    ``[prompt 0..n-1]`` without.

    Attributes:
        layer: the layer (name, kind, resolution, ...).
        step: index in the pipeline's denoising loop; ``n_steps``: its length.
        cfg: whether the batch holds an unconditional half.
        n_prompts: prompts in the batch (source first, for edits).
    """

    layer: LayerInfo
    step: int
    n_steps: int
    cfg: bool
    n_prompts: int

    def row(self, prompt: int, branch: str = "cond") -> int:
        """Batch row of ``prompt`` in ``branch`` (``"cond"`` or ``"uncond"``)."""
        if branch == "uncond":
            if not self.cfg:
                raise AttnlensError("this run has no unconditional branch (guidance_scale <= 1)")
            return prompt
        return prompt + (self.n_prompts if self.cfg else 0)

    def branches(self, which: str) -> list[str]:
        """The branches present for a selection ``"cond"``, ``"uncond"`` or ``"both"``."""
        out = [b for b in ("uncond", "cond") if which in (b, "both")]
        return [b for b in out if b == "cond" or self.cfg]


class Controller:
    """Base class of attention controllers. Override :meth:`rewrite` and/or :meth:`edit_map`.

    Both are called only on the layers and steps of ``selector`` (its ``branch``/``prompts``/``heads``
    fields are yours to interpret: :attr:`selector` is kept). Default: change nothing.

    Example (an identity controller leaves the image unchanged):
        >>> import torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with control(pipe, Controller(Selector(kind="self"))):
        ...     img = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        ...                output_type="pt").images
        >>> img.shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, selector: Selector | None = None) -> None:
        self.selector = selector or Selector()
        self.clock: _Clock | None = None
        self._steps: set[int] | None = None

    # -- to override
    def rewrite(self, site: Site, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Return ``(q, k, v)``, each ``(batch, heads, tokens, dim)``; attention runs fused on them."""
        return q, k, v

    def edit_map(self, site: Site) -> MapEdit | None:
        """Return ``fn(start, probs) -> probs`` to edit the map at this site, or ``None`` (stay fused).

        ``probs`` is an fp32 chunk ``(batch, heads, chunk, keys)`` of the map for queries ``start:start+chunk``.
        """
        return None

    # -- plumbing
    def _site(self, info: LayerInfo, batch: int) -> Site | None:
        clock = self.clock
        if clock is None or clock.step < 0:
            return None
        if self._steps is None:
            self._steps = self.selector.step_indices(clock.n_steps)
        if clock.step not in self._steps:
            return None
        per = batch // 2 if clock.cfg else batch
        return Site(info, clock.step, clock.n_steps, clock.cfg, per)

    def _rewrite(self, info: LayerInfo, q, k, v):
        site = self._site(info, q.shape[0])
        return (q, k, v) if site is None else self.rewrite(site, q, k, v)

    def _map_edit(self, info: LayerInfo, batch: int) -> MapEdit | None:
        site = self._site(info, batch)
        return None if site is None else self.edit_map(site)


@contextlib.contextmanager
def control(pipe: Any, controller: Controller) -> Iterator[Controller]:
    """Install ``controller`` on the layers its selector picks, for one pipeline call; restore on exit.

    Nests with :func:`attnlens.capture` and other :func:`control` contexts (inner ones run after outer ones).
    """
    chosen = controller.selector.match(list_layers(pipe))
    clock = _Clock(pipe)
    controller.clock, controller._steps = clock, None
    try:
        with hooked(pipe, clock, chosen, controller=controller):
            yield controller
    finally:
        controller.clock = None


# ------------------------------------------------------------------------------- the editing controllers
def _pairs(site: Site, branch: str) -> list[tuple[int, int]]:
    """``(source row, target row)`` for every target prompt (1..n-1) in the selected branches."""
    return [(site.row(0, b), site.row(t, b)) for b in site.branches(branch) for t in range(1, site.n_prompts)]


class _InjectRows(Controller):
    """Target rows of two of q, k, v (``parts``) := the source's; attention stays fused."""

    parts: tuple[int, int]  # indices into (q, k, v)

    def rewrite(self, site, q, k, v):
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
    ``softmax(Q_src K_src^T / sqrt(d)) V_tgt`` without materialising the map."""

    parts = (0, 1)


class CopyMap(Controller):
    """The target's attention map := the source's (explicit map: FPE's reference path, P2P's self copy)."""

    def edit_map(self, site):
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
    """MasaCtrl's mutual self-attention: target queries attend to the source's keys and values."""

    parts = (1, 2)


class CrossMapEdit(Controller):
    """Prompt-to-Prompt on cross-attention maps of each target prompt ``t`` (branch per the selector).

    ``mapper[t]``: ``(77,)`` source token index for each target token; ``alpha[t]``: ``(77,)`` 1 where the
    target token takes the source's (mapped) map, 0 where it keeps its own; ``scale[t]``: ``(77,)`` factors
    applied afterwards (reweighting). ``replace`` is off on steps outside ``replace_steps``.
    """

    def __init__(self, selector: Selector, mapper: dict[int, torch.Tensor], alpha: dict[int, torch.Tensor],
                 scale: dict[int, torch.Tensor] | None, replace_steps: set[int] | None) -> None:
        super().__init__(selector)
        self.mapper, self.alpha, self.scale, self.replace_steps = mapper, alpha, scale or {}, replace_steps

    def edit_map(self, site):
        replace = self.replace_steps is None or site.step in self.replace_steps
        todo = [(b, t) for b in site.branches(self.selector.branch) for t in range(1, site.n_prompts)
                if (replace and t in self.mapper) or t in self.scale]
        if not todo:
            return None

        def fn(start: int, probs: torch.Tensor) -> torch.Tensor:
            probs = probs.clone()
            for b, t in todo:
                s_row, t_row = site.row(0, b), site.row(t, b)
                cur = probs[t_row]
                if replace and t in self.mapper:
                    a = self.alpha[t].to(probs.device)
                    cur = probs[s_row][..., self.mapper[t].to(probs.device)] * a + cur * (1 - a)
                if t in self.scale:
                    cur = cur * self.scale[t].to(probs.device)
                probs[t_row] = cur
            return probs

        return fn
