"""attnlens: hooks and probes for attention in Stable Diffusion-family models.

Public names: :func:`load_pipeline`, :func:`layers`, :func:`capture`, :class:`Selector`, :class:`AttentionCache`,
:class:`AttnlensError`; probing with :func:`collect`, :class:`Features`, :func:`load_features`,
:func:`probe` and :func:`probe_heatmap`; editing with :func:`edit`, :func:`invert`, :func:`edit_image` and
:class:`Controller` / :func:`control`; :func:`set_threads`, :func:`results_dir`, :func:`capture_settings` and :func:`is_shapes_model` for notebooks; and the :mod:`attnlens.shapes` world.
"""

from ._cache import AttentionCache
from ._collect import Features, collect, load_features
from ._capture import capture
from ._control import Controller, Site, control
from ._editing import METHODS, EditResult, Inversion, default_layers, edit, edit_image, invert
from ._errors import AttnlensError
from ._layers import LayerInfo, layers
from ._metrics import CLIPMetrics
from ._notebook import capture_settings, is_shapes_model, results_dir, set_threads
from ._pipeline import load_pipeline
from ._probing import probe, probe_heatmap
from ._select import Selector

__all__ = ["Features", "collect", "load_features", "probe", "probe_heatmap",
           "AttentionCache", "AttnlensError", "CLIPMetrics", "Controller", "EditResult", "Inversion", "LayerInfo", "METHODS", "Selector",
           "Site", "capture", "control", "default_layers", "edit", "edit_image", "invert", "layers", "load_pipeline",
           "results_dir", "set_threads", "capture_settings", "is_shapes_model"]
__version__ = "0.1.0"
