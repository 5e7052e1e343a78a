"""One options model: every front end reads it, its errors name options, edits share no state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokenflow.cli import build_parser, main
from tokenflow.cli.flags import flag_for
from tokenflow.errors import TokenFlowError
from tokenflow.options import FIELD_INFO, FIELDS, EditOptions, load_options
from tokenflow.pipeline import TokenFlowPipeline

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(prompt="a fox", inversion_prompt="a wolf", steps=3, inversion_steps=3, block_size=2)


def test_every_option_is_a_flag_with_its_default_type_and_help():
    edit = build_parser()._subparsers._group_actions[0].choices["edit"]
    actions = {a.dest: a for a in edit._actions}
    for name, info in FIELD_INFO.items():
        action = actions[name]  # generated, never written by hand
        assert action.help and info.help.replace("%", "%%")[:20] in action.help
        if info.choices:
            assert tuple(action.choices) == info.choices
        if action.option_strings:
            assert flag_for(name) in action.option_strings
    # flags default to "not given", so --config values survive; the defaults are the options'
    args = build_parser().parse_args(["edit", "clip.mp4"])
    assert {k for k in vars(args) if k in FIELDS} == {"input"}


def test_library_errors_name_options_and_the_cli_names_flags(capsys):
    with pytest.raises(TokenFlowError) as error:
        EditOptions(block_size=0).validate()
    assert str(error.value) == "block_size 0 must be at least 1"
    with pytest.raises(TokenFlowError) as error:
        EditOptions(max_keyframes=3).validate()
    assert "max_keyframes 3" in str(error.value) and "--" not in str(error.value)
    assert main(["edit", "clip.mp4", "--block-size", "0", "--prompt", "x", "--out", "o"]) == 2
    assert "error: --block-size 0 must be at least 1" in capsys.readouterr().err


def test_keyword_arguments_fill_the_options_and_unknown_ones_are_named():
    options = EditOptions(steps=7).replace(guidance_scale=3, start=12)
    assert options.steps == 7 and options.guidance_scale == 3.0 and options.start == "12"
    with pytest.raises(
        TokenFlowError, match="unknown option 'guidence_scale'; did you mean 'guidance_scale'"
    ):
        options.replace(guidence_scale=3)
    with pytest.raises(TokenFlowError, match="steps is 'four', not a whole number"):
        options.replace(steps="four")


def test_yaml_round_trip_and_earlier_names(tmp_path):
    options = EditOptions(prompt="a fox", steps=20, size="512x320", baseline="per-frame")
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(options.to_dict()))
    assert load_options(path) == options
    path.write_text("guidance: 5\nkeyframe_memory_mb: 16\nmethod: controlnet\n")
    old = load_options(path)
    assert (old.guidance_scale, old.keyframe_memory, old.method) == (5.0, 16, "pnp")


def test_a_previous_release_run_json_reproduces_its_edit(tmp_path, data_dir, tiny_model_dir):
    """run.json of release 0.1.0 (its frames stored beside it) given back as --config."""
    old = json.loads((FIXTURES / "run_v0.1.0.json").read_text())
    assert "guidance" in old["config"] and "keyframe_memory_mb" in old["config"]
    config = tmp_path / "run.json"
    config.write_text(json.dumps(old))
    out = tmp_path / "again"
    argv = ["edit", str(data_dir / "wolf.mp4"), "--config", str(config), "--quiet"]
    assert main([*argv, "--model", str(tiny_model_dir), "--out", str(out), "--no-cache"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["guidance_scale"] == 6.5 and info["config"]["keyframe_memory"] == 32
    assert info["keyframes"] == old["keyframes"]
    expected = np.load(FIXTURES / "run_v0.1.0_frames.npz")["frames"]
    from PIL import Image

    frames = np.stack([np.array(Image.open(out / "frames" / f"{i:05d}.png")) for i in range(3)])
    assert np.abs(frames.astype(int) - expected).max() <= 1  # 0 on the machine that made them


# Runs one edit in a fresh process and saves its latents: the reference for "no hidden state".
FRESH_EDIT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from safetensors.torch import save_file
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.pipeline import TokenFlowPipeline
    from tokenflow.testing import make_tiny_sd

    frames = np.load(sys.argv[1])
    model = StableDiffusion.from_parts(make_tiny_sd("tiny", seed=0), device="cpu")
    result = TokenFlowPipeline(model)(
        frames, prompt="a fox", inversion_prompt="a wolf", steps=3, inversion_steps=3,
        block_size=2,
    )
    save_file({"latents": result.latents.contiguous()}, sys.argv[2])
    """
)


def test_two_edits_in_one_process_equal_separate_processes(tmp_path, tiny_model, wolf_frames):
    frames = wolf_frames[:4]
    pipe = TokenFlowPipeline(tiny_model)
    first = pipe(frames, **SMALL)
    other = pipe(  # everything different: method, schedule, structure, memory
        frames,
        **{**SMALL, "steps": 2, "inversion_steps": 4, "block_size": 3},
        method="sdedit",
        strength=0.5,
        baseline="extended-attention",
        keyframe_memory=0,
    )
    again = pipe(frames, **SMALL)
    assert torch.equal(first.latents, again.latents) and first.keyframes == again.keyframes
    assert not torch.equal(other.latents[:, :1], first.latents[:, :1])
    assert first.unet_evaluations == again.unet_evaluations

    np.save(tmp_path / "frames.npy", frames)
    subprocess.run(
        [sys.executable, "-c", FRESH_EDIT, str(tmp_path / "frames.npy"), str(tmp_path / "z")],
        check=True,
        capture_output=True,
    )
    fresh = load_file(str(tmp_path / "z"))["latents"]
    torch.testing.assert_close(first.latents, fresh, rtol=0, atol=0)
