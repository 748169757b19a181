"""attnlens: hooks and probes for attention in Stable Diffusion-family models.

Public names: :func:`load_pipeline`, :func:`layers`, :func:`capture`, :class:`Selector`, :class:`AttentionCache`,
:class:`AttnlensError`, and the :mod:`attnlens.shapes` world.
"""

from ._cache import AttentionCache
from ._capture import capture
from ._errors import AttnlensError
from ._layers import LayerInfo, layers
from ._pipeline import load_pipeline
from ._select import Selector

__all__ = ["AttentionCache", "AttnlensError", "LayerInfo", "Selector", "capture", "layers", "load_pipeline"]
__version__ = "0.1.0"
