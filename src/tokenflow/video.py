"""Reading source videos into frame arrays and writing edited results back out.

Everything the engine touches goes through here, so the rules live in one place: frames come out
as (N, H, W, 3) uint8 RGB exactly as ``frame.to_ndarray(format="rgb24")`` decodes them (the
research code's input), oriented as a player shows them, and resized only when the working size
differs from the decoded one. Writers are atomic: an interrupted run never leaves a half-written
file under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from PIL import Image, ImageOps
from tqdm import tqdm

from tokenflow.errors import TokenFlowError

__all__ = [
    "VideoClip",
    "parse_size",
    "parse_time",
    "probe_video",
    "read_clip",
    "write_frames",
    "write_gif",
    "write_side_by_side",
    "write_video",
]

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = 10.0
WARN_PIXELS = 1024 * 1024
MAX_PIXELS = 4096 * 4096
VIDEO_SUFFIXES = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
REMUX_AUDIO_CODECS = {"aac", "mp3"}
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
FITS = ("crop", "pad", "stretch")
RESAMPLERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
# Timestamps are compared with this slack so "1.5s" still selects a frame stored at 1.4996 s.
TIME_TOLERANCE = 1e-3
_EXIF_ORIENTATION = 0x0112
_FRAME_NAME = re.compile(r"^(\d+)(\.[A-Za-z]+)$")

TimeSpec = int | float | str | None


@dataclass
class VideoClip:
    """Frames ready for the engine plus what is needed to write a faithful result."""

    frames: np.ndarray
    fps: float
    source: Path
    frame_indices: list[int]
    start_time: float
    end_time: float
    has_audio: bool
    source_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """Working size as (W, H), the order users type it in."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


# --------------------------------------------------------------------------------------------
# Parsing user input
# --------------------------------------------------------------------------------------------


def _nearest_multiple(value: float, multiple: int = 8) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _check_size(width: int, height: int) -> None:
    """Refuse sizes the VAE cannot take, naming the closest one it can."""
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise TokenFlowError(
            f"size {width}x{height} is not valid: both sides must be positive multiples of 8; "
            f"try {_nearest_multiple(width)}x{_nearest_multiple(height)}"
        )


