"""Load a diffusers pipeline safely: safetensors only, no remote code."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._errors import AttnlensError
from ._identity import safetensors_problem as _safetensors_problem

EMBEDDED_MODEL = Path(__file__).parent / "models" / "shapes"
"""Where the embedded Shapes model lives (a diffusers folder)."""

EMBEDDED_DIT = Path(__file__).parent / "models" / "shapes-dit"
"""Where the Shapes DiT lives (a ``PixArtAlphaPipeline`` folder), loaded by ``load_pipeline("shapes-dit")``."""

SHAPES_DIT = "shapes-dit"
"""The name :func:`load_pipeline` resolves to :data:`EMBEDDED_DIT` (before any folder or hub id of that name)."""

_DIT_BUILD = ("`python -m tools.shapes_model.train vae --workdir runs/shapes --steps 3000` (skip it when runs/shapes "
              "holds the VAE stage, vae.safetensors), `python -m tools.shapes_model.train dit --workdir runs/shapes "
              "--steps STEPS`, `python -m tools.shapes_model.train export --denoiser dit --workdir runs/shapes --out "
              "attnlens/models/shapes-dit`")


def _recorded_rebuild(record: Path) -> list[tuple[str, str]]:
    """The ``(command, note)`` pairs a Shapes export's ``training.json`` records under ``"rebuild"`` (written by
    the repository's training tool, ``python -m tools.shapes_model.train export`` or ``card``); ``[]`` when the
    record is missing, damaged or has none. ``{out}`` in a command stands for the model folder."""
    try:
        rows = json.loads(record.read_text()).get("rebuild")
        return [(str(r["command"]), str(r.get("note") or "")) for r in rows]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return []


def _rebuild_hint(folder: Path) -> str:
    """How to get a sound copy of ``folder`` back: the rebuild commands its ``training.json`` records for a
    Shapes export, else re-saving."""
    embedded = folder.resolve() == EMBEDDED_MODEL.resolve()
    record = folder / "training.json"
    if not embedded and not record.is_file():
        return ("Download the model again, or re-save it with "
                "`pipe.save_pretrained(folder, safe_serialization=True)`.")
    out = "attnlens/models/shapes" if embedded else str(folder)
    restore = "Restore the shipped copy with `git checkout -- attnlens/models/shapes`, or rebuild it" if embedded \
        else "Rebuild it"
    commands = _recorded_rebuild(record)
    if not commands:
        return (f"{restore} with the Shapes training tool of a source checkout (`python -m tools.shapes_model.train "
                "--help`; this folder's training.json records no rebuild commands).")
    steps = ", then ".join(f"`{c.replace('{out}', out)}`" + (f" ({n})" if n else "") for c, n in commands)
    return f"{restore}: {steps} (training resumes from the checkpoints in runs/shapes if they are still there)."


def check_model_folder(folder: str | os.PathLike) -> None:
    """Check a local diffusers folder before loading it; raise :class:`AttnlensError` naming the bad file.

    Every component listed in ``model_index.json`` must have its folder, parseable JSON files and, for
    a model (a folder with ``config.json``), safetensors weights that are complete. When the folder's
    ``training.json`` (written by ``python -m tools.shapes_model.train export``) records SHA-256 sums of the
    weights, they are compared too. The message says how to rebuild or restore the folder.
    """
    folder = Path(folder)

    def fail(path: Path, problem: str) -> NoReturn:
        raise AttnlensError(f"cannot load the model in {folder}: {path} {problem}. {_rebuild_hint(folder)}")

    index = folder / "model_index.json"
    if not index.is_file():
        fail(index, "is missing (a diffusers pipeline folder starts with it)")
    try:
        spec = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(index, f"is not valid JSON ({exc})")
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            fail(sub, f"is missing (model_index.json lists the component {name!r}: {value[0]}.{value[1]})")
        for js in sorted(sub.glob("*.json")):
            try:
                json.loads(js.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                fail(js, f"is not valid JSON ({exc})")
        weights = sorted(sub.glob("*.safetensors"))
        if (sub / "config.json").is_file() and not weights:
            pickles = sorted(p.name for p in sub.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
            expected = "diffusion_pytorch_model.safetensors" if value[0] == "diffusers" else "model.safetensors"
            why = (f"the folder has only pickle weights ({', '.join(pickles)}), which attnlens does not load"
                   if pickles else f"{name}/ has no .safetensors weights")
            fail(sub / expected, f"is missing ({why})")
        for shard_index in sorted(sub.glob("*.safetensors.index.json")):
            for shard in sorted(set(json.loads(shard_index.read_text()).get("weight_map", {}).values())):
                if not (sub / shard).is_file():
                    fail(sub / shard, f"is missing (listed in {shard_index.name})")
        for w in weights:
            problem = _safetensors_problem(w)
            if problem:
                fail(w, problem)
    record = folder / "training.json"
    if record.is_file():
        try:
            sums = json.loads(record.read_text()).get("sha256", {})
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            fail(record, f"is not valid JSON ({exc})")
        for rel, digest in sums.items():
            path = folder / rel
            if not path.is_file():
                fail(path, "is missing (training.json records its checksum)")
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                fail(path, "is corrupt (its SHA-256 differs from the one training.json recorded at export)")


def default_device_dtype(device: str | torch.device | None = None,
                         dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when available, else CPU in fp32 (either can be given explicitly)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype``: use the new name where it exists (the old one warns)."""
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **kwargs: Any):
    """Load a Stable Diffusion-family pipeline from a hub id or a local folder (safetensors only): a UNet
    denoiser (SD 1.x, 2.x, SDXL) or a supported diffusion transformer (PixArt, SD3/SD3.5, Flux.1).

    ``model`` defaults to ``$ATTNLENS_MODEL`` and then to the embedded Shapes model (a UNet). ``"shapes-dit"``
    names the Shapes DiT (a PixArt-alpha-architecture ``PixArtAlphaPipeline`` in ``attnlens/models/shapes-dit``);
    when that folder is missing the error says how to build it (nothing else is loaded in its place). Device
    and dtype are chosen once here; everything in attnlens follows the pipeline.

    Example (needs the model on disk, so not run here)::

        pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")
    """
    from diffusers import DiffusionPipeline

    model = model or os.environ.get("ATTNLENS_MODEL") or EMBEDDED_MODEL
    if isinstance(model, str) and model == SHAPES_DIT:
        if not (EMBEDDED_DIT / "model_index.json").exists():
            raise AttnlensError(
                f"the Shapes DiT is not in {EMBEDDED_DIT}: it is not shipped with this copy of attnlens. Train and "
                f"export it with the training tool of a source checkout: {_DIT_BUILD}; or pass a local "
                "PixArtAlphaPipeline folder or a hub id.")
        model = EMBEDDED_DIT
    device, dtype = default_device_dtype(device, dtype)
    local = Path(model)
    if local.resolve() == EMBEDDED_MODEL.resolve() and not (local / "model_index.json").exists():
        raise AttnlensError(
            f"the embedded Shapes model is not in {EMBEDDED_MODEL} yet. Train and export it with "
            "`python -m tools.shapes_model.train vae|unet|export --out attnlens/models/shapes` (a source checkout's "
            "training tool), or pass a hub id or "
            "a local diffusers folder (or set ATTNLENS_MODEL)."
        )
    if local.is_dir():
        check_model_folder(local)  # a missing or damaged file is named, with how to rebuild it
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), **_dtype_kwarg(dtype), use_safetensors=True,
                                                 trust_remote_code=False, **kwargs)
    except (OSError, EnvironmentError, ValueError) as exc:
        hint = f" {_rebuild_hint(local)}" if local.is_dir() else ""
        raise AttnlensError(f"could not load a pipeline from {str(model)!r} with safetensors weights: {exc}.{hint}") from exc
    from ._layers import get_denoiser

    get_denoiser(pipe)  # unsupported architectures fail here, with the supported list
    return pipe.to(device)
