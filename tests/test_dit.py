"""Diffusion transformers on tiny PixArt, SD3.5-shaped and Flux pipelines built from configs in code: the layer
table, capture that leaves the image unchanged and restores the processors, maps that equal the attention
recomputed from the layer's inputs (q/k norms, rotary embeddings, padding masks and the joint softmax included),
word maps, and clear errors for what is not supported."""

import functools

import PIL.Image

import pytest
import torch

import attnlens
from attnlens import AttnlensError, Selector, capture, layers
from attnlens._dit import MIN_DIFFUSERS, _diffusers_version
from attnlens._testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

# every test here needs the transformer attention of a recent diffusers (conftest skips them on an older one),
# except the last, which checks what an older one says
pytestmark = pytest.mark.needs_dit_diffusers

FAMILIES = {"pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
TEXT = 16  # max_sequence_length of the runs: text tokens per prompt


@functools.lru_cache(maxsize=None)
def _pipe(family):
    return FAMILIES[family]()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def run(pipe, prompt="a red star", steps=2, seed=0):
    extra = {"use_resolution_binning": False, "clean_caption": False} if type(pipe).__name__.startswith("PixArt") else {}
    return pipe(prompt, num_inference_steps=steps, height=16, width=16, output_type="pt", max_sequence_length=TEXT,
                generator=torch.Generator().manual_seed(seed), **extra).images


def processors(pipe):
    return dict(pipe.transformer.attn_processors)


# ------------------------------------------------------------------------------------------ the layer table
def test_layer_tables_name_streams_grids_and_heads():
    pixart, sd3, flux = (layers(_pipe(f)) for f in ("pixart", "sd3", "flux"))
    assert pixart.names() == ["block.0.self", "block.0.cross", "block.1.self", "block.1.cross"]
    assert [i.stream for i in pixart] == ["self", "cross"] * 2
    assert pixart[1].path == "transformer_blocks.0.attn2"
    assert sd3.names() == ["joint.0.self", "joint.0.cross", "dual.0.self", "joint.1.self", "joint.1.cross"]
    assert [i.stream for i in sd3] == ["joint", "joint", "self", "joint", "joint"]
    assert sd3[0].path == sd3[1].path == "transformer_blocks.0.attn" and sd3[0].module is sd3[1].module
    assert flux.names() == ["joint.0.self", "joint.0.cross", "single.0.self", "single.0.cross", "single.1.self",
                            "single.1.cross"]
    assert flux[2].path == "single_transformer_blocks.0.attn"
    for table in (pixart, sd3, flux):  # 16x16 images, 2x VAE, 2x2 patches: a 4x4 token grid everywhere
        assert {(i.level, i.resolution, i.factor) for i in table} == {(1, (4, 4), 4)}
        assert all(i.grid((32, 48)) == (16, 24) for i in table)
    assert {(i.heads, i.head_dim) for i in flux} == {(2, 16)} and {(i.heads, i.head_dim) for i in sd3} == {(2, 8)}
    assert [i.name for i in Selector(kind="cross").match(sd3)] == ["joint.0.cross", "joint.1.cross"]
    assert list(flux.to_pandas()["stream"]) == ["joint"] * 2 + ["single"] * 4


# ------------------------------------------------------------------------------------------ capture
def test_capture_does_not_change_the_image_and_restores_processors(family):
    pipe = _pipe(family)
    before = processors(pipe)
    plain = run(pipe)
    with capture(pipe, layers="*", heads="all", dtype=torch.float32) as cache:
        hooked = run(pipe)
    assert torch.equal(hooked, plain)
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    names = layers(pipe).names()
    assert sorted(cache.keys()) == sorted((n, s) for n in names for s in (0, 1))


def test_nested_captures_of_both_views_of_a_joint_layer_restore_in_any_order():
    pipe = _pipe("sd3")
    before = processors(pipe)
    outer = capture(pipe, layers="joint.0.self", kind="self")
    inner = capture(pipe, layers="joint.0.cross")
    a, b = outer.__enter__(), inner.__enter__()
    run(pipe)
    outer.__exit__(None, None, None)  # the outer context leaves first
    assert processors(pipe)["transformer_blocks.0.attn.processor"] is not before["transformer_blocks.0.attn.processor"]
    inner.__exit__(None, None, None)
    assert all(processors(pipe)[n] is before[n] for n in before)
    assert list(a) == [("joint.0.self", 0), ("joint.0.self", 1)] and list(b) == [("joint.0.cross", 0), ("joint.0.cross", 1)]


def _inputs(pipe, path, prompt="a red star"):
    """The args and kwargs of the last call of the attention module at ``path`` during one run."""
    module = pipe.transformer.get_submodule(path)
    seen = []
    handle = module.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw)), with_kwargs=True)
    try:
        run(pipe, prompt)
    finally:
        handle.remove()
    args, kwargs = seen[-1]
    hidden = args[0] if args else kwargs["hidden_states"]
    return module, hidden, kwargs


