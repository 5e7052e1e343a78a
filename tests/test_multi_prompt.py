"""Several prompts in one run: 1 + 2P branch groups, the same keyframes, each prompt's frames
those of a run of its own, and what it saves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenflow.denoise
from tokenflow.batch import prompt_runs
from tokenflow.cli import main
from tokenflow.denoise import branch_groups
from tokenflow.install import TokenFlowUNet
from tokenflow.options import EditOptions
from tokenflow.pipeline import TokenFlowPipeline

PROMPTS = ["a fox", "a red dog", "a marble statue"]
SMALL = dict(inversion_prompt="a wolf", steps=3, inversion_steps=3, block_size=2, seed=1)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return TokenFlowPipeline(tiny_model)


@pytest.fixture(scope="module")
def frames(data_dir):
    """6 frames at 128x128 in blocks of 2 (3 keyframes)."""
    from tokenflow.video import read_clip

    return read_clip(data_dir / "wolf.mp4", max_frames=6, size=(128, 128)).frames


@pytest.fixture(scope="module")
def inversion(pipe, frames):
    return pipe.invert(pipe.encode_frames(frames), **SMALL)


def _noting_batches(monkeypatch) -> list[tuple[int, int, int, bool]]:
    """(first branch, branches, batch, records) of every editing UNet call from now on."""
    calls: list[tuple[int, int, int, bool]] = []
    original = TokenFlowUNet.__call__

    def noting(self, latents, t, text, call, **kwargs):
        if call.has_source or call.recorded_source:
            calls.append((call.first_branch, call.branches, latents.shape[0], call.record))
        return original(self, latents, t, text, call, **kwargs)

    monkeypatch.setattr(TokenFlowUNet, "__call__", noting)
    return calls


def assert_same_edit_up_to_rounding(got, want) -> None:
    """The same edit, batched differently. A CPU's matrix kernels pick their blocking and
    thread split by the rows of a product, so a row's sums may reorder with the batch it
    shares: bit-identical on some CPUs (the Xeons these tests were first run on), on others
    (an AMD EPYC at 2 threads: the timestep embedding and every small product) within 7e-5.
    Prompts' edits differ by ~3, so any mixing of branches fails here."""
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-3)
    assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1


@pytest.mark.parametrize("settings", [{}, {"baseline": "per-frame"}])
def test_each_prompt_of_one_run_equals_its_own_run(pipe, frames, inversion, settings):
    kwargs = dict(inversion=inversion, **SMALL, **settings)
    together = pipe.edit_prompts(frames, PROMPTS, **kwargs)
    alone = [pipe(frames, prompt=prompt, **kwargs) for prompt in PROMPTS]
    for one, own in zip(together, alone, strict=True):
        assert_same_edit_up_to_rounding(one, own)  # the branches never mix
        assert one.keyframes == own.keyframes  # the same keyframe draws for every prompt
    assert not torch.allclose(together[0].latents, together[1].latents, atol=1e-2)
    # the source branch once, two branches per prompt: 1 + 2P groups instead of 3P
    for kind, count in alone[0].unet_evaluations.items():
        if kind != "inversion":
            assert together[0].unet_evaluations[kind] * 3 == count * (1 + 2 * len(PROMPTS))
    assert all(r.prompts == PROMPTS for r in together)


def test_split_calls_keep_each_prompt_within_float_rounding(
    pipe, frames, inversion, monkeypatch, trace
):
    """A pass split into several UNet calls (a cap on batch entries; the per-branch keyframe
    pass of long clips) feeds the later calls the source's kept inputs: the same injections
    and correspondences, at most a reordered sum apart (CPU kernels pick their blocking by
    the rows of a matrix product: 7e-5 measured here)."""
    monkeypatch.setattr(tokenflow.denoise, "JOINT_KEYFRAMES", 2)  # 3 keyframes: per branch
    kwargs = dict(inversion=inversion, **SMALL)
    alone = pipe(frames, prompt=PROMPTS[1], **kwargs)
    single_trace = set(trace)
    trace.clear()
    calls = _noting_batches(monkeypatch)
    split = pipe.edit_prompts(frames, PROMPTS[:2], max_batch=1, **kwargs)
    keyframe_calls = [c for c in calls if c[3]]
    assert keyframe_calls[:5] == [(b, 1, 3, True) for b in range(5)]  # one branch per call
    block_calls = [c[:3] for c in calls if not c[3]]
    assert block_calls[:2] == [(0, 3, 6), (3, 2, 4)]  # source + prompt 0, then prompt 1
    assert set(trace) == single_trace  # the same injections and recordings, step by step
    torch.testing.assert_close(split[1].latents, alone.latents, rtol=0, atol=1e-3)
    assert split[1].unet_evaluations["keyframes"] * 3 == alone.unet_evaluations["keyframes"] * 5


