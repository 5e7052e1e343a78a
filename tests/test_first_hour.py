"""A new user's first hour: nothing of theirs is ever lost, bad settings fail at once, and the
run tells them what it is doing. Each test reproduces a report from a user trying the CLI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from video_clips import pattern_frames, write_clip

from tokenflow.cli import build_parser, main
from tokenflow.video import write_frames

SMALL = ["--size", "64x64", "--steps", "2", "--inversion-steps", "4", "--block-size", "2"]


@pytest.fixture
def edit(tmp_path, tiny_model_dir):
    """``edit(input, out, *flags)``: run ``tokenflow edit`` on the tiny model, return the code."""
    cache = tmp_path / "cache"

    def run(source, out, *flags: str) -> int:
        argv = ["edit", str(source), "--prompt", "a fox", "--inversion-prompt", "a wolf"]
        argv += ["--model", str(tiny_model_dir), "--out", str(out), "--cache-dir", str(cache)]
        return main([*argv, "--frames", "2", *SMALL, "--quiet", *flags])

    run.cache = cache
    return run


@pytest.fixture
def frames_folder(tmp_path, wolf_frames) -> Path:
    folder = tmp_path / "clip" / "frames"
    folder.parent.mkdir()
    write_frames(folder, wolf_frames[:2])
    return folder


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- the output folder -----------------------------------------------------------------------------


def test_out_creates_missing_parent_folders(edit, tmp_path, data_dir):
    out = tmp_path / "results" / "deeper" / "marble"
    assert edit(data_dir / "wolf.mp4", out) == 0
    assert (out / "edited.mp4").is_file() and (out / "run.json").is_file()


@pytest.mark.parametrize("where", ["the frames folder", "its parent", "inside it"])
def test_out_may_never_replace_or_hold_the_input_frames(edit, frames_folder, capsys, where):
    out = {
        "the frames folder": frames_folder,
        "its parent": frames_folder.parent,
        "inside it": frames_folder / "edit",
    }[where]
    before = listing(frames_folder.parent)
    assert edit(frames_folder, out, "--overwrite") == 2
    line = error_line(capsys)
    assert "input" in line and str(out.name) in line
    assert listing(frames_folder.parent) == before  # every source PNG still there, unchanged


def test_out_may_never_be_the_folder_holding_the_input_video(edit, tmp_path, data_dir, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    clip = shutil.copy(data_dir / "wolf.mp4", folder / "clip.mp4")
    assert edit(clip, folder, "--overwrite") == 2
    assert "input" in error_line(capsys)
    assert Path(clip).read_bytes() == (data_dir / "wolf.mp4").read_bytes()


def test_out_may_never_be_the_cache_or_the_model(edit, tmp_path, data_dir, tiny_model_dir, capsys):
    edit.cache.mkdir()
    (edit.cache / "keep.txt").write_text("earlier work")
    model_files = listing(tiny_model_dir)
    for out, needle in (
        (edit.cache, "cache"),
        (edit.cache / "sub", "cache"),
        (tmp_path, "cache"),  # holds the cache
        (tiny_model_dir, "model"),
        (tiny_model_dir / "unet", "model"),
    ):
        assert edit(data_dir / "wolf.mp4", out, "--overwrite") == 2, out
        assert needle in error_line(capsys)
    assert (edit.cache / "keep.txt").read_text() == "earlier work"
    assert listing(tiny_model_dir) == model_files


def test_overwrite_replaces_only_an_earlier_output_or_an_empty_folder(
    edit, tmp_path, data_dir, capsys
):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    assert edit(data_dir / "wolf.mp4", precious, "--overwrite") == 2
    line = error_line(capsys)
    assert "not an earlier tokenflow output" in line and "documents" in line
    assert (precious / "thesis.txt").read_text() == "years of work"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert edit(data_dir / "wolf.mp4", empty, "--overwrite") == 0
    assert (empty / "run.json").is_file()
    first = (empty / "run.json").read_bytes()
    assert edit(data_dir / "wolf.mp4", empty, "--overwrite", "--seed", "5") == 0  # an output
    assert (empty / "run.json").read_bytes() != first


# -- configuration files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("steps: four\n", ["steps", "'four'", "whole number"]),
        ("prompt: 123\n", ["prompt", "123", "text"]),
        ("guidance: high\n", ["guidance", "'high'", "number"]),
        ("overwrite: maybe\n", ["overwrite", "'maybe'", "true or false"]),
        ("steps: [4\n", ["line 1", "column"]),
        ("prompt: a\n  b: c\n", ["line 2", "column"]),
    ],
)
def test_bad_config_values_name_the_key_value_and_type(
    edit, tmp_path, data_dir, capsys, text, needles
):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert edit(data_dir / "wolf.mp4", tmp_path / "out", "--config", str(config)) == 2
    line = error_line(capsys)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists()


# -- fail before decoding --------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding the video a test failure: every check below must come before it."""
    import av

    def opened(*args, **kwargs):
        raise AssertionError("the video was opened before the settings were checked")

    monkeypatch.setattr(av, "open", opened)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--device", "cuda"], ["cuda", "cpu"]),
        (["--dtype", "float16"], ["float16", "CPU"]),
    ],
)
def test_device_and_dtype_are_checked_before_decoding(
    edit, tmp_path, data_dir, capsys, no_decoding, flags, needles, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert edit(data_dir / "wolf.mp4", tmp_path / "out", "--device", "cpu", *flags) == 2
    line = error_line(capsys)
    for needle in needles:
        assert needle in line, line


def test_an_unreachable_hub_is_reported_before_decoding(
    tmp_path, data_dir, capsys, no_decoding, monkeypatch
):
    from huggingface_hub import constants

    import tokenflow.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tokenflow.hub, "hub_reachable", lambda timeout=3.0: False)
    clock = time.perf_counter()
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox"]
    code = main([*argv, "--model", "someone/not-cached", "--out", str(tmp_path / "o")])
    assert code == 2
    line = error_line(capsys)
    assert "someone/not-cached" in line and "hf download" in line
    assert time.perf_counter() - clock < 5


