"""What users add to a loaded model: another VAE, LoRAs, textual-inversion embeddings.

All three go through diffusers' own loaders -- ``AutoencoderKL.from_pretrained``, the family
pipeline's ``load_lora_weights`` (peft; kohya/A1111 and diffusers formats) and
``load_textual_inversion`` -- from safetensors files only. Each is checked against the model
first, so a LoRA or an embedding made for another base model fails with one line naming the file
and the mismatch, not a shape error deep in peft. What was added is recorded (file, sha256,
scale or token) in the model's ``addons``, which enter its fingerprint -- hence the inversion
cache key -- and run.json.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TokenFlowError
from ..hub import looks_like_path
from ..loading import check_hub_id, file_digest, first_line, from_hub, from_local, tensor_shapes
from ..options import OptionError
from .checkpoints import width_name

#: names a LoRA's down-projection (A) matrices end with, in the formats diffusers reads
LORA_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")
#: text-encoder input widths of the released base models (SDXL: 768 + 1280, as clip_l/clip_g)
EMBEDDING_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL's OpenCLIP"}
#: tensor names of an embedding file that are not its token (A1111's, SDXL's per encoder)
GENERIC_EMBEDDING_KEYS = ("emb_params", "string_to_param", "clip_l", "clip_g")


def _split(text: str, option: str) -> tuple[Path, str | None]:
    """``FILE[:SUFFIX]``; a FILE that exists as written keeps any ':' in its name."""
    text = str(text).strip()
    if not text:
        raise OptionError(f"`{option}` is empty: give FILE.safetensors")
    whole = Path(text).expanduser()
    head, sep, tail = text.rpartition(":")
    if whole.is_file() or not sep or not head or "/" in tail or "\\" in tail:
        return whole, None
    return Path(head).expanduser(), tail


@dataclass(frozen=True)
class LoraFile:
    """One ``lora`` value: ``FILE.safetensors[:SCALE]``."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraFile:
        path, scale = _split(text, "lora")
        if scale is None:
            return cls(path)
        try:
            value = float(scale)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise OptionError(
                f"`lora` {text!r}: the scale after ':' must be a number, e.g. {path}:0.8"
            )
        return cls(path, value)


@dataclass(frozen=True)
class EmbeddingFile:
    """One ``embedding`` value: ``FILE.safetensors[:TOKEN]``."""

    path: Path
    token: str | None = None

    @classmethod
    def parse(cls, text: str) -> EmbeddingFile:
        path, token = _split(text, "embedding")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise OptionError(
                f"`embedding` {text!r}: the token after ':' must be one word, e.g. {path}:<style>"
            )
        return cls(path, token)


def check_addons(vae: str | None, lora: tuple[str, ...], embedding: tuple[str, ...]) -> None:
    """Before any heavy work: the values parse, the files are readable safetensors (pickled
    files are refused unopened) and the VAE can be found."""
    for text in lora:
        tensor_shapes(LoraFile.parse(text).path, "LoRAs", "")
    for text in embedding:
        tensor_shapes(EmbeddingFile.parse(text).path, "embeddings", "")
    if vae:
        _vae_folder(vae)


# -- VAE --------------------------------------------------------------------------------------

VAE_LOCAL = "a local VAE folder (saved by diffusers' save_pretrained) as `vae`"


def _vae_folder(name: str) -> Path | None:
    """The local VAE folder ``name`` names, or None for a Hub id (checked to be cached or
    downloadable); one-line errors for anything else."""
    path = Path(name).expanduser()
    problem = None
    if path.is_file():
        problem = "give a diffusers VAE folder (config.json + weights) or a Hub id, not a file"
    elif path.is_dir() and not (path / "config.json").is_file():
        problem = "it has no config.json: not a diffusers VAE folder"
    elif not path.is_dir() and looks_like_path(name):
        problem = "no such folder"
    if problem:
        raise TokenFlowError(f"`vae` {name}: {problem}")
    if path.is_dir():
        return path
    check_hub_id(name, "config.json", "VAE", VAE_LOCAL)
    return None


def load_vae(name: str, dtype: torch.dtype, scaling_factor: float):
    """An ``AutoencoderKL`` from a folder or Hub id; refused when its latent scaling differs
    from the model's (a VAE of another family: SD's 0.18215, SDXL's 0.13025)."""
    from diffusers import AutoencoderKL

    folder = _vae_folder(name)
    if folder is not None:
        vae = from_local(AutoencoderKL.from_pretrained, str(folder), dtype=dtype)
    else:
        vae = from_hub(AutoencoderKL.from_pretrained, name, "VAE", VAE_LOCAL, dtype=dtype)
    theirs = float(vae.config.scaling_factor)
    if not math.isclose(theirs, scaling_factor, rel_tol=1e-3):
        raise TokenFlowError(
            f"`vae` {name} scales latents by {theirs:g} but this model's VAE by"
            f" {scaling_factor:g}: it belongs to another model family"
        )
    return vae


# -- LoRA -------------------------------------------------------------------------------------


def _check_lora_fits(path: Path, shapes: dict[str, tuple[int, ...]], model: Any) -> int:
    """Refuse a LoRA for another base model from its header; the number of its layers."""
    downs = [k for k in shapes if k.endswith(LORA_DOWN)]
    if not downs:
        raise TokenFlowError(
            f"{path} holds no LoRA weights (no lora_down / lora_A tensors): not a LoRA, or a"
            " LyCORIS kind (LoHa, LoKr) that diffusers does not load"
        )
    second = any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in shapes)
    if second and len(model.text_encoders) < 2:
        raise TokenFlowError(
            f"LoRA {path} has weights for a second text encoder, so it is an SDXL LoRA; this is"
            f" an {model.label} model: use a LoRA trained for it"
        )
    width = model.unet.config.cross_attention_dim
    for key in downs:
        shape = shapes[key]
        if "attn2" in key and "to_k" in key and len(shape) == 2 and shape[1] != width:
            raise TokenFlowError(
                f"LoRA {path} was trained on a model with {width_name(shape[1])}-wide text"
                f" conditioning; this {model.label} model's is {width_name(width)}: use a LoRA"
                " trained for the same base model"
            )
    return len(downs)


