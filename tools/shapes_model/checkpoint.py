"""Atomic, pickle-free training checkpoints of the Shapes training tool: model and optimizer state as safetensors + JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a sibling temporary path, then move it onto ``path`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    meta: dict[str, Any]) -> None:
    """Write ``path`` (a ``.safetensors`` file) and ``path.json`` atomically.

    Tensors are stored as ``{name}/{param}`` for modules and ``{name}#{index}/{key}`` for optimizer
    state; scalar optimizer state and param groups go into the JSON sidecar with ``meta``. A tensor a module
    holds under two names (tied weights: T5's ``shared`` and ``encoder.embed_tokens``) is stored once, the
    other name recorded in the sidecar's ``"tied"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    side: dict[str, Any] = {"meta": meta, "optimizers": {}}
    for name, module in modules.items():
        first: dict[tuple, str] = {}
        for key, value in module.state_dict().items():
            where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if value.numel() and where in first:
                side.setdefault("tied", {})[f"{name}/{key}"] = f"{name}/{first[where]}"
                continue
            first[where] = key
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    for name, opt in optimizers.items():
        state = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    tensors[f"{name}#{index}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = float(value)
        side["optimizers"][name] = {"param_groups": state["param_groups"], "scalars": scalars}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    sidecar = path.with_name(path.name + ".json")
    atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(side)))


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``meta``."""
    path = Path(path)
    tensors = load_file(str(path))
    side = json.loads(path.with_name(path.name + ".json").read_text())
    for alias, kept in side.get("tied", {}).items():
        tensors[alias] = tensors[kept]
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        info = side["optimizers"][name]
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith(f"{name}#"):
                index, sub = key[len(name) + 1:].split("/", 1)
                state.setdefault(int(index), {})[sub] = value
        for index, entry in info["scalars"].items():
            for key, value in entry.items():
                state.setdefault(int(index), {})[key] = torch.tensor(value)
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return side["meta"]
