"""attnlens.Ablate: zeroing (or scaling) attention layers' output through control(), exactly and reversibly."""

import numpy as np
import pytest
import torch

import attnlens
from attnlens import Ablate, AttnlensError, Selector, control
from attnlens._testing import tiny_pipeline


class _ZeroProcessor:
    """The reference ablation: a processor whose layer outputs zeros (the block keeps its residual)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return hidden_states if attn.residual_connection else torch.zeros_like(hidden_states)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _image(pipe, steps=4):
    return pipe("a red star", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_ablation_equals_a_zero_processor_and_restores(pipe):
    unet = pipe.unet
    before = dict(unet.attn_processors)
    selfs = [i for i in attnlens.layers(pipe) if i.kind == "self"]
    plain = _image(pipe)
    unet.set_attn_processor({k: (_ZeroProcessor() if any(k.startswith(i.path + ".") for i in selfs) else v)
                             for k, v in before.items()})
    reference = _image(pipe)
    unet.set_attn_processor(dict(before))
    with control(pipe, Ablate(Selector(kind="self"))):
        ablated = _image(pipe)
    np.testing.assert_array_equal(ablated, reference)
    assert not np.allclose(ablated, plain)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError):
        with control(pipe, Ablate(Selector(kind="self"))):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    np.testing.assert_array_equal(_image(pipe), plain)


def test_scale_one_changes_nothing_and_steps_select_when(pipe):
    plain = _image(pipe)
    with control(pipe, Ablate(Selector(kind="self"), scale=1.0)):
        np.testing.assert_array_equal(_image(pipe), plain)
    with control(pipe, Ablate(Selector(kind="self"))):
        every = _image(pipe)
    with control(pipe, Ablate(Selector(kind="self", steps=[3]))):  # only the last of 4 steps
        late = _image(pipe)
    assert not np.array_equal(late, plain) and not np.array_equal(late, every)
    assert np.abs(late - plain).mean() < np.abs(every - plain).mean()


def test_ablation_nests_with_capture(pipe):
    before = dict(pipe.unet.attn_processors)
    with control(pipe, Ablate(Selector(kind="self", layers="mid.*"))):
        with attnlens.capture(pipe, Selector(kind="cross")) as cache:
            _image(pipe, steps=2)
    assert len(cache) > 0
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


@pytest.mark.parametrize("scale", ["0", None, float("nan"), True])
def test_a_bad_scale_is_refused(scale):
    with pytest.raises(AttnlensError, match="scale must be a real number"):
        Ablate(Selector(kind="self"), scale=scale)


def test_a_selection_of_no_layer_is_refused(pipe):
    with pytest.raises(AttnlensError):
        with control(pipe, Ablate(Selector(layers="nowhere.*"))):
            pass
