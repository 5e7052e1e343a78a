"""Time: parsing positions, choosing frames, and measuring rates from presentation timestamps.

Frame times always come from the timestamps the container stores, never from the header's rate
or frame count, which capture tools and remuxers often get wrong. Positions ("frame 12") count
frames in presentation order.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import TokenFlowError

TimeSpec = int | float | str | None

# Timestamps are compared with this slack so "1.5s" still selects a frame stored at 1.4996 s.
TIME_TOLERANCE = 1e-3


def parse_time(text: str, fps: float) -> float | int:
    """Parse a start/end position: "12" is frame 12 (int), "1.5s" or "00:00:01.5" are seconds.

    ``fps`` is needed for SMPTE-style "hh:mm:ss:ff" and for a helpful message when a bare decimal
    like "1.5" leaves the unit ambiguous.
    """
    raw = str(text).strip()
    value = raw.lower()
    if re.fullmatch(r"\d+f?", value):
        return int(value.rstrip("f"))
    seconds = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:s|sec|secs|seconds?)", value)
    if seconds:
        return float(seconds.group(1))
    parts = value.split(":")
    if len(parts) in (2, 3, 4) and all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        if any("." in p for p in parts[:-1]) or (len(parts) == 4 and "." in parts[-1]):
            raise TokenFlowError(f"cannot read time {raw!r}: only the seconds may have decimals")
        frames = 0.0
        if len(parts) == 4:
            if not fps or fps <= 0:
                raise TokenFlowError(f"time {raw!r} counts frames but the frame rate is unknown")
            frames = int(parts.pop()) / fps
        numbers = [float(p) for p in parts]
        while len(numbers) < 3:
            numbers.insert(0, 0.0)
        hours, minutes, seconds = numbers
        return hours * 3600 + minutes * 60 + seconds + frames
    if re.fullmatch(r"\d*\.\d+|\d+\.\d*", value):
        hint = f" (at {fps:g} fps, {value} s is frame {round(float(value) * fps)})" if fps else ""
        raise TokenFlowError(
            f"time {raw!r} is ambiguous: write {value}s for seconds or a whole number for a "
            f"frame{hint}"
        )
    if value.startswith("-"):
        raise TokenFlowError(f"time {raw!r} is negative: positions count from 0")
    raise TokenFlowError(
        f"cannot read time {raw!r}: use a frame number (12), seconds (1.5s) or hh:mm:ss.ms"
    )


def resolve_time(value: TimeSpec, fps: float, name: str) -> int | float | None:
    """Normalise a start/end argument to int (frame) or float (seconds) and validate it."""
    if value is None:
        return None
    if isinstance(value, str):
        value = parse_time(value, fps)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TokenFlowError(f"{name} must be a frame number or seconds, not {value!r}")
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if not math.isfinite(value) or value < 0:
        raise TokenFlowError(f"{name} must be 0 or more, got {value!r}")
    return value


def describe_position(value: int | float) -> str:
    return f"frame {value}" if isinstance(value, int) else f"{value:g} s"


def check_order(start: int | float | None, end: int | float | None) -> None:
    """Refuse an empty range before decoding when both ends use the same unit.

    Mixed units (a frame number and seconds) are compared once the frames' times are known.
    """
    if start is None or end is None or isinstance(start, int) != isinstance(end, int):
        return
    if start >= end - 1e-9:
        raise order_error(start, end)


def order_error(start: int | float, end: int | float) -> TokenFlowError:
    return TokenFlowError(
        f"empty range: start ({describe_position(start)}) is not before end "
        f"({describe_position(end)}); end is exclusive"
    )


@dataclass
class Selection:
    """Which frames to keep, asked frame by frame in presentation order.

    Integer bounds are positions (frame numbers), float bounds are seconds from the video's
    first frame; ``stride`` and ``max_frames`` count in presentation order too.
    """

    start: int | float | None
    end: int | float | None
    stride: int
    max_frames: int | None
    in_span: int = 0
    kept: int = 0

    def before_start(self, position: int, time: float) -> bool:
        if self.start is None:
            return False
        if isinstance(self.start, int):
            return position < self.start
        return time < self.start - TIME_TOLERANCE

    def past_end(self, position: int, time: float) -> bool:
        if self.end is None:
            return False
        if isinstance(self.end, int):
            return position >= self.end
        return time >= self.end - TIME_TOLERANCE

    def full(self) -> bool:
        return self.max_frames is not None and self.kept >= self.max_frames

    def take(self, position: int, time: float) -> bool:
        """Whether this frame is kept; call once per frame in order, after the end check."""
        if self.before_start(position, time):
            return False
        keep = self.in_span % self.stride == 0
        self.in_span += 1
        if keep:
            self.kept += 1
        return keep

    def estimate(self, frames: int, fps: float | None) -> int:
        """How many frames will be kept, from the header's count and rate (0 when unknown)."""

        def position(bound: int | float | None, default: int) -> int:
            if bound is None:
                return default
            if isinstance(bound, int):
                return bound
            return math.ceil(bound * fps - 1e-6) if fps else default

        first = position(self.start, 0)
        last = position(self.end, frames)
        if frames:
            last = min(last, frames)
        count = math.ceil(max(0, last - first) / self.stride)
        if self.max_frames is not None:
            count = min(count, self.max_frames) if count else self.max_frames
        return count

    def shortfall_note(self) -> str | None:
        """Say so when fewer frames than ``max_frames`` were there to take."""
        if self.max_frames is None or self.kept >= self.max_frames:
            return None
        count = f"{self.kept} frame" + ("s" if self.kept != 1 else "")
        stride = f" at stride {self.stride}" if self.stride > 1 else ""
        return (
            f"only {count} in the selected range{stride}, fewer than the {self.max_frames} "
            "asked for"
        )


