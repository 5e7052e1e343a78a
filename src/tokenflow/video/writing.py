"""Writing results: H.264 videos (with the source's sound), GIF previews and frames folders.

Every writer is atomic (``tokenflow.atomic``): an interrupted run never leaves a half-written
file under the final name. The videos reproduce the source's timing: frames are timed either by
a constant ``fps`` or by per-frame ``timestamps`` (``VideoClip.timing`` gives both); timestamps
on a regular grid are written as that constant rate, others keep each frame's time.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..atomic import atomic_folder, atomic_path
from ..errors import TokenFlowError
from .audio import AudioTrack
from .clip import Progress
from .folders import is_frame_file
from .timing import measure_rate

VIDEO_SUFFIXES = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Per-frame times are written on the MPEG clock: fine enough for any source's timestamps.
VFR_TIME_BASE = Fraction(1, 90_000)
# Timestamps this close (s) to a regular grid are written as a constant rate.
GRID_PRECISION = 1e-6


def check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, H, W, 3) with N >= 1, got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB, got {array.dtype}")
    return array


def check_fps(fps: float | Fraction) -> Fraction:
    """Exact rate as a fraction: 29.97 (30000/1001 as a float) must not drift over a long clip."""
    if isinstance(fps, Fraction):
        rate = fps
    else:
        try:
            value = float(fps)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise TokenFlowError(f"fps must be a positive number, got {fps!r}")
        rate = Fraction(value).limit_denominator(100_000)
    if rate <= 0:
        raise TokenFlowError(f"fps must be a positive number, got {fps!r}")
    return rate


@dataclass(frozen=True)
class FrameTiming:
    """When each frame starts (s, the first at 0) and when the last one ends."""

    starts: list[float]
    end: float
    rate: Fraction | None  # the constant rate, or None when frames keep their own times

    @property
    def durations(self) -> list[float]:
        return list(np.diff([*self.starts, self.end]))


def frame_timing(
    count: int,
    fps: float | Fraction | None,
    timestamps: Sequence[float] | None,
    duration: float | None,
) -> FrameTiming:
    """Resolve a writer's timing arguments.

    ``timestamps`` (one per frame, seconds, any origin) win over ``fps``; the last frame ends at
    ``duration`` from the first frame's start, else one frame at ``fps`` after its start, else
    one typical interval after it.
    """
    if timestamps is None:
        if fps is None:
            raise TokenFlowError("pass fps or timestamps to say when each frame is shown")
        rate = check_fps(fps)
        return FrameTiming([float(i / rate) for i in range(count)], float(count / rate), rate)
    times = np.asarray(timestamps, dtype=np.float64)
    if times.shape != (count,) or not np.all(np.isfinite(times)):
        raise ValueError(f"timestamps must be {count} finite times, one per frame")
    starts = times - times[0]
    if np.any(np.diff(starts) < 0):
        raise ValueError("timestamps must not go backwards")
    if duration is not None:
        end = float(duration)
        if not math.isfinite(end) or end <= starts[-1]:
            raise ValueError(f"duration must end after the last frame starts, got {duration!r}")
    elif fps is not None:
        end = float(starts[-1] + 1 / check_fps(fps))
    elif count >= 2:
        end = float(starts[-1] + np.median(np.diff(starts)))
    else:
        raise TokenFlowError("a single frame needs fps or duration to say how long it lasts")
    rate = measure_rate([*starts, end], GRID_PRECISION)
    if rate is not None:
        if fps is not None and abs(float(check_fps(fps)) / float(rate) - 1) <= 1e-6:
            rate = check_fps(fps)  # the caller's exact fraction
        return FrameTiming([float(i / rate) for i in range(count)], float(count / rate), rate)
    return FrameTiming([float(t) for t in starts], end, None)


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column rather than add a black line."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return np.ascontiguousarray(frame)
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float | None = None,
    *,
    timestamps: Sequence[float] | None = None,
    duration: float | None = None,
    audio_source: str | os.PathLike[str] | None = None,
    audio_span: tuple[float, float] | None = None,
    crf: int = 18,
    progress: Progress | None = None,
) -> list[str]:
    """Write H.264/yuv420p with faststart (plays in browsers), optionally with the source's audio.

    Timing: ``fps`` for a constant rate, or ``timestamps`` (each frame's time in seconds, e.g.
    ``clip.timestamps``) and ``duration`` (when the last frame ends, from the first) for the
    source's own timing; ``write_video(path, frames, **clip.timing)`` passes all three.
    Timestamps on a regular grid are written at that constant rate, others frame by frame on a
    1/90000 s clock.

    ``audio_span`` is the (start, end) of the source, in seconds from its first video frame,
    that the frames cover (``clip.audio_span``); that stretch of the source's sound is copied
    so it stays in sync. When the frames play longer or shorter than the span (after a
    frame-rate override) the sound is time-stretched to their length with pitch kept; if that
    is impossible the video is written without sound. Returns notes for the user about the
    sound (stretched, or dropped and why); ``progress(done, total)`` follows each frame.
    """
    array = check_frames(frames)
    timing = frame_timing(len(array), fps, timestamps, duration)
    return _encode_video(
        Path(path),
        iter(array),
        array.shape[2],
        array.shape[1],
        timing,
        audio_source=audio_source,
        audio_span=audio_span,
        crf=crf,
        progress=progress,
    )


def write_side_by_side(
    path: str | os.PathLike[str],
    left: np.ndarray,
    right: np.ndarray,
    fps: float | None = None,
    *,
    timestamps: Sequence[float] | None = None,
    duration: float | None = None,
    audio_source: str | os.PathLike[str] | None = None,
    audio_span: tuple[float, float] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Write source | edited as one video so the edit can be judged frame by frame.

    Timing, sound, notes and progress as in ``write_video``.
    """
    left_a, right_a = check_frames(left, "left"), check_frames(right, "right")
    if left_a.shape[:2] != right_a.shape[:2]:
        raise ValueError(
            "left and right need the same frame count and height, got "
            f"{left_a.shape[:3]} and {right_a.shape[:3]}"
        )
    timing = frame_timing(len(left_a), fps, timestamps, duration)
    joined = (np.concatenate([a, b], axis=1) for a, b in zip(left_a, right_a, strict=True))
    return _encode_video(
        Path(path),
        joined,
        left_a.shape[2] + right_a.shape[2],
        left_a.shape[1],
        timing,
        audio_source=audio_source,
        audio_span=audio_span,
        crf=18,
        progress=progress,
    )


