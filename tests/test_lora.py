"""LoRAs (kohya/A1111 and diffusers formats) and textual-inversion embeddings: they change the
model as diffusers' loaders do, enter its fingerprint and so the inversion cache key, are
recorded in run.json, and a file made for another base model is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from model_files import random_lora, save_diffusers_lora, save_embedding, save_kohya_lora

from tokenflow.cli import main
from tokenflow.errors import TokenFlowError
from tokenflow.families.addons import LoraFile, apply_loras
from tokenflow.families.sd import StableDiffusion
from tokenflow.families.sdxl import StableDiffusionXL
from tokenflow.job import prepare
from tokenflow.options import EditOptions
from tokenflow.testing import make_tiny_sd, make_tiny_sdxl

FAMILIES = {"sd": (make_tiny_sd, StableDiffusion), "sdxl": (make_tiny_sdxl, StableDiffusionXL)}


def fresh(family: str):
    make, cls = FAMILIES[family]
    return cls.from_parts(make(), name=family, device="cpu")


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, prompt embeddings) for fixed inputs."""
    conditioning = model.encode_prompt("a wolf", (64, 64))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noise = model.unet(x, torch.tensor(500), **conditioning.unet_kwargs()).sample
    return noise, conditioning.embeddings


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """The same random LoRA in both formats, per family, and a second one for SD."""
    folder = tmp_path_factory.mktemp("loras")
    files = {}
    for family, (make, _) in FAMILIES.items():
        parts = make()
        pairs = random_lora(parts)
        unet = parts.unet if family == "sdxl" else None  # kohya names SDXL's UNet by sgm blocks
        files[family, "kohya"] = save_kohya_lora(
            pairs, folder / f"{family}-kohya.safetensors", unet
        )
        files[family, "diffusers"] = save_diffusers_lora(pairs, folder / f"{family}.safetensors")
    other = random_lora(make_tiny_sd(), seed=1)
    files["sd", "other"] = save_diffusers_lora(other, folder / "sd-other.safetensors")
    return files


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_lora_formats_change_the_model_alike_and_fusing_changes_nothing(family, loras):
    base = outputs(fresh(family))
    results = {}
    for kind, fuse in (("kohya", True), ("diffusers", True), ("diffusers", False)):
        model = fresh(family)
        records = apply_loras(model, [LoraFile(loras[family, kind], 0.7)], fuse=fuse)
        assert records[0]["fused"] is fuse and records[0]["scale"] == 0.7
        results[kind, fuse] = outputs(model)
    kohya, fused = results["kohya", True], results["diffusers", True]
    unfused = results["diffusers", False]
    for i in range(2):  # the UNet and the text encoder(s) both carry the LoRA
        assert not torch.allclose(fused[i], base[i], atol=1e-3)
        assert torch.equal(kohya[i], fused[i])  # the two formats name the same layers
        torch.testing.assert_close(fused[i], unfused[i], rtol=1e-4, atol=1e-5)


def test_scale_zero_is_the_base_model_but_another_fingerprint(loras):
    base = fresh("sd")
    model = fresh("sd")
    model.add(lora=(f"{loras['sd', 'diffusers']}:0",))
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), outputs(base), strict=True))
    assert model.fingerprint() != base.fingerprint()
    assert model.describe()["loras"][0]["scale"] == 0.0


def test_lora_and_embedding_enter_the_inversion_cache_key(
    loras, tiny_model_dir, data_dir, tmp_path
):
    embedding = save_embedding(tmp_path / "wolfy.safetensors", {"emb_params": torch.randn(2, 32)})
    options = EditOptions(
        input=str(data_dir / "wolf.mp4"), model=str(tiny_model_dir), frames=2, size="64x64"
    )
    lora, other = loras["sd", "diffusers"], loras["sd", "other"]
    variants = {
        "none": {},
        "lora": dict(lora=(str(lora),)),
        "lora again": dict(lora=(f"{lora}:1.0",)),
        "lora at 0.5": dict(lora=(f"{lora}:0.5",)),
        "another lora": dict(lora=(str(other),)),
        "embedding": dict(embedding=(str(embedding),)),
        "embedding as <w>": dict(embedding=(f"{embedding}:<w>",)),
    }
    keys = {
        name: prepare(options.replace(**changes), log=lambda _: None).key
        for name, changes in variants.items()
    }
    assert keys["lora"] == keys["lora again"]  # the same LoRA at the same scale: a hit
    del keys["lora again"]
    assert len(set(keys.values())) == len(keys)  # anything else: its own entry


