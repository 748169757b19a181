"""Discover the attention layers of a Stable Diffusion-family UNet and name them.

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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import AttnlensError

if TYPE_CHECKING:  # annotations only
    import pandas as pd
    from diffusers import UNet2DConditionModel

_PATH = re.compile(
    r"^(?:(?P<part>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<t>\d+)\.attn(?P<which>[12])$"
)


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer. ``resolution`` is the query grid ``(h, w)`` at the pipeline's default size."""

    name: str
    path: str
    kind: str  # "self" or "cross"
    level: int
    resolution: tuple[int, int]
    factor: int
    heads: int
    head_dim: int
    module: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("module")
        d["resolution"] = list(self.resolution)
        return d

    @staticmethod
    def from_dict(d: dict) -> "LayerInfo":
        return LayerInfo(**{**d, "resolution": tuple(d["resolution"])})

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The query grid ``(h, w)`` of this layer for a latent of ``latent_hw``."""
        s = 2**self.level
        return (math.ceil(latent_hw[0] / s), math.ceil(latent_hw[1] / s))


class LayerTable(list):
    """A list of :class:`LayerInfo` that prints as a table and converts to pandas."""

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        rows = []
        for info in self:
            d = info.to_dict()
            d["resolution"] = f"{info.resolution[0]}x{info.resolution[1]}"
            rows.append(d)
        return pd.DataFrame(rows, columns=["name", "path", "kind", "level", "resolution", "factor", "heads", "head_dim"])

    def names(self) -> list[str]:
        return [info.name for info in self]

    def __str__(self) -> str:
        return self.to_pandas().to_string(index=False)

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html(index=False)


def get_unet(obj: Any) -> UNet2DConditionModel:
    """The ``UNet2DConditionModel`` of a pipeline (or the UNet itself); a clear error otherwise."""
    from diffusers import UNet2DConditionModel

    unet = obj if isinstance(obj, UNet2DConditionModel) else getattr(obj, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        denoiser = getattr(obj, "transformer", None) or unet or obj
        raise AttnlensError(
            f"unsupported architecture: {type(obj).__name__} with denoiser {type(denoiser).__name__}. attnlens "
            "supports pipelines whose denoiser is a diffusers UNet2DConditionModel (Stable Diffusion 1.x, 2.x, "
            "SDXL and their fine-tunes); transformer denoisers (SD3, Flux, PixArt) are not supported."
        )
    return unet


def _vae_scale(obj: Any) -> int:
    vae = getattr(obj, "vae", None)
    if vae is not None and hasattr(vae, "config"):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return int(getattr(obj, "vae_scale_factor", 8))


def layers(pipe_or_unet: Any) -> LayerTable:
    """Every attention layer of a pipeline's UNet, in execution order (down blocks, mid block, up blocks).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> table = layers(tiny_pipeline())
        >>> table.names()[:2]
        ['down.0.0.self', 'down.0.0.cross']
        >>> table[0].resolution, table[0].kind
        ((8, 8), 'self')
    """
    from diffusers.models.attention_processor import Attention

    unet = get_unet(pipe_or_unet)
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
