"""The oracle: read the attributes of any RGB image of the Shapes world.

:func:`read` takes an image -- a render, a generation of a model trained on the world, a VAE
round trip (slightly blurred, colours slightly off) or an edit -- and returns a :class:`Reading`:
whether an object was found, its five attributes (``shape``, ``colour``, ``size``, ``position``,
``background``), its mask at 64x64 and a confidence per attribute.

How it reads, deterministically:

1. **Input.** The image is converted to RGB at 64x64 (see :func:`to_rgb64`).
2. **Background.** The median colour of the image border (:data:`BORDER` pixels wide) is the
   background colour; ``background`` is the nearest :data:`~attnlens.shapes.BACKGROUNDS` entry
   (in CIE Lab). If under :data:`MIN_PLAIN_BORDER` of the border pixels are near that median
   (noise, a texture), nothing is found.
3. **Object.** Pixels farther than :data:`COARSE_THRESHOLD` (RGB distance) from the background
   colour are candidates; the largest 8-connected component is the object. Its object colour is
   the median of its eroded interior, and each pixel's *coverage* is its projection onto the
   segment from the background colour to the object colour. The mask is the coverage >= 1/2 (the
   same rule :func:`~attnlens.shapes.render` uses for its mask), largest component, holes filled.
   A mask under :data:`MIN_AREA` pixels means ``found=False`` (reason ``"no object found: ..."``).
4. **colour.** The median of the eroded mask's pixels, matched to the nearest
   :data:`~attnlens.shapes.COLOURS` entry in CIE Lab.
5. **shape.** A scikit-learn logistic regression over a translation- and scale-normalised
   16x16 coverage patch (centred on the centroid, scaled by the square root of the area) plus a
   few moment features. It is fitted on first use, in-process, on renders of a fixed seed
   (:data:`FIT_SEED`; held-out evaluations must use other seeds), half of them degraded by blur
   and colour noise like a VAE round trip, and cached with :func:`functools.lru_cache`.
   No model file is read or written.
6. **size.** The radius implied by the mask area and the shape's area per squared radius
   (measured from high-resolution renders), compared with the geometric mean of the two
   :data:`~attnlens.shapes.SIZES` radii.
7. **position.** The mask centroid, corrected for the shape's own centroid offset (a triangle's
   centroid sits below its nominal centre), matched to the nearest
   :data:`~attnlens.shapes.POSITIONS` anchor.

Confidences are in [0, 1]: the classifier probability for ``shape``; for the nearest-match
attributes the margin ``(d2 - d1) / (d2 + d1)`` between the nearest (``d1``) and second nearest
(``d2``) candidate (1 for an exact match, 0 on a tie); for ``size`` the same margin on
log-radius.

Example:
    >>> from attnlens.shapes import Scene, render
    >>> from attnlens.shapes.oracle import read
    >>> image, _ = render(Scene("star", "red", "small", "left", "gray"))
    >>> r = read(image)
    >>> r.found, r.attributes["shape"], r.attributes["colour"], r.attributes["position"]
    (True, 'star', 'red', 'left')
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from .._errors import AttnlensError
from ._world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    render,
    sample_scene,
)

__all__ = ["Reading", "read", "read_many", "to_rgb64", "MIN_AREA", "MIN_PLAIN_BORDER", "FIT_SEED"]

MIN_AREA = 12
"""Smallest object, in pixels at 64x64, that counts as found (the smallest render is ~85 px)."""

BORDER = 2
"""Width in pixels of the image border whose median colour is taken as the background."""

MIN_PLAIN_BORDER = 0.5
"""Share of border pixels that must be near the border's median colour for it to count as a plain
background; below it (noise, a texture, an object filling the frame) nothing is found."""

FIT_SEED = 0x0AC1E
"""Seed of the renders the shape classifier is fitted on; held-out evaluations must use others."""

FIT_SAMPLES = 1800
"""How many renders the shape classifier is fitted on (balanced over shapes and sizes)."""

_PATCH = 16  # side of the normalised coverage patch fed to the shape classifier
_PATCH_HALF_WIDTH = 0.95  # patch half-width in units of sqrt(area); every shape reaches at most ~0.88

_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
_FG_RGB = np.array(list(COLOURS.values()), dtype=np.float64)

COARSE_THRESHOLD: float = 0.4 * float(
    np.min(np.linalg.norm(_FG_RGB[:, None, :] - _BG_RGB[None, :, :], axis=-1))
)
"""RGB distance from the background above which a pixel is an object candidate: 0.4 times the
smallest distance between any palette colour and any background (purple on gray), so that a
blurred or off-colour object still stands out while background noise does not."""

_ACCEPTED = (
    "a PIL.Image, or a numpy array of shape (H, W, 3) RGB, (H, W, 4) RGBA, (H, W, 1) or (H, W) "
    "grayscale, with dtype uint8 (0..255), another integer dtype in 0..255, or float in [0, 1]"
)


# ------------------------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class Reading:
    """What the oracle read from one image.

    Attributes:
        found: False when no object could be found; then ``attributes`` and ``confidence`` are
            empty and ``mask`` is all False.
        attributes: ``shape``, ``colour``, ``size``, ``position`` and ``background``.
        mask: ``bool`` of shape ``(64, 64)``: the object's pixels at 64x64, whatever the input
            size.
        confidence: per attribute, in [0, 1].
        reason: why ``found`` is False, or notes (for instance other objects that were ignored).

    Readings hold an array, so compare their ``attributes``, not the readings themselves
    (equality is identity).

    Example:
        >>> from attnlens.shapes import Scene, render
        >>> r = read(render(Scene("heart", "pink", "large", "top", "white"))[0])
        >>> r.attributes == {"shape": "heart", "colour": "pink", "size": "large",
        ...                  "position": "top", "background": "white"}
        True
        >>> r.mask.shape, r.mask.dtype, 0.0 <= min(r.confidence.values())
        ((64, 64), dtype('bool'), True)
    """

    found: bool
    attributes: dict[str, str]
    mask: np.ndarray = field(repr=False)
    confidence: dict[str, float]
    reason: str = ""


# ------------------------------------------------------------------------------------------ input


def to_rgb64(image: Any) -> np.ndarray:
    """Convert an accepted image to ``float64`` RGB of shape ``(64, 64, 3)`` in 0..255.

    Accepted: a ``PIL.Image`` of any mode PIL can convert to RGB, or a numpy array of shape
    ``(H, W, 3)`` (RGB), ``(H, W, 4)`` (RGBA), ``(H, W, 1)`` or ``(H, W)`` (grayscale), with
    dtype ``uint8``, another integer dtype with values in 0..255, or a float dtype with values in
    [0, 1] (scaled by 255). PIL images of integer or float modes (``I``, ``F``, ...) go through
    the array rules. Grayscale is replicated to three channels (shape, size, position and
    background still read; colour cannot: it reads as the palette colour nearest a gray). An
    alpha channel is dropped: the colour channels are used as they are, not composited. Any
    other size is resized to 64x64 with PIL bilinear resampling (after rounding to ``uint8``);
    a non-square image is stretched.

    Raises:
        AttnlensError: for any other type, shape, dtype or value range.

    Example:
        >>> to_rgb64(np.zeros((128, 128), dtype=np.uint8)).shape
        (64, 64, 3)
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise AttnlensError(f"cannot read an empty image of size {image.size}; expected {_ACCEPTED}")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = np.asarray(image)
            return to_rgb64(arr)
        try:
            rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise AttnlensError(f"cannot convert a PIL image of mode {image.mode!r} to RGB ({exc}); "
                                f"expected {_ACCEPTED}") from exc
        arr = np.asarray(rgb, dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        arr = _array_to_uint8_rgb(image)
    else:
        hint = ""
        if hasattr(image, "detach") and hasattr(image, "numpy"):
            hint = " (for a torch tensor, pass image.permute(1, 2, 0).cpu().numpy() in [0, 1])"
        raise AttnlensError(f"cannot read an image of type {type(image).__name__}{hint}; expected {_ACCEPTED}")
    if arr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        arr = np.asarray(Image.fromarray(arr, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return arr.astype(np.float64)


def _array_to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    shape = image.shape
    if image.ndim == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        raise AttnlensError(f"cannot read an array of shape {shape}: it looks channel-first; "
                            f"transpose it to (H, W, C). Expected {_ACCEPTED}")
    if not (image.ndim == 2 or (image.ndim == 3 and shape[-1] in (1, 3, 4))):
        raise AttnlensError(f"cannot read an array of shape {shape}; expected {_ACCEPTED}")
    if shape[0] < 1 or shape[1] < 1:
        raise AttnlensError(f"cannot read an empty array of shape {shape}; expected {_ACCEPTED}")
    if image.dtype == np.uint8:
        arr = image
    elif np.issubdtype(image.dtype, np.integer):
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise AttnlensError(f"integer image values must be in 0..255, got {lo}..{hi}; expected {_ACCEPTED}")
        arr = image.astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise AttnlensError(f"float image contains NaN or infinity; expected {_ACCEPTED}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = " (for an image in [-1, 1], pass (x + 1) / 2)" if lo < 0 else ""
            raise AttnlensError(f"float image values must be in [0, 1], got {lo:.3g}..{hi:.3g}{hint}; "
                                f"expected {_ACCEPTED}")
        arr = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise AttnlensError(f"cannot read an array of dtype {image.dtype}; expected {_ACCEPTED}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ colour


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of sRGB colours in 0..255, shape (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_BG_LAB = _srgb_to_lab(_BG_RGB)
_FG_LAB = _srgb_to_lab(_FG_RGB)


def _nearest(distances: np.ndarray, names: tuple[str, ...]) -> tuple[str, float]:
    """The nearest name and the margin ``(d2 - d1) / (d2 + d1)`` in [0, 1]."""
    order = np.argsort(distances)
    d1, d2 = float(distances[order[0]]), float(distances[order[1]])
    margin = 1.0 if d1 + d2 == 0 else (d2 - d1) / (d2 + d1)
    return names[int(order[0])], float(np.clip(margin, 0.0, 1.0))


# ------------------------------------------------------------------------------------ segmentation

_EIGHT = np.ones((3, 3), dtype=bool)


def _shifted(mask: np.ndarray, eight: bool) -> list[np.ndarray]:
    """Views of ``mask`` padded by one pixel (False), shifted to each 4- or 8-neighbour."""
    h, w = mask.shape
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = mask
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx) and (eight or not (dy and dx))]
    return [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in steps]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 3x3 cross (pixels outside the image count as background)."""
    out = mask.copy()
    for s in _shifted(mask, eight=False):
        out &= s
    return out


def _dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation by the 3x3 square, ``iterations`` times."""
    for _ in range(iterations):
        out = mask.copy()
        for s in _shifted(mask, eight=True):
            out |= s
        mask = out
    return mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every background region (4-connected) that does not touch the image border."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, outside[outside > 0])


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The largest 8-connected component of ``mask`` and the sizes of all components, descending."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(mask), []
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1), sorted((int(s) for s in sizes), reverse=True)


def _interior_median(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median colour of the mask eroded once (twice for big objects), avoiding anti-aliased edges."""
    inner = mask
    for _ in range(2):
        eroded = _erode(inner)
        if eroded.sum() < 6:
            break
        inner = eroded
    return np.median(rgb[inner], axis=0)


@dataclass(frozen=True)
class _Segmentation:
    bg: np.ndarray  # RGB background colour (border median)
    fg: np.ndarray  # RGB object colour (interior median)
    coverage: np.ndarray  # float (64, 64) in [0, 1]
    mask: np.ndarray  # bool (64, 64)
    others: tuple[int, ...]  # sizes of other candidate components of at least MIN_AREA


def _border(rgb: np.ndarray) -> np.ndarray:
    """The pixels of the image border, ``BORDER`` wide, as an ``(n, 3)`` array."""
    b = BORDER
    return np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                           rgb[b:-b, :b].reshape(-1, 3), rgb[b:-b, -b:].reshape(-1, 3)])


def _segment(rgb: np.ndarray) -> _Segmentation | str:
    """Segment the object of a (64, 64, 3) float RGB image, or say why there is none."""
    ring = _border(rgb)
    bg = np.median(ring, axis=0)
    plain = float(np.mean(np.linalg.norm(ring - bg, axis=1) <= COARSE_THRESHOLD))
    if plain < MIN_PLAIN_BORDER:
        return (f"no object found: the border is not a plain background (only {plain:.0%} of its "
                f"pixels are within {COARSE_THRESHOLD:.0f} RGB units of its median colour {_fmt(bg)}, "
                f"under the minimum of {MIN_PLAIN_BORDER:.0%})")
    diff = rgb - bg
    candidates = np.sqrt((diff ** 2).sum(-1)) > COARSE_THRESHOLD
    coarse, sizes = _largest_component(candidates)
    if not sizes or sizes[0] < MIN_AREA:
        biggest = sizes[0] if sizes else 0
        return (f"no object found: no region differs from the background colour {_fmt(bg)} by more "
                f"than {COARSE_THRESHOLD:.0f} RGB units over at least {MIN_AREA} px "
                f"(largest: {biggest} px)")
    fg = _interior_median(rgb, coarse)
    axis = fg - bg
    norm2 = float(axis @ axis)
    if norm2 < 1e-6:
        return "no object found: the object's colour equals the background's"
    coverage = np.clip(diff @ axis / norm2, 0.0, 1.0)
    coverage *= _dilate(coarse, 2)
    mask, _ = _largest_component(coverage >= 0.5)
    mask = _fill_holes(mask)
    area = int(mask.sum())
    if area < MIN_AREA:
        return f"no object found: the object's mask has {area} px, under the minimum of {MIN_AREA}"
    others = tuple(s for s in sizes[1:] if s >= MIN_AREA)
    return _Segmentation(bg=bg, fg=_interior_median(rgb, mask), coverage=coverage * _dilate(mask),
                         mask=mask, others=others)


def _fmt(rgb: np.ndarray) -> str:
    return "(" + ", ".join(str(int(round(v))) for v in rgb) + ")"


# ---------------------------------------------------------------------------------------- geometry


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Mask centroid ``(x, y)`` in the world's pixel coordinates (pixel ``i`` spans ``[i, i+1)``)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


@dataclass(frozen=True)
class _Calibration:
    area_per_r2: dict[str, float]  # mask area / radius**2 per shape
    offset_per_r: dict[str, np.ndarray]  # (centroid - nominal centre) / radius per shape


@functools.lru_cache(maxsize=None)
def _calibration() -> _Calibration:
    """Per-shape area and centroid offset, measured on renders at 4x resolution."""
    size, k = 4 * IMAGE_SIZE, 4
    area, offset = {}, {}
    r = SIZES["large"]
    for shape in SHAPES:
        _, mask = render(Scene(shape, next(iter(COLOURS)), "large", "center"), size=size)
        area[shape] = float(mask.sum()) / k ** 2 / r ** 2
        offset[shape] = (_centroid(mask) / k - np.array(POSITIONS["center"])) / r
    return _Calibration(area, offset)


_SIZE_NAMES = tuple(SIZES)
_LOG_RADII = np.log(np.array(list(SIZES.values())))
_POSITION_NAMES = tuple(POSITIONS)
_ANCHORS = np.array(list(POSITIONS.values()))


def _size_and_position(mask: np.ndarray, shape: str) -> tuple[tuple[str, float], tuple[str, float]]:
    cal = _calibration()
    radius = math.sqrt(float(mask.sum()) / cal.area_per_r2[shape])
    size = _nearest(np.abs(math.log(radius) - _LOG_RADII), _SIZE_NAMES)
    centre = _centroid(mask) - radius * cal.offset_per_r[shape]
    position = _nearest(np.linalg.norm(_ANCHORS - centre, axis=1), _POSITION_NAMES)
    return size, position


# ----------------------------------------------------------------------------------- shape features


def _features(coverage: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Translation- and scale-normalised shape features of one object.

    A ``_PATCH`` x ``_PATCH`` resampling of the coverage around the mask centroid, spanning
    ``+-_PATCH_HALF_WIDTH * sqrt(area)``, plus normalised second and third moments, statistics
    of the distance to the centroid, the bounding box's area over the mask's, and the log aspect
    ratio of the bounding box.
    """
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cy, cx = ys.mean(), xs.mean()
    scale = math.sqrt(area)
    step = 2 * _PATCH_HALF_WIDTH * scale / _PATCH
    grid = (np.arange(_PATCH) + 0.5) * step - _PATCH_HALF_WIDTH * scale
    gy, gx = np.meshgrid(cy + grid, cx + grid, indexing="ij")
    patch = ndimage.map_coordinates(coverage, [gy, gx], order=1, mode="constant", cval=0.0)
    dy, dx = (ys - cy) / scale, (xs - cx) / scale
    mu = [np.mean(dx * dx), np.mean(dy * dy), np.mean(dx * dy),
          np.mean(dx ** 3), np.mean(dy ** 3), np.mean(dx * dx * dy), np.mean(dx * dy * dy)]
    rad = np.sqrt(dx * dx + dy * dy)
    bbox = ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)) / area
    extra = [*mu, rad.max(), rad.mean(), np.std(rad), bbox,
             math.log((xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1))]
    return np.concatenate([patch.ravel(), np.asarray(extra, dtype=np.float64)])


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A VAE-like degradation: blur, a small colour shift and a little pixel noise."""
    out = ndimage.gaussian_filter(image.astype(np.float64), sigma=(rng.uniform(0.3, 1.1),) * 2 + (0,))
    out += rng.normal(0.0, 6.0, size=3) + rng.normal(0.0, 3.0, size=out.shape)
    return np.clip(out, 0.0, 255.0)


@dataclass(frozen=True)
class _ShapeModel:
    """The fitted classifier reduced to arrays: standardise, then a multinomial softmax."""

    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (n_classes, n_features)
    intercept: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=1)
def _classifier() -> _ShapeModel:
    """Fit the shape classifier on renders of :data:`FIT_SEED` (cached for the process).

    Shapes and sizes cycle, so the set is balanced; blocks of one render per shape and size
    alternate between clean and degraded by :func:`_degrade`. The fit runs on one BLAS thread,
    so it is reproducible bit for bit.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(FIT_SEED)
    block = len(SHAPES) * len(_SIZE_NAMES)
    xs, ys = [], []
    for i in range(FIT_SAMPLES):
        shape = SHAPES[i % len(SHAPES)]
        size = _SIZE_NAMES[(i // len(SHAPES)) % len(_SIZE_NAMES)]
        image, _ = render(sample_scene(rng, shape=shape, size=size))
        rgb = _degrade(image, rng) if (i // block) % 2 else image.astype(np.float64)
        seg = _segment(rgb)
        if isinstance(seg, str):  # does not happen for renders; skip rather than fail
            continue
        xs.append(_features(seg.coverage, seg.mask))
        ys.append(shape)
    x, y = np.stack(xs), np.array(ys)
    with threadpool_limits(limits=1):
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=0.5, max_iter=500).fit(scaler.transform(x), y)
    return _ShapeModel(tuple(str(c) for c in model.classes_), scaler.mean_.copy(), scaler.scale_.copy(),
                       model.coef_.copy(), model.intercept_.copy())


# ---------------------------------------------------------------------------------------- reading


def read(image: Any) -> Reading:
    """Read the attributes of one image of the Shapes world.

    Args:
        image: a ``PIL.Image`` or a numpy array -- ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA (alpha
            dropped), ``(H, W)`` or ``(H, W, 1)`` grayscale -- of dtype ``uint8`` or float in
            [0, 1]; any size (resized to 64x64 bilinearly). See :func:`to_rgb64`.

    Returns:
        A :class:`Reading`. When no object is found, ``found`` is False, ``reason`` starts with
        ``"no object found"``, and ``attributes``/``confidence`` are empty.

    Raises:
        AttnlensError: when ``image`` is not an accepted form.

    The first call fits the shape classifier (a few seconds); later calls take about a
    millisecond.

    Example:
        >>> import numpy as np
        >>> from attnlens.shapes import Scene, render
        >>> read(render(Scene("triangle", "blue", "large", "bottom", "black"))[0]).attributes
        {'shape': 'triangle', 'colour': 'blue', 'size': 'large', 'position': 'bottom', 'background': 'black'}
        >>> read(np.full((64, 64, 3), 120, dtype=np.uint8)).found
        False
    """
    rgb = to_rgb64(image)
    seg = _segment(rgb)
    if isinstance(seg, str):
        return Reading(False, {}, np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool), {}, seg)
    background = _nearest(np.linalg.norm(_BG_LAB - _srgb_to_lab(seg.bg), axis=1), tuple(BACKGROUNDS))
    colour = _nearest(np.linalg.norm(_FG_LAB - _srgb_to_lab(seg.fg), axis=1), tuple(COLOURS))
    model = _classifier()
    proba = model.predict_proba(_features(seg.coverage, seg.mask))
    best = int(np.argmax(proba))
    shape = (model.classes[best], float(proba[best]))
    size, position = _size_and_position(seg.mask, shape[0])
    picked = {"shape": shape, "colour": colour, "size": size, "position": position, "background": background}
    reason = ""
    if seg.others:
        reason = (f"{len(seg.others)} other object(s) ignored (sizes {list(seg.others)} px); "
                  f"read the largest ({int(seg.mask.sum())} px)")
    return Reading(
        found=True,
        attributes={k: v[0] for k, v in picked.items()},
        mask=seg.mask,
        confidence={k: v[1] for k, v in picked.items()},
        reason=reason,
    )


def read_many(images: Iterable[Any]) -> list[Reading]:
    """Read each image of an iterable (a list, or an array of shape ``(N, H, W, 3)``).

    Example:
        >>> from attnlens.shapes import Scene, render
        >>> [r.attributes["colour"] for r in read_many(
        ...     [render(Scene("circle", c))[0] for c in ("red", "cyan")])]
        ['red', 'cyan']
    """
    if isinstance(images, (np.ndarray, Image.Image)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        raise AttnlensError("read_many takes an iterable of images (or an array of shape (N, H, W, C)); "
                            "for a single image use read()")
    return [read(image) for image in images]
