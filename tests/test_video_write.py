"""Properties of video writing: timing, atomic files, side by side, GIFs and the source's sound."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from video_clips import audio_info, leftovers, pattern_frames, psnr, write_clip

from tokenflow.errors import TokenFlowError
from tokenflow.video import (
    probe_video,
    read_clip,
    write_frames,
    write_gif,
    write_side_by_side,
    write_video,
    writing,
)

W, H = 64, 48


@pytest.fixture
def frames() -> np.ndarray:
    return pattern_frames(20, W, H)


@pytest.fixture
def clip_mp4(tmp_path: Path, frames: np.ndarray) -> Path:
    return write_clip(tmp_path / "clip.mp4", frames, 10)


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("fps", [10, 30000 / 1001, 20 / 3])
def test_write_video_then_read_gives_same_count_size_and_exact_fps(
    tmp_path: Path, frames: np.ndarray, fps: float
) -> None:
    path = tmp_path / "edited.mp4"
    write_video(path, frames, fps)
    clip = read_clip(path, size=(W, H))
    assert len(clip) == 20
    assert clip.frames.shape[1:3] == (H, W)
    assert clip.fps == pytest.approx(fps, rel=1e-9)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(fps).limit_denominator(100_000)
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert psnr(clip.frames, frames) > 35
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "faststart: index first for browsers"
    assert leftovers(tmp_path, {"edited.mp4"}) == []


def test_odd_sizes_are_padded_to_even_for_yuv420p(tmp_path: Path) -> None:
    odd = pattern_frames(5, 65, 49)
    write_video(tmp_path / "odd.mp4", odd, 10)
    info = probe_video(tmp_path / "odd.mp4")
    assert info["size"] == (66, 50) and info["frames"] == 5


def test_a_failed_write_leaves_no_file_behind_and_keeps_the_old_one(
    tmp_path: Path, frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edited.mp4"
    path.write_bytes(b"previous result")
    calls = {"n": 0}
    real_even = writing._even

    def explode_on_third(frame: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real_even(frame)

    monkeypatch.setattr(writing, "_even", explode_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(path, frames, 10)
    assert path.read_bytes() == b"previous result"
    assert leftovers(tmp_path, {"edited.mp4"}) == []


def test_a_failed_frames_or_gif_write_leaves_nothing_behind(
    tmp_path: Path, frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = Image.Image.save
    calls = {"n": 0}

    def explode_on_third(self: Image.Image, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", explode_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_frames(tmp_path / "frames", frames)
    calls["n"] = 2
    with pytest.raises(OSError, match="disk full"):
        write_gif(tmp_path / "preview.gif", frames, 10)
    assert leftovers(tmp_path, set()) == []


def test_write_rejects_bad_destinations_and_options(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(TokenFlowError, match="does not exist"):
        write_video(tmp_path / "no" / "such.mp4", frames, 10)
    with pytest.raises(TokenFlowError, match=r"\.mp4"):
        write_video(tmp_path / "out.webm", frames, 10)
    with pytest.raises(TokenFlowError, match="fps"):
        write_video(tmp_path / "out.mp4", frames, 0)
    with pytest.raises(TokenFlowError, match="crf"):
        write_video(tmp_path / "out.mp4", frames, 10, crf=99)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "out.mp4", frames.astype(np.float32), 10)
    assert leftovers(tmp_path, set()) == []


def test_side_by_side_puts_source_left_and_edit_right_with_the_same_timing(
    tmp_path: Path, frames: np.ndarray
) -> None:
    edited = 255 - frames
    path = tmp_path / "compare.mp4"
    write_side_by_side(path, frames, edited, 10)
    clip = read_clip(path, size=(2 * W, H))
    assert clip.frames.shape == (20, H, 2 * W, 3) and clip.fps == 10
    assert psnr(clip.frames[:, :, :W], frames) > 30
    assert psnr(clip.frames[:, :, W:], edited) > 30
    with pytest.raises(ValueError, match="same frame count and height"):
        write_side_by_side(path, frames, edited[:5], 10)


def test_gif_keeps_frame_count_and_timing(tmp_path: Path, frames: np.ndarray) -> None:
    path = tmp_path / "preview.gif"
    write_gif(path, frames, 8)  # 125 ms per frame: not a whole number of centiseconds
    clip = read_clip(path, size=(W, H))
    assert len(clip) == 20
    with av.open(str(path)) as container:
        times = [float(f.time) for f in container.decode(video=0)]
    assert times[-1] == pytest.approx(19 / 8, abs=0.01)
    assert psnr(clip.frames, frames) > 25
    assert leftovers(tmp_path, {"preview.gif"}) == []


# ---------------------------------------------------------------- audio


@pytest.fixture
def with_audio(tmp_path: Path, frames: np.ndarray) -> Path:
    return write_clip(
        tmp_path / "talk.mp4", frames, 10, audio={"codec": "aac", "rate": 44100, "seconds": 2.0}
    )


def test_has_audio_comes_from_the_container(with_audio: Path, clip_mp4: Path) -> None:
    assert read_clip(with_audio, max_frames=1).has_audio
    assert probe_video(with_audio)["audio_codec"] == "aac"
    assert not read_clip(clip_mp4, max_frames=1).has_audio


@pytest.mark.parametrize("codec", ["aac", "pcm_s16le"])
def test_the_audio_of_the_span_appears_in_the_output_with_the_spans_duration(
    tmp_path: Path, frames: np.ndarray, codec: str
) -> None:
    """AAC is copied packet by packet, PCM (not allowed in mp4) is re-encoded; both line up."""
    suffix = ".mp4" if codec == "aac" else ".mov"
    source = write_clip(
        tmp_path / f"source{suffix}",
        frames,
        10,
        audio={"codec": codec, "rate": 44100, "seconds": 2.0},
    )
    clip = read_clip(source, start=5, end=15, size=(W, H))
    out = tmp_path / "edited.mp4"
    write_video(
        out, clip.frames, clip.fps, audio_source=source, audio_span=(clip.start_time, clip.end_time)
    )
    name, seconds, samples = audio_info(out)
    assert name == "aac"
    frame = 1 / clip.fps
    assert seconds == pytest.approx(clip.end_time - clip.start_time, abs=frame)
    # The tone gets louder over time, so its level tells where the cut really starts: 0.5 s.
    source_samples = audio_info(source)[2]
    window = slice(2048, 6458)  # ~0.05-0.15 s into the output
    level = np.sqrt(np.mean(samples[window] ** 2))
    at_start = source_samples[22050 + window.start : 22050 + window.stop]
    assert level == pytest.approx(np.sqrt(np.mean(at_start**2)), rel=0.15)
    assert level < 0.8 * np.sqrt(np.mean(source_samples[-4410:] ** 2))
    assert read_clip(out, size=(W, H)).frames.shape[0] == 10


def test_without_a_span_the_whole_audio_track_is_used(tmp_path: Path, frames: np.ndarray) -> None:
    source = write_clip(
        tmp_path / "source.mov",
        frames,
        10,
        audio={"codec": "pcm_s16le", "rate": 44100, "seconds": 2.0},
    )
    out = tmp_path / "edited.mkv"
    write_video(out, frames, 10, audio_source=source)
    assert audio_info(out)[1] == pytest.approx(2.0, abs=0.1)


def test_side_by_side_carries_audio_too(with_audio: Path, tmp_path: Path) -> None:
    clip = read_clip(with_audio, size=(W, H))
    out = tmp_path / "compare.mp4"
    write_side_by_side(
        out,
        clip.frames,
        clip.frames,
        clip.fps,
        audio_source=with_audio,
        audio_span=(clip.start_time, clip.end_time),
    )
    assert audio_info(out)[1] == pytest.approx(2.0, abs=0.1)


def test_audio_from_a_silent_source_is_skipped(clip_mp4: Path, tmp_path: Path) -> None:
    out = tmp_path / "edited.mp4"
    write_video(out, pattern_frames(3, W, H), 10, audio_source=clip_mp4, audio_span=(0, 0.3))
    assert not probe_video(out)["has_audio"]
