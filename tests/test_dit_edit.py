"""Editing on diffusion transformers (tiny PixArt, SD3.5-shaped and Flux pipelines built in code): FPE and MasaCtrl
through the same controllers and plan as on a UNet, with the joint-attention rule of attnlens._joint (the rewrite
acts on the image->image part; the text part of the joint softmax keeps the target's own logits), checked against
an explicit implementation from the layer's inputs; P2P word swap on the image->text quadrant; the layer rule by
block depth; restore guarantees; clear errors."""

import functools

import pytest
import torch

import attnlens
from attnlens import AttnlensError, default_layers, edit, layers
from attnlens._testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.needs_dit_diffusers

FAMILIES = {"pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
TEXT = 16  # max_sequence_length: text tokens per prompt (T5)
STEPS = 3  # FPE's default window (0.0, 0.8) edits steps 0 and 1 of 3


@functools.lru_cache(maxsize=None)
def _pipe(family):
    return FAMILIES[family]()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def kwargs(family):
    extra = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    return {"max_sequence_length": TEXT, **extra}


def run_edit(family, source="a red star", target="a blue star", method="fpe", **options):
    return edit(_pipe(family), source, target, method=method, num_inference_steps=STEPS, pipe_kwargs=kwargs(family),
                **options)


def processors(pipe):
    return dict(pipe.transformer.attn_processors)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("method", ["fpe", "masactrl"])
def test_an_identity_edit_leaves_the_target_equal_to_the_source(family, method):
    r = run_edit(family, "a red star", "a red star", method)
    torch.testing.assert_close(r.pixels[1], r.pixels[0], atol=1e-5, rtol=0)


def test_the_source_branch_is_the_plain_image_and_the_edit_acts(family):
    pipe = _pipe(family)
    r = run_edit(family)
    plain = pipe("a red star", num_inference_steps=STEPS, output_type="pt", guidance_scale=r.settings["guidance_scale"],
                 generator=torch.Generator().manual_seed(0), **kwargs(family)).images
    torch.testing.assert_close(r.pixels[0], plain[0], atol=1e-4, rtol=0)  # batch of two vs one: float rounding only
    none = run_edit(family, method="none")
    assert (r.pixels[1] - none.pixels[1]).abs().max() > 1e-4  # the injection changed the target (rounding: 1e-6)
    torch.testing.assert_close(r.latents, attnlens.start_noise(pipe, 0))


def test_edits_restore_processors_exactly_after_success_and_after_an_exception(family):
    pipe = _pipe(family)
    before = processors(pipe)
    for method in ("fpe", "masactrl", "p2p"):
        run_edit(family, method=method)
        after = processors(pipe)
        assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)

    def boom(*args, **kw):
        raise RuntimeError("stop")

    stop = {"callback": boom, "callback_steps": 1} if family == "pixart" else {"callback_on_step_end": boom}
    with pytest.raises(RuntimeError, match="stop"):  # raised inside the pipeline, during the edit
        edit(pipe, "a red star", "a blue star", num_inference_steps=STEPS, pipe_kwargs={**kwargs(family), **stop})
    after = processors(pipe)
    assert all(after[n] is before[n] for n in before)


# ------------------------------------------------------------------------------------------ against a reference
def _calls(pipe, path, fn):
    """``(args, kwargs, output)`` of every call of the attention module at ``path`` during ``fn()``."""
    module = pipe.transformer.get_submodule(path)
    seen = []
    handle = module.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out)), with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return module, seen


