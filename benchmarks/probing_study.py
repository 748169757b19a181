"""The probing study (issue 5): what do attention maps of the Shapes model carry, by layer and by step?

Liu et al. (CVPR 2024) report that a probe on a token's cross-attention map tells the object's category
and colour, and one on self-attention maps mostly cannot (self-attention carries layout). Here, on the
Shapes model, for each attribute (shape, colour, size, position, background) and each feature

* ``shape_word``: the cross-attention map of the prompt's shape word ("star"),
* ``colour_word``: the map of its colour word ("red"),
* ``end``: the map of the end token,
* ``self``: the self-attention summary (queries and keys pooled to 4x4, see attnlens._collect),

a probe (standardise + logistic regression, 5 prompt-grouped folds, shuffled-label control) is fitted at
every attention layer at 5 steps of the 25-step schedule. The leakage question of the paper: does the
shape word's map carry colour? The layout question: does self-attention tell where the object was drawn
and how big (``seen_position``, ``seen_size``: the oracle's reading of the generated image, probed on the
images where it found an object)?

Prompts: canonical descriptions of Shapes scenes ("a large red star on the left on a black background"),
each attribute balanced over the prompts, in random combinations; 480 prompts x 2 seeds. The oracle reads
every generated image, so the table also says how often the model drew what was asked.

Writes benchmarks/results/probing_study.csv (one row per feature, site and attribute),
probing_study_summary.csv (the verdict table) and probing_study.json (settings, timings, verdicts; _quick
files with --quick), and prints the verdict table. The heat maps are drawn from the CSV by the book's
probing chapter (a standalone plotly HTML would load plotly.js from a CDN, which the offline book avoids).

    python benchmarks/probing_study.py                              # the embedded model
    python benchmarks/probing_study.py --model runs/draft-shapes --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import attnlens
from attnlens import Selector, shapes
from attnlens.shapes import oracle

ATTRS = list(shapes.ATTRIBUTES)
SEEN = ["seen_position", "seen_size"]  # the layout of the generated image, as the oracle reads it
WORDS = {"shape_word": "{shape}", "colour_word": "{colour}", "end": "<end>"}
FEATURES = [*WORDS, "self"]


SCENE_SEED = 5  # the seed of the study's prompt list (recorded in its JSON; the book's live slice reuses it)


def balanced_scenes(n: int, seed: int) -> list[shapes.Scene]:
    """``n`` scenes whose every attribute takes each value equally often (up to rounding), combined at random."""
    rng = np.random.default_rng(seed)
    columns = {}
    for name, values in shapes.ATTRIBUTES.items():
        col = np.resize(np.array(values), n)
        rng.shuffle(col)
        columns[name] = col
    return [shapes.sample_scene(rng, **{a: str(columns[a][i]) for a in ATTRS}) for i in range(n)]


def seen(image) -> dict:
    r = oracle.read(image)
    return {"seen_found": r.found, **{f"seen_{a}": r.attributes.get(a, "") for a in ATTRS}}


def verdict(row: pd.Series) -> str:
    """yes: the best site beats its control by >= 0.2 and its interval clears the control; weak: by >= 0.1."""
    if row.selectivity >= 0.2 and row.ci_low > row.control:
        return "yes"
    return "weak" if row.selectivity >= 0.1 else "no"


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (feature, attribute), part in df.groupby(["feature", "attribute"], sort=False):
        best = part.loc[part["accuracy"].idxmax()]
        rows.append({"feature": feature, "attribute": attribute, "best_site": best.site,
                     "best_accuracy": best.accuracy, "ci_low": best.ci_low, "ci_high": best.ci_high,
                     "median_accuracy": part["accuracy"].median(), "chance": best.baseline, "control": best.control,
                     "selectivity": best.selectivity, "median_selectivity": part["selectivity"].median(),
                     "decodes": verdict(best)})
    out = pd.DataFrame(rows)
    out["feature"] = pd.Categorical(out["feature"], FEATURES, ordered=True)
    out["attribute"] = pd.Categorical(out["attribute"], ATTRS + SEEN, ordered=True)
    return out.sort_values(["feature", "attribute"]).reset_index(drop=True)


def claims(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The paper's statements, each checked against the table: (claim, verdict, evidence)."""
    s = summary.astype({"feature": str, "attribute": str}).set_index(["feature", "attribute"])

    def acc(f, a):
        r = s.loc[(f, a)]
        return f"{f}->{a}: best {r.best_accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] at {r.best_site}, " \
               f"median {r.median_accuracy:.2f}, chance {r.chance:.2f}, control {r.control:.2f}"

    def dec(f, a):
        return s.loc[(f, a), "decodes"]

    out = []
    v = dec("shape_word", "shape")
    out.append(("the object word's cross-attention map tells the object category (shape)",
                {"yes": "agrees", "weak": "weakly agrees", "no": "disagrees"}[v], acc("shape_word", "shape")))
    v = dec("colour_word", "colour")
    out.append(("a cross-attention map tells the colour (colour word)",
                {"yes": "agrees", "weak": "weakly agrees", "no": "disagrees"}[v], acc("colour_word", "colour")))
    v = dec("shape_word", "colour")
    out.append(("leakage: the shape word's map carries the colour",
                {"yes": "agrees", "weak": "weakly agrees", "no": "disagrees"}[v], acc("shape_word", "colour")))
    cross, selfa = s.loc[("shape_word", "shape")], s.loc[("self", "shape")]
    worse = selfa.median_accuracy < cross.median_accuracy - 0.05
    out.append(("self-attention tells the category worse than cross-attention does",
                "agrees" if worse else "disagrees",
                f"median shape accuracy self {selfa.median_accuracy:.2f} vs shape word {cross.median_accuracy:.2f}"))
    lay = [dec("self", a) for a in SEEN if ("self", a) in s.index]
    out.append(("self-attention carries the layout of the generated image (position, size the oracle reads)",
                "agrees" if "yes" in lay else ("weakly agrees" if "weak" in lay else "disagrees" if lay else "untested"),
                "; ".join(acc("self", a) for a in SEEN if ("self", a) in s.index) or "too few readable images"))
    return out


