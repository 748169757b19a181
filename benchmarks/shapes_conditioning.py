"""Does the Shapes model use each attribute word of its prompt? A denoising-loss test, per attribute and noise level.

For each attribute (shape, colour, size, position, background), ``--n`` rendered scenes (seeded) are
encoded by the model's VAE, noised at fixed timesteps with fixed noise, and denoised by the UNet twice:
with a prompt naming the scene's true value of the attribute ("a photo of a star on the left") and with
the same prompt naming another value ("a photo of a star at the top": same template, one value
swapped at random). If the model uses the word, the wrong prompt predicts the noise worse. The gap is
reported as the relative increase of the epsilon MSE, ``(wrong - right) / right``, per timestep, with
a 95% interval over the scenes (paired differences). A v-prediction model's output is converted to
epsilon first; at a fixed timestep the epsilon, x0 and v errors are proportional, so the relative gap
does not depend on the parametrisation. A gap of zero says the model ignores that word at
that noise level, whatever the images look like.

This is a diagnostic, not part of the quality bar: it tells whether more training of the same recipe
can fix a prompted attribute that the oracle does not read (a gap that grows between checkpoints) or
whether the model does not condition on it at all (a gap that stays at zero).

Writes ``benchmarks/results/shapes_conditioning.json``.

    python -m benchmarks.shapes_conditioning                  # the embedded model
    python -m benchmarks.shapes_conditioning --model DIR --out /tmp/cond.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import attnlens
from attnlens import shapes
from tools.shapes_model.card import fingerprint

ROOT = Path(__file__).resolve().parents[1]

TIMESTEPS = (999, 900, 800, 600, 400, 200)
SEED = 31


def swapped(scene: shapes.Scene, attribute: str, rng: np.random.Generator) -> shapes.Scene:
    """The scene with ``attribute`` set to another of its values, chosen by ``rng``."""
    values = dataclasses.asdict(scene)
    others = [v for v in shapes.ATTRIBUTES[attribute] if v != values[attribute]]
    values[attribute] = others[int(rng.integers(len(others)))]
    return shapes.Scene(**values)


@torch.no_grad()
def gaps(pipe, attribute: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, list(shapes.ATTRIBUTES).index(attribute)])
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    mention = ("shape",) if attribute == "shape" else ("shape", attribute)
    right, wrong = [], []
    for i, s in enumerate(scenes):  # the same template (word order, prefix) for both prompts of a scene
        right.append(shapes.describe(s, mention, np.random.default_rng([seed, 1, i])))
        wrong.append(shapes.describe(swapped(s, attribute, rng), mention, np.random.default_rng([seed, 1, i])))
    pixels = torch.from_numpy(np.stack([shapes.render(s)[0] for s in scenes])).permute(0, 3, 1, 2)
    x = pixels.float() / 127.5 - 1
    z0 = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean.float() * pipe.vae.config.scaling_factor

    def embed(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    cond_right, cond_wrong = embed(right), embed(wrong)
    v_pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon") == "v_prediction"
    out = {"example": {"right": right[0], "wrong": wrong[0]}, "timesteps": {}}
    for t in TIMESTEPS:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed * 1000 + t))
        tt = torch.full((n,), t, dtype=torch.long)
        zt = pipe.scheduler.add_noise(z0, noise, tt).to(pipe.unet.dtype)
        a = pipe.scheduler.alphas_cumprod[t]
        err = {}
        for name, cond in (("right", cond_right), ("wrong", cond_wrong)):
            pred = pipe.unet(zt, tt, encoder_hidden_states=cond).sample.float()
            if v_pred:  # v = sqrt(a) eps - sqrt(1-a) x0, so eps = sqrt(a) v + sqrt(1-a) x_t
                pred = a.sqrt() * pred + (1 - a).sqrt() * zt.float()
            err[name] = (pred - noise).pow(2).mean(dim=(1, 2, 3)).numpy()
        base = float(err["right"].mean())
        diff = (err["wrong"] - err["right"]) / base  # paired, relative to the mean right-prompt error
        half = 1.96 * float(diff.std(ddof=1)) / np.sqrt(n)
        out["timesteps"][str(t)] = {"gap": float(diff.mean()), "ci_low": float(diff.mean()) - half,
                                    "ci_high": float(diff.mean()) + half, "mse_right": base}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: $ATTNLENS_MODEL or the embedded model)")
    ap.add_argument("--n", type=int, default=64, help="scenes per attribute (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shapes_conditioning.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = attnlens.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    results = {a: gaps(pipe, a, args.n, SEED) for a in shapes.ATTRIBUTES}
    folder = args.model or os.environ.get("ATTNLENS_MODEL")
    record = {
        "command": "python -m benchmarks.shapes_conditioning" + (f" --model {args.model}" if args.model else ""),
        "model": str(folder or "embedded Shapes model"),
        "model_fingerprint": fingerprint(folder or attnlens._pipeline.EMBEDDED_MODEL),
        "n_per_attribute": args.n, "seed": SEED, "timesteps": list(TIMESTEPS),
        "seconds": round(time.perf_counter() - t0, 1),
        "gap": "(eps MSE with a wrong value - with the right value) / eps MSE with the right value; 0 = word ignored",
        "attributes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"{'attribute':<11}" + "".join(f"{'t=' + str(t):>18}" for t in TIMESTEPS))
    for a, r in results.items():
        cells = [r["timesteps"][str(t)] for t in TIMESTEPS]
        print(f"{a:<11}" + "".join(f"{c['gap']:>+8.1%} [{c['ci_low']:+.1%}]".rjust(18) for c in cells))
    print(f"(gap and lower end of its 95% interval; {args.n} scenes per attribute)\nwrote {args.out}")


if __name__ == "__main__":
    main()
