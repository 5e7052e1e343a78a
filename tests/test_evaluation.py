"""The `tokenflow eval` command end to end on real frames, edit folders and plain videos."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from video_clips import write_clip

from tokenflow import evaluation, metrics, testing
from tokenflow.cli.evaluate import add_eval_arguments, run_eval
from tokenflow.errors import TokenFlowError
from tokenflow.video import read_clip

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCE_VIDEO = DATA / "woman-running.mp4"
SIZE = 96
N = 10


def write_video(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_frames(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder


def tint(frames: np.ndarray) -> np.ndarray:
    """A stand-in "edit": a colour change that keeps the motion of the source."""
    out = frames.astype(np.float32) * 0.8 + np.array([50.0, 0.0, 20.0])
    return out.clip(0, 255).astype(np.uint8)


def make_edit(
    folder: Path,
    source: Path,
    edit=None,
    method: str = "pnp",
    baseline: str | None = None,
    **options: Any,
) -> Path:
    """A `tokenflow edit`-style output folder, made without a diffusion model.

    Its frames are the source as ``tokenflow edit`` reads it with ``options`` (start, end, stride,
    frames, size, fit, short_side, fps), passed through ``edit``; run.json records the options.
    """
    config = {"start": None, "end": None, "stride": 1, "frames": None, "size": None}
    config |= {"fit": "crop", "short_side": 512, "fps": None} | options
    size = tuple(int(v) for v in config["size"].split("x")) if config["size"] else None
    clip = read_clip(
        source,
        start=config["start"],
        end=config["end"],
        stride=config["stride"],
        max_frames=config["frames"],
        size=size,
        fit=config["fit"],
        short_side=config["short_side"],
        fps=config["fps"],
    )
    frames = clip.frames if edit is None else edit(clip.frames)
    write_frames(folder / "frames", frames)
    run = {
        "method": method,
        "baseline": baseline,
        "config": config,
        "input": {"frames": len(clip), "size": list(clip.size)},
        "frame_indices": clip.frame_indices,
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenflow eval")
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


def table_rows(text: str) -> dict[str, list[str]]:
    """Table body lines keyed by their label; cells are split on runs of two spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = {}
    for line in lines[start:]:
        if line.startswith(("warp error:", "CLIP", "RAFT", "wrote")):
            break
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def source_frames() -> np.ndarray:
    assert SOURCE_VIDEO.is_file(), f"test video missing: {SOURCE_VIDEO}"
    return read_clip(SOURCE_VIDEO, max_frames=2 * N, size=(512, 512)).frames


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory, source_frames: np.ndarray) -> Path:
    """A 16-frame 128x96 (4:3) mp4 of the woman running: non-square, so crop != stretch."""
    folder = tmp_path_factory.mktemp("small_source")
    frames = read_clip(SOURCE_VIDEO, max_frames=16, size=(128, 96)).frames
    return write_clip(folder / "small.mp4", frames, fps=20)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(autouse=True)
