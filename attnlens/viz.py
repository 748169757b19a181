"""Visualisation: heat-map overlays, grids, self-attention views and plotly figures with sliders.

Static pictures are PIL images (light pages, easy to save). Interactive figures are plotly figures
whose sliders only switch which images are visible, so they work in a static HTML page with no
kernel behind it. Every map is min-max normalised per panel before it is drawn.

Shapes used below: a cross-attention word map and a self-attention map are ``(h, w)``; a PCA view
is ``(h, w, 3)`` in [0, 1]; images are PIL ``RGB`` images of any size.

Example:
    >>> import torch
    >>> import attnlens
    >>> from attnlens._testing import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> with attnlens.capture(pipe, layers="*") as cache:
    ...     image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    >>> word_grid(cache, image, tile=32, columns=3).size[0]  # the image, "a", "red", "star"
    104
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ._errors import AttnlensError, choices
from ._notebook import OFFLINE_RENDERER, PAGE_RENDERER, results_dir, setup_notebook

if TYPE_CHECKING:  # plotly is an optional (book) dependency
    import plotly.graph_objects as go

    from ._cache import AttentionCache

Heat = "torch.Tensor | np.ndarray"
Point = tuple[float, float]

__all__ = [
    "as_image", "attention_slider", "image_grid", "image_slider", "layer_grid", "mark", "overlay",
    "self_attention_grid", "self_attention_map", "self_attention_pca", "self_attention_slider",
    "results_dir", "setup_notebook", "step_grid", "word_grid", "OFFLINE_RENDERER", "PAGE_RENDERER",
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


def _ramp(x: np.ndarray) -> np.ndarray:
    """A perceptual blue -> yellow colour ramp: ``(h, w)`` in [0, 1] -> ``(h, w, 3)`` in [0, 255]."""
    return np.stack([x, 0.2 + 0.6 * x, 1.0 - x], axis=-1) * 255


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float ``(h, w)`` array in [0, 1] to ``size`` = (width, height)."""
    img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize(size, resample), dtype=np.float32) / 255


def overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a heat map ``(h, w)`` (any scale; normalised to [0, 1]) over ``image``, upsampled to its size.

    Example:
        >>> img = Image.new("RGB", (64, 64))
        >>> overlay(img, np.eye(8)).size
        (64, 64)
    """
    h = _array(heat)
    if h.ndim != 2:
        raise AttnlensError(f"overlay needs a heat map of shape (h, w), got shape {tuple(h.shape)}")
    big = _resize(_normalise(h), image.size, Image.BILINEAR)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip((1 - alpha) * base + alpha * _ramp(big), 0, 255).astype(np.uint8))


def as_image(values: torch.Tensor | np.ndarray, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Draw a map alone: ``(h, w)`` through the overlay's colour ramp (normalised), or ``(h, w, 3)`` in
    [0, 1] as RGB. ``size`` (pixels, or (width, height)) enlarges it with nearest-neighbour sampling, so
    each attention cell stays a visible square.

    Example:
        >>> as_image(np.eye(4), size=32).size
        (32, 32)
        >>> as_image(np.zeros((4, 6, 3))).size
        (6, 4)
    """
    a = _array(values)
    if a.ndim == 2:
        rgb = _ramp(_normalise(a))
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
    with an optional label under each. ``uint8`` arrays ``(h, w, 3)`` are accepted as images.

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
    label_h = text_px + 4 if labels is not None else 0
    out = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + label_h + pad) + pad), background)
    draw = ImageDraw.Draw(out)
    font = _font(text_px)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + label_h + pad)
        resample = Image.NEAREST if img.size[0] <= w else Image.BILINEAR
        out.paste(img.convert("RGB").resize((w, h), resample), (x, y))
        if labels is not None:
            text = str(labels[i])
            while text and draw.textlength(text, font=font) > w and len(text) > 2:
                text = text[:-2] + "…"
            draw.text((x + 1, y + h + 1), text, fill=(30, 30, 30), font=font)
    return out


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


def word_grid(cache: "AttentionCache", image: Image.Image, words: Sequence[str] | None = None, *, prompt: int = 0,
              layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, tile: int = 128,
              columns: int | None = None) -> Image.Image:
    """One overlay per word of the prompt (default: every word), averaged over ``layers`` and ``steps``.

    The first tile is the image itself.
    """
    words = list(cache.words(prompt) if words is None else words)
    tiles = [image] + [overlay(image, cache.word_map(w, prompt, layers=layers, steps=steps)) for w in words]
    return image_grid(tiles, ["image"] + words, columns=columns, tile=tile)


def layer_grid(cache: "AttentionCache", image: Image.Image, word: str, *, layers: Sequence[str] | None = None,
               steps: Sequence[int] | None = None, prompt: int = 0, tile: int = 128, columns: int | None = None) -> Image.Image:
    """One overlay of ``word``'s map per cross-attention layer (each at its own resolution), averaged over
    ``steps``. Labels are ``layer (h x w)``.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe) as cache:
        ...     image = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        >>> layer_grid(cache, image, "star", tile=16, columns=1).size[0]  # 16 px tiles, 2 px padding
        20
    """
    names = _cross_layers(cache, layers)
    tiles, labels = [], []
    for name in names:
        heat = cache.word_map(word, prompt, layers=[name], steps=steps)
        tiles.append(overlay(image, heat))
        labels.append(f"{name} ({heat.shape[0]}x{heat.shape[1]})")
    return image_grid(tiles, labels, columns=columns, tile=tile)


