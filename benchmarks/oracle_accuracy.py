"""Benchmark the Shapes oracle: per-attribute accuracy on held-out renders, and its fit time.

Reads 2,000 renders of a seed distinct from the classifier's fit seed and the tests' seeds, both
as rendered ("clean") and after a VAE-like degradation ("vae-like": gaussian blur sigma 0.8,
a per-channel colour shift of sd 5 and pixel noise of sd 3). Prints a table and writes
``benchmarks/results/oracle_accuracy.json``.

Usage::

    python -m benchmarks.oracle_accuracy [--n 2000] [--seed 31337]

Example (a quick run that writes elsewhere):
    >>> import subprocess, sys  # doctest: +SKIP
    >>> subprocess.run([sys.executable, "-m", "benchmarks.oracle_accuracy", "--n", "50",
    ...                 "--out", "/tmp/oracle.json"], check=True)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from attnlens.shapes import ATTRIBUTES, iter_scenes, render
from attnlens.shapes import oracle

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SEED = 31_337
DEFAULT_N = 2_000


def vae_like(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 0.8), shift each channel a little and add a little pixel noise."""
    out = ndimage.gaussian_filter(image.astype(np.float64), sigma=(0.8, 0.8, 0))
    out += rng.normal(0.0, 5.0, size=3) + rng.normal(0.0, 3.0, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def evaluate(scenes: list, images: list[np.ndarray]) -> dict:
    """Accuracy per attribute, overall (all five right), per size for shape, and read speed."""
    t0 = time.perf_counter()
    readings = oracle.read_many(images)
    seconds = time.perf_counter() - t0
    keys = tuple(ATTRIBUTES)
    hits = {k: 0 for k in keys}
    all_ok = not_found = 0
    by_size: dict[str, list[int]] = {}
    confusions: dict[str, int] = {}
    for scene, r in zip(scenes, readings):
        not_found += not r.found
        ok = True
        for k in keys:
            good = r.found and r.attributes[k] == getattr(scene, k)
            hits[k] += good
            ok &= good
            if not good:
                wrong = f"{k}: {getattr(scene, k)} -> {r.attributes.get(k, 'not found')}"
                confusions[wrong] = confusions.get(wrong, 0) + 1
        shape_ok = r.found and r.attributes["shape"] == scene.shape
        by_size.setdefault(scene.size, [0, 0])
        by_size[scene.size][0] += shape_ok
        by_size[scene.size][1] += 1
        all_ok += ok
    n = len(scenes)
    return {
        "accuracy": {k: hits[k] / n for k in keys},
        "all_attributes": all_ok / n,
        "not_found": not_found,
        "shape_accuracy_by_size": {s: h / c for s, (h, c) in sorted(by_size.items())},
        "errors": dict(sorted(confusions.items(), key=lambda kv: -kv[1])),
        "ms_per_read": 1e3 * seconds / n,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="held-out renders (default 2000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the held-out renders")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "oracle_accuracy.json")
    args = parser.parse_args(argv)
    if args.seed == oracle.FIT_SEED:
        parser.error(f"--seed must differ from the classifier's fit seed {oracle.FIT_SEED}")

    t0 = time.perf_counter()
    import sklearn.linear_model  # noqa: F401  (timed apart from the fit)
    import_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    oracle._classifier()  # the first-use fit, as read() would trigger it
    fit_seconds = time.perf_counter() - t0

    scenes = list(iter_scenes(args.n, seed=args.seed))
    clean = [render(s)[0] for s in scenes]
    rng = np.random.default_rng([args.seed, 1])
    degraded = [vae_like(image, rng) for image in clean]
    results = {name: evaluate(scenes, images) for name, images in (("clean", clean), ("vae_like", degraded))}

    import sklearn

    report = {
        "n": args.n,
        "seed": args.seed,
        "fit_seed": oracle.FIT_SEED,
        "fit_samples": oracle.FIT_SAMPLES,
        "fit_seconds": round(fit_seconds, 3),
        "sklearn_import_seconds": round(import_seconds, 3),
        "conditions": results,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "sklearn": sklearn.__version__},
        "command": " ".join(["python -m benchmarks.oracle_accuracy", *(argv if argv is not None else sys.argv[1:])]),
    }

    keys = tuple(ATTRIBUTES)
    print(f"oracle accuracy on {args.n} held-out renders (seed {args.seed})")
    print(f"{'condition':<10}" + "".join(f"{k:>12}" for k in keys) + f"{'all five':>12}{'ms/read':>10}")
    for name, res in results.items():
        print(f"{name:<10}" + "".join(f"{res['accuracy'][k]:>12.4f}" for k in keys)
              + f"{res['all_attributes']:>12.4f}{res['ms_per_read']:>10.2f}")
    for name, res in results.items():
        sizes = ", ".join(f"{s} {a:.4f}" for s, a in res["shape_accuracy_by_size"].items())
        print(f"{name}: shape accuracy by size: {sizes}; errors: {res['errors'] or 'none'}")
    print(f"shape classifier fit: {fit_seconds:.2f} s on {oracle.FIT_SAMPLES} renders "
          f"(+ {import_seconds:.2f} s importing scikit-learn)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
