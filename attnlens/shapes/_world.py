"""The Shapes world: procedural 64x64 scenes of one object whose every attribute is known.

A scene is one object (shape, colour, size, position) on a plain background. Rendering is
deterministic: a :class:`Scene` carries its small jitters (offset, rotation, scale), and
:func:`sample_scene` draws them from a seeded generator. Images are anti-aliased by drawing at
4x and downsampling with a box filter; the object mask is the 4x coverage thresholded at 1/2.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .._errors import AttnlensError, choices

IMAGE_SIZE = 64
_SS = 4  # supersampling factor for anti-aliasing

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (0, 210, 220),
    "blue": (30, 70, 230),
    "purple": (140, 40, 200),
    "pink": (255, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (120, 120, 120),
    "white": (245, 245, 245),
}
SIZES: dict[str, float] = {"small": 7.0, "large": 12.5}  # radius in pixels at 64x64
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y) in pixels at 64x64
    "center": (32.0, 32.0),
    "left": (19.0, 32.0),
    "right": (45.0, 32.0),
    "top": (32.0, 19.0),
    "bottom": (32.0, 45.0),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
"""Every attribute of a scene and its valid values, in a fixed order."""

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}


def check_value(attribute: str, value: str) -> str:
    """Return ``value`` if it is valid for ``attribute``, else raise :class:`AttnlensError`."""
    if attribute not in ATTRIBUTES:
        raise AttnlensError(f"unknown attribute {attribute!r}; valid: {choices(ATTRIBUTES)}")
    if value not in ATTRIBUTES[attribute]:
        raise AttnlensError(
            f"unknown {attribute} {value!r}; valid {attribute} values: {choices(ATTRIBUTES[attribute])}"
        )
    return value


@dataclass(frozen=True)
class Scene:
    """One object on a background, with the jitters that make renders vary.

    Example:
        >>> from attnlens.shapes import Scene, render
        >>> image, mask = render(Scene("star", "red", "large", "left", "black"))
        >>> image.shape, mask.shape, image.dtype
        ((64, 64, 3), (64, 64), dtype('uint8'))
    """

    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    background: str = "black"
    dx: float = 0.0  # offset from the position's anchor, pixels
    dy: float = 0.0
    rotation: float = 0.0  # degrees
    scale: float = 1.0  # multiplies the size's radius

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            check_value(name, getattr(self, name))

    def attributes(self) -> dict[str, str]:
        """The five categorical attributes as a dict."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)

    def prompt_row(self) -> dict[str, str]:
        """``{"prompt": its canonical description, **its five attributes}``: a labelled prompt for
        :func:`attnlens.collect`.

        Example:
            >>> Scene("star", "red").prompt_row()["prompt"]
            'a large red star in the center on a black background'
        """
        return {"prompt": describe(self), **self.attributes()}


def _polygon(n: int, radius: float, cx: float, cy: float, rot: float, start: float = -90.0):
    pts = []
    for i in range(n):
        a = math.radians(start + rot + 360.0 * i / n)
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _star(radius: float, cx: float, cy: float, rot: float):
    pts = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = math.radians(-90.0 + rot + 36.0 * i)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart(radius: float, cx: float, cy: float, rot: float):
    pts = []
    cos_r, sin_r = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    for i in range(120):
        t = 2 * math.pi * i / 120
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        x, y = x / 16.5 * radius, (y - 2.5) / 16.5 * radius  # raw y spans -11.9..17: centre it
        pts.append((cx + x * cos_r - y * sin_r, cy + x * sin_r + y * cos_r))
    return pts


def _outline(shape: str, radius: float, cx: float, cy: float, rot: float):
    if shape == "square":
        return _polygon(4, radius * 1.15, cx, cy, rot, start=-45.0)
    if shape == "triangle":
        return _polygon(3, radius * 1.2, cx, cy + radius * 0.15, rot)
    if shape == "hexagon":
        return _polygon(6, radius * 1.05, cx, cy, rot, start=0.0)
    if shape == "star":
        return _star(radius * 1.25, cx, cy, rot)
    if shape == "heart":
        return _heart(radius * 1.15, cx, cy, rot)
    raise AssertionError(shape)


