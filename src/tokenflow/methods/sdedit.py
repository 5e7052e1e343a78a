"""SDEdit (Meng et al.): no injection; start part-way down the schedule, at ``strength``."""

from __future__ import annotations

from ..errors import TokenFlowError
from .base import EditMethod


class SDEdit(EditMethod):
    name = "sdedit"

    def first_step(self) -> int:
        """``strength`` 0.9 of 50 steps runs the last 45; the authors' slicing
        ``timesteps[int(1 - strength * S):]`` runs 44, kept as ``strength_compat``."""
        steps, strength = self.options.steps, self.options.strength
        first = (
            steps + int(1 - strength * steps)
            if self.options.strength_compat
            else steps - int(round(strength * steps))
        )
        if first >= steps:
            raise TokenFlowError(f"`strength` {strength} leaves no step to run; raise it")
        return first