def probe_seen(feats, cv: int, model: str, jobs: int) -> pd.DataFrame:
    """Probe the oracle's reading of position and size (self-attention and the shape word), on the images
    where it found an object, keeping the classes seen in at least ``cv`` prompts."""
    y = feats.y
    parts = []
    for col in SEEN:
        ok = (y["seen_found"].astype(str) == "True") & (y[col].astype(str) != "")
        per_class = pd.Series(feats.groups[ok.to_numpy()]).groupby(y.loc[ok, col].astype(str).to_numpy()).nunique()
        ok &= y[col].astype(str).isin(per_class[per_class >= cv].index)
        if y.loc[ok, col].nunique() < 2:
            print(f"skipping {col}: fewer than 2 classes readable in enough prompts")
            continue
        parts.append(attnlens.probe(feats.select(ok.to_numpy()), col, feature=["shape_word", "self"], cv=cv,
                                    model=model, n_jobs=jobs))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded Shapes model)")
    ap.add_argument("--quick", action="store_true", help="a small slice: 60 prompts x 2 seeds, 3 steps, 3 folds")
    ap.add_argument("--prompts", type=int, default=480)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="denoising steps of each generation")
    ap.add_argument("--probe-steps", type=int, nargs="+", default=[0, 6, 12, 18, 24])
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--model-kind", default="logreg", choices=["logreg", "mlp"])
    ap.add_argument("--jobs", type=int, default=1, help="parallel probe fits (joblib processes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features-dir", type=Path, default=None,
                    help="keep (and resume) the shard directory here (default: a temp dir, removed after)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.seeds, args.probe_steps, args.cv = 60, 2, [0, 12, 24], 3
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    stem = "probing_study_quick" if args.quick else "probing_study"

    pipe = attnlens.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    scenes = balanced_scenes(args.prompts, seed=SCENE_SEED)
    tmp = args.features_dir or Path(tempfile.mkdtemp(prefix="probing_study_")) / "feats"
    t0 = time.perf_counter()
    try:
        feats = attnlens.collect(pipe, scenes, words=WORDS, seeds=args.seeds, out=tmp, image_labels=seen,
                                 sites=Selector(kind=None, steps=args.probe_steps), num_inference_steps=args.steps,
                                 batch_size=20, shard_size=60)
        collect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        df = attnlens.probe(feats, ATTRS, cv=args.cv, model=args.model_kind, n_jobs=args.jobs, progress=True)
        df = pd.concat([df, probe_seen(feats, args.cv, args.model_kind, args.jobs)], ignore_index=True)
        probe_s = time.perf_counter() - t0
        y = feats.y
    finally:
        if args.features_dir is None:
            shutil.rmtree(tmp.parent, ignore_errors=True)

    followed = {a: float((y[a].astype(str) == y[f"seen_{a}"].astype(str)).mean()) for a in ATTRS}
    summary = summarise(df)
    results.mkdir(parents=True, exist_ok=True)
    df.to_csv(results / f"{stem}.csv", index=False)
    summary.to_csv(results / f"{stem}_summary.csv", index=False, float_format="%.4f")
    meta = {"model": str(args.model or os.environ.get("ATTNLENS_MODEL") or "embedded Shapes model"),
            "generations": len(y), "prompts": args.prompts, "scene_seed": SCENE_SEED, "seeds": args.seeds, "steps": args.steps,
            "probe_steps": args.probe_steps, "cv": args.cv, "probe": args.model_kind,
            "collect_seconds": round(collect_s, 1), "probe_seconds": round(probe_s, 1),
            "oracle_found": float(y["seen_found"].astype(str).isin(["True", "true", "1"]).mean()),
            "prompt_followed": followed, "claims": claims(summary)}
    (results / f"{stem}.json").write_text(json.dumps(meta, indent=1, default=str))

    pd.set_option("display.width", 200)
    print(f"\n{len(y)} generations ({args.prompts} prompts x {args.seeds} seeds), collect {collect_s:.0f} s, "
          f"probes {probe_s:.0f} s")
    print("the model drew what was asked (oracle): " + ", ".join(f"{a} {v:.0%}" for a, v in followed.items()))
    show = summary[["feature", "attribute", "best_site", "best_accuracy", "ci_low", "ci_high", "median_accuracy",
                    "chance", "control", "selectivity", "decodes"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nthe paper's statements:")
    for claim, v, evidence in meta["claims"]:
        print(f"  [{v}] {claim}\n      {evidence}")
    print(f"\nwrote {results / stem}.csv, {stem}_summary.csv, {stem}.json")


if __name__ == "__main__":
    main()
