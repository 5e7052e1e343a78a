"""Stable Diffusion XL (base 1.0 layout): two text encoders, size-conditioned UNet, 1024² default.

What differs from SD 1.x/2.x, all inside this adapter:

* a prompt is encoded by both text encoders (CLIP ViT-L and OpenCLIP bigG): their penultimate
  hidden states concatenated are the cross-attention input, the second one's projected pooled
  output goes in as ``added["text_embeds"]`` -- per branch, so the source branch carries the
  inversion prompt's -- with SDXL's size/crop micro-conditioning ``added["time_ids"]`` =
  (original H, W, crop top, left, target H, W) = (H, W, 0, 0, H, W) of the working frames;
* SDXL's VAE overflows in float16 (its config says so: ``force_upcast``), so a float16 model
  runs it in float32 unless the user gives an fp16-safe ``vae``; one that still overflows is a
  one-line error (``base._check_vae_output``);
* DDIM takes the model's own noise schedule (SDXL ships an Euler scheduler), without x0
  clipping, which would distort the inverted latents.

TokenFlow's layers follow the same structural rule as for SD (``layers.py``); docs/sdxl.md
says which layers that is for SDXL and why.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenFlowError
from .base import Conditioning, DiffusionModel

#: size/crop micro-conditioning values per sample: original (H, W), crop (top, left), target
TIME_IDS = 6


class StableDiffusionXL(DiffusionModel):
    """SDXL base 1.0 and its fine-tunes (not the refiner, not inpainting models)."""

    family = "sdxl"
    label = "SDXL"
    default_short_side = 1024
    upcast_vae = True
    required_parts = (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    pipeline_kwargs = dict(add_watermarker=False)

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def claims(cls, index: dict) -> bool:
        """Any SDXL folder; refiners and inpainting models are refused by ``check_folder``."""
        return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index

    @classmethod
    def check_folder(cls, index: dict, unet_config: dict) -> None:
        name = str(index.get("_class_name", ""))
        refiner = index.get("requires_aesthetics_score") or index.get("text_encoder") in (
            None,
            [None, None],
        )
        if refiner:
            raise TokenFlowError(
                "this is an SDXL refiner (one OpenCLIP text encoder, aesthetic-score"
                " conditioning); TokenFlow needs SDXL base 1.0 or a fine-tune of it"
            )
        channels = unet_config.get("in_channels", 4)
        if "Inpaint" in name or channels != 4:
            raise TokenFlowError(
                f"this is an SDXL inpainting model (its UNet takes {channels} input channels);"
                " TokenFlow needs a text-to-image SDXL model"
            )

    # -- building -----------------------------------------------------------------------------

    text_encoder_names = ("text_encoder", "text_encoder_2")

    @classmethod
    def check_parts(cls, parts: Any) -> None:
        if parts.text_encoder is None or parts.text_encoder_2 is None:
            raise TokenFlowError(
                "this SDXL model lacks a text encoder (an SDXL refiner?); TokenFlow needs SDXL"
                " base 1.0 or a fine-tune of it"
            )
        _check_added_conditioning(parts.unet, parts.text_encoder_2)

    def diffusers_pipeline(self):
        if getattr(self, "_pipeline", None) is None or self._pipeline.vae is not self.vae:
            self._pipeline = self.pipeline_class()(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.unet,
                scheduler=self.new_scheduler(),
                add_watermarker=False,
            )
        return self._pipeline

    def new_scheduler(self):
        """DDIM on the model's noise schedule; never x0 clipping (SDXL's Euler config does not
        say, and DDIM's default clips)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(
            self.scheduler_config, clip_sample=False, set_alpha_to_one=False
        )

    # -- prompts ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str, size: tuple[int, int] | None = None) -> Conditioning:
        """Both encoders' penultimate states (1, 77, d1 + d2), the pooled embedding and the
        size/crop ids for frames of ``size`` (height, width; default 1024x1024), by diffusers'
        own SDXL prompt encoding (embedding tokens included)."""
        for tokenizer in self.tokenizers:
            self.warn_if_truncated(prompt, tokenizer)
        embeddings, _, pooled, _ = self.diffusers_pipeline().encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        height, width = size or (self.default_short_side, self.default_short_side)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.device)}
        return Conditioning(embeddings.to(self.dtype), added)


def _check_added_conditioning(unet: torch.nn.Module, text_encoder_2: torch.nn.Module) -> None:
    """The UNet's added-conditioning input must be the pooled embedding plus 6 size/crop ids
    (a refiner's takes 5: its aesthetic score replaces the target size)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise TokenFlowError("this UNet has no SDXL size conditioning: not an SDXL base model")
    expected = unet.add_embedding.linear_1.in_features
    given = text_encoder_2.config.projection_dim + TIME_IDS * unet.config.addition_time_embed_dim
    if expected != given:
        raise TokenFlowError(
            f"this SDXL UNet takes {expected} added-conditioning values but the pooled text"
            f" embedding and {TIME_IDS} size/crop ids make {given} (an SDXL refiner takes an"
            " aesthetic score instead); TokenFlow needs SDXL base 1.0 or a fine-tune of it"
        )