def parse_size(text: str) -> tuple[int, int]:
    """Parse "512x320" into (W, H); the VAE needs multiples of 8, so others are refused here."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise TokenFlowError(f"cannot read size {text!r}: write it as WIDTHxHEIGHT, e.g. 512x320")
    width, height = int(match.group(1)), int(match.group(2))
    _check_size(width, height)
    return width, height


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


def _resolve_time(value: TimeSpec, fps: float, name: str) -> int | float | None:
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


def _as_seconds(value: int | float, fps: float) -> float:
    return value / fps if isinstance(value, int) else float(value)


def _describe_position(value: int | float) -> str:
    return f"frame {value}" if isinstance(value, int) else f"{value:g} s"


# --------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Resize:
    """How one displayed frame becomes one working frame: resize to ``scaled``, then crop/pad."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    target: tuple[int, int]
    fit: str
    resample: Image.Resampling

    @property
    def identity(self) -> bool:
        return self.source == self.scaled == self.target

    def describe(self) -> str | None:
        (sw, sh), (rw, rh), (tw, th) = self.source, self.scaled, self.target
        if self.identity:
            return None
        if self.fit == "stretch":
            return f"stretched {sw}x{sh} -> {tw}x{th} (aspect ratio not kept)"
        steps = [] if self.scaled == self.source else [f"resized {sw}x{sh} -> {rw}x{rh}"]
        if self.scaled != self.target:
            verb = "centre-cropped" if self.fit == "crop" else "padded with black"
            steps.append(f"{verb} to {tw}x{th}")
        return ", ".join(steps)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Resize the full frame first (as the reference code does), then crop or pad."""
        if self.identity:
            return frame
        if self.scaled != self.source:
            image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
            frame = np.array(image.resize(self.scaled, self.resample))
        (rw, rh), (tw, th) = self.scaled, self.target
        if (rw, rh) == (tw, th):
            return frame
        if self.fit == "crop":
            left, top = (rw - tw) // 2, (rh - th) // 2
            return np.ascontiguousarray(frame[top : top + th, left : left + tw])
        canvas = np.zeros((th, tw, 3), dtype=np.uint8)
        left, top = (tw - rw) // 2, (th - rh) // 2
        canvas[top : top + rh, left : left + rw] = frame
        return canvas


def _check_sizing(
    size: tuple[int, int] | None, fit: str, short_side: int, multiple: int, resample: str
) -> None:
    """Validate the sizing options before decoding, so a typo fails in milliseconds."""
    if resample not in RESAMPLERS:
        raise TokenFlowError(
            f"unknown resample {resample!r}: choose one of {', '.join(sorted(RESAMPLERS))}"
        )
    if fit not in FITS:
        raise TokenFlowError(f"unknown fit {fit!r}: choose one of {', '.join(FITS)}")
    if size is not None:
        width, height = int(size[0]), int(size[1])
        _check_size(width, height)
        if width * height > MAX_PIXELS:
            raise _too_large(width, height)
        return
    for name, value in (("short_side", short_side), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
            raise TokenFlowError(
                f"{name}={value!r} is not valid: it must be a positive multiple of 8; "
                f"try {_nearest_multiple(float(value) if value else 8)}"
            )
    if short_side < multiple:
        raise TokenFlowError(
            f"short_side={short_side} is smaller than multiple={multiple}: raise short_side to at "
            f"least {multiple}"
        )


def _too_large(width: int, height: int) -> TokenFlowError:
    return TokenFlowError(
        f"working size {width}x{height} is too large (over 4096x4096 pixels): pass a smaller "
        "size or short_side"
    )


def _plan_resize(
    source: tuple[int, int],
    size: tuple[int, int] | None,
    fit: str,
    short_side: int,
    multiple: int,
    resample: str,
) -> _Resize:
    """Work out how the displayed frame becomes the working frame (options already checked)."""
    sw, sh = source
    if size is None:
        scale = short_side / min(sw, sh)
        scaled = (max(1, round(sw * scale)), max(1, round(sh * scale)))
        # The short side lands exactly on short_side whatever the rounding of the scale.
        scaled = (short_side, scaled[1]) if sw <= sh else (scaled[0], short_side)
        target = (scaled[0] // multiple * multiple, scaled[1] // multiple * multiple)
        fit = "crop"
    else:
        tw, th = int(size[0]), int(size[1])
        target = (tw, th)
        if fit == "stretch":
            scaled = target
        else:
            pick = max if fit == "crop" else min
            scale = pick(tw / sw, th / sh)
            scaled = (max(1, round(sw * scale)), max(1, round(sh * scale)))
            # Rounding must never leave a gap (crop) or overflow the canvas (pad).
            if fit == "crop":
                scaled = (max(scaled[0], tw), max(scaled[1], th))
            else:
                scaled = (min(scaled[0], tw), min(scaled[1], th))
            if sw * th == sh * tw:
                scaled = target
    if target[0] * target[1] > MAX_PIXELS:
        raise _too_large(*target)
    return _Resize(source, scaled, target, fit, RESAMPLERS[resample])


def _start_plan(
    source: tuple[int, int],
    size: tuple[int, int] | None,
    fit: str,
    short_side: int,
    multiple: int,
    resample: str,
    notes: list[str],
) -> _Resize:
    """Plan the resize once the displayed size is known; note the resize, warn about a big one."""
    plan = _plan_resize(source, size, fit, short_side, multiple, resample)
    width, height = plan.target
    if width * height > WARN_PIXELS:
        message = (
            f"working size {width}x{height} is above 1024x1024 pixels: editing will be slow and "
            "may run out of GPU memory"
        )
        warnings.warn(message, stacklevel=4)
    description = plan.describe()
    if description:
        notes.append(description)
    return plan


# --------------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Orientation:
    """An axis-aligned display transform read from the display matrix (rotation and mirroring)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    note: str | None = None

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def displayed_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.transpose else (width, height)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        if self.transpose:
            frame = frame.transpose(1, 0, 2)
        if self.flip_rows:
            frame = frame[::-1]
        if self.flip_cols:
            frame = frame[:, ::-1]
        return np.ascontiguousarray(frame)


