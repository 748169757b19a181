"""The checkers. Each runs the student's code on a tiny pipeline or small tensors against attnlens' reference."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import numpy as np
import torch

PROMPT = "a red star on a black background"
SOURCE, TARGET = "a red star", "a blue star"   # same number of tokens: Prompt-to-Prompt's replace mode
STEPS = 4                                      # denoising steps of every checker run (seconds on a CPU)
SEED = 0


class ExerciseFailed(AssertionError):
    """Your implementation ran but gave a different answer from the reference (the message says where)."""


CHECKERS: dict[str, str] = {}
"""``{checker name: the chapter (book/NN_topic) whose exercise it checks}``."""


def _checker(chapter: str) -> Callable:
    """Register a checker; turn NotImplementedError (the untouched stub) into a friendly 'not attempted'."""

    def wrap(check: Callable) -> Callable:
        CHECKERS[check.__name__] = chapter

        @functools.wraps(check)
        def run(student: Any, *args: Any, **kwargs: Any) -> bool:
            try:
                with torch.no_grad():
                    check(student, *args, **kwargs)
            except NotImplementedError:
                print(f"{check.__name__}: not attempted yet (the function raised NotImplementedError); "
                      "write your code and run it again.")
                return False
            print(f"{check.__name__}: passed")
            return True

        return run

    return wrap


def show(*objs: Any) -> None:
    """Print the source of solutions (the book's hidden solution cells use it)."""
    for obj in objs:
        print(inspect.getsource(obj))


def _close(name: str, got: Any, want: torch.Tensor, atol: float, what: str) -> None:
    if not isinstance(got, torch.Tensor):
        raise ExerciseFailed(f"{name}: expected a torch.Tensor for {what}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise ExerciseFailed(f"{name}: {what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = float((got.detach().float().cpu() - want.detach().float().cpu()).abs().max())
    if not err <= atol:
        raise ExerciseFailed(f"{name}: {what} differs from attnlens' reference by up to {err:.3g} (tolerance {atol:g})")


def _tiny(cross_attention_dim: int = 32):
    from attnlens._testing import tiny_pipeline

    return tiny_pipeline(seed=SEED, cross_attention_dim=cross_attention_dim)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


# ------------------------------------------------------------------------------------------ chapter 1
@_checker("book/01_introduction")
def check_sampler(sample: Callable) -> None:
    """Check ``sample(pipe, prompt, latents, num_inference_steps, guidance_scale) -> latents``.

    Your sampler runs classifier-free guidance and the scheduler's denoising loop from the start noise
    ``latents`` ``(1, 4, h, w)`` and returns the final latents ``(1, 4, h, w)`` (before the VAE); the
    reference is ``pipe(prompt, latents=..., output_type="latent")``, at two guidance scales.
    """
    pipe = _tiny()
    noise = torch.randn(1, 4, 8, 8, generator=_gen())
    for scale in (1.0, 7.5):
        want = pipe(PROMPT, latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=scale,
                    output_type="latent").images
        got = sample(pipe, PROMPT, noise.clone(), STEPS, scale)
        _close("check_sampler", got, want, 1e-4, f"the final latents at guidance_scale={scale}")


# ------------------------------------------------------------------------------------------ chapter 2
def _layer_inputs(pipe: Any, name: str) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(module, hidden_states, encoder_hidden_states) of ``name``'s last call, and the map attnlens captured
    there, ``(batch/2, heads, queries, keys)`` (the conditional half)."""
    import attnlens

    info = next(i for i in attnlens.layers(pipe) if i.name == name)
    seen = []
    handle = info.module.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw)), with_kwargs=True)
    try:
        with attnlens.capture(pipe, layers=name, heads="all", dtype=torch.float32) as cache:
            pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="latent")
    finally:
        handle.remove()
    args, kwargs = seen[-1]
    maps = cache[name, cache.steps[-1]].float()             # (items, heads, h, w, keys), the conditional prompt
    want = maps.flatten(2, 3)                                # (items, heads, queries, keys)
    return info.module, args[0], kwargs.get("encoder_hidden_states"), want


@_checker("book/02_unet_anatomy")
def check_attention_probs(attention_probs: Callable) -> None:
    """Check ``attention_probs(attn, hidden_states, encoder_hidden_states=None) -> probs``.

    ``attn`` is a diffusers ``Attention`` module, ``hidden_states`` ``(batch, queries, channels)``,
    ``encoder_hidden_states`` ``(batch, keys, text channels)`` for cross-attention or ``None`` for
    self-attention. Return ``softmax(Q K^T / sqrt(d))`` per head, ``(batch, heads, queries, keys)``.
    Compared with the map :func:`attnlens.capture` recorded at the same call, on one self- and one
    cross-attention layer.
    """
    pipe = _tiny()
    for name in ("down.0.0.self", "down.0.0.cross"):
        module, hidden, context, want = _layer_inputs(pipe, name)
        got = attention_probs(module, hidden, context)
        if not isinstance(got, torch.Tensor) or got.ndim != 4:
            raise ExerciseFailed(f"check_attention_probs: return a (batch, heads, queries, keys) tensor for {name}")
        cond = got[got.shape[0] // 2:]                       # the batch is [unconditional, conditional]
        _close("check_attention_probs", cond, want, 1e-3, f"the map of {name} (conditional half)")


# ------------------------------------------------------------------------------------------ chapter 3
@_checker("book/03_cross_attention")
def check_capture_processor(processor_class: type) -> None:
    """Check a capture processor: ``processor_class()`` has a list ``maps``; installed as a diffusers attention
    processor (``__call__(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)``),
    each call appends the map ``(batch, heads, queries, keys)`` and returns the layer's usual output.

    Installed on one cross-attention layer for a run of the tiny pipeline (the original processor is put
    back afterwards): the image must not change, one map per step must be stored, and the last map's
    conditional half must equal what :func:`attnlens.capture` records.
    """
    pipe = _tiny()
    name = "up.1.0.cross"
    module, _, _, want = _layer_inputs(pipe, name)
    plain = pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="latent").images
    proc = processor_class()
    original = module.processor
    module.set_processor(proc)
    try:
        with_proc = pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="latent").images
    finally:
        module.set_processor(original)
    if not hasattr(proc, "maps"):
        raise ExerciseFailed("check_capture_processor: the processor has no `maps` list")
    if len(proc.maps) != STEPS:
        raise ExerciseFailed(f"check_capture_processor: {len(proc.maps)} maps stored for {STEPS} steps (one per call)")
    _close("check_capture_processor", with_proc, plain, 1e-4, "the generation with your processor installed")
    last = proc.maps[-1]
    _close("check_capture_processor", last[last.shape[0] // 2:] if isinstance(last, torch.Tensor) else last, want,
           1e-3, f"the last map stored for {name} (conditional half)")


# ------------------------------------------------------------------------------------------ chapter 4
class _ZeroOutput:
    """The reference ablation: the attention layer's output is zero, so its block keeps only the residual."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return torch.zeros_like(hidden_states)


def _with_processors(pipe: Any, modules: list, make: Callable, run: Callable) -> Any:
    originals = [m.processor for m in modules]
    try:
        for m in modules:
            m.set_processor(make())
        return run()
    finally:
        for m, p in zip(modules, originals):
            m.set_processor(p)


@_checker("book/04_self_attention")
def check_self_attention_ablation(processor_class: type) -> None:
    """Check an ablation processor: ``processor_class()`` installed on every self-attention layer makes each
    layer contribute nothing (its output is zero, ``(batch, queries, channels)`` like its input), so the
    transformer block keeps only its residual. Compared with the reference ablation on the tiny pipeline.
    """
    import attnlens

    pipe = _tiny()
    selfs = [i.module for i in attnlens.layers(pipe) if i.kind == "self"]

    def run():
        return pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="latent").images

    want = _with_processors(pipe, selfs, _ZeroOutput, run)
    got = _with_processors(pipe, selfs, processor_class, run)
    _close("check_self_attention_ablation", got, want, 1e-5, "the generation with every self-attention layer ablated")
    if float((run() - want).abs().max()) == 0:  # pragma: no cover - the checker's own sanity
        raise RuntimeError("the ablation changed nothing on the tiny pipeline: the check cannot tell")


# ------------------------------------------------------------------------------------------ chapter 5
def _probe_data(leaky: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forty groups (prompts) of ten samples each. ``leaky=False``: the label is written in one feature in every
    group. ``leaky=True``: one label per group and a random code per group, so the label can only be learnt by
    recognising groups seen in training (a probe must then score near chance on held-out groups)."""
    rng = np.random.default_rng(seed)
    n_groups, per, dim = 40, 10, 64
    groups = np.repeat(np.arange(n_groups), per)
    if leaky:
        group_label = rng.permutation(np.arange(n_groups) % 2)
        y = group_label[groups]
        codes = rng.normal(size=(n_groups, dim)) * 3
        x = codes[groups] + 0.3 * rng.normal(size=(len(groups), dim))
    else:
        y = rng.integers(0, 2, size=len(groups))
        x = rng.normal(size=(len(groups), dim))
        x[:, 0] += 4 * (y - 0.5)
    order = rng.permutation(len(groups))     # samples in no particular order, as collected data would be
    return x[order].astype(np.float32), y[order], groups[order]


@_checker("book/05_probing")
def check_grouped_probe(probe: Callable) -> None:
    """Check ``probe(x, y, groups, cv) -> accuracy``: the mean held-out accuracy of a linear probe with ``cv``
    folds grouped by ``groups`` (no group in both the training and the test part of a fold).

    ``x`` ``(samples, features)``, ``y`` ``(samples,)`` integer labels, ``groups`` ``(samples,)`` group ids
    (the prompt of each generation in the book). Two synthetic sets decide: one where the label is readable
    in every group (a probe must find it: accuracy at least 0.9) and one where only recognising the groups
    seen in training gives the label (a grouped probe scores near chance: at most 0.7; an ungrouped one
    scores near 1, the leak that grouping exists to prevent).
    """
    x, y, g = _probe_data(leaky=False)
    acc = float(probe(x, y, g, 5))
    if not acc >= 0.9:
        raise ExerciseFailed(f"check_grouped_probe: accuracy {acc:.3f} where the label is plainly in the features "
                             "(expected at least 0.9): is the probe trained and scored on the right samples?")
    x, y, g = _probe_data(leaky=True)
    acc = float(probe(x, y, g, 5))
    if not acc <= 0.7:
        raise ExerciseFailed(f"check_grouped_probe: accuracy {acc:.3f} on data where only memorising groups helps "
                             "(expected near chance, at most 0.7): the folds are not grouped, so test groups leak "
                             "into training")


# ------------------------------------------------------------------------------------------ chapters 6 and 7
def _edit_with(pipe: Any, controller: Any) -> torch.Tensor:
    """The [source, target] run from the edit's start noise under ``controller``: ``(2, 3, H, W)`` in [0, 1]."""
    import attnlens
    from attnlens._editing import start_noise

    latents = start_noise(pipe, SEED)
    with attnlens.control(pipe, controller):
        return pipe([SOURCE, TARGET], latents=latents.expand(2, *latents.shape[1:]), num_inference_steps=STEPS,
                    guidance_scale=7.5, output_type="pt").images


def _check_controller(name: str, controller_class: type, selector: Any, method: str, **options: Any) -> None:
    import attnlens

    pipe = _tiny()
    ref = attnlens.edit(pipe, SOURCE, TARGET, method=method, seed=SEED, num_inference_steps=STEPS, **options)
    plain = attnlens.edit(pipe, SOURCE, TARGET, method="none", seed=SEED, num_inference_steps=STEPS)
    moved = float((ref.pixels[1] - plain.pixels[1]).abs().max())
    if moved < 1e-4:  # pragma: no cover - the checker's own sanity
        raise RuntimeError(f"{method} changes nothing on the tiny pipeline: the check cannot tell")
    got = _edit_with(pipe, controller_class(selector))
    _close(name, got[0], ref.pixels[0], 1e-4, "the source image (it must not be edited)")
    _close(name, got[1], ref.pixels[1], min(1e-4, moved / 10), f"the edited image (attnlens.edit(method={method!r}))")


@_checker("book/06_cross_attention_editing")
def check_p2p_replace(controller_class: type) -> None:
    """Check a Prompt-to-Prompt *replace* controller: ``controller_class(selector)``, an
    :class:`attnlens.Controller` whose ``edit_map`` gives the target prompt (prompt 1) the source's (prompt 0)
    cross-attention map, token for token, in the conditional branch, on the layers and steps of ``selector``.

    Run on the tiny pipeline ("a red star" to "a blue star") with the selector of P2P's cross part
    (every cross-attention layer, the first 80% of the steps); compared with
    ``attnlens.edit(method="cross", mode="replace")``.
    """
    import attnlens

    sel = attnlens.Selector(kind="cross", steps=(0.0, 0.8))
    _check_controller("check_p2p_replace", controller_class, sel, "cross", mode="replace")


@_checker("book/07_free_prompt_editing")
def check_fpe_controller(controller_class: type) -> None:
    """Check a Free-Prompt-Editing controller: ``controller_class(selector)``, an :class:`attnlens.Controller`
    that makes the target's (prompt 1) self-attention output ``softmax(Q_src K_src^T / sqrt(d)) V_tgt`` in the
    conditional branch on the layers and steps of ``selector`` (by ``rewrite`` or by ``edit_map``).

    Run on the tiny pipeline with every self-attention layer selected for the first 80% of the steps;
    compared with ``attnlens.edit(method="fpe", path="explicit", max_resolution=8)``.
    """
    import attnlens

    sel = attnlens.Selector(kind="self", steps=(0.0, 0.8), branch="cond")
    _check_controller("check_fpe_controller", controller_class, sel, "fpe", path="explicit", max_resolution=8)


# ------------------------------------------------------------------------------------------ chapter 8
@_checker("book/08_real_images")
def check_inversion_step(step: Callable) -> None:
    """Check ``step(x, eps, alpha_from, alpha_to) -> x_next``: one deterministic DDIM move of the latents ``x``
    ``(1, 4, h, w)`` from noise level ``alpha_from`` (the cumulative alpha, a 0-d tensor) to ``alpha_to`` with
    the noise estimate ``eps``. Inversion runs it towards more noise, step by step; the whole inversion of
    an image on the tiny pipeline is compared with :func:`attnlens.invert`'s latents.
    """
    import attnlens
    from PIL import Image

    pipe = _tiny()
    img = Image.fromarray((np.indices((16, 16)).sum(0) * 8 % 256).astype(np.uint8)).convert("RGB")
    inv = attnlens.invert(pipe, img, "", num_inference_steps=STEPS, check=False)
    sched = pipe.scheduler
    ts = [int(t) for t in inv.timesteps] if hasattr(inv, "timesteps") else [int(t) for t in sched.timesteps]
    emb, _ = pipe.encode_prompt("", pipe.device, 1, False)
    n = len(ts)
    x = inv.latents[-1][None].float()
    for k, i in enumerate(reversed(range(n))):
        a_from = sched.alphas_cumprod[ts[i + 1]] if i + 1 < n else sched.final_alpha_cumprod
        a_to = sched.alphas_cumprod[ts[i]]
        eps = pipe.unet(x, ts[i], encoder_hidden_states=emb).sample.float()
        x = step(x, eps, a_from.float(), a_to.float())
        _close("check_inversion_step", x, inv.latents[n - 1 - k][None].float(), 1e-4,
               f"the latents after inversion step {k + 1} of {n}")


# ------------------------------------------------------------------------------------------ chapter 9
@_checker("book/09_shapesedit_benchmark")
def check_mask_iou(iou: Callable) -> None:
    """Check ``iou(source_image, edited_image) -> float``: the intersection over union of the two objects as the
    oracle reads them (:func:`attnlens.shapes.oracle.read`'s ``mask``), the benchmark's structure score.
    Compared with :func:`attnlens.shapes.editbench.score`'s ``iou`` on rendered ShapesEdit pairs of the kinds the
    benchmark reports it for (colour, shape, background: edits that should keep the mask).
    """
    from PIL import Image

    from attnlens import shapes
    from attnlens.shapes import editbench

    for pair in editbench.edit_pairs(seeds=2, kinds=[k for k in editbench.KINDS if k not in editbench.STRUCTURAL]):
        src = Image.fromarray(shapes.render(pair.scene)[0])
        dst = Image.fromarray(shapes.render(pair.target_scene)[0])
        got = float(iou(src, dst))
        want = editbench.score(pair, src, dst)["iou"]
        if not (abs(got - want) <= 1e-6 or (np.isnan(got) and np.isnan(want))):
            raise ExerciseFailed(f"check_mask_iou: IoU {got:.4f} for the {pair.kind} edit of seed {pair.seed} "
                                 f"({pair.source_prompt!r} to {pair.target_prompt!r}); the benchmark says {want:.4f}")


# ------------------------------------------------------------------------------------------ chapter 10
SD15_UNET = dict(sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)


@_checker("book/10_scaling_up")
def check_fpe_rule(fpe_layers: Callable) -> None:
    """Check ``fpe_layers(table, latent_size) -> names``: the self-attention layers FPE edits by default, given
    ``attnlens.layers(...)`` (a list of :class:`attnlens.LayerInfo`) and the latent size ``(h, w)`` of the run:
    those whose query grid side (``max(info.grid(latent_size))``) is at most half the finest self-attention
    grid side. Compared with :func:`attnlens.default_layers` on the tiny pipeline and on SD 1.5's UNet (built
    on the ``meta`` device, no weights) at two latent sizes.
    """
    import attnlens
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET)
    for label, model, sizes in (("the tiny pipeline", _tiny(), [(8, 8)]), ("SD 1.5", sd15, [(64, 64), (96, 96)])):
        table = attnlens.layers(model)
        for hw in sizes:
            want = attnlens.default_layers(model, "fpe", latent_size=hw)
            got = list(fpe_layers(table, hw))
            if got != want:
                raise ExerciseFailed(f"check_fpe_rule: on {label} at latents {hw} you chose {got}, FPE's default "
                                     f"rule edits {want}")
