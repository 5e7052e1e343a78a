"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a 4-channel UNet, a factor-8 VAE."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenFlowError
from .base import Conditioning, DiffusionModel


class StableDiffusion(DiffusionModel):
    """SD 1.x/2.x, as TokenFlow's authors use it."""

    family = "sd"
    label = "SD 1.x/2.x"
    required_parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    pipeline_kwargs = dict(safety_checker=None, requires_safety_checker=False)

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def check_folder(cls, index: dict, unet_config: dict) -> None:
        check_unet_config(unet_config)

    @classmethod
    def check_parts(cls, parts: Any) -> None:
        check_unet_config(dict(parts.unet.config))

    @classmethod
    def claims(cls, index: dict) -> bool:
        """SD 1.x/2.x folders (and sources whose index cannot be read locally); not SDXL."""
        name = str(index.get("_class_name", ""))
        xl = "XL" in name or "text_encoder_2" in index
        return not xl and (not name or name.startswith("StableDiffusion"))

    def diffusers_pipeline(self):
        return self.pipeline_class()(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=self.unet,
            scheduler=self.new_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def encode_prompt(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """CLIP text embedding (1, 77, d), truncated to the encoder's length as SD does (SD
        has no size conditioning: ``size`` is not used)."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        prompt = self.expand_embedding_tokens(prompt, tokenizer)
        self.warn_if_truncated(prompt, tokenizer)
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return Conditioning(encoder(ids.to(self.device))[0].to(self.dtype))


def check_unet_config(config: dict) -> None:
    """Refuse UNets TokenFlow is not defined for, naming what they are."""
    if config.get("addition_embed_type") == "text_time":
        raise TokenFlowError(
            "this is an SDXL UNet in a model saved as SD 1.x/2.x: save it as an SDXL pipeline"
            " (StableDiffusionXLPipeline), which loads as SDXL"
        )
    channels = config.get("in_channels", 4)
    if channels != 4:
        raise TokenFlowError(
            f"this UNet takes {channels} input channels (an inpainting or depth model);"
            " use a text-to-image SD 1.x/2.x model"
        )
    blocks = list(config.get("up_block_types", []))
    if len(blocks) != 4 or not any("CrossAttn" in b for b in blocks):
        raise TokenFlowError(f"unexpected UNet layout {blocks}; TokenFlow needs an SD 1.x/2.x UNet")
