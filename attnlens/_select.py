"""The one selector type: which layers, steps, heads, CFG branch and prompts."""

from __future__ import annotations

import fnmatch
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from ._errors import AttnlensError, choices
from ._layers import LayerInfo, LayerTable
from ._prompts import batch_row

LayerSpec = Union[None, str, Sequence[str], Callable[[LayerInfo], bool]]
StepSpec = Union[None, int, Sequence[int], slice, tuple[float, float]]
BRANCHES = ("cond", "uncond", "both")
_STEPS_VALID = ("None (every step), a step index (int), a list of indices, a slice, or a fraction range "
                "(start, end) of floats in 0..1")  # what steps= may be


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_steps(s: object) -> None:
    """An error unless ``s`` is a step spec :meth:`Selector.step_indices` understands."""
    if s is None or _is_int(s):
        return
    if isinstance(s, slice):
        if not all(x is None or _is_int(x) for x in (s.start, s.stop, s.step)) or s.step == 0:
            raise AttnlensError(f"steps must be a slice with int (or None) start and stop and a non-zero step, not {s!r}")
        return
    if isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, float) for x in s):
        if not 0.0 <= s[0] <= s[1] <= 1.0:
            raise AttnlensError(f"steps={s!r}: a fraction range of steps needs 0 <= start <= end <= 1")
        return
    if isinstance(s, Sequence) and not isinstance(s, str):
        bad = [x for x in s if not _is_int(x)]
        if bad:  # an empty list is valid: a controller on no step edits nothing (capture refuses it)
            raise AttnlensError(f"steps must be {_STEPS_VALID}; {s!r} holds {bad[0]!r}, not an int")
        return
    raise AttnlensError(f"steps must be {_STEPS_VALID}, not {s!r}")


def _check_indices(name: str, value: object, valid: str, allow: tuple) -> None:
    """An error unless ``value`` is one of ``allow`` or a non-empty sequence of ints (head or prompt indices)."""
    if any(value is a or (isinstance(value, str) and value == a) for a in allow):
        return
    if isinstance(value, Sequence) and not isinstance(value, str):
        bad = [x for x in value if not _is_int(x)]
        if not bad and value:
            return
        what = f"{value!r} holds {bad[0]!r}, not an int" if bad else f"{value!r} is empty, so it selects nothing"
        raise AttnlensError(f"{name} must be {valid}; {what}")
    raise AttnlensError(f"{name} must be {valid}, not {value!r}")


