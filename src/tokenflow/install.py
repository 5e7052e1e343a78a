"""Attach TokenFlow to a UNet through diffusers' public hooks, and take it off again.

Self-attention behaviour goes in through ``unet.set_attn_processor`` and residual injection
through a forward hook, so the model's classes and ``forward`` methods stay untouched and the
UNet is restored exactly by ``detach()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import TokenFlowAttnProcessor
from .context import TokenFlowContext, UNetCall
from .injection import ResidualInjection
from .layers import TokenFlowLayers, find_layers


class TokenFlowUNet:
    """A UNet with TokenFlow's processors and hook attached; call it with a ``UNetCall``."""

    def __init__(self, unet: nn.Module, layers: TokenFlowLayers | None = None) -> None:
        self.unet = unet
        self.layers = layers or find_layers(unet)
        self.context = TokenFlowContext()
        self.evaluations = 0  # frames (batch elements) pushed through the UNet
        self._original = unet.attn_processors
        processors = dict(self._original)
        self.processors: dict[str, TokenFlowAttnProcessor] = {}
        for name in self.layers.self_attention:
            proc = TokenFlowAttnProcessor(self.context, name, name in self.layers.qk_injection)
            processors[f"{name}.processor"] = proc
            self.processors[name] = proc
        unet.set_attn_processor(processors)
        resnet = unet.get_submodule(self.layers.residual_injection)
        self._hook = resnet.conv2.register_forward_hook(
            ResidualInjection(self.context, self.layers.residual_injection)
        )

    def __call__(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        call: UNetCall,
        **unet_kwargs,
    ) -> torch.Tensor:
        """Noise prediction for ``latents`` under the behaviour described by ``call``."""
        if latents.shape[0] % call.branches:
            raise ValueError("batch is not a whole number of branches")
        self.context.call = call
        self.evaluations += latents.shape[0]
        try:
            return self.unet(latents, t, encoder_hidden_states=text, **unet_kwargs).sample
        finally:
            self.context.call = UNetCall()

    def clear_keyframes(self) -> None:
        """Drop the recorded keyframe tokens (they can be large)."""
        for proc in self.processors.values():
            proc.clear()

    def detach(self) -> None:
        """Restore the UNet's original processors and remove the hook."""
        self.clear_keyframes()
        self.unet.set_attn_processor(self._original)
        self._hook.remove()

    def __enter__(self) -> TokenFlowUNet:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
