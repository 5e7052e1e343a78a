"""DDIM inversion: it keeps the right timesteps and runs back to the start under DDIM sampling."""

from __future__ import annotations

import pytest
import torch

from tokenflow.errors import TokenFlowError
from tokenflow.inversion import edit_timesteps
from tokenflow.pipeline import TokenFlowPipeline


def ddim_sample(pipe, z, prompt, steps):
    """Plain DDIM sampling with guidance 1 (no CFG), from the noisiest timestep down."""
    scheduler = pipe.model.new_scheduler()
    scheduler.set_timesteps(steps)
    text = pipe.model.encode_prompt(prompt).embeddings.expand(len(z), -1, -1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.model.unet(z, t, encoder_hidden_states=text).sample
            z = scheduler.step(eps, t, z).prev_sample
    return z


@pytest.fixture(scope="module")
def tame_pipe():
    """The tiny model with its output layer scaled down 50x.

    A random UNet's noise prediction jumps around between neighbouring latents, which no
    ODE discretisation can follow; damping it makes the prediction vary smoothly along the
    trajectory, as a trained model's does, so the round trip measures our inversion arithmetic.
    """
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.testing import make_tiny_sd

    parts = make_tiny_sd("tiny", seed=0)
    with torch.no_grad():
        parts.unet.conv_out.weight.mul_(0.02)
        parts.unet.conv_out.bias.mul_(0.02)
    return TokenFlowPipeline(StableDiffusion.from_parts(parts, device="cpu"))


def test_inversion_then_sampling_returns_to_the_start(tame_pipe, wolf_frames):
    z0 = tame_pipe.encode_frames(wolf_frames[:1])
    errors = {}
    for steps in (20, 80):
        inversion = tame_pipe.invert(
            z0, inversion_prompt="a wolf", inversion_steps=steps, steps=steps
        )
        assert (inversion.final - z0).abs().mean() > 0.5 * z0.abs().mean()  # it went far away
        back = ddim_sample(tame_pipe, inversion.final.clone(), "a wolf", steps=steps)
        errors[steps] = (back - z0).abs().max().item()
    # measured: 3.8e-2 at 20 steps, 8.7e-3 at 80 (latents up to 0.15): first-order convergence
    assert errors[80] < 1.5e-2, errors
    assert errors[80] < errors[20] / 3, errors


def test_inversion_keeps_the_editing_timesteps(tiny_model, wolf_frames):
    pipe = TokenFlowPipeline(tiny_model)
    z0 = pipe.encode_frames(wolf_frames[:1])
    inversion = pipe.invert(z0, inversion_prompt="a wolf", inversion_steps=10, steps=10)
    assert (
        sorted(inversion.latents) == edit_timesteps(pipe.model.new_scheduler(), 10)[::-1]
    )  # 1, 101, ..., 901
    assert inversion.final_timestep == 901


def test_inversion_keeps_editing_timesteps_of_a_finer_schedule(tiny_model, wolf_frames):
    pipe = TokenFlowPipeline(tiny_model)
    z0 = pipe.encode_frames(wolf_frames[:1])
    inversion = pipe.invert(z0, inversion_prompt="a wolf", inversion_steps=20, steps=10)
    assert set(inversion.latents) == set(edit_timesteps(pipe.model.new_scheduler(), 10)) | {951}
    with pytest.raises(TokenFlowError, match="use 20"):
        pipe.invert(z0, inversion_prompt="a wolf", inversion_steps=15, steps=10)


def test_inversion_is_per_frame(tiny_model, wolf_frames):
    """Frames are inverted independently: batching does not change a frame's latents."""
    pipe = TokenFlowPipeline(tiny_model)
    z0 = pipe.encode_frames(wolf_frames[:3])
    together = pipe.invert(z0, inversion_prompt="a wolf", inversion_steps=5, steps=5)
    alone = pipe.invert(z0[1:2], inversion_prompt="a wolf", inversion_steps=5, steps=5)
    final = together.final_timestep
    torch.testing.assert_close(
        together.latents[final][1:2], alone.latents[final], rtol=1e-5, atol=1e-5
    )
