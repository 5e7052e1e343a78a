"""User-facing errors.

A ``TokenFlowError`` is a mistake the user can fix (bad path, bad option, missing model). The CLI
prints its message as one line and exits non-zero without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class TokenFlowError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code: int = 2


class NonFiniteError(TokenFlowError):
    """Latents or pixels became NaN/inf, typically an fp16 overflow."""
