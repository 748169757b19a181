"""Diffusion transformers: which ones attnlens supports, and their attention layers' names and grids.

Supported denoisers (recognised by type): ``PixArtTransformer2DModel`` (PixArt-alpha/Sigma: self-attention
and cross-attention to the text in every block), ``SD3Transformer2DModel`` (SD3/SD3.5 MMDiT: joint attention
over image and text tokens; SD3.5's second, image-only attention) and ``FluxTransformer2DModel`` (Flux.1:
double-stream joint blocks, then single-stream blocks over the concatenated sequence).

Naming scheme (stable across runs and diffusers versions)::

    block.{i}.self / block.{i}.cross      PixArt   transformer_blocks.{i}.attn1 / .attn2
    joint.{i}.self / joint.{i}.cross      SD3      transformer_blocks.{i}.attn
                                          Flux     transformer_blocks.{i}.attn
    dual.{i}.self                         SD3.5    transformer_blocks.{i}.attn2 (image tokens only)
    single.{i}.self / single.{i}.cross    Flux     single_transformer_blocks.{i}.attn

A joint-attention layer computes one softmax over image and text keys together; its map has four quadrants
(image->image, image->text, text->image, text->text). The layer table lists it twice, under the same module
path: ``*.self`` is the image->image quadrant and ``*.cross`` the image->text quadrant, both rows of the one
joint softmax (so a row of either quadrant alone sums to less than 1). ``stream`` says which kind of
attention a layer is: ``self`` / ``cross`` (separate attentions), ``joint`` or ``single``.

Grids: a transformer sees the latent in ``p x p`` patches (``patch_size``; Flux packs 2x2 latent cells into
one token), so its token grid at a latent of ``H x W`` is ``ceil(H / p) x ceil(W / p)``: ``level`` is
``log2(p)``, exactly as a UNet layer ``level`` downsamplings deep, and ``factor`` (image pixels per token)
is ``vae_scale_factor * p``. Every layer of a transformer has the same grid; it scales linearly with the
image side (1024x1024 with an 8x VAE and 2x2 patches: 64x64 tokens).

Editing (:func:`attnlens.edit`: ``fpe``, ``masactrl``, ``p2p`` word swap) chooses a transformer's layers by
block depth (:func:`block_depth`; the rules and why: :mod:`attnlens._methods`); what a controller does on
joint attention: :mod:`attnlens._joint`. Concept maps on SD3 and Flux: :mod:`attnlens._concepts`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._errors import AttnlensError
from ._layerinfo import LayerInfo

SUPPORTED = ("UNet2DConditionModel (Stable Diffusion 1.x, 2.x, SDXL and their fine-tunes)",
             "PixArtTransformer2DModel (PixArt-alpha, PixArt-Sigma)", "SD3Transformer2DModel (SD3, SD3.5)",
             "FluxTransformer2DModel (Flux.1)")


MIN_DIFFUSERS = (0, 35)
"""The oldest diffusers whose transformer attention attnlens hooks (Flux's ``FluxAttnProcessor`` and SD3's
q/k norms arrived by 0.35); UNets work with every diffusers the package allows."""


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    major, minor = diffusers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def dit_types() -> tuple[type, ...]:
    """The transformer denoiser classes attnlens supports."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    return (PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel)


def is_dit(denoiser: Any) -> bool:
    """Whether ``denoiser`` is a supported transformer; an :class:`AttnlensError` when it is one but the installed
    diffusers is older than :data:`MIN_DIFFUSERS`."""
    if not isinstance(denoiser, dit_types()):
        return False
    if _diffusers_version() < MIN_DIFFUSERS:
        import diffusers

        raise AttnlensError(f"{type(denoiser).__name__}: attnlens hooks diffusion transformers with diffusers >= "
                            f"{'.'.join(map(str, MIN_DIFFUSERS))} (installed: {diffusers.__version__}); "
                            "`pip install -U diffusers`, or use a UNet model")
    return True


def unsupported(obj: Any) -> AttnlensError:
    denoiser = getattr(obj, "transformer", None) or getattr(obj, "unet", None) or obj
    return AttnlensError(
        f"unsupported architecture: {type(obj).__name__} with denoiser {type(denoiser).__name__}. attnlens supports "
        f"pipelines whose denoiser is one of: {'; '.join(SUPPORTED)}. Linear-attention transformers (SANA) and video "
        "models are not supported."
    )


