"""The ``attnlens`` command.

    attnlens layers [MODEL]
    attnlens capture --prompt "a red star" --word star --seed 0 --out heatmap.png
    attnlens edit --source "a red star" --target "a blue star" --method fpe --seed 0 --out edits/
    attnlens edit --image photo.png --target "a blue star" --method fpe --out edits/
    attnlens shapesedit --methods fpe,p2p,cross,masactrl,none --seeds 12 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ._errors import AttnlensError

# What a user can get wrong on the command line is checked here, before a model is loaded or an image
# generated, so a mistake costs no generation and never shows a traceback (main() turns AttnlensError,
# a file-system error and Ctrl-C into one line on stderr and exit status 2, 2 and 130).


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a whole number, not {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, not {value}")
        return value
    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance takes a number, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--guidance must be a finite number >= 0 (7.5 is usual), not {text}")
    return value


def _check_device(device: str | None) -> None:
    """A device the machine has: ``cpu``, ``cuda``/``cuda:N`` with CUDA, ``mps`` with Apple's backend."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise AttnlensError(f"--device {device!r} is not a device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AttnlensError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                                f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttnlensError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise AttnlensError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise AttnlensError(f"--device {device!r}: valid devices are cpu, cuda, cuda:N and mps")


def _image_out(path: str, option: str = "--out") -> Path:
    """An image file to write: its folder exists, it is not a folder, its extension is an image format."""
    from PIL import Image

    out = Path(path)
    if out.is_dir():
        raise AttnlensError(f"{option} {path} is a folder; give an image file name such as {out / 'heatmap.png'}")
    if not out.parent.is_dir():
        raise AttnlensError(f"{option} {path}: the folder {out.parent} does not exist (create it first)")
    Image.init()
    ext = out.suffix.lower()
    if ext not in Image.registered_extensions():
        raise AttnlensError(f"{option} {path}: {ext or 'no extension'} is not an image format PIL can write; "
                            f"use .png, .jpg or .webp")
    return out


def _folder_out(path: str, option: str = "--out") -> Path:
    """A folder to write into: it may exist (as a folder) or be created under an existing folder."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AttnlensError(f"{option} {path} is an existing file; {option} names a folder to write into")
    if not out.exists() and not out.parent.is_dir():
        raise AttnlensError(f"{option} {path}: its parent folder {out.parent} does not exist (create it first)")
    return out


def _image_in(path: str, option: str = "--image") -> Path:
    from PIL import Image, UnidentifiedImageError

    src = Path(path)
    if not src.exists():
        raise AttnlensError(f"{option} {path}: no such file")
    if src.is_dir():
        raise AttnlensError(f"{option} {path} is a folder; give an image file")
    try:
        with Image.open(src) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AttnlensError(f"{option} {path} is not an image PIL can read ({exc})") from None
    return src


def _layers(args) -> None:
    from ._layers import layers
    from ._pipeline import load_pipeline

    _check_device(args.device)
    print(layers(load_pipeline(args.model, device=args.device)))


def _capture(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from ._capture import capture
    from ._pipeline import load_pipeline
    from .viz import overlay

    out = _image_out(args.out)
    _check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    with capture(pipe) as cache:
        image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                     generator=generator).images[0]
    heat = cache.word_map(args.word)
    overlay(image, heat).save(out)
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

    from ._editing import edit, edit_image
    from ._methods import METHODS
    from ._pipeline import load_pipeline

    if args.method not in METHODS:
        raise AttnlensError(f"--method: unknown editing method {args.method!r}; valid: {', '.join(METHODS)}")
    opts = _options(args.option)
    if args.image:
        _image_in(args.image)
    elif not args.source:
        raise AttnlensError("attnlens edit needs --source PROMPT (or --image PATH for a real image)")
    out = _folder_out(args.out)
    _check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    if args.image:
        result = edit_image(pipe, args.image, args.target, args.source or "", method=args.method,
                            num_inference_steps=args.steps, guidance_scale=args.guidance, **opts)
    else:
        result = edit(pipe, args.source, args.target, method=args.method, seed=args.seed,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, **opts)
    out.mkdir(exist_ok=True)
    result.source.save(out / "source.png")
    result.edited.save(out / "edited.png")
    (out / "settings.json").write_text(json.dumps(result.settings, indent=1, default=str))
    print(f"wrote {out}/source.png, edited.png, settings.json ({args.method}, {result.seconds:.1f} s)")


def _shapesedit(args) -> None:
    import json

    from ._pipeline import load_pipeline
    from .shapes import editbench

    from ._methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AttnlensError(f"--methods {args.methods!r}: {', '.join(bad) or 'no method'} "
                            f"is not an editing method; valid: {', '.join(METHODS)}")
    bad = [k for k in kinds if k not in editbench.KINDS]
    if bad or not kinds:
        raise AttnlensError(f"--kinds {args.kinds!r}: {', '.join(bad) or 'no kind'} "
                            f"is not a kind of edit; valid: {', '.join(editbench.KINDS)}")
    out = _folder_out(args.out)
    _check_device(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    out.mkdir(exist_ok=True)
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
    p.add_argument("--steps", type=_positive_int("--steps"), default=25)
    p.add_argument("--guidance", type=_guidance, default=7.5)
    p.add_argument("--out", default="heatmap.png", help="the image to write (its folder must exist)")
    p.set_defaults(run=_capture)
    p = sub.add_parser("edit", help="edit a generated (--source) or real (--image) image into --target")
    p.add_argument("--model", default=None, help="hub id or local folder")
    p.add_argument("--source", default=None, help="source prompt (for --image: the inversion prompt, default empty)")
    p.add_argument("--image", default=None, help="a real image to invert and edit instead of generating the source")
    p.add_argument("--target", required=True, help="target prompt")
    p.add_argument("--method", default="fpe", help="fpe, p2p, cross, masactrl or none (default fpe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int("--steps"), default=50)
    p.add_argument("--guidance", type=_guidance, default=7.5)
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a method option, e.g. --option max_resolution=16 --option steps=[0.0,0.6] (JSON values)")
    p.add_argument("--out", default="edits")
    p.set_defaults(run=_edit)
    p = sub.add_parser("shapesedit", help="run the ShapesEdit benchmark (oracle-scored edits on the Shapes world)")
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded Shapes model)")
    p.add_argument("--methods", default="fpe,p2p,cross,masactrl,none")
    p.add_argument("--kinds", default="colour,shape,size,background,position")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=12, help="pairs per kind")
    p.add_argument("--track", choices=["generated", "real", "both"], default="both")
    p.add_argument("--steps", type=_positive_int("--steps"), default=25)
    p.add_argument("--guidance", type=_guidance, default=7.5)
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
    except OSError as exc:  # a file the user named could not be read or written (permissions, disk full, ...)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"attnlens: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnlens: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
