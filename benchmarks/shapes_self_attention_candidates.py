"""Collect issue 17's candidate-recipe table from short training runs and their self-attention benchmarks.

Each run is a ``train unet`` workdir that holds the benchmark's record of an exported checkpoint
(``python -m benchmarks.shapes_self_attention --quick --model DIR/export_N --out DIR --name sa_N.json``).
One CSV row per (run, step): the recipe (its UNet fields that differ from the shipped defaults), seconds
per training step over the last logged 50-step window (under load when the records say so), and the
benchmark's figures: for the self-attention layers FPE edits at its default rule, zeroed together, the
mean pixel change and the oracle readings changed; the same two figures per level; and, where the edits
were run, how often ``none`` and ``fpe`` keep place and size and how often ``fpe`` lands the edit.

    python -m benchmarks.shapes_self_attention_candidates base=runs/base candA=runs/candA --step 150
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from tools.shapes_model.train import UNetConfig

ROOT = Path(__file__).resolve().parents[1]

RECIPE_FLAGS = {"block_out_channels": "--block-out-channels", "attention_heads": "--attention-heads",
                "layers_per_block": "--layers-per-block", "transformer_layers": "--transformer-layers",
                "attention_levels": "--attention-levels", "image_size": "--image-size"}


def sec_per_step(log: Path, step: int) -> float | None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"loss"' in line] if log.exists() else []
    at = {r["step"]: r["s"] for r in rows}
    if step in at and step - 50 in at:
        return round((at[step] - at[step - 50]) / 50, 2)
    return None


def row(label: str, run: Path, step: int) -> tuple[dict, dict]:
    rec = json.loads((run / f"sa_{step}.json").read_text())
    meta = json.loads((run / "unet.safetensors.json").read_text())["meta"]
    shipped = asdict(UNetConfig())
    recipe = {k: v for k, v in meta["config"].items() if k in RECIPE_FLAGS
              and (list(v) if isinstance(v, (list, tuple)) else v) != (list(shipped[k]) if isinstance(shipped[k], tuple) else shipped[k])}
    flags = " ".join(f"{RECIPE_FLAGS[k]} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in recipe.items())
    out = {"run": label, "recipe": flags or "shipped architecture (control)", "unet_step": rec["unet_step"],
           "sec_per_step": sec_per_step(run / "unet_log.jsonl", step),
           "timing": "under load" if "under load" in rec.get("timing_note", "") else "idle"}
    for r in rec["ablation"]:
        key = r["group"].replace(" ", "_")
        out[f"{key}_pixel_change"] = round(r["pixel_change"], 4)
        out[f"{key}_readings_changed"] = f"{r['readings_changed']}/{r['images']}"
    t = rec["targets"]
    if "free_structure" in t:
        out["none_kept"] = round(t["free_structure"]["kept"], 3)
        out["fpe_kept"] = round(t["fpe_keeps_structure"]["kept"], 3)
        out["fpe_success"] = round(t["fpe_keeps_structure"]["success"], 3)
        out["edit_pairs_with_source_object"] = f"{t['free_structure']['n']}/{t['free_structure']['pairs']}"
        # records before the shape-aware area rule judged a shape swap by the raw area ratio
        out["structure_rule"] = "shape-aware area" if "structure_rule" in rec["settings"] else "raw area"
    for name, d in (rec.get("diagnostics") or {}).items():
        out[f"{name}_kept"] = round(d["kept"], 3)
        out[f"{name}_success"] = round(d["success"], 3)
    out["weights"] = rec.get("weights") or "raw"  # the records before this field were all of raw weights
    return out, rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="label=workdir")
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    rows = []
    keep = args.out / "shapes_self_attention_candidates"
    keep.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        label, run = spec.split("=", 1)
        r, _ = row(label, Path(run), args.step)
        rows.append(r)
        shutil.copyfile(Path(run) / f"sa_{args.step}.json", keep / f"{label}_{args.step}.json")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path = args.out / "shapes_self_attention_candidates.csv"
    old = []
    if path.exists():  # rows of other (run, step) pairs stay
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if (r["run"], str(r["unet_step"])) not in {(x["run"], str(x["unet_step"])) for x in rows}]
    fields = list(dict.fromkeys([*(k for r in old for k in r), *fields]))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old + rows)
    print(path.read_text())


if __name__ == "__main__":
    main()
