"""Editing methods and baselines: per-frame, extended attention, fixed keyframes, SDEdit, paper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenflow.cli import main
from tokenflow.denoise import initial_latents
from tokenflow.inversion import Inversion, edit_timesteps
from tokenflow.keyframes import block_bounds, paper_propagation
from tokenflow.methods import method_for
from tokenflow.options import BASELINES, EditOptions
from tokenflow.pipeline import TokenFlowPipeline

TINY = dict(steps=2, inversion_steps=2, inversion_prompt="a wolf")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return TokenFlowPipeline(tiny_model)


@pytest.fixture(scope="module")
def frames(wolf_frames):
    return wolf_frames[:4]


@pytest.fixture(scope="module")
def inversion(pipe, frames):
    return pipe.invert(
        pipe.encode_frames(frames), inversion_prompt="a wolf", inversion_steps=4, steps=4
    )


def test_per_frame_output_of_a_frame_does_not_depend_on_other_frames(pipe, frames):
    changed = frames.copy()
    changed[3] = 255 - changed[3]  # frame 3 shares a block (UNet batch) with frame 2
    kwargs = dict(prompt="a fox", baseline="per-frame", block_size=2, **TINY)
    a = pipe(frames, **kwargs)
    b = pipe(changed, **kwargs)
    assert not np.array_equal(a.frames[3], b.frames[3])
    # bit-identical: no op mixes batch elements, and CPU kernels give each row the same result
    # whatever the other rows hold (the batch shapes are the same in both runs)
    assert np.array_equal(a.frames[:3], b.frames[:3])
    assert torch.equal(a.latents[:3], b.latents[:3])
    assert a.keyframes == [] and set(a.unet_evaluations) == {"inversion", "blocks"}


def test_extended_attention_with_blocks_of_one_is_per_frame(pipe, frames, inversion):
    kwargs = dict(prompt="a fox", inversion=inversion, steps=4, inversion_prompt="a wolf")
    extended = pipe(frames, baseline="extended-attention", block_size=1, **kwargs)
    per_frame = pipe(frames, baseline="per-frame", block_size=1, **kwargs)
    # same batches, and attention over one frame's tokens is the same SDPA call: exact
    assert torch.equal(extended.latents, per_frame.latents)
    # per-frame in blocks of 2 batches two frames per UNet call: equal up to float noise
    batched = pipe(frames, baseline="per-frame", block_size=2, **kwargs)
    torch.testing.assert_close(batched.latents, per_frame.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(batched.frames.astype(int) - per_frame.frames.astype(int)).max() <= 1


def test_extended_attention_is_joint_within_a_block(pipe, frames, inversion):
    kwargs = dict(prompt="a fox", inversion=inversion, steps=4, inversion_prompt="a wolf")
    extended = pipe(frames, baseline="extended-attention", block_size=2, **kwargs)
    per_frame = pipe(frames, baseline="per-frame", block_size=2, **kwargs)
    assert not torch.allclose(extended.latents, per_frame.latents, atol=1e-3)


def test_fixed_keyframes_are_the_block_centres_at_every_step(pipe, wolf_frames):
    result = pipe(wolf_frames[:5], prompt="a fox", baseline="fixed-keyframes", block_size=2, **TINY)
    # blocks [0, 2), [2, 4), [4, 5): centres start + length // 2
    assert result.keyframes == [[1, 3, 4]] * 2
    assert result.unet_evaluations["keyframes"] == 3 * 3 * 2


@pytest.mark.parametrize(
    ("steps", "compat", "first"), [(50, False, 5), (50, True, 6), (10, False, 1), (10, True, 2)]
)
def test_sdedit_start_step(steps, compat, first):
    options = EditOptions(steps=steps, method="sdedit", strength=0.9, strength_compat=compat)
    method = method_for(options)
    # 0.9 of 50 runs the last 45 steps (44 with the authors' slicing), of 10 the last 9 (8)
    assert method.first_step() == first
    assert not any(method.injection(i).qk or method.injection(i).residual for i in range(steps))


def _fake_inversion(pipe, n: int, steps: int) -> Inversion:
    """Source latents at every editing timestep (values do not matter for counting)."""
    g = torch.Generator().manual_seed(0)
    timesteps = edit_timesteps(pipe.model.new_scheduler(), steps)
    latents = {t: torch.randn(n, 4, 8, 8, generator=g) for t in timesteps}
    return Inversion(latents, max(timesteps))


@pytest.mark.parametrize("compat", [False, True])
def test_sdedit_runs_exactly_the_scheduled_steps(pipe, wolf_frames, compat):
    steps, frames = 10, wolf_frames[:1]
    all_timesteps = edit_timesteps(pipe.model.new_scheduler(), steps)
    seen: list[int] = []
    hook = pipe.model.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    progress: list[tuple[str, int, int]] = []
    try:
        result = pipe(
            frames,
            prompt="a fox",
            method="sdedit",
            strength=0.9,
            strength_compat=compat,
            steps=steps,
            block_size=1,
            inversion=_fake_inversion(pipe, 1, steps),
            progress=lambda stage, done, total: progress.append((stage, done, total)),
        )
    finally:
        hook.remove()
    run = 8 if compat else 9
    # the edit stage counts frame-steps: one frame, ``run`` steps; reported after every UNet call
    edit = [(done, total) for stage, done, total in progress if stage == "edit"]
    # per step: after the keyframe pass (no frame done yet), after the one block pass
    assert edit == [(0, run)] + [(s + d, run) for s in range(run) for d in (0, 1)]
    # two UNet calls per step (keyframe pass, block pass), at the last ``run`` timesteps
    assert seen == [t for t in all_timesteps[-run:] for _ in range(2)]
    assert result.unet_evaluations == {"inversion": 0, "keyframes": 3 * run, "propagation": 3 * run}
    assert len(result.keyframes) == run


def test_sdedit_has_no_injections_but_pnp_has(pipe, frames, inversion, trace):
    kwargs = dict(prompt="a fox", inversion=inversion, steps=4, block_size=2)
    pipe(frames, method="sdedit", strength=1.0, **kwargs)
    kinds = {kind for _, kind, _ in trace}
    assert kinds == {"record"}  # keyframe tokens recorded and propagated, nothing injected
    assert {step for step, _, _ in trace} == {0, 1, 2, 3}
    trace.clear()
    pipe(frames, method="pnp", **kwargs)
    assert {kind for _, kind, _ in trace} == {"record", "qk", "residual"}


def test_sdedit_random_noise_is_reproducible_by_seed_and_differs_from_ddim(pipe, frames, inversion):
    kwargs = dict(
        prompt="a fox", method="sdedit", inversion=inversion, steps=4, block_size=2, strength=0.5
    )
    ddim = pipe(frames, noise="ddim", seed=1, **kwargs)
    random = pipe(frames, noise="random", seed=1, **kwargs)
    again = pipe(frames, noise="random", seed=1, **kwargs)
    other = pipe(frames, noise="random", seed=2, **kwargs)
    assert torch.equal(random.latents, again.latents)
    assert not torch.allclose(random.latents, ddim.latents, atol=1e-3)
    assert not torch.allclose(random.latents, other.latents, atol=1e-3)
    # the starting latents themselves: one Gaussian draw per seed, shared by every frame
    z0 = pipe.encode_frames(frames)
    scheduler = pipe.model.new_scheduler()
    t0 = edit_timesteps(scheduler, 4)[2]
    start = initial_latents(scheduler, z0, inversion, t0, "random", seed=1)
    assert torch.equal(start, initial_latents(scheduler, z0, inversion, t0, "random", seed=1))
    assert not torch.equal(start, initial_latents(scheduler, z0, inversion, t0, "ddim", seed=1))


def test_paper_propagation_on_a_hand_made_example():
    bounds = block_bounds(8, 4)  # [0, 4), [4, 8)
    keyframes = torch.tensor([1, 6])
    first = paper_propagation(bounds, 0, keyframes)
    # f0: before the first keyframe -> keyframe 1 alone; f1 is keyframe 1 -> itself alone;
    # f2, f3 lie between 1 and 6: weight of keyframe 1 is (6 - f) / (6 - 1)
    assert first.slot_a.tolist() == [0, 0, 0, 0]
    assert first.slot_b.tolist() == [-1, -1, 1, 1]
    torch.testing.assert_close(first.weight_a, torch.tensor([1.0, 1.0, 0.8, 0.6]))
    second = paper_propagation(bounds, 1, keyframes)
    # f4, f5 between the keyframes; f6 is keyframe 6 alone; f7 after the last -> 6 alone
    assert second.slot_a.tolist() == [0, 0, 1, 1]
    assert second.slot_b.tolist() == [1, 1, -1, -1]
    torch.testing.assert_close(second.weight_a, torch.tensor([0.4, 0.2, 1.0, 1.0]))


def test_paper_propagation_keyframes_take_their_own_tokens_alone():
    bounds = block_bounds(10, 3)  # the last block is short
    keyframes = torch.tensor([2, 3, 8, 9])
    for b in range(len(bounds)):
        prop = paper_propagation(bounds, b, keyframes)
        for i, f in enumerate(range(*bounds[b])):
            if f in keyframes.tolist():
                assert prop.slot_a[i] == keyframes.tolist().index(f)
                assert prop.slot_b[i] == -1 and prop.weight_a[i] == 1


# 5 frames in blocks of 2 (3 keyframes), 4 steps, 3 branches; inversion 5 frames x 8 steps
TOKENFLOW = {"inversion": 40, "keyframes": 3 * 3 * 4, "propagation": 3 * 5 * 4}
VARIANTS = {
    "pnp": ([], TOKENFLOW),
    "sdedit": (
        ["--method", "sdedit", "--strength", "0.5"],  # the last 2 of 4 steps
        {"inversion": 40, "keyframes": 3 * 3 * 2, "propagation": 3 * 5 * 2},
    ),
    "per-frame": (["--baseline", "per-frame"], {"inversion": 40, "blocks": 3 * 5 * 4}),
    "extended-attention": (
        ["--baseline", "extended-attention"],
        {"inversion": 40, "blocks": 3 * 5 * 4},
    ),
    "fixed-keyframes": (["--baseline", "fixed-keyframes"], TOKENFLOW),
    "paper-propagation": (["--propagation", "paper"], TOKENFLOW),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_and_baseline_writes_the_same_outputs(
    variant, tmp_path, data_dir, tiny_model_dir, tiny_edit_args
):
    flags, evaluations = VARIANTS[variant]
    out = tmp_path / variant
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox", "--model"]
    argv += [str(tiny_model_dir), "--out", str(out), *tiny_edit_args, "--no-cache", *flags]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {
        "edited.mp4",
        "frames",
        "side_by_side.mp4",
        "run.json",
    }
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    info = json.loads((out / "run.json").read_text())
    assert info["unet_frame_evaluations"] == evaluations
    assert info["method"] == ("sdedit" if variant == "sdedit" else "pnp")
    assert info["baseline"] == (variant if variant in BASELINES else None)
    assert info["propagation"] == ("paper" if variant == "paper-propagation" else "reference")
