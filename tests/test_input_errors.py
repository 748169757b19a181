"""Bad input is a clear AttnlensError naming the argument (or is handled correctly), found before anything runs
where possible: words with non-ASCII letters, selections that select nothing, step counts, options, latents,
seeds, images, damaged cache files (issue 19). The collection directory's lock is in test_collect_lock.py."""

from __future__ import annotations

import json
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import attnlens
from attnlens import AttentionCache, AttnlensError, Selector, capture, collect, edit, edit_image, invert, start_noise
from attnlens._images import prepare_image
from attnlens._prompts import token_indices, tokenize, words
from attnlens._tokenizer import load_tokenizer


def generate(pipe, prompt="a red star", steps=2):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")


# ------------------------------------------------------------------------------------------ words
@pytest.mark.parametrize("prompt, word, n_tokens", [("a café star", "café", 1), ("a 星 star", "星", 2),
                                                    ("a 🌟 star", "🌟", 1), ("A CAFÉ star", "café", 1),
                                                    ("a naïve star", "NAÏVE", 3)])
def test_words_with_non_ascii_letters_are_found(prompt, word, n_tokens):
    """The shipped CLIP tokenizer writes tokens as byte-level BPE strings ('cafÃ©</w>'); words are compared as text."""
    toks = tokenize(load_tokenizer(), [prompt])[0]
    idx = token_indices(toks, word)
    assert len(idx) == n_tokens and idx[0] == 2  # the second word, after "a"
    assert [w for w, _ in words(toks)][-1] == "star"
    assert token_indices(toks, "star") == [2 + n_tokens]


def test_word_map_of_a_non_ascii_word_is_its_tokens_map(pipe):
    with capture(pipe) as cache:
        generate(pipe, "a 星 star", steps=1)
    assert cache.words() == ["a", "星", "star"]
    assert torch.equal(cache.word_map("星"), cache.word_map(2) + cache.word_map(3))
    one = cache.word_map("star", layers="mid.0.cross", steps=0)  # one layer and one step need no list
    assert torch.equal(one, cache.word_map("star", layers=["mid.0.cross"], steps=[0]))


@pytest.mark.parametrize("word", [None, 1.5, ["star"], ""])
def test_word_of_the_wrong_type_is_refused(word):
    toks = tokenize(load_tokenizer(), ["a red star"])[0]
    with pytest.raises(AttnlensError, match="word"):
        token_indices(toks, word)


