"""Hooked joint-attention processors: SD3's ``JointAttnProcessor2_0`` and Flux's ``FluxAttnProcessor``.

Each computes its layer's output as the diffusers processor it replaces does (the same projections, q/k
norms, rotary embeddings and fused attention call, so a hooked layer's output is unchanged) and hands the
hooks (capture) the image queries with the keys of the whole joint sequence. One hooked processor serves
both views of a joint layer in the layer table (``*.self``: the image->image quadrant, ``*.cross``: the
image->text quadrant, :mod:`attnlens._dit`): each hook gets ``keys=``, the slice of key positions of its
view, and takes the softmax over all keys before it slices, so the maps are the joint attention's own
rows. Key order: SD3 puts the image tokens first, Flux the text tokens first; Flux's single-stream blocks
see ``[text, image]`` concatenated, the text length coming from the step clock.

Editing (controllers, :mod:`attnlens._control`) acts on a joint layer through its two views:

* a controller installed on the ``*.self`` view rewrites q, k, v of the **image tokens only**
  (``rewrite(site, q_img, k_img, v_img)``, ``(batch, heads, image tokens, dim)``), and the rewrite acts on
  the image->image quadrant alone: the image queries' joint rows become
  ``softmax([q'_img k'_img^T, q_img k_txt^T] / sqrt(d)) [v'_img; v_txt]``: the image-key logits from the
  rewritten image queries and keys, the text-key logits from the layer's own image queries and text keys
  (what the target's prompt asks), one softmax over both, the values of each part from its side. So FPE
  (source Q, K) gives the target's image queries the source's image->image logits and keeps the target's
  own image->text logits, as FPE on a UNet keeps the target's cross-attention; MasaCtrl (source K, V) makes
  the target's image queries attend to the source's image keys and values and to the target's own text.
  The text queries' rows (text->image, text->text) keep the layer's own attention. This stays fused: the
  two logit parts are one ``scaled_dot_product_attention`` over queries ``[q'_img, q_img]`` and keys
  ``[k'_img, 0]`` (image) / ``[0, k_txt]`` (text) of twice the head dim, with the scale of the head dim.
* a controller installed on the ``*.cross`` view edits the image->text quadrant's map (``edit_map``): it
  receives each image query's distribution over the text keys alone (the quadrant divided by its row
  mass, rows summing to 1), and its result is scaled back to that mass, so the image->image quadrant and
  the share of text in each joint row stay the layer's own and rows still sum to 1 (Prompt-to-Prompt's
  word swap on joint attention, :mod:`attnlens._methods`). The map is then materialised in query chunks.
* a map edit on a ``*.self`` view or a q/k/v rewrite on a ``*.cross`` view has no such meaning and is
  refused (:func:`attnlens._hooks.attach`).

Where no controller acts at a call (other steps, other layers) the layer keeps its fused attention call.
A capture inside an edit records the joint rows actually used. Imported by ``_hooks`` only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._errors import AttnlensError
from ._layers import LayerInfo


class _JointBase:
    def __init__(self, views: list[LayerInfo], base: Any, clock: Any = None, explicit: Any = None) -> None:
        self.views, self.info, self.base, self.clock = views, views[0], base, clock
        # the chunked explicit attention of the map edits (``_hooks.explicit_attention``, handed in by ``attach``)
        self.explicit = explicit
        self.hooks: list = []
        self.controllers: list = []
        self.chosen: dict[int, set[str]] = {}  # id(controller) -> the view kinds ("self"/"cross") it was installed on
        # concept maps (attnlens._concepts): taps see each call's attention output before the output projection,
        # ``tap(proc, out (batch, all tokens, heads * dim), image slice, text slice, side)``; ``side`` is True during
        # a side pass (the concept tokens' pass), where hooks and controllers stand aside
        self.taps: list = []
        self.side = False

    def _view(self, kind: str) -> LayerInfo | None:
        return next((v for v in self.views if v.kind == kind), None)

    def _notify(self, q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice, text: slice | None,
                scale: float | None = None, edits: tuple | list = ()) -> None:
        """Call every hook for each view: ``q_img`` ``(batch, heads, image tokens, dim)``, ``k`` and ``v``
        ``(batch, heads, all tokens, dim)``; ``image`` / ``text``: the key positions of each quadrant;
        ``scale``: the logits' scale (default ``dim ** -0.5``, the fused call's); ``edits``: map edits on the
        image queries' full joint rows."""
        if not self.hooks:
            return
        scale = q_img.shape[-1] ** -0.5 if scale is None else scale
        for view in self.views:
            keys = image if view.kind == "self" else text
            if keys is None:
                continue
            for hook in self.hooks:
                hook.on_attention(view, q_img, k, v, scale, edits, keys=keys)

    def _steer(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image: slice,
               text: slice | None, fused: Any) -> tuple | None:
        """The controllers' attention, or ``None`` when none acts at this call (the caller stays fused).

        ``query``/``key``/``value``: ``(batch, heads, all tokens, dim)`` in the layer's sequence order; ``image``
        / ``text``: the positions of each part; ``fused(q, k, v)``: the layer's own attention call. Returns
        ``(out, hook_q, hook_k, hook_v, scale, edits)``: the output ``(batch, heads, all tokens, dim)`` and what
        the hooks need to record the image queries' rows as used (see the module docstring).
        """
        if not self.controllers:
            return None
        self_view, cross_view = self._view("self"), self._view("cross")
        qi, ki, vi = query[:, :, image], key[:, :, image], value[:, :, image]
        q2, k2, v2 = qi, ki, vi
        edits = []
        for ctrl in self.controllers:
            kinds = self.chosen.get(id(ctrl), set())
            if "self" in kinds and self_view is not None:
                q2, k2, v2 = ctrl._rewrite(self_view, q2, k2, v2)
            if "cross" in kinds and cross_view is not None and text is not None:
                fn = ctrl._map_edit(cross_view, query.shape[0])
                if fn is not None:
                    edits.append(fn)
        if q2 is qi and k2 is ki and v2 is vi and not edits:
            return None
        scale = query.shape[-1] ** -0.5
        if text is None:  # an image-only attention (SD3.5's second one): the rewrite is the whole layer's
            out = F.scaled_dot_product_attention(q2, k2, v2, dropout_p=0.0, is_causal=False)
            return out, q2, k2, v2, scale, ()
        kt = key[:, :, text]
        b, h, n, d = key.shape
        hq = torch.cat([q2, qi], dim=-1)  # image-key logits from q'.k', text-key logits from q.k_txt
        hk = key.new_zeros(b, h, n, 2 * d)
        hk[:, :, image, :d] = k2
        hk[:, :, text, d:] = kt
        hv = value.clone()
        hv[:, :, image] = v2
        joint_edits: tuple = ()
        if edits:
            joint_edits = (_text_quadrant_edit(edits, text),)
            if self.explicit is None:
                raise AttnlensError(f"layer {self.info.name}: a map edit needs the explicit attention that "
                                    "attnlens._hooks.attach hands its processors")
            out_img = self.explicit(hq, hk, hv, scale, list(joint_edits))
        else:
            # values padded to the doubled head dim too (q, k and v of one width keep the flash and memory-efficient
            # kernels eligible on a GPU); the padding's output columns are zeros and dropped
            padded = torch.cat([hv, torch.zeros_like(hv)], dim=-1)
            out_img = F.scaled_dot_product_attention(hq, hk, padded, dropout_p=0.0, is_causal=False, scale=scale)[..., :d]
        out = torch.empty_like(value)
        out[:, :, image] = out_img.to(value.dtype)
        out[:, :, text] = fused(query[:, :, text], key, value).to(value.dtype)  # text queries: the layer's own
        return out, hq, hk, hv, scale, joint_edits


