"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a 4-channel UNet, a factor-8 VAE."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import TokenFlowError
from ..loading import (
    check_hub_id,
    check_safetensors_file,
    first_line,
    from_hub,
    from_local,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)
from .base import Conditioning, DiffusionModel

#: Components a diffusers Stable Diffusion folder must have.
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LOCAL = "a local diffusers folder or a .safetensors file as the model"


class StableDiffusion(DiffusionModel):
    """SD 1.x/2.x, as TokenFlow's authors use it."""

    family = "sd"

    @classmethod
    def claims(cls, index: dict) -> bool:
        """SD 1.x/2.x folders (and sources whose index cannot be read locally); not SDXL."""
        name = str(index.get("_class_name", ""))
        xl = "XL" in name or "text_encoder_2" in index
        return not xl and (not name or name.startswith("StableDiffusion"))

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Conditioning:
        """CLIP text embedding (1, 77, d), truncated to the encoder's length as SD does."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        self.warn_if_truncated(prompt, tokenizer)
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return Conditioning(encoder(ids.to(self.device))[0].to(self.dtype))

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        parts: Any,
        name: str = "in-memory",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> StableDiffusion:
        """Wrap components (a diffusers pipeline or ``testing.TinyStableDiffusion``)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_unet_config(dict(parts.unet.config))
        return cls(
            unet=parts.unet.to(device, dtype).eval(),
            vae=parts.vae.to(device, dtype).eval(),
            text_encoders=[parts.text_encoder.to(device, dtype).eval()],
            tokenizers=[parts.tokenizer],
            scheduler_config=dict(parts.scheduler.config),
            name=name,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def check_source(cls, model: str, config: str | None) -> None:
        """Refuse a model that cannot load, from names and JSON alone (milliseconds)."""
        path = Path(model).expanduser()
        if path.is_file():
            check_safetensors_file(path)
            if config is not None:
                folder = Path(config).expanduser()
                if not (folder / "model_index.json").is_file():
                    raise TokenFlowError(
                        f"`model_config` {config} is not a diffusers model folder (no"
                        " model_index.json); pass the folder of the base model, e.g. SD 2.1's"
                    )
            return
        if config is not None:
            raise TokenFlowError("`model_config` only applies to a single .safetensors model")
        if path.is_dir():
            problem = folder_problem(path)
            if problem:
                raise TokenFlowError(
                    f"{problem}; pass a folder saved by diffusers' save_pretrained"
                )
            unet_config = path / "unet" / "config.json"
            with contextlib.suppress(OSError, ValueError):  # diffusers names those on loading
                check_unet_config(json.loads(unet_config.read_text("utf-8")))
            return
        check_hub_id(str(model), "model_index.json", "model", LOCAL)

    @classmethod
    def load(
        cls, model: str, device: str | None, dtype: str | None, config: str | None
    ) -> StableDiffusion:
        """From a Hub id (HF cache), a diffusers folder or a single safetensors file."""
        quiet_libraries()
        from diffusers import StableDiffusionPipeline

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        cls.check_source(model, config)
        common = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
        path = Path(model).expanduser()
        if path.is_file():
            pipe = _load_single_file(StableDiffusionPipeline, path, config, common)
        elif path.is_dir():
            pipe = from_local(StableDiffusionPipeline.from_pretrained, str(path), **common)
        else:
            pipe = from_hub(
                StableDiffusionPipeline.from_pretrained, model, "model", LOCAL, **common
            )
        return cls.from_parts(pipe, name=str(model), device=dev, dtype=torch_dtype)


def folder_problem(folder: Path) -> str | None:
    if not (folder / "model_index.json").is_file():
        return f"{folder} has no model_index.json: not a diffusers model folder"
    missing = [p for p in REQUIRED_PARTS if not (folder / p).is_dir()]
    if missing:
        return f"{folder} is missing {', '.join(missing)}/: an incomplete diffusers model folder"
    return None


def check_unet_config(config: dict) -> None:
    """Refuse UNets TokenFlow is not defined for, naming what they are."""
    if config.get("addition_embed_type") == "text_time":
        raise TokenFlowError("this is an SDXL model; SDXL is not yet supported (use SD 1.x/2.x)")
    channels = config.get("in_channels", 4)
    if channels != 4:
        raise TokenFlowError(
            f"this UNet takes {channels} input channels (an inpainting or depth model);"
            " use a text-to-image SD 1.x/2.x model"
        )
    blocks = list(config.get("up_block_types", []))
    if len(blocks) != 4 or not any("CrossAttn" in b for b in blocks):
        raise TokenFlowError(f"unexpected UNet layout {blocks}; TokenFlow needs an SD 1.x/2.x UNet")


def _load_single_file(cls, path: Path, config: str | None, common: dict):
    """A single .safetensors checkpoint; its component configs come from ``config`` or the Hub."""
    from ..hub import can_download

    kwargs = dict(common, local_files_only=not can_download())
    if config is not None:
        kwargs["config"] = str(Path(config).expanduser())
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here
        hint = (
            ""
            if config is not None
            else "; offline, give `model_config` (a diffusers folder of the same base model)"
        )
        raise TokenFlowError(
            f"could not load {path} as a single-file SD 1.x/2.x checkpoint "
            f"({type(exc).__name__}: {first_line(exc)}){hint}"
        ) from exc