def _orientation(frame: av.VideoFrame) -> _Orientation:
    """Map FFmpeg's display matrix to the transform a player applies.

    In FFmpeg's convention a source pixel (x, y) is shown at (a*x + c*y, b*x + d*y) with
    a, b, c, d = m[0], m[1], m[3], m[4]; rotations other than multiples of 90° are snapped to
    the nearest one, since players that honour them are rare and we need a rectangular frame.
    """
    matrix = None
    for data in frame.side_data:
        if data.type == SideDataType.DISPLAYMATRIX:
            matrix = np.frombuffer(bytes(data), dtype=np.int32)
            break
    if matrix is None or matrix.size < 9:
        return _Orientation()
    a, b, c, d = (float(v) for v in matrix[[0, 1, 3, 4]])
    if max(abs(a), abs(b), abs(c), abs(d)) == 0:
        return _Orientation()
    degrees = frame.rotation  # counter-clockwise, what av_display_rotation_get reports
    if abs(a) >= abs(b):
        result = _Orientation(flip_rows=d < 0, flip_cols=a < 0)
    else:
        # Display row comes from the source column: transpose, then mirror per the signs.
        result = _Orientation(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
    if result.identity:
        if abs(degrees) > 1:
            return _Orientation(note=f"rotation of {degrees}° in metadata ignored (under 45°)")
        return result
    note = _ORIENTATION_NAMES[(result.transpose, result.flip_rows, result.flip_cols)]
    note += " per metadata"
    mirrored = (a * d - b * c) < 0
    if not mirrored and abs(degrees - round(degrees / 90.0) * 90) > 1:
        note += f" (it says {degrees}°; snapped to a multiple of 90°)"
    return _Orientation(result.transpose, result.flip_rows, result.flip_cols, note)


# (transpose, flip rows, flip columns) -> what a person would call it.
_ORIENTATION_NAMES = {
    (False, False, True): "mirrored left-right",
    (False, True, False): "flipped upside down",
    (False, True, True): "rotated 180°",
    (True, True, False): "rotated 90° counter-clockwise",
    (True, False, True): "rotated 90° clockwise",
    (True, False, False): "rotated 90° and mirrored (transposed)",
    (True, True, True): "rotated 90° and mirrored (anti-transposed)",
}


# --------------------------------------------------------------------------------------------
# Opening and probing
# --------------------------------------------------------------------------------------------


def _open_input(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise TokenFlowError(f"video not found: {path} (check the path)")
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise TokenFlowError(
            f"cannot read {path}: it is not a video FFmpeg can open ({error.strerror or error}); "
            "check the file or re-encode it to mp4"
        ) from error


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise TokenFlowError(f"{path} has no video stream: pass a video file or a frames folder")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise TokenFlowError(
            f"{path}: FFmpeg has no decoder for its video codec; re-encode it to H.264 mp4"
        )
    return stream


def _has_audio(container: av.container.InputContainer) -> bool:
    return any(stream.codec_context is not None for stream in container.streams.audio)


def _origin(container: av.container.InputContainer) -> float:
    """Time (s) of the video's first frame: the zero of every clip and audio span."""
    if container.streams.video:
        stream = container.streams.video[0]
        if stream.start_time is not None and stream.time_base is not None:
            return float(stream.start_time * stream.time_base)
    return 0.0


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _average_fps(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """Average rate from the stream, falling back to frames/duration, then FFmpeg's guess."""
    if stream.average_rate is not None and stream.average_rate > 0:
        return float(stream.average_rate)
    duration = _duration(container, stream)
    if stream.frames and duration:
        return stream.frames / duration
    if stream.guessed_rate is not None and stream.guessed_rate > 0:
        return float(stream.guessed_rate)
    return None


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a video (or frames folder) cheaply so the CLI can validate options up front.

    Keys: fps, frames (approximate for some containers), width/height/size (as displayed),
    rotation (degrees counter-clockwise from metadata), has_audio, audio_codec, duration (s),
    codec, pix_fmt.
    """
    path = Path(path)
    if path.is_dir():
        files = _list_frame_files(path)
        with Image.open(files[0]) as image:
            image = ImageOps.exif_transpose(image)
            width, height = image.size
        return {
            "fps": None,
            "frames": len(files),
            "width": width,
            "height": height,
            "size": (width, height),
            "rotation": 0,
            "has_audio": False,
            "audio_codec": None,
            "duration": None,
            "codec": files[0].suffix.lower().lstrip("."),
            "pix_fmt": "rgb24",
        }
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        fps = _average_fps(container, stream)
        duration = _duration(container, stream)
        frames = stream.frames or (round(duration * fps) if duration and fps else 0)
        rotation, orientation = 0, _Orientation()
        with contextlib.suppress(av.FFmpegError, StopIteration):
            first = next(container.decode(stream))
            rotation, orientation = first.rotation, _orientation(first)
        width, height = orientation.displayed_size(stream.width, stream.height)
        audio = next((s for s in container.streams.audio if s.codec_context is not None), None)
        return {
            "fps": fps,
            "frames": int(frames),
            "width": width,
            "height": height,
            "size": (width, height),
            "rotation": rotation,
            "has_audio": audio is not None,
            "audio_codec": audio.codec_context.name if audio is not None else None,
            "duration": duration,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
        }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class _Selection:
    """Which decoded frames to keep: the span, the stride and the cap, checked per frame."""

    start: int | float | None
    end: int | float | None
    stride: int
    max_frames: int | None
    in_span: int = 0
    kept: int = 0

    def before_start(self, index: int, time: float) -> bool:
        if self.start is None:
            return False
        if isinstance(self.start, int):
            return index < self.start
        return time < self.start - TIME_TOLERANCE

    def past_end(self, index: int, time: float) -> bool:
        if self.end is None:
            return False
        if isinstance(self.end, int):
            return index >= self.end
        return time >= self.end - TIME_TOLERANCE

    def full(self) -> bool:
        return self.max_frames is not None and self.kept >= self.max_frames

    def take(self, index: int, time: float) -> bool:
        """Whether frame ``index`` is kept; call once per frame in order, after the end check."""
        if self.before_start(index, time):
            return False
        keep = self.in_span % self.stride == 0
        self.in_span += 1
        if keep:
            self.kept += 1
        return keep


@dataclass
class _Failure:
    ordinal: int
    time: float | None


class _Decoder:
    """Decode one video stream packet by packet, telling trailing damage from mid-stream damage.

    A packet that fails followed by a later packet that decodes is a hole in the middle of the
    clip (the caller decides whether it matters); failures with nothing good after them are a
    truncated tail, reported through ``pending`` once decoding ends.
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.VideoStream,
        origin: float,
        on_hole: Callable[[_Failure], None],
    ) -> None:
        self.container = container
        self.stream = stream
        self.origin = origin
        self.on_hole = on_hole
        self.pending: list[_Failure] = []
        self.decoded = 0

    def _fail(self, ordinal: int, packet: av.Packet | None) -> None:
        time = None
        if packet is not None and packet.pts is not None and packet.time_base is not None:
            time = float(packet.pts * packet.time_base) - self.origin
        self.pending.append(_Failure(ordinal, time))

    def _good_packet(self) -> None:
        holes, self.pending = self.pending, []
        for failure in holes:
            self.on_hole(failure)

    def frames(self) -> Iterator[av.VideoFrame]:
        packets = self.container.demux(self.stream)
        ordinal = 0
        flushed = False
        while not flushed:
            try:
                packet: av.Packet | None = next(packets)
            except StopIteration:
                packet = None
            except av.FFmpegError:
                self._fail(ordinal, None)  # the demuxer cannot go on: treat it as the end
                packet = None
            flushed = packet is None or packet.size == 0
            try:
                frames = self.stream.decode(None if flushed else packet)
            except av.FFmpegError:
                self._fail(ordinal, None if flushed else packet)
                ordinal += 1
                continue
            if not flushed:
                ordinal += 1
                if self.pending:
                    self._good_packet()
            for frame in frames:
                self.decoded += 1
                yield frame


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
    progress: bool = False,
) -> VideoClip:
    """Decode the requested span of a video or frames folder into working-size RGB frames.

    ``start``/``end`` are frame numbers (int) or seconds (float, or strings for ``parse_time``);
    ``end`` is exclusive. Every frame in the span is decoded (so frame numbers stay exact) but only
    the kept ones are converted and stored. ``fps`` sets the rate of a frames folder (default 10)
    or overrides a video's rate when its metadata is wrong.
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
    _check_sizing(size, fit, short_side, multiple, resample)
    if path.is_dir():
        return _read_folder(
            path,
            start,
            end,
            stride,
            max_frames,
            size,
            fit,
            short_side,
            multiple,
            fps,
            resample,
            progress,
        )
    with _open_input(path) as container:
        return _read_container(
            container,
            path,
            start,
            end,
            stride,
            max_frames,
            size,
            fit,
            short_side,
            multiple,
            fps,
            resample,
            progress,
        )


def _check_order(start: int | float | None, end: int | float | None, fps: float) -> None:
    if start is None or end is None:
        return
    if _as_seconds(start, fps) >= _as_seconds(end, fps) - 1e-9:
        raise TokenFlowError(
            f"empty range: start ({_describe_position(start)}) is not before end "
            f"({_describe_position(end)}); end is exclusive"
        )


def _empty_range_error(selection: _Selection, frames: int, fps: float) -> TokenFlowError:
    """Nothing selected: say how long the clip is so the user can pick a range inside it."""
    length = f"{frames} frames, {frames / fps:.2f} s at {fps:g} fps"
    if selection.start is not None:
        return TokenFlowError(
            f"empty range: start ({_describe_position(selection.start)}) is at or beyond the end "
            f"of the clip ({length}); pick an earlier start"
        )
    return TokenFlowError(
        f"empty range: end ({_describe_position(selection.end or 0)}) selects no frames of the "
        f"clip ({length}); pick a later end"
    )


def _read_container(
    container: av.container.InputContainer,
    path: Path,
    start: TimeSpec,
    end: TimeSpec,
    stride: int,
    max_frames: int | None,
    size: tuple[int, int] | None,
    fit: str,
    short_side: int,
    multiple: int,
    fps: float | None,
    resample: str,
    progress: bool,
) -> VideoClip:
    stream = _video_stream(container, path)
    # Keep FFmpeg's default slice threading: frame threading hides the error of a truncated
    # last packet and silently drops the frames still in flight.
    stream.thread_type = "SLICE"
    notes: list[str] = []
    source_fps = _average_fps(container, stream)
    if fps is not None:
        if source_fps is not None and abs(fps - source_fps) > 1e-6 * fps:
            notes.append(f"frame rate set to {fps:g} fps (the file says {source_fps:.3f})")
        source_fps = float(fps)
    if source_fps is None:
        raise TokenFlowError(f"cannot tell the frame rate of {path}: pass fps explicitly")
    start_v = _resolve_time(start, source_fps, "start")
    end_v = _resolve_time(end, source_fps, "end")
    _check_order(start_v, end_v, source_fps)
    selection = _Selection(start_v, end_v, stride, max_frames)
    origin = _origin(container)
    use_pts = fps is None

    def frame_time(frame: av.VideoFrame, index: int) -> float:
        if use_pts and frame.pts is not None and frame.time_base is not None:
            return float(frame.pts * frame.time_base) - origin
        return index / source_fps

    def on_hole(failure: _Failure) -> None:
        if failure.time is not None and selection.past_end(
            round(failure.time * source_fps), failure.time
        ):
            return  # beyond what was asked for: decoding stops before it anyway
        if failure.time is not None:
            where = f"frame {round(failure.time * source_fps)} ({failure.time:.2f} s)"
        else:
            where = f"frame {failure.ordinal} (in decoding order)"
        raise TokenFlowError(
            f"corrupt video: {path} cannot be decoded at {where}; "
            "re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or pick a range before it"
        )

    decoder = _Decoder(container, stream, origin, on_hole)
    kept: list[np.ndarray] = []
    indices: list[int] = []
    times: list[float] = []
    first_time: float | None = None
    plan: _Resize | None = None
    orientation = _Orientation()
    source_size = (stream.width, stream.height)
    alpha_noted = False
    stopped_early = False
    total = stream.frames or None
    bar = tqdm(total=total, unit="frame", desc="reading video", disable=not progress)
    try:
        for index, frame in enumerate(decoder.frames()):
            bar.update(1)
            time = frame_time(frame, index)
            if index == 0:
                orientation = _orientation(frame)
                source_size = orientation.displayed_size(frame.width, frame.height)
                if orientation.note:
                    notes.append(orientation.note)
            if selection.past_end(index, time) or selection.full():
                stopped_early = True
                break
            if not selection.before_start(index, time):
                times.append(time)
            if not selection.take(index, time):
                continue
            if plan is None:
                plan = _start_plan(source_size, size, fit, short_side, multiple, resample, notes)
            if not alpha_noted and any(c.is_alpha for c in frame.format.components):
                alpha_noted = _note_alpha(frame, notes)
            rgb = frame.to_ndarray(format="rgb24")
            kept.append(plan.apply(orientation.apply(rgb)))
            indices.append(index)
            if first_time is None:
                first_time = time
    finally:
        bar.close()

    if decoder.decoded == 0:
        raise TokenFlowError(
            f"no decodable frames in {path}: the file is damaged or empty; re-encode or replace it"
        )
    lost = _lost_frames(decoder, stream, stopped_early, times)
    if lost:
        notes.append(
            f"the last {lost} frame(s) could not be decoded (truncated or damaged file); "
            f"the video ends after frame {decoder.decoded - 1}"
        )
    if not kept:
        length = decoder.decoded if not stopped_early else max(stream.frames, decoder.decoded)
        raise _empty_range_error(selection, length, source_fps)

    if use_pts and _is_variable_rate(times, stream.time_base):
        notes.append(f"variable frame rate: using the average {source_fps:.2f} fps")
    out_fps = source_fps / stride
    start_time = float(first_time or 0.0)
    return VideoClip(
        frames=np.stack(kept),
        fps=out_fps,
        source=path,
        frame_indices=indices,
        start_time=start_time,
        end_time=start_time + len(kept) / out_fps,
        has_audio=_has_audio(container),
        source_size=source_size,
        notes=notes,
    )


def _note_alpha(frame: av.VideoFrame, notes: list[str]) -> bool:
    """Say so when transparency is thrown away; opaque alpha planes (most GIFs) stay silent."""
    alpha = frame.to_ndarray(format="rgba")[..., 3]
    if alpha.min() < 255:
        notes.append("alpha channel dropped: transparent areas show their underlying colour")
        return True
    return False


def _lost_frames(
    decoder: _Decoder, stream: av.VideoStream, stopped_early: bool, times: list[float]
) -> int:
    """How many frames of the requested span a truncated tail cost us (0 when none)."""
    if not decoder.pending:
        return 0
    if stopped_early:
        last = times[-1] if times else None
        for failure in decoder.pending:
            if failure.time is None or last is None or failure.time <= last:
                decoder.on_hole(failure)  # a hole inside what we kept
        return 0
    # The index (when the container has one) knows how many frames the missing tail held.
    by_index = (stream.frames or 0) - decoder.decoded
    return max(len(decoder.pending), by_index)


def _is_variable_rate(times: list[float], time_base: Fraction | None) -> bool:
    """Frame durations that differ by more than ~1% (or one timestamp tick) mean VFR."""
    if len(times) < 3:
        return False
    deltas = np.diff(np.asarray(times, dtype=np.float64))
    typical = float(np.median(deltas))
    if typical <= 0:
        return True
    tick = float(time_base) if time_base else 0.0
    tolerance = max(0.01 * typical, 1.5 * tick)
    return bool(np.max(np.abs(deltas - typical)) > tolerance)


# --------------------------------------------------------------------------------------------
# Frame folders
# --------------------------------------------------------------------------------------------


def _list_frame_files(folder: Path) -> list[Path]:
    """Numbered frames in numeric order; gaps, duplicates and mixed formats are user errors."""
    numbered: dict[int, Path] = {}
    suffixes: set[str] = set()
    for entry in folder.iterdir():
        match = _FRAME_NAME.match(entry.name)
        if not match or match.group(2).lower() not in FRAME_EXTENSIONS or not entry.is_file():
            continue
        number = int(match.group(1))
        if number in numbered:
            raise TokenFlowError(
                f"frames folder {folder} has two files for frame {number} "
                f"({numbered[number].name}, {entry.name}): keep one"
            )
        numbered[number] = entry
        suffixes.add(match.group(2).lower())
    if not numbered:
        raise TokenFlowError(
            f"frames folder {folder} has no numbered frames: expected 00000.png, 00001.png, ... "
            "(or .jpg/.jpeg)"
        )
    if len(suffixes) > 1:
        raise TokenFlowError(
            f"frames folder {folder} mixes {', '.join(sorted(suffixes))} files: convert them to "
            "one format"
        )
    numbers = sorted(numbered)
    for expected, number in enumerate(numbers, start=numbers[0]):
        if number != expected:
            raise TokenFlowError(
                f"frames folder {folder} is missing frame {expected} (found {numbers[0]}.."
                f"{numbers[-1]}): renumber the frames without gaps"
            )
    return [numbered[n] for n in numbers]


def _load_image(path: Path) -> tuple[np.ndarray, bool, bool]:
    """8-bit RGB pixels of one frame file, plus whether it was EXIF-rotated or had alpha."""
    try:
        with Image.open(path) as opened:
            rotated = opened.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
            image = ImageOps.exif_transpose(opened)
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.uint32)
                image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
            return np.array(image.convert("RGB")), rotated, alpha
    except (OSError, ValueError) as error:
        raise TokenFlowError(f"cannot read frame {path}: {error}; replace the file") from error


def _read_folder(
    folder: Path,
    start: TimeSpec,
    end: TimeSpec,
    stride: int,
    max_frames: int | None,
    size: tuple[int, int] | None,
    fit: str,
    short_side: int,
    multiple: int,
    fps: float | None,
    resample: str,
    progress: bool,
) -> VideoClip:
    files = _list_frame_files(folder)
    notes: list[str] = []
    if fps is None:
        fps = DEFAULT_FOLDER_FPS
        notes.append(f"frames folder: no fps given, using {fps:g} fps")
    fps = float(fps)
    start_v = _resolve_time(start, fps, "start")
    end_v = _resolve_time(end, fps, "end")
    _check_order(start_v, end_v, fps)
    selection = _Selection(start_v, end_v, stride, max_frames)
    plan: _Resize | None = None
    source_size: tuple[int, int] | None = None
    kept: list[np.ndarray] = []
    indices: list[int] = []
    any_rotated = any_alpha = False
    for index in tqdm(range(len(files)), unit="frame", desc="reading frames", disable=not progress):
        time = index / fps
        if selection.past_end(index, time) or selection.full():
            break
        if not selection.take(index, time):
            continue
        pixels, rotated, alpha = _load_image(files[index])
        any_rotated, any_alpha = any_rotated or rotated, any_alpha or alpha
        height, width = pixels.shape[:2]
        if source_size is None:
            source_size = (width, height)
            plan = _start_plan(source_size, size, fit, short_side, multiple, resample, notes)
        elif (width, height) != source_size:
            raise TokenFlowError(
                f"frame {files[index].name} is {width}x{height} but the first frame is "
                f"{source_size[0]}x{source_size[1]}: all frames must have the same size"
            )
        assert plan is not None
        kept.append(plan.apply(pixels))
        indices.append(index)
    if not kept:
        raise _empty_range_error(selection, len(files), fps)
    if any_rotated:
        notes.append("rotated per EXIF orientation")
    if any_alpha:
        notes.append("alpha channel dropped: transparent areas show their underlying colour")
    out_fps = fps / stride
    start_time = indices[0] / fps
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, H, W, 3) with N >= 1, got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB, got {array.dtype}")
    return array


def _check_fps(fps: float) -> Fraction:
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


def _check_destination(path: Path) -> None:
    if not path.parent.is_dir():
        raise TokenFlowError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise TokenFlowError(f"cannot write {path}: a folder with that name exists")


def _sibling(path: Path, tag: str) -> Path:
    """An unused hidden name beside ``path`` (same filesystem, so the final rename is atomic).

    Unlike ``tempfile.mkstemp`` this leaves creation to the writer, so the result gets the
    user's normal permissions instead of 0600.
    """
    while True:
        candidate = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.{tag}{path.suffix}")
        if not candidate.exists():
            return candidate


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it over ``path`` only if the body succeeds."""
    _check_destination(path)
    temporary = _sibling(path, "part")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column rather than add a black line."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return np.ascontiguousarray(frame)
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float,
    *,
    audio_source: str | os.PathLike[str] | None = None,
    audio_span: tuple[float, float] | None = None,
    crf: int = 18,
) -> None:
    """Write H.264/yuv420p with faststart (plays in browsers), optionally with the source's audio.

    ``audio_span`` is the (start, end) of the source, in seconds from its first video frame,
    that the frames cover (``clip.start_time``, ``clip.end_time``); that stretch of the source
    audio is copied so sound stays in sync with the edit.
    """
    array = _check_frames(frames)
    _encode_video(
        Path(path),
        iter(array),
        array.shape[2],
        array.shape[1],
        fps,
        audio_source=audio_source,
        audio_span=audio_span,
        crf=crf,
    )


