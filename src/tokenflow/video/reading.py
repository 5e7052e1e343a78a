"""Reading a clip: decode in presentation order, keep the frames asked for, measure their timing.

Frames come out as (N, H, W, 3) uint8 RGB exactly as ``frame.to_ndarray(format="rgb24")``
decodes them (the research code's input), oriented as a player shows them, and resized only
when the working size differs from the decoded one. Their times are the container's
presentation timestamps; the header's rate and frame count are only estimates, used for
progress and for parsing "hh:mm:ss:ff" positions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import TokenFlowError
from .clip import Progress, VideoClip
from .folders import DEFAULT_FOLDER_FPS, list_frame_files, load_image
from .orientation import Orientation, orientation_of
from .sizing import Resize, Sizing
from .source import (
    RATE_MISMATCH,
    Decoder,
    Failure,
    has_audio,
    header_frames,
    header_rate,
    open_input,
    video_origin,
    video_stream,
)
from .timing import (
    Presented,
    Presenter,
    Selection,
    TimeSpec,
    check_order,
    describe_position,
    interval_range,
    measure_rate,
    order_error,
    rate_text,
    resolve_time,
    snap_rate,
)

# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadRequest:
    """``read_clip``'s options, checked, as passed on to the video and folder readers."""

    start: TimeSpec
    end: TimeSpec
    stride: int
    max_frames: int | None
    sizing: Sizing
    fps: float | None
    progress: Progress | None

    def plan(self, source: tuple[int, int], notes: list[str]) -> Resize:
        return self.sizing.start(source, notes)


class ProgressReport:
    """``progress(done, total)`` after each kept frame; the total is an estimate until the end."""

    def __init__(self, callback: Progress | None, estimate: int) -> None:
        self.callback = callback
        self.estimate = estimate
        self.done = 0
        self.total = estimate

    def advance(self) -> None:
        self.done += 1
        self.total = max(self.estimate, self.done)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def finish(self) -> None:
        if self.callback is not None and self.done and self.total != self.done:
            self.callback(self.done, self.done)


def read_clip(
    path: str | os.PathLike[str],
    *,
    start: TimeSpec = None,
    end: TimeSpec = None,
    stride: int = 1,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    fit: str = "crop",
    short_side: int = 512,
    multiple: int = 64,
    fps: float | None = None,
    resample: str = "lanczos",
    progress: Progress | None = None,
) -> VideoClip:
    """Decode the requested span of a video or frames folder into working-size RGB frames.

    ``start``/``end`` are frame numbers (int: positions in presentation order) or seconds
    (float, or strings for ``parse_time``) from the video's first frame, matched against each
    frame's presentation timestamp; ``end`` is exclusive. ``stride`` and ``max_frames`` count in
    presentation order. Every frame up to the end of the span is decoded (so frame numbers stay
    exact) but only the kept ones are converted and stored.

    ``fps`` sets the rate of a frames folder (default 10). On a video it replaces the
    timestamps for playback: frame ``i`` plays at ``i / fps`` and seconds in ``start``/``end``
    count on that timeline, for a file without usable timing or another playback speed. The
    clip's ``start_time``/``end_time`` still give the span in the source, so a writer handed
    that span as ``audio_span`` time-stretches the sound to the new length (pitch kept).

    ``progress(done, total)`` is called after each kept frame; ``total`` is the expected
    count (from the header, so an estimate) and equals ``done`` in the last call.
    """
    path = Path(path)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise TokenFlowError(f"stride must be a whole number of at least 1, got {stride!r}")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
    ):
        raise TokenFlowError(f"max_frames must be a whole number of at least 1, got {max_frames!r}")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise TokenFlowError(f"fps must be a positive number, got {fps!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total), got {progress!r}")
    sizing = Sizing(size, fit, short_side, multiple, resample).check()
    request = ReadRequest(start, end, stride, max_frames, sizing, fps, progress)
    if path.is_dir():
        return _read_folder(path, request)
    with open_input(path) as container:
        return _ContainerReader(container, path, request).read()


