"""Loading weights the way users have them, with errors that say what to do.

Shared by every model TokenFlow loads (the diffusion model of each family, ControlNets):
device and dtype choice, a cheap fingerprint of weights for cache keys, the safetensors-only
rule (pickled ``.ckpt``/``.bin`` files can run code and are never unpickled), and
"a Hub id or a local folder" resolved through ``tokenflow.hub``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .errors import TokenFlowError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA, then MPS, then the CPU; an unusable device is refused."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError("`device` cuda: no CUDA GPU is visible to torch; use the cpu device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TokenFlowError("`device` mps: MPS is not available here; use the cpu device")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float16 on CUDA (as the authors run), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TokenFlowError(f"unknown `dtype` {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == "float16":
        raise TokenFlowError(
            "`dtype` float16 is not supported on the CPU; use float32 (or bfloat16)"
        )
    return DTYPES[dtype]


def hash_weights(h, modules) -> Any:
    """Feed names, shapes and a strided float32 sample of every tensor of ``modules`` to ``h``.

    A sample, not every byte: any fine-tune or merge changes it, and it costs milliseconds
    even for SD-sized models; float32, so the value does not depend on the loaded dtype.
    """
    for part in modules:
        for key, tensor in part.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
            h.update(f"{key}{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h


def weights_fingerprint(*modules: nn.Module) -> str:
    """A cheap identity of some modules' weights (see ``hash_weights``)."""
    return hash_weights(hashlib.sha256(), modules).hexdigest()[:16]


def check_safetensors_file(
    path: Path, what: str = "checkpoints", alternative: str = " or pass a diffusers folder"
) -> None:
    """Refuse pickled files; read only a safetensors header (a damaged download fails here,
    before anything loads). ``what`` and ``alternative`` word the message for the file's role."""
    tensor_shapes(path, what, alternative)


def tensor_shapes(
    path: Path, what: str = "checkpoints", alternative: str = " or pass a diffusers folder"
) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of a safetensors file, from its header alone (no data
    is read), so a file's kind and fit can be told in milliseconds."""
    from safetensors import safe_open

    if not path.is_file():
        raise TokenFlowError(f"{path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise TokenFlowError(
            f"{path}: only .safetensors {what} are loaded (pickled .ckpt/.bin/.pt files can run"
            f" code, so they are never opened); convert it to safetensors{alternative}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise TokenFlowError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}): it is"
            " damaged or truncated; download it again"
        ) from exc


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (LoRA and embedding identities in cache keys and run.json)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return text or type(exc).__name__


def check_hub_id(repo_id: str, index_file: str, what: str, local: str) -> None:
    """Before any heavy work: a Hub id must be cached, or downloadable right now.

    ``local`` names the local alternative for the message (e.g. "a diffusers folder").
    """
    if hub.in_hf_cache(repo_id, index_file):
        return
    how = (
        f"on a connected machine run {hub.download_hint(repo_id)} and copy the HF cache here,"
        f" or pass {local}"
    )
    if hub.hub_offline():
        raise TokenFlowError(
            f"{what} {repo_id} is not in the Hugging Face cache and the Hub is offline; {how}"
        )
    if not hub.hub_reachable():
        raise TokenFlowError(
            f"{what} {repo_id} is not in the Hugging Face cache and the Hub cannot be reached;"
            f" {how}"
        )


def from_local(loader: Callable[..., Any], folder: str, **kwargs: Any) -> Any:
    """``loader(folder, ...)`` on a local folder, safetensors only, with a one-line error."""
    try:
        return loader(folder, local_files_only=True, use_safetensors=True, **kwargs)
    except TokenFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here
        line = first_line(exc)
        if "safetensors" in line.lower():
            raise TokenFlowError(
                f"{folder} has no safetensors weights; tokenflow does not unpickle .bin files."
                " Convert it with diffusers' save_pretrained(safe_serialization=True)"
            ) from exc
        raise TokenFlowError(f"could not load {folder}: {line}") from exc


def from_hub(loader: Callable[..., Any], repo_id: str, what: str, local: str, **kwargs: Any) -> Any:
    """A Hub id: from the HF cache; downloaded only when the Hub can be reached."""
    how = (
        f"on a connected machine run {hub.download_hint(repo_id)} and copy the HF cache here,"
        f" or pass {local}"
    )
    try:
        return loader(repo_id, local_files_only=True, use_safetensors=True, **kwargs)
    except Exception as cached_exc:  # noqa: BLE001 - not in the cache (or incomplete there)
        if not hub.can_download():
            state = "offline" if hub.hub_offline() else "unreachable"
            raise TokenFlowError(
                f"{what} {repo_id} is not (completely) in the Hugging Face cache and the Hub is"
                f" {state}; {how}"
            ) from cached_exc
    try:
        return loader(repo_id, use_safetensors=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise TokenFlowError(
            f"{what} {repo_id} could not be downloaded ({type(exc).__name__}:"
            f" {first_line(exc)}); {how}"
        ) from exc


def quiet_libraries() -> None:
    """Silence transformers/diffusers logs and bars: they would break ``--quiet`` and the
    one-line error contract (transformers logs at import time)."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
