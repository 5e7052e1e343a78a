"""Optimised computations equal the straightforward formula; long-video mode bounds its calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenflow.attention import nearest_tokens, propagate_tokens
from tokenflow.context import AttentionMode, Propagation
from tokenflow.editor import TokenFlowPipeline
from tokenflow.install import TokenFlowUNet
from tokenflow.keyframes import block_bounds, keyframe_windows, reference_propagation

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
    return TokenFlowPipeline(tiny_model, progress=False)


@pytest.fixture(scope="module")
def inversion(pipe, wolf_frames):
    return pipe.invert(pipe.encode_frames(wolf_frames), "a wolf", inversion_steps=3, steps=3)


def test_long_video_mode_with_a_large_cap_is_reference_mode_exactly(pipe, wolf_frames, inversion):
    kwargs = dict(prompt="a fox", block_size=2, inversion=inversion, **SMALL)
    reference = pipe.edit(wolf_frames, **kwargs)
    capped = pipe.edit(wolf_frames, max_keyframes=3, keyframe_overlap=1, **kwargs)  # K = 3
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
    result = pipe.edit(wolf_frames, prompt="a fox", block_size=1, max_keyframes=4,
                       inversion=inversion, **SMALL)  # fmt: skip
    assert result.frames.shape == wolf_frames.shape
    assert torch.isfinite(result.latents).all()
    assert max(keyframe_batches) == 4 and len(keyframe_batches) == 3 * 3  # 3 windows, 3 steps
    # every frame still gets exactly one propagated pass per step
    assert result.unet_evaluations["propagation"] == 3 * len(wolf_frames) * 3


def test_a_cap_too_small_for_the_overlap_is_refused(pipe, wolf_frames, inversion):
    from tokenflow.errors import TokenFlowError

    with pytest.raises(TokenFlowError, match="max-keyframes"):
        pipe.edit(wolf_frames, prompt="a fox", max_keyframes=3, inversion=inversion, **SMALL)


def test_window_local_propagation_handles_single_keyframe_blocks():
    window = keyframe_windows(
        [reference_propagation(block_bounds(10, 1), b) for b in range(10)], 4, 1
    )[1]
    prop = Propagation(torch.tensor([window.slots[1]]), torch.tensor([-1]), torch.ones(1))
    assert window.local(prop).slot_b.tolist() == [-1]
    assert window.local(prop).slot_a.tolist() == [1]
