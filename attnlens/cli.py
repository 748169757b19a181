"""The ``attnlens`` command.

    attnlens layers [MODEL]
    attnlens capture --prompt "a red star" --word star --seed 0 --out heatmap.png
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
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except AttnlensError as exc:
        print(f"attnlens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
