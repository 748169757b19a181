"""attnlens: hooks and probes for attention in Stable Diffusion-family models.

Public names: :func:`load_pipeline`, :func:`layers`, :func:`capture`, :class:`Selector`, :class:`AttentionCache`,
:class:`AttnlensError`; :func:`concept_map` (:class:`ConceptMaps`) on SD3 and Flux; probing with :func:`collect`, :class:`Features`, :func:`load_features`,
:func:`probe` and :func:`probe_heatmap`; editing with :func:`edit` (from :func:`start_noise`), :func:`invert`,
:func:`edit_image`, the method option types (:class:`FPEOptions`, :class:`P2POptions`, :class:`CrossOptions`,
:class:`MasaCtrlOptions`, :class:`NoneOptions`) and :class:`Controller` / :func:`control` with the built-in controllers
(:class:`InjectQK`, :class:`InjectKV`, :class:`CopyMap`, :class:`CrossMapEdit`) and :class:`Ablate`; :func:`set_threads`,
:func:`results_dir`, :func:`capture_settings` and :func:`is_shapes_model` for notebooks; and the
:mod:`attnlens.shapes` world.
"""

from ._cache import AttentionCache
from ._capture import capture
from ._collect import collect
from ._concepts import ConceptMaps, concept_map
from ._control import Controller, Site, control
from ._editing import EditResult, edit, edit_image, start_noise
from ._errors import AttnlensError
from ._features import Features, load_features
from ._inversion import Inversion, invert
from ._layers import LayerInfo, layers
from ._methods import (METHODS, Ablate, CopyMap, CrossMapEdit, CrossOptions, EditPlan, FPEOptions, InjectKV, InjectQK,
                       MasaCtrlOptions, NoneOptions, P2POptions, default_layers)
from ._metrics import CLIPMetrics
from ._notebook import capture_settings, is_shapes_model, results_dir, set_threads
from ._pipeline import load_pipeline
from ._probing import probe, probe_heatmap
from ._select import Selector

__all__ = ["ConceptMaps", "concept_map", "Features", "collect", "load_features", "probe", "probe_heatmap",
           "AttentionCache", "AttnlensError", "CLIPMetrics", "Controller", "EditResult", "Inversion", "LayerInfo", "METHODS", "Selector",
           "Site", "capture", "control", "default_layers", "edit", "edit_image", "invert", "layers", "load_pipeline",
           "FPEOptions", "P2POptions", "CrossOptions", "MasaCtrlOptions", "NoneOptions", "EditPlan",
           "InjectQK", "InjectKV", "CopyMap", "CrossMapEdit", "Ablate", "start_noise",
           "results_dir", "set_threads", "capture_settings", "is_shapes_model"]
__version__ = "0.1.0"