# -- interrupts ------------------------------------------------------------------------------------

# A VAE whose encoder first runs one long C call (a big matrix product): Python cannot raise
# KeyboardInterrupt inside it, so only a job that keeps the main thread free stops at once.
SLOW_VAE = textwrap.dedent(
    """
    import sys, torch
    from diffusers import AutoencoderKL
    from tokenflow.cli import entry

    original = AutoencoderKL.encode

    def slow_encode(self, *args, **kwargs):
        print("VAE-CALL", file=sys.stderr, flush=True)
        big = torch.ones(15000, 15000)
        big @ big  # many seconds on two cores, in one call
        return original(self, *args, **kwargs)

    AutoencoderKL.encode = slow_encode
    entry()  # what the tokenflow command runs
    """
)


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_stops_the_run_at_once_and_leaves_nothing(
    tmp_path, data_dir, tiny_model_dir, sig, code, word
):
    out = tmp_path / "results" / "out"
    out.parent.mkdir()
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox", "--model", str(tiny_model_dir)]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--frames", "2", *SMALL]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_VAE, *argv], stderr=subprocess.PIPE, text=True, env=env
    )
    err = ""
    while "VAE-CALL" not in err:
        line = process.stderr.readline()
        assert line or process.poll() is None, err
        err += line
    time.sleep(0.5)
    sent = time.perf_counter()
    process.send_signal(sig)
    rest = process.communicate(timeout=120)[1]
    waited = time.perf_counter() - sent
    err += rest
    assert process.returncode == code, err
    assert waited < 5, f"took {waited:.1f} s to stop"
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and word in errors[0], err
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


# -- what the run shows ----------------------------------------------------------------------------


