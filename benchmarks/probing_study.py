"""The probing study (issues 5, 20): what do attention maps of the Shapes model carry, and can the paper's
claims about them fail here?

The study's recipe (the prompt list, ``WORDS``, ``FEATURES``, the oracle's labels, ``CONTROL_BY``, the text-only
baseline, ``CLAIMS`` and the verdict rules) is :mod:`attnlens.shapes.probestudy`, in the package, so the book's
chapter re-runs a slice of it from a plain ``pip install``; this script collects, analyses and records.

Liu et al. (CVPR 2024) report that a probe on a token's cross-attention map tells the object's category
and colour, and one on self-attention maps mostly cannot (self-attention carries layout). Here, on the
Shapes model, for each attribute (shape, colour, size, position, background) and each feature

* ``shape_word``: the cross-attention map of the prompt's shape word ("star"),
* ``colour_word``: the map of its colour word ("red"),
* ``end``: the map of the end token,
* ``self``: the self-attention summary (queries and keys pooled to 4x4, see attnlens._collect),

a probe is fitted at every attention layer at 5 steps of the 25-step schedule. Three things keep the
study from saying "yes" by construction:

* **Control tasks** (Hewitt and Liang): besides the permutation baseline, every probe is refitted on a
  fixed random label per *input type* (``CONTROL_BY``: the word a word feature reads; the seed, i.e. the
  start noise, for ``end`` and ``self``, whose inputs carry no word type), and ``selectivity`` is accuracy
  minus that control.
* **Held-out sites**: the prompts are split in two halves (``SPLIT_SEED``). The heat-map table
  (``probing_study.csv``) is the *selection* half; a best site is chosen there, per step and over the
  image steps (every probe step but the first), and its accuracy is measured on the *evaluation* half only
  (``cv_eval`` prompt-grouped folds), with the logistic probe and the paper's 2-layer MLP.
* **Baselines that locate the information**: ``text_only`` probes the text encoder's output at the same
  token (no image, the same folds), and step 0 is kept apart: at the first step every query comes from
  the start noise, so a map's dependence on the prompt at the first cross-attention layer is the keys'
  (the text encoder's) alone, and the layers after it see no image yet either.

``CLAIMS`` states each of the paper's claims as a difference with a threshold, fixed before the run,
and the direction that would contradict it; :func:`claim_verdict` says agrees / disagrees / inconclusive from
the difference's 95% interval over paired folds. The JSON carries them as ``"claims"``: a list of
``{"claim", "test", "threshold", "verdict", "interval", "difference", "per_probe": {probe: {...}}}``
(``verdict`` is the probes' common verdict, "inconclusive" where the two probes differ).

Prompts: canonical descriptions of Shapes scenes ("a large red star on the left on a black background"),
each attribute balanced over the prompts, in random combinations; 360 prompts x 4 seeds (1440
generations: about 500 s of collection on 2 idle cores, from the 0.34 s per generation the previous
960-generation record took). The oracle reads
every generated image, so the table also says how often the model drew what was asked, and the layout
claims use what it read (``seen_position``, ``seen_size``).

Writes benchmarks/results/probing_study.csv (selection half: one row per feature, site and attribute, plus
the text-only rows at site ``text_encoder``), probing_study_summary.csv (held-out rows: per feature,
attribute and step group, with the chosen site) and probing_study.json (settings, timings, claims; _quick
files with --quick), and prints the claims.

    python -m benchmarks.probing_study                              # the embedded model
    python -m benchmarks.probing_study --model runs/draft-shapes --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import attnlens
from attnlens import Selector
from attnlens._probing import _control_labels, _control_types, _splits, fold_scores, t_interval
# The recipe (prompts, words, features, labels, control tasks, text-only baseline, claims) lives in the package, so
# the book's chapter 5 runs from a pip install; this script collects, analyses and records the study with it.
from attnlens.shapes.probestudy import (ATTRS, CLAIMS, CONTROL_BY, FEATURES, SCENE_SEED, SEEN, SPLIT_SEED, TEXT,
                                        WORDS, balanced_scenes, claim_verdict, seen, text_only, verdict)

__all__ = ["ATTRS", "CLAIMS", "CONTROL_BY", "FEATURES", "SCENE_SEED", "SEEN", "SPLIT_SEED", "TEXT", "WORDS",
           "balanced_scenes", "claim_verdict", "seen", "text_only", "verdict", "PROBES", "halves", "readable",
           "probe_all", "step_groups", "choose_sites", "held_out", "assess", "step0_lesson", "run_study",
           "write_results", "main"]

PROBES = ("logreg", "mlp")


def halves(feats: attnlens.Features, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks of the selection and evaluation halves (whole prompts, half of them each)."""
    groups = np.unique(feats.groups)
    pick = np.random.default_rng(seed).permutation(groups)[: len(groups) // 2]
    sel = np.isin(feats.groups, pick)
    return sel, ~sel


def readable(feats: attnlens.Features, col: str, cv: int) -> np.ndarray | None:
    """Rows where the oracle found an object and ``col`` has a class seen in at least ``cv`` prompts (None: < 2 classes)."""
    y = feats.y
    ok = (y["seen_found"].astype(str) == "True") & (y[col].astype(str) != "")
    per_class = pd.Series(feats.groups[ok.to_numpy()]).groupby(y.loc[ok, col].astype(str).to_numpy()).nunique()
    ok &= y[col].astype(str).isin(per_class[per_class >= cv].index)
    return ok.to_numpy() if y.loc[ok, col].nunique() >= 2 else None


def probe_all(feats: attnlens.Features, text: attnlens.Features | None, cv: int, model: str, attrs=ATTRS,
              seen_attrs=SEEN, progress: bool = False) -> pd.DataFrame:
    """Every feature at every site (and the text-only rows), every attribute; the layout columns the oracle
    read on the shape word and self-attention, on readable images. Each feature with its own control task."""
    parts = []
    attrs = [a for a in attrs if a in feats.labels and feats.y[a].nunique() > 1]
    seen_attrs = [a for a in seen_attrs if a in feats.labels and "seen_found" in feats.labels]
    for f in [f for f in FEATURES if f in feats.features]:
        parts.append(attnlens.probe(feats, attrs, feature=f, cv=cv, model=model, control_by=CONTROL_BY[f],
                                    progress=progress))
        if text is not None and f in text.features:
            parts.append(attnlens.probe(text, attrs, feature=f, cv=cv, model=model, control_by=CONTROL_BY[f]))
    for col in seen_attrs:
        ok = readable(feats, col, cv)
        if ok is None:
            print(f"skipping {col}: fewer than 2 classes readable in enough prompts")
            continue
        for f in [f for f in ("shape_word", "self") if f in feats.features]:
            parts.append(attnlens.probe(feats.select(ok), col, feature=f, cv=cv, model=model,
                                        control_by=CONTROL_BY[f]))
            if text is not None and f in text.features:
                parts.append(attnlens.probe(text.select(ok), col, feature=f, cv=cv, model=model,
                                            control_by=CONTROL_BY[f]))
    return pd.concat(parts, ignore_index=True)


def step_groups(steps: list[int]) -> dict[str, list[int]]:
    """``{"0": [0], "6": [6], ..., "image": [6, 12, ...]}``: each probe step apart, and the image steps together."""
    steps = sorted(int(s) for s in steps)
    out = {str(s): [s] for s in steps}
    if len(steps) > 1:
        out["image"] = steps[1:]
    return out


def choose_sites(selection: pd.DataFrame, steps: list[int]) -> pd.DataFrame:
    """The best site of each (feature, attribute, step group) on the selection half."""
    rows = []
    maps = selection[selection["layer"] != TEXT]
    for (f, a), part in maps.groupby(["feature", "attribute"], sort=False):
        for g, members in step_groups(steps).items():
            sub = part[part["step"].isin(members)]
            if sub.empty:
                continue
            best = sub.loc[sub["accuracy"].idxmax()]
            rows.append({"feature": f, "attribute": a, "steps": g, "layer": best.layer, "step": int(best.step),
                         "site": best.site, "selection_accuracy": best.accuracy, "selection_median": sub["accuracy"].median()})
    for (f, a), part in selection[selection["layer"] == TEXT].groupby(["feature", "attribute"], sort=False):
        rows.append({"feature": f, "attribute": a, "steps": "text", "layer": TEXT, "step": 0, "site": TEXT,
                     "selection_accuracy": part["accuracy"].iloc[0], "selection_median": part["accuracy"].iloc[0]})
    return pd.DataFrame(rows)


def held_out(evaluation: attnlens.Features, text: attnlens.Features | None, chosen: pd.DataFrame, cv: int,
             models=PROBES, seed: int = 0, mlp_for=None) -> tuple[pd.DataFrame, dict]:
    """Accuracy of each chosen site on the evaluation half: one row per chosen site and probe, with its
    permutation baseline, control task and selectivity, and ``{(feature, steps, attribute, probe): per-fold
    accuracies}`` for paired comparisons (every feature of one attribute uses the same folds).

    ``mlp_for``: optional predicate ``(feature, steps, attribute) -> bool`` limiting the (slow) MLP rows."""
    rows, folds = [], {}
    cache: dict = {}
    for _, c in chosen.iterrows():
        a = c.attribute
        if a not in cache:
            ok = readable(evaluation, a, cv) if a.startswith("seen_") else np.ones(len(evaluation), bool)
            if ok is None:
                cache[a] = None
                continue
            sub = evaluation.select(ok)
            y = sub.y[a].astype(str).to_numpy()
            splits = _splits(y, sub.groups, None, cv, seed, a, "prompt")
            cache[a] = (ok, sub, y, splits)
        if cache[a] is None:
            continue
        ok, sub, y, splits = cache[a]
        if c.layer == TEXT and text is None:
            continue
        source = text.select(ok) if c.layer == TEXT else sub
        X = source[c.feature, c.layer, c.step if c.layer != TEXT else 0]
        _, types = _control_types(sub, CONTROL_BY[c.feature])
        typed = _control_labels(y, types, seed, 0)
        shuffled = np.random.default_rng([seed, 1]).permutation(y)
        for m in models:
            if m != "logreg" and mlp_for is not None and not mlp_for(c.feature, c.steps, a):
                continue
            scores = fold_scores(X, [y, shuffled, typed], splits, m, seed)
            mean, low, high = t_interval(scores[0])
            folds[(c.feature, c.steps, a, m)] = scores[0]
            rows.append({"feature": c.feature, "attribute": a, "steps": c.steps, "site": c.site, "probe": m,
                         "accuracy": mean, "ci_low": max(0.0, low), "ci_high": min(1.0, high),
                         "chance": float(pd.Series(y).value_counts(normalize=True).max()),
                         "permutation": float(scores[1].mean()), "control": float(scores[2].mean()),
                         "selectivity": mean - float(scores[2].mean()), "control_by": CONTROL_BY[c.feature],
                         "selection_accuracy": c.selection_accuracy, "n": len(y), "folds": len(splits)})
    return pd.DataFrame(rows), folds


def assess(folds: dict, claims=CLAIMS, models=PROBES) -> list[dict]:
    """Each claim's difference, its interval over paired folds and verdict, per probe and combined."""
    out = []
    for cl in claims:
        per = {}
        for m in models:
            fa = folds.get((*cl["a"], cl["attribute"], m))
            fb = folds.get((*cl["b"], cl["attribute"], m)) if cl["b"] else 0.0
            if fa is None or fb is None:
                continue
            diff, low, high = t_interval(np.asarray(fa) - fb)
            per[m] = {"difference": diff, "interval": [low, high], "verdict": claim_verdict(low, high, cl["threshold"])}
        verdicts = {p["verdict"] for p in per.values()}
        combined = "untested" if not per else (verdicts.pop() if len(verdicts) == 1 else "inconclusive")
        main = per.get("logreg") or next(iter(per.values()), {"difference": float("nan"), "interval": [np.nan, np.nan]})
        out.append({"id": cl["id"], "claim": cl["claim"], "test": cl["test"],
                    "contradicted_by": f"the interval of the difference entirely below {cl['threshold']}",
                    "threshold": cl["threshold"], "verdict": combined, "difference": main["difference"],
                    "interval": main["interval"], "per_probe": per})
    return out


def step0_lesson(folds: dict, models=PROBES) -> list[dict]:
    """The shape word's map at step 0 against the image steps and the text-only probe, per attribute."""
    out = []
    for a in ATTRS:
        for m in models:
            got = {g: folds.get(("shape_word", g, a, m)) for g in ("0", "image", "text")}
            if any(v is None for v in got.values()):
                continue
            out.append({"attribute": a, "probe": m, **{f"{g}_accuracy": float(np.mean(v)) for g, v in got.items()},
                        "step0_minus_text": t_interval(got["0"] - got["text"])[1:],
                        "image_minus_text": t_interval(got["image"] - got["text"])[1:]})
    return out


def run_study(feats: attnlens.Features, text: attnlens.Features | None, steps: list[int], cv: int, cv_eval: int,
              models=PROBES, progress: bool = False) -> dict:
    """The whole analysis on collected features: selection-half table, chosen sites, held-out rows, claims."""
    sel_mask, eval_mask = halves(feats)
    sel_text = text.select(sel_mask) if text is not None else None
    eval_text = text.select(eval_mask) if text is not None else None
    table = probe_all(feats.select(sel_mask), sel_text, cv, "logreg", progress=progress)
    chosen = choose_sites(table, steps)
    claimed = {(*c["a"], c["attribute"]) for c in CLAIMS} | {(*c["b"], c["attribute"]) for c in CLAIMS if c["b"]}
    lesson = {("shape_word", g, a) for g in ("0", "image", "text") for a in ATTRS}
    held, folds = held_out(feats.select(eval_mask), eval_text, chosen, cv_eval, models,
                           mlp_for=lambda f, g, a: (f, g, a) in claimed | lesson)
    return {"table": table, "chosen": chosen, "held_out": held, "claims": assess(folds, models=models),
            "step0": step0_lesson(folds, models), "n_selection": int(sel_mask.sum()), "n_evaluation": int(eval_mask.sum())}


def write_results(out: dict, y: pd.DataFrame, settings: dict, results: Path, stem: str) -> tuple[pd.DataFrame, dict]:
    """Write ``{stem}.csv`` (the selection-half table), ``{stem}_summary.csv`` (held-out rows) and ``{stem}.json``
    (``settings``, the split, the oracle's reading, the claims and the first-step comparison)."""
    followed = {a: float((y[a].astype(str) == y[f"seen_{a}"].astype(str)).mean()) for a in ATTRS
                if a in y and f"seen_{a}" in y}
    results.mkdir(parents=True, exist_ok=True)
    out["table"].to_csv(results / f"{stem}.csv", index=False)
    summary = out["held_out"].merge(out["chosen"][["feature", "attribute", "steps", "selection_median"]],
                                    on=["feature", "attribute", "steps"], how="left")
    summary.to_csv(results / f"{stem}_summary.csv", index=False, float_format="%.4f")
    meta = {**settings, "generations": len(y), "scene_seed": SCENE_SEED, "split_seed": SPLIT_SEED,
            "probe": "logreg", "probes": list(PROBES), "control_by": CONTROL_BY,
            "selection_generations": out["n_selection"], "evaluation_generations": out["n_evaluation"],
            "oracle_found": float(y["seen_found"].astype(str).isin(["True", "true", "1"]).mean()) if "seen_found" in y
            else float("nan"),
            "prompt_followed": followed, "claims": out["claims"], "step0": out["step0"]}
    (results / f"{stem}.json").write_text(json.dumps(meta, indent=1, default=float))
    return summary, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded Shapes model)")
    ap.add_argument("--quick", action="store_true", help="a small slice: 120 prompts x 2 seeds, 3 steps, 3 folds")
    ap.add_argument("--prompts", type=int, default=360)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="denoising steps of each generation")
    ap.add_argument("--probe-steps", type=int, nargs="+", default=[0, 6, 12, 18, 24])
    ap.add_argument("--cv", type=int, default=5, help="folds of the selection-half table")
    ap.add_argument("--cv-eval", type=int, default=10, help="folds of the held-out evaluation (paired across features)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features-dir", type=Path, default=None,
                    help="keep (and resume) the shard directory here (default: a temp dir, removed after)")
    ap.add_argument("--loaded", action="store_true", help="record that the timings were measured on a loaded machine")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.seeds, args.probe_steps, args.cv, args.cv_eval = 120, 2, [0, 12, 24], 3, 5
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
        text = text_only(pipe, feats)
        out = run_study(feats, text, args.probe_steps, args.cv, args.cv_eval, progress=True)
        probe_s = time.perf_counter() - t0
        y = feats.y
    finally:
        if args.features_dir is None:
            shutil.rmtree(tmp.parent, ignore_errors=True)

    from attnlens._identity import fingerprint
    from attnlens._pipeline import EMBEDDED_MODEL

    settings = {"model": str(args.model or os.environ.get("ATTNLENS_MODEL") or "embedded Shapes model"),
                # the verdicts hold for these weights only (the model card shows them when they match)
                "model_fingerprint": fingerprint(args.model or os.environ.get("ATTNLENS_MODEL") or EMBEDDED_MODEL),
                "command": " ".join(["python -m benchmarks.probing_study", *sys.argv[1:]]),
                "prompts": args.prompts, "seeds": args.seeds, "steps": args.steps, "probe_steps": args.probe_steps,
                "cv": args.cv, "cv_eval": args.cv_eval, "collect_seconds": round(collect_s, 1),
                "probe_seconds": round(probe_s, 1), "threads": args.threads,
                "timing_note": ("measured on a loaded shared machine (other jobs on both cores): not the idle-machine "
                                "budget" if args.loaded else "measured on an otherwise idle machine")}
    summary, meta = write_results(out, y, settings, results, stem)

    pd.set_option("display.width", 200)
    print(f"\n{len(y)} generations ({args.prompts} prompts x {args.seeds} seeds), collect {collect_s:.0f} s, "
          f"probes {probe_s:.0f} s")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nthe paper's claims:")
    for c in out["claims"]:
        lo, hi = c["interval"]
        print(f"  [{c['verdict']}] {c['claim']}\n      {c['test']}: {c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"vs threshold {c['threshold']}; " + ", ".join(f"{m} {p['verdict']}" for m, p in c["per_probe"].items()))
    print(f"\nwrote {results / stem}.csv, {stem}_summary.csv, {stem}.json")


if __name__ == "__main__":
    main()
