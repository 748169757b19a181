"""Tiny Stable Diffusion pipelines built from a config in code, for tests and doc examples."""

from __future__ import annotations

import torch


def tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32):
    """A random SD 1.x-shaped ``StableDiffusionPipeline``: 8x8 latents, 16x16 images.

    Self- and cross-attention at two levels (8x8 and the 4x4 mid block), the real CLIP tokenizer,
    DDIM with SD's scaled-linear betas. Builds in well under a second.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ._tokenizer import load_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=cross_attention_dim, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def captured_with_inputs(pipe, layer: str, run, **capture_kwargs):
    """Capture ``layer`` during ``run(pipe)`` and record the layer's inputs at its last call.

    Returns ``(cache, expected)``: the :class:`~attnlens.AttentionCache` and the conditional half of
    ``softmax(Q K^T / sqrt(d))`` recomputed in fp32 from the inputs of the layer's last call (the last
    step) with the module's own projections, ``(batch/2, heads, queries, keys)`` on the CPU. Tests use it to
    check that captured maps are the attention the layer computed.
    """
    import attnlens

    info = next(i for i in attnlens.layers(pipe) if i.name == layer)
    seen = []
    handle = info.module.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw)), with_kwargs=True)
    try:
        with attnlens.capture(pipe, layers=layer, **capture_kwargs) as cache:
            run(pipe)
    finally:
        handle.remove()
    args, kwargs = seen[-1]
    hidden = args[0]
    context = kwargs.get("encoder_hidden_states")
    context = hidden if context is None else context
    attn, b = info.module, hidden.shape[0]
    with torch.no_grad():
        q = attn.to_q(hidden).view(b, -1, attn.heads, info.head_dim).transpose(1, 2).float()
        k = attn.to_k(context).view(b, -1, attn.heads, info.head_dim).transpose(1, 2).float()
    return cache, torch.softmax(q @ k.transpose(-1, -2) / info.head_dim**0.5, dim=-1)[b // 2:].cpu()
