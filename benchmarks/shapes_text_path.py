"""Is position lost in the text encoder or in the UNet? Three short trainings on the same data tell.

Every arm trains a fresh Shapes UNet (the embedded model's architecture) from the same seed on the same
latents (renders encoded by the embedded model's VAE, times its ``scaling_factor``), at the noisiest
training step only (t = 999, where the latent shows nothing and the prompt is all there is to go by),
with v-prediction and plain x0-weighted MSE. They differ only in what turns the prompt's tokens into the
UNet's ``encoder_hidden_states`` (77 x width):

- ``clip``: a fresh ``CLIPTextModel`` of the embedded model's shape (what the real training uses);
- ``word_table``: a plain word table, the token's embedding row followed by a layer norm, with no
  mixing between tokens and no position embedding;
- ``clip_table_start``: the same ``CLIPTextModel`` started as a word table and kept one for its first
  ``--table-steps`` steps, then trained for ``--steps`` more (the training recipe's ``--text-table-steps``,
  see ``tools.shapes_model.train.start_as_word_table``): its position embedding and the output projections
  of its attention and MLP start at zero and its transformer layers stay frozen, so no token's state
  mixes in another's until the layers start to train (the position embedding trains from zero, as in
  the recipe, adding where the token sits to its word).

Every ``--eval-every`` steps each arm predicts x0 for held-out scenes, once with the scene's full
canonical prompt and once with one attribute's value swapped ("on the left" for "on the right"), and
reports the *gain* ``(mse_swapped - mse_right) / mse_swapped`` per attribute: 0 says the word is
ignored. If the word table learns position words quickly while the CLIP encoder does not, the UNet can
place an object from a word and position is lost on the text side; the third arm tells whether the
CLIP encoder keeps passing position words on once its layers train after starting as a table.

A diagnostic for whoever trains the next model; it does not enter the quality bar. Writes
``benchmarks/results/shapes_text_path.json``.

    python -m benchmarks.shapes_text_path                     # ~25 minutes on 2 cores
    python -m benchmarks.shapes_text_path --steps 300 --out /tmp/text_path.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import attnlens
from attnlens import shapes
from tools.shapes_model.card import TEXT_PATH_INPUTS, fingerprint
from tools.shapes_model.train import (
    TINY_UNET, UNetConfig, _lr_lambda, _text_layers, build_text_encoder, build_unet, start_as_word_table)

ROOT = Path(__file__).resolve().parents[1]

T = 999
SWAPPED = ("position", "colour", "shape")
ARMS = ("clip", "word_table", "clip_table_start")
# When a word table picks position words up varies with its random start: from scratch, one did between
# steps 100 and 200, while the same function built from CLIP's layers (another start) still ignored them
# after a 200-step table phase. The table phase is kept long enough for the question the arm asks: are
# position words kept once the layers train?
TABLE_STEPS = 600


class WordTable(torch.nn.Module):
    """Token embedding row plus layer norm: each token's state is its own word, nothing mixed in."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        torch.nn.init.normal_(self.embedding.weight, std=0.02)  # CLIP's initialisation of its token table
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.norm(self.embedding(ids)))


