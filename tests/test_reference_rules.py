"""Edits equal to the reference codes: step windows, refine's padding, local blend.

Each reference rule is written here as a small function of its own, from the reference codes' description
(Prompt-to-Prompt's ``ptp_utils``/``seq_aligner`` and notebooks, the FPE code; see /work/shared/PAPER.md and
issue 19), and compared with what :func:`attnlens.edit` does.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attnlens import Selector, capture, control, edit
from attnlens._editing import start_noise
from attnlens._methods import plan
from attnlens._prompts import alignment, token_indices, tokenize

FRACTIONS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# ------------------------------------------------------------------------------------------ step windows
def ref_self_steps(n: int, f: float) -> set[int]:
    """FPE's and P2P's self-attention window: ``int(num_steps * 0) <= cur_step < int(num_steps * f)``."""
    lo, hi = int(n * 0.0), int(n * f)
    return {i for i in range(n) if lo <= i < hi}


def ref_cross_steps(n: int, f: float) -> set[int]:
    """P2P's cross-attention window: a table of ``num_steps + 1`` rows, rows ``int(0 * rows)..int(f * rows)`` on,
    read at row ``cur_step``."""
    rows = n + 1
    table = [0] * rows
    for i in range(int(0.0 * rows), int(f * rows)):
        table[i] = 1
    return {i for i in range(n) if table[i]}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 10, 12, 13, 25, 50])
def test_step_windows_count_as_the_reference_codes(pipe, n):
    for f in FRACTIONS:
        assert Selector(steps=(0.0, f)).step_indices(n) == ref_self_steps(n, f), (n, f)
        fpe = plan(pipe, "fpe", {"steps": (0.0, f)}, "a red star", "a blue star", (8, 8))
        assert fpe.controllers[0]._step_indices(n) == ref_self_steps(n, f), (n, f)
        p2p = plan(pipe, "p2p", {"cross_replace_steps": f, "self_replace_steps": f, "self_max_resolution": 8},
                   "a red star", "a blue star", (8, 8))
        cross, copy = p2p.controllers
        assert cross._step_indices(n) == ref_cross_steps(n, f), (n, f)
        assert copy._step_indices(n) == ref_self_steps(n, f), (n, f)
    # the reference codes' own defaults: 40 of 50 (FPE, P2P cross), 20 of 50 (P2P self); 9 and 4 of 12
    assert len(ref_self_steps(50, 0.8)) == 40 and len(ref_cross_steps(50, 0.8)) == 40 and len(ref_self_steps(50, 0.4)) == 20
    assert len(ref_self_steps(12, 0.8)) == 9 and len(ref_self_steps(12, 0.4)) == 4


@pytest.mark.parametrize("n", [1, 2, 5, 12, 20, 25, 50, 75, 100])
def test_masactrl_skips_at_least_the_references_share_of_first_steps(pipe, n):
    """MasaCtrl's reference starts at integer step 4 of 50; as a share, the start is rounded up (unchanged)."""
    ctrl = plan(pipe, "masactrl", {}, "a red star", "a blue star", (8, 8)).controllers[0]
    first = -(-4 * n // 50)  # ceil(4n / 50) in integers
    assert ctrl._step_indices(n) == set(range(first, n))
    assert (n != 50) or first == 4


def test_fpe_edits_int_08n_steps_end_to_end(pipe):
    """At 6 steps FPE edits int(0.8 * 6) = 4 steps (0..3), not ceil(4.8) = 5: the target's map equals the
    source's exactly on those steps."""
    n = 6
    r = edit(pipe, "a red star", "a blue circle", method="fpe", seed=0, num_inference_steps=n, max_resolution=8,
             capture=dict(layers="down.0.0.self", prompts=[0, 1]))
    same = [torch.allclose(r.cache["down.0.0.self", s][0].float(), r.cache["down.0.0.self", s][1].float(), atol=1e-3)
            for s in range(n)]
    assert same == [i in ref_self_steps(n, 0.8) for i in range(n)] == [True] * 4 + [False] * 2


# ------------------------------------------------------------------------------------------ refine's padding
def ref_get_mapper(x: list[int], y: list[int], max_len: int = 77) -> tuple[list[int], list[float]]:
    """P2P's refinement mapper of target ids ``y`` to source ids ``x`` (start and end tokens included, no padding):
    global alignment (gap 0, match 1, mismatch -1; ties prefer left, then up, then diagonal), each target token
    mapped to its aligned source token (-1 and alpha 0 where it is inserted); positions from ``len(y)`` on map
    to themselves with alpha 1."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        trace[0][j] = 1
    for i in range(1, nx + 1):
        trace[i][0] = 2
    trace[0][0] = 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    i, j, pairs = nx, ny, []
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif t == 1:
            j -= 1
            pairs.append((j, -1))
        elif t == 2:
            i -= 1
        else:
            break
    pairs.reverse()
    mapper = [p[1] for p in pairs] + list(range(ny, max_len))
    alpha = [float(p[1] != -1) for p in pairs] + [1.0] * (max_len - ny)
    return mapper, alpha


@pytest.mark.parametrize("source,target", [
    ("a red star", "a big red star"),
    ("a big red star", "a red star"),
    ("a red star", "a red star on the left"),
    ("a blue circle and a red star", "a blue circle"),
    ("a star", "a shiny red star at the top"),
])
def test_refine_mapper_equals_the_reference(pipe, source, target):
    tok = pipe.tokenizer
    x, y = tok(source).input_ids, tok(target).input_ids  # start ... end, unpadded
    mapper, alpha, mode = alignment(tok, source, target, "refine")
    ref_mapper, ref_alpha = ref_get_mapper(x, y)
    assert mode == "refine"
    # the reference maps inserted tokens to -1 (its alpha 0 ignores the map); compare where alpha is 1
    kept = [p for p in range(77) if ref_alpha[p] == 1.0]
    assert alpha.tolist() == ref_alpha
    assert mapper[kept].tolist() == [ref_mapper[p] for p in kept]
    # padding positions map to themselves, not to the source's shifted positions
    assert mapper[len(y):].tolist() == list(range(len(y), 77))


# ------------------------------------------------------------------------------------------ local blend
def ref_local_blend(x_t: torch.Tensor, store: list[torch.Tensor], alpha_layers: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """P2P's ``LocalBlend.__call__`` on an attention store: ``store`` holds, per layer, the maps
    ``(prompts, heads, h, w, 77)`` summed over every step so far; ``alpha_layers`` ``(prompts, 77)`` marks
    each prompt's word."""
    maps = torch.cat(store, dim=1)  # (prompts, layers * heads, h, w, 77)
    maps = (maps * alpha_layers[:, None, None, None, :]).sum(-1).mean(1)[:, None]  # (prompts, 1, h, w)
    mask = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(mask, size=x_t.shape[2:])
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(threshold)
    mask = (mask[:1] + mask[1:]).float()
    return x_t[:1] + mask * (x_t - x_t[:1])


def _reference_run(pipe, source, target, words, n, z, start, accumulate, threshold):
    """The P2P edit through attnlens's controllers, blended by :func:`ref_local_blend` from a store built
    here from per-step maps (summed over steps so far when ``accumulate``, else the current step's)."""
    p = plan(pipe, "p2p", {"local_blend": words}, source, target, tuple(z.shape[-2:]))
    names = p.blend_layers
    toks = tokenize(pipe.tokenizer, [source, target])
    alpha_layers = torch.zeros(2, 77)
    for prompt, word in enumerate(words):
        alpha_layers[prompt, token_indices(toks[prompt], word)] = 1.0
    store: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for ctrl in p.controllers:
            stack.enter_context(control(pipe, ctrl))
        cache = stack.enter_context(capture(pipe, layers=names, prompts=[0, 1], heads="all", dtype=torch.float32))

        def cb(_pipe, i, t, kw):
            for name in names:
                store[name] = cache[name, i] + (store[name] if accumulate and name in store else 0)
            if i < start:
                return {}
            return {"latents": ref_local_blend(kw["latents"], [store[n_] for n_ in names], alpha_layers, threshold)}

        return pipe([source, target], latents=z.expand(2, -1, -1, -1), num_inference_steps=n, output_type="pt",
                    callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images


@pytest.mark.parametrize("blend_start", [0.0, 0.2])
def test_local_blend_masks_come_from_the_maps_of_all_steps_so_far(pipe, blend_start):
    # the tiny random model's word maps are flat: a high threshold makes the masks partial
    source, target, words, n, th = "a red star", "a blue circle", ("star", "circle"), 5, 0.9
    z = start_noise(pipe, 4)
    ours = edit(pipe, source, target, method="p2p", latents=z, num_inference_steps=n, local_blend=words,
                blend_start=blend_start, blend_threshold=th).pixels
    start = int(blend_start * n)  # the null-text notebook: blend once counter (= step + 1) > int(0.2 * n)
    ref = _reference_run(pipe, source, target, words, n, z, start, True, th)
    assert (ours - ref).abs().max() < 1e-4
    current_only = _reference_run(pipe, source, target, words, n, z, start, False, th)
    assert (current_only - ref).abs().max() > 1e-3  # the two rules differ here, so the test can tell them apart
