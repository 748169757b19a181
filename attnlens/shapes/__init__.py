"""The Shapes world and its oracle (the embedded model's training tool is tools/shapes_model/, outside the package).

Example:
    >>> from attnlens import shapes
    >>> image, mask = shapes.render(shapes.Scene("heart", "pink", "small", "top", "gray"))
    >>> int(mask.sum()) > 0
    True
"""

from ._world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Example,
    Scene,
    ShapesDataset,
    check_value,
    describe,
    grid,
    iter_scenes,
    render,
    sample_example,
    sample_scene,
    with_attribute,
)
from .oracle import Reading, read, read_many

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLOURS", "IMAGE_SIZE", "POSITIONS", "SHAPES", "SIZES",
    "Example", "Scene", "ShapesDataset", "check_value", "describe", "grid", "iter_scenes",
    "render", "sample_example", "sample_scene", "with_attribute",
    "Reading", "read", "read_many",
]
