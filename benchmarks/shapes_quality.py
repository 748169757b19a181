"""The Shapes model's quality bar (issue 3), measured in one run.

1. **VAE round trip.** Renders of the world (seed :data:`VAE_SEED`) are encoded (posterior mode) and
   decoded; the oracle reads every attribute back. Target: all five attributes kept on >= 99%.
2. **Prompted attributes.** A fixed, versioned list of prompt x seed pairs (:func:`prompt_list`,
   version :data:`LIST_VERSION`, :data:`N_PAIRS` pairs, built in code from the world's templates with
   attributes omitted in a fixed design, every attribute value covered) is generated at 25 DDIM
   steps with classifier-free guidance, batched. For each attribute, the share of images in whose
   prompt it is named that the oracle reads as named (targets: shape, position 90%; colour,
   background 95%; size 85%; an image where nothing is found counts as wrong). For each attribute
   left out of the prompt, the share of the most frequent value the oracle reads (target: at most 60%,
   i.e. the model is not collapsed).
3. **Shape word on the object.** During the same generations, :func:`attnlens.capture` records the
   cross-attention of the 16x16-level layers (``resolution=16``: the down and up blocks at the latent's
   own grid), averaged over all steps (``reduce="mean"``) and heads. The shape word's map (its tokens
   summed, :meth:`~attnlens.AttentionCache.word_map`) is upsampled bilinearly to 64x64 and thresholded
   by **Otsu's rule** (the threshold that maximises the between-class variance of the map's values, on
   a 256-bin histogram between its minimum and maximum). The IoU with the oracle's object mask of the
   generated image is averaged over images whose prompt names the shape and in which the oracle finds
   an object. Target: mean IoU >= 0.5. Two other rules (the map's mean; half its maximum) are
   recorded beside it for reference.
4. **Speed.** Seconds per image at 25 DDIM steps with guidance, batched, with ``--threads`` torch
   threads (2 by default): the pipeline of :func:`attnlens.load_pipeline`, a plain diffusers
   ``StableDiffusionPipeline.from_pretrained`` of the same folder, and the first with the capture of
   part 3 on, interleaved over ``--repeats`` rounds (median). Target: at most 1 s per image for the
   pipeline ``load_pipeline`` returns. The 1-minute load average before and after is recorded: other
   work on the machine slows every figure.

Writes ``benchmarks/results/shapes_quality.json`` (every figure, each target and whether it is met) and
``benchmarks/results/shapes_quality.csv`` (one row per generated image); ``--quick`` writes
``shapes_quality_quick.*`` instead, so a development run never replaces the recorded one.

Usage::

    python -m benchmarks.shapes_quality                          # the embedded model (or $ATTNLENS_MODEL)
    python -m benchmarks.shapes_quality --model runs/draft-shapes --quick
    python -m benchmarks.shapes_quality --guidance 5.0
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import attnlens
from attnlens._pipeline import EMBEDDED_MODEL, _dtype_kwarg
from attnlens.shapes import ATTRIBUTES, describe, iter_scenes, render, sample_scene
from attnlens.shapes import oracle
from tools.shapes_model.card import fingerprint

ROOT = Path(__file__).resolve().parents[1]

LIST_VERSION = 1
"""Bump when :func:`prompt_list` changes; recorded with the list's SHA-256 in the results."""
LIST_SEED = 20_251_127
N_PAIRS = 240
PROMPTED = {"shape": 180, "colour": 160, "size": 160, "position": 150, "background": 150}
"""How many of the :data:`N_PAIRS` prompts name each attribute (the rest leave it out)."""
VAE_SEED = 424_242  # distinct from the oracle's fit seed and the training data's seeds
VAE_N = 500

ACCURACY_TARGETS = {"shape": 0.90, "colour": 0.95, "size": 0.85, "position": 0.90, "background": 0.95}
VAE_TARGET = 0.99
UNPROMPTED_MAX_SHARE = 0.60
IOU_TARGET = 0.5
SECONDS_PER_IMAGE_TARGET = 1.0

QUICK = {"pairs": 16, "vae_n": 32, "speed_batch": 4, "repeats": 1}


# ------------------------------------------------------------------------------------ prompt list


