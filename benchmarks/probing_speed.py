"""Cost of probing: collect cross-attention features of 1,000 generations, then fit a probe at every site.

Targets (issue 5), on the Shapes model with 2 CPU cores: collection <= 10 minutes, probes <= 2 minutes.
The generations are random Shapes scenes (250 prompts, the shapes in turn, x 4 seeds, 25 DDIM steps, guidance 7.5); the
feature is the shape word's cross-attention map at every cross-attention layer and every step (a site is
one layer at one step), streamed to a shard directory. The probes are the default ones (standardise +
logistic regression, 5 prompt-grouped folds, with the shuffled-label control) decoding the shape.
Writes benchmarks/results/probing_speed.json (probing_speed_quick.json with --quick).

    python -m benchmarks.probing_speed                  # the embedded model ($ATTNLENS_MODEL or attnlens/models/shapes)
    python -m benchmarks.probing_speed --model runs/draft-shapes --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attnlens
from attnlens import shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded Shapes model)")
    ap.add_argument("--quick", action="store_true", help="a small slice: 48 generations, probes on every site")
    ap.add_argument("--prompts", type=int, default=250)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=10, help="prompts per pipeline call (memory grows with it)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is for 2 CPU cores)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel probe fits (joblib processes; 2 cores)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the shard directory here (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.seeds = 24, 2
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    out_json = results / ("probing_speed_quick.json" if args.quick else "probing_speed.json")

    t0 = time.perf_counter()
    pipe = attnlens.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(2024)
    shape_cycle = shapes.SHAPES * (args.prompts // len(shapes.SHAPES) + 1)  # every shape in several prompts
    scenes = [shapes.sample_scene(rng, shape=shape_cycle[i]) for i in range(args.prompts)]
    n = args.prompts * args.seeds

    tmp = Path(tempfile.mkdtemp(prefix="probing_speed_")) if args.keep is None else args.keep
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        feats = attnlens.collect(pipe, scenes, words={"shape_word": "{shape}"}, seeds=args.seeds, out=tmp / "feats",
                                 num_inference_steps=args.steps, batch_size=args.batch, shard_size=100)
        collect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        df = attnlens.probe(feats, "shape", n_jobs=args.jobs, progress=True)
        probe_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (tmp / "feats").rglob("*") if p.is_file())
        dims = sorted({int(feats[k].shape[1]) for k in feats.keys()[:: args.steps]})
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    sites = df["site"].nunique()
    result = {
        "model": str(args.model or os.environ.get("ATTNLENS_MODEL") or "embedded Shapes model"),
        "quick": args.quick, "generations": n, "prompts": args.prompts, "seeds": args.seeds, "steps": args.steps,
        "batch": args.batch, "torch_threads": args.threads, "probe_jobs": args.jobs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_seconds": round(load_s, 2),
        "collect_seconds": round(collect_s, 2),
        "seconds_per_generation": round(collect_s / n, 4),
        "collect_1000_extrapolated_seconds": round(collect_s / n * 1000, 1),
        "sites": sites, "feature_dims": dims,
        "shard_bytes": disk,
        "probe_seconds": round(probe_s, 2),
        "probe_fits": int(len(df) * df["folds"].iloc[0] * 2),
        "best_site": df.loc[df["accuracy"].idxmax(), ["site", "accuracy", "control"]].to_dict(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets_seconds": {"collect_1000": 600, "probe_every_site": 120},
        "load_average_1min_before": load_before,
    }
    print(f"collect  {n} generations  {collect_s:8.1f} s  ({collect_s / n:.3f} s each; 1000 -> "
          f"{collect_s / n * 1000:.0f} s, target 600 s)")
    print(f"probe    {sites} sites x 5 folds x (probe + control)  {probe_s:8.1f} s  (target 120 s"
          f"{'' if not args.quick else '; n is smaller in --quick'})")
    print(f"best site {result['best_site']}; peak RSS {result['peak_rss_mib']} MiB; shards {disk / 2**20:.1f} MiB")
    results.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
