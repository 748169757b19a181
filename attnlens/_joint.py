"""Hooked joint-attention processors: SD3's ``JointAttnProcessor2_0`` and Flux's ``FluxAttnProcessor``.

Each computes its layer's output as the diffusers processor it replaces does (the same projections, q/k
norms, rotary embeddings and fused attention call, so a hooked layer's output is unchanged) and hands the
hooks (capture) the image queries with the keys of the whole joint sequence. One hooked processor serves
both views of a joint layer in the layer table (``*.self``: the image->image quadrant, ``*.cross``: the
image->text quadrant, :mod:`attnlens._dit`): each hook gets ``keys=``, the slice of key positions of its
view, and takes the softmax over all keys before it slices, so the maps are the joint attention's own
rows. Key order: SD3 puts the image tokens first, Flux the text tokens first; Flux's single-stream blocks
see ``[text, image]`` concatenated, the text length coming from the step clock.

Editing (controllers) on joint attention is not supported yet. Imported by ``_hooks`` only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._errors import AttnlensError
from ._layers import LayerInfo


class _JointBase:
    def __init__(self, views: list[LayerInfo], base: Any, clock: Any = None) -> None:
        self.views, self.info, self.base, self.clock = views, views[0], base, clock
        self.hooks: list = []
        self.controllers: list = []

    def _notify(self, q_img: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice, text: slice | None) -> None:
        """Call every hook for each view: ``q_img`` ``(batch, heads, image tokens, dim)``, ``k`` and ``v``
        ``(batch, heads, all tokens, dim)``; ``image`` / ``text``: the key positions of each quadrant."""
        if not self.hooks:
            return
        scale = q_img.shape[-1] ** -0.5  # the fused call's default scale
        for view in self.views:
            keys = image if view.kind == "self" else text
            if keys is None:
                continue
            for hook in self.hooks:
                hook.on_attention(view, q_img, k, v, scale, (), keys=keys)


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
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        self._notify(query[:, :, :n_img], key, value, slice(0, n_img), text)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
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
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                    backend=getattr(self.base, "_attention_backend", None),
                                    parallel_config=getattr(self.base, "_parallel_config", None))
        if self.hooks:
            n_text = encoder_hidden_states.shape[1] if joint else getattr(self.clock, "text_len", 0)
            if not joint and not 0 < n_text < query.shape[1]:
                raise AttnlensError(f"layer {self.info.name}: cannot split the single-stream sequence of {query.shape[1]} "
                                    f"tokens into text and image (text length {n_text} from the step clock)")
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            self._notify(q[:, :, n_text:], k, v, slice(n_text, k.shape[2]), slice(0, n_text))
        out = out.flatten(2, 3).to(query.dtype)
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
