"""What the CLI shows while a job runs: a bar for the current stage, one overall line with the
elapsed time and an estimate of what is left, and a summary line per finished stage that stays.

Bars are drawn only on a terminal; in logs (a pipe, a file) only the summary lines appear. The
estimate counts the remaining work in UNet evaluations (an inversion frame-step is one, an
editing frame-step about three: source, unconditional, conditional, plus the keyframe share;
1 + 2P for P prompts in one run)
and prices it at the rate measured so far; VAE frames are priced at the encoder's measured
rate. Before any rate is measured it says so instead of guessing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from ..progress import STAGES


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """A ``ProgressCallback`` that draws on stderr (see the module docstring)."""

    def __init__(
        self,
        *,
        steps: int = 50,
        inversion_steps: int = 500,
        block_size: int = 8,
        prompts: int = 1,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.started = time.perf_counter()
        self.steps, self.inversion_steps = steps, inversion_steps
        # UNet evaluations per editing frame-step: the source and two branches per prompt, plus
        # the keyframe pass's share; each prompt's frames are decoded and written
        self.edit_weight = (1 + 2 * prompts) * (1 + 1 / max(block_size, 1))
        self.prompts = prompts
        self.frames: int | None = None
        self.stage: str | None = None
        self.stage_started = 0.0
        self.done: dict[str, tuple[int, int]] = {}
        self.seconds: dict[str, float] = {}
        self.bar: tqdm | None = None
        self.overall: tqdm | None = None

    # -- the callback -------------------------------------------------------------------------

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self._end_stage()
            self._start_stage(stage, total)
        self.done[stage] = (done, total)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
            self._refresh_overall()
        if done >= total:
            self._end_stage()

    def note(self, message: str) -> None:
        """A line above the bars (a note, a warning) that stays."""
        if self.enabled:
            self._write(message)

    def close(self) -> None:
        """Take the bars off the screen (summary lines stay), e.g. before an error line."""
        self._end_stage(summary=False)
        if self.overall is not None:
            self.overall.close()
            self.overall = None

    def finish(self) -> None:
        self.close()
        if self.enabled:
            self._write(f"done in {time.perf_counter() - self.started:.1f} s")

    # -- stages --------------------------------------------------------------------------------

    def _start_stage(self, stage: str, total: int) -> None:
        self.stage, self.stage_started = stage, time.perf_counter()
        if stage == "read" and total:
            self.frames = total
        if self.live:
            unit = STAGES.get(stage, "unit")
            self.bar = tqdm(
                total=total, desc=f"{stage:<7}", unit=unit, file=self.stream, leave=False,
                position=1, dynamic_ncols=True,
            )  # fmt: skip
            if self.overall is None:
                self.overall = tqdm(
                    total=1, bar_format="{desc}", file=self.stream, leave=False, position=0
                )

    def _end_stage(self, summary: bool = True) -> None:
        if self.stage is None:
            return
        stage, self.stage = self.stage, None
        seconds = time.perf_counter() - self.stage_started
        self.seconds[stage] = seconds
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        done, total = self.done.get(stage, (0, 0))
        if stage == "read":
            self.frames = done or self.frames
        if summary:
            self._write(self._summary(stage, done, total, seconds))

    def _summary(self, stage: str, done: int, total: int, seconds: float) -> str:
        unit = STAGES.get(stage, "unit")
        if total == 0:
            what = "skipped (inversion cache hit)" if stage == "invert" else "nothing to do"
            return f"{stage:<7} {what}"
        if stage == "load":
            return f"{stage:<7} model in {seconds:.1f} s"
        rate = f", {done / seconds:.1f} {unit}s/s" if seconds > 0 and done > 1 else ""
        plural = "" if done == 1 else "s"
        return f"{stage:<7} {done} {unit}{plural} in {seconds:.1f} s{rate}"

    # -- the overall line ------------------------------------------------------------------------

    def _refresh_overall(self) -> None:
        if self.overall is None:
            return
        elapsed = time.perf_counter() - self.started
        left = self.remaining()
        eta = "estimating" if left is None else _clock(left)
        self.overall.set_description_str(
            f"elapsed {_clock(elapsed)}  |  {self.stage}  |  left {eta}", refresh=True
        )

    def _rate(self, stage: str) -> float | None:
        """Seconds per unit of ``stage`` measured so far (the current stage included)."""
        done = self.done.get(stage, (0, 0))[0]
        if stage == self.stage:
            seconds = time.perf_counter() - self.stage_started
        else:
            seconds = self.seconds.get(stage, 0.0)
        return seconds / done if done and seconds > 0 else None

    def remaining(self) -> float | None:
        """Estimated seconds left, or None while no rate is known yet."""
        if self.frames is None:
            return None
        n = self.frames
        planned = {
            "encode": n,
            "invert": n * self.inversion_steps,
            "edit": n * self.steps,
            "decode": n * self.prompts,
            "write": 3 * n * self.prompts,
        }
        per_eval = None
        for stage, weight in (("invert", 1.0), ("edit", self.edit_weight)):
            rate = self._rate(stage)
            if rate is not None:
                per_eval = rate / weight
        vae = self._rate("encode")
        cost = {
            "encode": vae,
            "invert": per_eval,
            "edit": per_eval * self.edit_weight if per_eval is not None else None,
            "decode": self._rate("decode") or vae,
            "write": self._rate("write") or (vae / 10 if vae else None),
        }
        left = 0.0
        for stage, units in planned.items():
            done, total = self.done.get(stage, (0, None))
            if total is not None and stage != self.stage and done >= total:
                continue  # finished (or skipped)
            remaining = (total if total is not None else units) - done
            if remaining <= 0:
                continue
            price = self._rate(stage) or cost[stage]
            if price is None:
                return None
            left += remaining * price
        return left

    def _write(self, line: str) -> None:
        if self.live:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
