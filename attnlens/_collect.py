"""Collect attention features from a labelled prompt set (plan, generate, write), in memory or streamed to
disk in shards. What is written and how it is read back lives in :mod:`attnlens._features`.

A *site* is one captured map: ``(layer, step)``. A *feature* is what is read from a site:

* for a cross-attention site, the map of a word of the prompt (its tokens' attention summed):
  ``(heads, h, w)`` flattened, ``heads`` is 1 for the head mean (the default);
* for a self-attention site, the fixed-size summary ``"self"``: the layer's map with its query grid and
  its key grid each average-pooled to at most ``self_grid x self_grid`` (the key mass summed, so every
  row still sums to 1), flattened: ``(heads, g, g, g * g)``, ``g = min(self_grid, layer grid)``, so
  ``g**4`` numbers per head (256 for ``self_grid=4``). Row ``(i, j)`` is where the pooled query cell
  ``(i, j)`` looks, which keeps the layout the paper attributes to self-attention.

Every generation is one ``(prompt, seed)`` pair. Its start noise comes from its own CPU generator seeded
with its seed, so a generation does not depend on which batch, shard, process or device made it.

On disk (``out=DIR``)::

    DIR/config.json                       what was collected (checked on resume)
    DIR/shards/shard-000000.safetensors   rows of ``shard_size`` generations: one tensor per feature key
    DIR/index.csv                         one row per generation: item, prompt, seed, labels, shard, row
    DIR/.attnlens.lock                    the directory's lock (its last owner's host and pid inside)

A shard is written to a temporary name and renamed, so a shard file that exists is complete; a rerun
with the same arguments skips the shards that exist (resume), and ``index.csv`` is written once every
shard is there. Under ``accelerate launch`` (or ``torchrun``) shard ``k`` is made by rank
``k % world_size`` and rank 0 writes the one merged index. On a machine without GPUs,
``accelerate launch --multi_gpu --num_processes 2 script.py`` starts the processes (its ``--cpu`` mode
runs one process unless MPI is set up); ``torchrun --nproc_per_node 2 script.py`` works too.

The config check and the config and index writes hold the directory's lock (an exclusive ``flock`` on
``DIR/.attnlens.lock``, released by the system when its process dies, so a dead writer's lock is taken
over): two writers with different settings cannot both pass the check, the second fails naming the lock.
Temporary names carry the writer's host and pid (``.NAME.tmp-HOST-PID``); a writer removes only its own and
those of dead processes, never a live writer's in-flight file.

Imports capture, prompts, selection and the feature storage; imported by the package's front.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ._capture import capture
from ._errors import AttnlensError, check_int, choices
from ._features import FORMAT, SELF, Features, Key, _key_str, load_features, shard_path, site_name
from ._identity import fingerprint
from ._layers import LayerTable, layers as list_layers
from ._prompts import token_weights, tokenize, words as prompt_words
from ._select import Selector

__all__ = ["collect", "Features", "Key", "load_features", "site_name"]  # storage names kept importable from here

WordSpec = Union[str, int, Sequence[Union[str, int]]]


# ------------------------------------------------------------------------------------------ inputs
def _table(data: Any, labels: Any, seeds: Any) -> tuple[pd.DataFrame, np.ndarray, int]:
    """One row per generation (``prompt``, ``seed``, label columns), the input row of each, the input count."""
    if isinstance(data, pd.DataFrame):
        if "prompt" not in data:
            raise AttnlensError(f"a DataFrame of prompts needs a 'prompt' column; it has {choices(data.columns)}")
        rows = data.reset_index(drop=True).copy()
    else:
        if isinstance(data, str) or hasattr(data, "prompt_row"):
            data = [data]
        if data is None or isinstance(data, Mapping) or not hasattr(data, "__iter__"):
            raise AttnlensError(f"data must be prompts: a list of str, shapes Scenes or Examples (any object with "
                                f"prompt_row()), or a DataFrame with a 'prompt' column; not {type(data).__name__}")
        data = list(data)
        if not data:
            raise AttnlensError("no prompts given: pass a list of prompts, shapes Scenes or Examples, or a DataFrame")
        recs = []
        for i, d in enumerate(data):
            if hasattr(d, "prompt_row"):  # a labelled prompt: shapes.Scene, shapes.Example, ...
                recs.append(dict(d.prompt_row()))
            elif isinstance(d, str):
                recs.append({"prompt": d})
            else:
                raise AttnlensError(f"item {i} is a {type(d).__name__}; give prompts as str, shapes.Scene, "
                                    "shapes.Example (any object with prompt_row()) or a DataFrame with a 'prompt' "
                                    "column")
        rows = pd.DataFrame(recs)
    if labels is not None:
        lab = labels if isinstance(labels, pd.DataFrame) else pd.DataFrame(dict(labels))
        if len(lab) != len(rows):
            raise AttnlensError(f"label and prompt counts differ: {len(lab)} label rows for {len(rows)} prompts")
        clash = [c for c in lab.columns if c in rows.columns]
        if clash:
            raise AttnlensError(f"label column(s) {choices(clash)} given twice (in the prompts and in labels=)")
        rows = pd.concat([rows, lab.reset_index(drop=True)], axis=1)
    bad = [c for c in rows.columns if c in ("item", "shard", "row")]
    if bad:
        raise AttnlensError(f"label column name(s) {choices(bad)} are reserved; rename them")
    if "seed" in rows:
        if seeds is not None:
            raise AttnlensError("the prompts have a 'seed' column and seeds= was given too; give one of them")
        rows["seed"] = rows["seed"].astype(int)
        rows["prompt"] = rows["prompt"].astype(str)
        return rows, np.arange(len(rows)), len(rows)
    seeds = _seed_list(seeds)
    if not seeds:
        raise AttnlensError("seeds is empty: give a count (seeds=4) or a list of seeds")
    n_input = len(rows)
    rows = rows.loc[rows.index.repeat(len(seeds))].reset_index(drop=True)
    rows.insert(1, "seed", np.tile(seeds, n_input))
    rows["prompt"] = rows["prompt"].astype(str)
    return rows, np.repeat(np.arange(n_input), len(seeds)), n_input


def _seed_list(seeds: Any) -> list[int]:
    """The seeds of ``seeds=``: ``None`` is seed 0, a count ``n`` is ``0..n-1``, else a list of ints."""
    if seeds is None:
        return [0]
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        check_int("seeds", seeds, minimum=1)
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes, Mapping)) or not hasattr(seeds, "__iter__"):
        raise AttnlensError(f"seeds must be a count (seeds=4: seeds 0..3) or a list of int seeds, not {seeds!r}")
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0]
    if bad:
        raise AttnlensError(f"seeds holds {bad[0]!r}; each seed must be an int >= 0")
    return [int(s) for s in seeds]


def _resolve_words(words: Any, rows: pd.DataFrame, n_input: int, per_item: np.ndarray) -> dict[str, list]:
    """``{feature name: [word or token index per generation]}``."""
    if words is None:
        return {}
    if isinstance(words, Mapping):
        specs = dict(words)
    elif isinstance(words, (str, int)):
        specs = {str(words): words}
    else:
        raise AttnlensError("words must be a word or '{label}' template (str), a token index (int), or a dict "
                            "{feature name: word spec}; a per-prompt list goes inside a dict")
    label_cols = [c for c in rows.columns if c not in ("prompt", "seed")]
    out: dict[str, list] = {}
    for name, spec in specs.items():
        if not isinstance(name, str) or not name or name == SELF or "|" in name:
            raise AttnlensError(f"feature name {name!r} is not allowed (a non-empty str without '|', not {SELF!r})")
        if isinstance(spec, str) and "{" in spec:
            try:
                out[name] = [spec.format(**r) for r in rows[label_cols].to_dict("records")]
            except (KeyError, IndexError) as exc:
                raise AttnlensError(f"word template {spec!r} names {exc}, which is not a label; labels: "
                                    f"{choices(label_cols)}") from None
        elif isinstance(spec, (str, int)):
            out[name] = [spec] * len(rows)
        elif isinstance(spec, Sequence):
            spec = list(spec)
            if len(spec) != n_input:
                raise AttnlensError(f"the word list of feature {name!r} has {len(spec)} entries for {n_input} prompts")
            out[name] = [spec[i] for i in per_item]
        else:
            raise AttnlensError(f"word spec {spec!r} of feature {name!r}: give a str, an int or a list per prompt")
    return out


def _token_weights(words: dict[str, list], tokens: list[list[str]], rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{feature: (n_items, 77) float32}`` with 1 at the word's tokens; an error naming prompts without it."""
    out = {}
    for name, per in words.items():
        w, missing = token_weights(tokens, per)
        if missing:
            i = missing[0]
            prompts = rows["prompt"].iloc[missing].unique()
            raise AttnlensError(
                f"the word {per[i]!r} (feature {name!r}) is absent from {len(prompts)} of {rows['prompt'].nunique()} "
                f"prompt(s), e.g. {rows['prompt'].iloc[i]!r} whose words are {[w for w, _ in prompt_words(tokens[i])]}. "
                "Pick a word every prompt has, a '{label}' template (words='{shape}'), '<end>', or drop those prompts"
            )
        out[name] = w
    return out