def test_cli_edit_records_loras_and_embeddings_in_run_json(
    loras, tiny_model_dir, data_dir, tmp_path, tiny_edit_args, capsys
):
    embedding = save_embedding(tmp_path / "style.safetensors", {"<style>": torch.randn(1, 32)})
    lora = loras["sd", "kohya"]
    out = tmp_path / "out"
    addons = ["--lora", f"{lora}:0.8", "--embedding", str(embedding)]
    args = ["--model", str(tiny_model_dir), *addons, "--prompt", "a fox, <style>"]
    assert (
        main(["edit", str(data_dir / "wolf.mp4"), *args, "--out", str(out), *tiny_edit_args]) == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["lora"] == [f"{lora}:0.8"]
    assert info["config"]["embedding"] == [str(embedding)]
    (recorded,) = info["model"]["loras"]
    assert recorded["file"] == str(lora) and recorded["scale"] == 0.8 and recorded["fused"]
    assert len(recorded["sha256"]) == 64
    assert info["model"]["embeddings"][0]["token"] == "<style>"
    capsys.readouterr()
    assert main(["info", "--model", str(tiny_model_dir), *addons]) == 0
    printed = capsys.readouterr().out
    assert f"lora           {lora} (scale 0.8, fused)" in printed
    assert f"embedding      {embedding} (token <style>, 1 vector)" in printed


def test_embedding_token_stands_for_its_vectors_in_prompts(tmp_path):
    vectors = torch.randn(2, 32)
    file = save_embedding(tmp_path / "wolfy.safetensors", {"emb_params": vectors})  # A1111's
    model = fresh("sd")
    before = model.encode_prompt("a <wolfy> dog").embeddings
    model.add(embedding=(f"{file}:<wolfy>",))
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<wolfy>", "<wolfy>_1")]
    assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
    prompt = model.expand_embedding_tokens("a <wolfy> dog", tokenizer)
    assert prompt == "a <wolfy> <wolfy>_1 dog"  # a multi-vector token stands for all of them
    assert not torch.allclose(model.encode_prompt("a <wolfy> dog").embeddings, before)


def test_sdxl_embedding_goes_into_both_text_encoders(tmp_path):
    clip_l, clip_g = torch.randn(1, 32), torch.randn(1, 48)
    file = save_embedding(tmp_path / "xlstyle.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    model = fresh("sdxl")
    before = model.encode_prompt("in xlstyle")
    model.add(embedding=(str(file),))  # the token defaults to the file's name
    for tokenizer, encoder, vectors in zip(
        model.tokenizers, model.text_encoders, (clip_l, clip_g), strict=True
    ):
        token_id = tokenizer.convert_tokens_to_ids("xlstyle")
        assert torch.equal(encoder.get_input_embeddings().weight[token_id], vectors[0])
    after = model.encode_prompt("in xlstyle")
    assert not torch.allclose(after.embeddings, before.embeddings)
    assert not torch.allclose(after.added["text_embeds"], before.added["text_embeds"])


def _one_line_error(model, match: str, **addons) -> str:
    with pytest.raises(TokenFlowError, match=match) as error:
        model.add(**addons)
    message = error.value.args[0]
    assert "\n" not in message
    return message


def test_a_lora_for_another_base_model_is_named(loras, tmp_path):
    sdxl_lora = loras["sdxl", "kohya"]
    message = _one_line_error(fresh("sd"), "second text encoder", lora=(str(sdxl_lora),))
    assert str(sdxl_lora) in message and "SDXL LoRA" in message
    sd_lora = loras["sd", "diffusers"]
    message = _one_line_error(fresh("sdxl"), "32-wide text conditioning", lora=(str(sd_lora),))
    assert str(sd_lora) in message and "this SDXL model's is 80" in message
    stray = save_kohya_lora(
        {("unet", "no_such_block.to_q"): (torch.zeros(2, 8), torch.zeros(8, 2))},
        tmp_path / "stray.safetensors",
    )
    message = _one_line_error(fresh("sd"), "LoRA", lora=(str(stray),))
    assert str(stray) in message


def test_an_embedding_for_another_base_model_is_named(tmp_path):
    wide = save_embedding(tmp_path / "wide.safetensors", {"emb_params": torch.randn(1, 1024)})
    message = _one_line_error(fresh("sd"), "1024-wide vectors", embedding=(str(wide),))
    assert str(wide) in message and "(SD 2.x)" in message and "takes 32-wide" in message
    xl = save_embedding(
        tmp_path / "xl.safetensors", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}
    )
    _one_line_error(fresh("sd"), "is an SDXL embedding", embedding=(str(xl),))
    sd = save_embedding(tmp_path / "sd.safetensors", {"<x>": torch.randn(1, 32)})
    _one_line_error(fresh("sdxl"), "needs clip_l and clip_g", embedding=(str(sd),))
    _one_line_error(fresh("sd"), "already a word", embedding=(f"{sd}:a",))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickled_loras_and_embeddings_are_refused_unopened(tmp_path, suffix, tiny_model_dir):
    path = tmp_path / f"style{suffix}"
    path.write_bytes(b"not opened")
    for option in ("lora", "embedding"):
        with pytest.raises(TokenFlowError, match="only .safetensors") as error:
            fresh("sd").add(**{option: (str(path),)})
        assert str(path) in error.value.args[0]


def test_bad_values_name_the_option(tmp_path, data_dir, tiny_model_dir, capsys):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    code = main(
        ["edit", str(data_dir / "wolf.mp4"), "--model", str(tiny_model_dir), "--prompt", "p"]
        + ["--out", str(tmp_path / "out"), "--lora", f"{lora}:strong"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lora") and "must be a number" in err and err.count("\n") == 1
    with pytest.raises(TokenFlowError, match="must be one word"):
        fresh("sd").add(embedding=(f"{lora}:two words",))
