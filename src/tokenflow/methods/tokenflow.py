"""TokenFlow: edit random keyframes jointly, propagate their tokens to every frame.

Each step draws one keyframe per block, edits the keyframes in one pass with extended attention
(or in windows of at most ``max_keyframes``, the long-video mode), and then denoises every
block with its self-attention replaced by tokens gathered from its keyframes along the source's
correspondences. The propagation rule (which keyframes, with which weights) is a strategy too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..context import AttentionMode
from ..keyframes import (
    KeyframeSampler,
    keyframe_windows,
    paper_propagation,
    reference_propagation,
)
from .base import Structure, UNetPass

if TYPE_CHECKING:
    from ..options import EditOptions

#: propagation rules by option value: ``rule(bounds, block, keyframes) -> Propagation``
PROPAGATION_RULES = {"reference": reference_propagation, "paper": paper_propagation}


class TokenFlow(Structure):
    baseline = None
    fixed_keyframes = False

    def __init__(self, n_frames: int, options: EditOptions) -> None:
        super().__init__(n_frames, options)
        self.sampler = KeyframeSampler(
            n_frames, options.block_size, options.seed, fixed=self.fixed_keyframes
        )
        self.rule = PROPAGATION_RULES[options.propagation]

    @property
    def counters(self) -> tuple[str, ...]:
        return ("keyframes", "propagation")

    def step(self) -> list[UNetPass]:
        keyframes = self.sampler.draw()
        self.keyframes.append(keyframes.tolist())
        blocks = range(len(self.bounds))
        propagations = [self.rule(self.bounds, b, keyframes) for b in blocks]
        windows = keyframe_windows(
            propagations, self.options.max_keyframes, self.options.keyframe_overlap
        )
        passes = []
        for window in windows:
            kf = keyframes[window.slots]
            passes.append(UNetPass("keyframes", kf, AttentionMode.EXTENDED))
            for b in window.blocks:
                frames = torch.arange(*self.bounds[b])
                local = window.local(propagations[b])
                passes.append(UNetPass("propagation", frames, AttentionMode.PROPAGATE, b, local))
        return passes


class FixedKeyframes(TokenFlow):
    """The "w/o random keyframes" ablation: keyframes at the block centres at every step."""

    baseline = "fixed-keyframes"
    fixed_keyframes = True


__all__ = ["PROPAGATION_RULES", "FixedKeyframes", "TokenFlow"]