def _encode_video(
    path: Path,
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    timing: FrameTiming,
    *,
    audio_source: str | os.PathLike[str] | None,
    audio_span: tuple[float, float] | None,
    crf: int,
    progress: Progress | None,
) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise TokenFlowError(
            f"cannot write {path.name}: videos are H.264, use .mp4 (or .mov/.mkv); for a GIF "
            "use write_gif"
        )
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise TokenFlowError(
            f"crf must be a whole number from 0 to 51 (18 is near-lossless), got {crf!r}"
        )
    container_format = VIDEO_SUFFIXES[suffix]
    options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
    count = len(timing.starts)
    if timing.rate is not None:
        time_base, ticks = 1 / timing.rate, list(range(count + 1))
    else:
        time_base, ticks = VFR_TIME_BASE, _ticks([*timing.starts, timing.end], VFR_TIME_BASE)
    nominal = timing.rate or Fraction(count / timing.end).limit_denominator(1001)
    with atomic_path(path) as temporary, contextlib.ExitStack() as stack:
        output = stack.enter_context(
            av.open(str(temporary), mode="w", format=container_format, options=options)
        )
        stream = output.add_stream("libx264", rate=nominal, options={"crf": str(crf)})
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        audio, notes = AudioTrack.prepare(
            stack, output, container_format, audio_source, audio_span, timing.end
        )
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_even(pixels), format="rgb24")
            frame.pts = ticks[index]
            frame.time_base = time_base
            with contextlib.suppress(AttributeError):  # read-only before PyAV 14
                frame.duration = ticks[index + 1] - ticks[index]  # the last frame's length
            if audio is not None:
                audio.mux_until(timing.starts[index])
            output.mux(stream.encode(frame))
            if progress is not None:
                progress(index + 1, count)
        output.mux(stream.encode(None))
        if audio is not None:
            audio.mux_until(math.inf)
    return notes


def _ticks(seconds: Sequence[float], time_base: Fraction) -> list[int]:
    """Times on the ``time_base`` clock, nudged apart where rounding would make two equal."""
    ticks: list[int] = []
    for value in seconds:
        tick = round(value / time_base)
        ticks.append(tick if not ticks or tick > ticks[-1] else ticks[-1] + 1)
    return ticks


def write_gif(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float | None = None,
    *,
    timestamps: Sequence[float] | None = None,
    duration: float | None = None,
    progress: Progress | None = None,
) -> None:
    """Write a looping GIF for quick previews (e.g. in a README); timing is kept to 10 ms.

    Timing as in ``write_video``; each frame gets its own delay.
    """
    array = check_frames(frames)
    timing = frame_timing(len(array), fps, timestamps, duration)
    path = Path(path)
    shortest = min(timing.durations)
    if shortest < 0.02:
        warnings.warn(
            f"GIF frames of {shortest * 1000:.0f} ms: browsers slow frames shorter than 20 ms "
            "down to 100 ms",
            stacklevel=2,
        )
    # GIF delays are whole centiseconds; spread the rounding so the total length stays right.
    ticks = [round(t * 100) for t in [*timing.starts, timing.end]]
    durations = [max(1, b - a) * 10 for a, b in zip(ticks, ticks[1:], strict=False)]
    count = len(array)

    def rest() -> Iterable[Image.Image]:
        for index in range(1, count):
            if progress is not None:
                progress(index, count)  # frame index - 1 is written once the next is asked for
            yield Image.fromarray(array[index], "RGB")

    with atomic_path(path) as temporary:
        Image.fromarray(array[0], "RGB").save(
            temporary,
            format="GIF",
            save_all=True,
            append_images=rest(),
            duration=durations,
            loop=0,
        )
    if progress is not None:
        progress(count, count)


def write_frames(
    folder: str | os.PathLike[str], frames: np.ndarray, *, progress: Progress | None = None
) -> None:
    """Write 00000.png, 00001.png, ... (8-bit RGB), replacing an earlier frames folder atomically.

    An existing folder is replaced only if it holds nothing but numbered frames, so a mistyped
    path never deletes unrelated files.
    """
    array = check_frames(np.asarray(frames))
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise TokenFlowError(f"cannot write {folder}: folder {folder.parent} does not exist")
    if folder.exists():
        if not folder.is_dir():
            raise TokenFlowError(f"cannot write frames to {folder}: it is a file; pick a folder")
        strangers = [p.name for p in folder.iterdir() if not is_frame_file(p)]
        if strangers:
            raise TokenFlowError(
                f"cannot write frames to {folder}: it holds other files ({strangers[0]}, ...); "
                "pick an empty or new folder"
            )
    with atomic_folder(folder) as staging:
        for index, frame in enumerate(array):
            Image.fromarray(frame, "RGB").save(staging / f"{index:05d}.png", compress_level=4)
            if progress is not None:
                progress(index + 1, len(array))
