"""ControlNet conditioning: residuals reach every UNet call, control images, loading, the CLI."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from tokenflow.cli import main
from tokenflow.controlnet import ControlNetCondition, canny_images, control_images, load_control
from tokenflow.errors import TokenFlowError
from tokenflow.options import EditOptions
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.video import read_clip, write_frames

SMALL = dict(steps=2, inversion_steps=2, block_size=2, inversion_prompt="a wolf")


@pytest.fixture(scope="module")
def clip(data_dir):
    return read_clip(data_dir / "wolf.mp4", max_frames=5, size=(64, 64))


@pytest.fixture(scope="module")
def edges(clip):
    return canny_images(clip.frames)


class SpyCondition(ControlNetCondition):
    """Records the source frame indices of every ControlNet call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list[int]] = []

    def __call__(self, latents, t, text, frames):
        self.calls.append(frames.tolist())
        return super().__call__(latents, t, text, frames)


def test_residuals_reach_the_unet_in_every_branch_and_in_inversion(
    tiny_model, tiny_controlnet, clip, edges
):
    control = SpyCondition(tiny_controlnet, edges)
    pipe = TokenFlowPipeline(tiny_model)
    unet_calls: list[tuple[int, bool]] = []

    def spy(module, args, kwargs):
        down = kwargs.get("down_block_additional_residuals")
        mid = kwargs.get("mid_block_additional_residual")
        unet_calls.append((len(args[0]), down is not None and mid is not None))

    hook = tiny_model.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = pipe(clip.frames, prompt="a fox", control=control, **SMALL)
    finally:
        hook.remove()

    # every UNet call got ControlNet residuals, computed on the same batch
    assert all(with_residuals for _, with_residuals in unet_calls)
    assert [size for size, _ in unet_calls] == [len(frames) for frames in control.calls]
    inversion, editing = control.calls[:2], control.calls[2:]
    assert inversion == [[0, 1, 2, 3, 4]] * 2  # one batch of 5 frames per inversion step
    assert len(editing) == 2 * 4  # per step: keyframe pass + 3 blocks
    for step, kf in enumerate(result.keyframes):
        calls = editing[4 * step : 4 * step + 4]
        # three branches (source, uncond, cond), each with its own frames' control images
        assert calls[0] == kf * 3
        assert calls[1:] == [[0, 1] * 3, [2, 3] * 3, [4] * 3]
    assert control.evaluations == sum(result.unet_evaluations.values())


def test_control_images_and_scale_change_the_result_and_scale_zero_is_no_control(
    tiny_model, tiny_controlnet, clip, edges
):
    frames = clip.frames[:3]

    def edit(control):
        return TokenFlowPipeline(tiny_model)(frames, prompt="a fox", control=control, **SMALL)

    plain = edit(None)
    zero = edit(ControlNetCondition(tiny_controlnet, edges[:3], scale=0.0))
    canny = edit(ControlNetCondition(tiny_controlnet, edges[:3], scale=1.0))
    other = edit(ControlNetCondition(tiny_controlnet, 255 - edges[:3], scale=1.0))
    half = edit(ControlNetCondition(tiny_controlnet, edges[:3], scale=0.5))
    assert torch.equal(zero.latents, plain.latents)  # residuals x 0 add exactly nothing
    assert torch.equal(zero.inversion.final, plain.inversion.final)
    for a, b in [(canny, plain), (canny, other), (canny, half)]:
        assert not torch.allclose(a.latents, b.latents, atol=1e-3)
        assert not torch.equal(a.inversion.final, b.inversion.final)  # inversion is too


def test_canny_maps_match_cv2_canny_100_200(clip, tiny_controlnet):
    images = control_images(EditOptions(control="canny"), clip)
    expected = np.stack([cv2.Canny(frame, 100, 200) for frame in clip.frames])
    assert images.shape == (*clip.frames.shape[:3], 3) and images.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(images[..., channel], expected)
    assert set(np.unique(images)) <= {0, 255} and images.any()
    # what the ControlNet sees: 3 channels in [0, 1]
    x = ControlNetCondition(tiny_controlnet, images).condition(
        torch.tensor([1, 0]), torch.device("cpu"), torch.float32
    )
    assert x.shape == (2, 3, 64, 64)
    assert torch.equal(x[0, 0], torch.from_numpy(expected[1]).float() / 255)


