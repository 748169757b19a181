"""Train the embedded Shapes model: VAE first, then CLIP text encoder + UNet; and the Shapes DiT: a T5
encoder + PixArt-alpha transformer on the same VAE (``dit``).

Every stage is resumable: checkpoints are written atomically to ``WORKDIR/<stage>.safetensors``
every ``--save-every`` steps, and a run started again continues from the last one. Data item ``i``
of step ``s`` is a pure function of ``(seed, s * batch + i)``, so a resumed run sees exactly the data
an uninterrupted run would have seen.

Usage::

    python -m tools.shapes_model.train vae  --workdir runs/shapes --steps 3000
    python -m tools.shapes_model.train unet --workdir runs/shapes --steps 20000
    python -m tools.shapes_model.train export --workdir runs/shapes --out attnlens/models/shapes
    python -m benchmarks.shapes_quality      # the quality bar, then rewrite the model card with it:
    python -m tools.shapes_model.train card --out attnlens/models/shapes

The Shapes DiT (issue 22; :class:`DiTConfig` gives its architecture, sizes and measured times) is the
``dit`` stage: the same VAE stage (``WORKDIR/vae.safetensors``), data stream, noise schedule, loss, EMA and
checkpoints as the ``unet`` stage (one loop, :func:`train_denoiser`), its checkpoint ``WORKDIR/dit.safetensors``,
exported as a ``PixArtAlphaPipeline`` folder that ``attnlens.load_pipeline("shapes-dit")`` loads. With the
recipe flags the shipped UNet was trained with, on a GPU (``--device cuda``; on CPUs drop it and expect days)::

    cp checkpoints/shapes-vae.safetensors runs/shapes/vae.safetensors          # the finished VAE stage
    cp checkpoints/shapes-vae.safetensors.json runs/shapes/vae.safetensors.json
    python -m tools.shapes_model.train dit --workdir runs/shapes --steps 14000 --device cuda \
        --prediction-type v_prediction --text-table-steps 2000 --snr-floor 1.0
    python -m tools.shapes_model.train export --denoiser dit --workdir runs/shapes --out attnlens/models/shapes-dit

A run that must outlive its machine is packed into a file small enough to commit, and unpacked on the
next machine (see :func:`pack`)::

    python -m tools.shapes_model.train pack   --workdir runs/shapes   # -> checkpoints/shapes-unet-resume.safetensors
    python -m tools.shapes_model.train unpack --workdir runs/shapes   # then resume with the unet stage

On a GPU (``--device cuda``; ``--budget-minutes`` stops a run cleanly inside a time limit, and the same command
resumes it), what a run must bring back to be exported elsewhere is its EMA weights, under 16 MiB::

    python -m tools.shapes_model.train ema-pack   --workdir runs/candB   # -> runs/candB/ema-pack.safetensors
    python -m tools.shapes_model.train ema-unpack --workdir runs/candB_gpu --ema-pack ema-pack.safetensors
    python -m tools.shapes_model.train export     --workdir runs/candB_gpu --out runs/candB_gpu/export

(``scripts/gpu_shapes.sh`` trains several candidates at once on one GPU and returns their EMA packs.)

Commit a pack only while a run must resume on another machine, and a model folder only when it ships:
every committed weight file stays in the history every full clone downloads.

``export`` and ``card`` record the commands that rebuild the folder in its ``training.json``
(``"rebuild"``), so the loader can print them without importing this tool. ``text-path-current`` exits 0
when ``benchmarks/results/shapes_text_path.json`` was measured on the embedded model's VAE, tokenizer and
scheduler (``scripts/rebench.sh`` then skips that benchmark).

The objective is the standard one of each part (reconstruction + KL for the VAE, the epsilon or v
denoising loss for the UNet and the DiT, with min-SNR weighting); nothing supervises attention.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import attnlens
from attnlens._tokenizer import TOKENIZER_DIR, VOCAB_SIZE, load_tokenizer
from attnlens.shapes import BACKGROUNDS, COLOURS, ShapesDataset

from . import CHECKPOINTS, EMBEDDED, RESULTS as RESULTS_DIR
from .card import (RESULTS, TEXT_PATH, fingerprint, rebuild_commands, summarize_log, text_path_applies, weight_sums,
                   write_card)
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint

# ------------------------------------------------------------------------------------------ configs


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    kl_weight: float = 1e-6
    object_weight: float = 4.0  # extra loss weight on object pixels: the object is a small share of the image


@dataclass
class Recipe:
    """What the two denoiser stages (``unet``, ``dit``) share: the text encoder's size, the objective, the
    schedule and the data. :class:`UNetConfig` and :class:`DiTConfig` add each denoiser's architecture."""

    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 500
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # adds ``snr_floor / snr`` to the epsilon loss weight: in x0 terms the weight becomes
    # min(snr, gamma) + snr_floor instead of min(snr, gamma), so the noisiest steps, where the layout is
    # decided and only the prompt can say where the object goes, are not weighted down to nothing
    snr_floor: float = 0.0
    # the std the latents are scaled to before noising (Stable Diffusion's ``scaling_factor`` makes it 1).
    # Below 1 every timestep's signal-to-noise ratio falls by its square with SD's betas unchanged. The
    # object fills a large share of a 16x16 latent, so at SD's noisiest training step its place and its
    # colour are still plain in the noisy latent (benchmarks/shapes_position_diagnosis.py); a lower std
    # leaves the noisiest steps to the prompt
    latent_std: float = 1.0
    ema_decay: float = 0.999
    # "epsilon" (SD 1.x) or "v_prediction" (SD 2.x): what the denoiser predicts. Under epsilon the x0 that the
    # noisiest steps imply is the tiny difference of two large terms, so the layout the prompt asks for is
    # learnt slowly there
    prediction_type: str = "epsilon"
    # steps during which the CLIP text encoder behaves as a word table: a new run starts its position
    # embedding and the output projections of its attention and MLP at zero and keeps its transformer
    # layers frozen for this many steps, so no token's state mixes in another token (the position
    # embedding is not frozen: it trains from zero, adding where a token sits to its own word). Trained
    # from scratch with mixing from step 0, the encoder never passed position words on, while a plain word
    # table did within a few hundred steps (benchmarks/shapes_text_path.py). 0: CLIP's own initialisation.
    # The DiT's T5 encoder starts the same way (its attention and feed-forward outputs at zero, its layers
    # frozen); T5 has no position embedding, its relative position bias sits in the frozen attention
    text_table_steps: int = 0
    # the size the world is rendered at for the denoiser (the VAE stays the one trained at 64x64: it is fully
    # convolutional, and benchmarks/shapes_vae_scale.py measures how well it carries 128x128 renders). 128
    # gives 32x32 latents, so attention sits at 32/16/8 as Stable Diffusion's at 64/32/16
    image_size: int = 64


