"""Attach TokenFlow to a UNet through diffusers' public hooks, and take it off again.

Self-attention behaviour goes in through ``unet.set_attn_processor`` and residual injection
through a forward hook, so the model's classes and ``forward`` methods stay untouched and the
UNet is restored exactly by ``detach()``.

The transformer blocks' feed-forward runs in slices of a few frames (diffusers'
``set_chunk_feed_forward``): its GEGLU intermediate is 8x the hidden size, and the keyframe pass
of a long clip has three batch entries per keyframe, so unsliced it would be the largest
temporary of the whole edit. Frames are independent there, so slicing changes results by float
rounding at most (a matrix product may sum in another order for another row count).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import TokenFlowAttnProcessor
from .context import TokenFlowContext, UNetCall
from .families.base import Conditioning
from .injection import ResidualInjection
from .layers import TokenFlowLayers, find_layers
from .recordings import KeyframeRecordings


def _largest_divisor(n: int, cap: int) -> int:
    return next(d for d in range(min(n, cap), 0, -1) if n % d == 0)


class TokenFlowUNet:
    """A UNet with TokenFlow's processors and hook attached; call it with a ``UNetCall``."""

    # most batch entries per feed-forward slice (see the module docstring): a block pass of
    # 8 frames x 3 branches stays one slice, so common runs compute exactly as unsliced; only
    # larger calls (the keyframe pass of long clips) are cut
    feed_forward_slice = 24

    def __init__(
        self,
        unet: nn.Module,
        layers: TokenFlowLayers | None = None,
        keyframe_memory: float = math.inf,
    ) -> None:
        """``keyframe_memory``: bytes of keyframe recordings kept in memory (see recordings.py)."""
        self.unet = unet
        self.layers = layers or find_layers(unet)
        self.context = TokenFlowContext(recordings=KeyframeRecordings(keyframe_memory))
        self.evaluations = 0  # frames (batch elements) pushed through the UNet
        self._original = unet.attn_processors
        processors = dict(self._original)
        for name in self.layers.self_attention:
            processors[f"{name}.processor"] = TokenFlowAttnProcessor(
                self.context, name, name in self.layers.qk_injection
            )
        unet.set_attn_processor(processors)
        resnet = unet.get_submodule(self.layers.residual_injection)
        self._hook = resnet.conv2.register_forward_hook(
            ResidualInjection(self.context, self.layers.residual_injection)
        )
        # each transformer block with its own feed-forward chunking, restored by ``detach``
        self._transformer_blocks = [
            (m, getattr(m, "_chunk_size", None), getattr(m, "_chunk_dim", 0))
            for m in unet.modules()
            if hasattr(m, "set_chunk_feed_forward")
        ]

    def __call__(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        call: UNetCall,
        **unet_kwargs,
    ) -> torch.Tensor:
        """Noise prediction for ``latents`` under the behaviour described by ``call``;
        ``unet_kwargs`` carry extra inputs such as ControlNet residuals."""
        if latents.shape[0] % call.branches:
            raise ValueError("batch is not a whole number of branches")
        self.context.call = call
        if call.propagation is not None:
            # the plan's host-side work, once per call, before any layer (compiled or not) runs
            call.propagation.compact()[1].on(latents.device, self.unet.dtype)
        self.evaluations += latents.shape[0]
        self._slice_feed_forward(latents.shape[0])
        try:
            inputs = conditioning.unet_kwargs()
            return self.unet(latents, t, **inputs, **unet_kwargs).sample
        finally:
            self.context.call = UNetCall()

    def _slice_feed_forward(self, batch: int) -> None:
        chunk = _largest_divisor(batch, self.feed_forward_slice)
        chunk = None if chunk == batch else chunk  # one slice: the plain path, no extra copy
        for block, _, _ in self._transformer_blocks:
            block.set_chunk_feed_forward(chunk, 0)

    def clear_keyframes(self) -> None:
        """Drop the recorded keyframe tokens (they can be large)."""
        self.context.recordings.clear()

    def detach(self) -> None:
        """Restore the UNet's original processors and remove the hook."""
        self.context.recordings.close()
        self.unet.set_attn_processor(self._original)
        self._hook.remove()
        for block, size, dim in self._transformer_blocks:
            block.set_chunk_feed_forward(size, dim)

    def __enter__(self) -> TokenFlowUNet:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def compile_regions(unet: nn.Module, layers: TokenFlowLayers | None = None, **options) -> int:
    """``torch.compile`` the UNet's plain tensor code, leaving TokenFlow's layers eager.

    Regional compilation (as diffusers' ``compile_repeated_blocks``) chosen around TokenFlow:
    every resnet but the one whose ``conv2`` carries the residual-injection hook, and every
    transformer block's cross-attention and feed-forward. The self-attention processors stay
    eager: they branch on the call plan and gather along correspondences, which would break the
    graph or recompile at every change of mode. Returns the number of compiled modules.
    """
    layers = layers or find_layers(unet)
    # all resnets share one ``forward``, and dynamo caches one graph per parameter shape of it:
    # allow one per distinct resnet rather than falling back to eager after the default 8
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    compiled = 0
    for name, module in unet.named_modules():
        parent, _, index = name.rpartition(".")
        is_resnet = parent.endswith(".resnets") and index.isdigit()
        is_block_part = name.endswith((".attn2", ".ff"))
        if (is_resnet and name != layers.residual_injection) or is_block_part:
            module.compile(**options)
            compiled += 1
    return compiled