def write_side_by_side(
    path: str | os.PathLike[str],
    left: np.ndarray,
    right: np.ndarray,
    fps: float,
    *,
    audio_source: str | os.PathLike[str] | None = None,
    audio_span: tuple[float, float] | None = None,
) -> None:
    """Write source | edited as one video so the edit can be judged frame by frame."""
    left_a, right_a = _check_frames(left, "left"), _check_frames(right, "right")
    if left_a.shape[:2] != right_a.shape[:2]:
        raise ValueError(
            "left and right need the same frame count and height, got "
            f"{left_a.shape[:3]} and {right_a.shape[:3]}"
        )
    joined = (np.concatenate([a, b], axis=1) for a, b in zip(left_a, right_a, strict=True))
    width = left_a.shape[2] + right_a.shape[2]
    _encode_video(
        Path(path),
        joined,
        width,
        left_a.shape[1],
        fps,
        audio_source=audio_source,
        audio_span=audio_span,
        crf=18,
    )


def _encode_video(
    path: Path,
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    fps: float,
    *,
    audio_source: str | os.PathLike[str] | None,
    audio_span: tuple[float, float] | None,
    crf: int,
) -> None:
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
    rate = _check_fps(fps)
    container_format = VIDEO_SUFFIXES[suffix]
    options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
    with _atomic_file(path) as temporary, contextlib.ExitStack() as stack:
        output = stack.enter_context(
            av.open(str(temporary), mode="w", format=container_format, options=options)
        )
        stream = output.add_stream("libx264", rate=rate, options={"crf": str(crf)})
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        audio = _AudioCopy.prepare(stack, output, container_format, audio_source, audio_span)
        frame_seconds = 1 / rate
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_even(pixels), format="rgb24")
            frame.pts = index
            if audio is not None:
                audio.mux_until(float(index * frame_seconds))
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
        if audio is not None:
            audio.mux_until(math.inf)


