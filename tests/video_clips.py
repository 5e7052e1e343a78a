"""Small synthetic clips for the video tests, made with PyAV so no binary fixtures are needed.

Frames carry a bright block in the stored top-left corner, so orientation can be checked after
decoding, and change from frame to frame, so dropped or repeated frames would be noticed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

MARKER = 16  # side of the top-left marker block, big enough to survive compression


def pattern_frames(count: int, width: int, height: int) -> np.ndarray:
    """Dark gradient frames with a white top-left marker and a moving grey bar per frame."""
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 90 // max(width, 1), ys * 90 // max(height, 1), np.full_like(xs, 40)], -1)
    frames = np.repeat(base[None].astype(np.uint8), count, axis=0)
    for index in range(count):
        column = (index * 7) % max(width - 8, 1)
        frames[index, height // 2 :, column : column + 8] = 160
    frames[:, :MARKER, :MARKER] = 255
    return frames


def write_clip(
    path: Path,
    frames: np.ndarray,
    fps: int | Fraction = 10,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: float | None = None,
    pts_ms: Sequence[int] | None = None,
    audio: dict | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode ``frames`` (RGB or RGBA) into ``path``; the container follows the suffix.

    ``pts_ms`` gives each frame's timestamp in milliseconds (for variable frame rate clips);
    ``audio`` adds a tone track: {"codec": "aac", "rate": 44100, "seconds": 2.0}, whose loudness
    grows linearly with time so a cut can be located from its level.
    """
    with av.open(str(path), mode="w", options=container_options or {}) as output:
        stream = output.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio is not None:
            audio_stream = output.add_stream(audio["codec"], rate=audio["rate"], layout="stereo")
        source_format = "rgba" if frames.shape[-1] == 4 else "rgb24"
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=source_format)
            if pts_ms is not None:
                frame.pts = pts_ms[index]
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = index
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
        if audio_stream is not None:
            _write_tone(output, audio_stream, audio["rate"], audio["seconds"])
    return path


def tone(rate: int, seconds: float) -> np.ndarray:
    """Stereo 440 Hz tone whose amplitude rises linearly from 0 to 0.8 over ``seconds``."""
    t = np.arange(round(rate * seconds)) / rate
    wave = (0.8 * t / seconds * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([wave, wave])


def _write_tone(output, stream, rate: int, seconds: float) -> None:
    samples = tone(rate, seconds)
    encoder_format = stream.codec_context.format.name
    block = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], block):
        chunk = samples[:, start : start + block]
        if encoder_format == "s16":
            data = (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
        elif encoder_format == "fltp":
            data = np.ascontiguousarray(chunk)
        else:
            raise ValueError(f"tone writer does not handle {encoder_format}")
        frame = av.AudioFrame.from_ndarray(data, format=encoder_format, layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        output.mux(stream.encode(frame))
    output.mux(stream.encode(None))


def decode_rgb(path: Path) -> np.ndarray:
    """Reference decode: every frame through PyAV's own rgb24 conversion, nothing else."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def audio_info(path: Path) -> tuple[str, float, np.ndarray]:
    """Codec, duration in seconds and decoded mono samples of a file's first audio track."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = [
            converted.to_ndarray().reshape(-1)
            for frame in container.decode(stream)
            for converted in mono.resample(frame)
        ]
        chunks += [converted.to_ndarray().reshape(-1) for converted in mono.resample(None)]
        name = stream.codec_context.name
    samples = np.concatenate(chunks).astype(np.float64)
    return name, samples.size / rate, samples


def faststart_copy(source: Path, target: Path) -> Path:
    """Remux with the index at the front, so a cut-off copy can still be opened."""
    with (
        av.open(str(source)) as inp,
        av.open(str(target), "w", options={"movflags": "+faststart"}) as out,
    ):
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)
    return target


