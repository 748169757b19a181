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
from ._dit import text_side
from ._errors import AttnlensError
from . import _hooks
from ._hooks import StepClock, attach, attention_probs, chunk_queries
from ._layers import LayerInfo, layers as list_layers
from ._select import Selector

DEFAULT_BUDGET = 4 << 30
_MIN_CHUNK = 1 << 14  # the smallest chunk (fp32 scores) a tight budget shrinks the chunks to: 64 KiB


def _as_index(rows: list[int]) -> list[int] | slice:
    """A run of consecutive rows as a slice (indexing with it is a view, not a copy)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: adaptive average pooling of a length-``n_in`` axis to ``n_out`` bins as a matrix (bin ``i``
    averages inputs ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out)``, as ``adaptive_avg_pool2d``)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def _size(n: float) -> str:
    """A byte count for a message: KiB below 1 MiB, else MiB (``_size(5952) == '5.8 KiB'``)."""
    return f"{n / 2**10:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.0f} MiB"


class _Recorder:
    """The capture hook: stores maps of the selected items, steps and heads.

    Memory: a layer's map is computed in query chunks (:func:`~attnlens._hooks.attention_probs`) and each
    chunk is reduced (head mean, key pooling, query pooling) and written straight into its destination:
    the stored map (storage dtype, on CPU) or the fp32 running sum of ``reduce``. With ``store_resolution``
    the query grid is pooled by output rows: a group of pooled rows is accumulated in fp32 from the chunks
    that cover it, then written. No full-size map of a layer is ever built. :meth:`memory` is the bound the
    budget checks: what is kept plus the largest working set of one layer call; when that is over the budget,
    the chunks shrink (down to 64 KiB of scores) until it fits, and only then is the budget an error.
    """

    def __init__(self, selector: Selector, cache: AttentionCache, store_dtype: torch.dtype, reduce: str | None,
                 resolution: int | None,
                 budget: int, chosen: list[LayerInfo]) -> None:
        self.clock: StepClock | None = None
        self.sel, self.cache = selector, cache
        self.dtype, self.reduce, self.resolution, self.budget = store_dtype, reduce, resolution, budget
        self.chosen = chosen
        self.steps: set[int] = set()
        self.rows: list = []
        self.batch = 0
        self.chunk: int | None = None  # fp32 scores per chunk (None: the default, 64 MiB)

    def start(self, first: bool, batch: int) -> None:
        if not first:
            return
        self.steps = self.sel.step_indices(self.clock.n_steps)
        if not self.steps:
            raise AttnlensError(f"steps={self.sel.steps!r} selects none of this run's {self.clock.n_steps} steps "
                                f"(0..{self.clock.n_steps - 1}), so nothing would be captured")
        self.rows = self.sel.batch_items(batch, self.clock.cfg)
        self.batch = batch
        self.cache._begin(self.rows, sorted(self.steps), self.clock.latent_hw)
        kept, work = self.memory()
        chunk = _hooks._CHUNK_ELEMENTS
        while kept + work > self.budget and chunk > _MIN_CHUNK:  # smaller chunks: less working memory, more steps
            chunk //= 2
            kept, work = self.memory(chunk)
        self.chunk = chunk if chunk != _hooks._CHUNK_ELEMENTS else None
        if kept + work > self.budget:
            raise AttnlensError(
                f"capturing this selection needs about {_size(kept + work)} ({_size(kept)} of "
                f"stored maps{' (fp32 running sums)' if self.reduce else ''}, {_size(work)} of working "
                f"memory for the largest layer), over the budget of {_size(self.budget)}. Reduce it: fewer "
                "layers (layers=..., kind=...) or steps (steps=...), reduce='mean' (one map per layer), "
                "store_resolution=16 (downsample the stored maps), heads='mean', or raise budget=..."
            )

    def _grid(self, info: LayerInfo) -> tuple[int, int]:
        h, w = info.grid(self.clock.latent_hw)
        if self.resolution is not None and max(h, w) > self.resolution:
            return (max(1, h * self.resolution // max(h, w)), max(1, w * self.resolution // max(h, w)))
        return (h, w)

    def _shape(self, info: LayerInfo) -> tuple[int, int, int, int, int]:
        """``(items, heads, queries, stored keys, computed keys)`` of one stored map of a layer."""
        h, w = info.grid(self.clock.latent_hw)
        gh, gw = self._grid(info)
        text = self.clock.text_len or 77
        view = text if info.kind == "cross" else h * w  # the keys of the map this layer's name stands for
        stored_keys = view if info.kind == "cross" else gh * gw
        # a joint-attention view is cut from one softmax over the image and text keys together
        keys = h * w + text if info.stream in ("joint", "single") else view
        heads = 1 if self.sel.heads == "mean" else len(self.sel.head_indices(info.heads))
        return len(self.rows), heads, gh * gw, stored_keys, keys

    def memory(self, chunk_elements: int | None = None) -> tuple[int, int]:
        """``(kept, working)`` bytes: the stored maps (or fp32 running sums) of every selected layer, and the largest
        working set of one layer call (fp32 chunks of scores and their reductions, the pooled-row buffer, the query
        chunk in fp32 and the keys in fp32), which is freed before the next layer. ``chunk_elements``: fp32 scores
        per chunk (default: the chunk size in force)."""
        if chunk_elements is None:
            chunk_elements = self.chunk or _hooks._CHUNK_ELEMENTS
        kept = work = 0
        cfg_items = self.batch
        for info in self.chosen:
            n, hd, queries, skeys, keys = self._shape(info)
            maps = 1 if self.reduce else len(self.steps)
            size = 4 if self.reduce else torch.finfo(self.dtype).bits // 8
            kept += maps * n * hd * queries * skeys * size
            # worst case: a map edit in force, so every row and head is computed
            h, w = info.grid(self.clock.latent_hw)
            rows, heads = max(cfg_items, n), info.heads
            per = chunk_queries(rows, heads, keys, chunk_elements)
            chunk = min(per, h * w) * rows * heads * keys * 4
            gh, gw = self._grid(info)
            group = 0
            if (gh, gw) != (h, w):
                group_rows = max(1, chunk_elements // max(1, n * hd * gw * skeys))
                # the fp32 buffer of a group of pooled rows, and one chunk's contribution to it
                group = 2 * min(group_rows, gh) * gw * n * hd * skeys * 4
            # the selected q and k, k in fp32, one query chunk in fp32 (at most 4 bytes an element each)
            qk = rows * heads * (h * w + 2 * keys + min(per, h * w)) * info.head_dim * 4
            work = max(work, 3 * chunk + group + qk)
        return kept, work

    def on_attention(self, info: LayerInfo, q, k, v, scale: float, edits: list | tuple = (),
                     mask: torch.Tensor | None = None, keys: slice | None = None) -> None:
        """Store the map of ``softmax(q k^T * scale)`` (with the additive or boolean ``mask`` of the layer, and the
        map edits in force) for the selected rows, heads and steps. ``keys``: the key positions that make this
        layer's map (a joint-attention view: the softmax runs over all keys, then the columns are sliced)."""
        if info.name not in self.cache.layers or self.clock.step not in self.steps or self.clock.repeat:
            return  # a repeated call at a step (Flux's true-CFG negative, SD3's skip-layer pass) is not recorded
        rows = _as_index([r for r, _, _ in self.rows])
        heads = self.sel.head_indices(info.heads)
        if not edits:  # select first, compute less; with map edits every row is needed (edits mix rows)
            q, k = q[rows], k[rows]
            if heads is not None:
                q, k = q[:, heads], k[:, heads]
            if mask is not None:
                mask = mask[rows] if mask.shape[0] > 1 else mask
                if heads is not None and mask.ndim == 4 and mask.shape[1] > 1:
                    mask = mask[:, heads]
        h, w = info.grid(self.clock.latent_hw)
        if h * w != q.shape[2]:
            raise AttnlensError(f"layer {info.name}: {q.shape[2]} queries do not form the expected {h}x{w} grid")
        gh, gw = self._grid(info)
        pooled = (gh, gw) != (h, w)
        n, hd = len(self.rows), 1 if heads is None else len(heads)
        view = k.shape[2] if keys is None else len(range(*keys.indices(k.shape[2])))
        nkeys = gh * gw if info.kind == "self" and pooled else view

        def reduced(start: int, probs: torch.Tensor) -> torch.Tensor:
            """One fp32 chunk of the map, edited, selected and pooled over keys: ``(n, hd, chunk, keys)``."""
            if edits:
                for fn in edits:
                    probs = fn(start, probs)
                probs = probs[rows] if heads is None else probs[rows][:, heads]
            if keys is not None:
                probs = probs[..., keys]
            if heads is None:
                probs = probs.mean(dim=1, keepdim=True)
            if info.kind == "self" and pooled:  # keys are positions too: pool their mass (rows keep summing to 1)
                b, hh, c, _ = probs.shape
                probs = F.adaptive_avg_pool2d(probs.reshape(b * hh * c, 1, h, w), (gh, gw)) * (h * w / (gh * gw))
                probs = probs.reshape(b, hh, c, gh * gw)
            return probs

        dest = self.cache._slot(info.name, self.clock.step, (n, hd, gh * gw, nkeys), self.reduce, self.dtype)
        put = self._put_sum if self.reduce else self._put
        if not pooled:
            for start, probs in attention_probs(q, k, scale, self.chunk, mask=mask):
                put(dest, start, reduced(start, probs))
                del probs
        else:
            ph, pw = _pool_matrix(h, gh).to(q.device), _pool_matrix(w, gw).to(q.device)
            first = [(i * h) // gh for i in range(gh)]  # input rows first[i] .. last[i] - 1 pool into row i
            last = [-((-(i + 1) * h) // gh) for i in range(gh)]
            group = max(1, (self.chunk or _hooks._CHUNK_ELEMENTS) // max(1, n * hd * gw * nkeys))
            for i0 in range(0, gh, group):  # pooled rows i0..i1-1 come from input rows first[i0]..last[i1-1]-1
                i1 = min(gh, i0 + group)
                buf = torch.zeros(n * hd, (i1 - i0) * gw, nkeys, device=q.device)
                for start, probs in attention_probs(q, k, scale, self.chunk, mask=mask, start=first[i0] * w,
                                                   stop=last[i1 - 1] * w):
                    part = reduced(start, probs)
                    del probs
                    c = part.shape[2]
                    r0, r1 = start // w, (start + c - 1) // w  # the input rows of this chunk
                    lo = next(i for i in range(i0, i1) if last[i] > r0)  # the pooled rows they reach
                    hi = max(i for i in range(lo, i1) if first[i] <= r1) + 1
                    pos = torch.arange(start, start + c, device=q.device)
                    weight = (ph[lo:hi, pos // w][:, None, :] * pw[:, pos % w][None, :, :]).reshape(-1, c)
                    buf[:, (lo - i0) * gw : (hi - i0) * gw] += weight @ part.reshape(n * hd, c, nkeys)
                    del part
                put(dest, i0 * gw, buf.view(n, hd, -1, nkeys))
                del buf
        self.cache._store(info.name, self.clock.step, dest, self.reduce, (gh, gw))

    @staticmethod
    def _put(dest: torch.Tensor, start: int, part: torch.Tensor) -> None:
        dest[:, :, start : start + part.shape[2]].copy_(part)

    @staticmethod
    def _put_sum(dest: torch.Tensor, start: int, part: torch.Tensor) -> None:
        dest[:, :, start : start + part.shape[2]] += part.to(dest.device)


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
        pipe: a diffusers pipeline whose denoiser is a ``UNet2DConditionModel`` or a supported diffusion
            transformer (PixArt, SD3/SD3.5, Flux.1: ``attnlens._dit``; a joint-attention layer's
            ``*.cross`` view is its image->text quadrant, ``*.self`` its image->image quadrant).
        selector: a :class:`Selector`; or give its fields as keywords (``layers``, ``kind``, ...).
        dtype: storage dtype of the maps (on CPU).
        reduce: ``None`` (one map per step), ``"mean"`` or ``"sum"`` over the selected steps.
        store_resolution: downsample each map's query grid (and a self-attention map's key grid) so
            its longer side is at most this.
        budget: bytes the capture may hold at its peak: the stored maps (fp32 running sums with ``reduce``) plus
            the largest layer's working set (chunks of at most 64 MiB of fp32 scores, smaller where the budget
            needs it); checked before the first attention layer runs.

    Yields:
        an :class:`AttentionCache`, filled during the call. Maps have shape
        ``(items, heads, h, w, keys)``: items are the selected (branch, prompt) pairs, heads is 1 for the
        head mean, keys is the text tokens for cross-attention (77 for CLIP; a transformer's text length, SD3:
        77 CLIP then the T5 tokens) or ``h_k * w_k`` positions for self-attention.

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
    tokenizer, text = text_side(pipe)  # the tokens of the cross-attention keys (Flux: the T5 side)
    cache = AttentionCache({i.name: i for i in chosen}, tokenizer=tokenizer)
    cache._heads = (selector.heads if isinstance(selector.heads, str)
                    else [int(h) if isinstance(h, numbers.Integral) else h for h in selector.heads])
    recorder = _Recorder(selector, cache, dtype, reduce, store_resolution, budget, chosen)
    recorder.clock, detach = attach(pipe, chosen, hook=recorder, listener=recorder.start)
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
