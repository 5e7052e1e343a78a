"""Bad input through the real CLI: one ``error:`` line, exit code != 0, no traceback, nothing lost.

Every case checks that the output folder was not created, that no ``.partial`` staging folder is
left beside it and that the inversion cache is unchanged, so a failed run never costs the user
earlier work.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from video_clips import damage_packets, pattern_frames, write_clip

import tokenflow.job
import tokenflow.outputs
import tokenflow.pipeline
from tokenflow.cache import InversionCache
from tokenflow.cli import main

TINY = ["--frames", "2", "--size", "64x64", "--steps", "2", "--inversion-steps", "4"]


class Job:
    """One CLI call's paths: an output folder inside an otherwise empty parent, and a cache."""

    def __init__(self, root: Path, data_dir: Path, model: Path) -> None:
        self.parent = root / "results"
        self.parent.mkdir()
        self.out = self.parent / "out"
        self.cache = root / "cache"
        self.cache.mkdir()
        (self.cache / "keep.txt").write_text("earlier work")
        self.video = data_dir / "wolf.mp4"
        self.model = model

    def argv(self, *extra: str, input: str | Path | None = None, model: str | Path | None = None):
        return [
            "edit",
            str(input if input is not None else self.video),
            "--prompt",
            "a fox",
            "--inversion-prompt",
            "a wolf",
            "--model",
            str(model if model is not None else self.model),
            "--out",
            str(self.out),
            "--cache-dir",
            str(self.cache),
            "--block-size",
            "2",
            *TINY,
            *extra,
        ]

    def cache_listing(self) -> list[str]:
        return sorted(p.name for p in self.cache.iterdir())

    def assert_nothing_lost(self, cache_before: list[str] | None = None) -> None:
        assert not self.out.exists()
        assert sorted(p.name for p in self.parent.iterdir()) == []  # no .partial left
        assert self.cache_listing() == (cache_before or ["keep.txt"])
        assert (self.cache / "keep.txt").read_text() == "earlier work"


@pytest.fixture
def job(tmp_path, data_dir, tiny_model_dir) -> Job:
    return Job(tmp_path, data_dir, tiny_model_dir)


def one_error(capsys, code: int, *needles: str, only_line: bool = True) -> str:
    """The single ``error:`` line, checked to name every needle; stderr has nothing else."""
    err = capsys.readouterr().err
    assert code != 0 and code is not None
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    if only_line:
        assert err.splitlines() == errors, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# -- the input ------------------------------------------------------------------------------


def test_missing_file(job, capsys, tmp_path):
    one_error(capsys, main(job.argv(input=tmp_path / "nope.mp4")), "nope.mp4", "does not exist")
    job.assert_nothing_lost()


def test_a_file_that_is_not_a_video(job, capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    one_error(capsys, main(job.argv(input=text)), "notes.txt", "not a video")
    job.assert_nothing_lost()


def test_a_folder_without_frames(job, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    one_error(capsys, main(job.argv(input=tmp_path / "empty")), "no numbered frames")
    job.assert_nothing_lost()


def test_truncated_and_corrupt_videos(job, capsys, tmp_path):
    data = job.video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])  # the index is at the end: cannot be opened
    one_error(capsys, main(job.argv(input=cut)), "cut.mp4", "cannot read")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(os.urandom(20_000))
    one_error(capsys, main(job.argv(input=noise)), "noise.mp4", "cannot read")
    job.assert_nothing_lost()


def test_a_video_with_no_decodable_frames(job, capsys, tmp_path):
    source = write_clip(tmp_path / "ok.mp4", pattern_frames(6, 64, 64), 10)
    dead = damage_packets(source, tmp_path / "dead.mp4", range(6))
    one_error(capsys, main(job.argv(input=dead)), "no decodable frames")
    job.assert_nothing_lost()


@pytest.mark.parametrize(
    "flags",
    [("--start", "5", "--end", "5"), ("--start", "3s", "--end", "1s"), ("--start", "100000")],
)
def test_an_empty_frame_range(job, capsys, flags):
    one_error(capsys, main(job.argv(*flags)), "empty range")
    job.assert_nothing_lost()


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, needle",
    [
        ("0x64", "positive multiples of 8; try 8x64"),
        ("63x64", "positive multiples of 8; try 64x64"),
        ("-64x64", "cannot read --size"),
        ("big", "cannot read --size"),
        ("8192x8192", "too large"),
    ],
)
def test_bad_sizes(job, capsys, size, needle):
    one_error(capsys, main(job.argv(f"--size={size}")), needle)
    job.assert_nothing_lost()