def test_precomputed_control_folder_is_read_like_the_input_and_counts_must_match(
    tmp_path, data_dir, clip, edges
):
    config = EditOptions(input=str(data_dir / "wolf.mp4"), frames=5, size="64x64")
    good = tmp_path / "good"
    write_frames(good, edges)
    images = control_images(config.replace(control=str(good)), clip)
    assert np.array_equal(images, edges)

    short = tmp_path / "short"
    write_frames(short, edges[:3])
    with pytest.raises(TokenFlowError, match="3 frames but the input gives 5"):
        control_images(config.replace(control=str(short)), clip)
    with pytest.raises(TokenFlowError, match="choose canny, depth"):
        control_images(config.replace(control="edges"), clip)
    with pytest.raises(TokenFlowError, match="depth_model"):
        control_images(config.replace(control="depth"), clip)


def test_load_control_identity_and_errors(tiny_model, tiny_controlnet_dir, clip, tmp_path):
    config = EditOptions(controlnet=str(tiny_controlnet_dir), control="canny")
    control, identity = load_control(config, clip, tiny_model)
    assert isinstance(control, ControlNetCondition) and len(control) == len(clip)
    assert identity["controlnet"] == str(tiny_controlnet_dir) and identity["scale"] == 1.0
    assert len(identity["fingerprint"]) == 16 and identity["control"] == "canny"
    _, again = load_control(config, clip, tiny_model)
    assert again == identity
    _, scaled = load_control(config.replace(control_scale=0.5), clip, tiny_model)
    assert scaled["scale"] == 0.5 and scaled["images"] == identity["images"]
    _, looser = load_control(config.replace(canny_low=50), clip, tiny_model)
    assert looser["images"] != identity["images"]

    with pytest.raises(TokenFlowError, match="no such folder"):
        load_control(config.replace(controlnet=str(tmp_path / "missing")), clip, tiny_model)
    with pytest.raises(TokenFlowError, match="offline"):  # conftest sets HF_HUB_OFFLINE=1
        load_control(config.replace(controlnet="nobody/no-controlnet"), clip, tiny_model)


def test_cli_edit_with_controlnet_canny(
    tmp_path, data_dir, tiny_model_dir, tiny_controlnet_dir, tiny_edit_args
):
    out = tmp_path / "out"
    code = main(
        [
            "edit",
            str(data_dir / "wolf.mp4"),
            "--prompt",
            "a fox",
            "--model",
            str(tiny_model_dir),
            "--controlnet",
            str(tiny_controlnet_dir),
            "--control",
            "canny",
            "--out",
            str(out),
            *tiny_edit_args,
            "--no-cache",
        ]
    )
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "edited.mp4",
        "frames",
        "side_by_side.mp4",
        "run.json",
    }
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "pnp" and info["config"]["control"] == "canny"
    assert info["controlnet"] == str(tiny_controlnet_dir)  # conditioning, with any method
    # 5 frames, blocks of 2 (3 keyframes), 4 steps, 8 inversion steps, 3 branches
    assert info["unet_frame_evaluations"] == {
        "inversion": 5 * 8,
        "keyframes": 3 * 3 * 4,
        "propagation": 3 * 5 * 4,
    }
    assert "control" in info["timings_s"]


def test_depth_maps_from_a_depth_estimation_folder(tmp_path, clip):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
    )
    folder = tmp_path / "tiny-dpt"
    DPTForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(
        folder
    )
    settings = EditOptions(control="depth", depth_model=str(folder))
    images = control_images(settings, clip)
    assert images.shape == (*clip.frames.shape[:3], 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])
    # normalised per frame to the full [0, 1] range (stored as 0..255)
    assert (images.reshape(len(images), -1).min(1) == 0).all()
    assert (images.reshape(len(images), -1).max(1) == 255).all()
    assert np.array_equal(images, control_images(settings, clip))
    with pytest.raises(TokenFlowError, match="no such folder"):
        control_images(settings.replace(depth_model=str(tmp_path / "none")), clip)