def _qkv(family, attn, args, kw):
    """The layer's q, k, v ``(batch, heads, all tokens, dim)`` in its sequence order, recomputed from its inputs with
    its own projections, norms and rotary embeddings, and the image and text positions."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden = args[0] if args else kw["hidden_states"]
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    context = kw.get("encoder_hidden_states")
    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    if family == "pixart":
        return q, k, v, slice(0, q.shape[2]), None
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        eq, ek = attn.norm_added_q(split(attn.add_q_proj(context))), attn.norm_added_k(split(attn.add_k_proj(context)))
        ev = split(attn.add_v_proj(context))
    if family == "sd3":
        n = q.shape[2]
        if context is None:
            return q, k, v, slice(0, n), None
        return torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2), slice(0, n), slice(n, n + ek.shape[2])
    if context is not None:
        q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
    rope = kw["image_rotary_emb"]
    q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    return q, k, v, slice(TEXT, q.shape[2]), slice(0, TEXT)


def _attention_rows(q, k, v, img, txt, s, t, method, text_part=None):
    """Target row ``t``'s attention output ``(heads, all tokens, dim)`` under ``method``, computed explicitly: FPE
    (source image Q, K) and MasaCtrl (source image K, V) on the image->image logits, the text part of each image
    query's joint softmax from the target's own image queries and text keys; text queries keep their own
    attention. ``text_part(p_txt_target, p_txt_source)`` (P2P) replaces the image->text probabilities."""
    d = q.shape[-1]
    own = torch.softmax(q[t] @ k[t].transpose(-1, -2) / d**0.5, -1) @ v[t]
    qi, ki, vi = q[:, :, img], k[:, :, img], v[:, :, img]
    q2, k2, v2 = {"fpe": (qi[s], ki[s], vi[t]), "masactrl": (qi[t], ki[s], vi[s]),
                  "none": (qi[t], ki[t], vi[t])}[method]
    logits = q2 @ k2.transpose(-1, -2) / d**0.5
    if txt is None:
        rows = torch.softmax(logits, -1) @ v2
    else:
        text_logits = qi[t] @ k[t][:, txt].transpose(-1, -2) / d**0.5
        p = torch.softmax(torch.cat([logits, text_logits], -1), -1)
        n = logits.shape[-1]
        p_img, p_txt = p[..., :n], p[..., n:]
        if text_part is not None:
            src = torch.softmax(qi[s] @ k[s].transpose(-1, -2) / d**0.5, -1)[..., txt]
            p_txt = text_part(p_txt, src)
        rows = p_img @ v2 + p_txt @ v[t][:, txt]
    out = own.clone()
    out[:, img] = rows
    return out


def _project(family, attn, rows, img, txt, joint):
    """The module's output for one batch row from its attention rows ``(heads, tokens, dim)``; ``joint``: the call
    had separate text states (a two-output joint block)."""
    flat = rows.transpose(0, 1).reshape(rows.shape[1], -1)
    if not joint:  # PixArt, SD3.5's second attention: projected; Flux's single-stream attention: not
        return flat if family == "flux" else attn.to_out[0](flat)
    image, text = attn.to_out[0](flat[img]), flat[txt]
    return image, (text if getattr(attn, "context_pre_only", False) else attn.to_add_out(text))


CASES = [("pixart", "transformer_blocks.0.attn1", "fpe"), ("pixart", "transformer_blocks.1.attn1", "masactrl"),
         ("sd3", "transformer_blocks.0.attn", "fpe"), ("sd3", "transformer_blocks.1.attn", "masactrl"),
         ("sd3", "transformer_blocks.0.attn2", "fpe"), ("flux", "transformer_blocks.0.attn", "fpe"),
         ("flux", "single_transformer_blocks.1.attn", "fpe"), ("flux", "single_transformer_blocks.0.attn", "masactrl")]


@pytest.mark.parametrize("family,path,method", CASES, ids=[f"{f}-{p}-{m}" for f, p, m in CASES])
def test_the_edited_layer_output_equals_an_explicit_implementation(family, path, method):
    """At an edited step (0) the target's layer output equals the documented rule computed by hand from the layer's
    inputs; at a step outside the window (2) it is the target's own attention; the source is never changed."""
    pipe = _pipe(family)
    attn, calls = _calls(pipe, path, lambda: run_edit(family, method=method))
    batch = calls[0][0][0].shape[0] if calls[0][0] else calls[0][1]["hidden_states"].shape[0]
    s, t = (2, 3) if batch == 4 else (0, 1)  # [uncond src, uncond tgt, cond src, cond tgt] with CFG; Flux: [src, tgt]
    steps = {"fpe": (0, 2), "masactrl": (1, 0)}[method]  # masactrl: step 0 is before its start (ceil(0.08 * 3) = 1)
    per_step = len(calls) // STEPS
    for step, rule in zip(steps, (method, "none")):
        args, kw, out = calls[step * per_step]
        with torch.no_grad():
            q, k, v, img, txt = _qkv(family, attn, args, kw)
            for row, who in ((t, rule), (s, "none")):
                expected = _project(family, attn, _attention_rows(q, k, v, img, txt, s, row, who), img, txt,
                                    kw.get("encoder_hidden_states") is not None)
                got = out[row] if torch.is_tensor(out) else (out[0][row], out[1][row])
                if torch.is_tensor(got):
                    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
                else:
                    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=1e-4)
                    torch.testing.assert_close(got[1], expected[1], atol=2e-5, rtol=1e-4)


