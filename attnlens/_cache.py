"""The attention cache that :func:`attnlens.capture` fills: maps by (layer, step), word maps, save/load."""

from __future__ import annotations

import dataclasses
import json
import numbers
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ._errors import AttnlensError
from ._layers import LayerInfo
from ._prompts import token_indices as _token_indices, words as _words

class AttentionCache:
    """Attention maps of one run. ``cache[layer, step]`` is ``(items, heads, h, w, keys)``.

    ``items`` follow :attr:`item_keys` (``(branch, prompt)`` pairs, unconditional first); maps reduced over
    steps at capture time are under step ``None``. The cache is a read-only mapping from ``(layer, step)``
    keys to maps: ``(layer, step) in cache``, ``for key in cache``, ``cache.keys()``, ``cache.items()``.

    Example:
        >>> import torch
        >>> from attnlens import capture
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> with capture(pipe, layers="mid.0.cross", steps=[1]) as cache:
        ...     _ = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        >>> ("mid.0.cross", 1) in cache, list(cache), cache.item_keys
        (True, [('mid.0.cross', 1)], [('cond', 0)])
        >>> [(key, tuple(m.shape)) for key, m in cache.items()]
        [(('mid.0.cross', 1), (1, 1, 4, 4, 77))]
    """

    def __init__(self, layers: dict[str, LayerInfo], tokenizer: Any = None) -> None:
        self.layers = layers
        self.maps: dict[tuple[str, int | None], torch.Tensor] = {}
        self.item_keys: list[tuple[str, int]] = []
        self.steps: list[int] = []
        self.latent_hw: tuple[int, int] = (0, 0)
        self.tokens: list[list[str]] = []
        self._tokenizer = tokenizer
        self._counts: dict[str, int] = {}
        self._reduce: str | None = None
        self._heads: str | list[int] | None = None  # the capture's heads selection (None: unknown, older files)
        self._text_calls: list[torch.Tensor] = []

    # ----------------------------------------------------------------- filled by capture
    def _text_pre_hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and not self.maps:
            self._text_calls.append(ids.detach().cpu())

    def _begin(self, rows, steps, latent_hw) -> None:
        self.item_keys = [(branch, p) for _, branch, p in rows]
        self.steps, self.latent_hw = list(steps), tuple(latent_hw)
        if self._text_calls and self._tokenizer is not None:
            ids = self._text_calls[0]  # the pipeline encodes the prompts before the negative prompts
            self.tokens = [self._tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
            self._warn_truncated(ids)

    def _warn_truncated(self, ids: torch.Tensor) -> None:
        """Warn when a prompt fills every token position: CLIP cut it (or it is exactly 75 tokens long)."""
        tok = self._tokenizer
        limit = getattr(tok, "model_max_length", 77)
        end, pad = getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None)
        if end is None or ids.ndim != 2 or ids.shape[1] != limit:
            return
        full = [i for i, row in enumerate(ids.tolist()) if row[-1] == end and row[-2] not in (end, pad)]
        if full:
            last = " ".join(t.replace("</w>", "") for t in self.tokens[full[0]][-6:-1])
            warnings.warn(
                f"prompt(s) {full} fill all {limit} token positions of the text encoder, so they were most likely "
                f"truncated: the tokenizer keeps {limit - 2} tokens between its start and end tokens and drops the "
                f"rest (prompt {full[0]} now ends with '... {last}'; a prompt of exactly {limit - 2} tokens also "
                "fills every position). Words past the cut have no attention map; shorten the prompt to see them.",
                UserWarning,
                stacklevel=2,
            )

    def _slot(self, layer: str, step: int, shape: tuple[int, int, int, int], reduce: str | None,
              dtype: torch.dtype) -> torch.Tensor:
        """Where capture writes one map, ``(items, heads, queries, keys)`` on CPU: a new tensor of ``dtype``, or with
        ``reduce`` the layer's fp32 running sum (zeros at first), to which the map is added in place."""
        if reduce is None:
            return torch.empty(shape, dtype=dtype)
        acc = self.maps.get((layer, None))
        if acc is None:
            return torch.zeros(shape, dtype=torch.float32)
        return acc.view(shape)

    def _store(self, layer: str, step: int, slot: torch.Tensor, reduce: str | None, grid: tuple[int, int]) -> None:
        """Keep a map written into its :meth:`_slot` (``grid``: its query grid ``(h, w)``)."""
        n, hd, _, keys = slot.shape
        maps = slot.view(n, hd, grid[0], grid[1], keys)
        if reduce is None:
            self.maps[(layer, step)] = maps
            return
        self.maps[(layer, None)] = maps  # a running sum; divided by the count on read for reduce="mean"
        self._counts[layer] = self._counts.get(layer, 0) + 1
        self._reduce = reduce

    # ----------------------------------------------------------------- access
    def __getitem__(self, key: tuple[str, int | None]) -> torch.Tensor:
        layer, step = key
        if layer not in self.layers:
            raise AttnlensError(f"layer {layer!r} was not captured; captured: {', '.join(self.layers)}")
        if (layer, step) not in self.maps:
            have = sorted({s for (l, s) in self.maps if l == layer}, key=lambda s: -1 if s is None else s)
            raise AttnlensError(f"no map for layer {layer!r} at step {step!r}; captured steps: {have}")
        m = self.maps[(layer, step)]
        if step is None and self._reduce == "mean":
            m = m / self._counts.get(layer, 1)
        return m

    def keys(self) -> list[tuple[str, int | None]]:
        """The ``(layer, step)`` keys of the stored maps (step ``None`` for maps reduced over steps)."""
        return list(self.maps)

    def items(self) -> list[tuple[tuple[str, int | None], torch.Tensor]]:
        """``[((layer, step), map)]`` for every stored map (each map as ``cache[layer, step]`` returns it)."""
        return [(key, self[key]) for key in self.maps]

    def __contains__(self, key: object) -> bool:
        return key in self.maps

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        return iter(list(self.maps))

    def __len__(self) -> int:
        return len(self.maps)

    def _item(self, prompt: int, branch: str) -> int:
        try:
            return self.item_keys.index((branch, prompt))
        except ValueError:
            raise AttnlensError(f"prompt {prompt} ({branch}) was not captured; captured items: {self.item_keys}") from None

    def aggregate(self, layers: Sequence[str] | None = None, steps: Sequence[int] | None = None,
                  kind: str = "cross", size: tuple[int, int] | None = None,
                  heads: int | Sequence[int] | None = None) -> torch.Tensor:
        """Average maps over layers, steps and heads, brought to one grid: ``(items, h, w, keys)``.

        ``size`` defaults to the largest captured grid; smaller grids are upsampled bilinearly. ``heads``
        (indices, or one index) averages only those heads; it needs maps captured with ``heads="all"``.
        """
        layers = [layers] if isinstance(layers, str) else layers  # one layer's name
        steps = [steps] if isinstance(steps, int) else steps
        names = [n for n, i in self.layers.items() if i.kind == kind] if layers is None else list(layers)
        for n in names:
            if n not in self.layers:
                raise AttnlensError(f"layer {n!r} was not captured; captured: {', '.join(self.layers)}")
        picked = [k for k in self.maps if k[0] in names and (steps is None or k[1] in steps)]
        if not picked:
            raise AttnlensError(f"no captured {kind}-attention maps for layers={layers!r}, steps={steps!r}; captured: "
                                f"{sorted({k[0] for k in self.maps})} at steps {sorted({str(k[1]) for k in self.maps})}")
        if heads is not None:
            heads = self._check_heads(heads, sorted({k[0] for k in picked}))
        maps = [(self[k].float() if heads is None else self[k].float()[:, heads]).mean(dim=1) for k in picked]
        keys = {m.shape[-1] for m in maps}
        if len(keys) > 1:
            raise AttnlensError(f"cannot average maps with different key counts {sorted(keys)} (mixing layers of several grids in self-attention?)")
        if size is None:
            size = max((m.shape[1], m.shape[2]) for m in maps)
        out = torch.zeros(maps[0].shape[0], *size, maps[0].shape[-1])
        for m in maps:
            if tuple(m.shape[1:3]) != tuple(size):
                m = F.interpolate(m.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            out += m
        return out / len(maps)

    def _check_heads(self, heads: Any, names: Sequence[str]) -> list[int]:
        """Validate a heads selection made on read; the maps of ``names`` must hold every head, in order."""
        if isinstance(heads, numbers.Integral) and not isinstance(heads, bool):
            heads = [heads]
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads or any(
                not isinstance(h, numbers.Integral) or isinstance(h, bool) for h in heads):
            raise AttnlensError(f"heads must be a head index or a non-empty list of head indices, not {heads!r}")
        for n in names:
            info = self.layers[n]
            stored = next(t.shape[1] for (l, _), t in self.maps.items() if l == n)
            full = (self._heads == "all" or info.heads == 1
                    or (isinstance(self._heads, list) and self._heads == list(range(info.heads)))
                    or (self._heads is None and stored == info.heads))
            if not full:
                how = f"heads={self._heads!r}" if self._heads is not None else f"{stored} of its {info.heads} heads"
                raise AttnlensError(
                    f"cannot select heads on read: layer {n!r} was captured with {how}, so its maps do not hold every "
                    f"head; capture with heads='all' to choose heads afterwards (or select them at capture time)")
            bad = [h for h in heads if not 0 <= h < info.heads]
            if bad:
                raise AttnlensError(f"head(s) {bad} out of range: layer {n!r} has {info.heads} heads (0..{info.heads - 1})")
        return [int(h) for h in heads]

    def p2p_layers(self) -> list[str]:
        """Prompt-to-Prompt's layers among the captured ones (the rule every P2P edit uses): the
        cross-attention layers of the down and up blocks (the mid block excluded) at the coarsest level they
        reach, relative to the model: the 16x16 maps of SD 1.x at 512x512 (a quarter of the 64x64 latent), the
        8x8 maps of the Shapes model (half of its 16x16 latent)."""
        from ._methods import p2p_layers

        return p2p_layers(list(self.layers.values()))

    def p2p_maps(self) -> torch.Tensor:
        """The Prompt-to-Prompt recipe: :meth:`aggregate` (raw probabilities, equal weights) over
        :meth:`p2p_layers`, ``(items, h, w, 77)``: the down/up blocks' coarsest cross-attention level of the
        model (16x16 on SD 1.x at 512x512, 8x8 on the Shapes model). It follows the reference code for
        editing; for a heat map to look at, :meth:`word_map`'s default localises better on the Shapes model
        (``benchmarks/results/word_map_quality.json``)."""
        return self.aggregate(self.p2p_layers())

    # ----------------------------------------------------------------- words
    def words(self, prompt: int = 0) -> list[str]:
        """The words of a captured prompt, as the tokenizer split them."""
        return [w for w, _ in _words(self._prompt_tokens(prompt))]

    def _prompt_tokens(self, prompt: int) -> list[str]:
        if not self.tokens:
            raise AttnlensError("the prompt's tokens were not recorded (the pipeline has no tokenizer/text encoder hook)")
        if not 0 <= prompt < len(self.tokens):
            raise AttnlensError(f"prompt {prompt} out of range: {len(self.tokens)} prompt(s) captured")
        return self.tokens[prompt]

    def token_indices(self, word: str | int, prompt: int = 0, occurrence: int = 0) -> list[int]:
        """Token positions of ``word`` in a prompt (several for a multi-token word or a phrase).

        ``word`` may be a word or phrase of the prompt (case-insensitive), ``"<start>"``, ``"<end>"``,
        ``"<pad>"`` (every position after the end token), or a token index.
        """
        return _token_indices(self._prompt_tokens(prompt), word, prompt, occurrence)

    def word_map_layers(self) -> list[str]:
        """The layers :meth:`word_map` averages by default: the captured cross-attention layers of the finest
        captured level (level 0, the latent's own grid, when every layer was captured: the 16x16 layers of the
        Shapes model, the 64x64 ones of SD 1.x at 512x512)."""
        cross = [i for i in self.layers.values() if i.kind == "cross"]
        if not cross:
            raise AttnlensError(f"no cross-attention layer was captured (captured: {', '.join(self.layers) or 'none'}); "
                                "word maps need cross-attention: capture(pipe) or kind='cross'")
        finest = min(i.level for i in cross)
        return [i.name for i in cross if i.level == finest]

    def word_map(self, word: str | int, prompt: int = 0, *, layers: Sequence[str] | None = None,
                 steps: Sequence[int] | None = None, heads: int | Sequence[int] | None = None,
                 branch: str = "cond", occurrence: int = 0, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The heat map ``(h, w)`` of a word: its tokens' cross-attention probabilities summed, averaged over
        layers, steps and heads at one grid (the largest of the layers, or ``size``; coarser maps are upsampled
        bilinearly).

        By default the layers are :meth:`word_map_layers`: the captured cross-attention layers of the finest
        captured level, averaged with equal weight. That default was chosen by measurement
        (``python -m benchmarks.word_map_quality``, recorded in ``benchmarks/results/word_map_quality.json``):
        on 48 generations of the Shapes model, scored by IoU with the oracle's object mask (Otsu threshold),
        it averaged 0.445 (95% interval 0.387-0.504), against 0.223 for a DAAM-style aggregation (every layer
        but the mid block, each head upsampled bicubically to the image, summed over steps, averaged) and 0.152
        for the former default, every cross layer averaged with equal weight, the coarse 4x4 mid block included
        (alone it scores 0.039). No other level and no normalised or resolution-weighted mix of levels did
        better (one single layer did, which no model-independent rule would pick). It is measured on the
        Shapes model only; ``layers=[...]`` averages exactly the given layers instead.

        ``steps`` restricts the steps; ``heads`` (a head index or a list) averages only those heads and needs
        the maps captured with ``heads="all"`` (else an :class:`AttnlensError` says so).

        Example:
            >>> import torch
            >>> from attnlens import capture
            >>> from attnlens._testing import tiny_pipeline
            >>> pipe = tiny_pipeline()
            >>> with capture(pipe, heads="all") as cache:
            ...     _ = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
            >>> cache.word_map_layers()
            ['down.0.0.cross', 'up.1.0.cross', 'up.1.1.cross']
            >>> cache.word_map("star").shape, cache.word_map("star", heads=[0, 1]).shape
            (torch.Size([8, 8]), torch.Size([8, 8]))
        """
        idx = self.token_indices(word, prompt, occurrence)
        if layers is None:
            layers = self.word_map_layers()
        maps = self.aggregate(layers, steps, "cross", size, heads=heads)
        return maps[self._item(prompt, branch)][..., idx].sum(dim=-1)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the cache as one safetensors file with its metadata as JSON inside (no pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{layer}@{'reduced' if step is None else step}": t.contiguous() for (layer, step), t in self.maps.items()}
        meta = {
            "layers": {n: i.to_dict() for n, i in self.layers.items()},
            "items": self.item_keys, "steps": self.steps, "latent_hw": list(self.latent_hw), "tokens": self.tokens,
            "counts": self._counts, "reduce": self._reduce, "heads": self._heads,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"attnlens": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionCache":
        """Read a cache written by :meth:`save`.

        The file is checked before anything is read from it (``attnlens._identity.safetensors_problem``: a
        safetensors file, complete, not a renamed pickle), then its metadata (every field :meth:`save` writes,
        no other, each of its type) and its tensors (floating-point ``(items, heads, h, w, keys)`` maps named
        ``layer@step`` of captured layers); an :class:`AttnlensError` naming the file says what is wrong.

        Example:
            >>> import tempfile, torch
            >>> from attnlens import capture
            >>> from attnlens._testing import tiny_pipeline
            >>> pipe = tiny_pipeline()
            >>> with capture(pipe, layers="mid.0.cross") as cache:
            ...     _ = pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
            >>> back = AttentionCache.load(cache.save(Path(tempfile.mkdtemp()) / "maps.safetensors"))
            >>> torch.equal(back["mid.0.cross", 1], cache["mid.0.cross", 1]), back.words()
            (True, ['a', 'red', 'star'])
        """
        from safetensors import safe_open

        path = Path(path)
        meta, header = _check_file(path)
        cache = cls({n: LayerInfo.from_dict(d) for n, d in meta["layers"].items()})
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                layer, step = key.rsplit("@", 1)
                cache.maps[(layer, None if step == "reduced" else int(step))] = f.get_tensor(key)
        cache.item_keys = [tuple(x) for x in meta["items"]]
        cache.steps, cache.latent_hw, cache.tokens = meta["steps"], tuple(meta["latent_hw"]), meta["tokens"]
        cache._counts, cache._reduce = meta["counts"], meta["reduce"]
        cache._heads = meta.get("heads")  # absent in files written before it was recorded
        return cache


_META_FIELDS = {"layers": dict, "items": list, "steps": list, "latent_hw": list, "tokens": list, "counts": dict,
                "reduce": (str, type(None))}
# fields a cache written by an older attnlens may lack
_OPTIONAL_FIELDS = {"heads": (str, list, type(None))}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_file(path: Path) -> tuple[dict, dict]:
    """``(metadata, safetensors header)`` of a cache file; an :class:`AttnlensError` naming the file and the problem."""
    from ._identity import safetensors_header, safetensors_problem

    def bad(problem: str) -> AttnlensError:
        return AttnlensError(f"cannot load the attention cache {path}: it {problem}. A cache file is what "
                             "AttentionCache.save wrote; save it again from a capture")

    if not path.is_file():
        raise bad("does not exist" if not path.exists() else "is not a file")
    problem = safetensors_problem(path)
    if problem is not None:
        raise bad(problem)
    _, header = safetensors_header(path)
    stored = header.get("__metadata__") or {}
    names = [k for k in header if k != "__metadata__"]
    if "__item__" in names or any("|" in n for n in names):
        raise bad("is a shard of attnlens.collect, not an attention cache; read its directory with "
                  "attnlens.load_features(DIR)")
    raw = stored.get("attnlens") if isinstance(stored, dict) else None
    if raw is None:
        raise bad("has no 'attnlens' metadata, so it is not an attnlens cache")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise bad(f"has damaged metadata (not valid JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise bad(f"has damaged metadata (a JSON {type(meta).__name__}, not an object)")
    known = set(_META_FIELDS) | set(_OPTIONAL_FIELDS)
    missing, extra = sorted(set(_META_FIELDS) - set(meta)), sorted(set(meta) - known)
    if missing or extra:
        what = "; ".join(x for x in (f"missing field(s) {missing}" if missing else "",
                                     f"unknown field(s) {extra}" if extra else "") if x)
        raise bad(f"has damaged metadata ({what}; a cache has {sorted(_META_FIELDS)} and may have "
                  f"{sorted(_OPTIONAL_FIELDS)})")
    for name, kind in {**_META_FIELDS, **_OPTIONAL_FIELDS}.items():
        if name in meta and not isinstance(meta[name], kind):
            raise bad(f"has damaged metadata (field {name!r} is a {type(meta[name]).__name__})")
    layers = {}
    for n, d in meta["layers"].items():
        try:
            layers[n] = LayerInfo.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"has damaged metadata (layer {n!r} is not a layer record: {type(exc).__name__} {exc}; a "
                      f"record has {', '.join(f.name for f in dataclasses.fields(LayerInfo) if f.name != 'module')})") from None
    try:
        items = [(str(b), int(p)) for b, p in meta["items"]]
        if len(meta["latent_hw"]) != 2 or not all(isinstance(x, int) for x in meta["latent_hw"]):
            raise ValueError("latent_hw")
        if not all(isinstance(x, int) for x in meta["steps"]) or not all(
                isinstance(row, list) and all(isinstance(t, str) for t in row) for row in meta["tokens"]) or not all(
                isinstance(c, int) and c >= 1 for c in meta["counts"].values()):
            raise ValueError("steps, tokens or counts")
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"has damaged metadata ({type(exc).__name__}: {exc})") from None
    if meta["reduce"] not in (None, "mean", "sum"):
        raise bad(f"has damaged metadata (reduce is {meta['reduce']!r}, not None, 'mean' or 'sum')")
    for key in names:
        layer, _, step = key.rpartition("@")
        t = header[key]
        if layer not in layers or not (step.isdigit() and int(step) in meta["steps"]
                                       or step == "reduced" and meta["reduce"] is not None and layer in meta["counts"]):
            raise bad(f"holds a tensor {key!r} that is no map of its layers {sorted(layers)} at its steps "
                      f"{meta['steps']} (reduce={meta['reduce']!r})")
        if t.get("dtype") not in _FLOAT_DTYPES:
            raise bad(f"holds {t.get('dtype')} maps ({key!r}); a cache holds floating-point maps ({', '.join(_FLOAT_DTYPES)})")
        shape = t.get("shape") or []
        if len(shape) != 5 or shape[0] != len(items):
            raise bad(f"holds a map {key!r} of shape {shape}, not (items={len(items)}, heads, h, w, keys)")
    return meta, header
