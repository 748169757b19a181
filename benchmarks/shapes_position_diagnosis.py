"""Why are position words hard for a Shapes model to learn, and where would they be lost? Five measurements
that split the question up (the first Shapes model ignored its position words; the embedded one uses them).

1. **Text side.** Does the text encoder tell the position words apart? For each attribute, prompts that
   differ in one value only ("a red star on the left" / "... on the right"; "a red star" / "a blue
   star") are encoded, and the L2 distance between their last-layer hidden states is averaged over the
   prompt's tokens (start to end token) and over every pair of values. Colour words far apart and
   position words close together say the encoder has (nearly) merged the position words, so the UNet
   has nothing to tell them apart by.
2. **Image side.** Do the UNet's cross-attention queries know where they are? The queries of every
   cross-attention layer (``to_q`` output, read with a forward hook on a diffusers module, nothing
   installed in attnlens) for ``--n`` noise latents and the empty prompt at a few timesteps; a ridge
   regression from a query to its normalised (x, y) grid coordinate, fitted on three quarters of the
   latents and scored (R^2) on the rest, on every position and on the inner half of the grid only
   (where zero padding at the border gives no direct cue). A query that knows its position can attend
   to a position word selectively; an R^2 near 0 says it cannot.

3. **Word embeddings.** The norm of each attribute's word embeddings (the text encoder's input table,
   one row per token, mean over the attribute's values) beside the mean norm of tokens no Shapes
   prompt contains, which training never touches and which keep their random initialisation; and the
   *spread* of each attribute's words (mean distance between the rows of its values; a word of several
   tokens is their mean row), which says whether training pulled the values apart. Words whose norm and
   spread stay near the untouched tokens' were never pulled anywhere by training.
4. **Position in the noisy latent.** How plainly the noisy latent itself shows where the object is, at
   the training timesteps: for 64 scenes moved from the center to the left (everything else kept),
   the energy of the latent difference ``||z_left - z_center||^2`` (posterior means times the
   pipeline's ``scaling_factor``) gives a matched-filter detectability ``d' = sqrt(snr(t) * energy)``
   with ``snr(t) = alpha_bar / (1 - alpha_bar)`` of the pipeline's scheduler; the same for a change of
   colour (to red, or to blue for red objects). A ``d'`` well above 1 even at the noisiest training
   step says the noisy latent already shows the attribute at every step of training, so the prompt's
   word adds little there; position and colour side by side say whether that visibility can explain
   why one is learnt and the other not.
5. **What a word says on its own.** The share of the variance of the training images that each
   attribute's conditional mean explains, over ``--scenes`` random scenes, in pixels and in the
   scaled latent: ``sum_v p_v ||E[x | v] - E[x]||^2 / E||x - E[x]||^2``, bias-corrected for the
   finite sample (between-group minus its expectation under no effect, as in omega-squared). Denoising
   at the noisiest steps, where the latent shows nothing yet, is a regression to exactly these
   conditional means, so an attribute with a small share gives its word almost no gradient on its own.
   Beside it, the share position adds once colour and background are known. The world's eight object
   colours average to a gray close to the average background, so a word that says only *where* the
   object is moves the mean image very little, while a colour word moves it a lot.

A diagnostic for the model card and for whoever trains the next model: it does not enter the quality bar.

Writes ``benchmarks/results/shapes_position_diagnosis.json``.

    python -m benchmarks.shapes_position_diagnosis                  # the embedded model
    python -m benchmarks.shapes_position_diagnosis --model DIR --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import attnlens
from attnlens import shapes
from attnlens.shapes._world import POSITION_PHRASES
from tools.shapes_model.card import fingerprint

ROOT = Path(__file__).resolve().parents[1]

TIMESTEPS = (999, 800, 500)
TEMPLATES = {  # one value swapped, everything else fixed
    "colour": lambda v: f"a {v} star on the left",
    "shape": lambda v: f"a red {v} on the left",
    "size": lambda v: f"a {v} red star on the left",
    "position": lambda v: f"a red star {POSITION_PHRASES[v][0]}",
    "background": lambda v: f"a red star on a {v} background",
}


def text_distances(pipe) -> dict[str, float]:
    """Mean hidden-state distance between prompts that differ in one attribute value."""
    out = {}
    for attribute, template in TEMPLATES.items():
        prompts = [template(v) for v in shapes.ATTRIBUTES[attribute]]
        tok = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            h = pipe.text_encoder(tok.input_ids)[0]  # (values, 77, width)
        length = int(tok.attention_mask.sum(1).max())  # start .. end token of the longest prompt
        d = [float((h[i, :length] - h[j, :length]).norm(dim=-1).mean())
             for i, j in itertools.combinations(range(len(prompts)), 2)]
        out[attribute] = float(np.mean(d))
    return out


def embedding_norms(pipe, n_prompts: int = 2000, seed: int = 0) -> dict:
    """Mean token-embedding norm per attribute's words, and of tokens no Shapes prompt contains."""
    from attnlens.shapes._world import sample_example

    tok = pipe.tokenizer
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    rng = np.random.default_rng(seed)
    seen = set()
    for _ in range(n_prompts):
        seen.update(tok(sample_example(rng).prompt).input_ids)
    phrases = {a: list(v) for a, v in shapes.ATTRIBUTES.items()}
    phrases["position"] = [POSITION_PHRASES[v][0].split()[-1] for v in shapes.ATTRIBUTES["position"]]
    out: dict = {"spread": {}}
    for attribute, words in phrases.items():
        rows = torch.stack([table[tok(w, add_special_tokens=False).input_ids].mean(0) for w in words])
        out[attribute] = float(rows.norm(dim=-1).mean())
        out["spread"][attribute] = float(torch.pdist(rows).mean())  # how far apart the values' words are
    unseen = torch.tensor([i for i in range(table.shape[0]) if i not in seen])
    unseen_norms = table[unseen].norm(dim=-1)
    out["unseen_tokens"], out["unseen_tokens_std"] = float(unseen_norms.mean()), float(unseen_norms.std())
    sample = unseen[torch.randperm(len(unseen), generator=torch.Generator().manual_seed(seed))[:200]]
    out["spread"]["unseen_tokens"] = float(torch.pdist(table[sample]).mean())
    return out


