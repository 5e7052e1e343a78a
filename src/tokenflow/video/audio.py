"""The source's sound for an output video: the span the frames cover, kept in sync.

AAC and MP3 are copied packet by packet (no generation loss); other codecs are decoded, cut to
the exact sample and encoded as AAC. When the picture lasts longer or shorter than the span
(after a frame-rate override) the sound is time-stretched with FFmpeg's ``atempo`` filter, which
keeps the pitch, so sound and picture end together.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .source import open_input, video_origin

REMUX_AUDIO_CODECS = {"aac", "mp3"}
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
# Span and picture lengths closer than this (s) need no stretching: the drift stays unnoticeable.
SYNC_SLACK = 0.01
# One atempo instance takes factors from 0.5 to 100; more change needs a chain of them.
ATEMPO_RANGE = (0.5, 100.0)
MAX_ATEMPO_CHAIN = 8
BLOCK = 1024  # samples per AAC frame


@dataclass
class AudioTrack:
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
        picture_seconds: float,
    ) -> tuple[AudioTrack | None, list[str]]:
        """Build the packets for the span, plus notes; None when there is no sound to add.

        ``picture_seconds`` is how long the written frames play: a span of another length is
        time-stretched to it.
        """
        if audio_source is None:
            return None, []
        source = Path(audio_source)
        if source.is_dir():
            return None, []  # frames folders have no sound
        source_container = stack.enter_context(open_input(source))
        streams = [s for s in source_container.streams.audio if s.codec_context is not None]
        if not streams:
            return None, []
        start, end = check_span(audio_span)
        stream = streams[0]
        origin = video_origin(source_container) or 0.0
        if math.isfinite(end) and abs((end - start) - picture_seconds) > SYNC_SLACK:
            span = (start, end)
            return cls._stretched(output, source_container, stream, origin, span, picture_seconds)
        name = stream.codec_context.name
        if name in REMUX_AUDIO_CODECS and container_format in ("mp4", "mov", "matroska"):
            packets = _audio_packets(source_container, stream, origin, end)
            if all(p.pts is not None for p in packets):
                return cls._remux(output, stream, packets, origin, (start, end)), []
            source_container.seek(0)
        decoded = _span_samples(source_container, stream, origin, (start, end))
        return (cls._encode(output, *decoded) if decoded else None), []

    @classmethod
    def _remux(
        cls,
        output: av.container.OutputContainer,
        stream: av.AudioStream,
        packets: list[av.Packet],
        origin: float,
        span: tuple[float, float],
    ) -> AudioTrack | None:
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
    def _stretched(
        cls,
        output: av.container.OutputContainer,
        source: av.container.InputContainer,
        stream: av.AudioStream,
        origin: float,
        span: tuple[float, float],
        picture_seconds: float,
    ) -> tuple[AudioTrack | None, list[str]]:
        """The span's sound played at the picture's speed, pitch kept, or a note saying why not."""
        decoded = _span_samples(source, stream, origin, span)
        if decoded is None:
            return None, []
        samples, rate, layout = decoded
        tempo = (span[1] - span[0]) / picture_seconds
        try:
            stretched = time_stretch(samples, rate, layout, tempo)
        except (av.FFmpegError, ValueError) as error:
            return None, [
                f"audio dropped: it could not be time-stretched to {tempo:.3g}x speed to stay "
                f"in sync with the picture ({error})"
            ]
        length = round(picture_seconds * rate)
        stretched = stretched[:, :length]
        if stretched.shape[1] < length and samples.shape[1] >= round((span[1] - span[0]) * rate):
            # atempo may come up a few milliseconds short: pad so sound and picture end together.
            pad = np.zeros((stretched.shape[0], length - stretched.shape[1]), np.float32)
            stretched = np.concatenate([stretched, pad], axis=1)
        track = cls._encode(output, stretched, rate, layout)
        note = f"audio time-stretched to {tempo:.3g}x speed (pitch kept) to match the picture"
        return track, [note]

    @classmethod
    def _encode(
        cls, output: av.container.OutputContainer, samples: np.ndarray, rate: int, layout: str
    ) -> AudioTrack | None:
        """AAC packets for float samples (channels, n)."""
        if samples.shape[1] == 0:
            return None
        out_stream = output.add_stream("aac", rate=rate, layout=layout)
        packets: list[av.Packet] = []
        for position in range(0, samples.shape[1], BLOCK):
            frame = _audio_frame(samples[:, position : position + BLOCK], rate, layout, position)
            packets.extend(out_stream.encode(frame))
        packets.extend(out_stream.encode(None))
        times = [float(p.pts * p.time_base) if p.pts is not None else 0.0 for p in packets]
        return cls(output, packets, times)

    def mux_until(self, seconds: float) -> None:
        """Mux audio up to ``seconds`` so the file stays interleaved for streaming."""
        while self.position < len(self.packets) and self.times[self.position] <= seconds:
            self.output.mux(self.packets[self.position])
            self.position += 1


def _audio_frame(samples: np.ndarray, rate: int, layout: str, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = Fraction(1, rate)
    return frame


def _span_samples(
    source: av.container.InputContainer,
    stream: av.AudioStream,
    origin: float,
    span: tuple[float, float],
) -> tuple[np.ndarray, int, str] | None:
    """Decode the span to float samples (channels, n) at an AAC-safe rate and layout."""
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
    return samples, rate, layout


def atempo_chain(tempo: float) -> list[float]:
    """Factors within atempo's range whose product is ``tempo``."""
    if not math.isfinite(tempo) or tempo <= 0:
        raise ValueError(f"speed {tempo!r} is not a positive number")
    low, high = ATEMPO_RANGE
    factors, rest = [], tempo
    while rest < low:
        factors.append(low)
        rest /= low
    while rest > high:
        factors.append(high)
        rest /= high
    factors.append(rest)
    if len(factors) > MAX_ATEMPO_CHAIN:
        raise ValueError(f"a speed change of {tempo:.3g}x is too large")
    return factors


def time_stretch(samples: np.ndarray, rate: int, layout: str, tempo: float) -> np.ndarray:
    """Play ``samples`` (channels, n) ``tempo`` times faster, pitch kept, via FFmpeg's atempo."""
    graph = av.filter.Graph()
    source = graph.add_abuffer(
        format="fltp", sample_rate=rate, layout=layout, time_base=Fraction(1, rate)
    )
    chain = [source]
    chain += [graph.add("atempo", f"{factor:.9f}") for factor in atempo_chain(tempo)]
    chain += [graph.add("aformat", "sample_fmts=fltp"), graph.add("abuffersink")]
    for a, b in zip(chain, chain[1:], strict=False):
        a.link_to(b)
    graph.configure()
    out: list[np.ndarray] = []

    def drain() -> None:
        while True:
            try:
                out.append(graph.pull().to_ndarray())
            except (av.BlockingIOError, av.EOFError):
                return

    step = 8 * BLOCK
    for position in range(0, samples.shape[1], step):
        graph.push(_audio_frame(samples[:, position : position + step], rate, layout, position))
        drain()
    graph.push(None)
    drain()
    if not out:
        return np.zeros((samples.shape[0], 0), np.float32)
    return np.concatenate(out, axis=1).astype(np.float32)


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


def check_span(span: tuple[float, float] | None) -> tuple[float, float]:
    if span is None:
        return 0.0, math.inf
    start, end = float(span[0]), float(span[1])
    if not (start >= 0 and end > start):
        raise ValueError(f"audio_span must be (start, end) with 0 <= start < end, got {span}")
    return start, end