def empty_range_error(selection: Selection, length: str) -> TokenFlowError:
    """Nothing selected: say how long the clip is so the user can pick a range inside it."""
    if selection.start is not None:
        return TokenFlowError(
            f"empty range: start ({describe_position(selection.start)}) is at or beyond the end "
            f"of the clip ({length}); pick an earlier start"
        )
    return TokenFlowError(
        f"empty range: end ({describe_position(selection.end or 0)}) selects no frames of the "
        f"clip ({length}); pick a later end"
    )


def _note_alpha(frame: av.VideoFrame, notes: list[str]) -> bool:
    """Say so when transparency is thrown away; opaque alpha planes (most GIFs) stay silent."""
    alpha = frame.to_ndarray(format="rgba")[..., 3]
    if alpha.min() < 255:
        notes.append("alpha channel dropped: transparent areas show their underlying colour")
        return True
    return False


class _ContainerReader:
    """One ``read_clip`` of a video file: decode, order, select, then work out the timing."""

    def __init__(
        self, container: av.container.InputContainer, path: Path, request: ReadRequest
    ) -> None:
        self.container, self.path, self.request = container, path, request
        self.stream = video_stream(container, path)
        # Keep FFmpeg's default slice threading: frame threading hides the error of a truncated
        # last packet and silently drops the frames still in flight.
        self.stream.thread_type = "SLICE"
        self.time_base = self.stream.time_base or Fraction(1, 90000)
        self.tick = float(self.time_base)
        self.header = header_rate(container, self.stream)
        self.notes: list[str] = []
        rate = request.fps or self.header or 0.0
        self.start = resolve_time(request.start, rate, "start")
        self.end = resolve_time(request.end, rate, "end")
        check_order(self.start, self.end)
        self.selection = Selection(self.start, self.end, request.stride, request.max_frames)
        estimate = self.selection.estimate(header_frames(container, self.stream), rate)
        self.progress = ProgressReport(request.progress, estimate)
        # Seconds count from the first frame in presentation order (its stamp is known once the
        # reorder buffer hands it out); until then the container's start time stands in.
        self.origin: float | None = None
        self.start_estimate = video_origin(container) or 0.0
        self.decoder = Decoder(container, self.stream, self._on_hole)
        self.presenter = Presenter(lambda: self.decoder.presentation_stamps)
        self.orientation = Orientation()
        self.source_size = (self.stream.width, self.stream.height)
        self.plan: Resize | None = None
        self.alpha_noted = False
        self.last_stamp: float | None = None
        self.untimed = 0
        # What the selection found.
        self.kept: list[np.ndarray] = []
        self.positions: list[int] = []
        self.times: list[float] = []  # kept frames, s from the video's first frame
        self.seen: list[float] = []  # every frame handed out, by position, same clock
        self.next_time: float | None = None  # the frame right after the last kept one
        self.last_duration = 0.0  # of the last kept frame, as the decoder reports it
        self.stopped_early = False
        self.stop: tuple[int, float] | None = None  # position and time of the first frame left
        self.stop_seconds = 0.0  # its time on the source's clock

    # -- decoding ----------------------------------------------------------------------------

    def _stamp(self, frame: av.VideoFrame) -> float:
        """A frame's time on the file's clock: its pts, else its packet's dts, else one step on."""
        value = frame.pts if frame.pts is not None else frame.dts
        if value is not None:
            self.last_stamp = float(value * self.time_base)
            return self.last_stamp
        rate = self.request.fps or self.header
        if not rate:
            raise TokenFlowError(
                f"cannot tell the frame rate of {self.path}: its frames have no timestamps and "
                "its header no rate; pass fps"
            )
        self.untimed += 1
        self.last_stamp = 0.0 if self.last_stamp is None else self.last_stamp + 1 / rate
        return self.last_stamp

    def _presented(self) -> Iterator[Presented]:
        for frame in self.decoder.frames():
            if self.decoder.decoded == 1:
                self.orientation = orientation_of(frame)
                self.source_size = self.orientation.displayed_size(frame.width, frame.height)
                if self.orientation.note:
                    self.notes.append(self.orientation.note)
            yield from self.presenter.push(self._stamp(frame), frame)
        yield from self.presenter.flush()

    def _on_hole(self, failure: Failure) -> None:
        if failure.time is not None:
            position = self.presenter.count_before(failure.time)
            origin = self.start_estimate if self.origin is None else self.origin
            seconds = failure.time - origin
            time = position / self.request.fps if self.request.fps else seconds
            if self.selection.past_end(position, time):
                return  # beyond what was asked for: decoding stops before it anyway
            where = f"frame {position} ({seconds:.2f} s)"
        else:
            where = f"frame {failure.ordinal} (in decoding order)"
        raise TokenFlowError(
            f"corrupt video: {self.path} cannot be decoded at {where}; "
            "re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or pick a range before it"
        )

    # -- selecting ---------------------------------------------------------------------------

    def _offer(self, item: Presented) -> bool:
        """Keep ``item`` if selected; False once nothing later can be selected."""
        if self.origin is None:
            self.origin = item.time
        seconds = item.time - self.origin
        time = item.position / self.request.fps if self.request.fps else seconds
        if self.positions and item.position == self.positions[-1] + 1:
            self.next_time = seconds
        if self.selection.past_end(item.position, time) or self.selection.full():
            self.stopped_early = True
            self.stop = (item.position, time)
            self.stop_seconds = seconds
            return False
        self.seen.append(seconds)
        if not self.selection.take(item.position, time):
            return True
        frame = item.frame
        if self.plan is None:
            self.plan = self.request.plan(self.source_size, self.notes)
        if not self.alpha_noted and any(c.is_alpha for c in frame.format.components):
            self.alpha_noted = _note_alpha(frame, self.notes)
        rgb = frame.to_ndarray(format="rgb24")
        self.kept.append(self.plan.apply(self.orientation.apply(rgb)))
        self.positions.append(item.position)
        self.times.append(seconds)
        self.next_time = None
        self.last_duration = float((getattr(frame, "duration", 0) or 0) * self.time_base)
        self.progress.advance()
        return True

    def read(self) -> VideoClip:
        for item in self._presented():
            if not self._offer(item):
                break
        if self.decoder.decoded == 0:
            raise TokenFlowError(
                f"no decodable frames in {self.path}: the file is damaged or empty; re-encode or "
                "replace it"
            )
        self._note_damage()
        if not self.kept:
            raise self._empty_error()
        clip = self._clip()
        self.progress.finish()
        return clip

    def _note_damage(self) -> None:
        lost = self._lost_frames()
        if lost:
            self.notes.append(
                f"the last {lost} frame(s) could not be decoded (truncated or damaged file); "
                f"the video ends after frame {self.presenter.position - 1}"
            )
        if self.presenter.late:
            self.notes.append(
                f"{self.presenter.late} frame(s) came too far out of order to place and were "
                "left out; re-encode the file to keep them"
            )
        if self.untimed:
            rate = self.request.fps or self.header
            self.notes.append(
                f"{self.untimed} frame(s) have no timestamp: timed at {rate:g} fps (from "
                f"{'fps' if self.request.fps else 'the header'}); pass fps if that is wrong"
            )

    def _lost_frames(self) -> int:
        """How many frames of the requested span a truncated tail cost us (0 when none)."""
        pending = self.decoder.pending
        if not pending:
            return 0
        if self.stopped_early:
            last = self.times[-1] + (self.origin or 0.0) if self.times else None
            for failure in pending:
                if failure.time is None or last is None or failure.time <= last:
                    self.decoder.on_hole(failure)  # a hole inside what we kept
            return 0
        # The index (when the container has one) knows how many frames the missing tail held.
        by_index = (self.stream.frames or 0) - self.decoder.decoded
        return max(len(pending), by_index)

    def _empty_error(self) -> TokenFlowError:
        """Why nothing was kept: start past the end, start not before end, or a gap."""
        if self.stop is None or self.start is None:
            return empty_range_error(self.selection, self._length())
        position, time = self.stop  # the first frame at or past the end
        if isinstance(self.start, int):
            reversed_range = self.start >= position
        else:
            reversed_range = self.start >= time - 1e-9
        if reversed_range:
            return order_error(self.start, self.end if self.end is not None else position)
        return TokenFlowError(
            f"empty range: no frame lies between start ({describe_position(self.start)}) and end "
            f"({describe_position(self.end if self.end is not None else position)}); "
            "widen the range"
        )

    def _length(self) -> str:
        """The clip's length, for an empty-range message."""
        count = self.presenter.position
        rate = measure_rate(self.seen, self.tick)
        if rate is not None:
            return f"{count} frames, {count / float(rate):.2f} s at {float(rate):g} fps"
        return f"{count} frames"

    # -- timing ------------------------------------------------------------------------------

    def _last_interval(self) -> float:
        """How long the last kept frame lasts in the source (``stride`` frames' worth)."""
        stride = self.request.stride
        if self.next_time is not None:
            return (self.next_time - self.times[-1]) * stride
        if self.last_duration > 0:
            return self.last_duration * stride
        if len(self.times) >= 2:
            return float(np.median(np.diff(self.times)))
        rate = self.request.fps or self.header
        if rate:
            return stride / rate
        raise TokenFlowError(f"cannot tell the frame rate of {self.path}: pass fps")

    def _clip(self) -> VideoClip:
        count, stride = len(self.kept), self.request.stride
        start = self.times[0]
        constant = True
        if self.request.fps:
            fps = self.request.fps / stride
            timestamps = [i / fps for i in range(count)]
            duration = count / fps
            end = self.times[-1] + self._last_interval()
            self._note_override(end - start)
        else:
            rate = measure_rate(self.times, self.tick, stride)
            if rate is None and count == 1:
                rate = snap_rate(1 / self._last_interval())
            if rate is not None:
                fps = float(rate)
                timestamps = [i / fps for i in range(count)]
                duration = count / fps
            else:
                constant = False
                duration = self.times[-1] - start + self._last_interval()
                fps = count / duration
                timestamps = [t - start for t in self.times]
                self.notes.append(
                    f"variable frame rate: {rate_text(fps)} on average, frames last "
                    f"{interval_range(timestamps + [duration])}; the output keeps each frame's "
                    "timing"
                )
            self._note_header()
            end = start + duration
        shortfall = self.selection.shortfall_note()
        if shortfall:
            self.notes.append(shortfall)
        return VideoClip(
            frames=np.stack(self.kept),
            fps=fps,
            source=self.path,
            frame_indices=self.positions,
            start_time=start,
            end_time=end,
            has_audio=has_audio(self.container),
            source_size=self.source_size,
            notes=self.notes,
            timestamps=timestamps,
            duration=duration,
            constant_rate=constant,
        )

    def _source_rate(self) -> float | None:
        """Rate of every frame in the selected range (stride aside) by their timestamps."""
        span = self.seen[self.positions[0] : self.positions[-1] + 1]  # seen[p] is position p
        rate = measure_rate(span, self.tick)
        if rate is not None:
            return float(rate)
        if len(span) >= 2:
            return (len(span) - 1) / (span[-1] - span[0])
        return None

    def _note_override(self, source_seconds: float) -> None:
        measured = self._source_rate()
        given = self.request.fps
        if measured is None or abs(given - measured) <= 1e-6 * given:
            return
        playing = len(self.kept) * self.request.stride / given
        sound = "; sound written with it is time-stretched to match"
        self.notes.append(
            f"frame rate set to {given:g} fps (the timestamps give {rate_text(measured)}): "
            f"{source_seconds:.2f} s of the source play in {playing:.2f} s"
            + (sound if has_audio(self.container) else "")
        )

    def _note_header(self) -> None:
        """Say so when the header's rate or frame count disagrees with what the frames show.

        The rate is judged on every frame decoded, including those read ahead past the end:
        when they are on a regular grid, or else when the whole file was read (then its average,
        with more slack).
        """
        header, seen = self.header, list(self.seen)
        if self.stop is not None and self.origin is not None:
            seen.append(self.stop_seconds)
            seen += [t - self.origin for t in self.presenter.pending_times()]
        whole = not self.stopped_early and not self.decoder.pending
        measured = measure_rate(seen, self.tick) if len(seen) >= 2 else None
        rate, slack = (float(measured), RATE_MISMATCH) if measured is not None else (None, 0.0)
        if rate is None and whole and len(seen) >= 3:
            span = seen[-1] - seen[0] + float(np.median(np.diff(seen)))
            rate, slack = len(seen) / span, 5 * RATE_MISMATCH
        rate_off = header is not None and rate is not None and abs(rate / header - 1) > slack
        claimed, found = self.stream.frames or 0, self.presenter.position
        count_off = whole and claimed > 0 and claimed != found
        if rate_off and count_off:
            self.notes.append(
                f"the header says {header:.4g} fps and {claimed} frames but the timestamps give "
                f"{rate_text(rate)} and there are {found} frames; using the timestamps"
            )
        elif rate_off:
            self.notes.append(
                f"the header says {header:.4g} fps but the timestamps give {rate_text(rate)}; "
                "using the timestamps"
            )
        elif count_off:
            self.notes.append(
                f"the header says {claimed} frames but there are {found}; using the frames found"
            )