def test_a_size_above_1024_squared_warns(job, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the warning is all this test needs; skip the model

    monkeypatch.setattr(tokenflow.job, "load_model", stop)
    assert main(job.argv("--size", "1088x1024", "--frames", "1")) == 130
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1088x1024 is above 1024x1024" in warnings[0]
    assert "above 1024x1024" not in out  # said once, not repeated as a note
    job.assert_nothing_lost()


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--prompt", ""), "--prompt is not set"),
        (("--prompt", "   "), "--prompt is not set"),
        (("--steps", "0"), "--steps 0 must be at least 1"),
        (("--steps", "-3"), "--steps -3 must be at least 1"),
        (("--inversion-steps", "0"), "--inversion-steps 0 must be at least 1"),
        (("--guidance", "-1"), "--guidance-scale -1 must be at least 0"),
        (("--guidance-scale", "1000"), "--guidance-scale 1000 must be at most 50"),
        (("--guidance", "nan"), "--guidance-scale nan is not a finite number"),
        (("--pnp-attn-t", "1.5"), "--pnp-attn-t 1.5 must be at most 1"),
        (("--pnp-f-t", "-0.1"), "--pnp-f-t -0.1 must be at least 0"),
        (("--max-keyframes", "3"), "--max-keyframes 3 is too small for a --keyframe-overlap"),
        (("--inversion-steps", "2", "--steps", "4"), "--inversion-steps 2 is fewer than --steps"),
        (("--block-size", "0"), "--block-size 0 must be at least 1"),
        (("--keyframe-memory", "-1"), "--keyframe-memory -1 must be at least 0"),
    ],
)
def test_bad_settings(job, capsys, flags, needle):
    one_error(capsys, main(job.argv(*flags)), needle)
    job.assert_nothing_lost()