@dataclass
class UNetConfig(Recipe):
    """The ``unet`` stage: a CLIP text encoder and a ``UNet2DConditionModel`` (the shipped Shapes model)."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 2
    cross_attention_dim: int = 128
    attention_heads: int = 4  # per layer; head dim = channels / heads (8, 16, 32 here)
    # architecture levers for a UNet whose self-attention must carry the layout (issue 17); the defaults are
    # the shipped model's. transformer_layers: transformer blocks per attention module (diffusers'
    # ``transformer_layers_per_block``); attention_levels: the levels (0 = the latent's own grid) whose down and
    # up blocks have attention, () = every level but the lowest (SD's layout; the mid block always has it)
    transformer_layers: int = 1
    attention_levels: tuple[int, ...] = ()


@dataclass
class DiTConfig(Recipe):
    """The ``dit`` stage: a T5 encoder and a ``PixArtTransformer2DModel`` (PixArt-alpha's architecture: in every
    block self-attention over the image tokens, cross-attention to the text tokens and a feed-forward, all
    modulated by one shared timestep embedding, "adaLN-single").

    Sizes (chosen for the Shapes world's 16x16 latents and the budget of at most 25 MB fp16 and 1 s an image
    on 2 CPU cores at 25 steps):

    - ``patch_size`` 2: an 8x8 token grid (64 image tokens, each a 2x2 latent cell = 8x8 pixels), the grid of
      the Shapes UNet's second level (its first level's maps are 16x16, the latent's own grid). Patch 1 would give a 16x16 grid, but
      four times the tokens cost more than three times the time: one forward of the untrained transformer on
      a batch of 2 (classifier-free guidance), 24 text tokens, 1 thread, measured UNDER LOAD (a busy 2-core
      machine, 2026-12-01): patch 2, 8 blocks, width 256: 41.6 ms (1.04 s for 25 steps, 18.1 MB fp16);
      patch 2, 12 blocks: 60.9 ms (1.52 s, 26.6 MB, over both budgets); patch 1, 8 blocks: 139.4 ms (3.5 s).
      The whole untrained pipeline at these defaults (T5, 25 DDIM steps with guidance, VAE decode, a 64x64
      image), 1 thread, UNDER LOAD (load average 5 on 2 cores): 1.65-2.0 s wall, 1.27-1.31 s of CPU time.
      Whether it meets 1 s an image on 2 idle cores is not shown here: the quality bar's timing on an idle
      machine decides, and ``layers`` is the lever if it does not (the time is close to linear in blocks).
    - ``layers`` 8 blocks of width ``hidden`` 256, ``heads`` 4 (head dim 64): 9.06 M parameters. With the
      T5 encoder (0.35 M) and the VAE (0.95 M): 10.4 M parameters, 20.7 MB of fp16 weights (budget 25 MB).
    - text: a T5 encoder (T5 v1.1's gated-GELU feed-forward, relative position bias) of width ``text_width``
      128, ``text_layers`` 2, ``text_heads`` 4, trained from scratch jointly with the transformer (option (a)
      of issue 22: a real ``T5EncoderModel``, so the folder loads with plain
      ``PixArtAlphaPipeline.from_pretrained`` offline), with a T5-style unigram tokenizer built in code over
      the Shapes world's words (:func:`shapes_tokenizer`: one token per word, which keeps word maps one
      token a word), saved into the folder as ``tokenizer/tokenizer.json`` at export.
    - the VAE is the ``vae`` stage's (``vae.safetensors``), as for the UNet.

    Prompts are padded to ``max_text_tokens`` during training with their attention mask, which the T5 encoder
    and the cross-attention both apply (as ``PixArtAlphaPipeline`` does at its own ``max_sequence_length``),
    so padded tokens change nothing: the model generates the same at any ``max_sequence_length`` that holds
    the prompt.
    """

    lr: float = 3e-4  # transformers are less tolerant of large steps than the UNet (not yet tuned on a real run)
    layers: int = 8
    hidden: int = 256
    heads: int = 4
    patch_size: int = 2
    max_text_tokens: int = 32


ARCHITECTURE = ("block_out_channels", "attention_heads", "layers_per_block", "transformer_layers", "attention_levels", "image_size")
"""UNet fields a new run takes from the command line and a resumed run from its checkpoint."""

DIT_ARCHITECTURE = ("layers", "hidden", "heads", "patch_size", "image_size", "text_width", "text_layers", "text_heads",
                    "max_text_tokens")
"""DiT fields a resumed run takes from its checkpoint (a new run takes :class:`DiTConfig`'s)."""


TINY_VAE = VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4, batch=4)
TINY_UNET = UNetConfig(block_out_channels=(16, 16, 16), cross_attention_dim=16, attention_heads=2,
                       text_width=16, text_layers=1, text_heads=2, batch=4)
TINY_DIT = DiTConfig(layers=2, hidden=16, heads=2, text_width=16, text_layers=1, text_heads=2, batch=4,
                     max_text_tokens=24)


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=64,
    )


def build_text_encoder(cfg: UNetConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


def build_unet(cfg: UNetConfig, latent_channels: int = 4, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    attn = set(cfg.attention_levels or range(n - 1))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))),
        transformer_layers_per_block=cfg.transformer_layers,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a legacy
        # name; SD 1.5's config says 8 and has 8 heads of 40..160 dims)
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=min(32, cfg.block_out_channels[0] // 2),
    )


def shapes_words() -> str:
    """Every word a Shapes prompt can use (:func:`attnlens.shapes.describe`'s templates and the world's values),
    space-separated, in a fixed order: the DiT tokenizer's word vocabulary."""
    from attnlens.shapes import ATTRIBUTES
    from attnlens.shapes._world import POSITION_PHRASES

    words = "a an the of on in at against background photo image drawing shape object".split()
    words += [w for values in ATTRIBUTES.values() for v in values for w in v.split()]
    words += [w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()]
    return " ".join(dict.fromkeys(words))


def shapes_tokenizer():
    """The DiT's T5-style tokenizer: one token per Shapes word, single characters for anything else, ``</s>``
    closing each prompt (``attnlens._testing.t5_style_tokenizer`` over :func:`shapes_words`). It is built in
    code and saved into the exported folder (``tokenizer/``), so the folder needs nothing downloaded."""
    from attnlens._testing import t5_style_tokenizer

    return t5_style_tokenizer(model_max_length=120, words=shapes_words())  # 120: PixArt-alpha's prompt length


def build_t5_text_encoder(cfg: DiTConfig, vocab_size: int):
    """A T5 encoder trained from scratch: T5 v1.1's layout (gated-GELU feed-forward, relative position bias), no
    dropout (as the UNet stage's CLIP)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=cfg.text_width, d_kv=cfg.text_width // cfg.text_heads,
        d_ff=cfg.text_width * 2, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_dit(cfg: DiTConfig, latent_channels: int = 4, sample_size: int = 16):
    """PixArt-alpha's transformer at the Shapes world's size (see :class:`DiTConfig`); it predicts the noise (or v)
    only (``out_channels`` = the latent's: no learnt variance)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=cfg.layers, patch_size=cfg.patch_size,
        attention_head_dim=cfg.hidden // cfg.heads, num_attention_heads=cfg.heads, in_channels=latent_channels,
        out_channels=latent_channels, caption_channels=cfg.text_width, cross_attention_dim=cfg.hidden,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # Stable Diffusion 1.x's training schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# ------------------------------------------------------------------------------------------ helpers


def _device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device, checked: ``cuda`` where none is present is an error naming what is."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device; valid here: cpu")
    return device