@torch.no_grad()
def encode_scenes(pipe, scenes: list) -> torch.Tensor:
    """Scaled VAE posterior means of the scenes' renders, (n, 4, 16, 16) for the Shapes model."""
    vae = pipe.vae
    x = torch.from_numpy(np.stack([shapes.render(s)[0] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.cat([vae.encode(x[i : i + 128].to(vae.dtype)).latent_dist.mean.float()
                      for i in range(0, len(x), 128)]) * vae.config.scaling_factor


def held_out(pipe, n: int, seed: int) -> dict:
    """Scenes with their canonical prompt and, per attribute in SWAPPED, a prompt with that value changed."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    prompts = {"right": [shapes.describe(s) for s in scenes]}
    for attribute in SWAPPED:
        swapped = []
        for s in scenes:
            others = [v for v in shapes.ATTRIBUTES[attribute] if v != getattr(s, attribute)]
            swapped.append(shapes.describe(shapes.with_attribute(s, **{attribute: others[int(rng.integers(len(others)))]})))
        prompts[attribute] = swapped
    return {"z": encode_scenes(pipe, scenes), "prompts": prompts}


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def swap_gains(text, unet, tokenizer, alpha_bar: torch.Tensor, held: dict) -> dict[str, float]:
    """Per attribute, how much worse x0 is predicted at t=999 with that attribute's word swapped."""
    text.eval(), unet.eval()
    z0 = held["z"]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    zt = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    t = torch.full((len(z0),), T)
    mse = {}
    for key, prompts in held["prompts"].items():
        v = unet(zt, t, encoder_hidden_states=text(_ids(tokenizer, prompts)).last_hidden_state).sample
        x0 = alpha_bar.sqrt() * zt - (1 - alpha_bar).sqrt() * v
        mse[key] = float((x0 - z0).pow(2).mean())
    text.train(), unet.train()
    out = {a: (mse[a] - mse["right"]) / mse[a] for a in SWAPPED}
    out["mse"] = mse["right"]
    return out


def train_arm(arm: str, cfg: UNetConfig, pipe, data: dict, held: dict, steps: int, eval_every: int,
              seed: int, table_steps: int = 0) -> list[dict]:
    """Train one arm from scratch at t=999 and return its gains every ``eval_every`` steps.

    ``clip_table_start`` trains ``table_steps + steps`` steps, its text layers frozen for the first
    ``table_steps``.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    text = WordTable(len(pipe.tokenizer), cfg.text_width) if arm == "word_table" else build_text_encoder(cfg)
    frozen = []
    if arm == "clip_table_start":
        start_as_word_table(text)
        frozen = _text_layers(text)
        steps += table_steps
    unet = build_unet(cfg, latent_channels=data["z"].shape[1], sample_size=data["z"].shape[-1])
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(100, steps), 10_000))
    alpha_bar = pipe.scheduler.alphas_cumprod[T].float()
    history = []
    for step in range(steps):
        if frozen and step in (0, table_steps):
            for p in frozen:
                p.requires_grad_(step >= table_steps)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(data["z"]), (cfg.batch,), generator=g)
        z0 = data["z"][idx]
        prompts = ["" if torch.rand((), generator=g) < cfg.cfg_dropout else data["prompts"][i] for i in idx.tolist()]
        noise = torch.randn(z0.shape, generator=g)
        zt = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
        v = unet(zt, torch.full((len(z0),), T), encoder_hidden_states=text(_ids(pipe.tokenizer, prompts)).last_hidden_state).sample
        x0 = alpha_bar.sqrt() * zt - (1 - alpha_bar).sqrt() * v
        loss = (x0 - z0).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": float(loss.detach()),
                            **swap_gains(text, unet, pipe.tokenizer, alpha_bar, held)})
            print(f"  {arm:<10} step {step + 1:>4}: " + ", ".join(
                f"{a} {history[-1][a]:+.3f}" for a in SWAPPED), flush=True)
    return history


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder whose VAE encodes the data (default: embedded)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--table-steps", type=int, default=TABLE_STEPS,
                    help=f"clip_table_start: steps its text layers stay frozen before its --steps (default {TABLE_STEPS})")
    ap.add_argument("--scenes", type=int, default=4096, help="training scenes (default 4096)")
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny UNet and text encoder (for tests)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shapes_text_path.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = attnlens.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    dataset = shapes.ShapesDataset(args.scenes, seed=args.seed + 1)
    examples = [dataset.example(i) for i in range(args.scenes)]
    data = {"z": encode_scenes(pipe, [e.scene for e in examples]), "prompts": [e.prompt for e in examples]}
    held = held_out(pipe, args.held_out, args.seed + 777)
    cfg = TINY_UNET if args.tiny else UNetConfig()
    arms = {arm: train_arm(arm, cfg, pipe, data, held, args.steps, args.eval_every, args.seed, args.table_steps)
            for arm in ARMS}
    record = {
        "command": "python -m benchmarks.shapes_text_path" + (f" --steps {args.steps}" if args.steps != 200 else "")
                   + (f" --table-steps {args.table_steps}" if args.table_steps != TABLE_STEPS else ""),
        "vae_of": str(args.model or "embedded Shapes model"),
        "model_fingerprint": fingerprint(args.model or attnlens._pipeline.EMBEDDED_MODEL) if not args.tiny else None,
        # what the result depends on: the VAE (latents), tokenizer and noise schedule, not the model's UNet
        "inputs": list(TEXT_PATH_INPUTS),
        "inputs_fingerprint": (fingerprint(args.model or attnlens._pipeline.EMBEDDED_MODEL, TEXT_PATH_INPUTS)
                               if not args.tiny else None),
        "timestep": T, "steps": args.steps, "table_steps": args.table_steps, "scenes": args.scenes, "held_out": args.held_out, "seed": args.seed,
        "unet_config": dataclasses.asdict(cfg),
        "arms": arms,
        "gain_meaning": "(mse with the attribute's word swapped - mse with the right prompt) / mse swapped, "
                        "x0 predicted at t=999 for held-out scenes; 0: the word is ignored",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