@torch.no_grad()
def _encode(pipe, pixels: np.ndarray) -> torch.Tensor:
    """Scaled VAE posterior means (n, 4, 16, 16) of images (n, 64, 64, 3) in [-1, 1], 128 at a time."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(pipe.vae.dtype)
    return torch.cat([pipe.vae.encode(x[i : i + 128]).latent_dist.mean.float()
                      for i in range(0, len(x), 128)]) * pipe.vae.config.scaling_factor


@torch.no_grad()
def latent_detectability(pipe, n: int, seed: int) -> dict:
    """Matched-filter d' of a position change and of a colour change in the noisy latent, per timestep."""
    rng = np.random.default_rng(seed)
    base = [shapes.sample_scene(rng, position="center") for _ in range(n)]
    variants = {
        "position": [shapes.with_attribute(s, position="left") for s in base],
        "colour": [shapes.with_attribute(s, colour="blue" if s.colour == "red" else "red") for s in base],
    }

    def encode(scenes):
        return _encode(pipe, np.stack([shapes.render(s)[0] for s in scenes]).astype(np.float32) / 127.5 - 1)

    z0 = encode(base)
    alphas = pipe.scheduler.alphas_cumprod.double()
    steps = (999, 961, 900, 800, 600, 400)
    out = {"timesteps": list(steps), "snr": [float(alphas[t] / (1 - alphas[t])) for t in steps]}
    for name, scenes in variants.items():
        energy = (encode(scenes) - z0).pow(2).sum(dim=(1, 2, 3)).median().item()
        out[name] = {"energy_median": energy,
                     "d_prime": [float((alphas[t] / (1 - alphas[t]) * energy) ** 0.5) for t in steps]}
    return out


