"""What every model family gives the engine: components, prompt conditioning, TokenFlow layers.

A family (SD 1.x/2.x, later SDXL) is one subclass of ``DiffusionModel`` in one module of this
package. The engine only ever talks to this interface: it asks the model to encode a prompt into
a ``Conditioning`` (embeddings plus any extra UNet inputs), to encode and decode frames with its
VAE, for a fresh scheduler, and for the layers TokenFlow acts on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..layers import TokenFlowLayers, find_layers
from ..loading import hash_weights


@dataclass
class Conditioning:
    """A prompt as the UNet takes it, for a batch: cross-attention embeddings (B, tokens, dim)
    plus any added inputs (SDXL's pooled text embeddings and size ids), batch-first."""

    embeddings: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def expand(self, count: int) -> Conditioning:
        """This (single-prompt) conditioning for ``count`` batch elements."""
        return Conditioning(
            self.embeddings.expand(count, -1, -1),
            {k: v.expand(count, *v.shape[1:]) for k, v in self.added.items()},
        )

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([p.embeddings for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added},
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a diffusers UNet (or ControlNet) call."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeddings}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


class DiffusionModel:
    """A latent diffusion model's parts on one device and dtype; subclassed per family."""

    family: ClassVar[str] = ""
    #: default working size: the short side in pixels
    default_short_side: ClassVar[int] = 512

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoders: list[nn.Module],
        tokenizers: list[Any],
        scheduler_config: dict,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.device = device
        self.dtype = dtype
        self._warned_prompts: set[str] = set()

    # -- what the engine asks ---------------------------------------------------------------

    def new_scheduler(self):
        """A DDIM scheduler of the model's own configuration, owned by one edit (its timesteps
        are per-call state, never shared between edits)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def layers(self) -> TokenFlowLayers:
        """The self-attention and PnP injection layers (see ``layers.py``)."""
        return find_layers(self.unet)

    @classmethod
    def claims(cls, index: dict) -> bool:  # pragma: no cover - per family
        """Whether this family loads a model with this ``model_index.json`` ({} if unknown)."""
        raise NotImplementedError

    @classmethod
    def check_source(cls, model: str, config: str | None) -> None:  # pragma: no cover
        """Refuse, in milliseconds, a source this family could not load."""
        raise NotImplementedError

    @classmethod
    def load(
        cls, model: str, device: str | None, dtype: str | None, config: str | None
    ) -> DiffusionModel:  # pragma: no cover - per family
        raise NotImplementedError

    def encode_prompt(self, prompt: str) -> Conditioning:  # pragma: no cover - per family
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, frames: np.ndarray) -> torch.Tensor:
        """VAE posterior mean x scaling factor of (n, H, W, 3) uint8 frames."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        x = x.float().div(255).to(self.device, self.dtype)
        return self.vae.encode(2 * x - 1).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1], (n, 3, H, W)."""
        z = latents / self.vae.config.scaling_factor
        return (self.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    def fingerprint(self) -> str:
        """A cheap identity of the weights, for cache keys (see ``loading.hash_weights``)."""
        h = hash_weights(hashlib.sha256(), (self.unet, self.vae, *self.text_encoders))
        h.update(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What ``tokenflow info`` and run.json report about the model."""
        return {
            "name": self.name,
            "family": self.family,
            "default_short_side": self.default_short_side,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- helpers for families ---------------------------------------------------------------

    def warn_if_truncated(self, prompt: str, tokenizer: Any) -> None:
        """SD silently drops tokens past the encoder's length; say so once per prompt."""
        if prompt in self._warned_prompts:
            return
        count = len(tokenizer(prompt, truncation=False).input_ids)
        if count > tokenizer.model_max_length:
            self._warned_prompts.add(prompt)
            warnings.warn(
                f"prompt {prompt[:40]!r}... is {count} tokens but the text encoder takes"
                f" {tokenizer.model_max_length}; it is truncated, so shorten it",
                stacklevel=4,
            )