def _softmax(q, k, bias=None):
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores if bias is None else scores + bias, dim=-1)


def expected_maps(pipe, family, path):
    """Per view (``self``/``cross``): the full-head attention rows of the image queries at the last call, recomputed
    from the module's inputs with its own projections, norms and rotary embeddings, ``(batch, heads, image, keys)``."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn, hidden, kw = _inputs(pipe, path)
    b, heads = hidden.shape[0], attn.heads

    def split(x):  # (b, n, heads*dim) -> (b, heads, n, dim)
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    with torch.no_grad():
        if family == "pixart":
            context = kw.get("encoder_hidden_states")
            q = split(attn.to_q(hidden))
            k = split(attn.to_k(hidden if context is None else context))
            mask = kw.get("attention_mask")
            bias = None if context is None or mask is None else mask[:, None].float()  # (b, 1, 1, text)
            probs = _softmax(q, k, bias)
            return {"self" if context is None else "cross": probs}
        if family == "sd3":
            context = kw.get("encoder_hidden_states")
            q, k = attn.norm_q(split(attn.to_q(hidden))), attn.norm_k(split(attn.to_k(hidden)))
            n = hidden.shape[1]
            if context is None:
                return {"self": _softmax(q, k)}
            eq, ek = attn.norm_added_q(split(attn.add_q_proj(context))), attn.norm_added_k(split(attn.add_k_proj(context)))
            probs = _softmax(torch.cat([q, eq], 2), torch.cat([k, ek], 2))[:, :, :n]
            return {"self": probs[..., :n], "cross": probs[..., n:]}
        context, rope = kw.get("encoder_hidden_states"), kw["image_rotary_emb"]
        q, k = attn.norm_q(split(attn.to_q(hidden))), attn.norm_k(split(attn.to_k(hidden)))
        if context is not None:
            eq, ek = attn.norm_added_q(split(attn.add_q_proj(context))), attn.norm_added_k(split(attn.add_k_proj(context)))
            q, k = torch.cat([eq, q], 2), torch.cat([ek, k], 2)
        q = apply_rotary_emb(q, rope, sequence_dim=2)
        k = apply_rotary_emb(k, rope, sequence_dim=2)
        probs = _softmax(q, k)[:, :, TEXT:]
        return {"self": probs[..., TEXT:], "cross": probs[..., :TEXT]}


CASES = [("pixart", "block.1.self", "transformer_blocks.1.attn1"), ("pixart", "block.1.cross", "transformer_blocks.1.attn2"),
         ("sd3", "joint.0.self", "transformer_blocks.0.attn"), ("sd3", "joint.1.cross", "transformer_blocks.1.attn"),
         ("sd3", "dual.0.self", "transformer_blocks.0.attn2"), ("flux", "joint.0.cross", "transformer_blocks.0.attn"),
         ("flux", "joint.0.self", "transformer_blocks.0.attn"), ("flux", "single.1.cross", "single_transformer_blocks.1.attn"),
         ("flux", "single.0.self", "single_transformer_blocks.0.attn")]


@pytest.mark.parametrize("family,name,path", CASES, ids=[f"{f}-{n}" for f, n, _ in CASES])
def test_maps_equal_the_attention_recomputed_from_the_layer_inputs(family, name, path):
    pipe = _pipe(family)
    with capture(pipe, layers=name, heads="all", branch="both", dtype=torch.float32) as cache:
        run(pipe)
    view = name.rsplit(".", 1)[1]
    expected = expected_maps(pipe, family, path)[view]
    got = cache[name, 1]
    items = len(cache.item_keys)
    assert items == expected.shape[0]  # PixArt and SD3 run classifier-free guidance (2 rows), tiny Flux does not
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-5, rtol=0)
    if family == "pixart" or name.startswith("dual"):  # a separate attention: rows sum to 1
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)


def test_joint_quadrants_split_one_softmax(family):
    pipe = _pipe(family)
    if family == "pixart":
        pytest.skip("PixArt has separate self- and cross-attention")
    with capture(pipe, layers="joint.0.*", kind=None, heads="all", dtype=torch.float32) as cache:
        run(pipe)
    total = cache["joint.0.self", 1].sum(-1) + cache["joint.0.cross", 1].sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)  # the two quadrants fill each row
    assert cache["joint.0.cross", 1].shape[-1] == (77 + TEXT if family == "sd3" else TEXT)


def test_word_maps_on_transformers(family):
    pipe = _pipe(family)
    with capture(pipe) as cache:
        run(pipe, "a red star")
    assert cache.words() == ["a", "red", "star"]
    star = cache.word_map("star")
    assert star.shape == (4, 4) and torch.isfinite(star).all() and star.sum() > 0
    idx = cache.token_indices("star")
    maps = cache.aggregate()
    torch.testing.assert_close(star, maps[0][..., idx].sum(-1))


def test_the_budget_counts_the_text_keys_of_the_run():
    pipe = _pipe("sd3")  # 77 CLIP tokens + 16 T5 tokens: 93 keys per cross-attention row
    per_map = 2 * 4 * 4 * 93 * 2  # heads x queries x keys x fp16 bytes, one item, one step, one layer
    with capture(pipe, layers="joint.0.cross", heads="all", steps=[0]) as cache:
        run(pipe)
    assert cache["joint.0.cross", 0].shape == (1, 2, 4, 4, 93)
    # the budget bounds the peak: the stored maps (counted with the run's 93 text keys) plus working memory
    with pytest.raises(AttnlensError, match=rf"over the budget.*|{per_map / 1024:.1f} KiB of stored maps") as err:
        with capture(pipe, layers="joint.0.cross", heads="all", steps=[0], budget=per_map):
            run(pipe)
    assert f"({per_map / 1024:.1f} KiB of stored maps" in str(err.value)


# ------------------------------------------------------------------------------------------ what is not supported
def test_editing_joint_attention_refuses_what_has_no_meaning_there():
    """On joint attention, map edits act on the image->text view and q/k/v rewrites on the image->image view
    (attnlens._joint); the other pairings are refused before anything runs (tests/test_dit_edit.py tests editing)."""
    from attnlens import CopyMap, InjectQK, control

    pipe = _pipe("flux")
    with pytest.raises(AttnlensError, match=r"joint\.0\.self: CopyMap edits the attention map.*\*\.cross"):
        with control(pipe, CopyMap(Selector(layers="joint.0.self"))):
            pass
    with pytest.raises(AttnlensError, match=r"joint\.0\.cross: InjectQK rewrites q, k, v.*\*\.self"):
        with control(pipe, InjectQK(Selector(layers="joint.0.cross"))):
            pass
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in processors(pipe).values())


def test_unsupported_transformers_name_what_is_supported():
    from diffusers import SanaTransformer2DModel

    sana = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=8, sample_size=8, patch_size=1)
    fake = type("SanaPipeline", (), {"transformer": sana})()
    with pytest.raises(AttnlensError, match="SanaTransformer2DModel.*PixArtTransformer2DModel.*SD3Transformer2DModel"
                                            ".*FluxTransformer2DModel.*SANA"):
        layers(fake)
    with pytest.raises(AttnlensError, match="transformer denoiser.*needs a UNet2DConditionModel"):
        attnlens.edit_image(_pipe("pixart"), PIL.Image.new("RGB", (16, 16)), "a blue star", num_inference_steps=2)


def test_load_pipeline_loads_a_saved_transformer_pipeline(tmp_path):
    pipe = _pipe("pixart")
    pipe.save_pretrained(tmp_path / "pixart", safe_serialization=True)
    loaded = attnlens.load_pipeline(tmp_path / "pixart", device="cpu")
    assert type(loaded.transformer).__name__ == "PixArtTransformer2DModel"
    assert layers(loaded).names() == layers(pipe).names()


# ------------------------------------------------------------------------------------------ published configurations
# The transformer config.json of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, stabilityai/stable-diffusion-3.5-medium and
# black-forest-labs/FLUX.1-dev (the fields that shape the attention), built on the meta device: no weights.
PIXART_SIGMA = dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
                    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def meta(cls_name, config):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def test_published_transformer_configs_names_grids_and_shapes():
    pixart = layers(meta("PixArtTransformer2DModel", PIXART_SIGMA))
    assert len(pixart) == 56 and pixart.names()[-1] == "block.27.cross"
    assert {(i.resolution, i.factor, i.heads, i.head_dim) for i in pixart} == {((64, 64), 16, 16, 72)}  # 1024 px
    sd35 = layers(meta("SD3Transformer2DModel", SD35_MEDIUM))
    assert len(sd35) == 24 * 2 + 13 and sd35.names()[:3] == ["joint.0.self", "joint.0.cross", "dual.0.self"]
    assert "dual.12.self" in sd35.names() and "dual.13.self" not in sd35.names()
    assert {(i.resolution, i.factor, i.heads, i.head_dim) for i in sd35} == {((64, 64), 16, 24, 64)}
    flux = layers(meta("FluxTransformer2DModel", FLUX_DEV))
    assert len(flux) == (19 + 38) * 2 and flux.names()[-1] == "single.37.cross"
    assert sum(i.stream == "joint" for i in flux) == 38 and sum(i.stream == "single" for i in flux) == 76
    assert {(i.resolution, i.factor, i.heads, i.head_dim) for i in flux} == {((64, 64), 16, 24, 128)}
    # the token grid scales with the image side: a 768x1344 image (96x168 latent) has 48x84 tokens
    assert {i.grid((96, 168)) for t in (pixart, sd35, flux) for i in t} == {(48, 84)}


def test_only_the_first_denoiser_call_of_a_step_is_recorded():
    """Flux's true classifier-free guidance calls the transformer twice a step, the prompt first and the negative
    prompt second: the maps are the prompt's, equal to those of a run without the negative call at step 0."""
    pipe = _pipe("flux")
    with capture(pipe, layers="joint.0.cross", steps=[0], heads="all", dtype=torch.float32) as plain:
        run(pipe)
    with capture(pipe, layers="joint.0.cross", steps=[0], heads="all", dtype=torch.float32) as guided:
        pipe("a red star", negative_prompt="a blue square", true_cfg_scale=3.0, num_inference_steps=2, height=16,
             width=16, output_type="pt", max_sequence_length=TEXT, generator=torch.Generator().manual_seed(0))
    assert guided.item_keys == [("cond", 0)]
    torch.testing.assert_close(guided["joint.0.cross", 0], plain["joint.0.cross", 0], atol=0, rtol=0)