# ------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class _Plan:
    rows: pd.DataFrame
    weights: dict[str, np.ndarray]
    cross: Selector | None
    self_: Selector | None
    steps: list[int]
    table: LayerTable
    config: dict


def _plan(pipe, data, labels, seeds, words, sites, resolution, self_grid, num_inference_steps, guidance_scale,
          pipe_kwargs, image_labels, shard_size) -> _Plan:
    sel = Selector(kind="cross") if sites is None else sites
    if not isinstance(sel, Selector):
        raise AttnlensError(f"sites must be an attnlens.Selector, not {type(sel).__name__}")
    if sel.branch not in ("cond", "uncond"):
        raise AttnlensError(f"collect reads one CFG branch: sites.branch must be 'cond' or 'uncond', not {sel.branch!r}")
    if sel.prompts is not None:
        raise AttnlensError("sites.prompts must be None: collect makes the batches itself")
    if self_grid < 1:
        raise AttnlensError(f"self_grid must be >= 1, got {self_grid}")
    table = list_layers(pipe)
    chosen = sel.match(table)
    steps = sorted(sel.step_indices(num_inference_steps))
    if not steps:
        raise AttnlensError(f"the step selection {sel.steps!r} picks none of the {num_inference_steps} steps")
    cross = [i.name for i in chosen if i.kind == "cross"]
    selfs = [i.name for i in chosen if i.kind == "self"]
    rows, per_item, n_input = _table(data, labels, seeds)
    if cross and words is None:
        raise AttnlensError("cross-attention sites are selected but words=None; name the word(s) to read, e.g. "
                            "words='{shape}' or words={'shape': '{shape}', 'end': '<end>'}")
    word_lists = _resolve_words(words, rows, n_input, per_item) if cross else {}
    weights = _token_weights(word_lists, tokenize(getattr(pipe, "tokenizer", None), rows["prompt"].tolist()), rows) if cross else {}
    mk = lambda names: Selector(layers=names, steps=sel.steps, heads=sel.heads, branch=sel.branch) if names else None
    items_hash = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]
    config = {
        "format": FORMAT,
        "model": fingerprint(pipe),
        "items": items_hash,
        "n_items": len(rows),
        "words": {k: (v if isinstance(v, (str, int)) else list(map(str, v))) for k, v in
                  (dict(words) if isinstance(words, Mapping) else ({str(words): words} if words is not None else {})).items()}
        if cross else {},
        "layers": [i.name for i in chosen],
        "steps": steps,
        "heads": sel.heads if isinstance(sel.heads, str) else list(sel.heads),
        "branch": sel.branch,
        "resolution": resolution,
        "self_grid": self_grid if selfs else None,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "pipe_kwargs": json.loads(json.dumps(pipe_kwargs or {}, sort_keys=True, default=repr)),
        "image_labels": None if image_labels is None else getattr(image_labels, "__qualname__", repr(image_labels)),
        "shard_size": shard_size,
    }
    return _Plan(rows, weights, mk(cross), mk(selfs), steps, LayerTable(chosen), config)