@pytest.mark.parametrize(
    ("frames", "prompts", "cap", "apart", "groups"),
    [
        (8, 1, 24, False, [(0, 1, 2)]),  # one prompt: the authors' call, whatever the cap
        (8, 1, 1, False, [(0, 1, 2)]),
        (9, 1, 24, True, [(0,), (1,), (2,)]),  # a long clip's keyframe pass, as before
        (8, 3, 24, False, [(0, 1, 2), (3, 4), (5, 6)]),
        (2, 3, 24, False, [(0, 1, 2, 3, 4, 5, 6)]),
        (2, 4, 8, False, [(0, 1, 2), (3, 4, 5, 6), (7, 8)]),
    ],
)
def test_branch_groups_stay_within_the_cap(frames, prompts, cap, apart, groups):
    found = branch_groups(frames, prompts, cap, apart)
    assert found == groups
    assert [b for g in found for b in g] == list(range(1 + 2 * prompts))
    assert all(len(g) * frames <= max(cap, 3 * frames) for g in found)


def test_prompt_runs_write_a_folder_per_prompt():
    options = EditOptions(out="results/wolf")
    runs = prompt_runs(options, ["A fox!", "a fox?", "Été à Paris", "***"])
    assert [r.out for r in runs] == [
        "results/wolf/a-fox",
        "results/wolf/a-fox-2",
        "results/wolf/ete-a-paris",
        "results/wolf/prompt",
    ]
    assert [r.prompt for r in runs] == ["A fox!", "a fox?", "Été à Paris", "***"]
    assert prompt_runs(options, ["a fox"])[0].out == "results/wolf"  # one prompt: `out` itself


def test_cli_several_prompts_one_folder_each_reproducible_alone(
    data_dir, tiny_model_dir, tiny_edit_args, tmp_path, capsys
):
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(cache), *tiny_edit_args]
    common += ["--size", "128x128"]
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox", "--prompt", "a husky"]
    assert main([*argv, "--out", str(out), *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-fox", "a-husky"]
    info = json.loads((out / "a-husky" / "run.json").read_text())
    assert info["config"]["prompt"] == "a husky"
    assert info["config"]["out"] == str(out / "a-husky")
    shared = info["shared_run"]
    assert shared["prompts"] == ["a fox", "a husky"]
    # 5 frames, 4 steps, blocks of 2: 3 keyframes and 5 frames per step, 5 groups instead of 6
    assert shared["editing_unet_frame_evaluations"] == (3 + 5) * 4 * 5
    assert shared["separate_runs_editing_unet_frame_evaluations"] == (3 + 5) * 4 * 6

    # its run.json alone, as a one-prompt run, gives the same frames (up to the rounding of
    # differently batched kernels: see assert_same_edit_up_to_rounding)
    alone = tmp_path / "alone"
    config = ["edit", "--config", str(out / "a-husky" / "run.json"), "--out", str(alone)]
    assert main([*config, "--quiet"]) == 0
    assert json.loads((alone / "run.json").read_text())["inversion_cache"] == "hit"
    fox, husky, own = (
        [np.asarray(Image.open(folder / "frames" / f"{i:05d}.png"), dtype=int) for i in range(5)]
        for folder in (out / "a-fox", out / "a-husky", alone)
    )
    assert max(np.abs(a - b).max() for a, b in zip(husky, own, strict=True)) <= 1
    assert max(np.abs(a - b).max() for a, b in zip(husky, fox, strict=True)) > 10


def test_cli_refuses_a_prompt_given_twice(data_dir, tiny_model_dir, tmp_path, capsys):
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox", "--prompt", "a fox"]
    code = main([*argv, "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)])
    assert code == 2
    assert "error: --prompt 'a fox' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