PRECISIONS = ("fp32", "tf32", "bf16")
"""unet stage, on CUDA: fp32 (the default, as on CPU), tf32 (fp32 storage, TF32 matmuls and convolutions) or
bf16 (the forward passes under bf16 autocast; weights, optimizer and EMA stay fp32)."""


def _batch(ds: ShapesDataset, step: int, size: int) -> dict:
    items = [ds[(step * size + i) % len(ds)] for i in range(size)]
    return {
        "pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])),
        "mask": torch.from_numpy(np.stack([it["mask"] for it in items])),
        "prompt": [it["prompt"] for it in items],
        "items": items,
    }


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _progress(iterable, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, mininterval=5.0, file=sys.stderr)


def vae_round_trip_report(vae, n: int = 256, seed: int = 10_000, device: str | torch.device = "cpu") -> dict:
    """Round-trip ``n`` held-out renders through the VAE and read them with the oracle.

    Returns the share of images whose every attribute survives, and the share per attribute.
    """
    from attnlens.shapes import read

    ds = ShapesDataset(n, seed=seed)
    keys = ("shape", "colour", "size", "position", "background")
    hits = {k: 0 for k in keys}
    all_ok = 0
    vae.eval()
    with torch.no_grad():
        for start in range(0, n, 32):
            batch = [ds[i] for i in range(start, min(n, start + 32))]
            x = torch.from_numpy(np.stack([b["pixels"] for b in batch])).to(device)
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            images = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for item, image in zip(batch, images):
                r = read(image)
                ok = True
                for k in keys:
                    good = r.found and r.attributes.get(k) == item[k]
                    hits[k] += good
                    ok &= good
                all_ok += ok
    vae.train()
    out = {k: hits[k] / n for k in keys}
    out["all"] = all_ok / n
    return out


# ------------------------------------------------------------------------------------------ stages


def train_vae(workdir: Path, steps: int, cfg: VAEConfig, seed: int, save_every: int, eval_every: int,
              device: str = "cpu") -> None:
    device = _device(device)
    torch.manual_seed(seed)
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, steps))
    ckpt = workdir / "vae.safetensors"
    start = 0
    if ckpt.exists():
        meta = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})
        start = meta["step"]
        sched.last_epoch = start - 1
        sched.step()
        print(f"resumed VAE at step {start}", file=sys.stderr)
    ds = ShapesDataset(10**9, seed=seed)
    log = workdir / "vae_log.jsonl"
    gen = torch.Generator().manual_seed(seed + start)
    t0 = time.time()
    for step in _progress(range(start, steps), steps, start, "vae"):
        b = _batch(ds, step, cfg.batch)
        x = b["pixels"].to(device)
        weight = 1.0 + cfg.object_weight * b["mask"].to(device).float()[:, None]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            y = vae.decode(z).sample.float()
        err = y - x
        rec = ((err.abs() + err.pow(2)) * weight).mean()
        kl = post.kl().mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if done % 50 == 0:
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "rec": rec.item(), "kl": kl.item(), "s": time.time() - t0}) + "\n")
        if done % eval_every == 0 or done == steps:
            report = vae_round_trip_report(vae, device=device)
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "round_trip": report}) + "\n")
            print(f"step {done}: round trip {report}", file=sys.stderr)
        if done % save_every == 0 or done == steps:
            save_checkpoint(ckpt, {"vae": vae}, {"opt": opt}, {"step": done, "config": asdict(cfg), "seed": seed})


def _load_vae(workdir: Path):
    ckpt = workdir / "vae.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"no VAE checkpoint at {ckpt}: run the 'vae' stage first")
    meta = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["meta"]
    vae = build_vae(VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}))
    load_checkpoint(ckpt, {"vae": vae}, {})
    vae.requires_grad_(False).eval()
    return vae


@torch.no_grad()
def latent_scale(vae, n: int = 512, seed: int = 20_000, size: int = 64) -> float:
    """1 / std of the VAE's latents over ``n`` renders at ``size``: Stable Diffusion's ``scaling_factor``."""
    ds = ShapesDataset(n, seed=seed, size=size)
    x = torch.from_numpy(np.stack([ds[i]["pixels"] for i in range(n)])).to(vae.device)
    z = torch.cat([vae.encode(x[i : i + 64]).latent_dist.mode() for i in range(0, n, 64)])
    return float(1.0 / z.std())


def _latent_side(vae, cfg: Recipe) -> int:
    """The latent grid side of ``cfg.image_size`` renders through ``vae`` (it halves the side per level)."""
    return cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)


def _text_layers(text: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the text encoder's transformer layers (CLIP's ``layers``, T5's ``block``; not its
    embeddings or final norm)."""
    return [p for name, p in text.named_parameters() if ".layers." in f".{name}" or ".block." in f".{name}"]


def start_as_word_table(text: torch.nn.Module) -> None:
    """Zero the position embedding and every residual branch's output projection of a CLIP text encoder (T5's:
    its attention's ``o`` and feed-forward's ``wo``; T5 has no position embedding): each token's state is then
    the final layer norm of its own embedding row (plus, for CLIP, its trainable position embedding), nothing
    from other tokens (see Recipe.text_table_steps)."""
    with torch.no_grad():
        for name, p in text.named_parameters():
            if "position_embedding" in name or name.endswith(("out_proj.weight", "out_proj.bias", "fc2.weight",
                                                               "fc2.bias", ".o.weight", ".wo.weight")):
                p.zero_()


def _adamw(params: list[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where this torch has a fused CPU kernel: the same update, and on the 6.3M-row CLIP token
    embedding about 0.04 s less per step on 2 cores than the per-tensor loop."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


OVERRIDABLE = ("snr_floor", "latent_std")
"""Recipe fields a resumed run may change (each change is recorded in the checkpoint and the card)."""


FIXED_AT_START = ("prediction_type", "text_table_steps")
"""Recipe fields set when a run starts; a resumed run keeps its checkpoint's."""


