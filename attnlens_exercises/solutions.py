"""Reference solutions of the book's implement-it exercises (try first; the checkers say what went wrong).

Each is checked by its checker in the book's hidden solution cells and in the test suite.
"""

from __future__ import annotations

import numpy as np
import torch

import attnlens


# chapter 1: classifier-free guidance and the DDIM loop
def sample(pipe, prompt, latents, num_inference_steps, guidance_scale):
    """Denoise ``latents`` ``(1, 4, h, w)`` with classifier-free guidance; returns the final latents."""
    cond, uncond = pipe.encode_prompt(prompt, latents.device, 1, True)
    emb = torch.cat([uncond, cond])                          # the batch is [unconditional, conditional]
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps)
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        eps_uncond, eps_cond = pipe.unet(x_in, t, encoder_hidden_states=emb).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = sched.step(eps, t, x).prev_sample
    return x


# chapter 2: an attention map, from the layer's own projections
def attention_probs(attn, hidden_states, encoder_hidden_states=None):
    """``softmax(Q K^T / sqrt(d))`` per head: ``(batch, heads, queries, keys)``."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    b = hidden_states.shape[0]
    q, k = attn.to_q(hidden_states), attn.to_k(context)
    d = q.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)


# chapter 3: a processor that captures the map and computes the layer's usual output
class CaptureProcessor:
    """A diffusers attention processor that stores each call's map ``(batch, heads, queries, keys)`` in ``maps``."""

    def __init__(self):
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        probs = attention_probs(attn, hidden_states, encoder_hidden_states)
        self.maps.append(probs.detach().cpu())
        v = attn.to_v(context)
        d = v.shape[-1] // attn.heads
        v = v.view(b, -1, attn.heads, d).transpose(1, 2)
        out = (probs @ v).transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))         # output projection, then dropout


# chapter 4: the ablation
class ZeroSelfAttention:
    """A processor whose layer contributes nothing: the block around it keeps only its residual."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return torch.zeros_like(hidden_states)


# chapter 5: a probe with folds grouped by prompt
def grouped_probe(x, y, groups, cv):
    """Mean held-out accuracy of a logistic-regression probe over ``cv`` folds that never split a group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for train, test in GroupKFold(n_splits=cv).split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        clf.fit(x[train], y[train])
        scores.append(clf.score(x[test], y[test]))
    return float(np.mean(scores))


# chapter 6: Prompt-to-Prompt's replace, as an attnlens controller
class P2PReplace(attnlens.Controller):
    """The target's (prompt 1) cross-attention map := the source's (prompt 0), conditional branch."""

    def edit_map(self, site):
        s, t = site.row(0, "cond"), site.row(1, "cond")

        def fn(start, probs):
            probs = probs.clone()
            probs[t] = probs[s]
            return probs

        return fn


# chapter 7: Free-Prompt Editing, as an attnlens controller (fused: inject the source's queries and keys)
class FPE(attnlens.Controller):
    """The target's self-attention output := softmax(Q_src K_src^T / sqrt(d)) V_tgt, conditional branch."""

    def rewrite(self, site, q, k, v):
        s, t = site.row(0, "cond"), site.row(1, "cond")
        q, k = q.clone(), k.clone()
        q[t], k[t] = q[s], k[s]
        return q, k, v


# chapter 8: one DDIM inversion step
def inversion_step(x, eps, alpha_from, alpha_to):
    """Move ``x`` from noise level ``alpha_from`` to ``alpha_to`` (cumulative alphas) along the DDIM path."""
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()   # the clean latent the estimate implies
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


# chapter 9: the benchmark's IoU
def mask_iou(source_image, edited_image):
    """Intersection over union of the object masks the oracle reads in the two images."""
    from attnlens.shapes.oracle import read

    a, b = read(source_image), read(edited_image)
    if not (a.found and b.found):
        return float("nan")
    return float(np.logical_and(a.mask, b.mask).sum() / max(np.logical_or(a.mask, b.mask).sum(), 1))


# chapter 10: FPE's default layer rule
def fpe_layers(table, latent_size):
    """Self-attention layers whose query grid side is at most half the finest self-attention grid side."""
    selfs = [i for i in table if i.kind == "self"]
    finest = max(max(i.grid(latent_size)) for i in selfs)
    return [i.name for i in selfs if max(i.grid(latent_size)) <= finest // 2]