def step_grid(cache: "AttentionCache", image: Image.Image, word: str, *, steps: Sequence[int] | None = None,
              layers: Sequence[str] | None = None, prompt: int = 0, tile: int = 128, columns: int | None = None) -> Image.Image:
    """One overlay of ``word``'s map per denoising step (default: every captured step), averaged over
    ``layers`` at the largest captured grid. Labels are ``step i``.
    """
    names = _cross_layers(cache, layers)
    steps = _captured_steps(cache, names) if steps is None else list(steps)
    tiles = [overlay(image, cache.word_map(word, prompt, layers=names, steps=[s])) for s in steps]
    return image_grid(tiles, [f"step {s}" for s in steps], columns=columns, tile=tile)


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
    """For each query point (default: a 3x3 grid over the image), the image with the point marked next to
    where that query attends in ``layer``. ``points`` are (x, y) in the image's pixels."""
    pts = _grid_points(*image.size, 3) if points is None else list(points)
    tiles, labels = [], []
    for p in pts:
        heat = self_attention_map(cache, layer, p, steps=steps, prompt=prompt, image_size=image.size)
        tiles += [mark(image, p), mark(overlay(image, heat), p)]
        labels += [f"query {tuple(int(v) for v in p)}", layer]
    return image_grid(tiles, labels, columns=columns or 6, tile=tile)


# ------------------------------------------------------------------------------------ plotly
def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_slider(frames: Mapping[str, Sequence[Image.Image]], columns: Sequence[str] | None = None, *, label: str = "",
                 title: str | None = None, tile: int = 192) -> "go.Figure":
    """A plotly figure with a slider: each slider position shows one row of images.

    ``frames`` maps a slider label to its row of images (all rows the same length); ``columns`` are the
    panel titles. The slider only toggles trace visibility, so it works in static HTML.

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
    steps = []
    for f, name in enumerate(frames):
        visible = [g == f for g in range(len(rows)) for _ in range(n)]
        steps.append(dict(method="restyle", args=[{"visible": visible}], label=str(name)))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix=label), pad=dict(t=10))],
        width=max(320, n * (tile + 20) + 40), height=tile + 150, margin=dict(l=10, r=10, t=60 if title else 40, b=10),
        title=title,
    )
    return fig


def attention_slider(cache: "AttentionCache", image: Image.Image, over: str = "step", *, words: Sequence[str] | None = None,
                     layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, prompt: int = 0,
                     tile: int = 160, title: str | None = None) -> "go.Figure":
    """Cross-attention maps with a slider ``over`` ``"step"``, ``"layer"`` or ``"word"``.

    - ``"step"``: one slider position per step (default: every captured step); one panel per word;
      maps averaged over ``layers``.
    - ``"layer"``: one position per cross-attention layer (default: every captured one); one panel per
      word; maps averaged over ``steps``.
    - ``"word"``: one position per word; panels are the map alone and its overlay, averaged over
      ``layers`` and ``steps``.

    ``words`` default to every word of the prompt.

    Example:
        >>> import attnlens, torch
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with attnlens.capture(pipe) as cache:
        ...     image = pipe("a red star", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
        >>> fig = attention_slider(cache, image, "step", words=["red", "star"])
        >>> len(fig.layout.sliders[0].steps), len(fig.data)
        (3, 6)
    """
    words = list(cache.words(prompt) if words is None else words)
    names = _cross_layers(cache, layers)
    if over == "step":
        chosen = _captured_steps(cache, names) if steps is None else list(steps)
        frames = {f"{s}": [overlay(image, cache.word_map(w, prompt, layers=names, steps=[s])) for w in words] for s in chosen}
        return image_slider(frames, words, label="step ", title=title, tile=tile)
    if over == "layer":
        frames = {}
        for name in names:
            maps = [cache.word_map(w, prompt, layers=[name], steps=steps) for w in words]
            frames[f"{name} ({maps[0].shape[0]}x{maps[0].shape[1]})"] = [overlay(image, m) for m in maps]
        return image_slider(frames, words, label="layer ", title=title, tile=tile)
    if over == "word":
        frames = {}
        for w in words:
            heat = cache.word_map(w, prompt, layers=names, steps=steps)
            frames[w] = [as_image(heat), overlay(image, heat)]
        return image_slider(frames, ["map", "overlay"], label="word ", title=title, tile=tile)
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
    frames = {}
    for p in pts:
        heat = self_attention_map(cache, layer, p, steps=steps, prompt=prompt, image_size=image.size)
        frames[f"({int(p[0])}, {int(p[1])})"] = [mark(image, p), mark(overlay(image, heat), p)]
    return image_slider(frames, ["query point", f"attention in {layer}"], label="query (x, y) ", title=title, tile=tile)
