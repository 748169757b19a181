"""Cost of capture: plain generation vs capturing every cross-attention map vs self-attention at reduced storage.

Time: the three modes run in one process, interleaved over --repeats rounds after a warm-up; the median
wall time of each and its ratio to plain generation are reported. Target: cross-attention capture at
most 1.15x plain generation.

Peak memory, per mode:
- on CPU, each mode runs once in its own fresh process (torch's allocations are invisible to
  tracemalloc): with the pipeline loaded, the process's peak-RSS mark is reset (``5`` written to
  ``/proc/self/clear_refs``), one generation runs, and the peak RSS (``getrusage`` ``ru_maxrss``) and
  its rise over the RSS before generating are reported. Where the mark cannot be reset, the rise is
  a lower bound if loading peaked higher than generating (flagged as ``peak_reset: false``);
- on CUDA, in this process: ``torch.cuda.max_memory_allocated`` during one generation of each mode
  (after ``reset_peak_memory_stats``), and its rise over the memory allocated before it;
- for the capture modes, the bytes of maps the cache holds (on CPU) after the run.

Models (``--arch``):
- ``default``: the embedded Shapes model if present (or --model), else the tiny test pipeline.
- ``pixart``, ``sd3``, ``flux``: the tiny random transformer pipelines of the tests (:mod:`attnlens._testing`:
  16x16 images, a 4x4 token grid, two or three blocks). On models this small the hooks' fixed Python cost per
  layer call weighs far more than on a real one, so their ratio is an upper bound for the mechanism, not a
  figure for PixArt, SD3 or Flux at their sizes.
- ``sd15``: Stable Diffusion 1.5's architecture with random weights, built in code from the published
  configs (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder, SD's VAE), at --resolution (512 by
  default) in fp16 on CUDA. Meant for a GPU; on CPU it runs in fp32 only at a small --resolution (for
  checking the script).

Writes benchmarks/results/capture_overhead.json (``--arch sd15``: capture_overhead_sd15.json).

    python -m benchmarks.capture_overhead                 # embedded model if present, else the tiny test pipeline
    python -m benchmarks.capture_overhead --model PATH    # any local diffusers folder or hub id
    python -m benchmarks.capture_overhead --arch sd15     # on a GPU: SD 1.5 at 512x512, fp16, random weights
    python -m benchmarks.capture_overhead --arch pixart   # a tiny transformer (also sd3, flux): capture_overhead_pixart.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import attnlens
from attnlens._pipeline import EMBEDDED_MODEL
from attnlens._testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

# Stable Diffusion 1.5's published component configurations (UNet, VAE, CLIP ViT-L/14 text encoder).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407, projection_dim=768)

MODES = {
    "plain": None,
    "cross, head mean, all steps": dict(),
    "self, reduced (mean over steps, 8x8)": dict(kind="self", reduce="mean", store_resolution=8),
}


DITS = ("pixart", "sd3", "flux")


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def sd15_pipeline(device: torch.device, dtype: torch.dtype):
    """SD 1.5's architecture with random weights (built on ``device`` directly: fast on a GPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnlens._tokenizer import load_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device, dtype)


