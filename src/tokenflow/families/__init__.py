"""Model families as adapters: each module here defines one ``DiffusionModel`` subclass.

``load_model`` tells the family of a Hub id, folder or checkpoint from its ``model_index.json``
(read locally, never downloaded) and lets that family load it. A new family is one new module
with a subclass that sets ``family`` and implements ``claims``, ``check_source``, ``load`` and
``encode_prompt``; it is found here without further registration.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from ..errors import TokenFlowError
from .base import Conditioning, DiffusionModel


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
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(model), "model_index.json")
        except Exception:  # noqa: BLE001 - not an id the cache knows
            return {}
        if not isinstance(cached, str):
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


def family_of(model: str, config: str | None = None) -> type[DiffusionModel]:
    """The family that claims ``model`` (SD 1.x/2.x when nothing local says otherwise)."""
    from ..hub import looks_like_path

    if looks_like_path(str(model)) and not Path(str(model)).expanduser().exists():
        raise TokenFlowError(f"model path {model} does not exist")
    index = model_index(model, config)
    for family in families().values():
        if family.claims(index):
            return family
    kind = index.get("_class_name", "this kind of")
    if "XL" in kind or "text_encoder_2" in index:
        raise TokenFlowError("this is an SDXL model; SDXL is not yet supported (use SD 1.x/2.x)")
    raise TokenFlowError(
        f"{model} is a {kind} model, which TokenFlow does not support yet; supported:"
        f" {', '.join(sorted(families()))}"
    )


def check_model_source(model: str, config: str | None = None) -> None:
    """Refuse a model that cannot load, from names and JSON alone, before any heavy work."""
    family_of(model, config).check_source(model, config)


def load_model(
    model: str, device: str | None = None, dtype: str | None = None, config: str | None = None
) -> DiffusionModel:
    """Load a model of any supported family from a Hub id, a diffusers folder or one file."""
    return family_of(model, config).load(str(model), device, dtype, config)


__all__ = [
    "Conditioning",
    "DiffusionModel",
    "check_model_source",
    "families",
    "family_of",
    "load_model",
    "model_index",
]
