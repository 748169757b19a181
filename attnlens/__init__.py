"""attnlens: hooks and probes for attention in Stable Diffusion-family models."""

from ._errors import AttnlensError

__all__ = ["AttnlensError"]
__version__ = "0.1.0"