def _explained(x: np.ndarray, labels: np.ndarray) -> float:
    """Bias-corrected share of the variance of ``x`` (n, d) explained by the group means of ``labels``."""
    n, mean = len(x), x.mean(0)
    total = float(((x - mean) ** 2).sum())
    between = within = 0.0
    groups = np.unique(labels)
    for g in groups:
        xs = x[labels == g]
        m = xs.mean(0)
        between += len(xs) * float(((m - mean) ** 2).sum())
        within += float(((xs - m) ** 2).sum())
    # under no effect the between-group sum of squares is (k - 1) times the within-group mean square
    return (between - (len(groups) - 1) * within / max(1, n - len(groups))) / total


@torch.no_grad()
def mean_image_shares(pipe, n: int, seed: int) -> dict:
    """Variance share of each attribute's conditional mean image, in pixels and in the scaled latent."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    pixels = np.stack([shapes.render(s)[0] for s in scenes]).astype(np.float32) / 127.5 - 1  # (n, 64, 64, 3)
    z = _encode(pipe, pixels)
    spaces = {"pixels": pixels.reshape(n, -1).astype(np.float64), "latent": z.reshape(n, -1).double().numpy()}
    labels = {a: np.array([getattr(s, a) for s in scenes]) for a in shapes.ATTRIBUTES}
    colour_bg = np.char.add(np.char.add(labels["colour"], "|"), labels["background"])
    out: dict = {"n_scenes": n}
    for space, data in spaces.items():
        shares = {a: _explained(data, lab) for a, lab in labels.items()}
        shares["position_given_colour_background"] = (
            _explained(data, np.char.add(np.char.add(colour_bg, "|"), labels["position"]))
            - _explained(data, colour_bg))
        out[space] = shares
    return out


def query_position_r2(pipe, n: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """R^2 of a ridge regression from each cross-attention layer's queries to their grid coordinates."""
    from sklearn.linear_model import RidgeCV

    unet = pipe.unet
    modules = dict(unet.named_modules())
    cross = [info for info in attnlens.layers(pipe) if info.kind == "cross"]
    queries: dict[str, torch.Tensor] = {}
    handles = [modules[info.path].to_q.register_forward_hook(
        lambda module, args, output, name=info.name: queries.__setitem__(name, output.detach()))
        for info in cross]
    ids = pipe.tokenizer([""] * n, padding="max_length", max_length=77, return_tensors="pt").input_ids
    size = unet.config.sample_size
    out: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with torch.no_grad():
            emb = pipe.text_encoder(ids)[0]
            latents = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
            for t in TIMESTEPS:
                queries.clear()
                unet(latents, t, encoder_hidden_states=emb)
                for name, q in queries.items():
                    _, hw, width = q.shape
                    side = int(round(hw ** 0.5))
                    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
                    coords = np.stack([xx.ravel(), yy.ravel()], 1) / max(1, side - 1)  # (hw, 2)
                    inner = np.zeros((side, side), bool)
                    inner[side // 4 : side - side // 4, side // 4 : side - side // 4] = True
                    X, Y = q.numpy(), np.broadcast_to(coords, (n, hw, 2))
                    split = (3 * n) // 4
                    scores = {}
                    for label, keep in (("all", np.ones(hw, bool)), ("inner_half", inner.ravel())):
                        fit = RidgeCV(alphas=np.logspace(-3, 3, 7)).fit(X[:split][:, keep].reshape(-1, width),
                                                                        Y[:split][:, keep].reshape(-1, 2))
                        scores[label] = float(fit.score(X[split:][:, keep].reshape(-1, width),
                                                        Y[split:][:, keep].reshape(-1, 2)))
                    out.setdefault(name, {"grid": f"{side}x{side}"})[str(t)] = scores
    finally:
        for handle in handles:
            handle.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: $ATTNLENS_MODEL or the embedded model)")
    ap.add_argument("--n", type=int, default=32, help="noise latents (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=4096, help="random scenes for the mean-image shares (default 4096)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shapes_position_diagnosis.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = attnlens.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    text = text_distances(pipe)
    r2 = query_position_r2(pipe, args.n, args.seed)
    norms = embedding_norms(pipe)
    detect = latent_detectability(pipe, 64, args.seed)
    shares = mean_image_shares(pipe, args.scenes, args.seed)
    record = {
        "command": "python -m benchmarks.shapes_position_diagnosis" + (f" --model {args.model}" if args.model else ""),
        "model": str(args.model or "embedded Shapes model"),
        "model_fingerprint": fingerprint(args.model or os.environ.get("ATTNLENS_MODEL")
                                         or attnlens._pipeline.EMBEDDED_MODEL),
        "n_latents": args.n, "seed": args.seed, "timesteps": list(TIMESTEPS),
        "text_distance": text,
        "text_distance_meaning": "mean L2 distance of text-encoder states between prompts differing in one value",
        "query_position_r2": r2,
        "query_position_r2_meaning": "held-out R^2 of ridge regression from a layer's queries to (x, y); "
                                     "inner_half: positions away from the border only",
        "embedding_norm": norms,
        "embedding_norm_meaning": "mean L2 norm of the text encoder's input embedding rows of each attribute's "
                                  "words; spread: mean distance between the rows of an attribute's values; "
                                  "unseen_tokens: tokens no Shapes prompt contains (random initialisation)",
        "latent_detectability": detect,
        "latent_detectability_meaning": "matched-filter d' = sqrt(snr(t) * ||z_changed - z_center||^2) of a "
                                        "center->left move and of a colour change in the noisy latent (64 scenes, "
                                        "median energy)",
        "mean_image_share": shares,
        "mean_image_share_meaning": "bias-corrected share of the variance of random renders (pixels; latent: "
                                    "posterior means times scaling_factor) explained by each attribute's "
                                    "conditional mean image; position_given_colour_background: the share "
                                    "position adds once colour and background are known",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print("text encoder: mean state distance between prompts that differ in one value")
    for a, d in text.items():
        print(f"  {a:<11} {d:6.2f}")
    print("cross-attention queries -> (x, y): held-out R^2, all positions / inner half")
    print(f"  {'layer':<16} {'grid':>5}" + "".join(f"{'t=' + str(t):>16}" for t in TIMESTEPS))
    for name, r in r2.items():
        print(f"  {name:<16} {r['grid']:>5}" + "".join(
            f"{r[str(t)]['all']:>8.2f} / {r[str(t)]['inner_half']:5.2f}" for t in TIMESTEPS))
    print("word embeddings: mean norm per attribute's words "
          f"(tokens no prompt contains: {norms['unseen_tokens']:.3f} +- {norms['unseen_tokens_std']:.3f})")
    print(f"  {'':<11} {'norm':>6} {'spread':>7}   (untouched tokens' spread {norms['spread']['unseen_tokens']:.3f})")
    for a in shapes.ATTRIBUTES:
        print(f"  {a:<11} {norms[a]:6.3f} {norms['spread'][a]:7.3f}")
    print("noisy latent: matched-filter d' of a change, per training timestep")
    print("  " + " ".join(f"{'t=' + str(t):>7}" for t in detect["timesteps"]))
    for name in ("position", "colour"):
        print(f"  {name:<9}" + " ".join(f"{d:7.2f}" for d in detect[name]["d_prime"]))
    print(f"share of the image variance each attribute's mean image explains ({shares['n_scenes']} scenes)")
    print(f"  {'':<34} {'pixels':>7} {'latent':>7}")
    for a in list(shapes.ATTRIBUTES) + ["position_given_colour_background"]:
        print(f"  {a:<34} {shares['pixels'][a]:7.3f} {shares['latent'][a]:7.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
