"""ShapesEdit: a fixed, versioned set of prompt edits on the Shapes world, scored exactly by the oracle.

Each pair changes one attribute of a fully described scene ("a large red star on the left on a black
background" -> "a large blue star ..."). For every method the source and the edit are generated
together from the pair's seed (:func:`attnlens.edit`); the oracle reads both images and gives:

``success``      the edited image shows the target value of the edited attribute
``kept``         every other attribute reads as in the source image
``leak``         the edited image still shows the source value of the edited attribute
``iou``          IoU of the source and edited object masks (structure kept)
``bg_change``    mean absolute pixel change (0..1) outside both masks
``source_ok``    the source image shows every attribute of the source prompt (generation quality)

The real-image track renders (never generates) the source scene, inverts it with an empty prompt and
edits it with :func:`attnlens.edit_image`.

Example:
    >>> pairs = edit_pairs(seeds=1)
    >>> len(pairs), pairs[0].kind, pairs[0].source_prompt
    (5, 'colour', 'a small red square on the right on a gray background')
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import AttnlensError, choices
from ._world import ATTRIBUTES, Scene, describe, render, sample_scene, with_attribute
from .oracle import read, to_rgb64

VERSION = "shapesedit-v1"
KINDS = ("colour", "shape", "size", "background", "position")


@dataclass(frozen=True)
class EditPair:
    """One edit: change ``kind`` of ``scene`` from ``source_value`` to ``target_value``; generate with ``seed``."""

    kind: str
    seed: int
    scene: Scene
    target_value: str
    source_prompt: str
    target_prompt: str

    @property
    def source_value(self) -> str:
        return getattr(self.scene, self.kind)

    @property
    def target_scene(self) -> Scene:
        return with_attribute(self.scene, **{self.kind: self.target_value})


def edit_pairs(seeds: int | Sequence[int] = 12, kinds: Sequence[str] = KINDS, version: str = VERSION) -> list[EditPair]:
    """The ShapesEdit pairs: for each kind, one pair per seed (deterministic; ``version`` pins the recipe)."""
    if version != VERSION:
        raise AttnlensError(f"unknown ShapesEdit version {version!r}; this attnlens has {VERSION!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise AttnlensError(f"unknown edit kind(s) {bad}; valid: {choices(KINDS)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    pairs = []
    for kind in kinds:
        for s in seed_list:
            rng = np.random.default_rng([s, KINDS.index(kind), 2024])
            scene = sample_scene(rng)
            others = [v for v in ATTRIBUTES[kind] if v != getattr(scene, kind)]
            new = others[int(rng.integers(len(others)))]
            pairs.append(EditPair(kind, s, scene, new, describe(scene), describe(with_attribute(scene, **{kind: new}))))
    return pairs


def score(pair: EditPair, source: Any, edited: Any) -> dict:
    """Oracle metrics of one edit (see the module docstring). Images: PIL or ``(H, W, 3)`` arrays."""
    rs, re_ = read(source), read(edited)
    out = {"source_found": rs.found, "edited_found": re_.found}
    want_src = asdict(pair.scene)
    out["source_ok"] = bool(rs.found and all(rs.attributes.get(a) == want_src[a] for a in ATTRIBUTES))
    got = re_.attributes.get(pair.kind) if re_.found else None
    out["success"] = bool(re_.found and got == pair.target_value)
    out["leak"] = bool(re_.found and got == pair.source_value)
    others = [a for a in ATTRIBUTES if a != pair.kind]
    out["kept"] = bool(rs.found and re_.found and all(rs.attributes.get(a) == re_.attributes.get(a) for a in others))
    for a in ATTRIBUTES:
        out[f"edited_{a}"] = re_.attributes.get(a) if re_.found else None
        out[f"source_{a}"] = rs.attributes.get(a) if rs.found else None
    a, b = to_rgb64(source).astype(np.float32) / 255, to_rgb64(edited).astype(np.float32) / 255  # the oracle's 64x64
    if rs.found and re_.found:
        inter = np.logical_and(rs.mask, re_.mask).sum()
        union = np.logical_or(rs.mask, re_.mask).sum()
        out["iou"] = float(inter / max(union, 1))
        outside = ~np.logical_or(rs.mask, re_.mask)
        out["bg_change"] = float(np.abs(a - b)[outside].mean()) if outside.any() else float("nan")
    else:
        out["iou"], out["bg_change"] = float("nan"), float(np.abs(a - b).mean())
    return out


def run(pipe: Any, methods: Sequence[str] = ("fpe", "p2p", "cross", "masactrl", "none"), seeds: int | Sequence[int] = 12,
        kinds: Sequence[str] = KINDS, real: bool = False, num_inference_steps: int = 25, guidance_scale: float = 7.5,
        progress: bool = True, on_row: Callable[[dict, Any], None] | None = None, **options: Any):
    """Run methods over the pairs; returns a pandas DataFrame, one row per (track, method, pair).

    ``real=True`` runs the real-image track (rendered sources, DDIM inversion with an empty prompt, shared
    by all methods of a pair). ``options`` go to every method that accepts them. ``on_row(row, result)``
    is called after each edit (for example to save images).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .._editing import edit, edit_image
    from .._inversion import invert
    from .._methods import METHODS

    for m in methods:
        if m not in METHODS:
            raise AttnlensError(f"unknown editing method {m!r}; valid: {choices(METHODS)}")
    pairs = edit_pairs(seeds, kinds)
    rows = []
    bar = tqdm(total=len(pairs) * len(methods), desc=f"ShapesEdit ({'real' if real else 'generated'})",
               disable=not progress)
    for pair in pairs:
        inv = None
        if real:
            image, _ = render(pair.scene)
            inv = invert(pipe, image, "", num_inference_steps=num_inference_steps, check=False)
        for m in methods:
            t0 = time.perf_counter()
            if real:
                result = edit_image(pipe, image, pair.target_prompt, "", method=m, inversion=inv,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
                source = image
            else:
                result = edit(pipe, pair.source_prompt, pair.target_prompt, method=m, seed=pair.seed,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
                source = result.source
            row = {"version": VERSION, "track": "real" if real else "generated", "method": m, "kind": pair.kind,
                   "seed": pair.seed, "source_prompt": pair.source_prompt, "target_prompt": pair.target_prompt,
                   "source_value": pair.source_value, "target_value": pair.target_value,
                   "seconds": time.perf_counter() - t0, **score(pair, source, result.edited)}
            rows.append(row)
            if on_row is not None:
                on_row(row, result)
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def summarise(df: Any):
    """Mean of each metric by track, method and kind (plus an ``all`` kind), as a tidy DataFrame."""
    import pandas as pd

    metrics = ["success", "kept", "leak", "iou", "bg_change", "source_ok"]
    by = df.groupby(["track", "method", "kind"])[metrics].mean().reset_index()
    allk = df.groupby(["track", "method"])[metrics].mean().reset_index().assign(kind="all")
    n = df.groupby(["track", "method", "kind"]).size().rename("n").reset_index()
    out = pd.concat([by.merge(n, on=["track", "method", "kind"]),
                     allk.assign(n=df.groupby(["track", "method"]).size().values)], ignore_index=True)
    return out