def timestep_scale(denoiser: Any) -> float:
    """The factor from the timestep a pipeline passes its denoiser to the scheduler's timesteps (Flux's
    pipeline passes ``t / 1000``)."""
    from diffusers import FluxTransformer2DModel

    return 1000.0 if isinstance(denoiser, FluxTransformer2DModel) else 1.0


def latent_hw(sample: torch.Tensor, kwargs: dict) -> tuple[int, int]:
    """The latent grid ``(H, W)`` of a denoiser call: the last two sides of a ``(B, C, H, W)`` latent, or for
    Flux's packed ``(B, tokens, C)`` latent twice the token grid its ``img_ids`` give (2x2 cells per token)."""
    if sample.ndim == 4:
        return tuple(sample.shape[-2:])
    ids = kwargs.get("img_ids")
    if ids is None:
        raise AttnlensError(f"cannot read the latent grid of a {tuple(sample.shape)} denoiser input without img_ids")
    ids = ids[0] if ids.ndim == 3 else ids
    return (2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1))


def text_side(pipe: Any) -> tuple[Any, Any]:
    """``(tokenizer, text_encoder)`` whose tokens are the text keys of the cross-attention maps: Flux's are the
    T5 tokens (``tokenizer_2``); SD3's first 77 text keys are the CLIP tokens of ``tokenizer`` (then T5's);
    PixArt's and the UNets' are those of ``tokenizer``."""
    from diffusers import FluxTransformer2DModel

    if isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel):
        return getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)
    return getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)


def _vae_scale(pipe: Any) -> int:
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "config"):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return int(getattr(pipe, "vae_scale_factor", 8))


def dit_layers(pipe: Any, model: Any) -> list[LayerInfo]:
    """The attention layers of a supported transformer ``model`` (of pipeline ``pipe``, or ``model`` itself) in
    execution order. Called by :func:`attnlens.layers`; without a pipeline, ``factor`` assumes an 8x VAE.

    Example (a joint layer's two views; capture and word maps as on a UNet):
        >>> import torch
        >>> from attnlens import capture, layers
        >>> from attnlens._testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()
        >>> [(i.name, i.stream, i.resolution) for i in layers(pipe)[:2]]
        [('joint.0.self', 'joint', (4, 4)), ('joint.0.cross', 'joint', (4, 4))]
        >>> with capture(pipe) as cache:
        ...     _ = pipe("a red star", num_inference_steps=2, max_sequence_length=16,
        ...              generator=torch.Generator().manual_seed(0))
        >>> cache["joint.0.cross", 1].shape  # 77 CLIP tokens, then 16 T5 tokens
        torch.Size([1, 1, 4, 4, 93])
        >>> cache.word_map("star").shape
        torch.Size([4, 4])
    """
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, FluxTransformer2DModel):
        patch = 2  # the pipeline packs 2x2 latent cells into one token (the model's own patch_size is 1)
        latent = int(getattr(pipe, "default_sample_size", 128))
    else:
        patch = int(model.config.patch_size)
        latent = int(model.config.sample_size)
    side = math.ceil(latent / patch)
    level = int(round(math.log2(patch)))
    factor = (_vae_scale(pipe) if pipe is not model else 8) * patch

    def info(name: str, path: str, kind: str, stream: str, module: Any) -> LayerInfo:
        heads = int(module.heads)
        head_dim = int(getattr(module, "head_dim", 0) or module.inner_dim // heads)
        return LayerInfo(name=name, path=path, kind=kind, level=level, resolution=(side, side), factor=factor,
                         heads=heads, head_dim=head_dim, stream=stream, module=module)

    found: list[LayerInfo] = []
    if isinstance(model, PixArtTransformer2DModel):
        for i, block in enumerate(model.transformer_blocks):
            found.append(info(f"block.{i}.self", f"transformer_blocks.{i}.attn1", "self", "self", block.attn1))
            if getattr(block, "attn2", None) is not None:
                found.append(info(f"block.{i}.cross", f"transformer_blocks.{i}.attn2", "cross", "cross", block.attn2))
    elif isinstance(model, SD3Transformer2DModel):
        for i, block in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}.attn"
            found.append(info(f"joint.{i}.self", path, "self", "joint", block.attn))
            found.append(info(f"joint.{i}.cross", path, "cross", "joint", block.attn))
            if getattr(block, "attn2", None) is not None:
                found.append(info(f"dual.{i}.self", f"transformer_blocks.{i}.attn2", "self", "self", block.attn2))
    elif isinstance(model, FluxTransformer2DModel):
        for prefix, part, blocks in (("joint", "transformer_blocks", model.transformer_blocks),
                                     ("single", "single_transformer_blocks", model.single_transformer_blocks)):
            for i, block in enumerate(blocks):
                path = f"{part}.{i}.attn"
                found.append(info(f"{prefix}.{i}.self", path, "self", prefix, block.attn))
                found.append(info(f"{prefix}.{i}.cross", path, "cross", prefix, block.attn))
    else:
        raise unsupported(pipe)
    return found