@dataclass
class _AudioCopy:
    """Audio packets for the output, prepared up front and interleaved with the video."""

    output: av.container.OutputContainer
    packets: list[av.Packet]
    times: list[float]
    position: int = 0

    @classmethod
    def prepare(
        cls,
        stack: contextlib.ExitStack,
        output: av.container.OutputContainer,
        container_format: str,
        audio_source: str | os.PathLike[str] | None,
        audio_span: tuple[float, float] | None,
    ) -> _AudioCopy | None:
        """Open the source's audio and build packets for the span; None when there is none."""
        if audio_source is None:
            return None
        source = Path(audio_source)
        if source.is_dir():
            return None  # frames folders have no sound
        source_container = stack.enter_context(_open_input(source))
        streams = [s for s in source_container.streams.audio if s.codec_context is not None]
        if not streams:
            return None
        span = _check_span(audio_span)
        stream = streams[0]
        origin = _origin(source_container)
        name = stream.codec_context.name
        remux = name in REMUX_AUDIO_CODECS and container_format in ("mp4", "mov", "matroska")
        if remux:
            packets = _audio_packets(source_container, stream, origin, span[1])
            if all(p.pts is not None for p in packets):
                return cls._remux(output, stream, packets, origin, span)
            source_container.seek(0)
        return cls._transcode(output, source_container, stream, origin, span)

    @classmethod
    def _remux(
        cls,
        output: av.container.OutputContainer,
        stream: av.AudioStream,
        packets: list[av.Packet],
        origin: float,
        span: tuple[float, float],
    ) -> _AudioCopy | None:
        """Copy compressed packets whose centre lies in the span: no generation loss."""
        start, end = span
        chosen = []
        for packet in packets:
            begin = float(packet.pts * packet.time_base) - origin
            length = float((packet.duration or 0) * packet.time_base)
            if start <= begin + length / 2 < end:
                chosen.append((begin, packet))
        if not chosen:
            return None
        out_stream = output.add_stream_from_template(stream)
        time_base = chosen[0][1].time_base
        shift = max(0, round((chosen[0][0] - start) / time_base)) - chosen[0][1].pts
        result, times = [], []
        for begin, packet in chosen:
            packet.pts += shift
            packet.dts = packet.pts
            packet.stream = out_stream
            result.append(packet)
            times.append(begin - start)
        return cls(output, result, times)

    @classmethod
    def _transcode(
        cls,
        output: av.container.OutputContainer,
        source: av.container.InputContainer,
        stream: av.AudioStream,
        origin: float,
        span: tuple[float, float],
    ) -> _AudioCopy | None:
        """Decode, cut to the exact sample and encode AAC, for codecs mp4 cannot carry."""
        start, end = span
        rate = stream.codec_context.sample_rate
        if rate not in AAC_RATES:
            rate = 48000
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"  # AAC-safe
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks: list[np.ndarray] = []
        first: float | None = None
        count = 0
        for decoded in _decoded_audio(source, stream):
            if first is None and decoded.pts is not None and decoded.time_base is not None:
                first = float(decoded.pts * decoded.time_base) - origin
            for converted in resampler.resample(decoded):
                chunks.append(converted.to_ndarray())
                count += chunks[-1].shape[1]
            if (first or 0.0) + count / rate > end + 1:
                break
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
        if not chunks:
            return None
        samples = np.concatenate(chunks, axis=1).astype(np.float32)
        offset = round(((first or 0.0) - start) * rate)  # where the source audio begins in ours
        if offset >= 0:
            samples = np.concatenate([np.zeros((samples.shape[0], offset), np.float32), samples], 1)
        else:
            samples = samples[:, -offset:]
        if math.isfinite(end):
            samples = samples[:, : max(0, round((end - start) * rate))]
        if samples.shape[1] == 0:
            return None
        out_stream = output.add_stream("aac", rate=rate, layout=layout)
        packets: list[av.Packet] = []
        block = 1024
        for position in range(0, samples.shape[1], block):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, position : position + block]),
                format="fltp",
                layout=layout,
            )
            frame.sample_rate = rate
            frame.pts = position
            frame.time_base = Fraction(1, rate)
            packets.extend(out_stream.encode(frame))
        packets.extend(out_stream.encode(None))
        times = [float(p.pts * p.time_base) if p.pts is not None else 0.0 for p in packets]
        return cls(output, packets, times)

    def mux_until(self, seconds: float) -> None:
        """Mux audio up to ``seconds`` so the file stays interleaved for streaming."""
        while self.position < len(self.packets) and self.times[self.position] <= seconds:
            self.output.mux(self.packets[self.position])
            self.position += 1