def test_nothing_is_steered_where_nothing_is_edited(monkeypatch):
    """Layers and steps outside the edit keep the fused call: the joint processor's steering returns None there."""
    from attnlens import _joint

    seen = []
    original = _joint._JointBase._steer

    def spy(self, *a, **kw):
        result = original(self, *a, **kw)
        seen.append((self.info.name, self.clock.step, result is not None))
        return result

    monkeypatch.setattr(_joint._JointBase, "_steer", spy)
    run_edit("flux", method="fpe", layers="single.1.self", steps=[1])
    steered = {(name, step) for name, step, did in seen if did}
    assert steered == {("single.1.self", 1)}
    assert {name for name, _, _ in seen} == {"single.1.self"}  # only the chosen layer is hooked at all


# ------------------------------------------------------------------------------------------ P2P word swap
def test_p2p_word_swap_on_joint_attention_takes_the_source_text_distribution(family):
    """Target image rows: the image->image part is the target's own; the image->text part is the source's
    distribution over the text keys scaled to the target's own text mass (rows still sum to 1)."""
    pipe = _pipe(family)
    path = {"pixart": "transformer_blocks.0.attn2", "sd3": "transformer_blocks.0.attn",
            "flux": "transformer_blocks.0.attn"}[family]
    attn, calls = _calls(pipe, path, lambda: run_edit(family, method="p2p"))
    args, kw, out = calls[0]  # step 0 is edited (cross_replace_steps 0.8)
    with torch.no_grad():
        if family == "pixart":  # a separate cross-attention: the target's map := the source's
            hidden, context, mask = args[0] if args else kw["hidden_states"], kw["encoder_hidden_states"], kw["attention_mask"]
            b = hidden.shape[0]

            def split(x):
                return x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)

            q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
            bias = mask[:, None].float()
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, -1)
            rows = p[2] @ v[3]
            torch.testing.assert_close(out[3], attn.to_out[0](rows.transpose(0, 1).reshape(rows.shape[1], -1)),
                                       atol=2e-5, rtol=1e-4)
            return
        q, k, v, img, txt = _qkv(family, attn, args, kw)
        s, t = (2, 3) if q.shape[0] == 4 else (0, 1)

        def swap(p_tgt, p_src):
            return p_src / p_src.sum(-1, keepdim=True) * p_tgt.sum(-1, keepdim=True)

        expected = _project(family, attn, _attention_rows(q, k, v, img, txt, s, t, "none", swap), img, txt, True)
    torch.testing.assert_close(out[0][t], expected[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1][t], expected[1], atol=2e-5, rtol=1e-4)


def test_a_capture_inside_a_joint_edit_records_the_rows_used():
    r = run_edit("sd3", method="p2p", capture={"layers": "joint.0.*", "kind": None, "heads": "all",
                                               "dtype": torch.float32, "steps": [0]})
    cross, self_ = r.cache["joint.0.cross", 0], r.cache["joint.0.self", 0]  # (prompts, heads, h, w, keys)
    total = cross.sum(-1) + self_.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    src, tgt = cross[0], cross[1]
    torch.testing.assert_close(tgt / tgt.sum(-1, keepdim=True), src / src.sum(-1, keepdim=True), atol=1e-5, rtol=0)
    assert not torch.allclose(tgt.sum(-1), src.sum(-1), atol=1e-4)  # the text share stays the target's own


