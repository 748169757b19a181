"""Visualisation: heat-map overlays, grids, self-attention views and plotly figures with sliders.

Static pictures are PIL images (light pages, easy to save). Interactive figures are plotly figures
whose sliders only switch which images are visible, so they work in a static HTML page with no
kernel behind it. Maps are drawn with one perceptual colour map (viridis, :func:`colour_map`); the grids
and sliders put every map of a figure on one shared scale (:func:`shared_scale`) with a colour bar, and
show each map beside the image (or as contour lines over it, :func:`overlay`) so the object stays readable.

Shapes used below: a cross-attention word map and a self-attention map are ``(h, w)``; a PCA view
is ``(h, w, 3)`` in [0, 1]; images are PIL ``RGB`` images of any size.

Example:
    >>> import torch
    >>> import attnlens
    >>> from attnlens._testing import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> with attnlens.capture(pipe, layers="*") as cache:
    ...     image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    >>> word_grid(cache, image, tile=32, columns=3).size[0]  # the image, "a", "red", "star"; 68 px colour bar
    172
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ._errors import AttnlensError, choices
from ._notebook import OFFLINE_RENDERER, PAGE_RENDERER, edit_scorer, oracle_notice, results_dir, setup_notebook

if TYPE_CHECKING:  # plotly is an optional (book) dependency
    import plotly.graph_objects as go

    from ._cache import AttentionCache

Heat = "torch.Tensor | np.ndarray"
Point = tuple[float, float]

__all__ = [
    "CONTOUR_LEVELS", "colour_bar", "colour_map", "shared_scale", "with_colour_bar", "architecture",
    "as_image", "attention_slider", "image_grid", "image_slider", "layer_grid", "mark", "overlay",
    "self_attention_grid", "self_attention_map", "self_attention_pca", "self_attention_slider",
    "results_dir", "setup_notebook", "step_grid", "word_grid", "OFFLINE_RENDERER", "PAGE_RENDERER", "oracle_notice",
    "edit_scorer",
]


# ------------------------------------------------------------------------------------ basics
def _array(heat: Any) -> np.ndarray:
    if torch.is_tensor(heat):
        return heat.detach().float().cpu().numpy()
    return np.asarray(heat, dtype=np.float32)


def _normalise(a: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant map becomes zeros)."""
    a = a.astype(np.float32)
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-12)


