"""The `tokenflow eval` command end to end on real frames, edit folders and plain videos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tokenflow import evaluation, metrics, testing
from tokenflow.errors import TokenFlowError

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


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenflow eval")
    evaluation.add_eval_arguments(parser)
    return evaluation.run_eval(parser.parse_args(argv))


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
    return evaluation.read_frames(SOURCE_VIDEO, 2 * N)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(autouse=True)
def no_raft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the flow to DIS so results do not depend on a torchvision install elsewhere."""

    def unavailable() -> None:
        raise ImportError("torchvision blocked in tests")

    monkeypatch.setattr(metrics, "_import_raft_builders", unavailable)


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
    assert rows["source (source)"][:2] == [str(N), "128x128"]
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
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_missing_clip_model_keeps_flow_metrics(
    tmp_path: Path, source_frames: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_video(tmp_path / "src.mp4", metrics.resize_frames(source_frames[:6], (64, 64)))
    out_json = tmp_path / "r.json"
    missing = tmp_path / "no-clip-here"
    rc = run_cli(
        [
            "--source", str(source),
            "--edited", str(source),
            "--prompt", "x",
            "--clip-model", str(missing),
            "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    cells = table_rows(text)["src (source)"]
    assert cells[:2] == ["6", "64x64"]
    assert float(cells[2]) >= 0 and cells[3:] == ["—", "—", "—"]
    skipped = [line for line in text.splitlines() if line.startswith("CLIP scores skipped")]
    assert len(skipped) == 1 and str(missing) in skipped[0] and "does not exist" in skipped[0]
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
    with pytest.raises(TokenFlowError, match="frame_indices"):
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
    with pytest.raises(TokenFlowError, match="cannot read video"):
        evaluation.read_frames(tmp_path / "bad.mp4")
    with pytest.raises(TokenFlowError, match="numbered frames"):
        evaluation.read_frames(tmp_path / "empty")