# --------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------


def rate_text(fps: float) -> str:
    return f"{fps:.2f} fps"


def _grid_error(times: Sequence[float], rate: float) -> float:
    """Largest distance (s) of ``times`` from a grid at ``rate`` anchored at the first one."""
    steps = np.arange(len(times)) / rate
    return float(np.max(np.abs(np.asarray(times, np.float64) - times[0] - steps)))


def measure_rate(times: Sequence[float], tick: float, stride: int = 1) -> Fraction | None:
    """The rate of frames at ``times`` (s) if they sit on a regular grid, else None.

    ``tick`` is the timestamps' precision (the time base): 2.3 fps stored in 1/15 s steps comes
    out as steps of 6 and 7 ticks and is still constant-rate. A rate that fits the timestamps
    as well as the measured one is preferred when it is a familiar one (whole, NTSC 1000/1001,
    or a simple fraction, each divided by ``stride``), so 20 fps reads back as exactly 20.
    """
    if len(times) < 2:
        return None
    span = times[-1] - times[0]
    if span <= 0:
        return None
    measured = (len(times) - 1) / span
    slack = 1.01 * max(tick, 1e-6) + 1e-3 / measured
    if _grid_error(times, measured) > slack:
        return None
    exact = 1.01 * max(tick, 1e-6)
    for candidate in familiar_rates(measured, stride):
        if _grid_error(times, float(candidate)) <= exact:
            return candidate
    return Fraction(measured).limit_denominator(1_000_000)


def familiar_rates(fps: float, stride: int = 1) -> list[Fraction]:
    """Rates near ``fps`` that files usually have, most familiar first."""
    source = fps * stride
    candidates = [
        Fraction(round(source), stride),
        Fraction(round(source * 1.001) * 1000, 1001 * stride),
        Fraction(source).limit_denominator(100) / stride,
    ]
    return [c for c in candidates if c > 0]


def snap_rate(fps: float) -> Fraction:
    """``fps`` as a familiar fraction when it is one to within a millionth (20.0000001 -> 20)."""
    for candidate in familiar_rates(fps):
        if abs(float(candidate) - fps) <= 1e-6 * fps:
            return candidate
    return Fraction(fps).limit_denominator(1_000_000)


def interval_range(times: Sequence[float]) -> str:
    """Shortest and longest frame interval, for a variable-rate note: "40-80 ms"."""
    steps = np.diff(np.asarray(times, np.float64)) * 1000
    return f"{steps.min():.0f}-{steps.max():.0f} ms"


# --------------------------------------------------------------------------------------------
# Presentation order
# --------------------------------------------------------------------------------------------

# Frames held back to put them in presentation order: the most any codec reorders by (H.264
# and HEVC allow 16). Decoding runs this many frames past the end of the selection.
REORDER_DEPTH = 16


@dataclass
class Presented:
    position: int  # in presentation order, from the video's first frame
    time: float  # seconds, on the stream's clock
    frame: Any


class Presenter:
    """Turn the decoder's output order into presentation order, each frame with its time.

    Which picture comes first depends on what the container's stamps are:

    * stamps that go backwards somewhere in the packets are presentation stamps (B-frames in
      mp4/mkv, frames stored out of order): the frame with the smallest stamp comes first;
    * stamps that only ever rise in the packets are decode-order stamps (AVI and other
      containers without a presentation time). The decoder already hands pictures out in
      presentation order, each still carrying its own packet's stamp, so sorting by stamp
      would scramble them: pictures keep the decoder's order and take the stamps in
      ascending order (what FFmpeg's best-effort timestamps amount to).

    A frame that turns up after later ones were already handed out (more than ``depth`` frames
    out of place) cannot be placed; it is counted in ``late`` and left out.
    """

    def __init__(self, presentation_stamps: Callable[[], bool], depth: int = REORDER_DEPTH):
        self.presentation_stamps = presentation_stamps
        self.depth = depth
        self.pending: dict[int, Any] = {}  # decoder order -> frame
        self.times: list[tuple[float, int]] = []  # heap of (time, decoder order)
        self.received = 0
        self.position = 0
        self.last = -math.inf
        self.late = 0

    def push(self, time: float, frame: Any) -> list[Presented]:
        self.pending[self.received] = frame
        heapq.heappush(self.times, (time, self.received))
        self.received += 1
        out = []
        while len(self.pending) > self.depth:
            out.extend(self._release())
        return out

    def flush(self) -> Iterator[Presented]:
        """The frames still held back, one at a time (the rest stay in ``pending_times``)."""
        while self.pending:
            yield from self._release()

    def _release(self) -> list[Presented]:
        time, order = heapq.heappop(self.times)
        if not self.presentation_stamps():
            order = next(iter(self.pending))
        frame = self.pending.pop(order)
        if time < self.last:
            self.late += 1
            return []
        self.last = time
        self.position += 1
        return [Presented(self.position - 1, time, frame)]

    def pending_times(self) -> list[float]:
        """Times of the frames still held back, in order."""
        return sorted(t for t, _ in self.times)

    def count_before(self, time: float) -> int:
        """Frames seen so far that come before ``time``: where a damaged frame would have been."""
        return self.position + sum(1 for t, _ in self.times if t < time)