def _balanced(values: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` values, each as often as possible equally, in a shuffled order."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def prompt_list() -> list[dict]:
    """The fixed list of prompt x seed pairs: ``[{"index", "seed", "prompt", "prompted": {attribute: value}}]``.

    Each attribute is named in :data:`PROMPTED` of the prompts, chosen by a seeded shuffle independent
    of the other attributes; over the prompts that name it, its values are balanced. Prompts come from
    :func:`attnlens.shapes.describe` with a seeded template (word order, position phrase, prefix).

    Example:
        >>> pairs = prompt_list()
        >>> len(pairs), pairs[0]["prompt"] == prompt_list()[0]["prompt"]
        (240, True)
    """
    rng = np.random.default_rng([LIST_SEED, 0])
    named = {}
    for attribute, count in PROMPTED.items():
        flags = np.zeros(N_PAIRS, dtype=bool)
        flags[rng.permutation(N_PAIRS)[:count]] = True
        values = iter(_balanced(ATTRIBUTES[attribute], count, rng))
        named[attribute] = [next(values) if f else None for f in flags]
    pairs = []
    for i in range(N_PAIRS):
        prompted = {a: named[a][i] for a in ATTRIBUTES if named[a][i] is not None}
        item_rng = np.random.default_rng([LIST_SEED, 1, i])
        scene = sample_scene(item_rng, **prompted)  # unnamed attributes: any value, they are not written
        prompt = describe(scene, tuple(prompted), item_rng)
        pairs.append({"index": i, "seed": 1_000 + i, "prompt": prompt, "prompted": prompted})
    return pairs


def list_digest(pairs: list[dict]) -> str:
    blob = json.dumps([(p["seed"], p["prompt"], sorted(p["prompted"].items())) for p in pairs])
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------ helpers


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: maximises the between-class variance over a ``bins``-bin histogram.

    Example:
        >>> x = np.concatenate([np.zeros(90), np.ones(10)])
        >>> 0.0 < otsu_threshold(x) < 1.0
        True
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])  # values above the best split's upper edge


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ parts


@torch.no_grad()
def vae_round_trip(pipe, n: int, batch: int = 50) -> dict:
    scenes = list(iter_scenes(n, seed=VAE_SEED))
    vae = pipe.vae
    hits = {k: 0 for k in ATTRIBUTES}
    all_ok = 0
    for start in range(0, n, batch):
        chunk = scenes[start : start + batch]
        x = torch.from_numpy(np.stack([render(s)[0] for s in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(pipe.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu()
        images = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for scene, r in zip(chunk, oracle.read_many(images)):
            ok = True
            for k in ATTRIBUTES:
                good = r.found and r.attributes[k] == getattr(scene, k)
                hits[k] += good
                ok &= good
            all_ok += ok
    return {"n": n, "seed": VAE_SEED, "accuracy": {k: hits[k] / n for k in ATTRIBUTES}, "all_attributes": all_ok / n,
            "target": VAE_TARGET, "pass": all_ok / n >= VAE_TARGET}


def generate(pipe, pairs: list[dict], steps: int, guidance: float, batch: int) -> list[dict]:
    """Generate every pair (batched) while capturing the 16x16-level cross-attention; read each image."""
    rows = []
    layers = None
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        gens = [torch.Generator().manual_seed(p["seed"]) for p in chunk]
        with attnlens.capture(pipe, kind="cross", resolution=16, reduce="mean") as cache:
            images = pipe([p["prompt"] for p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="np").images
        layers = list(cache.layers)
        images = to_uint8(images)
        for j, (pair, image, reading) in enumerate(zip(chunk, images, oracle.read_many(images))):
            row = {"pair": pair, "reading": reading, "iou": {}}
            shape = pair["prompted"].get("shape")
            if shape is not None and reading.found:
                heat = cache.word_map(shape, prompt=j).float()[None, None]
                heat = F.interpolate(heat, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
                rules = {"otsu": otsu_threshold(heat), "mean": float(heat.mean()),
                         "half_max": float(heat.min() + 0.5 * (heat.max() - heat.min()))}
                row["iou"] = {name: iou(heat > t, reading.mask) for name, t in rules.items()}
            rows.append(row)
        print(f"  generated {min(start + batch, len(pairs))}/{len(pairs)}", file=sys.stderr, flush=True)
    return rows, layers


def score(rows: list[dict]) -> dict:
    prompted, unprompted = {}, {}
    for k in ATTRIBUTES:
        named = [r for r in rows if k in r["pair"]["prompted"]]
        hits = sum(r["reading"].found and r["reading"].attributes[k] == r["pair"]["prompted"][k] for r in named)
        acc = hits / len(named) if named else None
        prompted[k] = {"n": len(named), "accuracy": acc, "target": ACCURACY_TARGETS[k],
                       "pass": None if acc is None else acc >= ACCURACY_TARGETS[k]}
        free = [r["reading"].attributes[k] for r in rows if k not in r["pair"]["prompted"] and r["reading"].found]
        counts = {v: free.count(v) for v in ATTRIBUTES[k]}
        top = max(counts, key=counts.get)
        share = counts[top] / len(free) if free else None
        unprompted[k] = {"n": len(free), "counts": counts, "top_value": top if free else None, "top_share": share,
                         "target_max": UNPROMPTED_MAX_SHARE, "pass": None if share is None else share <= UNPROMPTED_MAX_SHARE}
    with_iou = [r["iou"] for r in rows if r["iou"]]
    mean_iou = {rule: (statistics.fmean(d[rule] for d in with_iou) if with_iou else None)
                for rule in ("otsu", "mean", "half_max")}
    return {
        "found_rate": sum(r["reading"].found for r in rows) / len(rows),
        "prompted_accuracy": prompted,
        "unprompted_top_share": unprompted,
        "shape_word_iou": {"threshold_rule": "otsu", "n": len(with_iou), "mean_iou": mean_iou["otsu"],
                           "mean_iou_other_rules": {"mean": mean_iou["mean"], "half_max": mean_iou["half_max"]},
                           "target": IOU_TARGET,
                           "pass": None if mean_iou["otsu"] is None else mean_iou["otsu"] >= IOU_TARGET},
    }


def speed(pipe, plain, pairs: list[dict], steps: int, guidance: float, batch: int, repeats: int) -> dict:
    prompts = [pairs[i % len(pairs)]["prompt"] for i in range(batch)]

    def call(p):
        return p(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    def captured():
        with attnlens.capture(pipe, kind="cross", resolution=16, reduce="mean"):
            return call(pipe)

    modes = {"attnlens.load_pipeline": lambda: call(pipe), "plain diffusers": lambda: call(plain),
             "attnlens.load_pipeline + capture (16x16 cross, mean)": captured}
    for fn in modes.values():  # warm-up
        fn()
    load_before = os.getloadavg()[0]
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    per_image = {m: statistics.median(t) / batch for m, t in times.items()}
    main_figure = per_image["attnlens.load_pipeline"]
    return {
        "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(), "steps": steps, "guidance": guidance,
        "seconds_per_image": per_image,
        "ratio_to_plain_diffusers": {m: s / per_image["plain diffusers"] for m, s in per_image.items()},
        "target": SECONDS_PER_IMAGE_TARGET, "pass": main_figure <= SECONDS_PER_IMAGE_TARGET,
        "load_average_1min_before": load_before, "load_average_1min_after": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------ report


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _mark(ok) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[ok]


def print_table(report: dict) -> None:
    print(f"Shapes quality bar: {report['model']} (guidance {report['guidance']}, {report['steps']} DDIM steps, "
          f"{report['prompt_list']['n_used']} prompt x seed pairs{', QUICK' if report['quick'] else ''})")
    lines = [("figure", "value", "target", "")]
    v = report["vae_round_trip"]
    lines.append((f"VAE round trip keeps all attributes (n={v['n']})", _fmt(v["all_attributes"]), f">= {_fmt(v['target'])}", _mark(v["pass"])))
    for k, d in report["prompted_accuracy"].items():
        lines.append((f"prompted {k} read as named (n={d['n']})", _fmt(d["accuracy"]), f">= {_fmt(d['target'])}", _mark(d["pass"])))
    for k, d in report["unprompted_top_share"].items():
        lines.append((f"unprompted {k}: top value {d['top_value']} (n={d['n']})", _fmt(d["top_share"]),
                      f"<= {_fmt(d['target_max'])}", _mark(d["pass"])))
    s = report["shape_word_iou"]
    lines.append((f"shape word map IoU, Otsu (n={s['n']})", _fmt(s["mean_iou"], False), f">= {s['target']}", _mark(s["pass"])))
    for rule, x in s["mean_iou_other_rules"].items():
        lines.append((f"  (for reference: threshold = {rule})", _fmt(x, False), "", ""))
    sp = report["speed"]
    for m, x in sp["seconds_per_image"].items():
        target = f"<= {sp['target']}" if m == "attnlens.load_pipeline" else ""
        lines.append((f"s/image, {m} (batch {sp['batch']})", f"{x:.3f}", target,
                      _mark(sp["pass"]) if target else f"x{sp['ratio_to_plain_diffusers'][m]:.2f} plain"))
    lines.append(("object found by the oracle", _fmt(report["found_rate"]), "", ""))
    w = max(len(r[0]) for r in lines)
    for r in lines:
        print(f"{r[0]:<{w}}  {r[1]:>9}  {r[2]:>9}  {r[3]}")
    print(f"all targets met: {report['targets_met']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers folder or hub id (default: $ATTNLENS_MODEL, "
                        "else the embedded Shapes model)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25: the quality bar's figure)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per pipeline call (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the speed part (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the quality bar's machine)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small slice for development ({QUICK['pairs']} pairs, {QUICK['vae_n']} VAE renders, "
                        "1 timed round); writes shapes_quality_quick.*")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (the CSV goes beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = args.model or os.environ.get("ATTNLENS_MODEL") or str(EMBEDDED_MODEL)
    out = args.out or ROOT / "benchmarks" / "results" / ("shapes_quality_quick.json" if args.quick else "shapes_quality.json")
    t_start = time.perf_counter()
    pipe = attnlens.load_pipeline(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(model, **_dtype_kwarg(torch.float32), use_safetensors=True)
    plain.set_progress_bar_config(disable=True)

    pairs = prompt_list()
    used = pairs[: QUICK["pairs"]] if args.quick else pairs
    print("VAE round trip ...", file=sys.stderr, flush=True)
    vae = vae_round_trip(pipe, QUICK["vae_n"] if args.quick else VAE_N)
    print("generating ...", file=sys.stderr, flush=True)
    rows, layers = generate(pipe, used, args.steps, args.guidance, args.batch)
    scores = score(rows)
    scores["shape_word_iou"]["layers"] = layers
    print("timing ...", file=sys.stderr, flush=True)
    sp = speed(pipe, plain, pairs, args.steps, args.guidance, QUICK["speed_batch"] if args.quick else args.batch,
               QUICK["repeats"] if args.quick else args.repeats)

    folder = Path(model)
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else None
    passes = [vae["pass"], sp["pass"], scores["shape_word_iou"]["pass"]]
    passes += [d["pass"] for d in scores["prompted_accuracy"].values()]
    passes += [d["pass"] for d in scores["unprompted_top_share"].values()]
    import diffusers
    import sklearn

    report = {
        "model": model if folder.is_dir() and folder.resolve() != EMBEDDED_MODEL.resolve() else
                 ("embedded Shapes model" if folder.is_dir() else model),
        "model_fingerprint": fingerprint(folder),  # the card shows figures only for these weights
        "training": training,
        "quick": args.quick,
        "guidance": args.guidance,
        "steps": args.steps,
        "batch": args.batch,
        "prompt_list": {"version": LIST_VERSION, "seed": LIST_SEED, "n": len(pairs), "n_used": len(used),
                        "sha256": list_digest(pairs), "prompted_counts": PROMPTED},
        "vae_round_trip": vae,
        **scores,
        "speed": sp,
        "targets_met": all(p is True for p in passes),
        "seconds_total": time.perf_counter() - t_start,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "sklearn": sklearn.__version__},
        "command": " ".join(["python -m benchmarks.shapes_quality", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "seed", "prompt", "found"] + [f"{k}_{c}" for k in ATTRIBUTES for c in ("named", "read")]
                   + ["iou_otsu", "iou_mean", "iou_half_max", "oracle_note"])
        for r in rows:
            p, rd = r["pair"], r["reading"]
            w.writerow([p["index"], p["seed"], p["prompt"], int(rd.found)]
                       + [x for k in ATTRIBUTES for x in (p["prompted"].get(k, ""), rd.attributes.get(k, ""))]
                       + [f"{r['iou'][k]:.4f}" if r["iou"] else "" for k in ("otsu", "mean", "half_max")] + [rd.reason])
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return report


if __name__ == "__main__":
    main()
