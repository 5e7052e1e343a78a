"""The source file: opening it, what its header claims, and decoding its packets.

Header values (rate, frame count, duration) are estimates for probing and progress; the frames'
own timestamps decide timing (see ``timing``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from PIL import Image, ImageOps

from ..errors import TokenFlowError
from .folders import list_frame_files
from .orientation import Orientation, orientation_of
from .timing import measure_rate

# A header rate this far (relative) from the one the timestamps give is worth a note.
RATE_MISMATCH = 0.01
# Packets whose stamps ``probe_video`` reads to check the header's rate.
PROBE_PACKETS = 64


# --------------------------------------------------------------------------------------------
# Opening and probing
# --------------------------------------------------------------------------------------------


def open_input(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise TokenFlowError(f"video not found: {path} (check the path)")
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise TokenFlowError(
            f"cannot read {path}: it is not a video FFmpeg can open ({error.strerror or error}); "
            "check the file or re-encode it to mp4"
        ) from error


def video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise TokenFlowError(f"{path} has no video stream: pass a video file or a frames folder")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise TokenFlowError(
            f"{path}: FFmpeg has no decoder for its video codec; re-encode it to H.264 mp4"
        )
    return stream


def has_audio(container: av.container.InputContainer) -> bool:
    return any(stream.codec_context is not None for stream in container.streams.audio)


def video_origin(container: av.container.InputContainer) -> float | None:
    """Time (s) on the file's clock where the video starts: the zero of clips and audio spans."""
    if container.streams.video:
        stream = container.streams.video[0]
        if stream.start_time is not None and stream.time_base is not None:
            return float(stream.start_time * stream.time_base)
    return None


def header_duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def header_rate(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """The rate the header claims: an estimate only, the timestamps decide."""
    if stream.average_rate is not None and stream.average_rate > 0:
        return float(stream.average_rate)
    duration = header_duration(container, stream)
    if stream.frames and duration:
        return stream.frames / duration
    if stream.guessed_rate is not None and stream.guessed_rate > 0:
        return float(stream.guessed_rate)
    return None


def header_frames(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    if stream.frames:
        return int(stream.frames)
    duration, rate = header_duration(container, stream), header_rate(container, stream)
    return round(duration * rate) if duration and rate else 0


def _stamped_rate(path: Path) -> float | None:
    """Constant rate shown by the first packets' timestamps (no decoding), None if not constant."""
    with open_input(path) as container:
        stream = container.streams.video[0]
        if stream.time_base is None:
            return None
        stamps: list[int] = []
        with contextlib.suppress(av.FFmpegError):
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    stamps.append(packet.pts)
                if len(stamps) >= PROBE_PACKETS:
                    break
        times = [float(s * stream.time_base) for s in sorted(stamps)]
        rate = measure_rate(times, float(stream.time_base))
        return float(rate) if rate is not None else None


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a video (or frames folder) cheaply so the CLI can validate options up front.

    Keys: fps, frames (approximate for some containers), width/height/size (as displayed),
    rotation (degrees counter-clockwise from metadata), has_audio, audio_codec, duration (s),
    codec, pix_fmt. ``fps`` is the header's rate unless the first packets' timestamps show a
    different constant rate; ``read_clip`` measures the exact timing of the frames it reads.
    """
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
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
    with open_input(path) as container:
        stream = video_stream(container, path)
        fps = header_rate(container, stream)
        duration = header_duration(container, stream)
        frames = header_frames(container, stream)
        stamped = _stamped_rate(path)
        if stamped is not None and (fps is None or abs(stamped / fps - 1) > RATE_MISMATCH):
            fps = stamped
            frames = round(duration * fps) if duration else frames
        rotation, orientation = 0, Orientation()
        with contextlib.suppress(av.FFmpegError, StopIteration):
            first = next(container.decode(stream))
            rotation, orientation = first.rotation, orientation_of(first)
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
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass
class Failure:
    ordinal: int  # packet number in decoding order
    time: float | None  # the packet's stamp (s, on the file's clock) when it has one


class Decoder:
    """Decode one video stream packet by packet, telling trailing damage from mid-stream damage.

    A packet that fails followed by a later packet that decodes is a hole in the middle of the
    clip (the caller decides whether it matters); failures with nothing good after them are a
    truncated tail, reported through ``pending`` once decoding ends. ``presentation_stamps``
    turns true once the packets' stamps go backwards, i.e. they are presentation stamps rather
    than decode-order ones (see ``Presenter``).
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.VideoStream,
        on_hole: Callable[[Failure], None],
    ) -> None:
        self.container = container
        self.stream = stream
        self.on_hole = on_hole
        self.pending: list[Failure] = []
        self.decoded = 0
        self.presentation_stamps = False
        self._last_stamp: int | None = None

    def _fail(self, ordinal: int, packet: av.Packet | None) -> None:
        time = None
        if packet is not None and packet.pts is not None and packet.time_base is not None:
            time = float(packet.pts * packet.time_base)
        self.pending.append(Failure(ordinal, time))

    def _good_packet(self) -> None:
        holes, self.pending = self.pending, []
        for failure in holes:
            self.on_hole(failure)

    def _watch_stamp(self, packet: av.Packet) -> None:
        if packet.pts is None:
            return
        if self._last_stamp is not None and packet.pts < self._last_stamp:
            self.presentation_stamps = True
        self._last_stamp = packet.pts

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
            if packet is not None and not flushed:
                self._watch_stamp(packet)
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