def no_raft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the flow to DIS so results do not depend on a torchvision install elsewhere."""

    def unavailable() -> None:
        raise ImportError("torchvision blocked in tests")

    monkeypatch.setattr(metrics.flow, "_import_raft_builders", unavailable)


def test_edit_folder_against_source_video(
    tmp_path: Path, source_frames: np.ndarray, clip_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    indices = list(range(0, 2 * N, 2))
    edited = tint(metrics.resize_frames(source_frames[indices], (SIZE, SIZE)))
    run = tmp_path / "run_pnp"
    write_frames(run / "frames", edited)
    # A different mp4 beside the PNGs: the lossless frames must be the ones scored.
    write_video(run / "edited.mp4", edited[::-1].copy())
    meta = {"method": "pnp", "baseline": "per-frame", "frame_indices": indices}
    (run / "run.json").write_text(json.dumps(meta))

    out_json = tmp_path / "scores.json"
    rc = run_cli(
        [
            "--source", str(SOURCE_VIDEO),
            "--edited", str(run),
            "--prompt", "a woman running, van gogh style",
            "--clip-model", str(clip_dir),
            "--device", "cpu",
            "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    assert list(rows) == ["pnp / per-frame"]
    assert rows["pnp / per-frame"][:2] == [str(N), f"{SIZE}x{SIZE}"]
    assert "not comparable to the paper's RAFT numbers" in text
    assert f"CLIP model: {clip_dir}" in text

    report = json.loads(out_json.read_text())
    row = report["rows"][0]
    assert row["source_frame_indices"] == indices
    expected = metrics.warp_error(
        metrics.resize_frames(source_frames[indices], (SIZE, SIZE)), edited
    )
    assert row["warp_error"] == pytest.approx(expected.mean, rel=1e-6)
    assert row["warp_error_per_pair"] == pytest.approx(expected.per_pair, rel=1e-6)
    # The tint keeps the source motion, so warp error stays near the source's own (~1.3e-3).
    assert row["warp_error"] < 4e-3
    assert report["flow_method"] == "dis" and "torchvision" in report["flow_note"]


def test_frames_source_with_video_folder_and_source_as_edit(
    tmp_path: Path, source_frames: np.ndarray, clip_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_frames(tmp_path / "source", metrics.resize_frames(source_frames[:N], (128, 128)))
    small = metrics.resize_frames(source_frames[:N], (SIZE, SIZE))
    video = write_video(tmp_path / "clip.mp4", tint(small))
    shuffled = write_frames(tmp_path / "shuffled" / "frames", small[[3, 7, 0, 9, 5, 1, 8, 2, 6, 4]])
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = run_cli(
        [
            "--source", str(source),
            "--edited", str(video), str(shuffled.parent), str(source),
            "--prompt", "a woman running",
            "--clip-model", str(clip_dir),
            "--flow", "dis",
            "--json", str(out_json),
            "--plot", str(out_png),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    assert list(rows) == ["clip", "shuffled", "source (source)"]
    # The source row is scored on the frames and size the edits saw, not at its own 128x128.
    assert rows["source (source)"][:2] == [str(N), f"{SIZE}x{SIZE}"]
    assert rows["clip"][1] == f"{SIZE}x{SIZE}"

    report = json.loads(out_json.read_text())
    assert report["flow_method"] == "dis" and report["flow_note"] == ""
    assert report["clip_model"] == str(clip_dir)
    by_label = {r["label"]: r for r in report["rows"]}
    for label, cells in rows.items():
        r = by_label[label]
        assert len(r["warp_error_per_pair"]) == N - 1
        assert cells[2] == f"{r['warp_error'] * 1e3:.2f}"
        assert cells[3] == f"{r['clip_text_score']:.4f}"
        assert cells[4] == f"{r['frame_consistency_consecutive']:.4f}"
        assert cells[5] == f"{r['frame_consistency_all_pairs']:.4f}"
    own = by_label["source (source)"]["warp_error"]
    assert by_label["shuffled"]["warp_error"] > 5 * own
    assert by_label["clip"]["warp_error"] < by_label["shuffled"]["warp_error"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temp files


def test_unloadable_clip_model_fails_before_any_flow_unless_none(
    tmp_path: Path,
    source_frames: np.ndarray,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = write_video(tmp_path / "src.mp4", metrics.resize_frames(source_frames[:6], (64, 64)))
    missing = tmp_path / "no-clip-here"
    flows: list[int] = []
    real_pair_flows = evaluation.pair_flows

    def counting_pair_flows(*args: Any, **kwargs: Any) -> Any:
        flows.append(1)
        return real_pair_flows(*args, **kwargs)

    monkeypatch.setattr(evaluation, "pair_flows", counting_pair_flows)
    argv = ["--source", str(source), "--edited", str(source), "--prompt", "x"]
    with pytest.raises(TokenFlowError) as caught:
        run_cli([*argv, "--clip-model", str(missing)])
    message = str(caught.value)
    assert str(missing) in message and "does not exist" in message
    assert "--clip-model none" in message  # the CLI says how to skip the CLIP columns
    assert flows == []  # failed before any flow was computed
    with pytest.raises(TokenFlowError, match="does not exist") as caught:
        evaluation.evaluate(source, [source], "x", clip_model=missing, device="cpu")
    assert "--" not in str(caught.value)  # library errors name no CLI flag
    assert flows == []

    out_json = tmp_path / "r.json"
    assert run_cli([*argv, "--clip-model", "none", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    cells = table_rows(text)["src (source)"]
    assert cells[:2] == ["6", "64x64"]
    assert float(cells[2]) >= 0 and cells[3:] == ["—", "—", "—"]
    assert "CLIP scores skipped: no CLIP model given" in text
    row = json.loads(out_json.read_text())["rows"][0]
    assert row["warp_error"] is not None and row["clip_text_score"] is None


def test_evaluate_api_and_report(tmp_path: Path, source_frames: np.ndarray) -> None:
    frames = metrics.resize_frames(source_frames[:5], (64, 64))
    source = write_frames(tmp_path / "src", frames)
    report = evaluation.evaluate(source, [source], "a woman", clip_model=None, device="cpu")
    assert report.flow_method == "dis" and len(report.rows) == 1
    assert report.to_json()["rows"][0]["frames"] == 5
    assert "CLIP scores skipped: no CLIP model given" in report.to_table()


def test_frame_count_mismatch_without_indices_is_a_clear_error(
    tmp_path: Path, source_frames: np.ndarray
) -> None:
    frames = metrics.resize_frames(source_frames[:6], (64, 64))
    source = write_frames(tmp_path / "src", frames)
    edit = write_frames(tmp_path / "edit" / "frames", frames[:4]).parent
    with pytest.raises(TokenFlowError, match="has 4 frames but the source has more than 4"):
        evaluation.evaluate(source, [edit], "p", clip_model=None, device="cpu")
    (edit / "run.json").write_text(json.dumps({"frame_indices": [0, 1, 2, 40]}))
    with pytest.raises(TokenFlowError, match="only 6 frames"):
        evaluation.evaluate(source, [edit], "p", clip_model=None, device="cpu")
    (edit / "run.json").write_text(json.dumps({"frame_indices": [0, 1]}))
    with pytest.raises(TokenFlowError, match="lists 2 frame_indices"):
        evaluation.evaluate(source, [edit], "p", clip_model=None, device="cpu")
    (edit / "run.json").write_text("{not json")
    with pytest.raises(TokenFlowError, match="run.json"):
        evaluation.evaluate(source, [edit], "p", clip_model=None, device="cpu")


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TokenFlowError, match="does not exist"):
        evaluation.load_edited(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenFlowError, match="no frames/ folder"):
        evaluation.load_edited(tmp_path / "empty")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(TokenFlowError, match="cannot read"):
        evaluation.read_frames(tmp_path / "bad.mp4")
    with pytest.raises(TokenFlowError, match="numbered frames"):
        evaluation.read_frames(tmp_path / "empty")


# --------------------------------------------------------------------------- rows, labels, files


def test_two_outputs_with_the_same_method_get_unique_labels(
    tmp_path: Path, small_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two edits with the same run.json method must not share a table row label."""
    opts = {"frames": 4, "size": "64x48"}
    a = make_edit(tmp_path / "out" / "a", small_source, tint, **opts)
    b = make_edit(tmp_path / "out" / "b", small_source, **opts)
    c = make_edit(tmp_path / "out" / "c", small_source, baseline="per-frame", **opts)
    report = evaluation.evaluate(small_source, [a, b, c], "p", clip_model=None, device="cpu")
    labels = [row.label for row in report.rows]
    assert labels == ["pnp (a)", "pnp (b)", "pnp / per-frame"]
    # the same folder name under two parents: more of the path is shown
    d = make_edit(tmp_path / "x" / "run", small_source, **opts)
    e = make_edit(tmp_path / "y" / "run", small_source, **opts)
    report = evaluation.evaluate(small_source, [d, e], "p", clip_model=None, device="cpu")
    assert [row.label for row in report.rows] == ["pnp (x/run)", "pnp (y/run)"]


