"""The ``attnlens`` command.

    attnlens layers [MODEL]
    attnlens capture --prompt "a red star" --word star --seed 0 --out heatmap.png
    attnlens edit --source "a red star" --target "a blue star" --method fpe --seed 0 --out edits/
    attnlens edit --image photo.png --target "a blue star" --method fpe --out edits/
    attnlens shapesedit --methods fpe,p2p,cross,masactrl,none --seeds 12 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys

from ._errors import AttnlensError


def _layers(args) -> None:
    from ._layers import layers
    from ._pipeline import load_pipeline

    print(layers(load_pipeline(args.model, device=args.device)))


def _capture(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from ._capture import capture
    from ._pipeline import load_pipeline
    from .viz import overlay

    pipe = load_pipeline(args.model, device=args.device)
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    with capture(pipe) as cache:
        image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     generator=generator).images[0]
    heat = cache.word_map(args.word)
    overlay(image, heat).save(args.out)
    print(f"wrote {args.out}: '{args.word}' over the image of '{args.prompt}' (seed {args.seed})")


def _options(pairs: list[str]) -> dict:
    import json

    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise AttnlensError(f"--option takes NAME=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _edit(args) -> None:
    import json
    from pathlib import Path

    from ._editing import edit, edit_image
    from ._pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    opts = _options(args.option)
    if args.image:
        result = edit_image(pipe, args.image, args.target, args.source or "", method=args.method,
                            num_inference_steps=args.steps, guidance_scale=args.guidance, **opts)
    else:
        if not args.source:
            raise AttnlensError("attnlens edit needs --source PROMPT (or --image PATH for a real image)")
        result = edit(pipe, args.source, args.target, method=args.method, seed=args.seed,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, **opts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.source.save(out / "source.png")
    result.edited.save(out / "edited.png")
    (out / "settings.json").write_text(json.dumps(result.settings, indent=1, default=str))
    print(f"wrote {out}/source.png, edited.png, settings.json ({args.method}, {result.seconds:.1f} s)")


def _shapesedit(args) -> None:
    import json
    from pathlib import Path

    from ._pipeline import load_pipeline
    from .shapes import editbench

    pipe = load_pipeline(args.model, device=args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for real in ([False, True] if args.track == "both" else [args.track == "real"]):
        frames.append(editbench.run(pipe, methods, args.seeds, kinds, real=real, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance))
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    df.to_csv(out / "shapesedit.csv", index=False)
    summary = editbench.summarise(df)
    summary.to_csv(out / "shapesedit_summary.csv", index=False)
    (out / "shapesedit.json").write_text(json.dumps({"version": editbench.VERSION, "steps": args.steps,
                                                     "guidance": args.guidance, "seeds": args.seeds,
                                                     "methods": methods, "kinds": kinds}, indent=1))
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnlens", description="Look at attention in Stable Diffusion-family models.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("layers", help="list every attention layer of a model")
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: $ATTNLENS_MODEL or the embedded model)")
    p.set_defaults(run=_layers)
    p = sub.add_parser("capture", help="generate an image and overlay one word's cross-attention map")
    p.add_argument("--model", default=None, help="hub id or local folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--word", required=True, help="a word of the prompt, or <start>, <end>, <pad>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default="heatmap.png")
    p.set_defaults(run=_capture)
    p = sub.add_parser("edit", help="edit a generated (--source) or real (--image) image into --target")
    p.add_argument("--model", default=None, help="hub id or local folder")
    p.add_argument("--source", default=None, help="source prompt (for --image: the inversion prompt, default empty)")
    p.add_argument("--image", default=None, help="a real image to invert and edit instead of generating the source")
    p.add_argument("--target", required=True, help="target prompt")
    p.add_argument("--method", default="fpe", help="fpe, p2p, cross, masactrl or none (default fpe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a method option, e.g. --option max_resolution=16 --option steps=[0.0,0.6] (JSON values)")
    p.add_argument("--out", default="edits")
    p.set_defaults(run=_edit)
    p = sub.add_parser("shapesedit", help="run the ShapesEdit benchmark (oracle-scored edits on the Shapes world)")
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded Shapes model)")
    p.add_argument("--methods", default="fpe,p2p,cross,masactrl,none")
    p.add_argument("--kinds", default="colour,shape,size,background,position")
    p.add_argument("--seeds", type=int, default=12, help="pairs per kind")
    p.add_argument("--track", choices=["generated", "real", "both"], default="both")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default="benchmarks/results")
    p.set_defaults(run=_shapesedit)
    args = parser.parse_args(argv)
    try:
        from ._notebook import set_threads

        set_threads()  # $ATTNLENS_THREADS, or the cores minus one: a competing load slows it in proportion
        args.run(args)
    except AttnlensError as exc:
        print(f"attnlens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
