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


# ------------------------------------------------------------------------------------------ tiny diffusion transformers
def _ready(pipe):
    """Evaluation mode for every component (models built from configs start in training mode, where T5's
    dropout would make two runs differ) and no progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=latent_channels, norm_num_groups=4, **kwargs)


T5_STYLE_WORDS = ("a an the of on in at and to with red blue green yellow purple orange white black grey star "
                  "circle square triangle hexagon heart cross left right top bottom middle centre center big small "
                  "large tiny photo picture")


def t5_style_tokenizer(model_max_length: int = 512, words: str = T5_STYLE_WORDS):
    """A SentencePiece-style ``T5TokenizerFast`` built in code (the T5 tokenizer cannot be downloaded here): a
    unigram vocabulary of ``words`` (space-separated, each one token ``\u2581red``; default: common words),
    single characters for everything else, ``</s>`` at the end and ``<pad>`` after it, no start token, as T5's
    tokenizer writes a prompt. Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``\u2581`` 3, the words from 4 on.

    Example:
        >>> tok = t5_style_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red star").input_ids)
        ['\u2581a', '\u2581red', '\u2581star', '</s>']
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words.split())]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)


def _tiny_t5(d_model: int = 32):
    """A small random T5 encoder (its vocabulary covers :func:`t5_style_tokenizer`'s and the CLIP tokenizer's)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=49408, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _tiny_clip(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_pixart_pipeline(seed: int = 0):
    """A random PixArt-alpha-shaped ``PixArtAlphaPipeline``: 16x16 images, 8x8 latents, 2x2 patches (a 4x4 token
    grid), two blocks of self-attention plus cross-attention to the text (a small T5 encoder and
    :func:`t5_style_tokenizer`), DDIM. Builds in well under a second. Call it with
    ``use_resolution_binning=False, clean_caption=False`` (its sizes are not PixArt's).

    Example:
        >>> from attnlens import layers
        >>> layers(tiny_pixart_pipeline()).names()
        ['block.0.self', 'block.0.cross', 'block.1.self', 'block.1.cross']
    """
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    pipe = PixArtAlphaPipeline(tokenizer=t5_style_tokenizer(), text_encoder=_tiny_t5(32), vae=_tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())
    return _ready(pipe)


def tiny_sd3_pipeline(seed: int = 0):
    """A random SD3.5-shaped ``StableDiffusion3Pipeline``: 16x16 images, 8x8 latents, 2x2 patches (a 4x4 token
    grid), two MMDiT blocks of joint attention with RMS q/k norms, the first with SD3.5's second (image-only)
    attention, the last updating no text (``context_pre_only``). Two small CLIP encoders with the shipped CLIP
    tokenizer and a small T5 encoder with :func:`t5_style_tokenizer`. Flow-matching Euler.

    Example:
        >>> from attnlens import layers
        >>> layers(tiny_sd3_pipeline()).names()
        ['joint.0.self', 'joint.0.cross', 'dual.0.self', 'joint.1.self', 'joint.1.cross']
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ._tokenizer import load_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_tiny_clip(16, 16), tokenizer=load_tokenizer(),
        text_encoder_2=_tiny_clip(16, 16), tokenizer_2=load_tokenizer(),
        text_encoder_3=_tiny_t5(32), tokenizer_3=t5_style_tokenizer(),
    )
    return _ready(pipe)


def tiny_flux_pipeline(seed: int = 0):
    """A random Flux.1-shaped ``FluxPipeline``: 16x16 images, 8x8 latents packed into 2x2 patches (a 4x4 token
    grid), one double-stream (joint) block and two single-stream blocks with rotary position embeddings and RMS
    q/k norms, a small CLIP encoder (pooled) and a small T5 encoder with :func:`t5_style_tokenizer` (the text
    tokens). Flow-matching Euler, guidance-distilled (no classifier-free guidance).

    Example:
        >>> from attnlens import layers
        >>> layers(tiny_flux_pipeline()).names()
        ['joint.0.self', 'joint.0.cross', 'single.0.self', 'single.0.cross', 'single.1.self', 'single.1.cross']
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from ._tokenizer import load_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=False,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_tiny_clip(32), tokenizer=load_tokenizer(),
        text_encoder_2=_tiny_t5(32), tokenizer_2=t5_style_tokenizer(),
    )
    pipe.default_sample_size = 8  # latent side at the default size: 16x16 images
    return _ready(pipe)


def tiny_clip(seed: int = 0):
    """A random ``transformers.CLIPModel`` with one layer of width 32 per tower and 32x32 images (the
    configuration of :class:`attnlens.CLIPMetrics`' example): CLIP's shapes, not its quality."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=49408),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    return CLIPModel(cfg).eval()
