"""A prompt longer than CLIP's 77 tokens: attnlens warns itself that the cut words have no maps."""

import re
import warnings

import pytest
import torch

from attnlens import capture


def run(pipe, prompts):
    pipe(prompts, num_inference_steps=1, guidance_scale=7.5, output_type="np",
         generator=torch.Generator().manual_seed(0))


def test_long_prompt_warns_about_truncation(pipe):
    long = "a red star " + " ".join(["on a black background"] * 30) + " at the top"
    assert len(pipe.tokenizer(long).input_ids) > 77
    with pytest.warns(UserWarning, match=r"prompt\(s\) \[1\] fill all 77 token positions.*truncated") as record:
        with capture(pipe) as cache:
            run(pipe, ["a red star", long])
    assert len([w for w in record if "token positions" in str(w.message)]) == 1  # once per capture
    message = next(str(w.message) for w in record if "token positions" in str(w.message))
    assert re.search(r"prompt 1 now ends with '\.\.\. (on|a|black|background)( (on|a|black|background)){4}'", message)
    assert len(cache.tokens[1]) == 77 and "top" not in cache.words(1)
    assert cache.word_map("star", prompt=1).shape == (8, 8)  # the kept words still have maps


def test_short_prompts_do_not_warn(pipe):
    near = " ".join(["red"] * 74)  # 74 tokens + start + end: one padding position left
    assert len(pipe.tokenizer(near).input_ids) == 76
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with capture(pipe):
            run(pipe, ["a red star", near])
    assert not [w for w in record if "token positions" in str(w.message)]
