"""Progress reporting from the library to whoever runs it (CLI bars, the web UI, a script).

The library never draws anything: each long stage reports ``(stage, done, total)`` to a
``ProgressCallback`` after every unit of work (a decoded frame, a VAE call, a UNet call), and
the caller decides how to show it. Because the callback runs between calls, it is also where a
caller stops a job: raising ``Cancelled`` from it ends the job within one UNet or VAE call.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import TokenFlowError

#: ``callback(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished.
ProgressCallback = Callable[[str, int, int], None]

#: The stages of an edit, in order, and the unit each counts.
STAGES: dict[str, str] = {
    "read": "frame",  # decoding the source video
    "load": "part",  # loading the model's components
    "encode": "frame",  # VAE encoding
    "invert": "frame-step",  # DDIM inversion: frames x inversion steps
    "edit": "frame-step",  # denoising: frames x editing steps
    "decode": "frame",  # VAE decoding
    "write": "frame",  # writing the output videos and frames
}


class Cancelled(TokenFlowError):
    """The job was stopped on request (Ctrl-C, SIGTERM, a cancel button)."""

    exit_code = 130


class StageProgress:
    """Counts one stage's units and reports them; a no-op without a callback."""

    def __init__(self, callback: ProgressCallback | None, stage: str, total: int) -> None:
        self.callback = callback
        self.stage = stage
        self.total = int(total)
        self.done = 0
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.stage, self.done, self.total)

    def advance(self, units: int = 1) -> None:
        self.done += int(units)
        self._report()

    def finish(self) -> None:
        """Mark the stage complete (a cache hit or an early end skips the remaining units)."""
        if self.done != self.total:
            self.done = self.total
            self._report()


def stage_callback(callback: ProgressCallback | None, stage: str) -> Callable[[int, int], None]:
    """``callback`` bound to one stage, for code that reports a single stage as (done, total)."""

    def report(done: int, total: int) -> None:
        if callback is not None:
            callback(stage, done, total)

    return report
