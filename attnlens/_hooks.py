"""The hooks mechanism under :func:`attnlens.capture` and :func:`attnlens.control`.

One :class:`HookedProcessor` per hooked attention layer computes attention as diffusers'
``AttnProcessor2_0`` does (fused ``scaled_dot_product_attention``) and lets *hooks* (capture) see it
and *controllers* (editing) steer it. One :class:`StepClock` per pipeline, shared by every open
context, tells them where the pipeline's loop is. :func:`attach` adds one context's hook or controller
to the chosen layers and returns a detach function that removes exactly those again, so contexts may
nest and even exit out of order: when the last context leaves a layer, its original processor object
is put back. :func:`attention_probs` and :func:`explicit_attention` materialise the map in query chunks
where something needs it.

Imported by ``_capture`` and ``_control`` only; imports ``_layers`` and ``_errors``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ._errors import AttnlensError
from ._layers import LayerInfo, get_denoiser

_CHUNK_ELEMENTS = 1 << 24  # fp32 scores per chunk: 64 MiB

MapEdit = Callable[[int, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ the step clock
class Subscription:
    """One context's view of the :class:`StepClock`: ``listener(first, batch)`` runs at each UNet call of the
    context's one pipeline call (``first`` on the first of them)."""

    def __init__(self, listener: Callable[[bool, int], None] | None = None) -> None:
        self.listener = listener
        self.run: int | None = None


