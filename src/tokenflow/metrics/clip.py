"""CLIP scores of edited videos (method doc, section 6).

- **CLIP text score**: mean cosine between each frame's CLIP image embedding and the prompt's
  text embedding.
- **Frame consistency**: mean CLIP image-embedding cosine of consecutive frames or of all pairs.

A CLIP model is loaded from a folder or the HF cache, and downloaded only when huggingface_hub
is not in offline mode and the Hub answers; otherwise a missing model fails at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenflow import hub
from tokenflow.errors import TokenFlowError
from tokenflow.metrics.flow import _as_frames

if TYPE_CHECKING:
    from transformers import CLIPModel

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


# --------------------------------------------------------------------------- CLIP


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def text_score_from_embeddings(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> float:
    """Mean cosine between each image embedding and one text embedding."""
    img = _normalize(torch.as_tensor(image_embeds))
    txt = _normalize(torch.as_tensor(text_embed).reshape(-1))
    return float((img @ txt).mean())


def consistency_from_embeddings(image_embeds: torch.Tensor, pairs: str = "consecutive") -> float:
    """Mean cosine between frame embeddings: consecutive pairs, or all pairs i < j."""
    emb = _normalize(torch.as_tensor(image_embeds))
    n = emb.shape[0]
    if n < 2:
        raise TokenFlowError(f"frame consistency needs at least 2 frames, got {n}")
    if pairs == "consecutive":
        return float((emb[:-1] * emb[1:]).sum(-1).mean())
    if pairs == "all":
        sims = emb @ emb.T
        i, j = torch.triu_indices(n, n, offset=1)
        return float(sims[i, j].mean())
    raise TokenFlowError(f"unknown pairs {pairs!r}; use 'consecutive' or 'all'")


def _features(output: Any) -> torch.Tensor:
    """CLIP feature getters return a tensor (transformers 4) or an output object (5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[0]
    return pooled


# What a Hugging Face CLIP model folder needs: all of the first, one of each further group.
_CLIP_FILES = ("config.json",)
_CLIP_ANY_OF = (
    ("model.safetensors", "pytorch_model.bin"),
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer.json", "vocab.json"),
)


class ClipUnavailableError(TokenFlowError):
    """The CLIP model cannot be loaded here; ``hub_id`` is set when downloading it would help."""

    def __init__(self, problem: str, fix: str, hub_id: str | None = None) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix
        self.hub_id = hub_id


def clip_in_cache(repo_id: str) -> bool:
    """Whether the files a CLIP model needs are all in the local HF cache (no network)."""
    return all(hub.in_hf_cache(repo_id, name) for name in _CLIP_FILES) and all(
        any(hub.in_hf_cache(repo_id, name) for name in group) for group in _CLIP_ANY_OF
    )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's log lines and bars while a model loads."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    levels = hub_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    hub_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # one table on stdout, no loading bars
    try:
        yield
    finally:
        hub_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


class ClipScorer:
    """CLIP text score and frame consistency with a Hugging Face CLIP model.

    The default model is ``openai/clip-vit-large-patch14`` (ViT-L/14), the one the TokenFlow and
    Pix2Video papers report. ``model_id_or_dir`` is a folder saved with ``save_pretrained`` or a
    Hub id. A Hub id is loaded from the local HF cache when its files are there; otherwise it is
    downloaded (quietly) when downloads are possible (huggingface_hub not offline, the Hub
    answering) and ``local_files_only`` is not True. A model that cannot be had raises
    :class:`ClipUnavailableError` at once, saying how to get it; there are no connection retries.
    """

    def __init__(
        self,
        model_id_or_dir: str | Path = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
        batch_size: int = 16,
    ) -> None:
        self.model_id = str(model_id_or_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        name = self.model_id
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ClipUnavailableError(
                    f"CLIP model folder {path} has no config.json",
                    "use a folder saved with CLIPModel.save_pretrained (and its processor) or a "
                    f"Hub id such as {DEFAULT_CLIP_MODEL}",
                )
            self._load(str(path), local_only=True, folder=True)
            return
        if path.exists():
            raise ClipUnavailableError(
                f"CLIP model path {name} is a file", "use the folder that holds the model"
            )
        if hub.looks_like_path(name):
            raise ClipUnavailableError(
                f"CLIP model folder {name} does not exist",
                f"use an existing folder or a Hub id such as {DEFAULT_CLIP_MODEL}",
            )
        get_it = (
            f"get it with {hub.download_hint(name)} on a connected machine (then copy the HF "
            "cache here) or use a local CLIP folder as the CLIP model"
        )
        cached = clip_in_cache(name)
        if cached:
            with contextlib.suppress(ClipUnavailableError):
                self._load(name, local_only=True)
                return
        if local_files_only:
            why = "downloads are off (local files only)"
        elif hub.hub_offline():
            why = "downloads are off (HF_HUB_OFFLINE is set)"
        elif not hub.hub_reachable():
            why = "the Hugging Face Hub is unreachable"
        else:
            self._load(name, local_only=False)
            return
        where = "is incomplete in" if cached else "is not in"
        raise ClipUnavailableError(
            f"CLIP model {name} {where} the local Hugging Face cache and {why}", get_it, name
        )

    def _load(self, source: str, local_only: bool, folder: bool = False) -> None:
        try:
            with _quiet_loading():  # importing CLIPImageProcessor may log about torchvision
                from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

                model = CLIPModel.from_pretrained(source, local_files_only=local_only)
                processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local_only)
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except Exception as exc:  # hub, network and format errors all mean "not loadable"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            reason = reason.rstrip(": ")[:200]
            if folder:
                raise ClipUnavailableError(
                    f"CLIP model folder {source} could not be loaded ({reason})",
                    "save the model and its processor there with save_pretrained, or use a Hub id",
                ) from exc
            if local_only:
                raise ClipUnavailableError(
                    f"CLIP model {source} could not be loaded from the local HF cache ({reason})",
                    f"fetch it again with {hub.download_hint(source)}",
                    source,
                ) from exc
            raise ClipUnavailableError(
                f"CLIP model {source} could not be downloaded ({reason})",
                f"check the Hub id, or get it with {hub.download_hint(source)} on a connected "
                "machine and copy the HF cache here, or use a local CLIP folder as the CLIP model",
                source,
            ) from exc
        self.image_processor = processor
        self.tokenizer = tokenizer
        self.model: CLIPModel = model.to(self.device).eval()
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU."""
        clip = _as_frames(frames, "frames")
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(clip), self.batch_size):
                batch = list(clip[start : start + self.batch_size])
                inputs = self.image_processor(images=batch, return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
                feats = _features(self.model.get_image_features(pixel_values=pixels))
                chunks.append(_normalize(feats).cpu())
        return torch.cat(chunks)

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """L2-normalised text embedding (D,), float32 on the CPU."""
        tokens = self.tokenizer(
            [prompt],
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            feats = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            )
        return _normalize(feats)[0].cpu()

    def text_score(self, frames: np.ndarray, prompt: str) -> float:
        """Mean cosine of each frame's image embedding with the prompt's text embedding."""
        return text_score_from_embeddings(
            self.image_embeddings(frames), self.text_embedding(prompt)
        )

    def frame_consistency(self, frames: np.ndarray, pairs: str = "consecutive") -> float:
        """Mean image-embedding cosine over consecutive pairs or all pairs i < j."""
        return consistency_from_embeddings(self.image_embeddings(frames), pairs)
