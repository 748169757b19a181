"""Cost of editing: an ``fpe`` edit vs a plain generation of the same two-image batch, in one run.

Measures, interleaved over --repeats rounds (median wall time): plain generation of the batch
[source, target] from the same noise; ``fpe`` through fused attention (source Q, K injected); ``fpe``
through the explicit-map reference path; and DDIM inversion time per step. Target: the fused ``fpe``
edit at most 1.10x plain generation. Writes benchmarks/results/edit_speed.json (or --out).

    python -m benchmarks.edit_speed                 # embedded Shapes model (or $ATTNLENS_MODEL)
    python -m benchmarks.edit_speed --model PATH    # any local diffusers folder or hub id
    python -m benchmarks.edit_speed --arch sd15     # SD 1.5 UNet architecture, random weights (GPU: fp16 512x512)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnlens
from attnlens._editing import start_noise


def sd15_random(device: str, dtype: torch.dtype):
    """SD 1.5's published UNet/VAE/text-encoder architectures with random weights (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnlens._tokenizer import load_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--arch", choices=["model", "sd15"], default="model")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.arch == "sd15":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe, name = sd15_random(device, dtype), f"SD 1.5 architecture, random weights, {dtype}"
        height = width = 512 if device == "cuda" else 128
    else:
        pipe = attnlens.load_pipeline(args.model)
        name, height, width = str(args.model or os.environ.get("ATTNLENS_MODEL") or "embedded Shapes model"), None, None
    pipe.set_progress_bar_config(disable=True)
    src, tgt = "a large red star on the left on a black background", "a large blue star on the left on a black background"
    z = start_noise(pipe, 0, height, width)
    batch = z.expand(2, -1, -1, -1).to(pipe.device, pipe.unet.dtype)

    def sync():
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        pipe([src, tgt], latents=batch, num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt",
             height=height, width=width)

    def fpe(path):
        return lambda: attnlens.edit(pipe, src, tgt, method="fpe", latents=z, num_inference_steps=args.steps,
                                     path=path, height=height, width=width)

    modes = {"plain [source, target]": plain, "fpe fused": fpe("fused"), "fpe explicit map": fpe("explicit")}
    load_before = os.getloadavg()[0]
    plain()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, fn in modes.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[mode].append(time.perf_counter() - t0)
    size = (height or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    image = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
    inv = attnlens.invert(pipe, image, "", num_inference_steps=args.steps, check=False)
    med = {m: statistics.median(t) for m, t in times.items()}
    base = med["plain [source, target]"]
    result = {
        "model": name, "device": str(pipe.device), "steps": args.steps, "repeats": args.repeats,
        "seconds": med, "ratio_to_plain": {m: v / base for m, v in med.items()},
        "inversion_seconds_per_step": inv.seconds_per_step,
        "target": "fpe fused <= 1.10x plain", "meets_target": med["fpe fused"] / base <= 1.10,
        "load_average_before": load_before, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__,
        "command": "python -m benchmarks.edit_speed" + (f" --arch {args.arch}" if args.arch != "model" else ""),
    }
    if pipe.device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    out = args.out or Path(__file__).parent / "results" / f"edit_speed{'_' + args.arch if args.arch != 'model' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for m in modes:
        print(f"{m:28s} {med[m]:7.3f} s   x{med[m] / base:.3f}")
    print(f"inversion: {inv.seconds_per_step:.3f} s per step;  wrote {out}")


if __name__ == "__main__":
    main()
