"""The ShapesEdit benchmark: every editing method on the fixed ShapesEdit pairs, scored by the oracle.

Writes to benchmarks/results/ (or --out):
  shapesedit.csv            one row per (track, method, pair) with every oracle reading and metric
  shapesedit_summary.csv    means by track x method x kind (and kind = all)
  shapesedit.json           settings, versions and timing
  shapesedit_examples.png   source and each method's edit for one pair per kind (generated track)

    python -m benchmarks.shapes_edit                  # 16 pairs per kind, both tracks, embedded model
    python -m benchmarks.shapes_edit --seeds 2 --track generated --out /tmp/se   # a quick slice
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

import attnlens
from attnlens.shapes import editbench

METHODS = ("fpe", "p2p", "cross", "masactrl", "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=16, help="pairs per kind on the generated track")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--under-load", action="store_true",
                    help="record that the timing was measured on a loaded machine (then it is not a speed figure)")
    ap.add_argument("--real-seeds", type=int, default=6, help="pairs per kind on the real-image track")
    ap.add_argument("--track", choices=["generated", "real", "both"], default="both")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = attnlens.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    examples: dict[tuple[str, int], dict] = {}

    def keep(row, result):
        if row["track"] == "generated" and row["seed"] == 0:
            ex = examples.setdefault((row["kind"], row["seed"]), {"prompt": row["target_prompt"]})
            ex["source"] = result.source
            ex[row["method"]] = result.edited

    t0 = time.perf_counter()
    frames = []
    if args.track in ("generated", "both"):
        frames.append(editbench.run(pipe, METHODS, args.seeds, real=False, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance, on_row=keep))
    if args.track in ("real", "both"):
        frames.append(editbench.run(pipe, METHODS, args.real_seeds, real=True, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance))
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(args.out / "shapesedit.csv", index=False)
    summary = editbench.summarise(df)
    summary.to_csv(args.out / "shapesedit_summary.csv", index=False)
    meta = {"version": editbench.VERSION, "model": str(args.model or os.environ.get("ATTNLENS_MODEL") or "embedded Shapes model"),
            "steps": args.steps, "guidance": args.guidance, "seeds": args.seeds, "real_seeds": args.real_seeds,
            "methods": list(METHODS), "edits": len(df), "seconds": time.perf_counter() - t0,
            "platform": platform.platform(), "threads": args.threads or None,
            "timing_note": ("measured under load (a shared 2-core machine with other jobs running): not a speed figure"
                            if args.under_load else "measured on an otherwise idle machine"),
            "command": f"python -m benchmarks.shapes_edit --seeds {args.seeds} --real-seeds {args.real_seeds} "
                       f"--track {args.track} --steps {args.steps} --guidance {args.guidance}"}
    (args.out / "shapesedit.json").write_text(json.dumps(meta, indent=1))
    if examples:
        cols = ["source", *METHODS]
        cell, pad = 96, 18
        sheet = Image.new("RGB", (cell * len(cols), (cell + pad) * len(examples) + pad), "white")
        draw = ImageDraw.Draw(sheet)
        for j, c in enumerate(cols):
            draw.text((j * cell + 4, 2), c, fill="black")
        for i, ((kind, _), ex) in enumerate(sorted(examples.items())):
            y = pad + i * (cell + pad)
            draw.text((4, y), f"{kind}: {ex['prompt']}"[:96], fill="black")
            for j, c in enumerate(cols):
                if c in ex:
                    sheet.paste(ex[c].resize((cell - 4, cell - 4), Image.NEAREST), (j * cell + 2, y + pad // 2 + 2))
        sheet.save(args.out / "shapesedit_examples.png")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"wrote {args.out}/shapesedit*.csv/json/png in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
