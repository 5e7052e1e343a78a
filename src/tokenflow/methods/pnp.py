"""Plug-and-Play (Tumanyan et al.): the edited branches take the source's features early on."""

from __future__ import annotations

from .base import EditMethod, Injection


class PnP(EditMethod):
    """Query/key injection for the first ``pnp_attn_t`` of the steps, residual injection for
    the first ``pnp_f_t`` (the authors' 0.5 and 0.8 of 50 steps: 25 and 40)."""

    name = "pnp"

    def injection(self, step: int) -> Injection:
        steps = self.options.steps
        qk_steps = int(steps * self.options.pnp_attn_t)
        residual_steps = int(steps * self.options.pnp_f_t)
        return Injection(qk=step < qk_steps, residual=step < residual_steps)
