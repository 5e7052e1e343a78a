"""What the denoising loop asks of an editing method and of a TokenFlow structure.

Two small strategies answer it, each a class in this package:

* an ``EditMethod`` (PnP, SDEdit) says where denoising starts and, at each step, which of the
  source branch's features are injected into the edited branches;
* a ``Structure`` (TokenFlow and the paper's baselines) says which UNet calls a step makes, on
  which frames and with which attention mode: TokenFlow's keyframe pass with extended
  attention followed by propagated block passes, or one plain/extended pass per block.

A new method or baseline is one new class with a ``name``; ``tokenflow.methods`` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..context import AttentionMode, Propagation
from ..keyframes import block_bounds

if TYPE_CHECKING:
    from ..distributed.plan import KeyframeShare
    from ..options import EditOptions


@dataclass(frozen=True)
class Injection:
    """Which source features the edited branches take at one step (Plug-and-Play)."""

    qk: bool = False  # queries/keys of the PnP self-attention layers
    residual: bool = False  # the residual features of the PnP resnet


class EditMethod:
    """How an edit is driven: its first step and its injection schedule."""

    name: ClassVar[str] = ""

    def __init__(self, options: EditOptions) -> None:
        self.options = options

    def first_step(self) -> int:
        """Index of the first of the ``options.steps`` editing steps to run."""
        return 0

    def injection(self, step: int) -> Injection:
        """The injection at the ``step``-th step run (counted from ``first_step``)."""
        return Injection()


@dataclass
class UNetPass:
    """One UNet call of a step: three branches (source, uncond, cond) of ``frames``."""

    kind: str  # "keyframes", "propagation" or "blocks": how its evaluations are counted
    frames: torch.Tensor
    mode: AttentionMode
    block: int | None = None  # the block it denoises; None: a keyframe pass (tokens recorded)
    propagation: Propagation | None = None
    # a keyframe pass split over ranks: this rank's part of it (distributed/plan.py)
    share: KeyframeShare | None = None

    @property
    def records(self) -> bool:
        return self.block is None


class Structure:
    """Which UNet calls each step makes; ``baseline`` is the option value that selects it
    (``None``: TokenFlow itself)."""

    baseline: ClassVar[str | None] = None

    def __init__(self, n_frames: int, options: EditOptions) -> None:
        self.bounds = block_bounds(n_frames, options.block_size)
        self.options = options
        self.keyframes: list[list[int]] = []  # the keyframes drawn at each step, if any

    def step(self) -> list[UNetPass]:  # pragma: no cover - per structure
        raise NotImplementedError

    @property
    def counters(self) -> tuple[str, ...]:
        """The evaluation counters this structure fills (run.json reports them)."""
        return ("blocks",)