def packet_spans(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of every video packet in decode order, for targeted damage."""
    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(video=0) if p.size]


def damage_packets(source: Path, target: Path, which: Sequence[int]) -> Path:
    """Copy ``source`` and break the listed packets' NAL length prefix so they fail to decode."""
    data = bytearray(source.read_bytes())
    spans = packet_spans(source)
    for index in which:
        offset, _ = spans[index]
        data[offset : offset + 4] = b"\xff\xff\xff\xff"
    target.write_bytes(bytes(data))
    return target


# ------------------------------------------------------------------ clips with tricky timing

CODE_BITS = 6  # frame numbers up to 63, written as black/white 8x8 blocks along the top


def numbered_frames(count: int, width: int = 64, height: int = 48) -> np.ndarray:
    """``pattern_frames`` that also carry their own number, so order and drops can be read back."""
    frames = pattern_frames(count, width, height)
    for index in range(count):
        for bit in range(CODE_BITS):
            value = 255 if (index >> bit) & 1 else 0
            left = MARKER + 8 * bit
            frames[index, :8, left : left + 8] = value
    return frames


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Read back the numbers ``numbered_frames`` wrote."""
    numbers = []
    for frame in frames:
        bits = [frame[2:6, MARKER + 8 * b + 2 : MARKER + 8 * b + 6].mean() > 128 for b in range(6)]
        numbers.append(sum(1 << b for b, on in enumerate(bits) if on))
    return numbers


def write_lying_avi(
    path: Path, frames: np.ndarray, seconds: Sequence[float], header_fps: int = 15
) -> Path:
    """An MJPEG AVI whose header says ``header_fps`` but whose frames sit at ``seconds``.

    AVI has no timestamps of its own: the muxer fills each gap with empty "dropped frame" chunks,
    so the header counts every slot at the header rate while only ``len(frames)`` pictures exist,
    which is what capture tools produce when they cannot keep up with the rate they declared.
    """
    with av.open(str(path), mode="w") as output:
        stream = output.add_stream("mjpeg", rate=header_fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p"
        for pixels, second in zip(frames, seconds, strict=True):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = round(second * header_fps)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def write_bframe_avi(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    """H.264 with B-frames in AVI: the container keeps decode-order stamps only.

    The decoder hands the pictures out in presentation order, each still carrying the stamp of
    its own packet, so the stamps it reports jump back and forth (1, 3, 4, 5, 2, ...).
    """
    with av.open(str(path), mode="w") as output:
        params = "bframes=3:b-adapt=0:b-pyramid=none:keyint=12"
        stream = output.add_stream("libx264", rate=fps, options={"x264-params": params})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def write_shuffled_mkv(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    """Intra-only frames stored out of presentation order, with correct presentation stamps.

    Frames are stored in groups of three as (n+1, n+2, n): an intra codec decodes them in that
    order, so only the timestamps say which picture comes first.
    """
    step = 1000 // fps  # milliseconds per frame; Matroska counts in ms
    with av.open(str(path), mode="w", format="matroska") as output:
        stream = output.add_stream("mjpeg", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p"
        packets = []
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            packets.extend(stream.encode(frame))
        packets.extend(stream.encode(None))
        order = [i for n in range(0, len(packets), 3) for i in (n + 1, n + 2, n)]
        order = [i for i in order if i < len(packets)]
        for stored, index in enumerate(order):
            packet = packets[index]
            packet.time_base = Fraction(1, 1000)
            packet.pts = index * step
            packet.dts = (stored - 2) * step  # decode stamps rise; each pts is at or after its dts
            packet.duration = step
            packet.stream = stream
            output.mux(packet)
    return path


def frame_times(path: Path) -> tuple[list[float], float]:
    """Each frame's presentation time and the end of the last one, in seconds from the first.

    Read from the packets, so it tells what a player is told, independent of the reader under test.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size and p.pts is not None]
        starts = sorted(float(p.pts * p.time_base) for p in packets)
        end = max(float((p.pts + (p.duration or 0)) * p.time_base) for p in packets)
    return [t - starts[0] for t in starts], end - starts[0]


def level(samples: np.ndarray, rate: int, second: float, window: float = 0.1) -> float:
    """RMS loudness of ``samples`` in a ``window`` centred on ``second``."""
    middle, half = round(second * rate), round(window * rate / 2)
    chunk = samples[max(0, middle - half) : middle + half]
    return float(np.sqrt(np.mean(chunk**2)))


def pitch(samples: np.ndarray, rate: int) -> float:
    """Strongest frequency (Hz) of ``samples``."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


# ------------------------------------------------------------------ shared test helpers

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WOMAN = DATA / "woman-running.mp4"
WOLF = DATA / "wolf.mp4"


def real(path: Path) -> Path:
    """A real clip from shared/data, or a skip when this checkout has none."""
    if not path.exists():
        pytest.skip(f"{path} is missing (the CI checks shared/ out beside the repo)")
    return path


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in ``folder`` other than ``keep``: temporary files a writer failed to clean up."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
