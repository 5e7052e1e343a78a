"""Properties of video reading, on the two real clips and small synthetic ones."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from video_clips import (
    MARKER,
    WOLF,
    WOMAN,
    damage_packets,
    decode_rgb,
    faststart_copy,
    leftovers,
    pattern_frames,
    psnr,
    real,
    write_clip,
)

from tokenflow.errors import TokenFlowError
from tokenflow.video import (
    parse_size,
    parse_time,
    probe_video,
    read_clip,
    write_frames,
)

W, H = 64, 48  # synthetic clips: small, and already multiples of 8 so no resize is needed


@pytest.fixture
def frames() -> np.ndarray:
    return pattern_frames(20, W, H)


@pytest.fixture
def clip_mp4(tmp_path: Path, frames: np.ndarray) -> Path:
    return write_clip(tmp_path / "clip.mp4", frames, 10)


# ---------------------------------------------------------------- the real clips


def test_woman_running_reads_all_120_frames_at_20_fps_untouched() -> None:
    clip = read_clip(real(WOMAN))
    assert clip.frames.shape == (120, 512, 512, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.fps == 20
    assert clip.frame_indices == list(range(120))
    assert (clip.start_time, clip.end_time) == (0.0, 6.0)
    assert clip.source_size == (512, 512)
    assert clip.notes == []
    assert not clip.has_audio


def test_when_size_equals_source_size_frames_equal_the_decoded_frames_bit_for_bit() -> None:
    reference = decode_rgb(real(WOLF))
    assert np.array_equal(read_clip(WOLF).frames, reference)
    assert np.array_equal(read_clip(WOLF, size=(512, 512), fit="pad").frames, reference)


def test_stride_3_over_40_frames_gives_14_frames_at_a_third_of_the_fps() -> None:
    clip = read_clip(real(WOLF), stride=3)
    assert len(clip) == math.ceil(40 / 3) == 14
    assert clip.frame_indices == list(range(0, 40, 3))
    assert clip.fps == pytest.approx(20 / 3)
    assert np.array_equal(clip.frames, decode_rgb(WOLF)[::3])
    # The output lasts as long as the frames it holds: 14 frames at 20/3 fps.
    assert clip.end_time - clip.start_time == pytest.approx(14 / (20 / 3))


def test_probe_reports_the_real_clip() -> None:
    info = probe_video(real(WOLF))
    assert info["fps"] == 20
    assert info["frames"] == 40
    assert info["size"] == (512, 512)
    assert info["rotation"] == 0
    assert info["has_audio"] is False
    assert info["duration"] == pytest.approx(2.0)
    assert info["codec"] == "h264"


# ---------------------------------------------------------------- frame selection


def test_frame_numbers_and_seconds_select_the_same_span(clip_mp4: Path) -> None:
    by_frame = read_clip(clip_mp4, start=5, end=15)
    by_seconds = read_clip(clip_mp4, start=0.5, end="1.5s")
    by_timecode = read_clip(clip_mp4, start="00:00:00.5", end="15")
    for clip in (by_frame, by_seconds, by_timecode):
        assert clip.frame_indices == list(range(5, 15))
        assert (clip.start_time, clip.end_time) == pytest.approx((0.5, 1.5))
    assert np.array_equal(by_frame.frames, by_seconds.frames)


def test_max_frames_caps_the_count_after_stride(clip_mp4: Path) -> None:
    clip = read_clip(clip_mp4, start=2, stride=2, max_frames=4)
    assert clip.frame_indices == [2, 4, 6, 8]
    assert clip.fps == 5


def test_start_not_before_end_is_refused_before_decoding(clip_mp4: Path) -> None:
    with pytest.raises(TokenFlowError, match="empty range.*frame 7.*frame 7"):
        read_clip(clip_mp4, start=7, end=7)
    with pytest.raises(TokenFlowError, match="empty range"):
        read_clip(clip_mp4, start="1.5s", end=10)


def test_start_beyond_the_end_states_the_clip_length(clip_mp4: Path) -> None:
    with pytest.raises(TokenFlowError, match=r"20 frames, 2\.00 s"):
        read_clip(clip_mp4, start=25)
    with pytest.raises(TokenFlowError, match=r"20 frames"):
        read_clip(clip_mp4, start="3s")


def test_bad_selection_arguments_are_user_errors(clip_mp4: Path) -> None:
    for kwargs in ({"stride": 0}, {"max_frames": 0}, {"start": -1}, {"fps": 0.0}):
        with pytest.raises(TokenFlowError):
            read_clip(clip_mp4, **kwargs)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("rotation", "corner"),
    [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")],
)
def test_rotated_mov_reads_as_a_player_shows_it(
    tmp_path: Path, frames: np.ndarray, rotation: int, corner: str
) -> None:
    """The marker painted top-left in the stored frame ends up where the rotation puts it."""
    path = write_clip(tmp_path / "rotated.mov", frames, 10, rotation=rotation)
    turned = abs(rotation) == 90
    shown = (H, W) if turned else (W, H)
    clip = read_clip(path, size=shown)
    assert clip.source_size == shown
    assert clip.frames.shape == (20, shown[1], shown[0], 3)
    rows = slice(0, 4) if corner.startswith("top") else slice(-4, None)
    cols = slice(0, 4) if corner.endswith("left") else slice(-4, None)
    assert clip.frames[:, rows, cols].min() > 200, "marker is not where a player shows it"
    assert clip.frames[:, :4, :4].max() < 200, "marker still in the stored corner"
    assert any("rotated" in note for note in clip.notes)
    # Rotating the decoded frames is the only change: nothing is resampled.
    expected = np.rot90(decode_rgb(path), k=round(rotation / 90), axes=(1, 2))
    assert np.array_equal(clip.frames, expected)
    assert probe_video(path)["size"] == shown
    assert probe_video(path)["rotation"] % 360 == rotation % 360


def test_a_mirroring_display_matrix_is_honoured(tmp_path: Path, frames: np.ndarray) -> None:
    path = tmp_path / "selfie.mp4"
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(0, hflip=True)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    clip = read_clip(path, size=(W, H))
    assert np.array_equal(clip.frames, decode_rgb(path)[:, :, ::-1])
    assert clip.notes == ["mirrored left-right per metadata"]


def test_mov_without_rotation_metadata_is_not_rotated(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_clip(tmp_path / "plain.mov", frames, 10)
    clip = read_clip(path, size=(W, H))
    assert clip.frames.shape[1:3] == (H, W)
    assert clip.frames[:, : MARKER // 2, : MARKER // 2].min() > 200
    assert not any("rotated" in note for note in clip.notes)


# ---------------------------------------------------------------- sizing


def test_default_sizing_keeps_aspect_scaling_short_side_then_cropping_to_multiples(
    tmp_path: Path,
) -> None:
    path = write_clip(tmp_path / "odd.mp4", pattern_frames(2, 642, 362), 10)
    clip = read_clip(path)
    scaled_width = round(642 * 512 / 362)  # 908: short side to 512, aspect kept
    expected_width = scaled_width // 64 * 64  # smallest crop to a multiple of 64
    assert clip.frames.shape == (2, 512, expected_width, 3)
    assert clip.source_size == (642, 362)
    assert f"642x362 -> {scaled_width}x512" in " ".join(clip.notes)
    assert f"centre-cropped to {expected_width}x512" in " ".join(clip.notes)


def test_fit_modes_crop_pad_and_stretch(clip_mp4: Path) -> None:
    crop = read_clip(clip_mp4, size=(32, 32), fit="crop", max_frames=2)
    pad = read_clip(clip_mp4, size=(32, 32), fit="pad", max_frames=2)
    stretch = read_clip(clip_mp4, size=(32, 32), fit="stretch", max_frames=2)
    for clip in (crop, pad, stretch):
        assert clip.frames.shape == (2, 32, 32, 3)
    # 64x48 fitted into 32x32 is 32x24: four black rows above and below, picture in between.
    assert pad.frames[:, :4].max() == 0 and pad.frames[:, -4:].max() == 0
    assert pad.frames[:, 4:28].max() > 0
    # Crop covers 32x32 with a 43x32 resize, so the left marker is cut to a sliver.
    assert crop.frames[:, :, :2].max() > 200
    assert not np.array_equal(crop.frames, stretch.frames)


def test_sizes_must_be_multiples_of_8_with_a_suggestion(clip_mp4: Path) -> None:
    with pytest.raises(TokenFlowError, match="multiples of 8; try 504x320"):
        read_clip(clip_mp4, size=(505, 321))
    with pytest.raises(TokenFlowError, match="positive multiple of 8"):
        read_clip(clip_mp4, short_side=500)
    with pytest.raises(TokenFlowError, match="fit"):
        read_clip(clip_mp4, size=(64, 48), fit="zoom")
    with pytest.raises(TokenFlowError, match="resample"):
        read_clip(clip_mp4, size=(32, 32), resample="magic")


def test_large_sizes_warn_and_huge_sizes_are_refused(clip_mp4: Path) -> None:
    with pytest.warns(UserWarning, match="above 1024x1024"):
        clip = read_clip(clip_mp4, size=(1088, 1024), max_frames=1, resample="nearest")
    assert clip.size == (1088, 1024)
    with pytest.raises(TokenFlowError, match="too large"):
        read_clip(clip_mp4, size=(4096, 4104), max_frames=1)


def test_resize_matches_pil_lanczos_on_the_full_frame(clip_mp4: Path) -> None:
    clip = read_clip(clip_mp4, size=(32, 24), max_frames=3)
    decoded = decode_rgb(clip_mp4)[:3]
    expected = [
        np.array(Image.fromarray(f).resize((32, 24), Image.Resampling.LANCZOS)) for f in decoded
    ]
    assert np.array_equal(clip.frames, np.stack(expected))


# ---------------------------------------------------------------- formats and frame rates


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt"),
    [
        ("clip.webm", "libvpx-vp9", "yuv420p"),
        ("ten-bit.mp4", "libx264", "yuv420p10le"),
        ("gray.mov", "png", "gray"),
        ("yuv444.mkv", "ffv1", "yuv444p"),
    ],
)
def test_other_codecs_and_pixel_formats_decode_like_pyav_rgb24(
    tmp_path: Path, frames: np.ndarray, name: str, codec: str, pix_fmt: str
) -> None:
    path = write_clip(tmp_path / name, frames, 10, codec=codec, pix_fmt=pix_fmt)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == pix_fmt
    clip = read_clip(path, size=(W, H))
    assert len(clip) == 20 and clip.fps == 10
    assert np.array_equal(clip.frames, decode_rgb(path))
    if pix_fmt == "gray":
        assert np.ptp(clip.frames.astype(int), axis=-1).max() == 0  # grey stays grey
    else:
        assert psnr(clip.frames, frames) > 25


def test_alpha_is_dropped_with_a_note(tmp_path: Path, frames: np.ndarray) -> None:
    rgba = np.concatenate([frames, np.full((*frames.shape[:3], 1), 255, np.uint8)], axis=-1)
    rgba[:, 24:, 32:, 3] = 0
    path = write_clip(tmp_path / "alpha.mov", rgba, 10, codec="png", pix_fmt="rgba")
    clip = read_clip(path, size=(W, H))
    assert np.array_equal(clip.frames, frames)  # PNG is lossless; alpha simply goes
    assert any("alpha" in note for note in clip.notes)


def test_gif_reads_with_its_frame_rate(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_clip(tmp_path / "clip.gif", frames, 10, codec="gif", pix_fmt="rgb8")
    clip = read_clip(path, size=(W, H))
    assert len(clip) == 20 and clip.fps == 10
    assert not any("alpha" in note for note in clip.notes)  # opaque GIFs stay quiet


def test_variable_frame_rate_is_noted_and_the_average_used(
    tmp_path: Path, frames: np.ndarray
) -> None:
    pts = [0, 100, 150, 300, 320, 400, 500, 650, 700, 800]
    pts += [p + 1000 for p in pts]
    path = write_clip(tmp_path / "vfr.mp4", frames, 10, pts_ms=pts)
    clip = read_clip(path, size=(W, H))
    average = probe_video(path)["fps"]
    assert len(clip) == 20
    assert clip.fps == pytest.approx(average)
    assert any(f"variable frame rate: {average:.2f} fps on average" in n for n in clip.notes)
    # Seconds follow the timestamps, not the average rate: [0.3 s, 0.7 s) holds pts 300..650.
    assert read_clip(path, start="0.3s", end="0.7s", size=(W, H)).frame_indices == [3, 4, 5, 6, 7]
    steady = read_clip(write_clip(tmp_path / "cfr.mp4", frames), size=(W, H))
    assert not any("variable" in note for note in steady.notes)


def test_fps_argument_overrides_a_videos_rate(clip_mp4: Path) -> None:
    clip = read_clip(clip_mp4, fps=25, stride=5)
    assert clip.fps == 5
    assert any("25" in note for note in clip.notes)


# ---------------------------------------------------------------- damaged input


def test_truncated_mp4_without_index_is_a_clear_error(tmp_path: Path) -> None:
    data = real(WOLF).read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenFlowError, match="cannot read .*half.mp4"):
        read_clip(tmp_path / "half.mp4")


def test_truncated_tail_keeps_the_frames_that_decode_and_says_how_many_were_lost(
    tmp_path: Path,
) -> None:
    whole = faststart_copy(real(WOLF), tmp_path / "faststart.mp4")
    data = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    clip = read_clip(tmp_path / "cut.mp4")
    assert 0 < len(clip) < 40
    assert np.array_equal(clip.frames, decode_rgb(WOLF)[: len(clip)])
    assert f"the last {40 - len(clip)} frame(s) could not be decoded" in " ".join(clip.notes)


def test_a_broken_last_packet_is_trailing_damage(tmp_path: Path, frames: np.ndarray) -> None:
    source = write_clip(tmp_path / "ok.mp4", frames, 10)
    clip = read_clip(damage_packets(source, tmp_path / "tail.mp4", [19]), size=(W, H))
    assert len(clip) == 19
    assert any("last 1 frame(s)" in note for note in clip.notes)


def test_a_broken_frame_in_the_middle_is_an_error_unless_outside_the_range(
    tmp_path: Path, frames: np.ndarray
) -> None:
    source = write_clip(tmp_path / "ok.mp4", frames, 10)
    broken = damage_packets(source, tmp_path / "mid.mp4", [8])
    with pytest.raises(TokenFlowError, match=r"corrupt video: .*frame \d+"):
        read_clip(broken, size=(W, H))
    assert len(read_clip(broken, end=5, size=(W, H))) == 5


def test_no_decodable_frames_and_random_bytes_are_errors(
    tmp_path: Path, frames: np.ndarray
) -> None:
    source = write_clip(tmp_path / "ok.mp4", frames, 10)
    with pytest.raises(TokenFlowError, match="no decodable frames"):
        read_clip(damage_packets(source, tmp_path / "dead.mp4", range(20)))
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    with pytest.raises(TokenFlowError, match="cannot read"):
        read_clip(noise)
    with pytest.raises(TokenFlowError, match="not found"):
        read_clip(tmp_path / "missing.mp4")


# ---------------------------------------------------------------- frame folders


def test_frames_folder_round_trips_bit_for_bit_at_default_10_fps(
    tmp_path: Path, frames: np.ndarray
) -> None:
    folder = tmp_path / "frames"
    write_frames(folder, frames)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(20)]
    clip = read_clip(folder, size=(W, H))
    assert np.array_equal(clip.frames, frames)
    assert clip.fps == 10 and any("10 fps" in note for note in clip.notes)
    assert not clip.has_audio and clip.source_size == (W, H)
    timed = read_clip(folder, size=(W, H), fps=4, start="1s", stride=2)
    assert timed.frame_indices == list(range(4, 20, 2)) and timed.fps == 2
    assert leftovers(tmp_path, {"frames"}) == []


def test_frames_folder_sorts_numerically_and_accepts_jpeg(tmp_path: Path) -> None:
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for number in (1, 2, 10, 9, 3, 4, 5, 6, 7, 8):  # 1..10: "10" must come last, not second
        Image.fromarray(np.full((H, W, 3), number * 20, np.uint8)).save(folder / f"{number}.jpg")
    clip = read_clip(folder, size=(W, H))
    assert [int(f.mean().round()) for f in clip.frames] == pytest.approx(
        [n * 20 for n in range(1, 11)], abs=2
    )


def test_frames_folder_honours_exif_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "phone"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    for number in range(3):
        Image.fromarray(pattern_frames(1, W, H)[0]).save(folder / f"{number:05d}.jpg", exif=exif)
    clip = read_clip(folder, size=(H, W))
    assert clip.source_size == (H, W)
    assert clip.frames[:, :4, -4:].min() > 200  # the top-left marker is now top-right
    assert "rotated per EXIF orientation" in clip.notes


def test_frames_folder_gap_and_mixed_extensions_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "gappy"
    folder.mkdir()
    for number in (0, 1, 3):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / f"{number:05d}.png")
    with pytest.raises(TokenFlowError, match="missing frame 2"):
        read_clip(folder)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "00002.jpg")
    with pytest.raises(TokenFlowError, match=r"mixes \.jpg, \.png"):
        read_clip(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a frame")
    with pytest.raises(TokenFlowError, match="no numbered frames"):
        read_clip(empty)


def test_write_frames_replaces_old_frames_but_never_foreign_files(
    tmp_path: Path, frames: np.ndarray
) -> None:
    folder = tmp_path / "out"
    write_frames(folder, frames)
    write_frames(folder, frames[:3])
    assert len(list(folder.iterdir())) == 3
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(TokenFlowError, match="other files"):
        write_frames(folder, frames)
    assert (folder / "keep.txt").exists()


# ---------------------------------------------------------------- parsing


def test_parse_size() -> None:
    assert parse_size("512x320") == (512, 320)
    assert parse_size(" 768 X 512 ") == (768, 512)
    with pytest.raises(TokenFlowError, match="try 512x320"):
        parse_size("510x322")
    with pytest.raises(TokenFlowError, match="WIDTHxHEIGHT"):
        parse_size("big")
    with pytest.raises(TokenFlowError, match="multiples of 8"):
        parse_size("0x512")


def test_parse_time() -> None:
    assert parse_time("12", 20) == 12 and isinstance(parse_time("12", 20), int)
    assert parse_time("1.5s", 20) == 1.5 and isinstance(parse_time("1.5s", 20), float)
    assert parse_time("00:00:01.5", 20) == 1.5
    assert parse_time("1:02.25", 20) == 62.25
    assert parse_time("00:00:01:10", 20) == 1.5  # hh:mm:ss:ff counts frames at the given fps
    with pytest.raises(TokenFlowError, match=r"ambiguous.*1\.5s.*frame 30"):
        parse_time("1.5", 20)
    for bad in ("", "abc", "-3", "1:2.5:3"):
        with pytest.raises(TokenFlowError):
            parse_time(bad, 20)


def test_no_warnings_on_a_plain_read(clip_mp4: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_clip(clip_mp4, size=(W, H))
