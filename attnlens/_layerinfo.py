"""The record of one attention layer (:class:`LayerInfo`) and the table :func:`attnlens.layers` returns.

Its own module, below both the UNet layer discovery (:mod:`attnlens._layers`) and the transformer one
(:mod:`attnlens._dit`), so neither imports the other to get it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    import pandas as pd


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
    stream: str = "unet"  # "unet"; for transformers "self", "cross", "joint" or "single" (attnlens._dit)
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
        return pd.DataFrame(rows, columns=["name", "path", "kind", "stream", "level", "resolution", "factor",
                                           "heads", "head_dim"])

    def names(self) -> list[str]:
        return [info.name for info in self]

    def __str__(self) -> str:
        return self.to_pandas().to_string(index=False)

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html(index=False)