def _text_quadrant_edit(edits: list, text: slice) -> Any:
    """A map edit on full joint rows ``(batch, heads, chunk, all keys)`` that runs ``edits`` on the image->text
    quadrant as a distribution over the text keys (divided by its row mass) and scales the result back to that
    mass: the image->image quadrant and each row's share of text are kept, rows still sum to 1."""

    def fn(start: int, probs: torch.Tensor) -> torch.Tensor:
        part = probs[..., text]
        mass = part.sum(dim=-1, keepdim=True)
        cond = part / mass.clamp_min(torch.finfo(part.dtype).tiny)
        for edit in edits:
            cond = edit(start, cond)
        probs = probs.clone()
        probs[..., text] = cond * mass
        return probs

    return fn


class HookedSD3Processor(_JointBase):
    """SD3/SD3.5 joint attention (``JointAttnProcessor2_0``) with hooks. Sequence order ``[image, text]``.

    Shapes: ``hidden_states`` ``(batch, image tokens, dim)``, ``encoder_hidden_states`` ``(batch, text tokens,
    dim)`` or ``None`` (SD3.5's image-only second attention).
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = None
        if encoder_hidden_states is not None:
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2), torch.cat([value, ev], dim=2)
            text = slice(n_img, key.shape[2])
        def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)

        steered = None if self.side else self._steer(query, key, value, slice(0, n_img), text, fused)
        if steered is None:
            out = fused(query, key, value)
            if not self.side:
                self._notify(query[:, :, :n_img], key, value, slice(0, n_img), text)
        else:
            out, hq, hk, hv, scale, edits = steered
            self._notify(hq, hk, hv, slice(0, n_img), text, scale, edits)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        for tap in self.taps:
            tap(self, out, slice(0, n_img), text, self.side)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None and not self.side:  # SD3.5's image-only attention: output scaling (Ablate)
            for ctrl in self.controllers:
                factor = ctrl._output_scale(self.info, batch)
                if factor is not None:
                    out = out * factor
        return (out, context) if encoder_hidden_states is not None else out


class HookedFluxProcessor(_JointBase):
    """Flux.1 attention (``FluxAttnProcessor``) with hooks: double-stream blocks (image ``hidden_states`` and
    text ``encoder_hidden_states``, sequence order ``[text, image]``) and single-stream blocks (one
    ``[text, image]`` sequence). Rotary embeddings are applied to q and k before the map is taken.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if getattr(attn, "fused_projections", False):
            raise AttnlensError("attnlens hooks Flux attention with separate q/k/v projections: call "
                                "pipe.transformer.unfuse_qkv_projections() first")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1), torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (b, heads, n, d) in and out
            return dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attention_mask,
                                         backend=getattr(self.base, "_attention_backend", None),
                                         parallel_config=getattr(self.base, "_parallel_config", None)).transpose(1, 2)

        steered = None
        n_text = encoder_hidden_states.shape[1] if joint else getattr(self.clock, "text_len", 0)
        if (self.hooks or self.controllers) and not self.side:
            if not joint and not 0 < n_text < query.shape[1]:
                raise AttnlensError(f"layer {self.info.name}: cannot split the single-stream sequence of {query.shape[1]} "
                                    f"tokens into text and image (text length {n_text} from the step clock)")
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            image, text = slice(n_text, k.shape[2]), slice(0, n_text)
            if self.controllers:
                if attention_mask is not None:
                    raise AttnlensError(f"layer {self.info.name}: editing Flux attention with an attention mask is not "
                                        "supported (run without one)")
                steered = self._steer(q, k, v, image, text, fused)
            if steered is None:
                self._notify(q[:, :, n_text:], k, v, image, text)
            else:
                out_t, hq, hk, hv, scale, edits = steered
                self._notify(hq, hk, hv, image, text, scale, edits)
        if steered is None:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=getattr(self.base, "_attention_backend", None),
                                        parallel_config=getattr(self.base, "_parallel_config", None))
        else:
            out = out_t.transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)
        for tap in self.taps:
            tap(self, out, slice(n_text, out.shape[1]), slice(0, n_text), self.side)
        if joint:
            n_text = encoder_hidden_states.shape[1]
            context, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(context.contiguous())
        return out


def joint_processor_for(base: Any) -> type | None:
    """The hooked class for a diffusers joint-attention processor, by type (``None`` if it is not one).

    Flux's processor is diffusers' ``FluxAttnProcessor`` on ``FluxAttention`` (diffusers 0.35 and later; older
    versions' ``FluxAttnProcessor2_0`` is refused by :func:`attnlens._hooks.attach` with the hookable list)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if type(base) is JointAttnProcessor2_0:
        return HookedSD3Processor
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # an older diffusers
        return None
    if type(base) is FluxAttnProcessor:
        return HookedFluxProcessor
    return None
