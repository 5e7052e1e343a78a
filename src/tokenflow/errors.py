"""User-facing errors.

A ``TokenFlowError`` is a mistake the user can fix (bad path, bad option, missing model). Front
ends print its message as one line without a traceback; anything else is a bug and keeps its
traceback.

The library names options, never CLI flags: an option name in a message is written in backticks
(```block_size` must be at least 1``). ``str()`` shows the bare name (for Python users);
``render`` lets each front end show it its own way (the CLI as ``--block-size``, the web UI as
the field's label).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARKED = re.compile(r"`([a-z][a-z0-9_]*)`")


def render_options(text: str, name: Callable[[str], str]) -> str:
    """``text`` with every marked option ``o`` shown as ``name(o)`` (also for notes and
    warnings, which name options the same way)."""
    from .options import FIELDS

    return _MARKED.sub(lambda m: name(m[1]) if m[1] in FIELDS else m[0], text)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, blank ends dropped ("" when it has none): one-line
    reports (the web UI's error, a rank's word to its peers) keep the gist, not a dump."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


class TokenFlowError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code: int = 2

    def render(self, name: Callable[[str], str]) -> str:
        return render_options(str(self.args[0]) if self.args else "", name)

    def __str__(self) -> str:
        return self.render(lambda option: option)


class NonFiniteError(TokenFlowError):
    """Latents or pixels became NaN/inf, typically an fp16 overflow."""
