"""Attention features on disk and in memory: :class:`Features`, the shard reader and :func:`load_features`.

A feature directory (written by :func:`attnlens.collect`, see :mod:`attnlens._collect`)::

    DIR/config.json                       what was collected (format, keys, layers, shard count)
    DIR/shards/shard-000000.safetensors   rows of ``shard_size`` generations: one tensor per feature key
    DIR/index.csv                         one row per generation: item, prompt, seed, labels, shard, row

A feature key is ``(feature, layer, step)``: a word feature's name or ``"self"``, a layer name, a step.

Imports ``_layers`` and ``_errors``; imported by collection and probing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ._errors import AttnlensError, choices
from ._layers import LayerInfo

Key = tuple  # (feature, layer, step)
RESERVED = ("item", "prompt", "seed", "shard", "row")
FORMAT = "attnlens-features/1"
SELF = "self"


def site_name(layer: str, step: int | None) -> str:
    """``"layer@step"``, the name of a site in tables and figures."""
    return f"{layer}@{'mean' if step is None else step}"


def _key_str(key: Key) -> str:
    feature, layer, step = key
    return f"{feature}|{layer}|{'none' if step is None else step}"


def _parse_key(s: str) -> Key:
    feature, layer, step = s.rsplit("|", 2)
    return (feature, layer, None if step == "none" else int(step))


def _short(values: Sequence, n: int = 8) -> str:
    values = list(values)
    more = f", ... ({len(values)} in all)" if len(values) > n else ""
    return choices(values[:n]) + more


# ------------------------------------------------------------------------------------------ features
class _Lazy(Mapping):
    """Feature arrays produced on access (not held in memory)."""


class _Rows(_Lazy):
    """Some rows of another mapping's arrays, taken on access."""

    def __init__(self, base: Mapping, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows

    def __getitem__(self, key: Key) -> np.ndarray:
        return np.asarray(self.base[key])[self.rows]

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def __iter__(self) -> Iterator[Key]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class _ShardReader(_Lazy):
    """Reads one feature key at a time from a shard directory (bounded memory)."""

    def __init__(self, root: Path, shards: list[Path], keys: list[Key]) -> None:
        self.root, self.shards, self._keys, self._set = root, shards, keys, set(keys)

    def __getitem__(self, key: Key) -> np.ndarray:
        from safetensors import safe_open

        if key not in self._set:
            raise KeyError(key)
        parts = []
        for path in self.shards:
            with safe_open(str(path), framework="numpy") as f:
                parts.append(f.get_tensor(_key_str(key)))
        return np.concatenate(parts, axis=0)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class Features:
    """Attention features of a labelled set of generations, ready for scikit-learn.

    Args:
        X: ``{(feature, layer, step): array (n, d)}``, one matrix per feature and site; ``d`` may differ
            between sites.
        y: a DataFrame of ``n`` rows: the label columns, and optionally ``prompt`` and ``seed`` (used
            for grouping).
        groups: ``n`` group ids for grouped cross-validation; default: the prompt of each row.
        layers: optional ``{name: LayerInfo}`` of the layers in ``X`` (lets :func:`attnlens.probe`
            filter sites with a :class:`~attnlens.Selector`).
        n_steps: the length of the denoising schedule (for fraction step ranges in a selector).

    Attributes:
        y: the labels (and ``prompt``, ``seed``) as a DataFrame, one row per generation.
        groups: ``(n,)`` int array, the prompt id of each row (rows of one prompt share an id).
        config: what :func:`collect` was asked for (empty for hand-made features).

    ``features[feature, layer, step]`` is an ``(n, d)`` float32 array; :meth:`keys` lists them.

    Example:
        >>> import numpy as np, pandas as pd
        >>> f = Features({("map", "mid.0.cross", 0): np.zeros((4, 16))},
        ...              pd.DataFrame({"colour": ["red", "red", "blue", "blue"], "prompt": list("abcd")}))
        >>> f["map", "mid.0.cross", 0].shape, f.labels, f.groups.tolist()
        ((4, 16), ['colour'], [0, 1, 2, 3])
    """

    def __init__(self, X: Mapping[Key, np.ndarray], y: pd.DataFrame, groups: Sequence | None = None, *,
                 layers: Mapping[str, LayerInfo] | None = None, n_steps: int | None = None,
                 config: dict | None = None) -> None:
        if not isinstance(y, pd.DataFrame):
            raise AttnlensError(f"y must be a pandas DataFrame of labels (one row per sample), not {type(y).__name__}")
        self.y = y.reset_index(drop=True)
        self.X = X
        self.layers = dict(layers or {})
        self.n_steps = n_steps
        self.config = dict(config or {})
        n = len(self.y)
        for key in list(X):
            if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], str) and isinstance(key[1], str)):
                raise AttnlensError(f"feature keys are (feature, layer, step) tuples, got {key!r}")
        if not isinstance(X, _Lazy):
            for key, arr in X.items():
                if getattr(arr, "ndim", None) != 2:
                    raise AttnlensError(f"features {key} must be a 2-d array (samples, features), got shape "
                                        f"{getattr(arr, 'shape', type(arr).__name__)}")
                if arr.shape[0] != n:
                    raise AttnlensError(f"label and feature counts differ: features {key} have {arr.shape[0]} rows, "
                                        f"the labels have {n}")
        if groups is None:
            groups = pd.factorize(self.y["prompt"])[0] if "prompt" in self.y else np.arange(n)
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise AttnlensError(f"label and group counts differ: {groups.shape[0] if groups.ndim else 0} group ids "
                                f"for {n} labelled rows")
        self.groups = groups

    # ------------------------------------------------------------------ access
    def __getitem__(self, key: Key) -> np.ndarray:
        if key not in self.X:
            raise AttnlensError(f"no features for {key!r}: this set has (feature, layer, step) keys "
                                f"{_short(self.keys())}")
        return self.X[key]

    def keys(self) -> list[Key]:
        """The ``(feature, layer, step)`` keys, in collection order (layers in execution order)."""
        return list(self.X)

    @property
    def features(self) -> list[str]:
        """The feature names (word features and ``"self"``)."""
        return list(dict.fromkeys(k[0] for k in self.X))

    @property
    def labels(self) -> list[str]:
        """The label columns of :attr:`y` (everything but ``item``, ``prompt``, ``seed``, ``shard``, ``row``)."""
        return [c for c in self.y.columns if c not in RESERVED]

    def __len__(self) -> int:
        return len(self.y)

    def xy(self, key: Key, attribute: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X (n, d), y (n,), groups (n,))`` for one feature key and label column."""
        if attribute not in self.labels:
            raise AttnlensError(f"unknown attribute {attribute!r}; the labels are {choices(self.labels)}")
        return self[key], self.y[attribute].to_numpy(), self.groups

    def select(self, rows: Any) -> "Features":
        """The features of some samples only: ``rows`` is a boolean mask of length ``n`` or indices.

        Example: drop a rare class before probing, ``f.select(f.y["colour"] != "pink")``.
        """
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise AttnlensError(f"a boolean row mask needs {len(self)} entries, got {rows.shape[0] if rows.ndim else 0}")
            rows = np.flatnonzero(rows)
        rows = rows.astype(int)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise AttnlensError(f"row index out of range for {len(self)} samples")
        X = _Rows(self.X, rows) if isinstance(self.X, _Lazy) else {k: v[rows] for k, v in self.X.items()}
        return Features(X, self.y.iloc[rows], self.groups[rows], layers=self.layers, n_steps=self.n_steps,
                        config=self.config)

    def __repr__(self) -> str:
        return (f"Features({len(self)} samples, {len(self.X)} keys, features {self.features}, labels {self.labels})")


def shard_path(root: Path, k: int) -> Path:
    """The file of shard ``k`` in a feature directory."""
    return root / "shards" / f"shard-{k:06d}.safetensors"


def load_features(path: str | os.PathLike) -> Features:
    """Open a shard directory written by :func:`collect` (arrays are read from disk key by key).

    Raises :class:`~attnlens.AttnlensError` for a directory that is not a complete collection, naming
    the missing shards.
    """
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise AttnlensError(f"{root} is not an attnlens feature directory (no config.json)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise AttnlensError(f"{root} is not an attnlens feature directory (format {meta.get('format')!r})")
    shards = [shard_path(root, k) for k in range(meta["n_shards"])]
    missing = [p.name for p in shards if not p.exists()]
    if missing or not (root / "index.csv").exists():
        raise AttnlensError(f"the collection in {root} is incomplete: {len(missing)} of {len(shards)} shard(s) missing "
                            f"({_short(missing, 4)}), no index.csv. Run collect(...) again with the same arguments "
                            "to resume it")
    index = pd.read_csv(root / "index.csv", keep_default_na=False)
    keys = [_parse_key(s) for s in meta["keys"]]
    y = index.drop(columns=["item", "shard", "row"])
    return Features(_ShardReader(root, shards, keys), y, layers={n: LayerInfo.from_dict(d) for n, d in meta["layers"].items()},
                    n_steps=meta["n_steps"], config=meta["collect"])