# ------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("kwargs, says", [
    ({"steps": []}, r"steps=\[\] selects no step, so nothing would be captured"),
    ({"steps": 1.5}, "steps must be None .*, not 1.5"),
    ({"steps": [0, 0.5]}, r"steps must be .*; \[0, 0.5\] holds 0.5, not an int"),
    ({"steps": (0.5, 0.2)}, "0 <= start <= end <= 1"),
    ({"heads": [0.5]}, r"heads must be .*; \[0.5\] holds 0.5, not an int"),
    ({"heads": []}, r"heads must be .*; \[\] is empty"),
    ({"heads": "max"}, "heads must be 'mean', 'all' or a non-empty list of head indices .ints., not 'max'"),
    ({"prompts": "0"}, "prompts must be None .*, not '0'"),
    ({"prompts": []}, r"prompts must be .*; \[\] is empty"),
    ({"resolution": "8"}, "resolution must be"),
    ({"store_resolution": 0}, "store_resolution must be"),
    ({"store_resolution": 2.5}, "store_resolution must be"),
    ({"budget": "1GB"}, "budget must be a number of bytes"),
    ({"budget": 0}, "budget must be a number of bytes"),
    ({"dtype": torch.int8}, "dtype must be a floating-point torch dtype"),
    ({"dtype": "float16"}, "dtype must be a floating-point torch dtype"),
    ({"reduce": "max"}, "reduce must be"),
])
def test_capture_arguments_are_checked_before_the_run(pipe, kwargs, says):
    with pytest.raises(AttnlensError, match=says):
        with capture(pipe, **kwargs):
            raise AssertionError("the context must not open")
    assert not any(type(p).__name__ == "HookedProcessor" for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("steps", [slice(5, 9), [5], (0.9, 0.95)])
def test_a_step_selection_that_selects_no_step_of_the_run_raises(pipe, steps):
    with pytest.raises(AttnlensError, match="selects none of this run's 2 steps|out of range"):
        with capture(pipe, steps=steps):
            generate(pipe)


def test_prompts_may_be_one_index(pipe):
    with capture(pipe, prompts=0) as cache:
        generate(pipe, steps=1)
    assert cache.item_keys == [("cond", 0)]
    with pytest.raises(AttnlensError, match=r"prompt index\(es\) \[5\] out of range"):
        with capture(pipe, prompts=5):
            generate(pipe, steps=1)


@pytest.mark.parametrize("n", [0, -1])
def test_capture_around_a_run_without_steps_says_num_inference_steps(pipe, n):
    with pytest.raises(AttnlensError, match=f"num_inference_steps={n}: it must be >= 1"):
        with capture(pipe):
            generate(pipe, steps=n)
    assert not any(type(p).__name__ == "HookedProcessor" for p in pipe.unet.attn_processors.values())


# ------------------------------------------------------------------------------------------ edit, invert
@pytest.mark.parametrize("kwargs, says", [
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    ({"num_inference_steps": -1}, "num_inference_steps must be >= 1"),
    ({"num_inference_steps": 2.0}, "num_inference_steps must be an int"),
    ({"guidance_scale": "7"}, "guidance_scale must be a number"),
    ({"seed": "abc"}, "seed must be an int"),
    ({"seed": -3}, "seed must be >= 0"),
    ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents must be a float torch.Tensor of shape .1, 4, h, w."),
    ({"latents": torch.zeros(4, 8, 8)}, r"not a torch.float32 tensor of shape \(4, 8, 8\)"),
    ({"latents": torch.zeros(1, 3, 8, 8)}, r"shape \(1, 3, 8, 8\)"),
    ({"latents": torch.zeros(2, 4, 8, 8)}, r"shape \(2, 4, 8, 8\)"),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, "torch.int64"),
    ({"max_resolution": "abc"}, "option max_resolution of method 'fpe' must be"),
    ({"max_resolution": 0}, "option max_resolution of method 'fpe' must be"),
    ({"steps": 1.5}, "option steps of method 'fpe'"),
    ({"method": "p2p", "local_blend": ("star",)}, "option local_blend of method 'p2p' must be None or a pair"),
    ({"method": "p2p", "local_blend": "star"}, "option local_blend of method 'p2p' must be None or a pair"),
    ({"method": "p2p", "local_blend": ("star", "moon")}, "option local_blend: 'moon' is not a word of prompt 1"),
    ({"method": "p2p", "reweight": {"moon": 2.0}}, "option reweight: 'moon' is not a word of prompt 1"),
    ({"method": "p2p", "reweight": {"blue": "2"}}, "option reweight of method 'p2p' must be"),
    ({"method": "p2p", "blend_threshold": "0.3"}, "option blend_threshold of method 'p2p' must be a number"),
    ({"method": "p2p", "blend_start": 1.5}, "option blend_start of method 'p2p' must be a fraction of the schedule"),
    ({"method": "p2p", "cross_replace_steps": 1.2}, "option cross_replace_steps of method 'p2p'"),
    ({"method": "masactrl", "start_step": "0.1"}, "option start_step of method 'masactrl'"),
    ({"method": "masactrl", "min_resolution": 2.5}, "option min_resolution of method 'masactrl'"),
    ({"capture": "yes"}, "capture must be None, True or a dict"),
])
def test_edit_arguments_are_checked_before_generating(pipe, kwargs, says, monkeypatch):
    monkeypatch.setattr(pipe, "__call__", lambda *a, **k: pytest.fail("the pipeline ran"), raising=False)
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(AttnlensError, match=says):
        edit(pipe, "a red star", "a blue star", **kwargs)


def test_p2p_options_that_mean_no_self_copy_are_accepted(pipe):
    from attnlens._methods import options_for

    for value in (0, 0.0, None):
        assert options_for("p2p", {"self_replace_steps": value}).self_replace_steps == value
    assert options_for("p2p", {"cross_replace_steps": [0, 1]}).cross_replace_steps == [0, 1]