# viridis (matplotlib's perceptually uniform map, CC0), sampled at 17 points and interpolated linearly
_VIRIDIS = np.array([(68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
                     (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
                     (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)], dtype=np.float32)
CONTOUR_LEVELS = (0.5, 0.8)
"""The fractions of the scale at which :func:`overlay` draws its contour lines."""


def colour_map(x: np.ndarray) -> np.ndarray:
    """The perceptual colour map (viridis: dark purple at 0, yellow at 1) every figure here uses:
    values ``(...)`` in [0, 1] -> colours ``(..., 3)`` in [0, 255].

    Example:
        >>> colour_map(np.array([0.0, 1.0])).astype(int).tolist()
        [[68, 1, 84], [253, 231, 37]]
    """
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    t = (x - lo)[..., None]
    return _VIRIDIS[lo] * (1 - t) + _VIRIDIS[hi] * t


def _ramp(x: np.ndarray) -> np.ndarray:
    return colour_map(x)


Scale = "tuple[float, float] | None"


def _scaled(a: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """To [0, 1]: over ``scale`` = (low, high) when given (one scale shared by a grid), else min-max."""
    if scale is None:
        return _normalise(a)
    lo, hi = float(scale[0]), float(scale[1])
    return np.clip((a.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)


def shared_scale(heats: Sequence[Any], from_zero: bool = True) -> tuple[float, float]:
    """One scale for a grid of maps, so tiles compare by colour: from 0 (attention is never negative; with
    ``from_zero=False``, or when a map is negative, the smallest value of any map) to the largest value of
    any map.

    Example:
        >>> shared_scale([np.full((2, 2), 0.1), np.eye(2) * 0.4])
        (0.0, 0.4000000059604645)
    """
    arrays = [_array(h) for h in heats]
    if not arrays:
        raise AttnlensError("shared_scale needs at least one map")
    lo = min(float(a.min()) for a in arrays)
    lo = min(0.0, lo) if from_zero else lo
    hi = max(float(a.max()) for a in arrays)
    return lo, hi if hi > lo else lo + 1.0


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float ``(h, w)`` array in [0, 1] to ``size`` = (width, height)."""
    img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize(size, resample), dtype=np.float32) / 255


def _edges(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a boolean mask (pixels of the mask with a 4-neighbour outside it)."""
    pad = np.pad(mask, 1, mode="edge")
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def _dilate(mask: np.ndarray) -> np.ndarray:
    pad = np.pad(mask, 1)
    return mask | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]


def overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, alpha: float = 0.55, *, style: str = "contour",
            scale: tuple[float, float] | None = None) -> Image.Image:
    """Show a heat map ``(h, w)`` on ``image``, upsampled to its size, keeping the object readable.

    ``style="contour"`` (default) leaves the image's colours as they are and draws the map's contour lines
    at :data:`CONTOUR_LEVELS` of the scale, each in its colour of :func:`colour_map` with a dark edge, so
    a red star stays red. ``style="blend"`` mixes the colour-mapped heat into the image at ``alpha``.
    ``scale`` = (low, high) maps values to the colour map (give one scale to every tile of a grid, see
    :func:`shared_scale`); default: the map's own minimum and maximum.

    Example:
        >>> img = Image.new("RGB", (64, 64), (200, 30, 30))
        >>> out = overlay(img, np.eye(8))
        >>> out.size, out.getpixel((60, 2))  # far from the diagonal: the image's own colour
        ((64, 64), (200, 30, 30))
    """
    h = _array(heat)
    if h.ndim != 2:
        raise AttnlensError(f"overlay needs a heat map of shape (h, w), got shape {tuple(h.shape)}")
    if style not in ("contour", "blend"):
        raise AttnlensError(f"style must be one of {choices(('contour', 'blend'))}, not {style!r}")
    big = _resize(_scaled(h, scale), image.size, Image.BILINEAR)
    if style == "contour":  # smooth over about one map cell, so lines follow the map, not its cell edges
        radius = max(image.size[0] / h.shape[1], image.size[1] / h.shape[0]) / 2
        big = np.asarray(Image.fromarray((big * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
                         dtype=np.float32) / 255
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if style == "blend":
        return Image.fromarray(np.clip((1 - alpha) * base + alpha * _ramp(big), 0, 255).astype(np.uint8))
    out = base.copy()
    for level in CONTOUR_LEVELS:
        inside = big >= level
        line = _edges(inside)
        halo = _dilate(line) & ~inside  # a dark edge just outside each line, so it reads on any colour
        out[halo] = 0.35 * out[halo]
        out[line] = colour_map(np.float32(level))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def colour_bar(scale: tuple[float, float], height: int = 128, width: int = 64, label: str = "attention") -> Image.Image:
    """A vertical colour bar for :func:`colour_map` over ``scale`` = (low, high), labelled at both ends and
    at the contour levels, with ``label`` on top.

    Example:
        >>> colour_bar((0.0, 0.5), height=100).size
        (64, 100)
    """
    lo, hi = float(scale[0]), float(scale[1])
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = _font(10)
    top, bottom, bar_w = 20, height - 6, 10
    ramp = colour_map(np.linspace(1, 0, max(bottom - top, 2)))[:, None, :].repeat(bar_w, axis=1)
    out.paste(Image.fromarray(ramp.astype(np.uint8)), (2, top))
    draw.text((1, 0), label, fill=(30, 30, 30), font=font)
    span = bottom - top - 1
    for frac in (0.0, *CONTOUR_LEVELS, 1.0):
        y = int(bottom - 1 - frac * span)
        draw.line([(2 + bar_w, y), (5 + bar_w, y)], fill=(30, 30, 30))
        draw.text((7 + bar_w, max(top - 2, min(y - 5, bottom - 10))), f"{lo + frac * (hi - lo):.2g}", fill=(30, 30, 30), font=font)
    return out


def with_colour_bar(grid: Image.Image, scale: tuple[float, float], label: str = "attention") -> Image.Image:
    """``grid`` with a :func:`colour_bar` for ``scale`` on its right.

    Example:
        >>> with_colour_bar(Image.new("RGB", (100, 80)), (0.0, 1.0)).size
        (168, 80)
    """
    bar = colour_bar(scale, height=max(64, min(grid.size[1], 260)), label=label)
    out = Image.new("RGB", (grid.size[0] + bar.size[0] + 4, max(grid.size[1], bar.size[1])), (255, 255, 255))
    out.paste(grid, (0, 0))
    out.paste(bar, (grid.size[0] + 4, 0))
    return out


def as_image(values: torch.Tensor | np.ndarray, size: int | tuple[int, int] | None = None, *,
             scale: tuple[float, float] | None = None) -> Image.Image:
    """Draw a map alone: ``(h, w)`` through :func:`colour_map` (over ``scale`` = (low, high), default the
    map's own minimum and maximum), or ``(h, w, 3)`` in [0, 1] as RGB. ``size`` (pixels, or (width, height))
    enlarges it with nearest-neighbour sampling, so each attention cell stays a visible square.

    Example:
        >>> as_image(np.eye(4), size=32).size
        (32, 32)
        >>> as_image(np.zeros((4, 6, 3))).size
        (6, 4)
    """
    a = _array(values)
    if a.ndim == 2:
        rgb = _ramp(_scaled(a, scale))
    elif a.ndim == 3 and a.shape[-1] == 3:
        rgb = np.clip(a, 0, 1) * 255
    else:
        raise AttnlensError(f"as_image takes (h, w) or (h, w, 3), got shape {tuple(a.shape)}")
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if size is not None:
        img = img.resize((size, size) if isinstance(size, int) else tuple(size), Image.NEAREST)
    return img


def mark(image: Image.Image, point: Point, colour: tuple[int, int, int] = (255, 40, 40), radius: int | None = None) -> Image.Image:
    """A copy of ``image`` with a cross drawn at ``point`` = (x, y) in its pixel coordinates.

    Example:
        >>> mark(Image.new("RGB", (16, 16)), (8, 8)).getpixel((8, 8))
        (255, 40, 40)
    """
    out = image.convert("RGB").copy()
    r = radius if radius is not None else max(2, min(out.size) // 16)
    x, y = point
    draw = ImageDraw.Draw(out)
    width = max(1, r // 2)
    draw.line([(x - r, y), (x + r, y)], fill=colour, width=width)
    draw.line([(x, y - r), (x, y + r)], fill=colour, width=width)
    return out


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def image_grid(images: Sequence[Image.Image | np.ndarray], labels: Sequence[str] | None = None, columns: int | None = None,
               tile: int | None = 128, pad: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Lay images out in a grid, each resized to ``tile`` pixels square (``None``: keep the first's size),
    with an optional label under each (wrapped onto as many lines as it needs, never cut off). ``uint8`` arrays ``(h, w, 3)`` are accepted as images.

    Example:
        >>> tiles = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
        >>> image_grid(tiles, columns=2, tile=16).size  # 2 x 2 tiles of 16 px, 2 px apart
        (38, 38)
    """
    if not len(images):
        raise AttnlensError("image_grid needs at least one image")
    images = [Image.fromarray(np.asarray(i)) if not isinstance(i, Image.Image) else i for i in images]
    if labels is not None and len(labels) != len(images):
        raise AttnlensError(f"{len(labels)} labels for {len(images)} images")
    w, h = (tile, tile) if tile is not None else images[0].size
    columns = columns or min(len(images), 8)
    rows = math.ceil(len(images) / columns)
    text_px = max(8, min(14, w // 8))
    font = _font(text_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(str(t), font, w - 2, measure) for t in labels] if labels is not None else None
    line_h = text_px + 2
    label_h = max(len(x) for x in wrapped) * line_h + 3 if wrapped else 0
    out = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + label_h + pad) + pad), background)
    draw = ImageDraw.Draw(out)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + label_h + pad)
        resample = Image.NEAREST if img.size[0] <= w else Image.BILINEAR
        out.paste(img.convert("RGB").resize((w, h), resample), (x, y))
        if wrapped is not None:
            for k, line in enumerate(wrapped[i]):
                draw.text((x + 1, y + h + 1 + k * line_h), line, fill=(30, 30, 30), font=font)
    return out


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels: broken at spaces, a word longer than a line at
    characters (no label is cut off)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


# ------------------------------------------------------------------------------------ cross-attention grids
def _cross_layers(cache: "AttentionCache", layers: Sequence[str] | None) -> list[str]:
    if layers is not None:
        return list(layers)
    names = [n for n, i in cache.layers.items() if i.kind == "cross"]
    if not names:
        raise AttnlensError("no cross-attention layer was captured; capture with kind='cross' (the default) or layers='*'")
    return names


def _captured_steps(cache: "AttentionCache", layers: Sequence[str]) -> list[int]:
    steps = sorted({s for (l, s) in cache.keys() if l in layers and s is not None})
    if not steps:
        raise AttnlensError("the maps were reduced over steps at capture time (reduce=...): there is no per-step map")
    return steps


def _maps_beside(image: Image.Image, heats: Sequence[Any], labels: Sequence[str], tile: int, columns: int | None,
                 first: str = "image") -> Image.Image:
    """The image, then each map on one shared scale, then the colour bar."""
    scale = shared_scale(heats)
    tiles = [image] + [as_image(h, scale=scale) for h in heats]
    return with_colour_bar(image_grid(tiles, [first, *labels], columns=columns, tile=tile), scale)


def word_grid(cache: "AttentionCache", image: Image.Image, words: Sequence[str] | None = None, *, prompt: int = 0,
              layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, tile: int = 128,
              columns: int | None = None) -> Image.Image:
    """The image, then each word's map (default: every word of the prompt) beside it, averaged over
    ``layers`` (default: :meth:`~attnlens.AttentionCache.word_map`'s, the finest captured level) and
    ``steps``, on one shared scale with its colour bar on the right.
    """
    words = list(cache.words(prompt) if words is None else words)
    heats = [cache.word_map(w, prompt, layers=layers, steps=steps) for w in words]
    return _maps_beside(image, heats, words, tile, columns)


def layer_grid(cache: "AttentionCache", image: Image.Image, word: str, *, layers: Sequence[str] | None = None,
               steps: Sequence[int] | None = None, prompt: int = 0, tile: int = 128, columns: int | None = None) -> Image.Image:
    """The image, then ``word``'s map in each cross-attention layer (each at its own resolution), averaged
    over ``steps``, on one shared scale with its colour bar. Labels are ``layer (h x w)``.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe) as cache:
        ...     image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        >>> layer_grid(cache, image, "star", tile=16, columns=1).size[0]  # 16 px tiles, 2 px padding, the colour bar
        88
    """
    names = _cross_layers(cache, layers)
    heats, labels = [], []
    for name in names:
        heat = cache.word_map(word, prompt, layers=[name], steps=steps)
        heats.append(heat)
        labels.append(f"{name} ({heat.shape[0]}x{heat.shape[1]})")
    return _maps_beside(image, heats, labels, tile, columns)


def step_grid(cache: "AttentionCache", image: Image.Image, word: str, *, steps: Sequence[int] | None = None,
              layers: Sequence[str] | None = None, prompt: int = 0, tile: int = 128, columns: int | None = None) -> Image.Image:
    """The image, then ``word``'s map at each denoising step (default: every captured step), averaged over
    ``layers`` at the largest captured grid, on one shared scale with its colour bar. Labels are ``step i``.
    """
    names = _cross_layers(cache, layers)
    steps = _captured_steps(cache, names) if steps is None else list(steps)
    heats = [cache.word_map(word, prompt, layers=names, steps=[s]) for s in steps]
    return _maps_beside(image, heats, [f"step {s}" for s in steps], tile, columns)


# ------------------------------------------------------------------------------------ self-attention
def _self_layer(cache: "AttentionCache", layer: str):
    info = cache.layers.get(layer)
    if info is None or info.kind != "self":
        have = [n for n, i in cache.layers.items() if i.kind == "self"]
        raise AttnlensError(f"{layer!r} is not a captured self-attention layer; captured: {have or 'none (capture kind=self)'}")
    return info


def _image_size(cache: "AttentionCache", info) -> tuple[int, int]:
    """(width, height) of the generated image, from the latent size and the layer's pixels per cell."""
    vae = info.factor // 2**info.level
    return cache.latent_hw[1] * vae, cache.latent_hw[0] * vae


def _layer_maps(cache: "AttentionCache", layer: str, steps: Sequence[int] | None, prompt: int, branch: str) -> torch.Tensor:
    """Mean over the chosen steps and heads of one layer: ``(h, w, keys)``."""
    have = [s for (l, s) in cache.keys() if l == layer]
    if steps is None:
        picked = have
    else:
        missing = [s for s in steps if s not in have]
        if missing:
            raise AttnlensError(f"no map for layer {layer!r} at step(s) {missing}; captured: {sorted(map(str, have))}")
        picked = list(steps)
    item = cache._item(prompt, branch)
    return torch.stack([cache[layer, s][item].float().mean(dim=0) for s in picked]).mean(dim=0)


def self_attention_map(cache: "AttentionCache", layer: str, point: Point, *, steps: Sequence[int] | None = None,
                       prompt: int = 0, branch: str = "cond", image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Where the query at ``point`` = (x, y) (pixels of the generated image) attends in one self-attention
    layer: ``(h, w)`` over key positions, mean over heads and ``steps`` (default: every captured step).

    ``image_size`` = (width, height) defaults to the generated image's size (latent size times the VAE
    factor); give it when ``point`` is in another image's coordinates.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe, kind="self") as cache:
        ...     _ = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        >>> m = self_attention_map(cache, "down.0.0.self", (4, 12))
        >>> tuple(m.shape), round(float(m.sum()), 3)  # a softmax row: sums to 1
        ((8, 8), 1.0)
    """
    info = _self_layer(cache, layer)
    maps = _layer_maps(cache, layer, steps, prompt, branch)  # (h, w, keys)
    h, w, keys = maps.shape
    if keys != h * w:
        raise AttnlensError(f"layer {layer}: {keys} keys do not form the {h}x{w} query grid")
    width, height = image_size or _image_size(cache, info)
    x, y = point
    if not (0 <= x < width and 0 <= y < height):
        raise AttnlensError(f"point {point} is outside the {width}x{height} image")
    row, col = int(y * h / height), int(x * w / width)
    return maps[row, col].reshape(h, w)


def _default_self_layers(cache: "AttentionCache") -> list[str]:
    selfs = [i for i in cache.layers.values() if i.kind == "self"]
    if not selfs:
        raise AttnlensError("no self-attention layer was captured; capture with kind='self' or layers='*'")
    top = max(i.resolution for i in selfs)
    return [i.name for i in selfs if i.resolution == top]


def self_attention_pca(cache: "AttentionCache", layers: Sequence[str] | None = None, *, steps: Sequence[int] | None = None,
                       prompt: int = 0, branch: str = "cond", components: int = 3) -> np.ndarray:
    """The principal components of the self-attention maps, as in the Prompt-to-Prompt and Plug-and-Play
    figures: each query position's attention row (over all keys) is one sample; the first
    ``components`` principal components, each min-max scaled to [0, 1], give ``(h, w, components)``.
    With 3 components it is an RGB picture of the layout: positions that attend alike get alike colours.

    ``layers`` default to the captured self-attention layers of the highest resolution (they must share
    a grid); maps are averaged over them, the heads and ``steps``.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe, kind="self") as cache:
        ...     _ = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        >>> pca = self_attention_pca(cache)
        >>> pca.shape, float(pca.min()) >= 0.0, float(pca.max()) <= 1.0
        ((8, 8, 3), True, True)
    """
    names = _default_self_layers(cache) if layers is None else list(layers)
    for n in names:
        _self_layer(cache, n)
    grids = {cache.layers[n].resolution for n in names}
    if len(grids) > 1:
        raise AttnlensError(f"self_attention_pca averages layers of one grid; {names} have grids {sorted(grids)}")
    maps = torch.stack([_layer_maps(cache, n, steps, prompt, branch) for n in names]).mean(dim=0)
    h, w, keys = maps.shape
    if not 1 <= components <= min(h * w, keys):
        raise AttnlensError(f"components must be in 1..{min(h * w, keys)}, got {components}")
    x = maps.reshape(h * w, keys).double()
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    proj = u[:, :components] * s[:components]
    # fix each component's sign (SVD's is arbitrary): its largest-magnitude entry is positive
    idx = proj.abs().argmax(dim=0)
    signs = torch.sign(proj[idx, torch.arange(components)])
    proj = proj * torch.where(signs == 0, torch.ones_like(signs), signs)
    out = np.stack([_normalise(proj[:, c].numpy()) for c in range(components)], axis=-1)
    return out.reshape(h, w, components).astype(np.float32)


def _grid_points(width: int, height: int, n: int) -> list[tuple[int, int]]:
    """``n x n`` points at the centres of an even grid over a ``width x height`` image."""
    return [(int((c + 0.5) * width / n), int((r + 0.5) * height / n)) for r in range(n) for c in range(n)]


def self_attention_grid(cache: "AttentionCache", image: Image.Image, layer: str, points: Sequence[Point] | None = None,
                        *, steps: Sequence[int] | None = None, prompt: int = 0, tile: int = 128,
                        columns: int | None = None) -> Image.Image:
    """For each query point (default: a 3x3 grid over the image), the image with the point marked beside the
    map of where that query attends in ``layer`` (point marked too), all maps on one shared scale with its
    colour bar. ``points`` are (x, y) in the image's pixels."""
    pts = _grid_points(*image.size, 3) if points is None else list(points)
    heats = [self_attention_map(cache, layer, p, steps=steps, prompt=prompt, image_size=image.size) for p in pts]
    scale = shared_scale(heats, from_zero=False)  # rows of a softmax over many keys: all near 1 / keys
    tiles, labels = [], []
    for p, heat in zip(pts, heats):
        tiles += [mark(image, p), mark(as_image(heat, size=image.size, scale=scale), p)]
        labels += [f"query {tuple(int(v) for v in p)}", f"its attention in {layer}"]
    return with_colour_bar(image_grid(tiles, labels, columns=columns or 6, tile=tile), scale)


# ------------------------------------------------------------------------------------ architecture
def _short_type(t: str) -> str:
    return t.replace("Block2D", "").replace("UNetMid", "Mid")


def architecture(pipe: Any, box: int = 150) -> Image.Image:
    """A picture of the denoiser: every block of the UNet placed by level (rows: the query grid at the
    pipeline's default size) and execution order (columns: down blocks, the middle block, up blocks),
    with the attention it holds from :func:`attnlens.layers` (how many self- and cross-attention layers,
    heads x head size), the channel count, and the skip connections between matching levels. Drawn from
    the model itself, so it is right for any UNet (``pipe`` is a pipeline or a UNet).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> img = architecture(tiny_pipeline())
        >>> img.mode, img.size[0] > img.size[1]
        ('RGB', True)
    """
    from ._layers import get_unet, layers

    unet = get_unet(pipe)
    table = layers(pipe)
    cfg = unet.config
    n = len(cfg.down_block_types)
    channels = list(cfg.block_out_channels)
    blocks = ([("down", i, cfg.down_block_types[i], channels[i], i) for i in range(n)]
              + [("mid", None, cfg.mid_block_type or "none", channels[-1], n - 1)]
              + [("up", i, cfg.up_block_types[i], channels[::-1][i], n - 1 - i) for i in range(n)])
    attn: dict[tuple, list] = {}
    for info in table:
        parts = info.name.split(".")
        key = ("mid", None) if parts[0] == "mid" else (parts[0], int(parts[1]))
        attn.setdefault(key, []).append(info)
    grids = {info.level: info.resolution for info in table}
    sample = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    levels = n
    w, h, gap, row_h, left, top = box, 84, 12, 104, 150, 40
    width = left + len(blocks) * (w + gap) + 10
    height = top + levels * row_h + 40
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font, small, bold = _font(12), _font(11), _font(14)
    draw.text((10, 8), f"{type(unet).__name__}: {len(table)} attention layers "
              f"({sum(i.kind == 'self' for i in table)} self, {sum(i.kind == 'cross' for i in table)} cross)",
              fill=(20, 20, 20), font=bold)

    def centre(col: int, level: int) -> tuple[int, int]:
        return left + col * (w + gap) + w // 2, top + level * row_h + h // 2

    for level in range(levels):
        y = top + level * row_h + h // 2
        gh, gw = grids.get(level, (math.ceil(sample / 2**level),) * 2)
        draw.text((8, y - 14), f"level {level}", fill=(60, 60, 60), font=font)
        draw.text((8, y + 2), f"query grid {gh}x{gw}", fill=(60, 60, 60), font=small)
    for i in range(n):  # skip connections: down i -> up (n - 1 - i), same level
        (x0, y0), (x1, _) = centre(i, i), centre(2 * n - i, i)
        for x in range(x0 + w // 2, x1 - w // 2, 10):
            draw.line([(x, y0 - h // 2 + 6), (min(x + 5, x1 - w // 2), y0 - h // 2 + 6)], fill=(150, 150, 150), width=1)
    for col in range(len(blocks) - 1):  # the path data takes
        a, b = centre(col, blocks[col][4]), centre(col + 1, blocks[col + 1][4])
        draw.line([(a[0] + w // 2, a[1]), (b[0] - w // 2, b[1])], fill=(90, 90, 90), width=2)
    for col, (part, idx, kind, ch, level) in enumerate(blocks):
        cx, cy = centre(col, level)
        layers_here = attn.get((part, idx), [])
        fill = (214, 232, 250) if layers_here else (236, 236, 236)
        draw.rounded_rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], radius=6, fill=fill,
                               outline=(70, 70, 70), width=1)
        lines = [(f"{part}" + (f" {idx}" if idx is not None else ""), bold), (_short_type(kind), small), (f"{ch} channels", small)]
        if layers_here:
            n_self = sum(i.kind == "self" for i in layers_here)
            n_cross = sum(i.kind == "cross" for i in layers_here)
            first = layers_here[0]
            lines.append((f"{n_self} self + {n_cross} cross", font))
            lines.append((f"{first.heads} heads x {first.head_dim}", small))
        else:
            lines.append(("no attention", small))
        y = cy - h // 2 + 4
        for text, f in lines:
            while draw.textlength(text, font=f) > w - 8 and len(text) > 4:
                f = small if f is not small else _font(9)
                if f is not small and draw.textlength(text, font=f) > w - 8:
                    text = text[: len(text) - 2]
            draw.text((cx - w // 2 + 5, y), text, fill=(20, 20, 20), font=f)
            y += 15
    draw.text((10, height - 24), "rows: levels (each halves the grid); columns: execution order; dashed: skip "
              "connections; blue: blocks with attention", fill=(80, 80, 80), font=small)
    return out


# ------------------------------------------------------------------------------------ plotly
def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_slider(frames: Mapping[str, Sequence[Image.Image]], columns: Sequence[str] | None = None, *, label: str = "",
                 title: str | None = None, tile: int = 192, scale: tuple[float, float] | None = None,
                 scale_label: str = "attention") -> "go.Figure":
    """A plotly figure with a slider: each slider position shows one row of images.

    ``frames`` maps a slider label to its row of images (all rows the same length); ``columns`` are the
    panel titles. The slider only toggles trace visibility, so it works in static HTML. ``scale`` =
    (low, high) adds a colour bar of :func:`colour_map` over that range (the maps' shared scale).

    Example:
        >>> rows = {f"step {i}": [Image.new("RGB", (8, 8), (40 * i, 0, 0))] * 2 for i in range(3)}
        >>> fig = image_slider(rows, ["a", "b"], label="step: ")
        >>> len(fig.data), len(fig.layout.sliders[0].steps)
        (6, 3)
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    if not frames:
        raise AttnlensError("image_slider needs at least one frame")
    rows = [list(v) for v in frames.values()]
    n = len(rows[0])
    if n == 0 or any(len(r) != n for r in rows):
        raise AttnlensError(f"every frame needs the same, non-zero number of images; got {[len(r) for r in rows]}")
    if columns is not None and len(columns) != n:
        raise AttnlensError(f"{len(columns)} column titles for {n} images per frame")
    fig = make_subplots(rows=1, cols=n, subplot_titles=list(columns) if columns else None,
                        horizontal_spacing=min(0.02, 1 / max(n, 1) / 4))
    for f, row in enumerate(rows):
        for c, img in enumerate(row):
            fig.add_trace(go.Image(source=_data_uri(img.convert("RGB").resize((tile, tile), Image.NEAREST if img.size[0] < tile else Image.BILINEAR)),
                                   visible=f == 0, hoverinfo="skip"), row=1, col=c + 1)
    if scale is not None:  # a colour bar alone: a marker trace with nothing to draw but its scale
        colours = [[i / (len(_VIRIDIS) - 1), "rgb(%d,%d,%d)" % tuple(int(v) for v in c)] for i, c in enumerate(_VIRIDIS)]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
                                 marker=dict(colorscale=colours, cmin=float(scale[0]), cmax=float(scale[1]), color=[float(scale[0])],
                                             showscale=True, colorbar=dict(title=dict(text=scale_label), thickness=12, len=0.8))),
                      row=1, col=1)
    steps = []
    for f, name in enumerate(frames):
        visible = [g == f for g in range(len(rows)) for _ in range(n)] + ([True] if scale is not None else [])
        steps.append(dict(method="restyle", args=[{"visible": visible}], label=str(name)))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix=label), pad=dict(t=10))],
        width=max(320, n * (tile + 20) + 40 + (90 if scale is not None else 0)), height=tile + 150, margin=dict(l=10, r=10, t=60 if title else 40, b=10),
        title=title,
    )
    return fig


def attention_slider(cache: "AttentionCache", image: Image.Image, over: str = "step", *, words: Sequence[str] | None = None,
                     layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, prompt: int = 0,
                     tile: int = 160, title: str | None = None) -> "go.Figure":
    """Cross-attention maps with a slider ``over`` ``"step"``, ``"layer"`` or ``"word"``.

    - ``"step"``: one slider position per step (default: every captured step); the image, then one
      panel per word; maps averaged over ``layers``.
    - ``"layer"``: one position per cross-attention layer (default: every captured one); the image,
      then one panel per word; maps averaged over ``steps``.
    - ``"word"``: one position per word; panels are the image with the map's contours and the map alone,
      averaged over ``layers`` and ``steps``.

    Every map of the figure is drawn on one shared scale, shown by a colour bar. ``words`` default to
    every word of the prompt.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe) as cache:
        ...     image = pipe("a red star", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
        >>> fig = attention_slider(cache, image, "step", words=["red", "star"])
        >>> len(fig.layout.sliders[0].steps), len(fig.data)  # 3 steps x (image + 2 words), and the colour bar
        (3, 10)
    """
    words = list(cache.words(prompt) if words is None else words)
    names = _cross_layers(cache, layers)
    if over == "step":
        chosen = _captured_steps(cache, names) if steps is None else list(steps)
        heats = {f"{s}": [cache.word_map(w, prompt, layers=names, steps=[s]) for w in words] for s in chosen}
        scale = shared_scale([h for row in heats.values() for h in row])
        frames = {k: [image] + [as_image(h, scale=scale) for h in row] for k, row in heats.items()}
        return image_slider(frames, ["image", *words], label="step ", title=title, tile=tile, scale=scale)
    if over == "layer":
        heats = {}
        for name in names:
            maps = [cache.word_map(w, prompt, layers=[name], steps=steps) for w in words]
            heats[f"{name} ({maps[0].shape[0]}x{maps[0].shape[1]})"] = maps
        scale = shared_scale([h for row in heats.values() for h in row])
        frames = {k: [image] + [as_image(h, scale=scale) for h in row] for k, row in heats.items()}
        return image_slider(frames, ["image", *words], label="layer ", title=title, tile=tile, scale=scale)
    if over == "word":
        heats = {w: cache.word_map(w, prompt, layers=names, steps=steps) for w in words}
        scale = shared_scale(list(heats.values()))
        frames = {w: [overlay(image, h, scale=scale), as_image(h, scale=scale)] for w, h in heats.items()}
        return image_slider(frames, ["image with the map's contours", "map"], label="word ", title=title, tile=tile,
                            scale=scale)
    raise AttnlensError(f"over must be one of {choices(('step', 'layer', 'word'))}, not {over!r}")


def self_attention_slider(cache: "AttentionCache", image: Image.Image, layer: str, points: Sequence[Point] | None = None,
                          *, steps: Sequence[int] | None = None, prompt: int = 0, tile: int = 192,
                          title: str | None = None) -> "go.Figure":
    """A slider over query points (default: a 4x4 grid over the image): the marked point, and where it
    attends in self-attention ``layer``. ``points`` are (x, y) in the image's pixels.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe, kind="self") as cache:
        ...     image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        >>> len(self_attention_slider(cache, image, "down.0.0.self").layout.sliders[0].steps)
        16
    """
    pts = _grid_points(*image.size, 4) if points is None else list(points)
    heats = [self_attention_map(cache, layer, p, steps=steps, prompt=prompt, image_size=image.size) for p in pts]
    scale = shared_scale(heats, from_zero=False)
    frames = {f"({int(p[0])}, {int(p[1])})": [mark(image, p), mark(as_image(h, size=image.size, scale=scale), p)]
              for p, h in zip(pts, heats)}
    return image_slider(frames, ["query point", f"its attention in {layer}"], label="query (x, y) ", title=title,
                        tile=tile, scale=scale)
