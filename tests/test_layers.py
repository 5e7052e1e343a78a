"""TokenFlow's layers are found from the UNet's structure, and attaching is reversible."""

from __future__ import annotations

import torch

from tokenflow.context import AttentionMode, UNetCall
from tokenflow.families import Conditioning
from tokenflow.install import TokenFlowUNet
from tokenflow.layers import find_layers


def test_layers_match_the_authors_choice_on_the_sd_layout(tiny_model):
    layers = find_layers(tiny_model.unet)
    assert len(layers.self_attention) == 16  # 6 down, 1 mid, 9 up
    expected_qk = [f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn1" for j in (1, 2)] + [
        f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1" for i in (2, 3) for j in range(3)
    ]
    assert list(layers.qk_injection) == expected_qk
    assert layers.residual_injection == "up_blocks.1.resnets.1"


def test_attach_and_detach_leave_the_unet_as_it_was(tiny_model):
    unet = tiny_model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    forward_before = type(unet.up_blocks[1].resnets[1]).forward
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text).sample
        with TokenFlowUNet(unet) as tf:
            # frame attention with one branch is ordinary self-attention: same prediction
            ours = tf(x, t, Conditioning(text), UNetCall(AttentionMode.FRAME, branches=1))
        after = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, plain)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert type(unet.up_blocks[1].resnets[1]).forward is forward_before
    assert not unet.up_blocks[1].resnets[1].conv2._forward_hooks
