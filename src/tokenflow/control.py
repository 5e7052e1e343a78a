"""ControlNet conditioning for every UNet call (inversion and all three editing branches)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .families.base import Conditioning


class ControlCondition(Protocol):
    """Extra UNet keyword arguments (ControlNet residuals) for a batch of frames.

    ``frames`` holds, for every batch element, the index of its source frame, so the right
    control image is used in each branch.
    """

    def __call__(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        frames: torch.Tensor,
    ) -> dict[str, object]: ...