def _audio_packets(
    container: av.container.InputContainer, stream: av.AudioStream, origin: float, end: float
) -> list[av.Packet]:
    """Compressed audio up to a second past ``end``; damage ends the list instead of failing."""
    packets: list[av.Packet] = []
    iterator = container.demux(stream)
    while True:
        try:
            packet = next(iterator)
        except (StopIteration, av.FFmpegError):
            return packets
        if not packet.size:
            continue
        packets.append(packet)
        if packet.pts is not None and float(packet.pts * packet.time_base) - origin > end + 1:
            return packets


def _decoded_audio(
    container: av.container.InputContainer, stream: av.AudioStream
) -> Iterator[av.AudioFrame]:
    """Audio frames, stopping quietly at damage: a clipped sound track beats no video at all."""
    iterator = container.decode(stream)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except av.FFmpegError:
            return


def _check_span(span: tuple[float, float] | None) -> tuple[float, float]:
    if span is None:
        return 0.0, math.inf
    start, end = float(span[0]), float(span[1])
    if not (start >= 0 and end > start):
        raise ValueError(f"audio_span must be (start, end) with 0 <= start < end, got {span}")
    return start, end


def write_gif(path: str | os.PathLike[str], frames: np.ndarray, fps: float) -> None:
    """Write a looping GIF for quick previews (e.g. in a README); timing is kept to 10 ms."""
    array = _check_frames(frames)
    rate = _check_fps(fps)
    path = Path(path)
    if rate > 50:
        warnings.warn(
            f"GIF at {float(rate):g} fps: browsers slow frames shorter than 20 ms down to 100 ms",
            stacklevel=2,
        )
    # GIF delays are whole centiseconds; spread the rounding so the total length stays right.
    ticks = [round(i * 100 / rate) for i in range(len(array) + 1)]
    durations = [max(1, b - a) * 10 for a, b in zip(ticks, ticks[1:], strict=False)]
    images = [Image.fromarray(frame, "RGB") for frame in array]
    with _atomic_file(path) as temporary:
        images[0].save(
            temporary,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=durations,
            loop=0,
        )


