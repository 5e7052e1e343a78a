"""Single-file checkpoints in the original layout: SD 1.5, SD 2.1 and SDXL files written from a
tiny random model load back (offline, with `model_config`) as the same model; what is not a
loadable text-to-image checkpoint is refused in one line, pickles unopened."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from model_files import save_original_checkpoint
from safetensors.torch import save_file

from tokenflow.errors import TokenFlowError
from tokenflow.families import check_model_source, family_of, load_model
from tokenflow.families.sd import StableDiffusion
from tokenflow.families.sdxl import StableDiffusionXL
from tokenflow.testing import make_tiny_sd, make_tiny_sdxl

BUILDERS = {
    "sd15": (lambda: make_tiny_sd(version="1.5"), StableDiffusion),
    "sd21": (lambda: make_tiny_sd(version="2.1"), StableDiffusion),
    "sdxl": (make_tiny_sdxl, StableDiffusionXL),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def checkpoint(request, tmp_path_factory):
    """(the tiny model, its diffusers folder, its original-layout single file)."""
    make, family = BUILDERS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    parts = make()
    parts.save(folder / "diffusers")
    path = save_original_checkpoint(parts, folder / f"{request.param}.safetensors")
    return family.from_parts(parts, device="cpu"), folder / "diffusers", path


def test_a_single_file_loads_back_as_the_same_model(checkpoint):
    original, config, path = checkpoint
    assert family_of(str(path)) is type(original)  # told from the file alone
    loaded = load_model(str(path), device="cpu", dtype="float32", config=str(config))
    assert type(loaded) is type(original)
    pairs = [(loaded.unet, original.unet), (loaded.vae, original.vae)]
    pairs += list(zip(loaded.text_encoders, original.text_encoders, strict=True))
    for mine, theirs in pairs:
        expected = theirs.state_dict()
        assert mine.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in mine.state_dict().items())
    # and so the same UNet outputs for the same conditioning
    conditioning = original.encode_prompt("a wolf", (64, 64))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad():
        ours = loaded.unet(x, t, **conditioning.expand(2).unet_kwargs()).sample
        theirs = original.unet(x, t, **conditioning.expand(2).unet_kwargs()).sample
    assert torch.equal(ours, theirs)
    assert torch.equal(loaded.encode_prompt("a wolf", (64, 64)).embeddings, conditioning.embeddings)


def test_offline_without_model_config_says_to_give_it(checkpoint):
    _, _, path = checkpoint
    with pytest.raises(TokenFlowError, match="give model_config") as error:
        load_model(str(path), device="cpu")
    assert str(path) in error.value.args[0] and "\n" not in error.value.args[0]


def test_a_model_config_of_another_base_model_is_named(checkpoint, tmp_path):
    original, config, path = checkpoint
    other = make_tiny_sd() if isinstance(original, StableDiffusionXL) else make_tiny_sdxl()
    wrong = other.save(tmp_path / "other")
    with pytest.raises(TokenFlowError, match="but model_config") as error:
        check_model_source(str(path), str(wrong))
    assert str(path) in error.value.args[0] and "base model" in error.value.args[0]
    # same family, other conditioning width (an SD 1.5 config for an SD 2.1 file, say)
    widened = shutil.copytree(config, tmp_path / "widened")
    unet_config = json.loads((widened / "unet" / "config.json").read_text())
    unet_config["cross_attention_dim"] = 1024
    (widened / "unet" / "config.json").write_text(json.dumps(unet_config))
    with pytest.raises(TokenFlowError, match="1024 \\(SD 2.x\\)"):
        check_model_source(str(path), str(widened))


class _Trap:
    """Unpickling this creates a file: proof that a pickle was opened."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickled_checkpoints_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _Trap(str(marker))}))
    for check in (check_model_source, load_model):
        with pytest.raises(TokenFlowError, match="only .safetensors") as error:
            check(str(path))
        assert str(path) in error.value.args[0] and "\n" not in error.value.args[0]
    assert not marker.exists()


def test_files_that_are_no_model_are_named(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(TokenFlowError, match="is a LoRA, not a model: give it as lora"):
        check_model_source(str(lora))
    unet_only = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(unet_only))
    with pytest.raises(TokenFlowError, match="pass the whole diffusers folder"):
        check_model_source(str(unet_only))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TokenFlowError, match="not a readable safetensors file"):
        check_model_source(str(damaged))