def render(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene.

    Returns:
        ``(image, mask)``: ``image`` is ``uint8`` of shape ``(size, size, 3)``; ``mask`` is
        ``bool`` of shape ``(size, size)``, True where the object covers at least half a pixel.
    """
    big = size * _SS
    k = big / IMAGE_SIZE
    ax, ay = POSITIONS[scene.position]
    cx, cy = (ax + scene.dx) * k, (ay + scene.dy) * k
    radius = SIZES[scene.size] * scene.scale * k
    cover = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(cover)
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(_outline(scene.shape, radius, cx, cy, scene.rotation), fill=255)
    alpha = np.asarray(cover.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    image = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha >= 0.5


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a scene: attributes uniformly unless fixed by keyword, plus small jitters.

    Example:
        >>> import numpy as np
        >>> sample_scene(np.random.default_rng(0), shape="heart").shape
        'heart'
    """
    values = {}
    for name, valid in ATTRIBUTES.items():
        if name in fixed and fixed[name] is not None:
            values[name] = check_value(name, fixed[name])
        else:
            values[name] = valid[int(rng.integers(len(valid)))]
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise AttnlensError(f"unknown attribute(s) {sorted(unknown)}; valid: {choices(ATTRIBUTES)}")
    return Scene(
        **values,
        dx=float(rng.uniform(-2.0, 2.0)),
        dy=float(rng.uniform(-2.0, 2.0)),
        rotation=float(rng.uniform(-10.0, 10.0)),
        scale=float(rng.uniform(0.92, 1.08)),
    )


# ----------------------------------------------------------------------------------------- prompts
_ORDERS = (
    "{size} {colour} {shape}",
    "{colour} {size} {shape}",
)


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def describe(scene: Scene, mention: Sequence[str] | None = None, rng: np.random.Generator | None = None) -> str:
    """Write a prompt that mentions the attributes in ``mention`` (all five by default).

    With ``rng`` the template (word order, position phrase, prefix) is drawn at random; without it
    the canonical form is used: ``"a large red star on the left on a black background"``.

    Example:
        >>> describe(Scene("star", "red", "small", "top", "gray"), mention=["shape", "colour"])
        'a red star'
    """
    mention = tuple(ATTRIBUTES) if mention is None else tuple(mention)
    for name in mention:
        if name not in ATTRIBUTES:
            raise AttnlensError(f"cannot mention {name!r}; valid: {choices(ATTRIBUTES)}")
    pick = (lambda seq: seq[int(rng.integers(len(seq)))]) if rng is not None else (lambda seq: seq[0])
    shape = scene.shape if "shape" in mention else pick(("shape", "object"))
    order = pick(_ORDERS)
    noun = order.format(
        size=scene.size if "size" in mention else "",
        colour=scene.colour if "colour" in mention else "",
        shape=shape,
    )
    noun = " ".join(noun.split())
    parts = [f"{_article(noun)} {noun}"]
    extras = []
    if "position" in mention:
        extras.append(pick(POSITION_PHRASES[scene.position]))
    if "background" in mention:
        extras.append(pick((f"on a {scene.background} background", f"against a {scene.background} background")))
    if rng is not None and len(extras) == 2 and rng.random() < 0.5:
        extras.reverse()
    text = " ".join(parts + extras)
    if rng is not None:
        prefix = pick(("", "", "a photo of ", "an image of ", "a drawing of "))
        if prefix:
            text = prefix + text
        if "position" in mention and rng.random() < 0.25:  # fronted position phrase
            pos = next(e for e in extras if e in POSITION_PHRASES[scene.position])
            text = text.replace(" " + pos, "")
            text = f"{pos}, {text}"
    return text


MENTION_PROBABILITY: dict[str, float] = {
    "shape": 0.9,
    "colour": 0.85,
    "size": 0.6,
    "position": 0.7,
    "background": 0.6,
}
"""How often :func:`sample_example` mentions each attribute; the rest are sampled but unprompted."""


@dataclass(frozen=True)
class Example:
    """One training example: the scene, its prompt and which attributes the prompt names."""

    scene: Scene
    prompt: str
    mentioned: tuple[str, ...] = field(default=())

    def prompt_row(self) -> dict[str, str]:
        """``{"prompt": its prompt, **its scene's five attributes}``: a labelled prompt for :func:`attnlens.collect`."""
        return {"prompt": self.prompt, **self.scene.attributes()}


def sample_example(rng: np.random.Generator) -> Example:
    """Draw a scene and a prompt that mentions a random subset of its attributes."""
    scene = sample_scene(rng)
    mention = tuple(name for name, p in MENTION_PROBABILITY.items() if rng.random() < p)
    return Example(scene, describe(scene, mention, rng), mention)


class ShapesDataset:
    """A deterministic, indexable stream of rendered examples (a map-style torch dataset).

    Item ``i`` depends only on ``(seed, i)``, so any worker or resumed run sees the same data.
    Each item is ``{"pixels": float32 (3, size, size) in [-1, 1], "mask": bool (size, size), "prompt": str,
    **attributes}``; ``size`` (default 64) renders the same scenes at another resolution.

    Example:
        >>> ds = ShapesDataset(1000, seed=0)
        >>> item = ds[3]
        >>> item["pixels"].shape, set(ATTRIBUTES) <= set(item)
        ((3, 64, 64), True)
    """

    def __init__(self, length: int, seed: int = 0, size: int = IMAGE_SIZE) -> None:
        self.length = int(length)
        self.seed = int(seed)
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise AttnlensError(f"size must be an int of at least 16 pixels, not {size!r}")
        self.size = size

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        return sample_example(np.random.default_rng([self.seed, index]))

    def __getitem__(self, index: int) -> dict:
        ex = self.example(index)
        image, mask = render(ex.scene, self.size)
        pixels = image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        return {"pixels": pixels, "mask": mask, "prompt": ex.prompt, **ex.scene.attributes()}


def grid(seeds: int | Sequence[int] = 1, **values: str | Sequence[str] | None) -> list[Scene]:
    """The attribute grid for studies: every combination of the given values, each ``seeds`` times.

    Attributes not given range over all their values; give a single value to hold one fixed.
    Jitters come from each seed, so a grid is reproducible.

    Example:
        >>> len(grid(shape=["star", "circle"], colour="red", size="large", position="center",
        ...          background="black", seeds=3))
        6
    """
    unknown = set(values) - set(ATTRIBUTES)
    if unknown:
        raise AttnlensError(f"unknown attribute(s) {sorted(unknown)}; valid: {choices(ATTRIBUTES)}")
    axes = []
    for name, valid in ATTRIBUTES.items():
        v = values.get(name)
        chosen = valid if v is None else ((v,) if isinstance(v, str) else tuple(v))
        for item in chosen:
            check_value(name, item)
        axes.append(chosen)
    seed_list = range(seeds) if isinstance(seeds, int) else list(seeds)
    scenes = []
    for combo in itertools.product(*axes):
        for s in seed_list:
            base = sample_scene(np.random.default_rng([s, 7919]), **dict(zip(ATTRIBUTES, combo)))
            scenes.append(base)
    return scenes


def iter_scenes(n: int, seed: int = 0) -> Iterator[Scene]:
    """``n`` random scenes, deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield sample_scene(rng)


def with_attribute(scene: Scene, **changes: str) -> Scene:
    """A copy of ``scene`` with some attributes changed (validated)."""
    for name, value in changes.items():
        check_value(name, value)
    return replace(scene, **changes)