def write_frames(folder: str | os.PathLike[str], frames: np.ndarray) -> None:
    """Write 00000.png, 00001.png, ... (8-bit RGB), replacing an earlier frames folder atomically.

    An existing folder is replaced only if it holds nothing but numbered frames, so a mistyped
    path never deletes unrelated files.
    """
    array = _check_frames(np.asarray(frames))
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise TokenFlowError(f"cannot write {folder}: folder {folder.parent} does not exist")
    if folder.exists():
        if not folder.is_dir():
            raise TokenFlowError(f"cannot write frames to {folder}: it is a file; pick a folder")
        strangers = [p.name for p in folder.iterdir() if not _is_frame_file(p)]
        if strangers:
            raise TokenFlowError(
                f"cannot write frames to {folder}: it holds other files ({strangers[0]}, ...); "
                "pick an empty or new folder"
            )
    temporary = _sibling(folder, "part")
    temporary.mkdir()
    try:
        for index, frame in enumerate(array):
            Image.fromarray(frame, "RGB").save(temporary / f"{index:05d}.png", compress_level=4)
        if folder.exists():
            _swap_folder(temporary, folder)
        else:
            os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _swap_folder(new: Path, folder: Path) -> None:
    """Replace ``folder`` by ``new``; if that fails half-way the previous frames are put back."""
    old = _sibling(folder, "old")
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_frame_file(path: Path) -> bool:
    match = _FRAME_NAME.match(path.name)
    return bool(match) and match.group(2).lower() in FRAME_EXTENSIONS and path.is_file()
