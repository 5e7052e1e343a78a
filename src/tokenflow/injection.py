"""PnP residual-feature injection, as a forward hook.

Plug-and-Play injects the source branch's spatial features into the edited branches in one
decoder resnet: the output of its residual branch (after ``conv2``, before the shortcut is added)
is replaced by the source's. A forward hook on that resnet's ``conv2`` does exactly this without
touching the resnet's ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from .context import TokenFlowContext


class ResidualInjection:
    """Forward hook for ``resnet.conv2``: edited branches take the source branch's output.

    When a keyframe pass runs the source branch alone first, its output here is recorded and
    the edited branches' calls that follow take it from the recordings.
    """

    def __init__(self, context: TokenFlowContext, layer: str) -> None:
        self.context = context
        self.layer = layer

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        call = self.context.call
        if not call.inject_residual:
            return None
        n = output.shape[0] // call.branches
        if not call.edits:  # the source alone: keep its features for the edited calls
            if call.record:
                self.context.recordings.put(self.layer, "residual", output)
            return None
        if call.has_source:
            source = output[:n]
        else:
            source = self.context.recordings.get(self.layer, "residual")
        self.context.log("residual", self.layer)
        return source.repeat(call.branches, 1, 1, 1)