# ------------------------------------------------------------------------------------------ generation
def _stop_after(pipe: Any, last: int, n_steps: int) -> dict[str, Any]:
    """Pipeline keywords that end the denoising loop after step ``last`` (nothing later is read), or ``{}``
    where the pipeline cannot be interrupted or every step is needed."""
    import inspect

    if last >= n_steps - 1 or not hasattr(type(pipe), "interrupt"):
        return {}
    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return {}

    def stop(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        if i >= last:
            p._interrupt = True  # diffusers' documented way to end the loop early: later steps are skipped
        return {}

    return {"callback_on_step_end": stop}


def _generate(pipe, plan: _Plan, idx: np.ndarray, num_inference_steps, guidance_scale, pipe_kwargs, resolution,
              self_grid, image_labels) -> tuple[dict[Key, np.ndarray], list[dict]]:
    """Features of the generations ``idx`` (one pipeline call): ``{key: (len(idx), d)}`` and extra labels."""
    rows = plan.rows.iloc[idx]
    gens = [torch.Generator().manual_seed(int(s)) for s in rows["seed"]]
    with contextlib.ExitStack() as stack:
        cc = stack.enter_context(capture(pipe, plan.cross, dtype=torch.float32, store_resolution=resolution)) \
            if plan.cross else None
        sc = stack.enter_context(capture(pipe, plan.self_, dtype=torch.float32, store_resolution=self_grid)) \
            if plan.self_ else None
        extra_kw = _stop_after(pipe, plan.steps[-1], num_inference_steps) \
            if image_labels is None and "callback_on_step_end" not in (pipe_kwargs or {}) else {}
        out = pipe(prompt=rows["prompt"].tolist(), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=gens,
                   output_type="latent" if image_labels is None else "pil", **extra_kw, **(pipe_kwargs or {}))
    feats: dict[Key, np.ndarray] = {}
    for cache in (c for c in (cc, sc) if c is not None):
        if sorted(cache.steps) != plan.steps:
            raise AttnlensError(f"the pipeline ran steps {cache.steps}, not the planned {plan.steps}: does it honour "
                                f"num_inference_steps={num_inference_steps}?")
    if cc is not None:
        weights = {name: torch.from_numpy(w[idx]) for name, w in plan.weights.items()}
        for layer in cc.layers:
            for step in plan.steps:
                m = cc[layer, step].float()  # (items, heads, h, w, 77)
                for name, w in weights.items():
                    feats[(name, layer, step)] = torch.einsum("bnxyk,bk->bnxy", m, w[:, : m.shape[-1]]) \
                        .reshape(len(idx), -1).numpy()
    if sc is not None:
        for layer in sc.layers:
            for step in plan.steps:
                feats[(SELF, layer, step)] = sc[layer, step].float().reshape(len(idx), -1).numpy()
    extra = [dict(image_labels(im)) for im in out.images] if image_labels is not None else [{} for _ in idx]
    return feats, extra


def _keys(plan: _Plan) -> list[Key]:
    keys = []
    for info in plan.table:  # execution order
        names = list(plan.weights) if info.kind == "cross" else [SELF]
        for step in plan.steps:
            keys += [(n, info.name, step) for n in names]
    return keys


# ------------------------------------------------------------------------------------------ disk
LOCK_NAME = ".attnlens.lock"
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another's config check or index write (each takes well under one)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _temp_name(path: Path) -> Path:
    """A writer's own temporary name for ``path``: ``.NAME.tmp-HOST-PID`` (so no two writers share one)."""
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def _alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` on ``host`` may still run (a process on another host is assumed to)."""
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _temp_owner(tmp: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of a temporary file's writer from its name (``None`` if it has none)."""
    tail = tmp.name.rpartition(".tmp-")[2]
    host, _, pid = tail.rpartition("-")
    return (host or _host(), int(pid)) if pid.isdigit() else None


def _clean_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` that this process or a dead one left; a live writer's stay.
    Returns the removed paths."""
    removed = []
    for tmp in folder.glob(".*.tmp-*"):
        owner = _temp_owner(tmp)
        if owner is None:
            continue
        host, pid = owner
        if (host == _host() and pid == os.getpid()) or not _alive(host, pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_shard(path: Path, feats: dict[Key, np.ndarray], items: np.ndarray, extra: list[dict], rank: int,
                 world: int) -> None:
    from safetensors.numpy import save_file

    tensors = {_key_str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in feats.items()}
    tensors["__item__"] = items.astype(np.int64)
    tmp = _temp_name(path)
    try:
        save_file(tensors, str(tmp), metadata={"attnlens": json.dumps({"extra": extra, "rank": rank, "world": world},
                                                                             default=str)})
        os.replace(tmp, path)  # atomic: a shard file that exists is complete
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _dir_lock(root: Path, timeout: float | None = None) -> Iterator[Path]:
    """Hold the feature directory's lock: an exclusive ``flock`` on ``DIR/.attnlens.lock`` with the owner's host
    and pid written inside. The system releases a ``flock`` when its process dies, so the lock of a dead
    writer is taken over; a live one is waited for up to ``timeout`` seconds (:data:`LOCK_TIMEOUT`), then an
    :class:`AttnlensError` names the lock file and its owner. Where ``fcntl`` is missing (Windows) the lock
    file itself is the lock (created exclusively; taken over when its owner's pid is dead)."""
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    me = json.dumps({"host": _host(), "pid": os.getpid(), "since": time.time()})
    deadline = time.monotonic() + timeout
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None:  # pragma: no cover - Windows
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is not None and not _alive(owner.get("host", ""), int(owner.get("pid", -1))):
                    path.unlink(missing_ok=True)
                    continue
                if time.monotonic() >= deadline:
                    raise _lock_error(root, path, timeout) from None
                time.sleep(0.05)
        try:
            os.write(fd, me.encode())
            os.close(fd)
            yield path
        finally:
            path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                if time.monotonic() >= deadline:
                    raise _lock_error(root, path, timeout) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _lock_error(root: Path, path: Path, timeout: float) -> AttnlensError:
    owner = _lock_owner(path) or {}
    who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
    return AttnlensError(f"the feature directory {root} is locked by {who} (lock file {path}), which held it for more "
                         f"than {timeout:g} s: another collect is writing this directory. Wait for it or use another "
                         "directory (the lock is released when that process ends)")


def _claim(root: Path, config: dict, meta: dict) -> None:
    """Under the directory's lock: check ``config`` against the directory's ``config.json`` and write ``meta`` there
    if it has none, so two writers with different settings can never both pass the check."""
    with _dir_lock(root) as lock:
        _check_config(root, config, lock)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        if not (root / "config.json").exists():
            _atomic_write_text(root / "config.json", json.dumps(meta, indent=1))


def _diff(a: dict, b: dict) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            sa, sb = repr(a.get(k)), repr(b.get(k))
            out.append(f"{k}: {sa[:80]} there, {sb[:80]} here")
    return out


def _check_config(root: Path, config: dict, lock: Path | None = None) -> None:
    path = root / "config.json"
    if not path.exists():
        return
    try:
        have = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AttnlensError(f"{path} is not valid JSON ({exc}); is {root} an attnlens feature directory?") from None
    if have.get("format") != FORMAT:
        raise AttnlensError(f"{root} is not an attnlens feature directory (format {have.get('format')!r}, "
                            f"expected {FORMAT!r})")
    diff = _diff(have.get("collect", {}), config)
    if diff:
        raise AttnlensError(f"the shard directory {root} was written by another configuration; it differs in "
                            + "; ".join(diff) + ". Use a new directory, or the same arguments to resume"
                            + (f" (checked holding the directory's lock {lock})" if lock is not None else ""))


def _dist() -> tuple[int, int, Callable[[], None], Any]:
    """``(rank, world size, barrier, device)`` from the launcher's environment (``accelerate launch`` and
    ``torchrun`` set ``RANK`` / ``WORLD_SIZE``); a single process needs nothing extra."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, (lambda: None), None
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # accelerate's PartialState / Accelerator may have done it already
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, (torch.device("cuda", local) if cuda else None)


# ------------------------------------------------------------------------------------------ public
def collect(
    pipe: Any,
    data: Any,
    *,
    words: WordSpec | Mapping[str, WordSpec] | None = "<end>",
    sites: Selector | None = None,
    seeds: int | Sequence[int] | None = None,
    labels: Mapping[str, Sequence] | pd.DataFrame | None = None,
    out: str | os.PathLike | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    shard_size: int = 64,
    resolution: int | None = None,
    self_grid: int = 4,
    image_labels: Callable[[Any], Mapping[str, Any]] | None = None,
    pipe_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Features:
    """Generate every ``(prompt, seed)`` pair and read attention features at the chosen sites.

    Args:
        pipe: a diffusers Stable Diffusion-family pipeline (:func:`attnlens.load_pipeline`).
        data: prompts with labels: a list of :class:`attnlens.shapes.Scene` (prompt: its canonical
            description; labels: its five attributes), of :class:`~attnlens.shapes.Example`, of any object
            with a ``prompt_row()`` method returning ``{"prompt": ..., label: value, ...}`` (what those two
            have), of str (labels from ``labels=``), or a DataFrame with a ``prompt`` column, label columns
            and optionally a ``seed`` column (then one generation per row).
        words: the word whose cross-attention map is read: a word or phrase of the prompt, ``"<end>"``,
            ``"<start>"``, a token index, or a template over the labels (``"{shape}"`` reads each prompt's
            own shape word); or a dict ``{feature name: spec}`` to read several words from the same
            generations (a spec may also be a list with one word per prompt). The feature is named after
            the dict key, or the spec itself.
        sites: a :class:`~attnlens.Selector` of layers, steps, heads and branch (default: every
            cross-attention layer, every step, head mean, conditional branch). Self-attention layers in
            the selection give the ``"self"`` summary (see the module docs).
        seeds: the seeds each prompt is generated with: a count (``4``: seeds 0..3) or a list
            (default: seed 0).
        labels: labels for a list of str prompts, ``{column: values}`` or a DataFrame, one row per prompt.
        out: a directory to stream shards to (resumable); ``None`` keeps everything in memory.
        batch_size: prompts per pipeline call. shard_size: generations per shard file. Memory holds one
            batch's captured maps (``batch_size x sites x h*w*77`` floats for cross-attention) and, with
            ``out``, one shard's features; without ``out``, all features.
        resolution: downsample cross-attention maps to at most this grid side (``None``: the layer's grid).
        self_grid: side of the pooled query and key grids of the self-attention summary.
        image_labels: optional ``image -> {column: value}`` (for instance the Shapes oracle) run on each
            generated image; its columns join the labels (the images are decoded only then). Without it, each
            pipeline call stops after the last selected step: later steps would be read by nothing.
        pipe_kwargs: further keyword arguments of every pipeline call (``height``, ``negative_prompt``...).
        progress: show a progress bar.

    Returns:
        :class:`Features`: ``features[feature, layer, step]`` is ``(n, d)`` float32 with ``n`` the number
        of generations (prompts x seeds) and ``d = heads * h * w`` for a word map, ``heads * g**4`` for
        ``"self"``; ``features.y`` the labels with ``prompt`` and ``seed``; ``features.groups`` the prompt
        ids. With ``out`` the arrays are read from disk key by key.

    Example:
        >>> from attnlens import Selector, shapes
        >>> from attnlens._testing import tiny_pipeline
        >>> scenes = shapes.grid(shape=["star", "circle"], colour=["red", "blue"], size="large",
        ...                      position="center", background="black")
        >>> f = collect(tiny_pipeline(), scenes, words="{shape}", seeds=2, num_inference_steps=2,
        ...             sites=Selector(layers="mid.*", steps=[1]), progress=False)
        >>> f.keys()  # the mid block's self- and cross-attention at step 1
        [('self', 'mid.0.self', 1), ('{shape}', 'mid.0.cross', 1)]
        >>> f["{shape}", "mid.0.cross", 1].shape, f["self", "mid.0.self", 1].shape, len(f.y), int(f.groups.max()) + 1
        ((8, 16), (8, 256), 8, 4)
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size),
                        ("num_inference_steps", num_inference_steps), ("self_grid", self_grid)):
        check_int(name, value, minimum=1)
    if resolution is not None:
        check_int("resolution", resolution, minimum=1)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise AttnlensError(f"guidance_scale must be a number, not {guidance_scale!r}")
    plan = _plan(pipe, data, labels, seeds, words, sites, resolution, self_grid, num_inference_steps, guidance_scale,
                 pipe_kwargs, image_labels, shard_size)
    rank, world, barrier, device = _dist()
    if world > 1 and out is None:
        raise AttnlensError(f"a data-parallel collection ({world} processes) needs out=DIR, a directory every "
                            "process can write")
    if device is not None and getattr(pipe, "device", device).type == "cuda" and pipe.device != device:
        pipe.to(device)  # one GPU per rank
    n = len(plan.rows)
    keys = _keys(plan)
    layer_infos = {i.name: i for i in plan.table}
    gen = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, pipe_kwargs=pipe_kwargs,
               resolution=resolution, self_grid=self_grid, image_labels=image_labels)
    n_shards = -(-n // shard_size)
    if out is None:
        parts: dict[Key, list] = {k: [] for k in keys}
        extra: list[dict] = []
        for idx in _batches(np.arange(n), batch_size, progress, rank, n):
            feats, ex = _generate(pipe, plan, idx, **gen)
            for k in keys:
                parts[k].append(feats[k])
            extra += ex
        X = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
        y = pd.concat([plan.rows, pd.DataFrame(extra)], axis=1)
        return Features(X, y, layers=layer_infos, n_steps=num_inference_steps, config=plan.config)

    root = Path(out)
    _check_config(root, plan.config)  # every rank checks before anyone writes
    barrier()
    if rank == 0:  # the check again, and the config written, under the directory's lock (no other writer between)
        meta = {"format": FORMAT, "collect": plan.config, "keys": [_key_str(k) for k in keys],
                "layers": {k: v.to_dict() for k, v in layer_infos.items()}, "n_steps": num_inference_steps,
                "n_shards": n_shards}
        _claim(root, plan.config, meta)
    barrier()
    mine = [k for k in range(n_shards) if k % world == rank and not shard_path(root, k).exists()]
    todo = np.concatenate([np.arange(k * shard_size, min(n, (k + 1) * shard_size)) for k in mine]) if mine else []
    bar = _bar(progress, len(todo), rank, f"collect (rank {rank})" if world > 1 else "collect")
    for k in mine:
        idx_all = np.arange(k * shard_size, min(n, (k + 1) * shard_size))
        parts = {key: [] for key in keys}
        extra = []
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            feats, ex = _generate(pipe, plan, idx, **gen)
            for key in keys:
                parts[key].append(feats[key])
            extra += ex
            if bar is not None:
                bar.update(len(idx))
        _write_shard(shard_path(root, k), {key: np.concatenate(v) for key, v in parts.items()}, idx_all, extra,
                     rank, world)
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        with _dir_lock(root) as lock:
            _check_config(root, plan.config, lock)
            _write_index(root, plan.rows, n_shards, shard_size)
    barrier()
    return load_features(root)


def _bar(progress: bool, total: int, rank: int, desc: str) -> Any:
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="gen", position=rank, leave=rank == 0)