def test_pixart_guidance_is_read_from_the_batch():
    """PixArt's pipeline keeps its guidance flag local: the clock reads it from the batch (the latents doubled)."""
    pipe = _pipe("pixart")
    kw = dict(num_inference_steps=1, height=16, width=16, output_type="pt", max_sequence_length=TEXT,
              use_resolution_binning=False, clean_caption=False)
    with capture(pipe, branch="both") as guided:
        pipe("a red star", guidance_scale=4.5, generator=torch.Generator().manual_seed(0), **kw)
    assert guided.item_keys == [("uncond", 0), ("cond", 0)]
    with capture(pipe, branch="both") as plain:
        pipe(["a red star", "a blue square"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert plain.item_keys == [("cond", 0), ("cond", 1)]
    assert plain.words(1) == ["a", "blue", "square"]


def test_collect_reads_word_features_on_transformers(family):
    """collect's word feature is the captured cross-attention map summed over the word's tokens, on every family
    (SD3: over the 77 CLIP keys of its 93 text keys; Flux: the T5-side tokens), and self-attention sites work."""
    from attnlens import collect

    pipe = _pipe(family)
    extra = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    prompts = ["a red star", "a blue square"]
    layer = "block.1" if family == "pixart" else "joint.0"
    feats = collect(pipe, prompts, labels={"colour": ["red", "blue"]}, words="{colour}", num_inference_steps=2,
                    sites=Selector(layers=f"{layer}.*", steps=[0]), progress=False, batch_size=2,
                    pipe_kwargs=dict(height=16, width=16, max_sequence_length=TEXT, **extra))
    got = feats["{colour}", f"{layer}.cross", 0]  # step 0: before guidance mixes anything in
    assert got.shape == (2, 16) and feats[("self", f"{layer}.self", 0)].shape[0] == 2
    for i, (prompt, colour) in enumerate(zip(prompts, ["red", "blue"])):
        with capture(pipe, layers=f"{layer}.cross", steps=[0], dtype=torch.float32) as cache:
            run(pipe, prompt)
        expected = cache.word_map(colour).reshape(-1).numpy()
        assert abs(got[i] - expected).max() < 1e-3


def test_joint_views_pool_save_and_load(tmp_path):
    """A joint layer's self view pools its key grid like a UNet self-attention map (rows keep their mass), and a
    transformer cache round-trips through safetensors with its layers' streams."""
    pipe = _pipe("sd3")
    with capture(pipe, layers="joint.0.*", kind=None, store_resolution=2, dtype=torch.float32) as cache:
        run(pipe)
    pooled = cache["joint.0.self", 1]
    assert pooled.shape == (1, 1, 2, 2, 4)
    with capture(pipe, layers="joint.0.self", kind="self", dtype=torch.float32) as full:
        run(pipe)
    torch.testing.assert_close(pooled.sum(-1).mean(), full["joint.0.self", 1].sum(-1).mean(), atol=1e-5, rtol=0)
    back = attnlens.AttentionCache.load(cache.save(tmp_path / "sd3.safetensors"))
    assert back.layers["joint.0.cross"].stream == "joint" and set(back.keys()) == set(cache.keys())


def test_t5_tokens_make_words_as_clip_tokens_do():
    """PixArt's and Flux's text keys are T5 (SentencePiece) tokens: words start at U+2581, there is no start token,
    punctuation is its own word and case is ignored when a word is looked up."""
    from attnlens._prompts import token_indices, words
    from attnlens._testing import t5_style_tokenizer

    tok = t5_style_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("A Big red hexagon, left", padding="max_length", max_length=16).input_ids)
    assert [w for w, _ in words(tokens)] == ["A", "Big", "red", "hexagon", ",", "left"]
    assert token_indices(tokens, "big red") == [2, 3, 4, 5, 6] and token_indices(tokens, "hexagon") == [7]  # "\u2581", "B", "i", "g"
    end = tokens.index("</s>")
    assert token_indices(tokens, "<end>") == [end] and token_indices(tokens, "<pad>") == list(range(end + 1, 16))
    with pytest.raises(AttnlensError, match="no start token"):
        token_indices(tokens, "<start>")
    pipe = _pipe("flux")
    with capture(pipe) as cache:
        run(pipe, "a big red star")
    assert cache.tokens[0][:5] == ["\u2581a", "\u2581big", "\u2581red", "\u2581star", "</s>"]
    assert cache.token_indices("red star") == [2, 3] and cache.word_map("<end>").shape == (4, 4)


def test_cli_lists_the_layers_of_a_saved_flux_pipeline(tmp_path, capsys):
    from attnlens.cli import main

    _pipe("flux").save_pretrained(tmp_path / "flux", safe_serialization=True)
    assert main(["--device", "cpu", "layers", str(tmp_path / "flux")]) in (0, None)
    out = capsys.readouterr().out
    assert "single.1.cross" in out and "single_transformer_blocks.1.attn" in out and "joint" in out


@pytest.mark.dit_version_check
@pytest.mark.skipif(_diffusers_version() >= MIN_DIFFUSERS, reason="this diffusers hooks transformers")
def test_an_older_diffusers_refuses_transformers_clearly():
    from diffusers import PixArtTransformer2DModel

    tiny = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=32, in_channels=4, cross_attention_dim=16,
                                    out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single")
    with pytest.raises(AttnlensError, match=r"diffusers >= 0\.35 \(installed: "):
        layers(tiny)