@pytest.mark.parametrize("kwargs, says", [({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
                                          ({"num_inference_steps": -1}, "num_inference_steps must be >= 1"),
                                          ({"size": (16,)}, "size must be None"),
                                          ({"inner_steps": 0}, "inner_steps must be >= 1")])
def test_invert_arguments_are_checked(pipe, kwargs, says):
    with pytest.raises(AttnlensError, match=says):
        invert(pipe, Image.new("RGB", (16, 16)), **kwargs)


def test_edit_image_checks_steps_up_front(pipe):
    with pytest.raises(AttnlensError, match="num_inference_steps must be >= 1"):
        edit_image(pipe, Image.new("RGB", (16, 16)), "a blue star", num_inference_steps=0)


def test_start_noise_seed():
    from attnlens._testing import tiny_pipeline

    with pytest.raises(AttnlensError, match="seed must be an int"):
        start_noise(tiny_pipeline(), "abc")


# ------------------------------------------------------------------------------------------ images
def _gray(pipe, image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, notices = prepare_image(pipe, image, None)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (16, 16, 3)
    return arr, notices


@pytest.mark.parametrize("image, value", [
    (Image.fromarray(np.full((16, 16), 32896, np.uint16)), 128),        # a 16-bit grayscale image: not white
    (np.full((16, 16), 32896, np.uint16), 128),                          # the same as an array
    (np.full((16, 16, 3), 0.5, np.float32), 128),                        # floats in 0..1
    (np.full((16, 16, 1), 64, np.uint8), 64),                            # one channel last
    (np.full((16, 16), 200, np.int64), 200),                             # integers in 0..255
    (np.ones((16, 16), bool), 255),
    (Image.fromarray(np.full((16, 16), 0.25, np.float32)), 64),          # a float PIL image (mode F)
])
def test_images_of_every_depth_convert_to_the_right_grey(pipe, image, value):
    arr, notices = _gray(pipe, image)
    assert np.all(np.abs(arr.astype(int) - value) <= 1), arr[0, 0]


@pytest.mark.parametrize("image, says", [
    (np.full((16, 16), 128.0), "values 128..128; a float image must be in 0..1 .it looks like 0..255: divide by 255"),
    (np.full((16, 16, 3), -0.5, np.float32), "must be in 0..1 .it looks like -1..1"),
    (np.full((16, 16), np.nan, np.float32), "NaN"),
    (np.zeros((3, 16, 16), np.uint8), r"shape \(3, 16, 16\).*channels first\? use arr.transpose\(1, 2, 0\)"),
    (np.zeros((1, 16, 16, 3), np.uint8), r"shape \(1, 16, 16, 3\).*a batch\? pass arr\[0\]"),
    (np.full((16, 16), 1000, np.int32), "int32 with values 1000..1000"),
    (np.zeros((16, 16), np.complex64), "dtype complex64"),
    ([[0, 1]], "image must be a PIL image, a numpy array"),
])
def test_images_that_cannot_be_converted_are_refused_clearly(pipe, image, says):
    with pytest.raises(AttnlensError, match=says):
        prepare_image(pipe, image, None)


def test_invert_of_a_16_bit_image_is_not_white(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inv = invert(pipe, Image.fromarray(np.full((16, 16), 16448, np.uint16)), num_inference_steps=1, check=False)
    assert np.asarray(inv.image).max() == 64 and any("0..65535" in n for n in inv.notices)


# ------------------------------------------------------------------------------------------ cache files
@pytest.fixture(scope="module")
def cache_file(pipe, tmp_path_factory):
    with capture(pipe, layers=["mid.0.cross", "down.0.0.cross"]) as cache:
        generate(pipe)
    return cache.save(tmp_path_factory.mktemp("cache") / "maps.safetensors")


def _resave(src, dst, meta=None, tensors=None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        stored = json.loads(f.metadata()["attnlens"])
    t = load_file(str(src))
    meta = meta(stored) if meta else stored
    save_file(tensors(t) if tensors else t, str(dst),
              metadata={"attnlens": meta if isinstance(meta, str) else json.dumps(meta)})
    return dst


def test_a_sound_cache_file_loads(cache_file):
    back = AttentionCache.load(cache_file)
    assert back.words() == ["a", "red", "star"] and back["mid.0.cross", 1].shape == (1, 1, 4, 4, 77)


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("damage, says", [
    ("truncate", "is truncated"),
    ("garbage", "is truncated or not a safetensors file"),
    ("pickle", "not a safetensors file|is truncated"),
    ("missing", "does not exist"),
    ("no-meta", "has no 'attnlens' metadata"),
    ("bad-json", "has damaged metadata .not valid JSON"),
    ("json-list", "has damaged metadata .a JSON list"),
    ("missing-field", r"missing field\(s\) \['counts'\]"),
    ("extra-field", r"unknown field\(s\) \['owner'\]"),
    ("wrong-type", "field 'steps' is a str"),
    ("bad-layer", "layer 'mid.0.cross' is not a layer record: KeyError 'resolution'; a record has name, path"),
    ("int-maps", "holds I32 maps"),
    ("unknown-tensor", "holds a tensor 'up.9.cross@1'"),
    ("bad-step", "holds a tensor 'mid.0.cross@7'"),
    ("bad-shape", r"holds a map 'mid.0.cross@1' of shape \[4, 4, 77\]"),
])
def test_a_damaged_cache_file_is_refused_naming_the_file(cache_file, tmp_path, damage, says):
    path = tmp_path / "damaged.safetensors"
    raw = cache_file.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"mid.0.cross@1": np.zeros(3)}))
    elif damage == "missing":
        path = tmp_path / "nowhere.safetensors"
    elif damage == "no-meta":
        save_file({"x": torch.zeros(2)}, str(path))
    elif damage == "bad-json":
        _resave(cache_file, path, meta=lambda m: json.dumps(m)[:-5])
    elif damage == "json-list":
        _resave(cache_file, path, meta=lambda m: [1, 2])
    elif damage == "missing-field":
        _resave(cache_file, path, meta=lambda m: _without(m, "counts"))
    elif damage == "extra-field":
        _resave(cache_file, path, meta=lambda m: {**m, "owner": "me"})
    elif damage == "wrong-type":
        _resave(cache_file, path, meta=lambda m: {**m, "steps": "0,1"})
    elif damage == "bad-layer":
        _resave(cache_file, path, meta=lambda m: {**m, "layers": {**m["layers"], "mid.0.cross": {"bogus": 1}}})
    elif damage == "int-maps":
        _resave(cache_file, path, tensors=lambda t: {k: (v * 1000).to(torch.int32) for k, v in t.items()})
    elif damage == "unknown-tensor":
        _resave(cache_file, path, tensors=lambda t: {**t, "up.9.cross@1": t["mid.0.cross@1"].clone()})
    elif damage == "bad-step":
        _resave(cache_file, path, tensors=lambda t: {**t, "mid.0.cross@7": t["mid.0.cross@1"].clone()})
    elif damage == "bad-shape":
        _resave(cache_file, path, tensors=lambda t: {**t, "mid.0.cross@1": t["mid.0.cross@1"][0, 0]})
    with pytest.raises(AttnlensError, match=f"cannot load the attention cache {re.escape(str(path))}: it (has damaged metadata .)?({says})"):
        AttentionCache.load(path)


def test_a_collect_shard_is_not_loaded_as_a_cache(pipe, tmp_path):
    collect(pipe, ["a red star"], words="star", num_inference_steps=1, sites=Selector(layers="mid.0.cross"),
            out=tmp_path / "feats", progress=False)
    shard = next((tmp_path / "feats" / "shards").glob("shard-*.safetensors"))
    with pytest.raises(AttnlensError, match=r"is a shard of attnlens.collect.*load_features"):
        AttentionCache.load(shard)


# ------------------------------------------------------------------------------------------ collect
@pytest.mark.parametrize("data, kwargs, says", [
    (None, {}, "data must be prompts.*not NoneType"),
    (5, {}, "data must be prompts.*not int"),
    ({"prompt": "a"}, {}, "data must be prompts.*not dict"),
    (["a red star"], {"seeds": "abc"}, "seeds must be a count"),
    (["a red star"], {"seeds": [0, 1.5]}, "seeds holds 1.5"),
    (["a red star"], {"seeds": 0}, "seeds must be >= 1"),
    (["a red star"], {"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    (["a red star"], {"batch_size": "8"}, "batch_size must be an int"),
    (["a red star"], {"resolution": 0}, "resolution must be >= 1"),
    (["a red star"], {"guidance_scale": None}, "guidance_scale must be a number"),
])
def test_collect_arguments_are_checked(pipe, data, kwargs, says):
    with pytest.raises(AttnlensError, match=says):
        collect(pipe, data, words="star", progress=False, **kwargs)


def test_public_errors_are_one_type():
    assert issubclass(attnlens.AttnlensError, ValueError)
