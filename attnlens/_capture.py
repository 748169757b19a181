"""Capture attention maps: :func:`capture` and its recording hook.

:func:`capture` adds a recorder to the :class:`~attnlens._hooks.HookedProcessor` of each selected layer
(:mod:`attnlens._hooks`) and removes exactly it on exit, after an exception too. The step index comes
from the pipeline's own loop (the pipeline's shared step clock). A layer's output is always computed
as diffusers' ``AttnProcessor2_0`` computes it (fused ``scaled_dot_product_attention``), so capture
does not change the image; the map is computed beside it, in query chunks, only at selected steps.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ._cache import AttentionCache
from ._errors import AttnlensError
from ._hooks import StepClock, attach, attention_probs
from ._layers import LayerInfo, layers as list_layers
from ._select import Selector

DEFAULT_BUDGET = 4 << 30


def _as_index(rows: list[int]) -> list[int] | slice:
    """A run of consecutive rows as a slice (indexing with it is a view, not a copy)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


class _Recorder:
    """The capture hook: stores maps of the selected items, steps and heads."""

    def __init__(self, selector: Selector, cache: AttentionCache, store_dtype: torch.dtype, reduce: str | None,
                 resolution: int | None,
                 budget: int, chosen: list[LayerInfo]) -> None:
        self.clock: StepClock | None = None
        self.sel, self.cache = selector, cache
        self.dtype, self.reduce, self.resolution, self.budget = store_dtype, reduce, resolution, budget
        self.chosen = chosen
        self.steps: set[int] = set()
        self.rows: list = []

    def start(self, first: bool, batch: int) -> None:
        if not first:
            return
        self.steps = self.sel.step_indices(self.clock.n_steps)
        if not self.steps:
            raise AttnlensError(f"steps={self.sel.steps!r} selects none of this run's {self.clock.n_steps} steps "
                                f"(0..{self.clock.n_steps - 1}), so nothing would be captured")
        self.rows = self.sel.batch_items(batch, self.clock.cfg)
        self.cache._begin(self.rows, sorted(self.steps), self.clock.latent_hw)
        estimate = sum(self._bytes(info) for info in self.chosen)
        if estimate > self.budget:
            raise AttnlensError(
                f"capturing this selection would store about {estimate / 2**20:,.0f} MiB, over the budget of "
                f"{self.budget / 2**20:,.0f} MiB. Reduce it: fewer layers or steps, reduce='mean' (one map per layer), "
                f"resolution=16 (downsample maps), heads='mean', or raise budget=..."
            )

    def _grid(self, info: LayerInfo) -> tuple[int, int]:
        h, w = info.grid(self.clock.latent_hw)
        if self.resolution is not None and max(h, w) > self.resolution:
            return (max(1, h * self.resolution // max(h, w)), max(1, w * self.resolution // max(h, w)))
        return (h, w)

    def _bytes(self, info: LayerInfo) -> int:
        h, w = self._grid(info)
        keys = 77 if info.kind == "cross" else h * w
        heads = 1 if self.sel.heads == "mean" else len(self.sel.head_indices(info.heads))
        n_maps = 1 if self.reduce else len(self.steps)
        return n_maps * len(self.rows) * heads * h * w * keys * torch.finfo(self.dtype).bits // 8

    def on_attention(self, info: LayerInfo, q, k, v, scale: float, edits: list | tuple = ()) -> None:
        if info.name not in self.cache.layers or self.clock.step not in self.steps:
            return
        rows = _as_index([r for r, _, _ in self.rows])
        heads = self.sel.head_indices(info.heads)
        if not edits:  # select first, compute less; with map edits every row is needed (edits mix rows)
            q, k = q[rows], k[rows]
            if heads is not None:
                q, k = q[:, heads], k[:, heads]
        h, w = info.grid(self.clock.latent_hw)
        if h * w != q.shape[2]:
            raise AttnlensError(f"layer {info.name}: {q.shape[2]} queries do not form the expected {h}x{w} grid")
        gh, gw = self._grid(info)
        pooled_keys = info.kind == "self" and (gh, gw) != (h, w)
        parts = []
        for start, probs in attention_probs(q, k, scale):
            if edits:
                for fn in edits:
                    probs = fn(start, probs)
                probs = probs[rows] if heads is None else probs[rows][:, heads]
            if heads is None:
                probs = probs.mean(dim=1, keepdim=True)
            if pooled_keys:  # self-attention keys are positions too: pool their mass (rows keep summing to 1)
                n, hd, c, _ = probs.shape
                pooled = F.adaptive_avg_pool2d(probs.reshape(n * hd * c, 1, h, w), (gh, gw)) * (h * w / (gh * gw))
                probs = pooled.reshape(n, hd, c, gh * gw)
            parts.append(probs)
        maps = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (n, heads, h*w, keys)
        n, hd, _, keys = maps.shape
        maps = maps.reshape(n, hd, h, w, keys)
        if (gh, gw) != (h, w):
            x = maps.permute(0, 1, 4, 2, 3).reshape(n * hd * keys, 1, h, w)
            maps = F.adaptive_avg_pool2d(x, (gh, gw)).reshape(n, hd, keys, gh, gw).permute(0, 1, 3, 4, 2)
        self.cache._add(info.name, self.clock.step, maps, self.reduce, self.dtype)


@contextlib.contextmanager
def capture(
    pipe: Any,
    selector: Selector | None = None,
    *,
    layers: Any = None,
    kind: str | None = None,
    resolution: Any = None,
    steps: Any = None,
    heads: Any = "mean",
    branch: str = "cond",
    prompts: Any = None,
    dtype: torch.dtype = torch.float16,
    reduce: str | None = None,
    store_resolution: int | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Iterator[AttentionCache]:
    """Record attention maps of one pipeline call.

    With no selection it takes every cross-attention layer, the mean over heads, the conditional
    branch and every step; self-attention is opted into (``kind="self"`` or a layer glob), because a
    self-attention map is ``queries x queries``.

    Args:
        pipe: a diffusers pipeline whose denoiser is a ``UNet2DConditionModel``.
        selector: a :class:`Selector`; or give its fields as keywords (``layers``, ``kind``, ...).
        dtype: storage dtype of the maps (on CPU).
        reduce: ``None`` (one map per step), ``"mean"`` or ``"sum"`` over the selected steps.
        store_resolution: downsample each map's query grid (and a self-attention map's key grid) so
            its longer side is at most this.
        budget: bytes the stored maps may take; checked before the first attention layer runs.

    Yields:
        an :class:`AttentionCache`, filled during the call. Maps have shape
        ``(items, heads, h, w, keys)``: items are the selected (branch, prompt) pairs, heads is 1 for the
        head mean, keys is 77 tokens for cross-attention or ``h_k * w_k`` positions for self-attention.

    Example:
        >>> import torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with capture(pipe) as cache:
        ...     _ = pipe("a red star", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
        >>> cache["down.0.0.cross", 2].shape
        torch.Size([1, 1, 8, 8, 77])
        >>> cache.word_map("star").shape
        torch.Size([8, 8])
    """
    if selector is None:
        if layers is None and kind is None:
            kind = "cross"
        selector = Selector(layers=layers, kind=kind, resolution=resolution, steps=steps, heads=heads,
                            branch=branch, prompts=prompts)
    _check_arguments(reduce, selector.steps, dtype, store_resolution, budget)
    chosen = selector.match(list_layers(pipe))
    tokenizer = getattr(pipe, "tokenizer", None)
    cache = AttentionCache({i.name: i for i in chosen}, tokenizer=tokenizer)
    cache._heads = (selector.heads if isinstance(selector.heads, str)
                    else [int(h) if isinstance(h, numbers.Integral) else h for h in selector.heads])
    recorder = _Recorder(selector, cache, dtype, reduce, store_resolution, budget, chosen)
    recorder.clock, detach = attach(pipe, chosen, hook=recorder, listener=recorder.start)
    text = getattr(pipe, "text_encoder", None)
    try:
        handle = text.register_forward_pre_hook(cache._text_pre_hook, with_kwargs=True) if text is not None else None
        try:
            yield cache
        except ZeroDivisionError as exc:  # diffusers' schedulers divide by num_inference_steps=0
            _check_ran(pipe, recorder, exc)
            raise
        finally:
            if handle is not None:
                handle.remove()
        _check_ran(pipe, recorder, None)
    finally:
        detach()


def _check_arguments(reduce: Any, steps: Any, dtype: Any, store_resolution: Any, budget: Any) -> None:
    """An :class:`AttnlensError` naming the first of capture's storage arguments that is not valid."""
    if reduce not in (None, "mean", "sum"):
        raise AttnlensError(f"reduce must be None, 'mean' or 'sum', not {reduce!r}")
    if isinstance(steps, (list, tuple, range)) and len(steps) == 0:
        raise AttnlensError(f"steps={steps!r} selects no step, so nothing would be captured; give None (every step), "
                            "a step index, a non-empty list, a slice or a fraction range (start, end)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AttnlensError(f"dtype must be a floating-point torch dtype (torch.float16, torch.bfloat16, torch.float32, "
                            f"torch.float64), not {dtype!r}")
    if store_resolution is not None and (isinstance(store_resolution, bool) or not isinstance(store_resolution, int)
                                         or store_resolution < 1):
        raise AttnlensError(f"store_resolution must be None (the layer's grid) or a grid side >= 1 (int), not "
                            f"{store_resolution!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise AttnlensError(f"budget must be a number of bytes > 0 (e.g. budget=2 << 30 for 2 GiB), not {budget!r}")


def _check_ran(pipe: Any, recorder: _Recorder, exc: BaseException | None) -> None:
    """An error when the pipeline's schedule had no step (``num_inference_steps <= 0``) and nothing was captured.

    The scheduler records the step count it was asked for before dividing by it, so ``num_inference_steps=0``
    (diffusers raises ``ZeroDivisionError``) and ``-1`` (the loop runs no step) are both caught here."""
    n = getattr(getattr(pipe, "scheduler", None), "num_inference_steps", None)
    if recorder.steps or not isinstance(n, int) or n > 0:
        return
    raise AttnlensError(f"the pipeline was called with num_inference_steps={n}: it must be >= 1, and no attention "
                        "was captured") from exc
