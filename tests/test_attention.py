"""Extended attention, correspondences and propagation against plain formulas written here."""

from __future__ import annotations

import pytest
import torch

from tokenflow.attention import (
    extended_attention,
    frame_attention,
    nearest_tokens,
    propagate_tokens,
)
from tokenflow.context import Propagation


def plain_attention(q, k, v, heads, scale):
    """softmax(q k^T * scale) v per head, with einsum: the textbook formula."""
    n, t, c = q.shape
    d = c // heads
    qh = q.view(n, t, heads, d)
    kh = k.view(k.shape[0], k.shape[1], heads, d)
    vh = v.view(v.shape[0], v.shape[1], heads, d)
    scores = torch.einsum("nqhd,nkhd->nhqk", qh, kh) * scale
    return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), vh).reshape(n, t, c)


def qkv(frames=3, tokens=10, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(frames, tokens, channels, generator=g, dtype=torch.float64) for _ in range(3)
    ]


def test_extended_attention_over_one_keyframe_is_self_attention():
    q, k, v = qkv(frames=1)
    expected = plain_attention(q, k, v, heads=4, scale=0.5)
    torch.testing.assert_close(extended_attention(q, k, v, 4, 0.5), expected)
    torch.testing.assert_close(frame_attention(q, k, v, 4, 0.5), expected)


@pytest.mark.parametrize("chunk", [0, 7])
def test_extended_attention_attends_to_concatenated_keys_and_values(chunk):
    q, k, v = qkv(frames=3)
    # every frame's queries against the keys/values of all frames, concatenated on the token axis
    k_all = k.reshape(1, -1, k.shape[-1]).expand(3, -1, -1)
    v_all = v.reshape(1, -1, v.shape[-1]).expand(3, -1, -1)
    expected = plain_attention(q, k_all, v_all, heads=4, scale=0.25)
    torch.testing.assert_close(extended_attention(q, k, v, 4, 0.25, chunk_tokens=chunk), expected)
    # and it is not the per-frame attention
    assert not torch.allclose(frame_attention(q, k, v, 4, 0.25), expected)


def test_nearest_tokens_recovers_a_shift_of_the_source_features():
    """Frames that are shifted copies of one feature map map to the shifted token."""
    g = torch.Generator().manual_seed(1)
    h = w = 12
    canvas = torch.randn(h, w + 8, 32, generator=g)
    frames = torch.stack([canvas[:, s : s + w] for s in range(4)]).reshape(4, h * w, 32)
    key = frames[:1]  # frame 0 is the keyframe
    index = nearest_tokens(frames, key, chunk_bytes=4096)[..., 0]  # chunked on purpose
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for shift in range(4):
        inside = (cols + shift) < w  # tokens whose content is inside the keyframe
        expected = (rows * w + cols + shift)[inside]
        assert torch.equal(index[shift].view(h, w)[inside], expected)


def test_propagation_gathers_and_blends_recorded_tokens():
    g = torch.Generator().manual_seed(2)
    keyframe_features = torch.randn(2, 6, 8, generator=g)
    keyframe_tokens = torch.randn(3, 2, 6, 8, generator=g)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    # frame 0 reuses keyframe 0's features permuted; frame 1 blends keyframes 1 and 0
    features = torch.stack([keyframe_features[0, perm], keyframe_features[1, perm]])
    prop = Propagation(torch.tensor([0, 1]), torch.tensor([-1, 0]), torch.tensor([1.0, 0.7]))
    out = propagate_tokens(features, keyframe_features, keyframe_tokens, prop)
    torch.testing.assert_close(out[:, 0], keyframe_tokens[:, 0, perm])
    nn_in_0 = nearest_tokens(features[1:], keyframe_features[:1])[0, :, 0]
    expected = 0.7 * keyframe_tokens[:, 1, perm] + 0.3 * keyframe_tokens[:, 0, nn_in_0]
    torch.testing.assert_close(out[:, 1], expected)


def test_unet_source_features_give_the_shift_of_shifted_frames(tiny_model):
    """Correspondences from the UNet's own first self-attention inputs follow a known shift."""
    from tokenflow.context import AttentionMode, UNetCall
    from tokenflow.families import Conditioning
    from tokenflow.install import TokenFlowUNet

    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(1, 4, 16, 22, generator=g)
    shifts = [0, 1, 2, 3]
    latents = torch.cat([canvas[..., s : s + 16] for s in shifts])  # frame f = frame 0 moved by -f
    text = Conditioning(torch.zeros(4 * 3, 77, 32))
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    with torch.no_grad(), TokenFlowUNet(tiny_model.unet) as unet:
        call = UNetCall(AttentionMode.EXTENDED, branches=3, has_source=True, record=True)
        unet(latents.repeat(3, 1, 1, 1), torch.tensor(501), text, call)
        features = unet.context.recordings.get(layer, "features")  # (4, 256, dim): source inputs
    index = nearest_tokens(features, features[:1])[..., 0]
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    margin = 3  # conv_in + one resnet: features depend on a 7x7 neighbourhood
    for f, s in enumerate(shifts):
        inside = (
            (rows >= margin) & (rows < 16 - margin) & (cols >= margin) & (cols + s < 16 - margin)
        )
        expected = (rows * 16 + cols + s)[inside]
        assert torch.equal(index[f].view(16, 16)[inside], expected)
