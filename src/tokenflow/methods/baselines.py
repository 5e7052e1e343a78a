"""The paper's baselines without propagation: one UNet call per block, no keyframes."""

from __future__ import annotations

import torch

from ..context import AttentionMode
from .base import Structure, UNetPass


class _BlockwiseBaseline(Structure):
    mode: AttentionMode

    def step(self) -> list[UNetPass]:
        return [
            UNetPass("blocks", torch.arange(s, e), self.mode, block)
            for block, (s, e) in enumerate(self.bounds)
        ]


class PerFrame(_BlockwiseBaseline):
    """Each frame edited alone (per-frame PnP): plain self-attention within every frame."""

    baseline = "per-frame"
    mode = AttentionMode.FRAME


class ExtendedAttention(_BlockwiseBaseline):
    """Joint (extended) attention over each block's frames, no propagation."""

    baseline = "extended-attention"
    mode = AttentionMode.EXTENDED