# --------------------------------------------------------------------------------------------
# Frames folders
# --------------------------------------------------------------------------------------------


def _read_folder(folder: Path, request: ReadRequest) -> VideoClip:
    """A frames folder is constant-rate by definition: frame ``i`` is at ``i / fps``."""
    files = list_frame_files(folder)
    notes: list[str] = []
    fps = request.fps
    if fps is None:
        fps = DEFAULT_FOLDER_FPS
        notes.append(f"frames folder: no fps given, using {fps:g} fps")
    fps = float(fps)
    start = resolve_time(request.start, fps, "start")
    end = resolve_time(request.end, fps, "end")
    check_order(start, end)
    selection = Selection(start, end, request.stride, request.max_frames)
    progress = ProgressReport(request.progress, selection.estimate(len(files), fps))
    plan: Resize | None = None
    source_size: tuple[int, int] | None = None
    kept: list[np.ndarray] = []
    indices: list[int] = []
    any_rotated = any_alpha = False
    for index in range(len(files)):
        time = index / fps
        if selection.past_end(index, time) or selection.full():
            break
        if not selection.take(index, time):
            continue
        pixels, rotated, alpha = load_image(files[index])
        any_rotated, any_alpha = any_rotated or rotated, any_alpha or alpha
        height, width = pixels.shape[:2]
        if source_size is None:
            source_size = (width, height)
            plan = request.plan(source_size, notes)
        elif (width, height) != source_size:
            raise TokenFlowError(
                f"frame {files[index].name} is {width}x{height} but the first frame is "
                f"{source_size[0]}x{source_size[1]}: all frames must have the same size"
            )
        assert plan is not None
        kept.append(plan.apply(pixels))
        indices.append(index)
        progress.advance()
    if not kept:
        if start is not None and end is not None:
            seconds = [b / fps if isinstance(b, int) else b for b in (start, end)]
            if seconds[0] >= seconds[1] - 1e-9:
                raise order_error(start, end)  # mixed units: frame vs seconds
        raise empty_range_error(selection, f"{len(files)} frames, {len(files) / fps:.2f} s")
    if any_rotated:
        notes.append("rotated per EXIF orientation")
    if any_alpha:
        notes.append("alpha channel dropped: transparent areas show their underlying colour")
    shortfall = selection.shortfall_note()
    if shortfall:
        notes.append(shortfall)
    out_fps = fps / request.stride
    start_time = indices[0] / fps
    progress.finish()
    return VideoClip(
        frames=np.stack(kept),
        fps=out_fps,
        source=folder,
        frame_indices=indices,
        start_time=start_time,
        end_time=start_time + len(kept) / out_fps,
        has_audio=False,
        source_size=source_size or (0, 0),
        notes=notes,
    )
