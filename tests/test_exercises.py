"""The book's exercise checkers (attnlens_exercises): each passes the reference solution, rejects an obviously
wrong implementation with ExerciseFailed, and reports an untouched stub as not attempted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlens
import attnlens_exercises as ex
from attnlens_exercises import solutions as sol


def stub(*args, **kwargs):
    raise NotImplementedError


class StubClass:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError


# ---- wrong answers, each a plausible mistake
def sample_wrong_guidance(pipe, prompt, latents, steps, scale):   # guidance pushed the wrong way
    cond, uncond = pipe.encode_prompt(prompt, latents.device, 1, True)
    emb = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(steps)
    x = latents
    for t in pipe.scheduler.timesteps:
        eu, ec = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        x = pipe.scheduler.step(ec + scale * (eu - ec), t, x).prev_sample
    return x


def probs_unscaled(attn, hidden, context=None):                    # forgot the 1/sqrt(d)
    c = hidden if context is None else context
    b, h = hidden.shape[0], attn.heads
    q, k = attn.to_q(hidden), attn.to_k(c)
    d = q.shape[-1] // h
    q, k = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k))
    return (q @ k.transpose(-1, -2)).softmax(-1)


class CaptureKeepsNothingRight(sol.CaptureProcessor):              # stores the map but returns the input
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        super().__call__(attn, hidden_states, encoder_hidden_states)
        return hidden_states


class AblateByIdentity:                                            # "ablation" that passes the input through
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return hidden_states


def probe_ungrouped(x, y, groups, cv):                             # folds ignore the groups: leaks
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=1000), x, y, cv=cv).mean())


class P2PBothWays(attnlens.Controller):                            # swaps the maps instead of copying
    def edit_map(self, site):
        s, t = site.row(0), site.row(1)

        def fn(start, probs):
            probs = probs.clone()
            probs[[s, t]] = probs[[t, s]]
            return probs

        return fn


class FPEQueriesOnly(attnlens.Controller):                         # injects Q but keeps the target's K
    def rewrite(self, site, q, k, v):
        q = q.clone()
        q[site.row(1)] = q[site.row(0)]
        return q, k, v


def inversion_swapped(x, eps, a_from, a_to):                       # alphas the wrong way round (denoises)
    return sol.inversion_step(x, eps, a_to, a_from)


def iou_over_source(a, b):                                         # intersection over the source's area
    from attnlens.shapes.oracle import read

    ma, mb = read(a).mask, read(b).mask
    return float(np.logical_and(ma, mb).sum() / max(ma.sum(), 1))


def fpe_layers_every_self(table, hw):                              # every self layer, finest included
    return [i.name for i in table if i.kind == "self"]


CASES = [
    (ex.check_sampler, sol.sample, sample_wrong_guidance, stub),
    (ex.check_attention_probs, sol.attention_probs, probs_unscaled, stub),
    (ex.check_capture_processor, sol.CaptureProcessor, CaptureKeepsNothingRight, StubClass),
    (ex.check_self_attention_ablation, sol.ZeroSelfAttention, AblateByIdentity, StubClass),
    (ex.check_grouped_probe, sol.grouped_probe, probe_ungrouped, stub),
    (ex.check_p2p_replace, sol.P2PReplace, P2PBothWays, StubClass),
    (ex.check_fpe_controller, sol.FPE, FPEQueriesOnly, StubClass),
    (ex.check_inversion_step, sol.inversion_step, inversion_swapped, stub),
    (ex.check_mask_iou, sol.mask_iou, iou_over_source, stub),
    (ex.check_fpe_rule, sol.fpe_layers, fpe_layers_every_self, stub),
]


def test_every_checker_is_tested():
    assert sorted(c.__name__ for c, *_ in CASES) == sorted(ex.CHECKERS)


@pytest.mark.parametrize("check, right, wrong, untouched", CASES, ids=[c.__name__ for c, *_ in CASES])
def test_checker_passes_the_solution_and_rejects_a_wrong_one(check, right, wrong, untouched, capsys):
    assert check(right) is True
    assert "passed" in capsys.readouterr().out
    with pytest.raises(ex.ExerciseFailed, match=check.__name__):
        check(wrong)
    assert check(untouched) is False
    assert "not attempted" in capsys.readouterr().out


def test_the_package_docstring_example_runs():
    import doctest

    result = doctest.testmod(ex, verbose=False)
    assert result.attempted > 0 and result.failed == 0
