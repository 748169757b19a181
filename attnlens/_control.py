"""Attention controllers: the :class:`Controller` base, its :class:`Site`, and :func:`control`.

The built-in controllers of the editing methods live in :mod:`attnlens._methods`.

A :class:`Controller` sees a layer's query, key and value together with a :class:`Site` (layer, step,
CFG layout, prompts in the batch) and may rewrite ``q, k, v`` (the output stays fused attention) or
edit the attention map (then the map is materialised in chunks). :func:`control` installs one on the
layers a :class:`~attnlens.Selector` picks, with the same restore guarantees as
:func:`attnlens.capture`, and composes with capture and with other controllers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ._hooks import MapEdit, StepClock, attach
from ._layers import LayerInfo, layers as list_layers
from ._prompts import batch_row
from ._select import Selector


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
        negative: the call is Flux's true-CFG negative-prompt call (a second transformer call at the step, its
            batch the negative prompts laid out as the prompts): it is the ``"uncond"`` branch, and only that.
    """

    layer: LayerInfo
    step: int
    n_steps: int
    cfg: bool
    n_prompts: int
    negative: bool = False

    def row(self, prompt: int, branch: str = "cond") -> int:
        """Batch row of ``prompt`` in ``branch`` (``"cond"`` or ``"uncond"``)."""
        if self.negative:
            return batch_row(prompt, "cond", self.n_prompts, False)
        return batch_row(prompt, branch, self.n_prompts, self.cfg)

    def branches(self, which: str) -> list[str]:
        """The branches present for a selection ``"cond"``, ``"uncond"`` or ``"both"``."""
        if self.negative:
            return ["uncond"] if which in ("uncond", "both") else []
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
        self.clock: StepClock | None = None
        self._steps: set[int] | None = None

    # -- to override
    def rewrite(self, site: Site, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(q, k, v)``, each ``(batch, heads, tokens, dim)``; attention runs fused on them."""
        return q, k, v

    def edit_map(self, site: Site) -> MapEdit | None:
        """Return ``fn(start, probs) -> probs`` to edit the map at this site, or ``None`` (stay fused).

        ``probs`` is an fp32 chunk ``(batch, heads, chunk, keys)`` of the map for queries ``start:start+chunk``.
        """
        return None

    def output_scale(self, site: Site) -> float | None:
        """Return a factor for the layer's output at this site, or ``None`` (leave it). The factor multiplies
        the attention output after the output projection and before the block's residual, for the whole batch
        ``(batch, tokens, channels)``: ``0`` ablates the layer (the block keeps only its residual stream)."""
        return None

    # -- plumbing
    def _step_indices(self, n_steps: int) -> set[int]:
        """The steps this controller acts on in a schedule of ``n_steps`` (the selector's, unless a method counts
        its window differently)."""
        return self.selector.step_indices(n_steps)

    def _site(self, info: LayerInfo, batch: int) -> Site | None:
        clock = self.clock
        if clock is None or clock.step < 0:
            return None
        if self._steps is None:
            self._steps = self._step_indices(clock.n_steps)
        if clock.step not in self._steps:
            return None
        per = batch // 2 if clock.cfg else batch
        return Site(info, clock.step, clock.n_steps, clock.cfg, per, negative=getattr(clock, "negative", False))

    def _rewrite(self, info: LayerInfo, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        site = self._site(info, q.shape[0])
        return (q, k, v) if site is None else self.rewrite(site, q, k, v)

    def _map_edit(self, info: LayerInfo, batch: int) -> MapEdit | None:
        site = self._site(info, batch)
        return None if site is None else self.edit_map(site)

    def _output_scale(self, info: LayerInfo, batch: int) -> float | None:
        site = self._site(info, batch)
        return None if site is None else self.output_scale(site)


@contextlib.contextmanager
def control(pipe: Any, controller: Controller) -> Iterator[Controller]:
    """Install ``controller`` on the layers its selector picks, for one pipeline call; restore on exit.

    Nests with :func:`attnlens.capture` and other :func:`control` contexts (inner ones run after outer ones).
    """
    chosen = controller.selector.match(list_layers(pipe))
    controller.clock, detach = attach(pipe, chosen, controller=controller)
    controller._steps = None
    try:
        yield controller
    finally:
        detach()
        controller.clock = None
