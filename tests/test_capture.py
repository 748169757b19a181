import numpy as np
import pytest
import torch

import attnlens
from attnlens import AttnlensError, Selector, capture, layers
from attnlens._testing import captured_with_inputs


def run(pipe, prompt="a red hexagon on the left", steps=3, guidance=7.5, seed=0):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def test_capture_does_not_change_the_image(pipe):
    plain = run(pipe)
    with capture(pipe, kind=None, layers="*") as cache:
        hooked = run(pipe)
    assert len(cache) == 8 * 3
    np.testing.assert_allclose(hooked, plain, atol=1e-5)


def test_maps_equal_softmax_qk_recomputed_from_the_layer_inputs(pipe):
    cache, expected = captured_with_inputs(pipe, "down.0.0.cross", lambda p: run(p, steps=2), heads="all",
                                           dtype=torch.float32)
    attn = next(i for i in layers(pipe) if i.name == "down.0.0.cross").module
    got = cache["down.0.0.cross", 1]
    assert got.shape == (1, attn.heads, 8, 8, 77)
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-4, rtol=0)


def test_self_attention_maps_equal_softmax_qk_recomputed_from_the_layer_inputs(pipe):
    cache, expected = captured_with_inputs(pipe, "down.0.0.self", lambda p: run(p, steps=2), kind="self",
                                           heads="all", dtype=torch.float32)
    got = cache["down.0.0.self", 1]
    assert got.shape[-1] == 64 and got.shape[2:4] == (8, 8)  # every query of the 8x8 grid over 64 keys
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-4, rtol=0)


