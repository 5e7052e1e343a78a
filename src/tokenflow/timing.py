"""Stage timings that never make a GPU wait for the host.

Timing a stage on CUDA with ``torch.cuda.synchronize`` around it would stall the host after
every UNet call and layer, and with it the queue of work the GPU should already have. Here a
CUDA stage records a pair of CUDA events instead and the elapsed times are read once, when the
totals are asked for; on the CPU it is plain wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StageClock:
    """Accumulates seconds per stage name (``with clock.measure("block_passes"): ...``)."""

    def __init__(self, device: torch.device, names: tuple[str, ...] = ()) -> None:
        self.cuda = device.type == "cuda"
        self._seconds = dict.fromkeys(names, 0.0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        self._seconds.setdefault(name, 0.0)
        if torch.compiler.is_compiling():  # a compiled region is timed as a whole, outside
            yield
            return
        # the stage's name also marks its span in a torch.profiler trace (on the GPU's timeline
        # too), so a profile splits by stage (benchmarks/profile_step.py)
        with torch.profiler.record_function(name):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._events.append((name, start, end))
            else:
                clock = time.perf_counter()
                yield
                self._seconds[name] += time.perf_counter() - clock

    def totals(self) -> dict[str, float]:
        """Seconds per stage so far (on CUDA: waits once for the recorded work)."""
        for name, start, end in self._events:
            end.synchronize()
            self._seconds[name] += start.elapsed_time(end) / 1000
        self._events.clear()
        return dict(self._seconds)