def _unet_predict(tokenizer, text, unet, cfg: UNetConfig, zt, t, prompts: list[str]) -> torch.Tensor:
    """The UNet's prediction for noisy latents ``zt`` (B, C, h, w) at timesteps ``t`` (B,): CLIP's 77 tokens."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return unet(zt, t, encoder_hidden_states=text(ids.to(zt.device)).last_hidden_state).sample


def _dit_predict(tokenizer, text, dit, cfg: DiTConfig, zt, t, prompts: list[str]) -> torch.Tensor:
    """The DiT's prediction, its text as ``PixArtAlphaPipeline`` encodes it: T5 tokens padded to
    ``cfg.max_text_tokens`` with their attention mask, applied in the T5 encoder and in the cross-attention."""
    tok = tokenizer(prompts, padding="max_length", max_length=cfg.max_text_tokens, truncation=True,
                    return_tensors="pt").to(zt.device)
    cond = text(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    return dit(zt, encoder_hidden_states=cond, encoder_attention_mask=tok.attention_mask, timestep=t,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@dataclass(frozen=True)
class Stage:
    """A denoiser stage: what differs between the ``unet`` and ``dit`` stages (everything else, the data, the
    objective, the schedule, EMA, checkpoints and resuming, is :func:`train_denoiser`'s, shared).

    ``name`` is the stage, its checkpoint ``WORKDIR/<name>.safetensors`` (modules ``text``, ``<name>``,
    ``ema_text``, ``ema_<name>``) and its log ``<name>_log.jsonl``."""

    name: str
    config: type[Recipe]
    architecture: tuple[str, ...]  # fields a resumed run takes from its checkpoint
    tokenizer: Callable[[], Any]
    text_encoder: Callable[[Any, Any], torch.nn.Module]  # (cfg, tokenizer) -> text encoder
    denoiser: Callable[[Any, int, int], torch.nn.Module]  # (cfg, latent_channels, sample_size) -> denoiser
    # (tokenizer, text, denoiser, cfg, zt, t, prompts) -> the prediction, zt's shape
    predict: Callable[..., torch.Tensor]


UNET = Stage("unet", UNetConfig, ARCHITECTURE, load_tokenizer, lambda cfg, tok: build_text_encoder(cfg), build_unet,
             _unet_predict)
DIT = Stage("dit", DiTConfig, DIT_ARCHITECTURE, shapes_tokenizer, lambda cfg, tok: build_t5_text_encoder(cfg, len(tok)),
            build_dit, _dit_predict)
STAGES = {s.name: s for s in (UNET, DIT)}


def _config(stage: Stage, saved: dict):
    """``stage``'s config from a checkpoint's recorded one (lists back to tuples)."""
    return stage.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def train_unet(workdir: Path, steps: int, cfg: UNetConfig, seed: int, save_every: int, **recipe) -> int:
    """Train (or resume) the text encoder and UNet (:func:`train_denoiser` with the ``unet`` stage); returns the
    step the run stopped at."""
    return train_denoiser(UNET, workdir, steps, cfg, seed, save_every, **recipe)


def train_dit(workdir: Path, steps: int, cfg: DiTConfig, seed: int, save_every: int, **recipe) -> int:
    """Train (or resume) the T5 encoder and PixArt transformer (:func:`train_denoiser` with the ``dit`` stage);
    returns the step the run stopped at."""
    return train_denoiser(DIT, workdir, steps, cfg, seed, save_every, **recipe)


def train_denoiser(stage: Stage, workdir: Path, steps: int, cfg: Recipe, seed: int, save_every: int,
                   snr_floor: float | None = None, latent_std: float | None = None,
                   prediction_type: str | None = None, text_table_steps: int | None = None,
                   device: str = "cpu", budget_minutes: float | None = None, precision: str = "fp32",
                   stop_at: int | None = None) -> int:
    """Train (or resume) a stage's text encoder and denoiser on the VAE stage's latents; returns the step the run
    stopped at.

    ``snr_floor`` and ``latent_std`` left ``None`` keep the checkpoint's values (``cfg``'s for a new
    run); a number overrides it and, on resuming, is recorded as a recipe change. A changed
    ``latent_std`` rescales the latents from the next step on (``scaling_factor`` follows it).
    ``prediction_type`` and ``text_table_steps`` (see :class:`Recipe`) are fixed when a run starts:
    ``None`` takes the checkpoint's (``cfg``'s for a new run), and a different value for a resumed run is
    an error.

    ``device``: where the models, batches and noise live (``"cuda"`` on a GPU). Every random draw is still
    made on CPU generators and moved there, so a CPU run is the one it always was and a GPU run sees the same
    data, noise and timesteps; checkpoints are written from CPU copies and resume on either device.
    ``precision`` (:data:`PRECISIONS`) applies on CUDA only. ``budget_minutes``: stop cleanly, with a checkpoint,
    once another step would overrun that much wall time since the call began (the schedule still runs to
    ``steps``: call again to resume). ``stop_at``: stop (checkpoint saved) at that step of the ``steps``-step
    schedule, so runs of different speeds can be compared at the same step.
    """
    t_call = time.time()
    device = _device(device)
    if precision not in PRECISIONS:
        raise SystemExit(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise SystemExit(f"precision {precision!r} is for --device cuda; on {device.type} use fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    ckpt = workdir / f"{stage.name}.safetensors"
    if ckpt.with_name(ckpt.name + ".json").exists():  # a resumed run rebuilds the architecture it was started with
        if json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["meta"].get("ema_only"):
            raise SystemExit(f"{workdir} holds only EMA weights (from ema-unpack): it exports but cannot resume; "
                             "resume from a pack (pack/unpack) or start a new --workdir")
        saved = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["meta"]["config"]
        cfg = replace(cfg, **{k: tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
                              for k in stage.architecture if k in saved})
    fixed = {"prediction_type": prediction_type, "text_table_steps": text_table_steps}
    cfg = replace(cfg, **{k: v for k, v in fixed.items() if v is not None})  # a resumed run checks them below
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"unknown prediction_type {cfg.prediction_type!r}; valid: 'epsilon', 'v_prediction'")
    torch.manual_seed(seed)
    vae = _load_vae(workdir).to(device)
    tokenizer = stage.tokenizer()
    text = stage.text_encoder(cfg, tokenizer)
    if cfg.text_table_steps:
        start_as_word_table(text)  # a resumed run loads its trained weights over this
    model = stage.denoiser(cfg, vae.config.latent_channels, _latent_side(vae, cfg))
    text, model = text.to(device), model.to(device)  # built on CPU from the seeded CPU generator: the same init
    ema_text, ema_model = copy.deepcopy(text).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    params = list(text.parameters()) + list(model.parameters())
    opt = _adamw(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, steps))
    modules = {"text": text, stage.name: model, "ema_text": ema_text, f"ema_{stage.name}": ema_model}
    start, scale, changes, segments = 0, None, [], []
    given = {"snr_floor": snr_floor, "latent_std": latent_std}
    if ckpt.exists():
        meta = load_checkpoint(ckpt, modules, {"opt": opt})
        start, scale = meta["step"], meta["scaling_factor"]
        changes = list(meta.get("recipe_changes", []))
        segments = list(meta.get("segments", []))
        # keys older checkpoints lack take the values those runs used (the defaults of their time)
        old = {**asdict(stage.config()), "latent_std": 1.0, **meta["config"]}
        clash = {k: old[k] for k, v in fixed.items() if v is not None and v != old[k]}
        if clash:
            raise SystemExit(f"{workdir} was started with " + ", ".join(f"{k}={v!r}" for k, v in clash.items())
                             + "; these are fixed when a run starts (start a new --workdir to change them)")
        cfg = replace(cfg, **{k: old[k] for k in FIXED_AT_START},
                      **{k: old[k] if given[k] is None else given[k] for k in OVERRIDABLE})
        if cfg.latent_std != old["latent_std"]:
            scale = scale / old["latent_std"] * cfg.latent_std
        diff = {k: [old[k], v] for k, v in asdict(cfg).items() if old.get(k) != (list(v) if isinstance(v, tuple) else v)}
        if meta.get("total_steps") not in (None, steps):  # a longer or shorter schedule: the LR curve changes
            diff["total_steps"] = [meta["total_steps"], steps]
        if diff:  # the recipe changed on resuming: the card reports it
            changes.append({"step": start, "changed": diff})
            print(f"recipe change at step {start}: {diff}", file=sys.stderr)
        sched.last_epoch = start - 1
        sched.step()
        print(f"resumed {stage.name} at step {start}", file=sys.stderr)
    else:
        cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if scale is None:
        scale = latent_scale(vae, size=cfg.image_size) * cfg.latent_std
    # where each stretch of the run trained (the data and noise are the same on every device; the rounding is not)
    segments.append({"step": start, "device": device.type, "precision": precision})
    noise_sched = build_scheduler(cfg.prediction_type)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    ds = ShapesDataset(10**9, seed=seed + 1, size=cfg.image_size)
    log = workdir / f"{stage.name}_log.jsonl"
    t0 = time.time()
    layers = _text_layers(text)
    def autocast():  # a fresh context each step; bf16 only on CUDA when asked for
        if device.type == "cuda" and precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def save(done: int) -> None:
        save_checkpoint(ckpt, modules, {"opt": opt},
                        {"step": done, "total_steps": steps, "config": asdict(cfg), "seed": seed,
                         "scaling_factor": scale, "recipe_changes": changes, "segments": segments})

    done, slowest = start, 0.0
    end = steps if stop_at is None else min(steps, stop_at)
    for step in _progress(range(start, end), steps, start, stage.name):
        if budget_minutes is not None and step > start \
                and time.time() - t_call + slowest > budget_minutes * 60:  # another step would overrun
            if done % save_every:  # not saved at this step yet
                save(done)
            print(f"budget of {budget_minutes} min spent: stopped at step {done} of {steps} (checkpoint saved)",
                  file=sys.stderr)
            break
        t_step = time.time()
        if step in (start, cfg.text_table_steps):
            for p in layers:  # frozen while the encoder is a word table
                p.requires_grad_(step >= cfg.text_table_steps)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        b = _batch(ds, step, cfg.batch)
        prompts = ["" if torch.rand((), generator=gen) < cfg.cfg_dropout else p for p in b["prompt"]]
        with torch.no_grad():
            post = vae.encode(b["pixels"].to(device)).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)) * scale
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t.to(device))
        with autocast():
            pred = stage.predict(tokenizer, text, model, cfg, zt, t.to(device), prompts).float()
        # min-SNR-gamma plus the optional floor (see Recipe.snr_floor), as an x0 weight turned into the
        # weight of the predicted quantity: x0 errors are snr times smaller than epsilon's, snr + 1 than v's
        x0_weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) + cfg.snr_floor
        if cfg.prediction_type == "v_prediction":
            weight, target = x0_weight / (snr[t] + 1), noise_sched.get_velocity(z0, noise, t.to(device))
        else:
            weight, target = x0_weight / snr[t], noise
        loss = (weight.to(device) * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_text, text, decay)
        _ema_update(ema_model, model, decay)
        done = step + 1
        if done % 50 == 0:
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                                    "s": time.time() - t0}) + "\n")
        if done % save_every == 0 or done in (steps, end):
            save(done)
        slowest = max(slowest, time.time() - t_step)
    return done


PACK = CHECKPOINTS / "shapes-unet-resume.safetensors"
"""Where ``pack`` writes by default: beside the finished VAE stage, small enough to commit."""


def pack(workdir: Path, out: Path = PACK) -> Path:
    """Write a compact, resumable copy of ``workdir``'s UNet-stage checkpoint to ``out`` (+ ``out.json``).

    A training run outlives the machine it runs on only through what is committed, and the full
    checkpoint (fp32 weights, EMA, both Adam moments, all 49,408 token-embedding rows) is about 180 MB.
    The pack keeps what resuming needs, at about a sixth of that:

    - the weights and the EMA weights in fp16 (rounding them once moves a weight by less than one Adam
      step at this learning rate);
    - Adam's second moment in bf16 (its values span more than fp16's range); the first moment is dropped
      and restarts at zero (with beta1 = 0.9 it is rebuilt within about ten steps);
    - of the token embedding, only the rows that training has looked up (a non-zero second moment):
      the rows no Shapes prompt uses never receive a gradient, and :func:`unpack` restores them from the
      run's seeded initialisation.

    The sidecar keeps the checkpoint's metadata, the optimizer's settings and the training log.
    """
    from safetensors.torch import load_file, save_file

    ckpt = Path(workdir) / "unet.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"no UNet checkpoint at {ckpt}: nothing to pack")
    tensors = load_file(str(ckpt))
    side = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())
    embedding = "embeddings.token_embedding.weight"  # under text/ and ema_text/ (with or without text_model.)
    state_index = next(k.split("#")[1].split("/")[0] for k, v in tensors.items()
                       if k.startswith("opt#") and k.endswith("/exp_avg_sq") and v.shape[0] == VOCAB_SIZE)
    rows = torch.nonzero(tensors[f"opt#{state_index}/exp_avg_sq"].abs().sum(1) > 0).flatten()
    packed: dict[str, torch.Tensor] = {"embedding_rows": rows}
    for key, value in tensors.items():
        if key.endswith("/exp_avg"):
            continue
        if key.endswith(embedding) or key == f"opt#{state_index}/exp_avg_sq":
            value = value[rows]
        dtype = torch.bfloat16 if key.endswith("/exp_avg_sq") else torch.float16
        packed[key] = value.to(dtype) if value.is_floating_point() else value
    log = Path(workdir) / "unet_log.jsonl"
    side["pack"] = {"embedding_state_index": int(state_index), "vocab_size": VOCAB_SIZE,
                    "log": log.read_text().splitlines() if log.exists() else []}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(packed, str(tmp)))
    atomic_write(out.with_name(out.name + ".json"), lambda tmp: tmp.write_text(json.dumps(side)))
    return out


def unpack(src: Path, workdir: Path, vae: Path | None = None) -> Path:
    """Rebuild a resumable ``workdir/unet.safetensors`` (and its training log) from :func:`pack`'s file.

    The workdir needs the VAE the run trained on (``vae.safetensors``); when it has none it is copied
    from ``vae`` (default: ``checkpoints/shapes-vae.safetensors``, the shipped VAE stage). The unpacked
    run resumes at the packed step; the switch to rounded weights and a reset first moment is recorded
    as a recipe change, so the model card reports it.
    """
    from safetensors.torch import save_file

    src, workdir = Path(src), Path(workdir)
    packed, side, info, meta, cfg = _open_pack(src, workdir, vae, "pack")
    init = _seeded_text_init(workdir, cfg, meta["seed"])
    rows = packed.pop("embedding_rows")
    embedding = "embeddings.token_embedding.weight"  # under text/ and ema_text/ (with or without text_model.)
    sq = f"opt#{info['embedding_state_index']}/exp_avg_sq"
    tensors: dict[str, torch.Tensor] = {}
    for key, value in packed.items():
        value = value.float() if value.is_floating_point() else value
        if key.endswith(embedding):
            full = init.clone()
            full[rows] = value
            value = full
        elif key == sq:
            full = torch.zeros(info["vocab_size"], value.shape[1])
            full[rows] = value
            value = full
        tensors[key] = value
        if key.endswith("/exp_avg_sq"):
            tensors[key[: -len("_sq")]] = torch.zeros_like(value)
    meta.setdefault("recipe_changes", []).append(
        {"step": meta["step"], "changed": {"resumed_from_pack": [False, True]}})
    ckpt = workdir / "unet.safetensors"
    atomic_write(ckpt, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(ckpt.with_name(ckpt.name + ".json"), lambda tmp: tmp.write_text(json.dumps(side)))
    if info["log"]:
        (workdir / "unet_log.jsonl").write_text("\n".join(info["log"]) + "\n")
    return ckpt


EMA_PACK_KEYS = ("ema_text/", "ema_unet/")


def _seeded_text_init(workdir: Path, cfg: UNetConfig, seed: int) -> torch.Tensor:
    """The token embedding a run of ``seed`` started from: the modules built in train_unet's order."""
    torch.manual_seed(seed)
    _load_vae(workdir)
    return build_text_encoder(cfg).get_input_embeddings().weight.detach()


