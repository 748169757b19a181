"""ShapesEdit: a fixed, versioned set of prompt edits on the Shapes world, scored exactly by the oracle.

Each pair changes one attribute of a scene. Two versions:

``shapesedit-v2`` (default)  prompts leave the structure free: they name shape, colour and background, and
                             position or size only when that is the attribute edited ("a red star against a
                             gray background" -> "a blue star against a gray background"; "a small red star
                             on a gray background" -> "a large red star ..."), each pair in one random
                             template. A new word may then move the object, as in Stable Diffusion, and a
                             method that keeps structure has something to keep.
``shapesedit-v1``            fully described scenes ("a large red star on the left on a black background" ->
                             "a large blue star ..."), canonical template: the structure is named, so every
                             method keeps it by the prompt alone.

For every method the source and the edit are generated together from the pair's seed (:func:`attnlens.edit`);
the oracle reads both images and gives:

``success``          the edited image shows the target value of the edited attribute
``kept``             every other attribute the prompts name reads as in the source image
``structure_kept``   the structure no prompt fixes is kept: for each of position and size that is not the
                     edited attribute, position by the object's centroid (within :data:`MOVE_PX` px of the
                     source's, oracle frame 64x64) and size by its area (within :data:`AREA_TOL` of the source's
                     times the ratio the shapes the oracle reads alone bring, :func:`expected_area_ratio`)
``leak``             the edited image still shows the source value of the edited attribute
``iou``              IoU of the source and edited object masks, only for edits that should keep the mask
                     (colour, shape, background; NaN for position and size edits, which move it by design)
``bg_change``        mean absolute pixel change (0..1) outside both masks
``source_ok``        the source image shows every attribute of the source prompt (generation quality)

The real-image track renders (never generates) the source scene, inverts it with an empty prompt and
edits it with :func:`attnlens.edit_image`.

Example:
    >>> pairs = edit_pairs(seeds=1)
    >>> len(pairs), pairs[0].kind, pairs[0].mentions
    (5, 'colour', ('shape', 'colour', 'background'))
    >>> edit_pairs(seeds=1, version="shapesedit-v1")[0].source_prompt
    'a small red square on the right on a gray background'
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import AttnlensError, choices
from ._world import ATTRIBUTES, POSITION_PHRASES, Scene, describe, render, sample_scene, with_attribute
from .oracle import read, to_rgb64

VERSIONS = ("shapesedit-v1", "shapesedit-v2")
VERSION = "shapesedit-v2"
KINDS = ("colour", "shape", "size", "background", "position")
STRUCTURAL = ("position", "size")
UNDER_SPECIFIED = ("shape", "colour", "background")  # what a v2 prompt always names
MOVE_PX, AREA_TOL = 3.0, 0.20  # place kept: centroid within 3 px (64x64 frame); size kept: area within 20%


@dataclass(frozen=True)
class EditPair:
    """One edit: change ``kind`` of ``scene`` from ``source_value`` to ``target_value``; generate with ``seed``."""

    kind: str
    seed: int
    scene: Scene
    target_value: str
    source_prompt: str
    target_prompt: str
    mentions: tuple[str, ...] = tuple(ATTRIBUTES)  # the attributes both prompts name
    version: str = VERSION

    @property
    def source_value(self) -> str:
        return getattr(self.scene, self.kind)

    @property
    def target_scene(self) -> Scene:
        return with_attribute(self.scene, **{self.kind: self.target_value})


def edit_pairs(seeds: int | Sequence[int] = 12, kinds: Sequence[str] = KINDS, version: str = VERSION) -> list[EditPair]:
    """The ShapesEdit pairs: for each kind, one pair per seed (deterministic; ``version`` pins the recipe, see
    the module docstring)."""
    if version not in VERSIONS:
        raise AttnlensError(f"unknown ShapesEdit version {version!r}; valid: {choices(VERSIONS)}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise AttnlensError(f"unknown edit kind(s) {bad}; valid: {choices(KINDS)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    pairs = []
    for kind in kinds:
        for s in seed_list:
            rng = np.random.default_rng([s, KINDS.index(kind), 2024 if version == "shapesedit-v1" else 2025])
            scene = sample_scene(rng)
            others = [v for v in ATTRIBUTES[kind] if v != getattr(scene, kind)]
            new = others[int(rng.integers(len(others)))]
            target = with_attribute(scene, **{kind: new})
            if version == "shapesedit-v1":
                pairs.append(EditPair(kind, s, scene, new, describe(scene), describe(target), version=version))
                continue
            mentions = UNDER_SPECIFIED + ((kind,) if kind in STRUCTURAL else ())
            template = int(rng.integers(1 << 30))  # one template for both prompts of the pair
            source = describe(scene, mentions, np.random.default_rng(template))
            if kind == "position":  # the phrase lists differ in length: swap the phrase, keep the rest verbatim
                old = next(ph for ph in POSITION_PHRASES[scene.position] if ph in source)
                phrases = POSITION_PHRASES[new]
                edited = source.replace(old, phrases[template % len(phrases)], 1)
            else:
                edited = describe(target, mentions, np.random.default_rng(template))
            pairs.append(EditPair(kind, s, scene, new, source, edited, mentions, version))
    return pairs


def expected_area_ratio(scene: Scene, target: Scene) -> float:
    """Area of ``target``'s object over ``scene``'s when both are drawn at the same place and size: 1 unless the
    shape changes (a triangle covers less than a square of the same size), exact from the renderer."""
    if scene.shape == target.shape:
        return 1.0
    plain = with_attribute(scene, size=target.size, position=target.position)
    return float(render(with_attribute(plain, shape=target.shape))[1].sum() / render(plain)[1].sum())


def structure_of(source: Any, edited: Any) -> dict:
    """:func:`structure` of two oracle readings (both found), the expected area ratio taken from the shapes the
    oracle reads in each: a shape that changed may change the area, a size that changed may not."""
    expected = expected_area_ratio(Scene(**source.attributes), Scene(**{**source.attributes,
                                                                       "shape": edited.attributes["shape"]}))
    return structure(source.mask, edited.mask, expected)


def structure(source_mask: np.ndarray, edited_mask: np.ndarray, expected_ratio: float = 1.0) -> dict:
    """Place and size of the edited object against the source's: ``centroid_shift_px`` (distance of the mask
    centroids, oracle frame), ``area_ratio`` (edited area / source area), ``place_kept`` (shift within
    :data:`MOVE_PX`) and ``size_kept`` (ratio within :data:`AREA_TOL` of ``expected_ratio``, the ratio a
    shape change alone brings: :func:`expected_area_ratio`). Masks: ``(64, 64)`` bool."""
    shift = float(np.linalg.norm(np.argwhere(source_mask).mean(0) - np.argwhere(edited_mask).mean(0)))
    ratio = float(edited_mask.sum() / max(int(source_mask.sum()), 1))
    return {"centroid_shift_px": shift, "area_ratio": ratio, "place_kept": bool(shift <= MOVE_PX),
            "size_kept": bool(abs(ratio / expected_ratio - 1) <= AREA_TOL)}


def score(pair: EditPair, source: Any, edited: Any) -> dict:
    """Oracle metrics of one edit (see the module docstring). Images: PIL or ``(H, W, 3)`` arrays."""
    rs, re_ = read(source), read(edited)
    out = {"source_found": rs.found, "edited_found": re_.found}
    want_src = asdict(pair.scene)
    out["source_ok"] = bool(rs.found and all(rs.attributes.get(a) == want_src[a] for a in ATTRIBUTES))
    got = re_.attributes.get(pair.kind) if re_.found else None
    out["success"] = bool(re_.found and got == pair.target_value)
    out["leak"] = bool(re_.found and got == pair.source_value)
    others = [a for a in pair.mentions if a != pair.kind]
    out["kept"] = bool(rs.found and re_.found and all(rs.attributes.get(a) == re_.attributes.get(a) for a in others))
    free = [a for a in STRUCTURAL if a != pair.kind]
    if rs.found and re_.found:
        geo = structure_of(rs, re_)
        out["centroid_shift_px"], out["area_ratio"] = geo["centroid_shift_px"], geo["area_ratio"]
        out["structure_kept"] = bool(all(geo["place_kept" if a == "position" else "size_kept"] for a in free))
    else:
        out["centroid_shift_px"] = out["area_ratio"] = float("nan")
        out["structure_kept"] = False
    for a in ATTRIBUTES:
        out[f"edited_{a}"] = re_.attributes.get(a) if re_.found else None
        out[f"source_{a}"] = rs.attributes.get(a) if rs.found else None
    a, b = to_rgb64(source).astype(np.float32) / 255, to_rgb64(edited).astype(np.float32) / 255  # the oracle's 64x64
    if rs.found and re_.found:
        inter = np.logical_and(rs.mask, re_.mask).sum()
        union = np.logical_or(rs.mask, re_.mask).sum()
        out["iou"] = float(inter / max(union, 1)) if pair.kind not in STRUCTURAL else float("nan")
        outside = ~np.logical_or(rs.mask, re_.mask)
        out["bg_change"] = float(np.abs(a - b)[outside].mean()) if outside.any() else float("nan")
    else:
        out["iou"], out["bg_change"] = float("nan"), float(np.abs(a - b).mean())
    return out


def run(pipe: Any, methods: Sequence[str] = ("fpe", "p2p", "cross", "masactrl", "none"), seeds: int | Sequence[int] = 12,
        kinds: Sequence[str] = KINDS, real: bool = False, num_inference_steps: int = 25, guidance_scale: float = 7.5,
        progress: bool = True, on_row: Callable[[dict, Any], None] | None = None, version: str = VERSION,
        scorer: Callable[[EditPair, Any, Any], dict] | None = None, **options: Any):
    """Run methods over the pairs; returns a pandas DataFrame, one row per (track, method, pair).

    ``real=True`` runs the real-image track (rendered sources, DDIM inversion with an empty prompt, shared
    by all methods of a pair). ``options`` go to every method that accepts them. ``on_row(row, result)``
    is called after each edit (for example to save images). ``scorer(pair, source, edited)`` gives each row's
    scores: :func:`score` (the oracle) by default; on a model other than Shapes the chapters pass
    ``attnlens.viz.edit_scorer(pipe).score`` (CLIP score and directional similarity).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .._editing import edit, edit_image
    from .._inversion import invert
    from .._methods import METHODS

    import dataclasses

    for m in methods:
        if m not in METHODS:
            raise AttnlensError(f"unknown editing method {m!r}; valid: {choices(METHODS)}")
    accepted = {m: {f.name for f in dataclasses.fields(METHODS[m])} for m in methods}
    unused = [k for k in options if not any(k in names for names in accepted.values())]
    if unused:  # an option no chosen method takes would be dropped without a word
        raise AttnlensError(f"option(s) {unused} are taken by none of the methods {list(methods)}; valid: "
                            f"{choices(sorted(set().union(*accepted.values())))}")
    pairs = edit_pairs(seeds, kinds, version)
    rows = []
    bar = tqdm(total=len(pairs) * len(methods), desc=f"ShapesEdit ({'real' if real else 'generated'})",
               disable=not progress)
    for pair in pairs:
        inv = None
        if real:
            image, _ = render(pair.scene)
            inv = invert(pipe, image, "", num_inference_steps=num_inference_steps, check=False)
        for m in methods:
            own = {k: v for k, v in options.items() if k in accepted[m]}
            t0 = time.perf_counter()
            if real:
                result = edit_image(pipe, image, pair.target_prompt, "", method=m, inversion=inv,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **own)
                source = image
            else:
                result = edit(pipe, pair.source_prompt, pair.target_prompt, method=m, seed=pair.seed,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **own)
                source = result.source
            row = {"version": version, "track": "real" if real else "generated", "method": m, "kind": pair.kind,
                   "seed": pair.seed, "source_prompt": pair.source_prompt, "target_prompt": pair.target_prompt,
                   "source_value": pair.source_value, "target_value": pair.target_value,
                   "seconds": time.perf_counter() - t0, **(scorer or score)(pair, source, result.edited)}
            rows.append(row)
            if on_row is not None:
                on_row(row, result)
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def summarise(df: Any):
    """Mean of each metric by track, method and kind (plus an ``all`` kind), as a tidy DataFrame."""
    import pandas as pd

    metrics = [m for m in ("success", "kept", "structure_kept", "leak", "iou", "bg_change", "source_ok")
               if m in df.columns]  # records of v1 runs before structure_kept existed lack it
    by = df.groupby(["track", "method", "kind"])[metrics].mean().reset_index()
    allk = df.groupby(["track", "method"])[metrics].mean().reset_index().assign(kind="all")
    n = df.groupby(["track", "method", "kind"]).size().rename("n").reset_index()
    out = pd.concat([by.merge(n, on=["track", "method", "kind"]),
                     allk.assign(n=df.groupby(["track", "method"]).size().values)], ignore_index=True)
    return out