def test_source_as_edit_row_has_the_edits_frames_and_size(
    tmp_path: Path, small_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source scored as its own edit is scored on the frames and size the edits saw."""
    edit = make_edit(
        tmp_path / "edit", small_source, tint, start=2, stride=2, frames=5, size="64x48"
    )
    report = evaluation.evaluate(
        small_source, [edit, small_source], "p", clip_model=None, device="cpu"
    )
    edited, own = report.rows
    assert own.label == "small (source)"
    assert (own.frames, own.width, own.height) == (5, 64, 48)
    assert own.source_frame_indices == edited.source_frame_indices == [2, 4, 6, 8, 10]
    assert len(own.warp_error_per_pair) == 4


def test_edits_made_from_different_frames_say_which_the_source_row_uses(
    tmp_path: Path, small_source: Path
) -> None:
    a = make_edit(tmp_path / "a", small_source, frames=4, size="64x48")
    b = make_edit(tmp_path / "b", small_source, start=3, frames=5, size="64x48")
    report = evaluation.evaluate(small_source, [a, b, small_source], "p", clip_model=None)
    own = report.rows[-1]
    assert own.source_frame_indices == [0, 1, 2, 3] and own.frames == 4
    footer = report.to_table().split("warp error:")[-1]
    assert "different source frames" in footer and "pnp (a)" in footer


def test_json_and_plot_get_normal_permissions(
    tmp_path: Path, small_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json/--plot are written with the user's umask (0644 under 022), not mkstemp's 0600."""
    edit = make_edit(tmp_path / "edit", small_source, tint, frames=3, size="64x48")
    out_json, out_png = tmp_path / "scores.json", tmp_path / "warp.png"
    old = os.umask(0o022)
    try:
        rc = run_cli(
            [
                "--source", str(small_source), "--edited", str(edit), "--prompt", "p",
                "--clip-model", "none", "--json", str(out_json), "--plot", str(out_png),
            ]
        )  # fmt: skip
    finally:
        os.umask(old)
    assert rc == 0
    assert stat.S_IMODE(out_json.stat().st_mode) == 0o644
    assert stat.S_IMODE(out_png.stat().st_mode) == 0o644
    assert json.loads(out_json.read_text())["rows"][0]["frames"] == 3


# --------------------------------------------------------------------------- geometry


def test_rotated_non_square_clip_is_scored_on_the_frames_that_were_edited(
    tmp_path: Path,
) -> None:
    """A 96x64 clip shown rotated 90° (64x96), edited with the default sizing (crop).

    Eval must read the source exactly as the edit did: rotated, same frames, cropped not
    stretched. The "edit" is the source frames themselves, so its warp error and that of the
    source scored as its own edit are the same number.
    """
    stored = read_clip(SOURCE_VIDEO, max_frames=12, size=(96, 64)).frames
    source = write_clip(tmp_path / "phone.mp4", stored, fps=20, rotation=90)
    options = {"start": 1, "stride": 2, "frames": 4, "short_side": 64}
    edit = make_edit(tmp_path / "edit", source, **options)
    expected = read_clip(
        source, start=1, stride=2, max_frames=4, short_side=64, size=None, fit="crop"
    ).frames
    assert expected.shape == (4, 64, 64, 3)  # displayed 64x96, centre-cropped to 64x64

    report = evaluation.evaluate(source, [edit, source], "p", clip_model=None, device="cpu")
    edited, own = report.rows
    assert (own.frames, own.width, own.height) == (edited.frames, edited.width, edited.height)
    assert own.source_frame_indices == edited.source_frame_indices == [1, 3, 5, 7]
    assert own.warp_error == edited.warp_error
    direct = metrics.warp_error(expected, expected)
    assert edited.warp_error == pytest.approx(direct.mean, rel=1e-6)

    used = evaluation.source_frames_for(evaluation.load_edited(edit), source)
    np.testing.assert_array_equal(used.frames, expected)


@pytest.mark.parametrize("fit", ["crop", "stretch"])
def test_plain_edit_without_run_json_gets_the_source_fitted_not_stretched(
    tmp_path: Path, small_source: Path, fit: str
) -> None:
    """A plain edited video (no run.json): the source is brought to its size with the fit
    (crop by default), from its first frame on, and must have as many frames."""
    frames = read_clip(small_source, max_frames=16, size=(64, 64), fit=fit).frames
    edit = write_frames(tmp_path / "plain", frames)
    kwargs = {} if fit == "crop" else {"fit": fit}
    report = evaluation.evaluate(
        small_source, [edit, small_source], "p", clip_model=None, device="cpu", **kwargs
    )
    edited, own = report.rows
    assert own.warp_error == edited.warp_error  # same frames as the edit, so the same number
    assert f"fit {fit}" in report.to_table()
    used = evaluation.source_frames_for(evaluation.load_edited(edit), small_source, **kwargs)
    np.testing.assert_array_equal(used.frames, frames)


def test_edit_that_does_not_match_its_run_json_is_a_clear_error(
    tmp_path: Path, small_source: Path
) -> None:
    edit = make_edit(tmp_path / "edit", small_source, frames=5, size="64x48")
    (edit / "frames" / "00004.png").unlink()
    run = json.loads((edit / "run.json").read_text())
    del run["frame_indices"]
    (edit / "run.json").write_text(json.dumps(run))
    with pytest.raises(TokenFlowError, match="5 frames of 64x48 but the edit has 4 frames"):
        evaluation.evaluate(small_source, [edit], "p", clip_model=None, device="cpu")
