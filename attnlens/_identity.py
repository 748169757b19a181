"""A model's identity and its weight files: the one reader of safetensors headers and the one fingerprint.

* :func:`safetensors_header`: the JSON header of a safetensors file (the only place it is parsed by hand), and
  :func:`safetensors_problem`: what is wrong with a safetensors file (the model-folder check and the cache's load);
* :func:`weight_sums`: ``{file: SHA-256}`` of a folder's weights (what ``training.json`` records and
  :func:`attnlens._pipeline.check_model_folder` verifies);
* :func:`fingerprint`: a model's identity: SHA-256 over a diffusers folder's weights and configs, or, for a
  pipeline in memory, over its components' configs and weights (two models with the same fingerprint
  generate the same images).

Imports only the standard library (and torch, for a pipeline in memory); imported by the loader, collection and the
development tools (model card, benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class HeaderError(ValueError):
    """A file is not a sound safetensors file; the message says why (a phrase: "is truncated ...")."""


def _read_header(f: BinaryIO, size: int) -> tuple[int, dict]:
    head = f.read(8)
    if head.startswith(b"version "):
        raise HeaderError("is a Git LFS pointer, not the weights (run `git lfs pull`)")
    if len(head) < 8:
        raise HeaderError(f"is truncated ({size} bytes: not even a safetensors header)")
    n = struct.unpack("<Q", head)[0]
    if n > MAX_HEADER or n > size - 8:
        raise HeaderError(f"is truncated or not a safetensors file (header length {n} does not fit in {size} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise HeaderError("is not a safetensors file (its header is not a JSON object)")
    return n, header


def safetensors_header(path: str | Path) -> tuple[int, dict]:
    """``(header length in bytes, header)`` of a safetensors file; :class:`HeaderError` naming what is wrong.

    The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (and ``"__metadata__"`` to the
    file's metadata); the tensor data starts at byte ``8 + header length``.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, str(path))
        >>> safetensors_header(path)[1]["w"]
        {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]}
    """
    path = Path(path)
    with path.open("rb") as f:
        return _read_header(f, path.stat().st_size)


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file (truncated, garbage, a Git LFS pointer), or None if it is sound.

    Checks the header and that the file holds exactly the bytes the header's tensors need; it does not
    read the tensor data. Used by the model-folder check and by :meth:`attnlens.AttentionCache.load`.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, str(path))
        >>> safetensors_problem(path) is None
        True
        >>> _ = path.write_bytes(path.read_bytes()[:-4])
        >>> safetensors_problem(path)
        'is truncated (92 bytes; its header describes 96)'
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        n, header = safetensors_header(path)
    except HeaderError as exc:
        return str(exc)
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in t["data_offsets"])
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            nbytes = numel * _DTYPE_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"has a damaged header (entry {name!r})"
        if stop - start != nbytes or start < 0:
            return f"has a damaged header (tensor {name!r} needs {nbytes} bytes, offsets give {stop - start})"
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        return f"is truncated ({size:,} bytes; its header describes {expected:,})"
    if size > expected:
        return f"is damaged ({size:,} bytes; its header describes {expected:,})"
    return None


def weight_sums(folder: str | Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every safetensors file in ``folder`` (recorded in ``training.json``)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


def fingerprint(model: Any, parts: tuple[str, ...] | None = None) -> str | None:
    """A model's identity: SHA-256 over its weights and configs (not ``training.json`` or ``README.md``).

    ``model`` is a diffusers folder, or a pipeline in memory (then its components' configs, dtypes and
    weights are hashed, so weights changed after loading change it). Two models with the same fingerprint
    generate the same images. ``parts`` (component names such as ``("vae", "scheduler")``) limits it to
    those, for a result that depends on them alone. ``None`` for a string that is not a local folder (a hub id).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> fingerprint(tiny_pipeline()) == fingerprint(tiny_pipeline()), len(fingerprint(tiny_pipeline()))
        (True, 64)
    """
    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not folder.is_dir():
            return None
        h = hashlib.sha256()
        for f in sorted(folder.rglob("*")):
            if parts is not None and f.relative_to(folder).parts[0] not in parts:
                continue
            if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "training.json":
                h.update(str(f.relative_to(folder)).encode())
                h.update(f.read_bytes())
        return h.hexdigest()
    return _memory_fingerprint(model, parts)


def _memory_fingerprint(pipe: Any, parts: tuple[str, ...] | None) -> str:
    import torch

    h = hashlib.sha256()
    components = getattr(pipe, "components", None) or {"unet": getattr(pipe, "unet", pipe)}
    for name in sorted(components):
        comp = components[name]
        if comp is None or (parts is not None and name not in parts):
            continue
        h.update(name.encode())
        config = getattr(comp, "config", None)
        if config is not None:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        if isinstance(comp, torch.nn.Module):
            for key, t in comp.state_dict().items():
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