class StepClock:
    """Where the pipeline's loop is: step index, number of steps, CFG layout, latent size.

    A forward pre-hook on the UNet reads the timestep of each call and finds its step in
    ``pipe.scheduler.timesteps`` (the schedule's index is rebuilt only when the scheduler sets new
    timesteps). One clock per pipeline, shared by every open context (:func:`clock_for`).
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.step = -1
        self.n_steps = 0
        self.cfg = False
        self.latent_hw: tuple[int, int] = (0, 0)
        self.text_len = 0  # text tokens of the denoiser call (its encoder_hidden_states' length)
        self.repeat = 0  # denoiser calls at this step before this one (Flux's true CFG, SD3's skip-layer guidance)
        self.negative = False  # the call is Flux's true-CFG negative-prompt call (its second call at a step)
        self.run = 0  # pipeline calls seen; a call starts when the step goes back
        self.subscribers: list[Subscription] = []
        self._handle: Any = None
        self._schedule_key: Any = None
        self._index: dict[float, list[int]] = {}

    def _schedule(self) -> dict[float, list[int]]:
        ts = self.pipe.scheduler.timesteps
        key = (id(ts), getattr(ts, "_version", None), len(ts)) if torch.is_tensor(ts) else None
        if key is None or key != self._schedule_key:
            index: dict[float, list[int]] = {}
            for i, x in enumerate(ts):
                index.setdefault(float(x), []).append(i)
            self._index, self._schedule_key, self.n_steps = index, key, len(ts)
        return self._index

    def _hits(self, t: float) -> list[int] | None:
        """The schedule indices of timestep ``t``: exact, else the nearest within float rounding (Flux's pipeline
        passes ``t / 1000``, which its transformer and this clock scale back)."""
        index = self._schedule()
        hits = index.get(t)
        if hits or not index:
            return hits
        near = min(index, key=lambda x: abs(x - t))
        return index[near] if abs(near - t) <= 1e-4 * max(1.0, abs(t)) else None

    def _cfg(self, module: Any, sample: torch.Tensor) -> bool:
        """Whether the call is a classifier-free-guidance batch: the pipeline's own flag where it has one; never
        for Flux (its pipeline runs true CFG as a second call, not a doubled batch); else (PixArt keeps the flag
        local) whether the batch is two identical halves, the latents doubled for CFG. That last rule misreads a
        PixArt run without guidance (``guidance_scale <= 1``) whose two batch halves start from the same noise."""
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if flag is not None:
            return bool(flag)
        from diffusers import FluxTransformer2DModel

        if isinstance(module, FluxTransformer2DModel):
            return False
        n = sample.shape[0]
        return n % 2 == 0 and n > 0 and torch.equal(sample[: n // 2], sample[n // 2:])

    def pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        from ._dit import latent_hw, timestep_scale

        sample = args[0] if args else kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        t *= timestep_scale(module)
        hits = self._hits(t)
        if not hits:
            raise AttnlensError(f"timestep {t} is not in the scheduler's schedule; attnlens follows the pipeline's loop")
        later = [i for i in hits if i >= self.step]
        step = later[0] if later else hits[0]
        previous = self.step
        if step < previous:
            self.run += 1
        self.repeat = self.repeat + 1 if step == self.step else 0
        self.step = step
        self.cfg = self._cfg(module, sample)
        from diffusers import FluxTransformer2DModel

        self.negative = bool(self.repeat) and isinstance(module, FluxTransformer2DModel)
        self.latent_hw = latent_hw(sample, kwargs)
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.text_len = int(context.shape[1]) if torch.is_tensor(context) and context.ndim == 3 else 0
        for sub in list(self.subscribers):
            first = sub.run is None
            if first:
                sub.run = self.run
            elif sub.run != self.run:
                raise AttnlensError(_backwards_message(previous, step, self.n_steps))
            if sub.listener is not None:
                sub.listener(first, sample.shape[0])


def _backwards_message(previous: int, step: int, n_steps: int) -> str:
    """Why a context cannot follow a UNet call at an earlier step than the last one."""
    return (
        f"the UNet was called at step {step} of {n_steps} right after step {previous}: a capture or control context "
        "follows one pass of a pipeline's denoising loop, whose steps only go forward, and this call starts another "
        "pass. Either a second pipeline call ran inside the context (open a new `capture(...)`/`control(...)` for "
        "each call), or a loop walks the schedule backwards, as DDIM inversion (`attnlens.invert`) does, one UNet "
        "call per step from the image to the noise, which no context can follow. To record the maps of a real "
        "image, capture during the edit that follows its inversion: `edit_image(pipe, image, ..., capture=True)`."
    )


_CLOCKS: "weakref.WeakKeyDictionary[Any, StepClock]" = weakref.WeakKeyDictionary()


def _subscribe(pipe: Any, sub: Subscription) -> tuple[StepClock, Callable[[], None]]:
    """Join the pipeline's clock (installing its UNet hook if no context holds it); returns the clock and a leave
    function that drops the hook with the last subscriber."""
    clock = _CLOCKS.get(pipe)
    if clock is None or clock._handle is None:
        clock = StepClock(pipe)
        clock._handle = get_denoiser(pipe).register_forward_pre_hook(clock.pre_hook, with_kwargs=True)
        _CLOCKS[pipe] = clock
    clock.subscribers.append(sub)

    def leave() -> None:
        if sub in clock.subscribers:
            clock.subscribers.remove(sub)
        if not clock.subscribers and clock._handle is not None:
            clock._handle.remove()
            clock._handle = None
            if _CLOCKS.get(pipe) is clock:
                del _CLOCKS[pipe]

    return clock, leave


# ------------------------------------------------------------------------------------------ the processor
class HookedProcessor:
    """An attention processor that computes attention as ``AttnProcessor2_0`` and lets hooks see and steer it.

    ``controllers`` (editing, :class:`attnlens.Controller`) may rewrite ``q, k, v`` (the output stays a fused
    ``scaled_dot_product_attention``) or edit the attention map itself (then the map is materialised in
    query chunks and multiplied by ``v``). ``hooks`` (capture) are objects with
    ``on_attention(info, q, k, v, scale, edits)``, called after the output is computed, with the
    rewritten ``q, k, v`` and the map edits in force, so a capture inside an edit records the maps used.
    ``base`` is the processor it replaced, put back when the last hook and controller leave.
    Shapes: q ``(batch, heads, queries, dim)``, k and v ``(batch, heads, keys, dim)``.
    """

    def __init__(self, info: LayerInfo, base: Any) -> None:
        self.info, self.base = info, base
        self.hooks: list = []
        self.controllers: list = []

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
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
            hook.on_attention(self.info, query, key, value, attn.scale, edits, mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        for ctrl in self.controllers:
            factor = ctrl._output_scale(self.info, batch)
            if factor is not None:
                out = out * factor
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _hookable() -> tuple[type, ...]:
    """The processor types a :class:`HookedProcessor` computes exactly as (diffusers' plain attention)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0)


def attach(pipe: Any, chosen: list[LayerInfo], hook: Any = None, controller: Any = None,
           listener: Callable[[bool, int], None] | None = None) -> tuple[StepClock, Callable[[], None]]:
    """Add ``hook`` and/or ``controller`` to the :class:`HookedProcessor` of each ``chosen`` layer (installing one
    where the layer has diffusers' plain processor) and subscribe ``listener`` to the pipeline's clock.

    Returns ``(clock, detach)``; ``detach()`` removes exactly what this call added, in whatever order contexts
    leave, and puts a layer's original processor object back when nothing is left on it.
    """
    from ._joint import _JointBase, joint_processor_for

    plain = _hookable()
    modules, seen = [], set()  # one entry per module: a joint layer's two views share theirs
    for info in chosen:
        module = info.module if info.module is not None else _module(pipe, info)
        if id(module) not in seen:
            seen.add(id(module))
            modules.append((info, module))
    for info, module in modules:
        proc = module.processor
        joint = isinstance(proc, _JointBase) or joint_processor_for(proc) is not None
        if not isinstance(proc, (HookedProcessor, _JointBase)) and type(proc) not in plain and not joint:
            raise AttnlensError(
                f"layer {info.name} uses the attention processor {type(proc).__name__}; attnlens can hook "
                f"{', '.join(t.__name__ for t in plain)}, JointAttnProcessor2_0 (SD3) and FluxAttnProcessor (Flux) "
                "(call set_default_attn_processor() on the denoiser or unfuse QKV projections first)"
            )
        if joint and controller is not None:
            _check_joint_controller(controller, [i for i in chosen if i.path == info.path])
    sub = Subscription(listener)
    clock, leave = _subscribe(pipe, sub)
    procs = []
    for info, module in modules:
        proc = module.processor
        if not isinstance(proc, (HookedProcessor, _JointBase)):
            cls = joint_processor_for(proc)
            if cls is None:
                proc = HookedProcessor(info, proc)
            else:
                from ._layers import layers as list_layers

                views = [i for i in list_layers(pipe) if i.path == info.path]
                proc = cls(views, proc, clock, explicit_attention)
            module.set_processor(proc)
        if hook is not None:
            proc.hooks.append(hook)
        if controller is not None:
            proc.controllers.append(controller)
            if isinstance(proc, _JointBase):  # the views this controller acts on (a joint layer has two)
                proc.chosen[id(controller)] = {i.kind for i in chosen if i.path == info.path}
        procs.append((module, proc))

    def detach() -> None:
        for module, proc in procs:
            if hook is not None and any(h is hook for h in proc.hooks):
                proc.hooks.remove(hook)
            if controller is not None and any(c is controller for c in proc.controllers):
                proc.controllers.remove(controller)
                getattr(proc, "chosen", {}).pop(id(controller), None)
            if not proc.hooks and not proc.controllers and module.processor is proc:
                module.set_processor(proc.base)
        leave()

    return clock, detach


def _check_joint_controller(controller: Any, views: list[LayerInfo]) -> None:
    """A controller on a joint-attention layer (:mod:`attnlens._joint`): q/k/v rewrites act on its ``*.self`` view
    (the image tokens), map edits on its ``*.cross`` view (the image->text quadrant); anything else is refused."""
    cls = type(controller)  # overridden or the Controller base's (by name: _control imports this module)
    rewrites = getattr(cls.rewrite, "__qualname__", "") != "Controller.rewrite"
    edits_map = getattr(cls.edit_map, "__qualname__", "") != "Controller.edit_map"
    scales = getattr(getattr(cls, "output_scale", None), "__qualname__", "Controller.output_scale") \
        != "Controller.output_scale"
    for view in views:
        if view.stream not in ("joint", "single"):
            continue  # SD3.5's image-only second attention: a plain self-attention
        if scales:
            raise AttnlensError(
                f"layer {view.name}: {cls.__name__} scales the layer's output, which is not supported on joint attention "
                "(SD3, Flux: one output serves the image and the text tokens); it works on UNets, PixArt and SD3.5's "
                "image-only dual.* attention")
        if view.kind == "self" and edits_map:
            raise AttnlensError(
                f"layer {view.name}: {cls.__name__} edits the attention map, which on joint attention is supported on "
                f"the image->text view (*.cross) only; on the image->image view (*.self) a controller rewrites the "
                "image tokens' q, k, v (InjectQK, InjectKV). FPE's path='explicit' and Prompt-to-Prompt's "
                "self-attention copy are UNet and PixArt features")
        if view.kind == "cross" and rewrites:
            raise AttnlensError(
                f"layer {view.name}: {cls.__name__} rewrites q, k, v, which on joint attention acts on the image tokens "
                "through the image->image view (*.self); select that view (on the *.cross view only map edits, "
                "as Prompt-to-Prompt's, are supported)")


def _module(pipe: Any, info: LayerInfo) -> Any:
    return get_denoiser(pipe).get_submodule(info.path)


# ------------------------------------------------------------------------------------------ explicit attention
def chunk_queries(batch: int, heads: int, keys: int, chunk_elements: int | None = None) -> int:
    """Queries per chunk of :func:`attention_probs`: as many as keep a chunk within ``chunk_elements`` fp32 scores
    (at least one)."""
    return max(1, (_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // max(1, batch * heads * keys))


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, chunk_elements: int | None = None,
                    mask: torch.Tensor | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, softmax(q[..., start:stop, :] k^T * scale))`` in fp32, query chunk by chunk.

    ``q``: ``(batch, heads, queries, dim)``, ``k``: ``(batch, heads, keys, dim)``; each chunk is
    ``(batch, heads, chunk, keys)`` with at most ``chunk_elements`` entries (64 MiB by default).
    ``mask`` (optional) is an additive or boolean attention mask broadcastable to ``(batch, heads, queries, keys)``.
    ``start``/``stop`` limit the queries computed (default all).

    Example:
        >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
        >>> [(start, tuple(p.shape)) for start, p in attention_probs(q, k, 0.5, chunk_elements=12)]
        [(0, (1, 2, 2, 3)), (2, (1, 2, 2, 3)), (4, (1, 2, 1, 3))]
    """
    b, h, n, _ = q.shape
    step = chunk_queries(b, h, k.shape[2], chunk_elements)
    stop = n if stop is None else min(n, stop)
    kt = k.float().transpose(-1, -2)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        # scaling q (dim wide) is cheaper than scaling the scores (keys wide); per chunk, so no fp32 copy of q
        scores = (q[:, :, first:last].float() * scale) @ kt
        if mask is not None:
            m = mask[..., first:last, :] if mask.shape[-2] > 1 else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        scores = torch.softmax(scores, dim=-1)  # the scores go as the probabilities come: one chunk held
        yield first, scores


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, edits: list,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the map materialised chunk by chunk, each chunk passed through ``edits``.

    Each edit is ``fn(start, probs) -> probs`` on a ``(batch, heads, chunk, keys)`` fp32 chunk of queries
    ``start:start+chunk``. Returns ``(batch, heads, queries, dim)`` in ``v``'s dtype. Costs one fp32 chunk of
    at most 64 MiB at a time, on top of the fused path.

    Example:
        >>> q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        >>> fused = F.scaled_dot_product_attention(q, k, v)
        >>> torch.allclose(explicit_attention(q, k, v, 0.5, []), fused, atol=1e-6)
        True
    """
    vf = v.float()
    outs = []
    for start, probs in attention_probs(q, k, scale, mask=mask):
        for fn in edits:
            probs = fn(start, probs)
        outs.append(probs @ vf)
    return torch.cat(outs, dim=2).to(v.dtype)
