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

    When a pass runs its branches in several calls (the source in the first), the source's
    output here is kept in the context's ``pass_source`` for the edited branches' later calls.
    """

    def __init__(self, context: TokenFlowContext, layer: str) -> None:
        self.context = context
        self.layer = layer

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        call = self.context.call
        if not call.inject_residual:
            return None
        n = output.shape[0] // call.branches
        key = (self.layer, "residual")
        if call.keep_source:  # for the edited branches' later calls; a copy, not a batch view
            self.context.pass_source[key] = output[:n] if n == len(output) else output[:n].clone()
        if not call.edits:
            return None
        source = output[:n] if call.has_source else self.context.pass_source[key]
        self.context.log("residual", self.layer)
        return source.repeat(call.branches, 1, 1, 1)
