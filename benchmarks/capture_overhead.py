"""Cost of capture: plain generation vs capturing every cross-attention map vs self-attention at reduced storage.

Runs the three in one process, interleaved over --repeats rounds, and reports median wall time, the
ratios to plain generation and the peak RSS of the process. Target: cross-attention capture at most
1.15x plain generation. Writes benchmarks/results/capture_overhead.json.

    python benchmarks/capture_overhead.py                 # embedded model if present, else the tiny test pipeline
    python benchmarks/capture_overhead.py --model PATH    # any local diffusers folder or hub id
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import attnlens
from attnlens._pipeline import EMBEDDED_MODEL
from attnlens._testing import tiny_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_overhead.json")
    args = ap.parse_args()
    if args.model or (EMBEDDED_MODEL / "model_index.json").exists():
        pipe, name = attnlens.load_pipeline(args.model), str(args.model or "embedded Shapes model")
    else:
        pipe, name = tiny_pipeline(), "tiny test pipeline (random weights; embedded model not present)"
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star on the left"] * args.batch

    def generate():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
             generator=torch.Generator(device=pipe.device).manual_seed(0))

    modes = {
        "plain": lambda: None,
        "cross, head mean, all steps": lambda: attnlens.capture(pipe),
        "self, reduced (mean over steps, 8x8)": lambda: attnlens.capture(pipe, kind="self", reduce="mean", store_resolution=8),
    }
    load_before = os.getloadavg()[0]  # other work on the machine skews the ratios: recorded beside them
    generate()  # warm-up
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, ctx in modes.items():
            t0 = time.perf_counter()
            c = ctx()
            if c is None:
                generate()
            else:
                with c:
                    generate()
            times[mode].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    result = {
        "model": name, "device": str(pipe.device), "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "seconds": {m: statistics.median(t) for m, t in times.items()},
        "ratio_to_plain": {m: statistics.median(t) / base for m, t in times.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target_cross_ratio": 1.15,
        "load_average_1min_before": load_before,
    }
    for m in modes:
        print(f"{m:40s} {result['seconds'][m]:8.3f} s   x{result['ratio_to_plain'][m]:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