def build(args) -> tuple:
    """``(pipe, name, height)`` for the chosen --arch / --model on --device."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.arch == "sd15":
        if device.type != "cuda" and args.resolution > 128:
            raise SystemExit("--arch sd15 on CPU: pass a small --resolution (e.g. 64); 512x512 is meant for a GPU")
        pipe = sd15_pipeline(device, dtype)
        name = f"SD 1.5 architecture, random weights, {args.resolution}x{args.resolution}, {str(dtype).split('.')[-1]}"
        height = args.resolution
    elif args.arch in DITS:
        from attnlens import _testing

        pipe = getattr(_testing, f"tiny_{args.arch}_pipeline")().to(device, dtype)
        name, height = f"tiny {args.arch} test pipeline (random weights, 16x16 images, 4x4 token grid)", None
    elif args.model or (EMBEDDED_MODEL / "model_index.json").exists():
        pipe = attnlens.load_pipeline(args.model, device=device)
        name, height = str(args.model or "embedded Shapes model"), None
    else:
        pipe = tiny_pipeline().to(device, dtype)
        name, height = "tiny test pipeline (random weights; embedded model not present)", None
    pipe.set_progress_bar_config(disable=True)
    return pipe, name, height


def generator(pipe, args):
    prompts = ["a red star on the left"] * args.batch
    extra = {"use_resolution_binning": False, "clean_caption": False} if args.arch == "pixart" else {}
    extra.update({"max_sequence_length": 32} if args.arch in ("sd3", "flux") else {})

    def generate():
        with warnings.catch_warnings():  # random fp16 weights may overflow in the VAE: irrelevant to timing
            warnings.simplefilter("ignore", RuntimeWarning)
            return pipe(prompts, height=args.height, width=args.height, num_inference_steps=args.steps,
                        guidance_scale=7.5, output_type="np",
                        generator=torch.Generator(device=pipe.device).manual_seed(0), **extra)

    return generate


def run_mode(pipe, generate, mode: str):
    """Run one generation in ``mode``; return the cache (None for plain)."""
    kwargs = MODES[mode]
    if kwargs is None:
        generate()
        return None
    with attnlens.capture(pipe, **kwargs) as cache:
        generate()
    return cache


def cache_mib(cache) -> float | None:
    return None if cache is None else sum(t.numel() * t.element_size() for t in cache.maps.values()) / 2**20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    """In a fresh process: load, then one generation in --memory-child mode; print the RSS figures as JSON."""
    pipe, _, args.height = build(args)
    generate = generator(pipe, args)
    try:  # reset the peak-RSS mark (Linux >= 4.0), so loading's own peak does not hide generation's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    loaded_rss = rss_mib()
    cache = run_mode(pipe, generate, args.memory_child)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "rss_loaded_mib": loaded_rss, "peak_over_loaded_mib": peak - loaded_rss,
                      "peak_reset": reset, "stored_maps_mib": cache_mib(cache)}))


def memory_cpu(args) -> dict:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-child", mode, "--arch", args.arch, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch), "--resolution", str(args.resolution)]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"memory measurement of {mode!r} failed:\n{run.stderr[-3000:]}")
        out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def memory_cuda(pipe, generate) -> dict:
    out = {}
    for mode in MODES:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        cache = run_mode(pipe, generate, mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out[mode] = {"peak_gpu_mib": peak / 2**20, "peak_gpu_over_loaded_mib": (peak - before) / 2**20,
                     "stored_maps_mib": cache_mib(cache)}
        del cache
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--arch", choices=["default", "sd15", *DITS], default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=512, help="image side for --arch sd15 (default 512)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--memory-child", choices=list(MODES), help=argparse.SUPPRESS)  # internal: one mode, fresh process
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    out_path = args.out or ROOT / "benchmarks" / "results" / (
        "capture_overhead.json" if args.arch == "default" else f"capture_overhead_{args.arch}.json")
    pipe, name, args.height = build(args)
    generate = generator(pipe, args)
    cuda = pipe.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    load_before = os.getloadavg()[0]  # other work on the machine skews the ratios: recorded beside them
    generate()  # warm-up
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            sync()
            t0 = time.perf_counter()
            run_mode(pipe, generate, mode)
            sync()
            times[mode].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    memory = memory_cuda(pipe, generate) if cuda else memory_cpu(args)
    result = {
        "model": name, "device": str(pipe.device), "dtype": str(denoiser(pipe).dtype).split(".")[-1],
        "image_size": args.height or (getattr(pipe, "default_sample_size", None)
                                      or denoiser(pipe).config.sample_size) * pipe.vae_scale_factor,
        "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                   + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "seconds": {m: statistics.median(t) for m, t in times.items()},
        "ratio_to_plain": {m: statistics.median(t) / base for m, t in times.items()},
        "peak_memory": memory,
        "peak_memory_method": ("torch.cuda.max_memory_allocated per mode, in this process" if cuda else
                               "ru_maxrss of a fresh process per mode, peak mark reset after loading (rise over the RSS with the "
                               "pipeline loaded)"),
        "peak_rss_mib_timing_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target_cross_ratio": 1.15,
        "load_average_1min_before": load_before,
        "command": " ".join(["python -m benchmarks.capture_overhead", *sys.argv[1:]]),
    }
    key = "peak_gpu_mib" if cuda else "peak_rss_mib"
    rise = "peak_gpu_over_loaded_mib" if cuda else "peak_over_loaded_mib"
    print(f"{name} on {result['device']} ({result['dtype']}), batch {args.batch}, {args.steps} steps")
    print(f"{'mode':40s} {'seconds':>8s} {'ratio':>7s} {'peak MiB':>10s} {'rise MiB':>10s} {'maps MiB':>10s}")
    for m in MODES:
        mem = memory[m]
        maps = "" if mem["stored_maps_mib"] is None else f"{mem['stored_maps_mib']:10.1f}"
        print(f"{m:40s} {result['seconds'][m]:8.3f} x{result['ratio_to_plain'][m]:6.3f} {mem[key]:10.1f} "
              f"{mem[rise]:10.1f} {maps:>10s}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
