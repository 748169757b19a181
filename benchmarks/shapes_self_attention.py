"""Does the Shapes model use its self-attention? Issue 17's three targets, with their rules fixed before the run.

1. **Ablation** (load-bearing self-attention). Fully described prompts (all five attributes named) x seeds
   are generated once as they are and once with the output of a group of attention layers replaced by
   zeros (a per-instance processor that returns zeros, so each transformer block keeps only its residual;
   the original processors are put back afterwards). Groups: every (kind, query grid) level, self and
   cross, and ``fpe_self``: all the self-attention layers that FPE edits at its default rule, together.
   Per group: mean absolute pixel change (0..1) and how many images the oracle reads differently (found
   or not, or any of the five attributes). Target: ``fpe_self`` changes the reading of at least half
   of the images.
2. **Free structure**. Under-specified edits: prompts name shape, colour and background but never
   position or size; one of colour, shape or background is swapped; each pair is generated with
   :func:`attnlens.edit` from its seed. A pair *keeps place and size* when the oracle finds the object in
   both images, their mask centroids are within 3 px (oracle frame, 64x64) and the edited mask's area is
   within 20% of the source's (times the area ratio the two shapes the oracle reads bring: a triangle covers
   less than a square of the same size). Pairs whose source image has no object the oracle can find are left out
   (their count is recorded). Target: ``none`` (the target prompt from the same noise, nothing injected)
   keeps place and size in at most 60% of the pairs (a new word may move the layout, as in SD).
3. **The paper's claim**. On the same pairs, ``fpe`` at its default rule keeps place and size in at least
   80% of the pairs, and the oracle reads the edited attribute as the target value in at least 80%.

Diagnostics (``--diagnostics``; not targets, recorded apart under ``diagnostics``): the same pairs edited by
``fpe_every_level`` (FPE's map swap at every self-attention level, the finest included, first 80% of steps)
and ``fpe_every_level_all_steps`` (every level, every step). They say whether the model's layout lives in
self-attention at all, and at which levels, when the default rule fails.

25 DDIM steps, guidance 7.5 (the book's settings). Writes ``shapes_self_attention.json`` (or
``shapes_self_attention_quick.json`` with ``--quick``) to ``--out``: settings, versions, command, timing,
the ablation table, every edit pair's readings and the targets with pass flags.

    python -m benchmarks.shapes_self_attention                     # the embedded model
    python -m benchmarks.shapes_self_attention --quick --model DIR  # a slice, e.g. on an exported checkpoint
    python -m benchmarks.shapes_self_attention --ablation-only --model DIR   # the ablation alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

import attnlens
from attnlens import shapes
from attnlens._identity import fingerprint
from attnlens.shapes import editbench

ROOT = Path(__file__).resolve().parents[1]

STEPS, GUIDANCE = 25, 7.5
MOVE_PX, AREA_TOL = editbench.MOVE_PX, editbench.AREA_TOL  # the structure rule lives with ShapesEdit
LOAD_BEARING_MIN, FREE_MAX, FPE_KEEP_MIN, FPE_SUCCESS_MIN = 0.5, 0.6, 0.8, 0.8
EDIT_KINDS = ("colour", "shape", "background")
UNDER = ("shape", "colour", "background")  # the attributes an under-specified prompt names
SCENE_SEED = 1717


# ------------------------------------------------------------------------------------------ ablation
@contextlib.contextmanager
def zeroed(pipe: Any, names: Sequence[str]) -> Iterator[list[str]]:
    """Zero the attention layers ``names`` (attnlens layer names) for the duration (:class:`attnlens.Ablate`:
    each block keeps only its residual stream); the processors are restored on exit, after an exception too."""
    table = {info.name: info for info in attnlens.layers(pipe)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise attnlens.AttnlensError(f"unknown attention layer(s) {unknown}; valid: {sorted(table)}")
    with attnlens.control(pipe, attnlens.Ablate(attnlens.Selector(layers=list(names)))):
        yield list(names)


def ablation_groups(pipe: Any) -> dict[str, list[str]]:
    """``{group: layer names}``: one group per (kind, query grid side), then ``fpe_self``."""
    groups: dict[str, list[str]] = {}
    for info in attnlens.layers(pipe):
        groups.setdefault(f"{info.kind} {info.resolution[0]}x{info.resolution[1]}", []).append(info.name)
    groups = dict(sorted(groups.items(), key=lambda kv: (kv[0].split()[0] != "self", -int(kv[0].split()[1].split("x")[0]))))
    groups["fpe_self"] = attnlens.default_layers(pipe, "fpe")
    return groups


def full_prompts(n: int) -> list[str]:
    rng = np.random.default_rng([SCENE_SEED, 0])
    return [shapes.describe(shapes.sample_scene(rng)) for _ in range(n)]


def _generate(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """Images ``(n, H, W, 3)`` uint8 of every (prompt, seed), one batch."""
    jobs = [(p, s) for s in seeds for p in prompts]
    gens = [torch.Generator().manual_seed(s) for _, s in jobs]
    out = pipe([p for p, _ in jobs], generator=gens, num_inference_steps=steps, guidance_scale=guidance,
               output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _reading(image: np.ndarray) -> dict | None:
    r = shapes.read(image)
    return dict(r.attributes) if r.found else None


def ablation(pipe: Any, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE) -> list[dict]:
    """One row per group: layers, mean pixel change (0..1), readings changed out of images."""
    base = _generate(pipe, prompts, seeds, steps, guidance)
    base_read = [_reading(im) for im in base]
    rows = []
    for group, names in ablation_groups(pipe).items():
        with zeroed(pipe, names):
            imgs = _generate(pipe, prompts, seeds, steps, guidance)
        changed = sum(_reading(im) != r for im, r in zip(imgs, base_read))
        rows.append({"group": group, "layers": names, "n_layers": len(names),
                     "pixel_change": float(np.abs(imgs.astype(np.float32) - base.astype(np.float32)).mean() / 255),
                     "readings_changed": int(changed), "images": len(base)})
    return rows


# ------------------------------------------------------------------------------------------ edits
def under_specified_pairs(seeds: int) -> list[dict]:
    """For each kind in colour, shape, background: ``seeds`` pairs (scene, swapped value, prompts, seed)."""
    pairs = []
    for kind in EDIT_KINDS:
        for s in range(seeds):
            rng = np.random.default_rng([SCENE_SEED, 1, EDIT_KINDS.index(kind), s])
            scene = shapes.sample_scene(rng)
            others = [v for v in shapes.ATTRIBUTES[kind] if v != getattr(scene, kind)]
            value = others[int(rng.integers(len(others)))]
            target = shapes.with_attribute(scene, **{kind: value})
            template = int(rng.integers(1 << 30))  # the same template for both prompts of the pair
            pairs.append({"kind": kind, "seed": s, "target_value": value,
                          "source_prompt": shapes.describe(scene, UNDER, np.random.default_rng(template)),
                          "target_prompt": shapes.describe(target, UNDER, np.random.default_rng(template))})
    return pairs


def structure(source: Any, edited: Any) -> dict:
    """Oracle readings of a pair and whether place and size are kept (see the module docstring; the area ratio
    is judged against the one the shapes read in the two images bring, :func:`attnlens.shapes.editbench.structure_of`)."""
    rs, re_ = shapes.read(source), shapes.read(edited)
    out = {"source_found": bool(rs.found), "edited_found": bool(re_.found),
           "source_reading": dict(rs.attributes) if rs.found else None,
           "edited_reading": dict(re_.attributes) if re_.found else None,
           "centroid_shift_px": None, "area_ratio": None, "kept": False}
    if rs.found and re_.found:
        geo = editbench.structure_of(rs, re_)
        out["centroid_shift_px"], out["area_ratio"] = geo["centroid_shift_px"], geo["area_ratio"]
        out["kept"] = geo["place_kept"] and geo["size_kept"]
    return out


DIAGNOSTICS = ("fpe_every_level", "fpe_every_level_all_steps")


def variant(pipe: Any, label: str) -> tuple[str, dict]:
    """``(method, options)`` of an edit variant: ``none``, ``fpe`` (its defaults) or a diagnostic."""
    if label in ("none", "fpe"):
        return label, {}
    finest = max(max(i.resolution) for i in attnlens.layers(pipe) if i.kind == "self")
    if label == "fpe_every_level":
        return "fpe", {"max_resolution": finest}
    if label == "fpe_every_level_all_steps":
        return "fpe", {"max_resolution": finest, "steps": (0.0, 1.0)}
    raise ValueError(f"unknown edit variant {label!r}")


def edits(pipe: Any, pairs: list[dict], methods: Sequence[str] = ("none", "fpe"), steps: int = STEPS,
          guidance: float = GUIDANCE) -> list[dict]:
    rows = []
    for pair in pairs:
        for m in methods:
            method, options = variant(pipe, m)
            r = attnlens.edit(pipe, pair["source_prompt"], pair["target_prompt"], method=method, seed=pair["seed"],
                              num_inference_steps=steps, guidance_scale=guidance, **options)
            row = {**pair, "method": m, **structure(r.source, r.edited)}
            row["success"] = bool(row["edited_found"] and row["edited_reading"][pair["kind"]] == pair["target_value"])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ verdict
def verdicts(ablation_rows: list[dict] | None, edit_rows: list[dict] | None) -> dict:
    """The three targets with their figures and pass flags (``None`` where that part was not run)."""
    out: dict[str, Any] = {}
    if ablation_rows is not None:
        fpe = next(r for r in ablation_rows if r["group"] == "fpe_self")
        share = fpe["readings_changed"] / max(fpe["images"], 1)
        out["load_bearing_self_attention"] = {
            "rule": f"zeroing every self-attention layer FPE edits (default rule) changes the oracle reading of >= "
                    f"{LOAD_BEARING_MIN:.0%} of the fully described images",
            "readings_changed": fpe["readings_changed"], "images": fpe["images"], "share": share,
            "pixel_change": fpe["pixel_change"], "layers": fpe["layers"], "pass": bool(share >= LOAD_BEARING_MIN)}
    if edit_rows is not None:
        def rates(method: str) -> dict:
            rows = [r for r in edit_rows if r["method"] == method]
            valid = [r for r in rows if r["source_found"]]
            n = len(valid)
            return {"pairs": len(rows), "pairs_without_source_object": len(rows) - n,
                    "kept": sum(r["kept"] for r in valid) / n if n else float("nan"),
                    "success": sum(r["success"] for r in valid) / n if n else float("nan"), "n": n}

        none, fpe = rates("none"), rates("fpe")
        diagnostics = {m: rates(m) for m in DIAGNOSTICS if any(r["method"] == m for r in edit_rows)}
        out["free_structure"] = {
            "rule": f"under-specified edits: `none` keeps place and size (centroid within {MOVE_PX:g} px, area within "
                    f"{AREA_TOL:.0%}) in <= {FREE_MAX:.0%} of pairs", **none,
            "pass": bool(none["n"] > 0 and none["kept"] <= FREE_MAX)}
        out["fpe_keeps_structure"] = {
            "rule": f"`fpe` at its default rule keeps place and size in >= {FPE_KEEP_MIN:.0%} of those pairs and the "
                    f"edited attribute reads as the target in >= {FPE_SUCCESS_MIN:.0%}", **fpe,
            "pass": bool(fpe["n"] > 0 and fpe["kept"] >= FPE_KEEP_MIN and fpe["success"] >= FPE_SUCCESS_MIN)}
        if diagnostics:
            out["diagnostics"] = diagnostics
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: $ATTNLENS_MODEL or the embedded model)")
    ap.add_argument("--prompts", type=int, default=6, help="fully described prompts of the ablation (default 6)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per ablation prompt (default 2)")
    ap.add_argument("--edit-seeds", type=int, default=6, help="under-specified pairs per edit kind (default 6)")
    ap.add_argument("--quick", action="store_true", help="a slice: 4 prompts x 2 seeds, 3 pairs per kind")
    ap.add_argument("--ablation-only", action="store_true", help="skip the edits (targets 2 and 3)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="also edit the pairs with FPE at every level (and every step): not targets, recorded apart")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--under-load", action="store_true",
                    help="record that the timing was measured on a loaded machine (then it is not a speed figure)")
    ap.add_argument("--name", default=None, help="file name (default shapes_self_attention[_quick].json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.seeds, args.edit_seeds = 4, 2, 3
    pipe = attnlens.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    abl = ablation(pipe, full_prompts(args.prompts), list(range(args.seeds)))
    t_abl = time.perf_counter() - t0
    methods = ("none", "fpe") + (DIAGNOSTICS if args.diagnostics else ())
    rows = None if args.ablation_only else edits(pipe, under_specified_pairs(args.edit_seeds), methods)
    seconds = time.perf_counter() - t0
    import diffusers

    folder = args.model or os.environ.get("ATTNLENS_MODEL")
    training = Path(folder or attnlens._pipeline.EMBEDDED_MODEL) / "training.json"
    trained = json.loads(training.read_text()) if training.exists() else {}
    step = trained.get("unet_step")
    weights = {True: "ema", False: "raw"}.get(trained.get("ema"))
    cmd = "python -m benchmarks.shapes_self_attention" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:])])
    record = {
        "command": cmd, "model": str(folder or "embedded Shapes model"), "unet_step": step, "weights": weights,
        # the card shows the targets only for these weights (a --quick slice is not a record of the model)
        "model_fingerprint": fingerprint(folder or attnlens._pipeline.EMBEDDED_MODEL), "quick": bool(args.quick),
        "settings": {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "prompts": args.prompts,
                     "seeds": args.seeds, "edit_seeds_per_kind": None if args.ablation_only else args.edit_seeds,
                     "edit_kinds": list(EDIT_KINDS), "under_specified_mentions": list(UNDER),
                     "move_px": MOVE_PX, "area_tolerance": AREA_TOL, "scene_seed": SCENE_SEED,
                     "structure_rule": "centroid within move_px; area within area_tolerance of the ratio the shapes "
                                       "read in both images bring (attnlens.shapes.editbench.structure_of)",
                     "fpe_layers": attnlens.default_layers(pipe, "fpe")},
        "versions": {"attnlens": attnlens.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version(), "platform": platform.platform()},
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1), "seconds_ablation": round(t_abl, 1),
        "timing_note": ("measured under load (a shared 2-core machine with other jobs running): not a speed figure"
                        if args.under_load else "measured on an otherwise idle machine"),
        "targets": {k: v for k, v in verdicts(abl, rows).items() if k != "diagnostics"},
        "diagnostics": verdicts(abl, rows).get("diagnostics"), "ablation": abl, "prompts": full_prompts(args.prompts),
        "edits": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("shapes_self_attention_quick.json" if args.quick else "shapes_self_attention.json")
    (args.out / name).write_text(json.dumps(record, indent=1))
    print(f"{'group':<14}{'layers':>7}{'pixel change':>14}{'readings changed':>18}")
    for r in abl:
        print(f"{r['group']:<14}{r['n_layers']:>7}{r['pixel_change']:>14.3f}{r['readings_changed']:>12} of {r['images']}")
    for k, v in record["targets"].items():
        figures = {x: v[x] for x in ("share", "kept", "success", "n") if x in v}
        print(f"{k}: {'PASS' if v['pass'] else 'FAIL'} {figures}")
    for k, v in (record["diagnostics"] or {}).items():
        print(f"diagnostic {k}: kept {v['kept']:.2f} success {v['success']:.2f} (n={v['n']})")
    print(f"wrote {args.out / name} ({seconds:.0f} s, under load)")


if __name__ == "__main__":
    main()
