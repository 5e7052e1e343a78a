"""Frame timing comes from presentation timestamps, and the written files keep it.

Each clip here reproduces a reported file: a header that lies about the rate, variable frame
rate, timestamps out of decode order, a rate override with sound, a clip shorter than asked.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import pytest
from video_clips import (
    audio_info,
    frame_numbers,
    frame_times,
    level,
    numbered_frames,
    pattern_frames,
    pitch,
    write_bframe_avi,
    write_clip,
    write_lying_avi,
    write_shuffled_mkv,
)

from tokenflow.video import (
    probe_video,
    read_clip,
    write_frames,
    write_gif,
    write_side_by_side,
    write_video,
)

W, H = 64, 48
TONE = {"codec": "aac", "rate": 44100, "seconds": 2.0}


# ---------------------------------------------------------------- a header that lies


@pytest.fixture
def webcam(tmp_path: Path) -> tuple[Path, list[float]]:
    """16 frames really taken at 2.3 fps, in an AVI whose header says 15 fps (99 slots)."""
    seconds = [i / 2.3 for i in range(16)]
    path = write_lying_avi(tmp_path / "webcam.avi", numbered_frames(16), seconds, header_fps=15)
    return path, [round(s * 15) / 15 for s in seconds]  # what the file can store: 1/15 s steps


def test_a_header_that_lies_about_the_rate_is_overruled_by_the_timestamps(
    webcam: tuple[Path, list[float]],
) -> None:
    path, stamps = webcam
    measured = (len(stamps) - 1) / (stamps[-1] - stamps[0])  # 2.30 fps
    clip = read_clip(path, size=(W, H))
    assert clip.fps == pytest.approx(measured, rel=1e-9)
    assert clip.duration == pytest.approx(len(stamps) / measured)
    assert clip.constant_rate, "steps of 6 or 7 ticks of 1/15 s are the file's precision"
    assert not any("variable" in note for note in clip.notes)
    header = [note for note in clip.notes if "header" in note]
    assert len(header) == 1
    assert "15 fps" in header[0] and f"{measured:.2f} fps" in header[0]
    assert probe_video(path)["fps"] == pytest.approx(measured, rel=1e-9)  # cheap, and true too


def test_seconds_select_by_timestamp_and_the_end_time_is_true_on_a_lying_header(
    tmp_path: Path, webcam: tuple[Path, list[float]]
) -> None:
    path, stamps = webcam
    clip = read_clip(path, size=(W, H), start="2s", end="6s")
    inside = [i for i, t in enumerate(stamps) if 2 <= t < 6]
    assert frame_numbers(clip.frames) == inside
    assert clip.frame_indices == inside
    assert clip.start_time == pytest.approx(stamps[inside[0]])
    # The span ends where the next frame starts; a constant-rate clip ends on its own grid,
    # which the file's 1/15 s precision may put up to a tick away.
    true_end = stamps[inside[-1] + 1]
    assert clip.end_time == pytest.approx(true_end, abs=1 / 15)
    assert any("header says 15 fps" in note for note in clip.notes)
    out = tmp_path / "edited.mp4"
    write_video(out, clip.frames, clip.fps, timestamps=clip.timestamps, duration=clip.duration)
    times, end = frame_times(out)
    assert len(times) == len(inside)
    assert end == pytest.approx(true_end - stamps[inside[0]], abs=1 / clip.fps)


# ---------------------------------------------------------------- variable frame rate


def test_variable_frame_rate_keeps_each_frames_time_through_read_and_write(
    tmp_path: Path,
) -> None:
    steps = [40, 80] * 10  # ms: alternating short and long frames, 16.7 fps on average
    pts = [sum(steps[:i]) for i in range(20)]
    path = write_clip(tmp_path / "vfr.mp4", numbered_frames(20), 25, pts_ms=pts)
    clip = read_clip(path, size=(W, H))
    seconds = [p / 1000 for p in pts]
    assert clip.timestamps == pytest.approx(seconds, abs=1e-3)
    assert not clip.constant_rate
    assert clip.duration == pytest.approx(1.2, abs=0.045)  # the last frame lasts 40-80 ms
    assert clip.fps == pytest.approx(len(clip) / clip.duration)
    assert any(
        "variable frame rate" in note and f"{clip.fps:.2f} fps" in note for note in clip.notes
    )
    timing = {"timestamps": clip.timestamps, "duration": clip.duration}
    out = tmp_path / "edited.mp4"
    write_video(out, clip.frames, clip.fps, **timing)
    times, end = frame_times(out)
    assert times == pytest.approx(seconds, abs=1e-3)
    assert end == pytest.approx(clip.duration, abs=1e-3)
    assert frame_numbers(read_clip(out, size=(W, H)).frames) == list(range(20))
    both = tmp_path / "compare.mp4"
    write_side_by_side(both, clip.frames, clip.frames, clip.fps, **timing)
    assert frame_times(both)[0] == pytest.approx(seconds, abs=1e-3)
    gif = tmp_path / "preview.gif"
    write_gif(gif, clip.frames, clip.fps, **timing)
    with av.open(str(gif)) as container:
        gif_times = [float(f.time) for f in container.decode(video=0)]
    assert gif_times == pytest.approx(seconds, abs=0.011)  # GIF delays are centiseconds


# ---------------------------------------------------------------- timestamps out of order


@pytest.mark.parametrize(
    ("make", "suffix"),
    [(write_bframe_avi, ".avi"), (write_shuffled_mkv, ".mkv")],
    ids=["b-frames-with-decode-order-stamps", "frames-stored-out-of-order"],
)
def test_a_time_range_gives_every_frame_in_it_in_presentation_order(
    tmp_path: Path, make, suffix: str
) -> None:
    path = make(tmp_path / f"clip{suffix}", numbered_frames(48), 20)
    clip = read_clip(path, start="1s", end="2s", size=(W, H))
    assert frame_numbers(clip.frames) == list(range(20, 40))
    assert clip.frame_indices == list(range(20, 40))
    assert clip.timestamps == pytest.approx([i / 20 for i in range(20)], abs=1e-6)
    assert clip.constant_rate and clip.fps == 20
    assert (clip.start_time, clip.end_time) == pytest.approx((1.0, 2.0), abs=1e-6)
    assert not any("variable" in note for note in clip.notes)
    whole = read_clip(path, size=(W, H), stride=5, start=3)
    assert frame_numbers(whole.frames) == list(range(3, 48, 5)) == whole.frame_indices


# ---------------------------------------------------------------- rate override with sound


def test_a_rate_override_time_stretches_the_sound_to_stay_in_sync(tmp_path: Path) -> None:
    source = write_clip(tmp_path / "talk.mp4", pattern_frames(20, W, H), 10, audio=TONE)
    clip = read_clip(source, fps=5, size=(W, H))  # half speed: 2 s of source play for 4 s
    out = tmp_path / "slow.mp4"
    notes = write_video(
        out, clip.frames, clip.fps, audio_source=source, audio_span=(clip.start_time, clip.end_time)
    )
    picture = frame_times(out)[1]
    name, seconds, samples = audio_info(out)
    assert picture == pytest.approx(4.0, abs=1e-3)
    assert seconds == pytest.approx(picture, abs=0.05)
    # The tone's loudness ramp is stretched with the picture: at 3 s of output it is as loud as
    # the source at 1.5 s. The pitch stays at 440 Hz (a plain resample would drop it to 220 Hz).
    rate = 44100
    original = audio_info(source)[2]
    for second in (1.0, 2.0, 3.0):
        assert level(samples, rate, second) == pytest.approx(
            level(original, rate, second / 2), rel=0.15
        )
    assert pitch(samples[rate : 3 * rate], rate) == pytest.approx(440, abs=5)
    assert (clip.start_time, clip.end_time) == pytest.approx((0.0, 2.0))  # where it is in the file
    assert clip.duration == pytest.approx(4.0)
    assert any("set to 5 fps" in note and "10.00 fps" in note for note in clip.notes)
    assert notes == ["audio time-stretched to 0.5x speed (pitch kept) to match the picture"]


def test_sound_that_cannot_be_stretched_is_dropped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenflow.video import audio

    source = write_clip(tmp_path / "talk.mp4", pattern_frames(20, W, H), 10, audio=TONE)
    clip = read_clip(source, fps=5, size=(W, H))

    def no_atempo(*args: object) -> None:
        raise av.FFmpegError(-1, "No such filter: 'atempo'")

    monkeypatch.setattr(audio, "time_stretch", no_atempo)
    out = tmp_path / "slow.mp4"
    notes = write_video(
        out, clip.frames, **clip.timing, audio_source=source, audio_span=clip.audio_span
    )
    assert len(notes) == 1 and notes[0].startswith("audio dropped: it could not be time-stretched")
    assert "atempo" in notes[0]
    with av.open(str(out)) as container:
        assert not container.streams.audio
    assert frame_times(out)[1] == pytest.approx(4.0, abs=1e-3)


# ---------------------------------------------------------------- short clips


def test_fewer_frames_than_asked_for_is_noted(tmp_path: Path) -> None:
    still = write_clip(tmp_path / "still.mp4", pattern_frames(1, W, H), 10)
    clip = read_clip(still, max_frames=8, size=(W, H))
    assert len(clip) == 1
    assert "only 1 frame in the selected range, fewer than the 8 asked for" in clip.notes
    ten = write_clip(tmp_path / "ten.mp4", pattern_frames(10, W, H), 10)
    short = read_clip(ten, start=6, max_frames=8, size=(W, H))
    assert "only 4 frames in the selected range, fewer than the 8 asked for" in short.notes
    for enough in (read_clip(ten, max_frames=8, size=(W, H)), read_clip(ten, size=(W, H))):
        assert not any("fewer" in note for note in enough.notes)


# ---------------------------------------------------------------- progress


def test_progress_is_reported_after_each_frame_against_the_expected_total(
    tmp_path: Path, webcam: tuple[Path, list[float]]
) -> None:
    frames = pattern_frames(20, W, H)
    path = write_clip(tmp_path / "clip.mp4", frames, 10)
    calls: list[tuple[int, int]] = []

    def report(done: int, total: int) -> None:
        calls.append((done, total))

    def counted(total: int) -> list[tuple[int, int]]:
        return [(done, total) for done in range(1, total + 1)]

    read_clip(path, size=(W, H), progress=report)
    assert calls == counted(20)
    for kwargs, kept in (
        ({"start": 2, "stride": 2, "max_frames": 4}, 4),
        ({"start": "0.5s", "end": "1.5s", "stride": 3}, math.ceil(10 / 3)),
    ):
        calls.clear()
        read_clip(path, size=(W, H), progress=report, **kwargs)
        assert calls == counted(kept), kwargs
    # A header that promises more frames than there are: the last report still says "all done".
    calls.clear()
    read_clip(webcam[0], size=(W, H), progress=report)
    assert [done for done, _ in calls][:16] == list(range(1, 17))
    assert calls[-1] == (16, 16)
    for write in (
        lambda: write_video(tmp_path / "a.mp4", frames, 10, progress=report),
        lambda: write_side_by_side(tmp_path / "b.mp4", frames, frames, 10, progress=report),
        lambda: write_gif(tmp_path / "c.gif", frames, 10, progress=report),
        lambda: write_frames(tmp_path / "d", frames, progress=report),
    ):
        calls.clear()
        write()
        assert calls == counted(20)