def test_unknown_flags_get_one_line_too(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(job.argv("--stepz", "3"))
    one_error(capsys, exit_info.value.code, "unrecognized arguments: --stepz", "--help")


# -- the output folder ------------------------------------------------------------------------


def test_an_existing_output_folder_needs_overwrite(job, capsys):
    job.out.mkdir()
    (job.out / "edited.mp4").write_text("an earlier result")
    one_error(capsys, main(job.argv()), "already exists", "--overwrite")
    assert (job.out / "edited.mp4").read_text() == "an earlier result"
    assert job.cache_listing() == ["keep.txt"]


def test_an_output_folder_that_cannot_be_created(job, capsys, tmp_path):
    (tmp_path / "no").write_text("a file where a folder would go")
    job.out = tmp_path / "no" / "such" / "out"
    one_error(capsys, main(job.argv()), "is a file")
    assert (tmp_path / "no").read_text() == "a file where a folder would go"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_an_unwritable_output_folder(job, capsys):
    job.parent.chmod(0o555)
    try:
        one_error(capsys, main(job.argv()), "permission denied")
    finally:
        job.parent.chmod(0o755)
    job.assert_nothing_lost()


def test_an_unwritable_output_folder_as_root_too(job, capsys, monkeypatch):
    monkeypatch.setattr(tokenflow.outputs.os, "access", lambda *args, **kwargs: False)
    one_error(capsys, main(job.argv()), "permission denied", "pick another --out")
    job.assert_nothing_lost()


def test_cheap_checks_run_before_the_video_or_the_model_is_touched(job, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an expensive step ran before a cheap check")

    monkeypatch.setattr(tokenflow.job, "read_clip", forbidden)
    monkeypatch.setattr(tokenflow.job, "load_model", forbidden)
    one_error(capsys, main(job.argv("--steps", "0")), "--steps")
    one_error(capsys, main(job.argv("--size", "65x64")), "multiples of 8")
    one_error(capsys, main(job.argv(model=job.parent / "missing-model")), "does not exist")
    job.out.mkdir()
    one_error(capsys, main(job.argv()), "already exists")


# -- the model ----------------------------------------------------------------------------------


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_missing_model_folder(job, capsys, tmp_path):
    one_error(capsys, main(job.argv(model=tmp_path / "models" / "sd")), "does not exist")
    job.assert_nothing_lost()


def test_an_incomplete_model_folder_names_what_is_missing(job, capsys, tmp_path):
    broken = copy_model(job.model, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    one_error(capsys, main(job.argv(model=broken)), "missing unet/")
    (broken / "model_index.json").unlink()
    one_error(capsys, main(job.argv(model=broken)), "no model_index.json")
    job.assert_nothing_lost()


def test_an_sdxl_folder_is_checked_as_sdxl(job, capsys, tmp_path):
    sdxl = tmp_path / "sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        (sdxl / part).mkdir(parents=True)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    (sdxl / "model_index.json").write_text(json.dumps(index))
    one_error(capsys, main(job.argv(model=sdxl)), "missing tokenizer_2/")
    job.assert_nothing_lost()


def test_an_sdxl_unet_under_an_sd_index_is_refused(job, capsys, tmp_path):
    model = copy_model(job.model, tmp_path / "odd")
    config = json.loads((model / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (model / "unet" / "config.json").write_text(json.dumps(config))
    one_error(capsys, main(job.argv(model=model)), "SDXL UNet in a model saved as SD 1.x/2.x")


def test_an_inpainting_unet_is_refused(job, capsys, tmp_path):
    model = copy_model(job.model, tmp_path / "inpaint")
    config = json.loads((model / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    (model / "unet" / "config.json").write_text(json.dumps(config))
    one_error(capsys, main(job.argv(model=model)), "9 input channels")


class _RunsCode:
    """A pickle that would create a folder if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickled_checkpoints_are_refused_and_never_unpickled(job, capsys, tmp_path, suffix):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(pickle.dumps(_RunsCode(marker)))
    one_error(capsys, main(job.argv(model=checkpoint)), "only .safetensors")
    assert not marker.exists()
    job.assert_nothing_lost()


def test_a_corrupt_safetensors_checkpoint(job, capsys, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(os.urandom(4096))
    code = main(job.argv("--quiet", model=checkpoint))
    message = one_error(capsys, code, "model.safetensors", "damaged or truncated")
    assert "--model-config" not in message  # the file is the problem, not its configs
    job.assert_nothing_lost()


def test_model_config_must_be_a_diffusers_folder(job, capsys, tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({unet: torch.zeros(4, 4, 1, 1)}, str(checkpoint))  # a readable checkpoint
    code = main(job.argv("--model-config", str(tmp_path), model=checkpoint))
    one_error(capsys, code, "--model-config", "model_index.json")
    code = main(job.argv("--model-config", str(job.model)))
    one_error(capsys, code, "--model-config only applies to a single .safetensors")
    job.assert_nothing_lost()


def test_an_uncached_hub_id_offline_says_how_to_get_it(job, capsys):
    clock = time.perf_counter()
    code = main(job.argv(model="someone/not-a-cached-model"))
    line = one_error(capsys, code, "not in the Hugging Face cache", "offline", "hf download")
    assert "someone/not-a-cached-model" in line
    assert time.perf_counter() - clock < 5  # no network attempt, no video decoded
    job.assert_nothing_lost()


# -- during the run -----------------------------------------------------------------------------


def test_ctrl_c_while_denoising(job, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenflow.pipeline, "denoise", interrupted)
    assert main(job.argv("--quiet")) == 130
    one_error(capsys, 130, "interrupted")
    # the inversion, finished before Ctrl-C, is cached as soon as it is computed (a resume, or
    # the next prompt, reuses it): complete and readable; nothing else was written
    (entry,) = InversionCache(job.cache).entries()
    assert InversionCache(job.cache).load(entry.key) is not None
    job.assert_nothing_lost(sorted(["keep.txt", entry.path.name]))


def test_ctrl_c_while_writing_removes_the_partial_folder(job, capsys, monkeypatch):
    written = []

    def interrupted(folder, frames, progress=None):
        written.extend(p.name for p in Path(folder).parent.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenflow.outputs, "write_frames", interrupted)
    assert main(job.argv("--quiet")) == 130
    one_error(capsys, 130, "interrupted")
    assert "edited.mp4" in written  # it stopped halfway through the outputs
    assert not job.out.exists()
    # no partial folder; only the last step's checkpoint, from which a resume writes the outputs
    assert [p.name for p in job.parent.iterdir()] == [".out.resume.safetensors"]
    # the inversion finished before Ctrl-C, so the cache holds it, complete and readable
    cache = InversionCache(job.cache)
    assert len(cache.entries()) == 1
    assert not [p for p in job.cache.iterdir() if p.name.endswith(".tmp")]
    assert (job.cache / "keep.txt").read_text() == "earlier work"


def test_non_finite_latents_suggest_another_dtype(job, capsys, monkeypatch):
    load_model = tokenflow.job.load_model

    def overflowing(*args, **kwargs):
        model = load_model(*args, **kwargs)
        with torch.no_grad():
            model.unet.conv_out.weight.fill_(float("inf"))  # what an fp16 overflow leaves
        return model

    monkeypatch.setattr(tokenflow.job, "load_model", overflowing)
    one_error(capsys, main(job.argv("--quiet")), "non-finite", "--dtype bfloat16", "float32")
    job.assert_nothing_lost()


# -- what is printed on success -----------------------------------------------------------------


def test_quiet_prints_nothing_and_a_long_prompt_warns_once(job, capsys):
    long_prompt = "a red fox running through tall grass at sunset, " * 6
    assert main(job.argv("--prompt", long_prompt, "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""

    shutil.rmtree(job.out)
    assert main(job.argv("--prompt", long_prompt)) == 0  # inversion from the cache now
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Loading weights" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "truncated" in warnings[0] and "takes 77" in warnings[0]
    assert "inversion cache: hit" in err and f"wrote {job.out}" in err


def test_info_prints_versions_device_cache_and_the_model(capsys, tiny_model_dir):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("tokenflow", "torch", "diffusers", "device", "dtype", "cache", "hub"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "offline" in out

    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    captured = capsys.readouterr()
    assert "loads (fingerprint" in captured.out and captured.err == ""
    assert "family         sd" in captured.out and "short side 512" in captured.out

    assert main(["info", "--model", "someone/not-a-cached-model"]) == 1
    out = capsys.readouterr().out
    assert "cannot be loaded" in out and "hf download someone/not-a-cached-model" in out


def test_edit_help_has_worked_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and 'tokenflow edit clip.mp4 --prompt "' in out
    assert "--model-config" in out and "--overwrite" in out