@dataclass(frozen=True)
class Selector:
    """Where to look. Every field is optional; the defaults select all of it.

    Args:
        layers: a glob over short names or module paths (``"up.*.cross"``), a list of names/globs, or a
            callable ``LayerInfo -> bool``.
        kind: ``"self"``, ``"cross"`` or ``None`` (both).
        resolution: keep layers whose default-size query grid side is in this set (``16`` or ``(8, 16)``).
        steps: an index, a list of indices, a ``slice``, or a fraction range ``(0.0, 0.8)`` of the schedule
            (the first 80% of steps); indices count the pipeline's own denoising loop.
        heads: ``"mean"`` (average over heads), ``"all"``, or a list of head indices.
        branch: classifier-free-guidance half: ``"cond"``, ``"uncond"`` or ``"both"``.
        prompts: indices of the prompts of the batch to keep (``None``: all).

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> from attnlens import layers
        >>> [i.name for i in Selector(layers="mid.*").match(layers(tiny_pipeline()))]
        ['mid.0.self', 'mid.0.cross']
        >>> sorted(Selector(steps=(0.0, 0.5)).step_indices(10))
        [0, 1, 2, 3, 4]
    """

    layers: LayerSpec = None
    kind: str | None = None
    resolution: int | Sequence[int] | None = None
    steps: StepSpec = None
    heads: str | Sequence[int] = "mean"
    branch: str = "cond"
    prompts: Sequence[int] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "heads", "prompts"):  # numpy or torch indices: plain lists
            value = getattr(self, name)
            if hasattr(value, "tolist") and not isinstance(value, (str, numbers.Number)):
                value = value.tolist()
                object.__setattr__(self, name, value if isinstance(value, list) else [value])
        if isinstance(self.prompts, numbers.Integral) and not isinstance(self.prompts, bool):
            object.__setattr__(self, "prompts", [int(self.prompts)])  # one prompt index, as steps takes one step
        _check_steps(self.steps)
        _check_indices("heads", self.heads, "'mean', 'all' or a non-empty list of head indices (ints)",
                       allow=("mean", "all"))
        _check_indices("prompts", self.prompts, "None (all prompts), a prompt index or a non-empty list of them",
                       allow=(None,))
        if self.resolution is not None and not _is_int(self.resolution) and not (
                isinstance(self.resolution, Sequence) and not isinstance(self.resolution, str)
                and self.resolution and all(_is_int(r) for r in self.resolution)):
            raise AttnlensError(f"resolution must be None, a grid side (int) or a list of them, not {self.resolution!r}")
        if self.kind not in (None, "self", "cross"):
            raise AttnlensError(f"kind must be 'self', 'cross' or None, not {self.kind!r}")
        if self.branch not in BRANCHES:
            raise AttnlensError(f"branch must be one of {choices(BRANCHES)}, not {self.branch!r}")
        if not (self.layers is None or isinstance(self.layers, str) or callable(self.layers)
                or (isinstance(self.layers, Sequence) and all(isinstance(x, str) for x in self.layers))):
            raise AttnlensError(f"layers must be a glob, a list of names or a callable, not {type(self.layers).__name__}")

    # ------------------------------------------------------------------ layers
    def match(self, table: LayerTable) -> LayerTable:
        """The layers of ``table`` this selector picks; an error naming the valid ones if none."""
        spec = self.layers
        if spec is None:
            picked = list(table)
        elif callable(spec):
            picked = [i for i in table if spec(i)]
        else:
            globs = [spec] if isinstance(spec, str) else list(spec)
            picked = []
            for g in globs:
                hits = [i for i in table if fnmatch.fnmatchcase(i.name, g) or fnmatch.fnmatchcase(i.path, g)]
                if not hits:
                    raise AttnlensError(f"layer selector {g!r} matches no layer; valid names: {', '.join(table.names())}")
                picked += [h for h in hits if h not in picked]
            picked = [i for i in table if i in picked]
        if self.kind is not None:
            picked = [i for i in picked if i.kind == self.kind]
        if self.resolution is not None:
            sides = {self.resolution} if isinstance(self.resolution, int) else set(self.resolution)
            picked = [i for i in picked if i.resolution[0] in sides or i.resolution[1] in sides]
        if not picked:
            have = sorted({f"{i.kind}@{i.resolution[0]}x{i.resolution[1]}" for i in table})
            raise AttnlensError(
                f"the selection (layers={spec!r}, kind={self.kind!r}, resolution={self.resolution!r}) matches no "
                f"layer; the model has: {', '.join(have)}; names: {', '.join(table.names())}"
            )
        return LayerTable(picked)

    # ------------------------------------------------------------------ steps
    def step_indices(self, n_steps: int) -> set[int]:
        """The selected step indices for a schedule of ``n_steps`` steps."""
        s = self.steps
        if s is None:
            return set(range(n_steps))
        if isinstance(s, slice):
            return set(range(n_steps)[s])
        if isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, float) for x in s):
            lo, hi = s
            if not 0.0 <= lo <= hi <= 1.0:
                raise AttnlensError(f"a fraction range of steps needs 0 <= start <= end <= 1, got {s}")
            return {i for i in range(n_steps) if lo * n_steps <= i < hi * n_steps}
        idx = [s] if isinstance(s, numbers.Integral) else list(s)
        bad = [i for i in idx if not isinstance(i, numbers.Integral) or isinstance(i, bool)
               or not -n_steps <= i < n_steps]
        if bad:
            raise AttnlensError(f"step(s) {bad} out of range: the schedule has {n_steps} steps (0..{n_steps - 1})")
        return {int(i) % n_steps for i in idx}

    # ------------------------------------------------------------------ heads and batch
    def head_indices(self, n_heads: int) -> list[int] | None:
        """``None`` for the mean over heads, else the kept head indices."""
        if self.heads == "mean":
            return None
        if self.heads == "all":
            return list(range(n_heads))
        bad = [h for h in self.heads if not 0 <= h < n_heads]
        if bad:
            raise AttnlensError(f"head(s) {bad} out of range: the layer has {n_heads} heads")
        return list(self.heads)

    def batch_items(self, batch: int, cfg: bool) -> list[tuple[int, str, int]]:
        """``(row in the UNet batch, branch, prompt index)`` of each kept item, uncond first."""
        per = batch // 2 if cfg else batch
        if not cfg and self.branch == "uncond":
            raise AttnlensError("branch='uncond' selected, but this run has no unconditional branch (guidance_scale <= 1)")
        prompts = range(per) if self.prompts is None else list(self.prompts)
        bad = [p for p in prompts if not 0 <= p < per]
        if bad:
            raise AttnlensError(f"prompt index(es) {bad} out of range: the batch has {per} prompt(s)")
        branches = [b for b in ("uncond", "cond") if self.branch in (b, "both") and (cfg or b == "cond")]
        return [(batch_row(p, b, per, cfg), b, p) for b in branches for p in prompts]
