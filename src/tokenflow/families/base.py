"""What every model family gives the engine: components, prompt conditioning, TokenFlow layers.

A family (SD 1.x/2.x, SDXL) is one subclass of ``DiffusionModel`` in one module of this package.
The engine only ever talks to this interface: it asks the model to encode a prompt into a
``Conditioning`` (embeddings plus any extra UNet inputs), to encode and decode frames with its
VAE, for a fresh scheduler, and for the layers TokenFlow acts on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import TokenFlowError
from ..layers import TokenFlowLayers, find_layers
from ..loading import (
    check_hub_id,
    from_hub,
    from_local,
    hash_weights,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)
from .addons import (
    EmbeddingFile,
    LoraFile,
    add_embeddings,
    apply_loras,
    check_addons,
    load_vae,
)
from .checkpoints import check_config_fits, checkpoint_kind, load_single_file

LOCAL = "a local diffusers folder or a .safetensors file as the model"


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
    #: how messages name the family ("SD 1.x/2.x", "SDXL")
    label: ClassVar[str] = ""
    #: default working size: the short side in pixels
    default_short_side: ClassVar[int] = 512
    #: run a float16 model's VAE in float32 when its config says it overflows in float16
    #: (diffusers' ``force_upcast``, as SDXL's pipelines do)
    upcast_vae: ClassVar[bool] = False

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
        #: what was added after loading (see ``add``): another VAE, LoRAs, embeddings
        self.addons: dict[str, Any] = {"vae": None, "loras": [], "embeddings": []}
        self.vae.to(self.device, self.vae_dtype(self.vae))

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

    # -- loading: Hub id, diffusers folder or single file, the same way for every family ------

    #: the subfolders a diffusers folder of the family has
    required_parts: ClassVar[tuple[str, ...]] = ()
    #: keyword arguments of the family pipeline's ``from_pretrained`` / ``from_single_file``
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def pipeline_class(cls):  # pragma: no cover - per family
        """The family's diffusers pipeline class."""
        raise NotImplementedError

    @classmethod
    def check_folder(cls, index: dict, unet_config: dict) -> None:
        """Refuse a folder's model the family cannot edit with (from its JSON); per family."""

    #: the family's text encoders, as its diffusers pipeline names them (tokenizers alike)
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)

    @classmethod
    def check_parts(cls, parts: Any) -> None:
        """Refuse components the family cannot edit with (e.g. a refiner's); per family."""

    @classmethod
    def from_parts(
        cls,
        parts: Any,
        name: str = "in-memory",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> DiffusionModel:
        """Wrap components: a diffusers pipeline of the family, or a ``testing`` tiny model."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        cls.check_parts(parts)
        names = cls.text_encoder_names
        return cls(
            unet=parts.unet.to(device, dtype).eval(),
            vae=parts.vae.to(device, dtype).eval(),
            text_encoders=[getattr(parts, n).to(device, dtype).eval() for n in names],
            tokenizers=[getattr(parts, n.replace("text_encoder", "tokenizer")) for n in names],
            scheduler_config=dict(parts.scheduler.config),
            name=name,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def check_source(cls, model: str, config: str | None) -> None:
        """Refuse, in milliseconds, a source this family could not load (names, JSON and
        file headers only)."""
        path = Path(model).expanduser()
        if path.is_file():
            checkpoint_kind(path)  # refuses pickles, refiners, inpainting models, non-models
            if config is not None:
                if not (Path(config).expanduser() / "model_index.json").is_file():
                    raise TokenFlowError(
                        f"`model_config` {config} is not a diffusers model folder (no"
                        " model_index.json); pass the folder of the base model, e.g. SD 2.1's"
                    )
                check_config_fits(path, config)
            return
        if config is not None:
            raise TokenFlowError("`model_config` only applies to a single .safetensors model")
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise TokenFlowError(
                    f"{path} has no model_index.json: not a diffusers model folder; pass a"
                    " folder saved by diffusers' save_pretrained"
                )
            missing = [p for p in cls.required_parts if not (path / p).is_dir()]
            if missing:
                raise TokenFlowError(
                    f"{path} is missing {', '.join(missing)}/: an incomplete diffusers model"
                    " folder; pass a folder saved by diffusers' save_pretrained"
                )
            documents = []
            for file in (path / "model_index.json", path / "unet" / "config.json"):
                with contextlib.suppress(OSError, ValueError):  # diffusers names those on loading
                    documents.append(json.loads(file.read_text("utf-8")))
            if len(documents) == 2:
                cls.check_folder(*documents)
            return
        check_hub_id(str(model), "model_index.json", "model", LOCAL)

    @classmethod
    def load(
        cls, model: str, device: str | None, dtype: str | None, config: str | None
    ) -> DiffusionModel:
        """From a Hub id (HF cache), a diffusers folder or a single safetensors file."""
        quiet_libraries()
        pipeline = cls.pipeline_class()
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        cls.check_source(model, config)
        common = dict(cls.pipeline_kwargs, dtype=torch_dtype)
        path = Path(model).expanduser()
        if path.is_file():
            pipe = load_single_file(pipeline, path, config, common)
        elif path.is_dir():
            pipe = from_local(pipeline.from_pretrained, str(path), **common)
        else:
            pipe = from_hub(pipeline.from_pretrained, model, "model", LOCAL, **common)
        return cls.from_parts(pipe, name=str(model), device=dev, dtype=torch_dtype)

    def encode_prompt(
        self, prompt: str, size: tuple[int, int] | None = None
    ) -> Conditioning:  # pragma: no cover - per family
        """``prompt`` for frames of ``size`` (height, width) in pixels (default: the family's
        default working size); only families with size conditioning (SDXL) use the size."""
        raise NotImplementedError

    def diffusers_pipeline(self):  # pragma: no cover - per family
        """The family's diffusers pipeline around these same components (no copies): its
        LoRA and textual-inversion loaders and prompt helpers act on this model."""
        raise NotImplementedError

    # -- the VAE ------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def vae_dtype(self, vae: nn.Module) -> torch.dtype:
        if self.upcast_vae and self.dtype == torch.float16 and vae.config.force_upcast:
            return torch.float32
        return self.dtype

    @torch.no_grad()
    def encode_images(self, frames: np.ndarray) -> torch.Tensor:
        """VAE posterior mean x scaling factor of (n, H, W, 3) uint8 frames."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        x = x.float().div(255).to(self.device, self.vae.dtype)
        z = self.vae.encode(2 * x - 1).latent_dist.mean * self.vae.config.scaling_factor
        self._check_vae_output(z, "latents")
        return z.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1], (n, 3, H, W)."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        x = self.vae.decode(z).sample
        self._check_vae_output(x, "pixels")
        return (x / 2 + 0.5).clamp(0, 1)

    def _check_vae_output(self, x: torch.Tensor, what: str) -> None:
        """A float16 VAE that overflows (SDXL's own does) gives inf/NaN: say which and why."""
        if self.vae.dtype == torch.float16 and not torch.isfinite(x).all():
            vae = self.addons["vae"] or f"the VAE of {self.name}"
            raise TokenFlowError(
                f"{vae} overflowed in float16 (non-finite {what}): it is not fp16-safe; give an"
                " fp16-safe `vae` (for SDXL madebyollin/sdxl-vae-fp16-fix), or use `dtype`"
                " bfloat16 or float32"
            )

    # -- what users add -----------------------------------------------------------------------

    def add(
        self,
        *,
        vae: str | None = None,
        lora: tuple[str, ...] = (),
        embedding: tuple[str, ...] = (),
    ) -> None:
        """Replace the VAE (HF id or folder), apply LoRAs (``FILE[:SCALE]``) and add
        textual-inversion embeddings (``FILE[:TOKEN]``); recorded in ``addons``."""
        check_addons(vae, lora, embedding)
        if vae:
            replacement = load_vae(vae, self.dtype, float(self.vae.config.scaling_factor))
            self.vae = replacement.to(self.device, self.vae_dtype(replacement)).eval()
            self.addons["vae"] = vae
        if lora:
            self.addons["loras"] += apply_loras(self, [LoraFile.parse(t) for t in lora])
        if embedding:
            files = [EmbeddingFile.parse(t) for t in embedding]
            self.addons["embeddings"] += add_embeddings(self, files)

    def expand_embedding_tokens(self, prompt: str, tokenizer: Any) -> str:
        """A multi-vector embedding's token stands for several tokens; spell them out, as
        diffusers' pipelines do (unchanged without embeddings)."""
        if not self.addons["embeddings"]:
            return prompt
        return self.diffusers_pipeline().maybe_convert_prompt(prompt, tokenizer)

    # -- identity -----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A cheap identity of the weights, for cache keys (see ``loading.hash_weights``), and
        of what was added (a LoRA's file and scale count even when fused into the weights)."""
        h = hash_weights(hashlib.sha256(), (self.unet, self.vae, *self.text_encoders))
        h.update(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
        if any(self.addons.values()):  # models without add-ons keep their earlier keys
            h.update(json.dumps(self._addon_identity(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _addon_identity(self) -> dict[str, Any]:
        loras = [(r["sha256"], r["scale"]) for r in self.addons["loras"]]
        embeddings = [(r["sha256"], r["token"]) for r in self.addons["embeddings"]]
        return {"vae": self.addons["vae"], "loras": loras, "embeddings": embeddings}

    def describe(self) -> dict[str, Any]:
        """What ``tokenflow info`` and run.json report about the model."""
        return {
            "name": self.name,
            "family": self.family,
            "default_short_side": self.default_short_side,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae.dtype).removeprefix("torch."),
            "vae": self.addons["vae"],
            "loras": [dict(r) for r in self.addons["loras"]],
            "embeddings": [dict(r) for r in self.addons["embeddings"]],
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
