"""Discover the attention layers of a Stable Diffusion-family UNet and name them (diffusion transformers:
:mod:`attnlens._dit`, which :func:`layers` hands them to).

Naming scheme (stable across runs and diffusers versions)::

    {part}.{block}.{attention}[.{transformer}].{kind}      part in down / up
    mid.{attention}[.{transformer}].{kind}

``block`` is the index in ``unet.down_blocks`` / ``unet.up_blocks``, ``attention`` the index in the
block's ``attentions``, ``transformer`` the index in ``transformer_blocks`` (written only when that
``Transformer2DModel`` holds more than one block, as in SDXL), ``kind`` is ``self`` (``attn1``) or
``cross`` (``attn2``). SD 1.5's first cross-attention is ``down.0.0.cross``, module path
``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.

``level`` counts the downsamplings between the latent and the layer's feature map; a layer's query
grid at a latent of ``H x W`` is ``ceil(H / 2**level) x ceil(W / 2**level)``, and its ``factor`` is
the number of image pixels per query cell (``vae_scale_factor * 2**level``).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from ._errors import AttnlensError
from ._layerinfo import LayerInfo, LayerTable  # noqa: F401 (the layer record lives below this module and _dit)

if TYPE_CHECKING:  # annotations only
    from diffusers import UNet2DConditionModel

_PATH = re.compile(
    r"^(?:(?P<part>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<t>\d+)\.attn(?P<which>[12])$"
)


def get_unet(obj: Any) -> UNet2DConditionModel:
    """The ``UNet2DConditionModel`` of a pipeline (or the UNet itself); a clear error otherwise."""
    from diffusers import UNet2DConditionModel

    unet = obj if isinstance(obj, UNet2DConditionModel) else getattr(obj, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        from ._dit import is_dit, unsupported

        if is_dit(getattr(obj, "transformer", None)) or is_dit(obj):
            raise AttnlensError(
                f"{type(obj).__name__} has a transformer denoiser: attnlens.layers, capture, word maps, collect and edit "
                "(fpe, masactrl, p2p word swap) support it, but this operation (inversion, real-image editing, image "
                "encoding) needs a UNet2DConditionModel denoiser so far"
            )
        raise unsupported(obj)
    return unet


def get_denoiser(obj: Any) -> Any:
    """The denoiser of a pipeline (or the denoiser itself): a ``UNet2DConditionModel`` or a supported diffusion
    transformer (:mod:`attnlens._dit`); a clear error naming the supported ones otherwise."""
    from diffusers import UNet2DConditionModel

    from ._dit import is_dit, unsupported

    if isinstance(obj, UNet2DConditionModel) or is_dit(obj):
        return obj
    for name in ("unet", "transformer"):
        model = getattr(obj, name, None)
        if isinstance(model, UNet2DConditionModel) or is_dit(model):
            return model
    raise unsupported(obj)


def _vae_scale(obj: Any) -> int:
    vae = getattr(obj, "vae", None)
    if vae is not None and hasattr(vae, "config"):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return int(getattr(obj, "vae_scale_factor", 8))


def layers(pipe_or_unet: Any) -> LayerTable:
    """Every attention layer of a pipeline's denoiser, in execution order: a UNet's down blocks, mid block and
    up blocks; a diffusion transformer's blocks (names, streams and grids in ``attnlens._dit``).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> table = layers(tiny_pipeline())
        >>> table.names()[:2]
        ['down.0.0.self', 'down.0.0.cross']
        >>> table[0].resolution, table[0].kind
        ((8, 8), 'self')
    """
    from diffusers.models.attention_processor import Attention

    denoiser = get_denoiser(pipe_or_unet)
    from ._dit import is_dit

    if is_dit(denoiser):
        from ._dit import dit_layers

        return LayerTable(dit_layers(pipe_or_unet, denoiser))
    unet = denoiser
    sample = unet.config.sample_size
    sample_hw = (sample, sample) if isinstance(sample, int) else tuple(sample)
    n_down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
    down_level, level = [], 0
    for block in unet.down_blocks:
        down_level.append(level)
        if getattr(block, "downsamplers", None):
            level += 1
    up_level, level = [], n_down
    for block in unet.up_blocks:
        up_level.append(level)
        if getattr(block, "upsamplers", None):
            level -= 1
    vae_scale = _vae_scale(pipe_or_unet)
    found = []
    for path, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        m = _PATH.match(path)
        if m is None:
            continue
        part = m["part"] or "mid"
        if part == "mid":
            owner = unet.mid_block.attentions[int(m["attn"])]
            lvl, prefix = n_down, f"mid.{m['attn']}"
        else:
            blocks = unet.down_blocks if part == "down" else unet.up_blocks
            owner = blocks[int(m["block"])].attentions[int(m["attn"])]
            lvl = (down_level if part == "down" else up_level)[int(m["block"])]
            prefix = f"{part}.{m['block']}.{m['attn']}"
        if len(owner.transformer_blocks) > 1:
            prefix += f".{m['t']}"
        kind = "cross" if module.is_cross_attention else "self"
        s = 2**lvl
        heads = module.heads
        order = ({"down": 0, "mid": 1, "up": 2}[part], int(m["block"] or 0), int(m["attn"]), int(m["t"]), m["which"])
        found.append((order,
            LayerInfo(
                name=f"{prefix}.{kind}",
                path=path,
                kind=kind,
                level=lvl,
                resolution=(math.ceil(sample_hw[0] / s), math.ceil(sample_hw[1] / s)),
                factor=vae_scale * s,
                heads=heads,
                head_dim=module.inner_dim // heads,
                module=module,
            )))
    return LayerTable(info for _, info in sorted(found, key=lambda pair: pair[0]))