def test_p2p_on_transformers_refuses_what_it_cannot_do():
    with pytest.raises(AttnlensError, match="same number of tokens.*pipe.tokenizer_2"):
        run_edit("flux", "a red star", "a purplish star", method="p2p")
    with pytest.raises(AttnlensError, match="mode 'refine'.*not supported on diffusion transformers"):
        run_edit("sd3", method="p2p", mode="refine")
    with pytest.raises(AttnlensError, match="local_blend is not supported on diffusion transformers"):
        run_edit("sd3", method="p2p", local_blend=("red", "blue"))
    with pytest.raises(AttnlensError, match="reweight is not supported"):
        run_edit("pixart", method="p2p", reweight={"blue": 2.0})


# ------------------------------------------------------------------------------------------ layer rules
def test_default_layers_by_block_depth():
    assert default_layers(_pipe("pixart"), "fpe") == ["block.0.self", "block.1.self"]
    assert default_layers(_pipe("sd3"), "fpe") == ["joint.0.self", "dual.0.self", "joint.1.self"]
    assert default_layers(_pipe("flux"), "fpe") == ["joint.0.self", "single.0.self", "single.1.self"]
    assert default_layers(_pipe("pixart"), "masactrl") == ["block.1.self"]  # the deeper half of 2 blocks
    assert default_layers(_pipe("flux"), "masactrl") == ["single.0.self", "single.1.self"]  # depths 1, 2 of 3
    assert default_layers(_pipe("sd3"), "p2p") == ["joint.0.cross", "joint.1.cross"]


def test_default_layers_on_published_configs():
    from test_dit import FLUX_DEV, SD35_MEDIUM, meta

    flux = meta("FluxTransformer2DModel", FLUX_DEV)  # 19 joint + 38 single blocks: depth 57, deeper half from 28
    masa = default_layers(flux, "masactrl")
    assert masa[0] == "single.9.self" and masa[-1] == "single.37.self" and len(masa) == 29
    assert len(default_layers(flux, "fpe")) == 57
    sd35 = meta("SD3Transformer2DModel", SD35_MEDIUM)
    assert default_layers(sd35, "masactrl")[0] == "joint.12.self" and "dual.12.self" in default_layers(sd35, "masactrl")
    assert default_layers(sd35, "fpe", layers="joint.1?.self") == [f"joint.{i}.self" for i in range(10, 20)]


def test_chosen_layers_and_invalid_choices():
    r = run_edit("sd3", layers=["joint.1.self"])
    assert r.settings["edited_layers"] == {"InjectQK": ["joint.1.self"]}
    with pytest.raises(AttnlensError, match=r"picks \['joint.0.cross'\].*valid: joint.0.self, dual.0.self, joint.1.self"):
        run_edit("sd3", layers="joint.0.cross")
    with pytest.raises(AttnlensError, match="'block.9.self' matches no layer; valid names: block.0.self"):
        run_edit("pixart", method="masactrl", layers="block.9.self")
    with pytest.raises(AttnlensError, match="max_resolution.*one token grid at every depth.*layers="):
        run_edit("flux", max_resolution=4)
    with pytest.raises(AttnlensError, match="path='explicit'.*joint attention"):
        run_edit("flux", path="explicit")
    with pytest.raises(AttnlensError, match="option layers of method 'fpe'"):
        run_edit("flux", layers=3)


def test_fpe_explicit_path_on_pixart_equals_the_fused_path():
    fused = run_edit("pixart")
    explicit = run_edit("pixart", path="explicit")
    torch.testing.assert_close(explicit.pixels, fused.pixels, atol=1e-4, rtol=0)


