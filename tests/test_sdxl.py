"""SDXL: two text encoders and added conditioning per branch, TokenFlow's layers by the SD rule,
every method end to end on a tiny random SDXL, its VAE in float32, refusals of what it cannot
edit with."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tokenflow.cli import main
from tokenflow.controlnet import ControlNetCondition, canny_images
from tokenflow.errors import TokenFlowError
from tokenflow.families import Conditioning, check_model_source, family_of, load_model
from tokenflow.families.sdxl import StableDiffusionXL
from tokenflow.job import model_defaults, read_input
from tokenflow.layers import find_layers
from tokenflow.options import EditOptions
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.testing import make_tiny_controlnet, make_tiny_sd, make_tiny_sdxl, save_tiny_sdxl

SMALL = dict(steps=2, inversion_steps=2, block_size=2, inversion_prompt="a wolf", prompt="a fox")


@pytest.fixture(scope="module")
def xl():
    return StableDiffusionXL.from_parts(make_tiny_sdxl(), name="tiny-xl", device="cpu")


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-xl")


@pytest.fixture(scope="module")
def edit(xl, wolf_frames):
    """(pipeline, 4 frames, their inversion, the reference PnP edit of them)."""
    pipe, frames = TokenFlowPipeline(xl), wolf_frames[:4]
    latents = pipe.encode_frames(frames)
    inversion = pipe.invert(latents, inversion_prompt="a wolf", inversion_steps=2, steps=2)
    return pipe, frames, inversion, pipe(frames, inversion=inversion, **SMALL)


def test_layers_follow_the_sd_rule_at_every_transformer_depth(xl):
    layers = find_layers(xl.unet)
    # down 2x2 + 2x3, mid 3, up 3x3 + 3x2 transformer blocks: every one's self-attention
    assert len(layers.self_attention) == 28
    depth = {0: 3, 1: 2}  # transformer depth of the two decoder levels with attention
    expected = [
        f"up_blocks.{i}.attentions.{j}.transformer_blocks.{d}.attn1"
        for i, attentions in ((0, (1, 2)), (1, (0, 1, 2)))
        for j in attentions
        for d in range(depth[i])
    ]
    assert list(layers.qk_injection) == expected
    assert layers.residual_injection == "up_blocks.0.resnets.1"


def test_prompt_is_both_encoders_states_pooled_output_and_size_ids(xl):
    prompt = "a wolf in the snow"
    conditioning = xl.encode_prompt(prompt, size=(64, 96))
    states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(xl.tokenizers, xl.text_encoders, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
            out = encoder(ids.input_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
    torch.testing.assert_close(conditioning.embeddings, torch.cat(states, dim=-1))
    torch.testing.assert_close(conditioning.added["text_embeds"], pooled)
    assert conditioning.added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]]
    assert xl.encode_prompt(prompt).added["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]]


def test_added_conditioning_stays_with_its_branch(xl):
    source, uncond, cond = (xl.encode_prompt(p) for p in ("a wolf", "", "a fox"))
    batch = Conditioning.cat([c.expand(3) for c in (source, uncond, cond)])
    pooled = batch.unet_kwargs()["added_cond_kwargs"]["text_embeds"]
    assert pooled.shape[0] == 9 and batch.added["time_ids"].shape == (9, 6)
    for b, branch in enumerate((source, uncond, cond)):
        assert torch.equal(pooled[3 * b : 3 * b + 3], branch.added["text_embeds"].expand(3, -1))
    assert not torch.equal(source.added["text_embeds"], cond.added["text_embeds"])


def test_pnp_injects_into_the_sdxl_layers(edit, trace):
    pipe, frames, inversion, _ = edit
    result = pipe(frames, inversion=inversion, **SMALL)
    layers = pipe.model.layers()
    assert result.frames.shape == (4, 64, 64, 3) and result.frames.dtype == np.uint8
    assert {layer for _, kind, layer in trace if kind == "qk"} == set(layers.qk_injection)
    assert {layer for _, kind, layer in trace if kind == "residual"} == {"up_blocks.0.resnets.1"}
    assert {layer for _, kind, layer in trace if kind == "record"} == set(layers.self_attention)


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="sdedit", strength=0.9),
        dict(baseline="per-frame"),
        dict(baseline="extended-attention"),
        dict(baseline="fixed-keyframes"),
        dict(propagation="paper"),
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_every_method_and_baseline_edits_sdxl(edit, settings):
    pipe, frames, inversion, reference = edit
    result = pipe(frames, inversion=inversion, **{**SMALL, **settings})
    assert result.frames.shape == (4, 64, 64, 3)
    assert sum(result.unet_evaluations.values()) > 0
    assert not np.array_equal(result.frames, reference.frames)  # each is its own edit


def test_long_video_mode_on_sdxl(edit, wolf_frames):
    pipe, frames = edit[0], wolf_frames[:6]
    kwargs = dict(SMALL, block_size=1, keyframe_overlap=1, keyframe_memory=0)
    inversion = pipe.invert(pipe.encode_frames(frames), **kwargs)
    reference = pipe(frames, inversion=inversion, **kwargs)
    windows = pipe(frames, inversion=inversion, max_keyframes=3, **kwargs)
    whole = pipe(frames, inversion=inversion, max_keyframes=6, **kwargs)
    assert torch.equal(whole.latents, reference.latents)  # one window is the reference
    assert windows.frames.shape == (6, 64, 64, 3)
    assert not torch.equal(windows.latents, reference.latents)


def test_controlnet_sdxl_conditions_every_call(edit, xl):
    pipe, frames, inversion, reference = edit
    controlnet = make_tiny_controlnet(xl.unet, seed=0)
    control = ControlNetCondition(controlnet, canny_images(frames))
    result = pipe(frames, inversion=inversion, control=control, **SMALL)
    assert control.evaluations == sum(result.unet_evaluations.values())
    assert not np.array_equal(result.frames, reference.frames)


def test_vae_runs_in_float32_for_a_float16_model():
    model = StableDiffusionXL.from_parts(make_tiny_sdxl(), device="cpu", dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32
    frames = np.full((1, 64, 64, 3), 128, np.uint8)
    latents = model.encode_images(frames)
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert model.describe()["vae_dtype"] == "float32"


def test_a_vae_that_overflows_in_float16_is_named():
    model = StableDiffusionXL.from_parts(make_tiny_sdxl(), device="cpu", dtype=torch.float16)
    model.vae.to(torch.float16)  # as an "fp16-safe" replacement VAE would run
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.mul_(1e6)
    with pytest.raises(TokenFlowError, match="overflowed in float16") as error:
        model.decode_latents(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert "\n" not in str(error.value) and "fp16-safe `vae`" in error.value.args[0]


def test_sdxl_folder_is_its_own_family_with_a_1024_default(xl_dir, data_dir):
    assert family_of(str(xl_dir)) is StableDiffusionXL
    options = model_defaults(EditOptions(input=str(data_dir / "wolf.mp4"), model=str(xl_dir)))
    assert options.short_side == 1024
    clip = read_input(options.replace(frames=1))
    assert min(clip.size) == 1024
    sd = model_defaults(EditOptions(model=str(xl_dir), short_side=320))
    assert sd.short_side == 320  # what the user set stays


def test_cli_edit_and_info_with_an_sdxl_folder(xl_dir, data_dir, tmp_path, tiny_edit_args, capsys):
    out = tmp_path / "out"
    args = ["--model", str(xl_dir), "--prompt", "a fox", "--out", str(out), *tiny_edit_args]
    assert main(["edit", str(data_dir / "wolf.mp4"), *args]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["family"] == "sdxl" and info["input"]["size"] == [64, 64]
    assert main(["info", "--model", str(xl_dir)]) == 0
    printed = capsys.readouterr().out
    assert "family         sdxl" in printed and "short side 1024" in printed


def _refused(folder, match):
    with pytest.raises(TokenFlowError, match=match) as error:
        check_model_source(str(folder))
    assert "\n" not in str(error.value)


def test_refiner_and_inpainting_folders_are_refused(xl_dir, tmp_path):
    refiner = shutil.copytree(xl_dir, tmp_path / "refiner")
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(text_encoder=[None, None], requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    _refused(refiner, "SDXL refiner")
    inpaint = shutil.copytree(xl_dir, tmp_path / "inpaint")
    unet = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**unet, "in_channels": 9}))
    _refused(inpaint, "SDXL inpainting model")


@pytest.mark.parametrize(
    ("name", "conditioner", "channels", "match"),
    [
        ("sd_xl_refiner", "conditioner.embedders.0.model.text_projection", 4, "SDXL refiner"),
        ("inpainting", "conditioner.embedders.1.model.positional_embedding", 9, "9 input channels"),
    ],
)
def test_refiner_and_inpainting_checkpoints_are_refused(
    tmp_path, name, conditioner, channels, match
):
    path = tmp_path / f"{name}.safetensors"
    first_conv = torch.zeros(4, channels, 1, 1)
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({unet: first_conv, conditioner: torch.zeros(2, 2)}, str(path))
    for check in (check_model_source, load_model):
        with pytest.raises(TokenFlowError, match=match) as error:
            check(str(path))
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_replacement_vae_runs_in_its_own_precision_and_must_match_the_family(tmp_path):
    safe = make_tiny_sdxl().vae
    safe.register_to_config(force_upcast=False)  # says it is fp16-safe, like sdxl-vae-fp16-fix
    safe.save_pretrained(tmp_path / "safe")
    model = StableDiffusionXL.from_parts(make_tiny_sdxl(), device="cpu", dtype=torch.float16)
    before = model.fingerprint()
    model.add(vae=str(tmp_path / "safe"))
    assert model.vae.dtype == torch.float16 and model.addons["vae"] == str(tmp_path / "safe")
    assert model.fingerprint() != before
    make_tiny_sd().vae.save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(TokenFlowError, match="scales latents by 0.18215"):
        model.add(vae=str(tmp_path / "sd-vae"))
