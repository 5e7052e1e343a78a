"""One edit over several ranks (torch.distributed, gloo on the CPU, launched by torchrun): the
single-process frames, a failing rank stopping every rank with one line naming it, Ctrl-C on
the launcher, and interrupted runs resumed from their step checkpoint.

Exactness. Every rank makes the single-process calls for its blocks; only the keyframe pass is
cut by rows (each rank's keyframes' queries against every keyframe's gathered keys/values, which
SDPA computes row by row). The CPU's kernels, though, sum in another order for another batch in
two places (on an Intel Xeon; an AMD EPYC, Zen 5, at one thread keeps the same cases exact):
oneDNN's 1x1 convolution (the resnets' shortcuts) switches kernels at 16 batch
entries, and matrix products of under ~6 rows (the timestep embedding of a call of 1 keyframe)
take another path. Where a rank's share of a keyframe call lands on the other side of those
switches than the whole call, latents differ by float rounding (below 1e-4 here). The
bit-identical cases keep every rank on the whole call's side: 5 keyframes (all calls under 16
entries), or 49 edited one branch per call (16 or more per rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from rank_worker import LIVE_GROUPS, run_edit

import tokenflow.checkpoint
from tokenflow.cache import InversionCache
from tokenflow.cli import main
from tokenflow.distributed.comm import Communicator, PeerLost
from tokenflow.distributed.faults import describe, failure_guard
from tokenflow.distributed.plan import DenoisePlan, balanced_runs, frame_shards
from tokenflow.errors import first_line
from tokenflow.methods import structure_for
from tokenflow.options import EditOptions
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.recordings import KeyframeRecordings

WORKER = Path(__file__).with_name("rank_worker.py")


def torchrun(ranks: int, *args: str) -> list[str]:
    """A torchrun command line on a free port (other test runs may launch at the same time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", *args]  # fmt: skip


@contextlib.contextmanager
def one_thread():
    """As torchrun runs each rank: oneDNN splits its sums by the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_frames(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(p)) for p in sorted((folder / "frames").iterdir())])


# -- the plan: who does what -----------------------------------------------------------------------


def test_runs_and_shards_are_contiguous_balanced_and_aligned():
    costs = [3] * 48 + [2]  # 49 blocks of 2 frames and a short last one, keyframe included
    for parts in (2, 3, 4, 7):
        runs = balanced_runs(costs, parts)
        assert [i for run in runs for i in run] == list(range(49))
        loads = [sum(costs[i] for i in run) for run in runs]
        assert max(loads) - min(loads) <= 3  # within one block
    assert balanced_runs([1, 1], 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    shards = frame_shards(97, 3, 16)
    assert [(s.start, s.stop) for s in shards] == [(0, 32), (32, 64), (64, 97)]
    assert frame_shards(9, 2, 16) == [range(0, 9), range(9, 9)]  # whole VAE/inversion calls


@pytest.mark.parametrize(
    "frames, settings, ranks",
    [
        (13, dict(block_size=2), 3),
        (13, dict(block_size=2, propagation="paper"), 2),
        (9, dict(block_size=2), 6),  # more ranks than blocks: the last idle
        (25, dict(block_size=2, max_keyframes=4), 3),
        (13, dict(block_size=3, baseline="per-frame"), 2),
    ],
)
def test_every_block_is_denoised_once_and_each_rank_has_what_it_blends(frames, settings, ranks):
    options = EditOptions(**settings)
    passes = structure_for(frames, options).step()
    works = [
        DenoisePlan(SimpleNamespace(rank=r, world=ranks, new_group=lambda ranks: None),
                    frames, options).assign(passes)
        for r in range(ranks)
    ]  # fmt: skip
    blocks = [p.block for w in works for p in w.passes if p.block is not None]
    assert sorted(blocks) == sorted({p.block for p in passes if p.block is not None})
    assert all(w.blocks == works[0].blocks for w in works)  # every rank works out the same plan
    for rank, work in enumerate(works):
        assert [p.block for p in work.passes if p.block is not None] == work.blocks[rank]
    shares = [p.share for w in works for p in w.passes if p.share is not None]
    if not shares:  # long-video windows and baselines: passes whole, as in one process
        assert all(any(p is q for q in passes) for w in works for p in w.passes)
        return
    keyframes = torch.cat([p.frames for w in works for p in w.passes if p.share is not None])
    assert torch.equal(keyframes, passes[0].frames)  # split by rows, in keyframe order
    for rank, work in enumerate(works):
        share = next((p.share for p in work.passes if p.share is not None), None)
        if share is None:
            assert not work.passes
            continue
        rows = len(work.blocks[rank]) + sum(share.receives.values())
        for p in work.passes[1:]:  # every keyframe a block blends is in this rank's recordings
            assert max(p.propagation.slots()) < rows
        for peer, sent in share.sends.items():  # a rank receives what its peer sends it
            peer_share = next(p.share for p in works[peer].passes if p.share is not None)
            assert peer_share.receives[rank] == len(sent) <= 2


def test_a_rank_blending_keyframes_of_both_neighbours_receives_from_both():
    """The paper's blend over 4 ranks: a middle rank's blocks need the last keyframe of the
    rank before and the first of the rank after; both arrive, in rank order, after its own."""
    frames, ranks, options = 40, 4, EditOptions(block_size=8, propagation="paper")
    passes = structure_for(frames, options).step()
    fake = SimpleNamespace(rank=1, world=ranks, new_group=lambda ranks: None)
    work = DenoisePlan(fake, frames, options).assign(passes)
    share = next(p.share for p in work.passes if p.share is not None)
    assert sorted(share.receives) == [0, 2]  # two senders
    own = share.counts[1]
    recordings = KeyframeRecordings(budget_bytes=2**30)
    recordings.put("attn1", "k", torch.zeros(own, 3, 2))
    fake.exchange = lambda sends, receives, what: {  # rank r sends rows filled with r + 1
        r: torch.full(shape, r + 1.0, dtype=dtype) for r, (shape, dtype) in receives.items()
    }
    share.comm = fake
    share.exchange_recordings(recordings)
    rows = recordings.get("attn1", "k")
    assert rows.shape == (own + 2, 3, 2)
    assert rows[:own].eq(0).all() and rows[own].eq(1).all() and rows[own + 1].eq(3).all()


def test_an_edit_destroys_its_sub_groups_when_it_ends_cleanly_only():
    released: list[int] = []
    comm = SimpleNamespace(rank=0, world=2, release_groups=lambda: released.append(1))
    with failure_guard(comm):
        pass
    assert released == [1]
    with pytest.raises(ZeroDivisionError), failure_guard(comm):
        raise ZeroDivisionError
    assert released == [1]  # broken with the world, which takes them down with it


def test_one_line_reports_take_the_first_line_of_an_error():
    assert first_line(RuntimeError("\n  closed\n  at gloo.cpp:42\n")) == "closed"
    assert first_line(RuntimeError()) == ""
    assert describe(ValueError("bad\nworse")) == "ValueError: bad"
    assert describe(ValueError()) == "ValueError"
    for error, said in (
        (RuntimeError("reset\nby peer"), "reset"),
        (RuntimeError(), "RuntimeError"),
    ):
        with pytest.raises(PeerLost) as lost, Communicator._talking(SimpleNamespace(), "latents"):
            raise error
        assert str(lost.value) == f"lost contact with the other ranks during latents ({said})"


# -- the frames: over ranks as in one process ------------------------------------------------------


@pytest.fixture(scope="module")
def single(data_dir, tiny_model):
    """name -> the single-process results (one thread, as each rank runs)."""
    pipe, done = TokenFlowPipeline(tiny_model), {}

    def result(name: str):
        if name not in done:
            with one_thread():
                done[name] = run_edit(pipe, data_dir, name)
        return done[name]

    return result


LAUNCHES = {
    2: ["reference", "long-video", "prompts-paper"],
    3: ["per-branch", "per-frame", "idle-rank", "idle-rank"],  # the last: two edits in a row
}


@pytest.fixture(scope="module")
def over_ranks(data_dir, tmp_path_factory):
    """ranks -> name -> rank 0's results of the edits run over that many ranks."""
    found = {}
    for ranks, names in LAUNCHES.items():
        out = tmp_path_factory.mktemp("ranks") / f"{ranks}.pt"
        run = subprocess.run(
            torchrun(ranks, str(WORKER), "edits", str(out), str(data_dir), *names),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        found[ranks] = torch.load(out, weights_only=False)
    return found


@pytest.mark.parametrize(
    "ranks, name, split",
    [
        (2, "reference", "shared"),
        (3, "per-branch", "shared"),
        (2, "long-video", "windows"),
        (3, "per-frame", "blocks"),
    ],
)
def test_ranks_give_the_single_process_frames_bit_for_bit(ranks, name, split, over_ranks, single):
    got, want = over_ranks[ranks][name], single(name)
    assert got["keyframes"] == want[0].keyframes  # every rank drew the same keyframes
    for p, result in enumerate(want):
        assert torch.equal(got["latents"][p], result.latents), name
        assert np.array_equal(got["frames"][p].numpy(), result.frames), name
    assert got["evaluations"] == want[0].unet_evaluations  # the same work, summed over ranks
    spread = got["distributed"]
    assert spread["ranks"] == ranks and spread["split"] == split and spread["backend"] == "gloo"
    received = spread["received_bytes"]
    if split == "shared":  # keys/values gathered in every layer; boundary keyframes sent
        assert all(r["keyframe keys/values"] > 0 for r in received)
        assert any(r.get("keyframe recordings", 0) > 0 for r in received[1:])
    else:
        assert not any("keyframe keys/values" in r for r in received)
    if name == "per-branch":  # the inversion was sharded and gathered on rank 0
        assert received[0]["inverted latents"] > 0 and received[1]["source latents"] > 0


def test_edits_with_more_ranks_than_blocks_leave_no_process_group_behind(over_ranks, single):
    """With more ranks than blocks the keyframe pass runs on a sub-group of the ranks that have
    blocks, made for the edit; a process running edit after edit (the Python API) must not
    keep one per edit. Rank 0 is in the sub-group, so it would count every one left."""
    got = over_ranks[3]["idle-rank"]
    assert got["distributed"]["split"] == "shared"
    assert all(r["keyframe keys/values"] > 0 for r in got["distributed"]["received_bytes"][:2])
    assert "keyframe keys/values" not in got["distributed"]["received_bytes"][2]  # idle
    live = over_ranks[3][LIVE_GROUPS]
    assert live == [live[0]] * (len(LAUNCHES[3]) + 1), live  # the world alone, edit after edit
    # one keyframe per rank: its calls' timestep embedding takes the CPU's path for under ~6
    # rows (module docstring), so float rounding only
    (result,) = single("idle-rank")
    torch.testing.assert_close(got["latents"][0], result.latents, rtol=0, atol=2e-4)
    assert np.abs(got["frames"][0].numpy().astype(int) - result.frames.astype(int)).max() <= 1


def test_two_prompts_and_the_papers_blend_over_ranks_differ_by_float_rounding_only(
    over_ranks, single
):
    """Two prompts: 5 branches, the keyframe calls split 10 + 15 entries against 35 whole,
    across the 1x1 convolution's 16-entry switch; the paper's blend reads the next rank's
    keyframe too. A wrong branch or keyframe would move latents by ~1, not 1e-4."""
    got, want = over_ranks[2]["prompts-paper"], single("prompts-paper")
    assert got["keyframes"] == want[0].keyframes
    for p, result in enumerate(want):
        torch.testing.assert_close(got["latents"][p], result.latents, rtol=0, atol=2e-4)
        diff = np.abs(got["frames"][p].numpy().astype(int) - result.frames.astype(int))
        assert diff.max() <= 1
    assert not torch.allclose(got["latents"][0], got["latents"][1], atol=1e-2)  # two edits


# -- the command line under torchrun ------------------------------------------------------------


def edit_argv(data_dir: Path, model: Path, out: Path, *flags: str) -> list[str]:
    argv = ["edit", str(data_dir / "wolf.mp4"), "--model", str(model), "--prompt", "a fox"]
    argv += ["--inversion-prompt", "a wolf", "--frames", "9", "--size", "128x128"]
    return [*argv, "--block-size", "2", "--out", str(out), "--rank-timeout", "60", *flags]


def test_torchrun_edit_writes_the_single_process_outputs(tmp_path, data_dir, tiny_model_dir):
    flags = ("--steps", "3", "--inversion-steps", "3")
    with one_thread():
        assert (
            main([*edit_argv(data_dir, tiny_model_dir, tmp_path / "one", *flags), "--quiet"]) == 0
        )
    argv = edit_argv(data_dir, tiny_model_dir, tmp_path / "two", *flags)
    run = subprocess.run(
        torchrun(2, "-m", "tokenflow", *argv), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.array_equal(read_frames(tmp_path / "two"), read_frames(tmp_path / "one"))
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["distributed"]["ranks"] == 2
    ours = [line for line in run.stderr.splitlines() if line.startswith(("wrote", "done in"))]
    assert len(ours) == 2, run.stderr  # rank 0 speaks for both
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no checkpoint


@pytest.mark.parametrize(
    "fault, says",
    [
        ("raise", "rank 1 of 2 failed: ZeroDivisionError: injected at this step"),
        ("kill", "rank 1 of 2 stopped responding (killed"),
    ],
)
def test_a_rank_that_fails_stops_every_rank_with_one_line(fault, says, tmp_path, data_dir,
                                                          tiny_model_dir):  # fmt: skip
    out, cache = tmp_path / "results" / "out", tmp_path / "cache"
    argv = edit_argv(data_dir, tiny_model_dir, out, "--steps", "4", "--inversion-steps", "4")
    argv += ["--cache-dir", str(cache), "--quiet"]
    clock = time.perf_counter()
    run = subprocess.run(
        torchrun(2, str(WORKER), "cli", fault, "1", "2", *argv),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # launch, the edit to step 2, then seconds; a rank waiting for the dead one until the
    # group's timeout (60 s) would take longer
    assert time.perf_counter() - clock < 45, run.stderr
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], run.stderr
    assert run.stderr.count("ZeroDivisionError") <= 1  # no traceback from the failing rank
    assert not out.exists()
    # the inversion, done before the failure, is in the cache, complete; nothing half-written
    cache_files = sorted(p.name for p in cache.iterdir())
    assert len(cache_files) == 1 and cache_files[0].endswith(".safetensors"), cache_files
    entry = InversionCache(cache).entries()[0]
    assert InversionCache(cache).load(entry.key) is not None
    # the steps completed before it are kept, to resume from
    assert [p.name for p in out.parent.iterdir()] == [".out.resume.safetensors"]


@pytest.mark.parametrize(
    "rank, says",
    [
        ("1", ["error: rank 1 of 2 failed: ZeroDivisionError: injected before the edit;"]),
        ("0", []),  # rank 0's own bug: its traceback, and not a word from rank 1
    ],
)
def test_a_rank_that_fails_before_the_pipeline_is_named_with_its_error(
    rank, says, tmp_path, data_dir, tiny_model_dir
):
    """A rank failing while it prepares (read, load, rank 0's checks) is named with its error
    by the job's own guard, not taken for one that stopped responding or was terminated."""
    argv = edit_argv(data_dir, tiny_model_dir, tmp_path / "out", "--steps", "2", "--quiet")
    run = subprocess.run(
        torchrun(2, str(WORKER), "cli", "early", rank, "0", *argv),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(says), run.stderr
    assert all(e.startswith(s) for e, s in zip(errors, says, strict=True)), run.stderr
    assert run.stderr.count("ZeroDivisionError: injected before the edit") == 1, run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["edit", "--no-such-flag"], 2)])
def test_a_torchrun_rank_exits_from_argparse_as_alone(argv, code):
    """``--help``, ``--version`` and a flag typo end as they do without torchrun: no traceback."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="1")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tokenflow", *argv], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_on_the_launcher_stops_every_rank(tmp_path, data_dir, tiny_model_dir):
    out = tmp_path / "out"
    argv = edit_argv(data_dir, tiny_model_dir, out, "--steps", "50", "--inversion-steps", "50")
    launcher = subprocess.Popen(
        torchrun(2, "-m", "tokenflow", *argv),
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    checkpoint = tokenflow.checkpoint.checkpoint_path(out)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():  # the ranks are denoising
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    clock = time.perf_counter()
    err = launcher.communicate(timeout=60)[1]
    assert time.perf_counter() - clock < 15, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted: partial outputs removed, cache untouched"], err
    with pytest.raises(ProcessLookupError):  # no rank left running
        os.killpg(launcher.pid, 0)
    assert not out.exists()


# -- resuming an interrupted run ---------------------------------------------------------------


@pytest.fixture
def single_thread():
    with one_thread():
        yield


def test_no_checkpoint_keeps_no_step_state(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    """The web UI's setting (it never resumes): no state is written after any step."""

    def refuse(self, state):
        raise AssertionError(f"a checkpoint was written after step {state.step}")

    monkeypatch.setattr(tokenflow.checkpoint.StepCheckpoint, "save", refuse)
    out = tmp_path / "out"
    flags = ("--steps", "2", "--inversion-steps", "2", "--quiet", "--no-checkpoint")
    assert main(edit_argv(data_dir, tiny_model_dir, out, *flags)) == 0
    assert not list(tmp_path.glob(".*resume*"))
    assert json.loads((out / "run.json").read_text())["config"]["checkpoint"] is False


def test_a_resume_refuses_other_settings_and_continues_bit_for_bit(
    tmp_path, data_dir, tiny_model_dir, capsys, monkeypatch, single_thread
):
    flags = ("--steps", "5", "--inversion-steps", "5", "--quiet")
    assert main(edit_argv(data_dir, tiny_model_dir, tmp_path / "whole", *flags)) == 0
    save = tokenflow.checkpoint.StepCheckpoint.save

    def interrupted_after_step_2(self, state):
        save(self, state)
        if state.step == 2:
            raise KeyboardInterrupt  # Ctrl-C right after the step-2 checkpoint

    monkeypatch.setattr(tokenflow.checkpoint.StepCheckpoint, "save", interrupted_after_step_2)
    out = tmp_path / "out"
    assert main(edit_argv(data_dir, tiny_model_dir, out, *flags)) == 130
    monkeypatch.setattr(tokenflow.checkpoint.StepCheckpoint, "save", save)
    capsys.readouterr()
    other = edit_argv(data_dir, tiny_model_dir, out, *flags, "--resume", "--guidance-scale", "5")
    assert main(other) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "--guidance-scale was 7.5, now 5.0" in err

    assert main(edit_argv(data_dir, tiny_model_dir, out, *flags, "--resume")) == 0
    assert np.array_equal(read_frames(out), read_frames(tmp_path / "whole"))
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from_step"] == 2 and info["inversion_cache"] == "hit"
    # only the 3 steps left were run: 5 keyframes and 9 frames, 3 branches each
    assert info["unet_frame_evaluations"] == {"inversion": 0, "keyframes": 45, "propagation": 81}
    assert not tokenflow.checkpoint.checkpoint_path(out).exists()  # a finished run removes it


def test_a_killed_run_resumes_over_two_ranks_with_the_uninterrupted_frames(
    tmp_path, data_dir, tiny_model_dir
):
    flags = ("--steps", "8", "--inversion-steps", "8", "--quiet")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tokenflow", *edit_argv(data_dir, tiny_model_dir, out, *flags)]
    process = subprocess.Popen(command, env=env)
    checkpoint = tokenflow.checkpoint.checkpoint_path(out)
    deadline = time.monotonic() + 120
    while _step(checkpoint) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()

    argv = edit_argv(data_dir, tiny_model_dir, out, *flags, "--resume")
    run = subprocess.run(
        torchrun(2, "-m", "tokenflow", *argv), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with one_thread():
        whole = edit_argv(data_dir, tiny_model_dir, tmp_path / "whole", *flags)
        assert main(whole) == 0
    assert np.array_equal(read_frames(out), read_frames(tmp_path / "whole"))
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from_step"] >= 3 and info["distributed"]["ranks"] == 2
    assert not checkpoint.exists()


def _step(checkpoint: Path) -> int:
    """The steps a checkpoint holds (0 while there is none, or while it is being replaced)."""
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return 0