def is_dit_table(table: Any) -> bool:
    """Whether a layer table is a transformer's (its names are ``block.*``, ``joint.*``, ``dual.*``, ``single.*``)."""
    return any(i.name.split(".", 1)[0] in ("block", "joint", "dual", "single") for i in table)


def block_depth(table: Any) -> dict[str, int]:
    """Each layer's block depth: the index of its transformer block in execution order (PixArt ``block.i`` and
    SD3 ``joint.i`` / ``dual.i``: ``i``; Flux ``joint.i``: ``i``, ``single.j``: the number of joint blocks plus ``j``).

    Example:
        >>> from attnlens import layers
        >>> from attnlens._testing import tiny_flux_pipeline
        >>> block_depth(layers(tiny_flux_pipeline()))["single.1.self"]  # one joint block, then single 0 and 1
        2
    """
    n_joint = 1 + max((int(i.name.split(".")[1]) for i in table if i.name.startswith("joint.")), default=-1)
    out = {}
    for i in table:
        prefix, index = i.name.split(".")[:2]
        out[i.name] = int(index) + (n_joint if prefix == "single" else 0)
    return out


def start_latents(pipe: Any, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
    """The start noise of one image as ``pipe(prompt, generator=generator)`` draws it, in the form its ``latents=``
    takes: ``(1, C, h, w)`` for PixArt and SD3, Flux's packed ``(1, h/2 * w/2, 4 C)`` (2x2 latent cells a token)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.utils.torch_utils import randn_tensor

    model = pipe.transformer
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if isinstance(model, FluxTransformer2DModel):
        side = int(getattr(pipe, "default_sample_size", 128)) * scale
        h = 2 * (int(height or side) // (scale * 2))
        w = 2 * (int(width or side) // (scale * 2))
        channels = model.config.in_channels // 4
        noise = randn_tensor((1, channels, h, w), generator=generator, device=torch.device("cpu"), dtype=model.dtype)
        return pipe._pack_latents(noise, 1, channels, h, w)
    side = int(model.config.sample_size) * scale
    h, w = int(height or side) // scale, int(width or side) // scale
    return randn_tensor((1, model.config.in_channels, h, w), generator=generator, device=torch.device("cpu"),
                        dtype=model.dtype)


def latents_hw(pipe: Any, latents: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
    """The latent grid ``(h, w)`` of start latents from :func:`start_latents` (Flux: unpacked, twice the tokens)."""
    if latents.ndim == 4:
        return tuple(latents.shape[-2:])
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    side = int(getattr(pipe, "default_sample_size", 128)) * scale
    return (2 * (int(height or side) // (scale * 2)), 2 * (int(width or side) // (scale * 2)))


def text_tokenizers(pipe: Any) -> list[tuple[str, Any]]:
    """``(name, tokenizer)`` of every tokenizer whose tokens are text keys of the transformer's attention: PixArt's
    ``tokenizer`` (T5), SD3's ``tokenizer`` (CLIP, the first 77 keys) and ``tokenizer_3`` (T5, the rest), Flux's
    ``tokenizer_2`` (T5)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model = getattr(pipe, "transformer", None)
    if isinstance(model, FluxTransformer2DModel):
        names = ["tokenizer_2"]
    elif isinstance(model, SD3Transformer2DModel):
        names = ["tokenizer", "tokenizer_3"]
    else:
        names = ["tokenizer"]
    return [(n, getattr(pipe, n)) for n in names if getattr(pipe, n, None) is not None]
