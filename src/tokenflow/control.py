"""ControlNet conditioning for every UNet call (inversion and all three editing branches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .families.base import Conditioning

#: Extra UNet keyword arguments (ControlNet residuals) for a batch:
#: ``control(latents, t, conditioning, frames)``, where ``frames`` holds, for every batch
#: element, the index of its source frame, so each branch gets its own frame's control image.
ControlCondition = Callable[
    [torch.Tensor, torch.Tensor, Conditioning, torch.Tensor], dict[str, Any]
]