def test_flux_start_noise_is_the_packed_noise_its_pipeline_draws():
    pipe = _pipe("flux")
    noise = attnlens.start_noise(pipe, 3)
    assert noise.shape == (1, 16, 16)  # 4x4 tokens of 2x2 cells of 4 channels
    a = pipe("a red star", latents=noise, num_inference_steps=2, output_type="pt", max_sequence_length=TEXT).images
    b = pipe("a red star", generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="pt",
             max_sequence_length=TEXT).images
    assert torch.equal(a, b)
    with pytest.raises(AttnlensError, match=r"latents must be a float torch.Tensor of shape \(1, tokens, 16\)"):
        edit(pipe, "a red star", "a blue star", latents=torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------ concept maps
JOINT = ["sd3", "flux"]


def concepts(family, names=("star", "red", "background"), **kw):
    return attnlens.concept_map(_pipe(family), "a red star", names, num_inference_steps=STEPS,
                                pipe_kwargs={"max_sequence_length": TEXT}, **kw)


@pytest.mark.parametrize("family", JOINT)
def test_concept_maps_shape_rows_image_unchanged_and_restore(family):
    pipe = _pipe(family)
    before = processors(pipe)
    cm = concepts(family)
    plain = pipe("a red star", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt",
                 max_sequence_length=TEXT).images[0]
    assert torch.equal(cm.pixels, plain)  # the concepts ride along without changing the generation
    assert cm.maps.shape == (3, 4, 4) and cm["star"].shape == (4, 4) and cm.concepts == ["star", "red", "background"]
    torch.testing.assert_close(cm.maps.sum(0), torch.ones(4, 4), atol=1e-5, rtol=0)
    assert cm.steps == [0, 1, 2] and cm.layers == (["joint.0", "joint.1"] if family == "sd3" else ["joint.0"])
    after = processors(pipe)
    assert all(after[n] is before[n] for n in before)
    assert all(not b._forward_hooks for b in pipe.transformer.transformer_blocks)


@pytest.mark.parametrize("family", JOINT)
def test_a_concept_map_equals_the_output_space_softmax_computed_by_hand(family):
    """One layer, one step: softmax over concepts of <image attention outputs of the real call, concept attention
    outputs of the side pass>, both recomputed from the attention module's recorded inputs."""
    pipe = _pipe(family)
    path = "transformer_blocks.0.attn"
    attn, calls = _calls(pipe, path, lambda: concepts(family, layers="joint.0.cross", steps=[0]))
    cm = concepts(family, layers="joint.0.cross", steps=[0])
    real, side = calls[0], calls[1]  # step 0: the real call, then the concepts' side pass
    assert side[1]["encoder_hidden_states"].shape[1] == 3  # three concept tokens in place of the text
    with torch.no_grad():
        outs = []
        for (args, kw, _), part in ((real, "image"), (side, "text")):
            q, k, v, img, txt = _qkv(family, attn, args, kw) if family == "sd3" else _flux_qkv(attn, args, kw)
            o = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # (batch, heads, tokens, dim)
            o = o[:, :, img if part == "image" else txt]
            outs.append(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))
        shares = torch.softmax(outs[0] @ outs[1].transpose(1, 2), -1)
        row = shares.shape[0] // 2 if shares.shape[0] == 2 and family == "sd3" else 0  # SD3: [uncond, cond]
        expected = shares[row].reshape(4, 4, 3).permute(2, 0, 1)
    torch.testing.assert_close(cm.maps, expected, atol=1e-5, rtol=0)