def test_every_stage_leaves_a_summary_line(tmp_path, data_dir, tiny_model_dir, capsys):
    argv = ["edit", str(data_dir / "wolf.mp4"), "--prompt", "a fox", "--model", str(tiny_model_dir)]
    argv += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--frames", "3"]
    assert main([*argv, *SMALL]) == 0
    lines = capsys.readouterr().err.splitlines()
    for stage in ("read", "load", "encode", "invert", "edit", "decode", "write"):
        assert any(line.split()[:1] == [stage] for line in lines), (stage, lines)
    assert any(line.startswith("done in") for line in lines), lines


def test_a_clip_shorter_than_asked_says_so(tmp_path, tiny_model_dir, capsys):
    one = write_clip(tmp_path / "one.mp4", pattern_frames(1, 64, 64), 10)
    argv = ["edit", str(one), "--prompt", "a fox", "--out", str(tmp_path / "out"), "--frames", "8"]
    assert main([*argv, "--model", str(tiny_model_dir), *SMALL]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:") and "8" in line]
    assert notes and "1 frame" in notes[0], err


# -- commands around the edit ----------------------------------------------------------------------


def test_cache_clear_without_a_key_needs_confirmation(tmp_path, capsys, monkeypatch):
    import torch

    from tokenflow.cache import InversionCache
    from tokenflow.inversion import Inversion

    cache = InversionCache(tmp_path / "cache")
    cache.save("a" * 64, Inversion({1: torch.zeros(1, 4, 2, 2)}, 1), {"frames": 1})
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert main(["cache", "clear", "--cache-dir", str(cache.root)]) == 2
    assert "--all" in error_line(capsys)
    assert len(cache.entries()) == 1
    assert main(["cache", "clear", "--all", "--cache-dir", str(cache.root)]) == 0
    assert cache.entries() == []


def test_info_never_contradicts_itself_about_the_hub(capsys, monkeypatch):
    from huggingface_hub import constants

    import tokenflow.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tokenflow.hub, "hub_reachable", lambda timeout=3.0: False)
    main(["info", "--model", "someone/not-cached"])
    out = capsys.readouterr().out
    hub = next(line for line in out.splitlines() if line.startswith("hub"))
    assert "unreachable" in hub and "offline" not in hub, out
    assert "Hub is offline" not in out and "hf download someone/not-cached" in out


def test_help_marks_required_options_and_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    help_text = commands["edit"].format_help()
    required = help_text[help_text.index("required") :]
    assert "--prompt" in required.split("\n\n")[0] and "--out" in required.split("\n\n")[0]
    # a flag that turns an option off says so, not what the option does when on
    edit = {a.option_strings[0]: a.help for a in commands["edit"]._actions if a.option_strings}
    assert edit["--no-audio"].startswith("switch off (on by default): copy the source's audio")
    assert edit["--no-cache"].startswith("switch off")


# -- the README ------------------------------------------------------------------------------------


def _readme_edit_command() -> list[str]:
    """The `tokenflow edit ...` part of the README's first set-up command, as argv."""
    readme = (Path(__file__).parents[1] / "README.md").read_text("utf-8")
    first_block = readme.split("```sh\n", 1)[1].split("\n```", 1)[0]
    command = first_block.split("&&")[-1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["tokenflow", "edit"], command
    return argv[1:]


def test_the_readme_command_runs_as_written_with_the_model_in_the_hf_cache(
    tmp_path, data_dir, tiny_model_dir
):
    """A newcomer's machine: the default model in the HF cache, the shared clips beside the
    checkout, no results/ folder yet. Only sizes and step counts are added, to keep it short."""
    from tokenflow.options import DEFAULT_MODEL

    snapshot = tmp_path / "hub" / f"models--{DEFAULT_MODEL.replace('/', '--')}" / "snapshots" / "0"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(data_dir.parent, target_is_directory=True)
    argv = _readme_edit_command()
    assert "--model" not in argv  # the default model, from the cache
    small = ["--frames", "2", "--size", "64x64", "--steps", "2", "--inversion-steps", "4"]
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    env["TOKENFLOW_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "tokenflow", *argv, *small, "--quiet"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = checkout / argv[argv.index("--out") + 1]
    assert (out / "edited.mp4").is_file() and (out / "run.json").is_file()
