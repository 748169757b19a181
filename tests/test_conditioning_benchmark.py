"""benchmarks/shapes_conditioning.py: the word gap does not depend on the model's parametrisation."""

from types import SimpleNamespace

import pytest
import torch

from attnlens._testing import tiny_pipeline


@pytest.fixture(scope="module")
def conditioning():
    from benchmarks import shapes_conditioning

    return shapes_conditioning


class _AsVelocity(torch.nn.Module):
    """An epsilon UNet re-expressed as the v-prediction model that denoises identically."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet, self.alphas, self.dtype = unet, alphas_cumprod, unet.dtype

    def forward(self, zt, t, encoder_hidden_states):
        eps = self.unet(zt, t, encoder_hidden_states=encoder_hidden_states).sample
        a = self.alphas[t].view(-1, 1, 1, 1).to(eps.dtype)
        return SimpleNamespace(sample=(eps - (1 - a).sqrt() * zt) / a.sqrt())


def test_a_v_prediction_model_gets_the_gaps_of_its_epsilon_twin(conditioning):
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline()
    eps_gaps = conditioning.gaps(pipe, "position", 4, seed=3)
    v_pipe = SimpleNamespace(
        vae=pipe.vae, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction"),
        unet=_AsVelocity(pipe.unet, pipe.scheduler.alphas_cumprod))
    v_gaps = conditioning.gaps(v_pipe, "position", 4, seed=3)
    for t, cell in eps_gaps["timesteps"].items():
        assert cell["gap"] != 0.0  # a random model reacts to any word change
        assert v_gaps["timesteps"][t]["gap"] == pytest.approx(cell["gap"], rel=1e-3, abs=1e-6)
        assert v_gaps["timesteps"][t]["mse_right"] == pytest.approx(cell["mse_right"], rel=1e-3)