def _lora_layers(model: Any, adapter: str) -> int:
    """Layers of the UNet and text encoders that carry ``adapter``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = (model.unet, *model.text_encoders)
    return sum(
        1
        for part in parts
        for module in part.modules()
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})
    )


def apply_loras(model: Any, loras: list[LoraFile], fuse: bool = True) -> list[dict[str, Any]]:
    """Load each LoRA as a peft adapter with its scale and, when possible, fuse them into
    the weights (then no LoRA layer is left to slow every call down)."""
    pipe = model.diffusers_pipeline()
    names, records = [], []
    for i, lora in enumerate(loras):
        layers = _check_lora_fits(lora.path, tensor_shapes(lora.path, "LoRAs", ""), model)
        name = f"lora_{len(model.addons['loras']) + i}"  # unique across calls of ``add``
        try:
            with warnings.catch_warnings():  # peft's note that a model holds several adapters
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                pipe.load_lora_weights(
                    str(lora.path.parent),
                    weight_name=lora.path.name,
                    adapter_name=name,
                    use_safetensors=True,
                    local_files_only=True,
                )
        except Exception as exc:  # noqa: BLE001 - peft and diffusers raise many kinds here
            raise TokenFlowError(
                f"LoRA {lora.path} does not fit this {model.label} model ({first_line(exc)});"
                " use a LoRA trained for the same base model"
            ) from exc
        matched = _lora_layers(model, name)
        if matched < layers:
            raise TokenFlowError(
                f"LoRA {lora.path}: only {matched} of its {layers} layers match a layer of this"
                f" {model.label} model; it was made for another model"
            )
        names.append(name)
        records.append(
            {"file": str(lora.path), "scale": lora.scale, "sha256": file_digest(lora.path)}
        )
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    fused = False
    if fuse:
        try:
            pipe.fuse_lora(adapter_names=names)
            pipe.unload_lora_weights()  # the fused weights stay
            fused = True
        except Exception:  # noqa: BLE001 - e.g. quantized weights: the adapters stay active
            fused = False
    return [dict(record, fused=fused) for record in records]


# -- textual inversion ------------------------------------------------------------------------


def _embedding_vectors(path: Path, model: Any) -> tuple[list[torch.Tensor], str | None]:
    """One (vectors, width) tensor per text encoder, and the token the file names (if any)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = sorted(tensors)
    sdxl = {"clip_l", "clip_g"} <= set(names)
    if sdxl and len(model.text_encoders) != 2:
        raise TokenFlowError(
            f"embedding {path} is an SDXL embedding (clip_l and clip_g vectors); this is an"
            f" {model.label} model: use an embedding trained for it"
        )
    if sdxl:
        vectors = [tensors["clip_l"], tensors["clip_g"]]
    elif "emb_params" in tensors or len(names) == 1:  # A1111's layout, or diffusers' own
        vectors = [tensors.get("emb_params", tensors[names[0]])]
    else:
        raise TokenFlowError(
            f"embedding {path}: unknown layout (tensors {', '.join(names[:4])}); expected one"
            " vector set (diffusers or A1111 format) or clip_l + clip_g (SDXL)"
        )
    if len(vectors) != len(model.text_encoders):
        width = vectors[0].shape[-1]
        raise TokenFlowError(
            f"embedding {path} holds one set of {width}-wide vectors (an SD 1.x/2.x embedding);"
            f" this {model.label} model needs clip_l and clip_g vectors, one per text encoder"
        )
    for vector, encoder in zip(vectors, model.text_encoders, strict=True):
        theirs, mine = vector.shape[-1], encoder.get_input_embeddings().weight.shape[-1]
        if vector.ndim not in (1, 2) or theirs != mine:
            kind = f" ({EMBEDDING_WIDTHS[theirs]})" if theirs in EMBEDDING_WIDTHS else ""
            raise TokenFlowError(
                f"embedding {path} has {theirs}-wide vectors{kind} but this {model.label} model's"
                f" text encoder takes {mine}-wide ones: use an embedding trained for it"
            )
    stored = names[0] if len(names) == 1 and names[0] not in GENERIC_EMBEDDING_KEYS else None
    return [v.reshape(-1, v.shape[-1]) for v in vectors], stored


def add_embeddings(model: Any, embeddings: list[EmbeddingFile]) -> list[dict[str, Any]]:
    """Add each embedding's token(s) to the tokenizers and its vectors to the text encoders."""
    pipe = model.diffusers_pipeline()
    records = []
    for embedding in embeddings:
        vectors, stored = _embedding_vectors(embedding.path, model)
        token = embedding.token or stored or embedding.path.stem
        if any(token in tokenizer.get_vocab() for tokenizer in model.tokenizers):
            raise TokenFlowError(
                f"embedding {embedding.path}: its token {token!r} is already a word of the"
                " tokenizer; give another as FILE:TOKEN"
            )
        for vector, tokenizer, encoder in zip(
            vectors, model.tokenizers, model.text_encoders, strict=True
        ):
            pipe.load_textual_inversion(
                vector.to(encoder.dtype), token=token, tokenizer=tokenizer, text_encoder=encoder
            )
        records.append(
            {
                "file": str(embedding.path),
                "token": token,
                "vectors": len(vectors[0]),
                "sha256": file_digest(embedding.path),
            }
        )
    return records
