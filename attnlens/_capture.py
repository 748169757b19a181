"""Capture attention maps with per-instance diffusers attention processors.

:func:`capture` installs a :class:`HookedProcessor` on each selected layer with
``unet.set_attn_processor`` and puts the exact original processor objects back on exit, after an
exception too. The step index comes from the pipeline's own loop: a forward pre-hook on the UNet
reads the timestep and finds it in ``pipe.scheduler.timesteps``. A layer's output is always computed
as diffusers' ``AttnProcessor2_0`` computes it (fused ``scaled_dot_product_attention``), so capture
does not change the image; the map is computed beside it, in query chunks, only at selected steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ._cache import AttentionCache
from ._errors import AttnlensError
from ._layers import LayerInfo, get_unet, layers as list_layers
from ._select import Selector

_CHUNK_ELEMENTS = 1 << 24  # fp32 scores per chunk: 64 MiB
DEFAULT_BUDGET = 4 << 30


class _Clock:
    """Where the pipeline's loop is: step index, number of steps, CFG layout, latent size."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.step = -1
        self.n_steps = 0
        self.cfg = False
        self.latent_hw = (0, 0)
        self.calls = 0
        self.listeners: list = []

    def pre_hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        schedule = [float(x) for x in self.pipe.scheduler.timesteps]
        hits = [i for i, x in enumerate(schedule) if x == t]
        if not hits:
            raise AttnlensError(f"timestep {t} is not in the scheduler's schedule; attnlens follows the pipeline's loop")
        later = [i for i in hits if i >= self.step]
        step = later[0] if later else hits[0]
        if step < self.step:
            raise AttnlensError("a capture context records one pipeline call: open a new `capture(...)` for each run")
        self.step, self.n_steps = step, len(schedule)
        self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        self.latent_hw = tuple(sample.shape[-2:])
        first = self.calls == 0
        self.calls += 1
        for fn in self.listeners:
            fn(first, sample.shape[0])


class HookedProcessor:
    """An attention processor that computes attention as ``AttnProcessor2_0`` and lets hooks see and steer it.

    ``controllers`` (editing, :class:`attnlens.Controller`) may rewrite ``q, k, v`` (the output stays a fused
    ``scaled_dot_product_attention``) or edit the attention map itself (then the map is materialised in
    query chunks and multiplied by ``v``). ``hooks`` (capture) are objects with
    ``on_attention(info, q, k, v, scale, edits)``, called after the output is computed, with the
    rewritten ``q, k, v`` and the map edits in force, so a capture inside an edit records the maps used.
    Shapes: q ``(batch, heads, queries, dim)``, k and v ``(batch, heads, keys, dim)``.
    """

    def __init__(self, info: LayerInfo, hooks: list, controllers: list | None = None) -> None:
        self.info, self.hooks, self.controllers = info, hooks, list(controllers or [])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        edits = []
        for ctrl in self.controllers:
            query, key, value = ctrl._rewrite(self.info, query, key, value)
            fn = ctrl._map_edit(self.info, batch)
            if fn is not None:
                edits.append(fn)
        if edits:
            out = explicit_attention(query, key, value, attn.scale, edits, attention_mask)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        for hook in self.hooks:
            hook.on_attention(self.info, query, key, value, attn.scale, edits)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, chunk_elements: int = _CHUNK_ELEMENTS,
                    mask: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, softmax(q[..., start:stop, :] k^T * scale))`` in fp32, query chunk by chunk.

    ``q``: ``(batch, heads, queries, dim)``, ``k``: ``(batch, heads, keys, dim)``; each chunk is
    ``(batch, heads, chunk, keys)`` with at most ``chunk_elements`` entries (64 MiB by default).
    ``mask`` (optional) is an additive or boolean attention mask broadcastable to ``(batch, heads, queries, keys)``.
    """
    b, h, n, _ = q.shape
    step = max(1, chunk_elements // max(1, b * h * k.shape[2]))
    kt = k.float().transpose(-1, -2)
    qs = q.float() * scale  # scaling q (dim wide) is cheaper than scaling the scores (keys wide)
    for start in range(0, n, step):
        scores = qs[:, :, start : start + step] @ kt
        if mask is not None:
            m = mask[..., start : start + step, :] if mask.shape[-2] > 1 else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        yield start, torch.softmax(scores, dim=-1)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, edits: list,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the map materialised chunk by chunk, each chunk passed through ``edits``.

    Each edit is ``fn(start, probs) -> probs`` on a ``(batch, heads, chunk, keys)`` fp32 chunk of queries
    ``start:start+chunk``. Returns ``(batch, heads, queries, dim)`` in ``v``'s dtype. Costs one fp32 chunk of
    at most 64 MiB at a time, on top of the fused path.
    """
    vf = v.float()
    outs = []
    for start, probs in attention_probs(q, k, scale, mask=mask):
        for fn in edits:
            probs = fn(start, probs)
        outs.append(probs @ vf)
    return torch.cat(outs, dim=2).to(v.dtype)


