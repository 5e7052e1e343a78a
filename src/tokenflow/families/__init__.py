"""Model families as adapters: each module here defines one ``DiffusionModel`` subclass.

``load_model`` tells the family of a Hub id or folder from its ``model_index.json`` (read
locally; for an id missing from the HF cache, fetched only when the Hub can be reached), and of
a single checkpoint file from its tensor names, lets that family load it, then adds what the
user asked for: another VAE, LoRAs, textual-inversion embeddings (``addons.py``). A new family
is one new module with a subclass that sets ``family`` and implements ``claims``,
``check_source``, ``load`` and ``encode_prompt``; it is found here without further
registration. Helper modules (``checkpoints``, ``addons``) define no family.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from ..errors import TokenFlowError
from .addons import check_addons
from .base import Conditioning, DiffusionModel
from .checkpoints import PIPELINES, checkpoint_kind


def families() -> dict[str, type[DiffusionModel]]:
    """Every family defined in this package, by name."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[DiffusionModel]] = {}
    pending = list(DiffusionModel.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.family:
            found[cls.family] = cls
    return found


def model_index(model: str, config: str | None = None) -> dict:
    """The ``model_index.json`` of a folder, a single file's config folder or a cached Hub id;
    empty when there is none to read locally."""
    from ..hub import looks_like_path

    path = Path(str(model)).expanduser()
    if path.is_file():
        path = Path(config).expanduser() if config else None
    if path is not None and path.is_dir():
        index_file = path / "model_index.json"
    elif path is None or looks_like_path(str(model)) or path.exists():
        return {}
    else:
        cached = _hub_index(str(model))
        if cached is None:
            return {}
        index_file = Path(cached)
    if not index_file.is_file():
        return {}
    try:
        index = json.loads(index_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenFlowError(
            f"cannot read {index_file} ({type(exc).__name__}); the model folder is damaged:"
            " save it again with diffusers' save_pretrained"
        ) from exc
    if not isinstance(index, dict):
        raise TokenFlowError(f"{index_file} is not a JSON object; save the model again")
    return index


def _hub_index(repo_id: str) -> str | None:
    """A Hub id's ``model_index.json``: from the HF cache, else downloaded (a few hundred
    bytes) when the Hub can be reached, so an SDXL id is not mistaken for SD on first use."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ..hub import can_download

    try:
        cached = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - not an id the cache knows
        return None
    if isinstance(cached, str):
        return cached
    if not can_download():
        return None
    try:
        return hf_hub_download(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - no such repo, gated...: the family's checks say so
        return None


def _claimant(index: dict) -> type[DiffusionModel] | None:
    return next((f for f in families().values() if f.claims(index)), None)


def family_of(model: str, config: str | None = None) -> type[DiffusionModel]:
    """The family that claims ``model`` (SD 1.x/2.x when nothing local says otherwise)."""
    from ..hub import looks_like_path

    path = Path(str(model)).expanduser()
    if looks_like_path(str(model)) and not path.exists():
        raise TokenFlowError(f"model path {model} does not exist")
    if path.is_file():  # a single checkpoint says what it is by its tensor names
        family = _claimant({"_class_name": PIPELINES[checkpoint_kind(path)]})
        if config is not None:
            configured = _claimant(model_index(model, config))
            if configured is not None and configured is not family:
                raise TokenFlowError(
                    f"{path} is an {family.label} checkpoint but `model_config` {config} is an"
                    f" {configured.label} model; give the diffusers folder of its own base model"
                )
        return family
    index = model_index(model, config)
    family = _claimant(index)
    if family is not None:
        return family
    raise TokenFlowError(
        f"{model} is a {index.get('_class_name', 'this kind of')} model, which TokenFlow does not"
        f" support yet; supported: {', '.join(sorted(families()))}"
    )


def check_model_source(
    model: str,
    config: str | None = None,
    *,
    vae: str | None = None,
    lora: tuple[str, ...] = (),
    embedding: tuple[str, ...] = (),
) -> None:
    """Refuse a model (and its VAE, LoRA and embedding files) that cannot load, from names,
    JSON and file headers alone, before any heavy work."""
    family_of(model, config).check_source(model, config)
    check_addons(vae, lora, embedding)


def load_model(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    config: str | None = None,
    *,
    vae: str | None = None,
    lora: tuple[str, ...] = (),
    embedding: tuple[str, ...] = (),
) -> DiffusionModel:
    """Load a model of any supported family from a Hub id, a diffusers folder or one file,
    then replace its VAE and add LoRAs (``FILE[:SCALE]``) and embeddings (``FILE[:TOKEN]``)."""
    check_addons(vae, lora, embedding)
    loaded = family_of(model, config).load(str(model), device, dtype, config)
    loaded.add(vae=vae, lora=lora, embedding=embedding)
    return loaded


__all__ = [
    "Conditioning",
    "DiffusionModel",
    "check_model_source",
    "families",
    "family_of",
    "load_model",
    "model_index",
]