def ema_pack(workdir: Path, out: Path) -> Path:
    """Write what a GPU run must bring back to export its model: the EMA weights (text encoder + UNet) in fp16
    and the checkpoint's metadata and training log (``out`` + ``out.json``), small enough for the device
    tool's 16 MiB per file (12.3 MiB for candB's architecture; see
    benchmarks/results/shapes_self_attention_candidates.md).

    Unlike :func:`pack` it cannot resume training (no raw weights, no optimizer state); :func:`ema_unpack`
    turns it into a workdir that ``export`` reads. Of the 49,408-row token embedding it keeps the rows
    training looked up (a non-zero second moment). Every other row never had a gradient: weight decay
    and the EMA only scale it, all by the same factor, so it is stored as that one factor times the run's
    seeded initialisation (``embedding_scale``; the largest difference that leaves, over those rows, is
    recorded as ``embedding_scale_max_error``: rounding-level)."""
    from safetensors.torch import load_file, save_file

    workdir = Path(workdir)
    ckpt = workdir / "unet.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"no UNet checkpoint at {ckpt}: nothing to pack")
    side = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())
    meta = side["meta"]
    if meta.get("ema_only"):
        raise SystemExit(f"{ckpt} was itself unpacked from an EMA pack; pack the run it came from")
    tensors = load_file(str(ckpt))
    embedding = "embeddings.token_embedding.weight"
    sq = next(v for k, v in tensors.items()
              if k.startswith("opt#") and k.endswith("/exp_avg_sq") and v.shape[0] == VOCAB_SIZE)
    used = sq.abs().sum(1) > 0
    rows = torch.nonzero(used).flatten()
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    init = _seeded_text_init(workdir, cfg, meta["seed"])
    packed: dict[str, torch.Tensor] = {"embedding_rows": rows}
    info: dict = {"vocab_size": VOCAB_SIZE}
    for key, value in tensors.items():
        if not key.startswith(EMA_PACK_KEYS):
            continue
        if key.endswith(embedding):
            rest, base = value[~used].double(), init[~used].double()
            c = float((rest * base).sum() / (base * base).sum()) if len(base) else 1.0
            info["embedding_scale"] = c
            info["embedding_scale_max_error"] = float((rest - c * base).abs().max()) if len(base) else 0.0
            value = value[rows]
        packed[key] = value.to(torch.float16) if value.is_floating_point() else value
    log = workdir / "unet_log.jsonl"
    info["log"] = log.read_text().splitlines() if log.exists() else []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(packed, str(tmp)))
    atomic_write(out.with_name(out.name + ".json"),
                 lambda tmp: tmp.write_text(json.dumps({"meta": meta, "optimizers": {}, "ema_pack": info})))
    return out