def _batches(idx: np.ndarray, batch_size: int, progress: bool, rank: int, n: int) -> Iterator[np.ndarray]:
    bar = _bar(progress, n, rank, "collect")
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        yield chunk
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def _write_index(root: Path, rows: pd.DataFrame, n_shards: int, shard_size: int) -> None:
    from safetensors import safe_open

    extra, shard, row = [], [], []
    for k in range(n_shards):
        path = shard_path(root, k)
        with safe_open(str(path), framework="numpy") as f:
            items = f.get_tensor("__item__")
            meta = json.loads((f.metadata() or {})["attnlens"])
        expected = np.arange(k * shard_size, min(len(rows), (k + 1) * shard_size))
        if not np.array_equal(items, expected):
            raise AttnlensError(f"{path} holds items {items[:3]}... not the expected {expected[:3]}...: the directory "
                                "is corrupt; delete that shard and collect again to redo it")
        extra += meta["extra"]
        shard += [k] * len(items)
        row += list(range(len(items)))
    index = pd.concat([pd.DataFrame({"item": np.arange(len(rows))}), rows, pd.DataFrame(extra)], axis=1)
    index["shard"], index["row"] = shard, row
    _atomic_write_text(root / "index.csv", index.to_csv(index=False))
    _clean_temps(root / "shards")  # left by this process or by interrupted ones; a live writer's stay
    _clean_temps(root)