def _flux_qkv(attn, args, kw):
    """Flux's joint q, k, v with the text length of this call (the side pass has 3 concept tokens, not TEXT)."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden, context = args[0] if args else kw["hidden_states"], kw["encoder_hidden_states"]
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = attn.norm_q(split(attn.to_q(hidden))), attn.norm_k(split(attn.to_k(hidden))), split(attn.to_v(hidden))
    eq, ek = attn.norm_added_q(split(attn.add_q_proj(context))), attn.norm_added_k(split(attn.add_k_proj(context)))
    q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([split(attn.add_v_proj(context)), v], 2)
    rope = kw["image_rotary_emb"]
    q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    n = context.shape[1]
    return q, k, v, slice(n, q.shape[2]), slice(0, n)


def test_concept_maps_refuse_bad_input_clearly():
    for bad, match in (("star", "non-empty list of words"), ([], "non-empty list of words"),
                       (["star", ""], "non-empty string"), (["star", "star"], "given twice"), ([3], "non-empty string")):
        with pytest.raises(AttnlensError, match=match):
            concepts("flux", bad)
    with pytest.raises(AttnlensError, match=r"\['single.0.cross'\] are not \(joint.0 are\)"):
        concepts("flux", layers="single.0.cross")
    with pytest.raises(AttnlensError, match="dual.0.self"):
        concepts("sd3", layers="dual.0.self")
    with pytest.raises(AttnlensError, match="need joint attention.*PixArtTransformer2DModel.*word_map"):
        attnlens.concept_map(_pipe("pixart"), "a red star", ["star"])
    with pytest.raises(AttnlensError, match=r"step\(s\) \[7\] out of range"):
        concepts("sd3", steps=[7])


def test_concept_maps_restore_after_an_exception():
    pipe = _pipe("sd3")
    before = processors(pipe)

    def boom(*args, **kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        attnlens.concept_map(pipe, "a red star", ["star"], num_inference_steps=STEPS,
                             pipe_kwargs={"max_sequence_length": TEXT, "callback_on_step_end": boom})
    after = processors(pipe)
    assert all(after[n] is before[n] for n in before)
    assert all(not b._forward_hooks for b in pipe.transformer.transformer_blocks)
    assert all(not getattr(p, "taps", None) for p in after.values())


@pytest.mark.parametrize("branch,expected", [("cond", {0}), ("uncond", {1}), ("both", {0, 1})])
def test_flux_true_cfg_negative_call_is_the_uncond_branch(monkeypatch, branch, expected):
    """Flux runs true classifier-free guidance as a second transformer call (the negative prompts): an edit's
    branch selects the first call ("cond"), the second ("uncond") or both."""
    from attnlens import _joint

    seen = []
    original = _joint._JointBase._steer

    def spy(self, *a, **kw):
        result = original(self, *a, **kw)
        if result is not None:
            seen.append(self.clock.repeat)
        return result

    monkeypatch.setattr(_joint._JointBase, "_steer", spy)
    edit(_pipe("flux"), "a red star", "a blue star", num_inference_steps=2, negative_prompt="a green square",
         pipe_kwargs={"max_sequence_length": TEXT, "true_cfg_scale": 2.0}, branch=branch, layers="joint.0.self")
    assert set(seen) == expected


def test_a_capture_around_concept_maps_does_not_see_the_side_pass():
    pipe = _pipe("sd3")
    with attnlens.capture(pipe, layers="joint.0.*", kind=None, dtype=torch.float32) as alone:
        pipe("a red star", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt",
             max_sequence_length=TEXT)
    with attnlens.capture(pipe, layers="joint.0.*", kind=None, dtype=torch.float32) as around:
        concepts("sd3")
    assert sorted(around.keys()) == sorted(alone.keys())
    for key in alone.keys():
        assert torch.equal(around[key], alone[key])


def test_output_scaling_controllers_are_refused_on_joint_attention_and_work_on_pixart():
    from attnlens import Ablate, Selector, control

    pipe = _pipe("flux")
    with pytest.raises(AttnlensError, match=r"joint\.0\.self: Ablate scales the layer's output.*not supported on joint"):
        with control(pipe, Ablate(Selector(layers="joint.0.self"))):
            pass
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in processors(pipe).values())
    pixart = _pipe("pixart")
    with control(pixart, Ablate(Selector(layers="block.1.self"))):
        ablated = pixart("a red star", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                         **kwargs("pixart")).images
    plain = pixart("a red star", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                   **kwargs("pixart")).images
    assert (ablated - plain).abs().max() > 1e-4


def test_ablating_sd35_image_only_attention_changes_the_image():
    from attnlens import Ablate, Selector, control

    pipe = _pipe("sd3")

    def image():
        return pipe("a red star", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                    max_sequence_length=TEXT).images

    plain = image()
    with control(pipe, Ablate(Selector(layers="dual.0.self"), scale=1.0)):
        same = image()
    with control(pipe, Ablate(Selector(layers="dual.0.self"))):
        ablated = image()
    assert torch.equal(same, plain) and (ablated - plain).abs().max() > 1e-4
