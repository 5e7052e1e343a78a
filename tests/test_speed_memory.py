"""Optimised computations equal the straightforward formula; long-video mode bounds its calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenflow.denoise
from tokenflow.attention import nearest_tokens, propagate_tokens
from tokenflow.context import AttentionMode, Propagation
from tokenflow.install import TokenFlowUNet
from tokenflow.keyframes import block_bounds, keyframe_windows, reference_propagation
from tokenflow.options import EditOptions
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.recordings import KeyframeRecordings

SMALL = dict(steps=3, inversion_steps=3, inversion_prompt="a wolf")


def _naive_nearest(features: torch.Tensor, keyframes: torch.Tensor) -> torch.Tensor:
    """argmax of the full cosine-similarity matrix, one keyframe at a time."""
    sims = [
        F.cosine_similarity(features[:, :, None], kf[None, None], dim=-1).argmax(-1)
        for kf in keyframes
    ]
    return torch.stack(sims, dim=-1)


@pytest.mark.parametrize("chunk_bytes", [64, 4096, 256 * 2**20])
def test_chunked_correspondences_equal_the_full_similarity_argmax(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, 8, generator=g)
    keyframes = torch.randn(2, 20, 8, generator=g)
    expected = _naive_nearest(features, keyframes)
    assert torch.equal(nearest_tokens(features, keyframes, chunk_bytes), expected)


def test_propagation_equals_the_per_frame_formula():
    g = torch.Generator().manual_seed(1)
    bounds = block_bounds(7, 3)
    features = torch.randn(3, 12, 4, generator=g)  # frames of block 1
    kf_features = torch.randn(3, 12, 4, generator=g)  # keyframes of the 3 blocks
    kf_tokens = torch.randn(3, 3, 12, 4, generator=g)  # (branches, K, tokens, dim)
    prop = reference_propagation(bounds, 1)
    out = propagate_tokens(features, kf_features, kf_tokens, prop, chunk_bytes=128)
    for i in range(3):
        a, b, w = int(prop.slot_a[i]), int(prop.slot_b[i]), float(prop.weight_a[i])
        ia = _naive_nearest(features[i : i + 1], kf_features[a : a + 1])[0, :, 0]
        ib = _naive_nearest(features[i : i + 1], kf_features[b : b + 1])[0, :, 0]
        expected = w * kf_tokens[:, a, ia] + (1 - w) * kf_tokens[:, b, ib]
        torch.testing.assert_close(out[:, i], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("count,cap,overlap", [(6, 4, 2), (13, 5, 2), (13, 3, 1), (40, 8, 3)])
def test_keyframe_windows_cover_every_block_within_the_cap(count, cap, overlap):
    bounds = block_bounds(count, 1)
    props = [reference_propagation(bounds, b) for b in range(count)]
    windows = keyframe_windows(props, cap, overlap)
    assert sorted(b for w in windows for b in w.blocks) == list(range(count))
    for w in windows:
        assert len(w.slots) <= cap and w.slots[0] == 0 and w.slots == sorted(set(w.slots))
        for b in w.blocks:
            local = w.local(props[b])
            # the local slots point at the same keyframes as the global ones
            assert [w.slots[s] for s in local.slot_a.tolist()] == props[b].slot_a.tolist()
            assert [w.slots[s] if s >= 0 else -1 for s in local.slot_b.tolist()] == (
                props[b].slot_b.tolist()
            )
            assert torch.equal(local.weight_a, props[b].weight_a)


def test_no_cap_or_a_cap_above_the_keyframe_count_is_one_window():
    props = [reference_propagation(block_bounds(5, 2), b) for b in range(3)]
    for cap in (0, 3, 10):
        (window,) = keyframe_windows(props, cap)
        assert window.slots == window.blocks == [0, 1, 2]
        assert window.local(props[2]) is props[2]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return TokenFlowPipeline(tiny_model)


@pytest.fixture(scope="module")
def inversion(pipe, wolf_frames):
    return pipe.invert(
        pipe.encode_frames(wolf_frames), inversion_prompt="a wolf", inversion_steps=3, steps=3
    )


def test_long_video_mode_with_a_large_cap_is_reference_mode_exactly(pipe, wolf_frames, inversion):
    kwargs = dict(prompt="a fox", block_size=2, inversion=inversion, **SMALL)
    reference = pipe(wolf_frames, **kwargs)
    capped = pipe(wolf_frames, max_keyframes=3, keyframe_overlap=1, **kwargs)  # K = 3
    assert torch.equal(reference.latents, capped.latents)
    assert reference.unet_evaluations == capped.unet_evaluations


def test_long_video_mode_never_edits_more_keyframes_per_call_than_the_cap(
    pipe, wolf_frames, inversion, monkeypatch
):
    keyframe_batches: list[int] = []
    original_call = TokenFlowUNet.__call__

    def counting_call(self, latents, t, text, call, **kw):
        if call.mode is AttentionMode.EXTENDED:
            keyframe_batches.append(latents.shape[0] // call.branches)
        return original_call(self, latents, t, text, call, **kw)

    monkeypatch.setattr(TokenFlowUNet, "__call__", counting_call)
    result = pipe(wolf_frames, prompt="a fox", block_size=1, max_keyframes=4,
                       inversion=inversion, **SMALL)  # fmt: skip
    assert result.frames.shape == wolf_frames.shape
    assert torch.isfinite(result.latents).all()
    assert max(keyframe_batches) == 4 and len(keyframe_batches) == 3 * 3  # 3 windows, 3 steps
    # every frame still gets exactly one propagated pass per step
    assert result.unet_evaluations["propagation"] == 3 * len(wolf_frames) * 3


def test_a_cap_too_small_for_the_overlap_is_refused(pipe, wolf_frames, inversion):
    from tokenflow.errors import TokenFlowError

    with pytest.raises(TokenFlowError, match="max_keyframes"):
        pipe(wolf_frames, prompt="a fox", max_keyframes=3, inversion=inversion, **SMALL)


def test_window_local_propagation_handles_single_keyframe_blocks():
    window = keyframe_windows(
        [reference_propagation(block_bounds(10, 1), b) for b in range(10)], 4, 1
    )[1]
    prop = Propagation(torch.tensor([window.slots[1]]), torch.tensor([-1]), torch.ones(1))
    assert window.local(prop).slot_b.tolist() == [-1]
    assert window.local(prop).slot_a.tolist() == [1]


def test_feed_forward_slices_change_results_by_rounding_only(
    pipe, wolf_frames, inversion, monkeypatch
):
    kwargs = dict(prompt="a fox", block_size=2, inversion=inversion, **SMALL)
    ff = next(m for name, m in pipe.model.unet.named_modules() if name.endswith(".ff"))
    calls: list[int] = []
    hook = ff.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    try:
        monkeypatch.setattr(TokenFlowUNet, "feed_forward_slice", 10**6)  # one slice: unsliced
        whole = pipe(wolf_frames, **kwargs)
        whole_calls, calls[:] = list(calls), []
        monkeypatch.setattr(TokenFlowUNet, "feed_forward_slice", 1)  # one frame per slice
        sliced = pipe(wolf_frames, **kwargs)
    finally:
        hook.remove()
    assert set(calls) == {1} and sum(calls) == sum(whole_calls) > len(whole_calls)
    torch.testing.assert_close(sliced.latents, whole.latents, rtol=0, atol=1e-3)
    # and the UNet's own setting is back after the edit
    blocks = [m for m in pipe.model.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    assert blocks and all(getattr(m, "_chunk_size", None) is None for m in blocks)


def test_spilled_keyframe_recordings_leave_the_edit_bit_identical(
    pipe, wolf_frames, inversion, monkeypatch
):
    kwargs = dict(prompt="a fox", block_size=2, inversion=inversion, **SMALL)
    spilled: list[int] = []
    original_clear = KeyframeRecordings.clear

    def noting_clear(self):
        spilled.append(self.spilled_bytes)
        original_clear(self)

    monkeypatch.setattr(KeyframeRecordings, "clear", noting_clear)
    for joint_keyframes in (8, 0):  # the joint pass, and the source branch recorded apart
        monkeypatch.setattr(tokenflow.denoise, "JOINT_KEYFRAMES", joint_keyframes)
        in_memory = pipe(wolf_frames, keyframe_memory=10**6, **kwargs)  # a terabyte: no spill
        assert max(spilled) == 0
        on_disk = pipe(wolf_frames, keyframe_memory=0, **kwargs)
        assert max(spilled) > 0
        spilled.clear()
        assert torch.equal(on_disk.latents, in_memory.latents)


def test_keyframe_pass_per_branch_matches_the_joint_pass(
    pipe, wolf_frames, inversion, monkeypatch, trace
):
    kwargs = dict(prompt="a fox", block_size=2, inversion=inversion, **SMALL)
    batches: list[tuple[int, ...]] = []
    original_call = TokenFlowUNet.__call__

    def noting_call(self, latents, t, text, call, **kw):
        if call.record:
            batches.append((call.first_branch, call.branches, latents.shape[0]))
        return original_call(self, latents, t, text, call, **kw)

    monkeypatch.setattr(TokenFlowUNet, "__call__", noting_call)
    joint = pipe(wolf_frames, **kwargs)  # 3 keyframes: one call of 3 x 3
    joint_trace, joint_batches = set(trace), list(batches)
    trace.clear()
    batches.clear()
    monkeypatch.setattr(tokenflow.denoise, "JOINT_KEYFRAMES", 2)
    split = pipe(wolf_frames, **kwargs)
    assert joint_batches == [(0, 3, 9)] * 3
    assert batches == [(0, 1, 3), (1, 1, 3), (2, 1, 3)] * 3  # source, uncond, cond, each step
    # the same injections and recordings, at the same steps and layers
    assert set(trace) == joint_trace and {kind for _, kind, _ in trace} == {
        "record",
        "qk",
        "residual",
    }
    assert split.unet_evaluations == joint.unet_evaluations
    assert split.keyframes == joint.keyframes
    torch.testing.assert_close(split.latents, joint.latents, rtol=0, atol=1e-3)


def test_vae_batches_are_a_memory_setting_not_a_result(pipe, wolf_frames, monkeypatch):
    monkeypatch.setattr(pipe, "vae_batch_size", len(wolf_frames))
    latents = pipe.encode_frames(wolf_frames)
    pixels = pipe.decode_latents(latents)
    monkeypatch.setattr(pipe, "vae_batch_size", 2)
    torch.testing.assert_close(pipe.encode_frames(wolf_frames), latents, rtol=0, atol=1e-5)
    difference = pixels.astype(int) - pipe.decode_latents(latents).astype(int)
    assert np.abs(difference).max() <= 1


def test_compiled_regions_leave_tokenflow_layers_acting(wolf_frames, trace):
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.layers import find_layers
    from tokenflow.testing import make_tiny_sd

    # a model of its own: compiling is permanent, the session's tiny model stays eager
    fresh = TokenFlowPipeline(StableDiffusion.from_parts(make_tiny_sd()))
    frames = wolf_frames[:3]
    kwargs = dict(prompt="a fox", block_size=2, steps=2, inversion_steps=2)
    eager = fresh(frames, **kwargs)
    eager_trace = list(trace)
    trace.clear()

    unet = fresh.model.unet
    resnets = sum(
        len(block.resnets) for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
    )
    transformer_blocks = len(find_layers(unet).self_attention)
    # dynamo's "eager" backend captures the graphs without generating code: fast on a CPU, and
    # it runs the captured ops exactly, so any difference would come from what was captured
    compiled = fresh.compile(backend="eager")
    assert compiled == (resnets - 1) + 2 * transformer_blocks  # not the injection resnet
    result = fresh(frames, **kwargs)
    assert torch.equal(result.latents, eager.latents)
    assert trace == eager_trace  # injections and recordings still happen, in the same places


@pytest.mark.parametrize(
    "frames,settings,noted",
    [
        (136, {}, True),  # 17 keyframes edited jointly
        (128, {}, False),  # 16: the threshold
        (136, {"max_keyframes": 8}, False),  # long-video mode already
        (136, {"baseline": "per-frame"}, False),  # no keyframe pass
        (136, {"baseline": "fixed-keyframes"}, True),
        (40, {"block_size": 2}, True),
    ],
)
def test_long_clips_in_reference_mode_point_to_the_long_video_mode(frames, settings, noted):
    from tokenflow.job import _note_joint_keyframes

    lines: list[str] = []
    _note_joint_keyframes(EditOptions(**settings), frames, lines.append)
    assert bool(lines) == noted
    assert all("`max_keyframes` 16" in line for line in lines)
