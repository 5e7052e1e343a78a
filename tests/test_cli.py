"""The command line end to end on a real clip with a tiny model saved like a real one."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from tokenflow.cli import main


def probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, (stream.width, stream.height), float(stream.average_rate)


@pytest.fixture(scope="module")
def edited(tmp_path_factory, data_dir, tiny_model_dir, tiny_edit_args):
    out = tmp_path_factory.mktemp("cli") / "out"
    cache = tmp_path_factory.mktemp("cache")
    code = main(
        [
            "edit",
            str(data_dir / "wolf.mp4"),
            "--prompt",
            "a fox",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            *tiny_edit_args,
        ]
    )
    assert code == 0
    return out, cache


def test_outputs_have_the_frame_count_size_and_fps(edited, data_dir):
    out, _ = edited
    _, _, source_fps = probe(data_dir / "wolf.mp4")
    frames, size, fps = probe(out / "edited.mp4")
    assert (frames, size) == (5, (64, 64))
    assert fps == pytest.approx(source_fps)
    assert probe(out / "side_by_side.mp4")[:2] == (5, (128, 64))
    pngs = sorted((out / "frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(5)]
    assert np.asarray(Image.open(pngs[0])).shape == (64, 64, 3)


def test_run_json_records_the_run(edited):
    out, _ = edited
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["prompt"] == "a fox" and info["seed"] == 1
    assert info["frame_indices"] == [0, 1, 2, 3, 4]
    assert info["inversion_cache"] == "miss"
    assert info["unet_frame_evaluations"]["inversion"] == 5 * 8
    assert {"read", "inversion", "denoise", "decode", "write"} <= set(info["timings_s"])
    assert len(info["model"]["fingerprint"]) == 16 and "torch" in info["versions"]


def test_second_prompt_reuses_the_inversion_and_run_json_reproduces(
    edited, tiny_model_dir, tmp_path
):
    out, cache = edited
    again = tmp_path / "again"
    code = main(
        [
            "edit",
            "--config",
            str(out / "run.json"),
            "--prompt",
            "a dog",
            "--out",
            str(again),
            "--model",
            str(tiny_model_dir),
            "--cache-dir",
            str(cache),
            "--quiet",
        ]
    )
    assert code == 0
    info = json.loads((again / "run.json").read_text())
    assert info["inversion_cache"] == "hit"
    assert info["unet_frame_evaluations"]["inversion"] == 0
    assert info["frame_indices"] == [0, 1, 2, 3, 4]
    # same settings as the first run, the prompt excepted -> different pixels
    first = np.asarray(Image.open(out / "frames" / "00002.png"))
    second = np.asarray(Image.open(again / "frames" / "00002.png"))
    assert not np.array_equal(first, second)
    # and the first run's run.json alone reproduces it bit for bit
    replay = tmp_path / "replay"
    assert main(["edit", "--config", str(out / "run.json"), "--out", str(replay), "--quiet"]) == 0
    for i in range(5):
        a = np.asarray(Image.open(out / "frames" / f"{i:05d}.png"))
        b = np.asarray(Image.open(replay / "frames" / f"{i:05d}.png"))
        assert np.array_equal(a, b)


def test_keyframe_memory_is_a_memory_setting_not_a_result(edited, tmp_path):
    """Spilling every keyframe recording to disk gives the same frames, and is recorded."""
    out, _ = edited
    spilled = tmp_path / "spilled"
    argv = ["edit", "--config", str(out / "run.json"), "--out", str(spilled), "--quiet"]
    assert main([*argv, "--keyframe-memory", "0"]) == 0
    assert json.loads((spilled / "run.json").read_text())["config"]["keyframe_memory"] == 0
    for i in range(5):
        a = np.asarray(Image.open(out / "frames" / f"{i:05d}.png"))
        b = np.asarray(Image.open(spilled / "frames" / f"{i:05d}.png"))
        assert np.array_equal(a, b)