_KNOWN = ("AttnProcessor", "AttnProcessor2_0", "HookedProcessor")


def _as_index(rows: list[int]) -> list[int] | slice:
    """A run of consecutive rows as a slice (indexing with it is a view, not a copy)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


class _Recorder:
    """The capture hook: stores maps of the selected items, steps and heads."""

    def __init__(self, clock: _Clock, selector: Selector, cache: AttentionCache, store_dtype, reduce, resolution,
                 budget: int, chosen: list[LayerInfo]) -> None:
        self.clock, self.sel, self.cache = clock, selector, cache
        self.dtype, self.reduce, self.resolution, self.budget = store_dtype, reduce, resolution, budget
        self.chosen = chosen
        self.steps: set[int] = set()
        self.rows: list = []

    def start(self, first: bool, batch: int) -> None:
        if not first:
            return
        self.steps = self.sel.step_indices(self.clock.n_steps)
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
    if reduce not in (None, "mean", "sum"):
        raise AttnlensError(f"reduce must be None, 'mean' or 'sum', not {reduce!r}")
    chosen = selector.match(list_layers(pipe))
    clock = _Clock(pipe)
    tokenizer = getattr(pipe, "tokenizer", None)
    cache = AttentionCache({i.name: i for i in chosen}, tokenizer=tokenizer)
    recorder = _Recorder(clock, selector, cache, dtype, reduce, store_resolution, budget, chosen)
    clock.listeners.append(recorder.start)
    text = getattr(pipe, "text_encoder", None)
    extra = [text.register_forward_pre_hook(cache._text_pre_hook, with_kwargs=True)] if text is not None else []
    try:
        with hooked(pipe, clock, chosen, hook=recorder):
            yield cache
    finally:
        for handle in extra:
            handle.remove()


@contextlib.contextmanager
def hooked(pipe: Any, clock: _Clock, chosen: list[LayerInfo], hook: Any = None, controller: Any = None) -> Iterator[None]:
    """Install :class:`HookedProcessor` s on ``chosen`` layers, adding ``hook`` and/or ``controller`` to any
    already there (so contexts nest), with ``clock`` on the UNet; restore the exact original processors on exit.
    """
    unet = get_unet(pipe)
    current = unet.attn_processors
    for info in chosen:
        name = type(current[f"{info.path}.processor"]).__name__
        if name not in _KNOWN:
            raise AttnlensError(
                f"layer {info.name} uses the attention processor {name}; attnlens can hook {', '.join(_KNOWN[:2])} "
                "(call pipe.unet.set_default_attn_processor() or unfuse QKV projections first)"
            )
    new = dict(current)
    for info in chosen:
        old = current[f"{info.path}.processor"]
        hooks = list(old.hooks) if isinstance(old, HookedProcessor) else []
        ctrls = list(old.controllers) if isinstance(old, HookedProcessor) else []
        new[f"{info.path}.processor"] = HookedProcessor(info, hooks + ([hook] if hook is not None else []),
                                                        ctrls + ([controller] if controller is not None else []))
    handle = unet.register_forward_pre_hook(clock.pre_hook, with_kwargs=True)
    unet.set_attn_processor(new)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(current))  # set_attn_processor pops from the dict it is given
        handle.remove()
