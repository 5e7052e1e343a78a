"""The preview: which frames it edits, what it costs against the full edit, and its folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from tokenflow import EditOptions
from tokenflow.cli import build_parser, main
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.preview import (
    editing,
    planned_evaluations,
    preview_count,
    preview_edit,
    preview_frames,
)

SMALL = dict(prompt="a fox", inversion_prompt="a wolf", steps=4, inversion_steps=8, block_size=2)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 40, 119, 120])
def test_preview_frames_are_evenly_spaced_from_first_to_last(n):
    for k in range(1, n + 1):
        frames = preview_frames(n, k)
        assert len(frames) == k == len(set(frames)) and frames == sorted(frames)
        if k > 1:
            assert (frames[0], frames[-1]) == (0, n - 1)
            gaps = np.diff(frames)
            assert gaps.max() - gaps.min() <= 1  # as even as whole frames allow
    assert preview_frames(n, n + 3) == list(range(n))  # never more than the clip
    assert preview_frames(n, 1) == [(n - 1) // 2]


def test_default_k_is_the_full_edits_keyframe_count():
    options = EditOptions(block_size=8, preview=0)
    assert preview_count(120, options) == 15 == math.ceil(120 / 8)
    assert preview_count(41, options) == 6  # the shorter last block has a keyframe too
    assert preview_count(120, options.replace(preview=4)) == 4
    assert preview_count(3, options.replace(preview=9)) == 3


def test_preview_flag_takes_an_optional_k():
    def preview(*flags: str):
        return vars(build_parser().parse_args(["edit", "clip.mp4", *flags])).get("preview")

    assert preview() is None  # not given: a full edit
    assert preview("--preview") == 0  # bare: the keyframe count
    assert preview("--preview", "5") == 5
    assert preview("--preview", "--out", "o") == 0


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return TokenFlowPipeline(tiny_model)


@pytest.fixture(scope="module")
def full(pipe, wolf_frames):
    """The full edit of the 6 frames (3 blocks of 2), for comparison."""
    return pipe(wolf_frames, EditOptions(**SMALL))


def test_the_planned_cost_is_what_an_edit_takes(full, wolf_frames):
    options = EditOptions(**SMALL)
    assert planned_evaluations(len(wolf_frames), options, 4) == full.unet_evaluations


def test_preview_costs_k_over_n_of_the_full_edit(pipe, full, wolf_frames):
    n = len(wolf_frames)
    preview = preview_edit(pipe, wolf_frames, EditOptions(**SMALL), inversion=full.inversion)
    k = len(preview.indices)
    assert k == 3 and preview.indices == [0, 2, 5]
    counts = preview.result.unet_evaluations
    assert counts["inversion"] == 0  # sliced from the whole clip's inversion
    assert editing(counts) == 3 * k * 4  # three branches, K frames, 4 steps
    # K/N of the full edit's per-frame denoising (its keyframe passes come on top)
    assert editing(counts) * n == full.unet_evaluations["propagation"] * k
    assert preview.full_evaluations == {**full.unet_evaluations, "inversion": 0}
    assert preview.result.frames.shape == (k, 64, 64, 3)
    assert preview.estimate_s is not None and preview.estimate_s > 0


def test_a_preview_inverts_only_its_frames_and_matches_the_sliced_inversion(
    pipe, full, wolf_frames
):
    alone = preview_edit(pipe, wolf_frames, EditOptions(**SMALL, preview=2))
    assert alone.indices == [0, 5]
    assert alone.result.unet_evaluations["inversion"] == 2 * 8  # K/N of the inversion
    assert alone.full_evaluations["inversion"] == 6 * 8  # the full edit will still invert
    sliced = full.inversion.select(alone.indices)
    for t, z in alone.result.inversion.latents.items():
        torch_close(z, sliced.latents[t])
    reused = preview_edit(pipe, wolf_frames, EditOptions(**SMALL, preview=2), inversion=sliced)
    difference = np.abs(reused.result.frames.astype(int) - alone.result.frames).max()
    assert difference <= 1  # float rounding of the inversion at most


def torch_close(a, b):
    import torch

    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cli_preview_writes_a_contact_sheet_frames_and_the_full_cost(
    tmp_path, data_dir, tiny_model_dir, tiny_edit_args
):
    out = tmp_path / "preview"
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    args = ["edit", str(data_dir / "wolf.mp4"), *common, *tiny_edit_args, "--prompt"]
    assert main([*args, "a fox", "--out", str(out), "--preview"]) == 0
    info = json.loads((out / "run.json").read_text())
    preview = info["preview"]
    assert preview["frames"] == [0, 2, 4] and preview["clip_frames"] == 5  # 5 frames, blocks of 2
    assert sorted(p.name for p in (out / "frames").iterdir()) == [
        "00000.png", "00002.png", "00004.png"
    ]  # fmt: skip
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 3 * 2 * 64 and sheet.height >= 64  # three (source | edited) pairs
    full = preview["full_edit"]["unet_frame_evaluations"]
    assert full["inversion"] == 5 * 8 and info["inversion_cache"] == "miss"
    assert info["config"]["preview"] == 0  # run.json reproduces the preview

    # a second prompt reuses the preview's inversion; after a full edit, the whole clip's
    again = tmp_path / "again"
    assert main([*args, "a cat", "--out", str(again), "--preview"]) == 0
    assert json.loads((again / "run.json").read_text())["inversion_cache"] == "hit"
    assert main([*args, "a fox", "--out", str(tmp_path / "full")]) == 0
    third = tmp_path / "third"
    assert main([*args, "a fox", "--out", str(third), "--preview", "2"]) == 0
    info = json.loads((third / "run.json").read_text())
    assert info["inversion_cache"] == "hit (whole clip)"
    assert info["preview"]["frames"] == [0, 4]
    assert info["preview"]["full_edit"]["unet_frame_evaluations"]["inversion"] == 0
    edited_full = np.asarray(Image.open(tmp_path / "full" / "frames" / "00004.png"))
    edited_preview = np.asarray(Image.open(third / "frames" / "00004.png"))
    assert edited_full.shape == edited_preview.shape == (64, 64, 3)