def _open_pack(src: Path, workdir: Path, vae: Path | None, key: str) -> tuple[dict, dict, dict, dict, UNetConfig]:
    """What :func:`unpack` and :func:`ema_unpack` both start with: the packed tensors and sidecar (its ``key``
    entry popped as ``info``), ``workdir`` made and given the VAE (copied from ``vae``, default the shipped VAE
    stage, where it has none), the checkpoint meta and its UNet config."""
    from safetensors.torch import load_file

    packed = load_file(str(src))
    side = json.loads(src.with_name(src.name + ".json").read_text())
    info = side.pop(key)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "vae.safetensors").exists():
        vae = Path(vae or PACK.with_name("shapes-vae.safetensors"))
        for suffix in ("", ".json"):
            shutil.copyfile(f"{vae}{suffix}", workdir / f"vae.safetensors{suffix}")
    meta = side["meta"]
    return packed, side, info, meta, _config(UNET, meta["config"])


def ema_unpack(src: Path, workdir: Path, vae: Path | None = None) -> Path:
    """Rebuild from :func:`ema_pack`'s file a workdir that ``export`` reads: ``vae.safetensors`` (copied from
    ``vae``, default ``checkpoints/shapes-vae.safetensors``, where the workdir has none), an EMA-only
    ``unet.safetensors`` (fp32) whose metadata says so, and the training log. The unpacked workdir exports;
    it cannot resume training (``pack``/``unpack`` carry a resumable run)."""
    from safetensors.torch import save_file

    src, workdir = Path(src), Path(workdir)
    packed, side, info, meta, cfg = _open_pack(src, workdir, vae, "ema_pack")
    init = _seeded_text_init(workdir, cfg, meta["seed"])
    rows = packed.pop("embedding_rows")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in packed.items():
        value = value.float() if value.is_floating_point() else value
        if key.endswith("embeddings.token_embedding.weight"):
            full = init * info["embedding_scale"]
            full[rows] = value
            value = full
        tensors[key] = value.contiguous()
    meta["ema_only"] = True
    ckpt = workdir / "unet.safetensors"
    atomic_write(ckpt, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(ckpt.with_name(ckpt.name + ".json"), lambda tmp: tmp.write_text(json.dumps(side)))
    if info["log"]:
        (workdir / "unet_log.jsonl").write_text("\n".join(info["log"]) + "\n")
    return ckpt


def copy_file(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` at ``dst`` (replacing a file or link there). The embedded model's tokenizer files
    are real copies of the package's own: the repository holds no symbolic links (issue 21, Windows checkouts)."""
    dst = Path(dst)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    shutil.copyfile(Path(src).resolve(), dst)


def _trained(stage: Stage, workdir: Path, use_ema: bool):
    """``(vae, meta, tokenizer, text, denoiser)`` of ``workdir``'s ``stage`` checkpoint (its EMA weights, or the
    raw ones), the VAE's ``scaling_factor`` set to the one the run trained with."""
    vae = _load_vae(workdir)
    ckpt = workdir / f"{stage.name}.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"no {stage.name} checkpoint at {ckpt}: run the '{stage.name}' stage first")
    meta = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())["meta"]
    cfg = _config(stage, meta["config"])
    tokenizer = stage.tokenizer()
    text = stage.text_encoder(cfg, tokenizer)
    model = stage.denoiser(cfg, vae.config.latent_channels, _latent_side(vae, cfg))
    if not use_ema and meta.get("ema_only"):
        raise SystemExit(f"{ckpt} holds only EMA weights (from ema-unpack): export it without --raw")
    prefix = "ema_" if use_ema else ""
    load_checkpoint(ckpt, {f"{prefix}text": text, f"{prefix}{stage.name}": model}, {})
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae, meta, tokenizer, text, model


def _record(stage: Stage, workdir: Path, out: Path, meta: dict, use_ema: bool) -> dict:
    """The exported folder's ``training.json``: configs, seeds, steps, log summaries, checksums, rebuild commands."""
    vae_meta = json.loads((workdir / "vae.safetensors.json").read_text())["meta"]
    record = {
        f"{stage.name}_step": meta["step"], f"{stage.name}_total_steps": meta.get("total_steps"),
        "config": meta["config"], "seed": meta["seed"], "ema": use_ema,
        "recipe_changes": meta.get("recipe_changes", []), "scaling_factor": meta["scaling_factor"],
        "vae": {"step": vae_meta["step"], "config": vae_meta["config"], "seed": vae_meta["seed"]},
        # the logs stay in the workdir (not shipped): their summary travels with the model for its card
        "logs": {"vae": summarize_log(workdir / "vae_log.jsonl", vae_meta["step"]),
                 stage.name: summarize_log(workdir / f"{stage.name}_log.jsonl", meta["step"])},
        "sha256": weight_sums(out),  # load_pipeline checks these
    }
    # load_pipeline prints these for a damaged folder
    record["rebuild"] = rebuild_commands(record, stage.config(), stage=stage.name)
    return record


def export(workdir: Path, out: Path, use_ema: bool = True, denoiser: str = "unet") -> Path:
    """Write the trained parts as a diffusers folder (fp16 safetensors): a ``StableDiffusionPipeline`` for the
    ``unet`` stage (with its model card), a ``PixArtAlphaPipeline`` for ``denoiser="dit"`` (its T5-style
    tokenizer saved with it; no card yet)."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    stage = STAGES[denoiser]
    vae, meta, tokenizer, text, model = _trained(stage, workdir, use_ema)
    scheduler = build_scheduler(_config(stage, meta["config"]).prediction_type)
    if stage is DIT:
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=model,
                                   scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=model,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    if stage is UNET:
        canonical_text_encoder_keys(out)
        # transformers writes the tokenizer as one tokenizer.json (3.5 MB); ship the smaller vocab.json +
        # merges.txt pair it was built from instead, which CLIPTokenizer reads just as well
        tok_dir = Path(out) / "tokenizer"
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt", "LICENSE"):
            copy_file(TOKENIZER_DIR / name, tok_dir / name)
    (Path(out) / "training.json").write_text(json.dumps(_record(stage, workdir, Path(out), meta, use_ema), indent=1))
    if stage is UNET:
        write_card(out)
    return Path(out)


TEXT_PREFIX = "text_model."


def canonical_text_encoder_keys(folder: Path) -> bool:
    """Rewrite ``folder/text_encoder``'s weights so every key carries CLIP's ``text_model.`` prefix.

    transformers 5.x saves a ``CLIPTextModel`` without the prefix and reads both spellings; 4.x reads only the
    prefixed one and, given the other, initialises the text encoder at random with nothing but a warning. The
    prefixed names are the ones every supported version reads (tests/test_weights_load_exactly.py checks it,
    and scripts/test_oldest.sh runs that test on the oldest versions). The tensors are unchanged. Returns
    whether anything was rewritten."""
    from safetensors.torch import load_file, save_file

    changed = False
    for f in sorted((Path(folder) / "text_encoder").glob("*.safetensors")):
        tensors = load_file(f)
        if all(k.startswith(TEXT_PREFIX) for k in tensors):
            continue
        atomic_write(f, lambda tmp, t=tensors: save_file(
            {(k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k): v.contiguous() for k, v in t.items()},
            str(tmp), metadata={"format": "pt"}))
        changed = True
    return changed


def canonicalise(folder: Path, results: Path = RESULTS_DIR) -> list[Path]:
    """Give an exported folder canonical text-encoder key names (:func:`canonical_text_encoder_keys`) and keep
    everything measured on it valid: its ``training.json`` checksums are refreshed, and each benchmark record
    in ``results`` whose model fingerprint was the folder's old one is restamped with the new fingerprint,
    after checking that every tensor is the same (so the folder still generates the same images). Returns the
    records restamped."""
    from safetensors.torch import load_file

    folder = Path(folder)
    before_fp = fingerprint(folder)
    before = {f: load_file(f) for f in sorted((folder / "text_encoder").glob("*.safetensors"))}
    if not canonical_text_encoder_keys(folder):
        return []
    for f, old in before.items():
        new = load_file(f)
        assert len(new) == len(old) and all(torch.equal(new[TEXT_PREFIX + k.removeprefix(TEXT_PREFIX)], v)
                                            for k, v in old.items()), f"{f}: tensors changed while renaming keys"
    record_path = folder / "training.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        record["sha256"] = weight_sums(folder)
        record_path.write_text(json.dumps(record, indent=1))
    after_fp, restamped = fingerprint(folder), []
    for r in sorted(Path(results).glob("*.json")):
        text = r.read_text()
        if before_fp in text:
            r.write_text(text.replace(before_fp, after_fp))
            restamped.append(r)
    return restamped


def record_rebuild(folder: Path) -> Path:
    """Write (or refresh) the rebuild commands in ``folder/training.json`` from what it records; the rest of
    the record is kept as it is. Returns the record's path."""
    path = Path(folder) / "training.json"
    record = json.loads(path.read_text())
    stage = DIT if "dit_step" in record else UNET  # the export names its stage's step
    record["rebuild"] = rebuild_commands(record, stage.config(), stage=stage.name)
    path.write_text(json.dumps(record, indent=1))
    return path


def card(folder: Path, results: Path = RESULTS) -> Path:
    """The ``card`` stage: refresh ``training.json``'s rebuild commands and ``tokenizer/LICENSE``, then
    rewrite the model card from the recorded results. Returns the card's path."""
    folder = Path(folder)
    record_rebuild(folder)
    if (folder / "tokenizer").is_dir():
        copy_file(TOKENIZER_DIR / "LICENSE", folder / "tokenizer" / "LICENSE")
    return write_card(folder, results)


def text_path_current(folder: Path = EMBEDDED, record: Path = TEXT_PATH) -> bool:
    """Whether the text-path benchmark's record was measured on what it reads of ``folder`` (its VAE,
    tokenizer and scheduler): a new UNet or text encoder alone leaves it valid."""
    data = json.loads(Path(record).read_text()) if Path(record).is_file() else None
    return bool(data) and text_path_applies(data, folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.shapes_model.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "unet", "dit", "export", "card", "pack", "unpack", "ema-pack",
                                          "ema-unpack", "text-path-current", "canonical-keys"],
                        help="dit: train the Shapes DiT (PixArt-alpha's architecture, a T5 encoder; DiTConfig) on the "
                        "same VAE, data and recipe as the unet stage, its checkpoint WORKDIR/dit.safetensors; "
                        "card: rewrite the model card (README.md) of the --out folder from its training.json and "
                        "benchmarks/results/shapes_quality.json (run it after python -m benchmarks.shapes_quality), "
                        "and refresh the rebuild commands in its training.json; text-path-current: exit status 0 "
                        "if benchmarks/results/shapes_text_path.json fits the --out folder's (default: the "
                        "embedded model's) VAE, tokenizer and scheduler, 1 if it must be rerun; canonical-keys: "
                        "give the --out folder's text encoder the key names every supported transformers reads, "
                        "refresh its checksums and restamp the benchmark records measured on it (same tensors)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs, for tests")
    parser.add_argument("--snr-floor", type=float, default=None,
                        help="unet, dit: x0-weight floor added to min-SNR weighting (UNetConfig.snr_floor; default: the "
                        "checkpoint's value, or 0 for a new run)")
    parser.add_argument("--latent-std", type=float, default=None,
                        help="unet, dit: the std latents are scaled to (UNetConfig.latent_std; default: the checkpoint's "
                        "value, or 1 for a new run, as in Stable Diffusion)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="unet, dit, new runs: what the denoiser predicts (UNetConfig.prediction_type; default epsilon, as "
                        "in SD 1.x)")
    parser.add_argument("--text-table-steps", type=int, default=None,
                        help="unet, dit, new runs: steps the text encoder starts as a word table with frozen layers "
                        "(UNetConfig.text_table_steps; default 0)")
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=None,
                        help="unet, new runs: channels per UNet level, one level per number (UNetConfig."
                        "block_out_channels; default 32 64 128). With --image-size 128, four levels (e.g. 32 64 64 128) "
                        "keep the lowest grid at 4x4")
    parser.add_argument("--attention-heads", type=int, default=None,
                        help="unet, new runs: heads per attention layer (UNetConfig.attention_heads; default 4). Fewer "
                        "heads make a 32x32 grid's maps cheaper to train on CPU")
    parser.add_argument("--layers-per-block", type=int, default=None,
                        help="unet, new runs: ResNet layers per UNet block (UNetConfig.layers_per_block; default 2)")
    parser.add_argument("--transformer-layers", type=int, default=None,
                        help="unet, new runs: transformer blocks per attention module (default 1)")
    parser.add_argument("--attention-levels", type=int, nargs="+", default=None,
                        help="unet, new runs: the levels whose blocks have attention, 0 = the latent grid (default: all "
                        "but the lowest)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="unet (new runs): render the world at this size for the UNet (default 64; 128 gives "
                             "32x32 latents through the same VAE)")
    parser.add_argument("--device", default="cpu",
                        help="vae, unet, dit: where the models, batches and noise live (cpu, cuda, cuda:1, ...; default "
                        "cpu). The random draws stay on CPU generators, so a CPU run is unchanged")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="unet, dit: stop cleanly (checkpoint saved) before the wall time since the start exceeds "
                        "this; run the same command again to resume")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="unet, dit: stop (checkpoint saved) at this step of the --steps schedule")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="unet, dit on CUDA: fp32 (default), tf32 matmuls, or bf16 autocast forward passes")
    parser.add_argument("--out", type=Path, help="export, card: the diffusers folder to write")
    parser.add_argument("--denoiser", choices=sorted(STAGES), default="unet",
                        help="export: which stage's checkpoint to export (unet: a StableDiffusionPipeline, dit: a "
                        "PixArtAlphaPipeline)")
    parser.add_argument("--raw", action="store_true",
                        help="export: the raw weights instead of their EMA (early in a run the EMA still "
                        "remembers its first steps; to judge a checkpoint, not to ship)")
    parser.add_argument("--pack", type=Path, default=PACK,
                        help="pack, unpack: the compact resumable copy of the UNet stage to write or read "
                        "(default checkpoints/shapes-unet-resume.safetensors)")
    parser.add_argument("--ema-pack", type=Path, default=None,
                        help="ema-pack, ema-unpack: the EMA weights + metadata file a GPU run brings back (default "
                        "WORKDIR/ema-pack.safetensors)")
    parser.add_argument("--results", type=Path, default=None,
                        help="card: the quality bar's results (default benchmarks/results/shapes_quality.json)")
    args = parser.parse_args(argv)
    if args.stage == "text-path-current":
        raise SystemExit(0 if text_path_current(args.out or EMBEDDED) else 1)
    if args.stage == "canonical-keys":
        for r in canonicalise(args.out or EMBEDDED):
            print(f"restamped {r}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage == "vae":
        train_vae(args.workdir, args.steps, TINY_VAE if args.tiny else VAEConfig(), args.seed,
                  args.save_every, args.eval_every, device=args.device)
    elif args.stage == "unet":
        arch = {"block_out_channels": tuple(args.block_out_channels) if args.block_out_channels else None,
                "attention_heads": args.attention_heads, "layers_per_block": args.layers_per_block, "transformer_layers": args.transformer_layers,
                "attention_levels": tuple(args.attention_levels) if args.attention_levels else None,
                "image_size": args.image_size}
        cfg = replace(TINY_UNET if args.tiny else UNetConfig(), **{k: v for k, v in arch.items() if v is not None})
        train_unet(args.workdir, args.steps, cfg, args.seed, args.save_every,
                   snr_floor=args.snr_floor, latent_std=args.latent_std,
                   prediction_type=args.prediction_type, text_table_steps=args.text_table_steps,
                   device=args.device, budget_minutes=args.budget_minutes, precision=args.precision,
                   stop_at=args.stop_at)
    elif args.stage == "dit":
        train_dit(args.workdir, args.steps, TINY_DIT if args.tiny else DiTConfig(), args.seed, args.save_every,
                  snr_floor=args.snr_floor, latent_std=args.latent_std, prediction_type=args.prediction_type,
                  text_table_steps=args.text_table_steps, device=args.device, budget_minutes=args.budget_minutes,
                  precision=args.precision, stop_at=args.stop_at)
    elif args.stage == "pack":
        print(pack(args.workdir, args.pack))
    elif args.stage == "unpack":
        print(unpack(args.pack, args.workdir))
    elif args.stage == "ema-pack":
        print(ema_pack(args.workdir, args.ema_pack or args.workdir / "ema-pack.safetensors"))
    elif args.stage == "ema-unpack":
        print(ema_unpack(args.ema_pack or args.workdir / "ema-pack.safetensors", args.workdir))
    elif args.stage == "card":
        if args.out is None:
            parser.error("card needs --out (the exported model folder)")
        print(card(args.out, args.results or RESULTS))
    else:
        if args.out is None:
            parser.error("export needs --out")
        print(export(args.workdir, args.out, use_ema=not args.raw, denoiser=args.denoiser))


if __name__ == "__main__":
    main()