def test_processors_are_restored_after_exit_and_after_an_exception(pipe):
    before = processors(pipe)
    with capture(pipe):
        run(pipe, steps=1)
    assert all(processors(pipe)[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe, kind=None, layers="*"):
            raise RuntimeError("boom")
    assert all(processors(pipe)[k] is v for k, v in before.items())
    assert not pipe.unet._forward_pre_hooks and not pipe.text_encoder._forward_pre_hooks


def test_nested_captures_both_record_and_unwind(pipe):
    before = processors(pipe)
    with capture(pipe, layers="mid.*") as outer:
        inside_outer = processors(pipe)
        with capture(pipe, layers="mid.0.cross", steps=[0]) as inner:
            run(pipe, steps=2)
        assert all(processors(pipe)[k] is v for k, v in inside_outer.items())
    assert all(processors(pipe)[k] is v for k, v in before.items())
    assert sorted(inner.keys()) == [("mid.0.cross", 0)]
    assert ("mid.0.self", 1) in outer.keys() and ("mid.0.cross", 0) in outer.keys()
    torch.testing.assert_close(inner["mid.0.cross", 0], outer["mid.0.cross", 0])


def test_contexts_exiting_out_of_order_restore_exactly(pipe):
    from attnlens import Controller, control

    before = processors(pipe)
    a = capture(pipe, layers="mid.*")
    b = control(pipe, Controller(Selector(kind="self")))
    cache = a.__enter__()
    b.__enter__()
    run(pipe, steps=2)
    a.__exit__(None, None, None)  # A leaves first: B's hooks stay, A's are gone
    hooked = [p for p in processors(pipe).values() if type(p).__name__ == "HookedProcessor"]
    assert hooked and all(not p.hooks and len(p.controllers) == 1 for p in hooked)
    b.__exit__(None, None, None)
    assert all(processors(pipe)[k] is v for k, v in before.items())
    assert not pipe.unet._forward_pre_hooks and not pipe.text_encoder._forward_pre_hooks
    assert ("mid.0.cross", 1) in cache


def test_every_context_on_a_pipeline_shares_one_step_clock(pipe):
    from attnlens import Controller, control

    ctrl = Controller(Selector(kind="self"))
    with capture(pipe, layers="mid.*"), capture(pipe, layers="up.*"), control(pipe, ctrl):
        assert len(pipe.unet._forward_pre_hooks) == 1
        run(pipe, steps=2)
        assert ctrl.clock.step == 1 and ctrl.clock.n_steps == 2
    assert not pipe.unet._forward_pre_hooks


def test_the_cache_is_a_mapping_of_layer_and_step(pipe):
    with capture(pipe, layers="mid.0.cross", steps=[0, 1]) as cache:
        run(pipe, steps=2)
    assert ("mid.0.cross", 1) in cache and ("mid.0.cross", 2) not in cache and "mid.0.cross" not in cache
    assert list(cache) == cache.keys() == [("mid.0.cross", 0), ("mid.0.cross", 1)]
    assert [k for k, _ in cache.items()] == cache.keys()
    assert all(torch.equal(m, cache[k]) for k, m in cache.items())
    with capture(pipe, layers="mid.0.cross", reduce="mean") as reduced:
        run(pipe, steps=2)
    (key, mean), = reduced.items()
    assert key == ("mid.0.cross", None)
    torch.testing.assert_close(mean, reduced["mid.0.cross", None])


def test_no_cfg_batch_several_prompts_and_branches(pipe):
    with capture(pipe) as cache:
        run(pipe, guidance=1.0, steps=2)
    assert cache.item_keys == [("cond", 0)]
    with pytest.raises(AttnlensError, match="no unconditional branch"):
        with capture(pipe, branch="uncond"):
            run(pipe, guidance=1.0, steps=1)
    with capture(pipe, branch="both") as cache:
        run(pipe, ["a red star", "a blue hexagon at the top"], steps=2)
    assert cache.item_keys == [("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    assert cache["up.1.1.cross", 0].shape[0] == 4
    assert cache.words(1) == ["a", "blue", "hexagon", "at", "the", "top"]
    assert cache.word_map("hexagon", prompt=1).shape == (8, 8)


def test_capture_is_deterministic_under_a_seed(pipe):
    maps = []
    for _ in range(2):
        with capture(pipe) as cache:
            run(pipe, seed=3, steps=2)
        maps.append(cache["down.0.0.cross", 1])
    assert torch.equal(*maps)


def test_word_maps_merge_tokens_and_reach_special_tokens(pipe):
    with capture(pipe, dtype=torch.float32) as cache:
        run(pipe, steps=2)
    assert cache.token_indices("hexagon") == [3, 4]  # "hex" + "agon"
    assert cache.token_indices("on the left") == [5, 6, 7]
    assert cache.token_indices("<start>") == [0] and cache.token_indices("<end>") == [8]
    assert cache.token_indices("<pad>") == list(range(9, 77))
    full = cache.aggregate(cache.word_map_layers())[0]  # the default: the finest captured level
    torch.testing.assert_close(cache.word_map("hexagon"), full[..., 3] + full[..., 4])
    with pytest.raises(AttnlensError, match=r"'dog' is not a word.*'hexagon'"):
        cache.word_map("dog")
    assert cache.p2p_layers() == ["down.0.0.cross", "up.1.0.cross", "up.1.1.cross"]


def test_selection_reduction_and_storage(pipe):
    with capture(pipe, kind="self", steps=(0.0, 0.5), reduce="mean", store_resolution=4) as cache:
        run(pipe, steps=4)
    assert sorted({s for _, s in cache.keys()}) == [None]
    m = cache["down.0.0.self", None]
    assert m.shape == (1, 1, 4, 4, 16)
    torch.testing.assert_close(m.float().sum(-1), torch.ones(1, 1, 4, 4), atol=1e-3, rtol=0)
    assert cache.steps == [0, 1]


def test_save_and_load_round_trip(pipe, tmp_path):
    with capture(pipe) as cache:
        run(pipe, steps=2)
    back = attnlens.AttentionCache.load(cache.save(tmp_path / "maps.safetensors"))
    assert set(back.keys()) == set(cache.keys())
    torch.testing.assert_close(back.word_map("red"), cache.word_map("red"))


def test_bad_inputs_get_clear_errors(pipe):
    with pytest.raises(AttnlensError, match="matches no layer; valid names: down.0.0.self"):
        with capture(pipe, layers="down.9.*"):
            pass
    with pytest.raises(AttnlensError, match="out of range: the schedule has 2 steps"):
        with capture(pipe, steps=[5]):
            run(pipe, steps=2)
    with pytest.raises(AttnlensError, match="over the budget"):
        with capture(pipe, kind="self", budget=1000):
            run(pipe, steps=2)
    with pytest.raises(AttnlensError, match="unsupported architecture"):
        layers(torch.nn.Linear(2, 2))
    with pytest.raises(AttnlensError, match="heads must be"):
        Selector(heads="max")
    with capture(pipe) as cache:
        run(pipe, " ".join(["red"] * 100), steps=1)  # diffusers truncates to 77 tokens and logs it
    assert len(cache.tokens[0]) == 77
