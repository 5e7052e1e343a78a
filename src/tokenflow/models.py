"""Loading Stable Diffusion the way users have it: a Hub id, a diffusers folder, or one file.

Everything is loaded with safetensors; the scheduler is the model's own configuration loaded as
DDIM (as the authors do). Failures are ``TokenFlowError``s that say what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TokenFlowError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Components a diffusers Stable Diffusion folder must have.
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion model TokenFlow uses, on one device and dtype."""

    tokenizer: object
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler: object  # DDIMScheduler
    name: str
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_parts(
        cls,
        parts,
        name: str = "in-memory",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> StableDiffusion:
        """Wrap already-built components (a pipeline or ``testing.TinyStableDiffusion``)."""
        from diffusers import DDIMScheduler

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = cls(
            tokenizer=parts.tokenizer,
            text_encoder=parts.text_encoder.to(device, dtype).eval(),
            unet=parts.unet.to(device, dtype).eval(),
            vae=parts.vae.to(device, dtype).eval(),
            scheduler=DDIMScheduler.from_config(parts.scheduler.config),
            name=name,
            device=device,
            dtype=dtype,
        )
        check_architecture(model.unet)
        return model

    def fingerprint(self) -> str:
        """A cheap identity of the weights, for cache keys.

        Hashes names, shapes and a strided sample of every tensor (in float32, so the value
        does not depend on the dtype it is loaded in): any fine-tune or merge changes it, and it
        costs milliseconds even for SD-sized models.
        """
        h = hash_weights(hashlib.sha256(), (self.unet, self.vae, self.text_encoder))
        h.update(json.dumps(dict(self.scheduler.config), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def hash_weights(h, modules) -> object:
    """Feed names, shapes and a strided float32 sample of every tensor of ``modules`` to ``h``.

    Shared by every weight fingerprint (SD, ControlNet) so they all mean the same thing.
    """
    for part in modules:
        for key, tensor in part.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
            h.update(f"{key}{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h


def weights_fingerprint(*modules: nn.Module) -> str:
    """A cheap identity of some modules' weights (see ``StableDiffusion.fingerprint``)."""
    return hash_weights(hashlib.sha256(), modules).hexdigest()[:16]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA, then MPS, then CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TokenFlowError("--device mps: MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float16 on CUDA (as the authors run), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TokenFlowError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == "float16":
        raise TokenFlowError("float16 is not supported on the CPU; use --dtype float32")
    return DTYPES[dtype]


def check_architecture(unet: nn.Module) -> None:
    """Refuse UNets TokenFlow is not defined for, naming what they are."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) == "text_time":
        raise TokenFlowError("this is an SDXL model; SDXL is not yet supported (use SD 1.x/2.x)")
    if config.in_channels != 4:
        raise TokenFlowError(
            f"this UNet takes {config.in_channels} input channels (an inpainting or depth model);"
            " use a text-to-image SD 1.x/2.x model"
        )
    blocks = list(config.up_block_types)
    if len(blocks) != 4 or not any("CrossAttn" in b for b in blocks):
        raise TokenFlowError(f"unexpected UNet layout {blocks}; TokenFlow needs an SD 1.x/2.x UNet")


def _folder_problem(folder: Path) -> str | None:
    if not (folder / "model_index.json").is_file():
        return f"{folder} has no model_index.json: not a diffusers model folder"
    missing = [p for p in REQUIRED_PARTS if not (folder / p).is_dir()]
    if missing:
        return f"{folder} is missing {', '.join(missing)}/: an incomplete diffusers model folder"
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model_source(model: str | os.PathLike, config: str | os.PathLike | None = None) -> None:
    """Refuse a model that cannot load, from file names and JSON alone (milliseconds).

    Run before the video is decoded, so a typo in ``--model`` fails at once; never unpickles.
    """
    path = Path(model).expanduser()
    text = str(model)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise TokenFlowError(
                f"{path}: only .safetensors checkpoints are loaded (pickled .ckpt/.bin can run"
                " code); convert it to safetensors or pass a diffusers folder"
            )
        _check_safetensors_header(path)
        if config is not None:
            folder = Path(config).expanduser()
            if not (folder / "model_index.json").is_file():
                raise TokenFlowError(
                    f"--model-config {config} is not a diffusers model folder (no"
                    " model_index.json); pass the folder of the base model, e.g. an SD 2.1 folder"
                )
            _refuse_sdxl_folder(folder)
        return
    if config is not None:
        raise TokenFlowError("--model-config only applies to a single .safetensors --model file")
    if path.is_dir():
        problem = _folder_problem(path)
        if problem:
            raise TokenFlowError(f"{problem}; pass a folder saved by diffusers' save_pretrained")
        _refuse_sdxl_folder(path)
        _check_unet_config(path / "unet" / "config.json")
        return
    if text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1:
        raise TokenFlowError(f"model path {text} does not exist")
    if _offline() and not _in_hf_cache(text):
        raise TokenFlowError(
            f"model {text} is not in the Hugging Face cache and the Hub is offline; on a"
            f" connected machine run `hf download {text}` and copy the HF cache here, or pass"
            " a local diffusers folder or a .safetensors file to --model"
        )


def _check_safetensors_header(path: Path) -> None:
    """Read only the header (no weights): a damaged download fails here, with its own fix."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise TokenFlowError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}): it is"
            " damaged or truncated; download it again"
        ) from exc


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hub id's ``model_index.json`` is in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False
    return isinstance(found, str)


def _check_unet_config(path: Path) -> None:
    """The UNet checks of ``check_architecture`` on its config.json, before loading weights."""
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return  # diffusers will name what is wrong with it when loading
    if config.get("addition_embed_type") == "text_time":
        raise TokenFlowError("this is an SDXL model; SDXL is not yet supported (use SD 1.x/2.x)")
    if config.get("in_channels", 4) != 4:
        raise TokenFlowError(
            f"this UNet takes {config['in_channels']} input channels (an inpainting or depth"
            " model); use a text-to-image SD 1.x/2.x model"
        )


def _load_single_file(cls, path: Path, config: str | os.PathLike | None, common: dict):
    """A single .safetensors checkpoint; its component configs come from ``config`` or the Hub."""
    kwargs = dict(common, local_files_only=_offline())
    if config is not None:
        kwargs["config"] = str(Path(config).expanduser())
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        hint = (
            ""
            if config is not None
            else "; offline, pass --model-config DIR (a diffusers folder of the same base model)"
        )
        raise TokenFlowError(
            f"could not load {path} as a single-file SD 1.x/2.x checkpoint "
            f"({type(exc).__name__}: {first}){hint}"
        ) from exc


def load_model(
    model: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    config: str | os.PathLike | None = None,
) -> StableDiffusion:
    """Load SD 1.x/2.x from a Hub id (HF cache), a diffusers folder or a safetensors file.

    ``config``: for a single file, a diffusers folder whose configs describe it (needed offline).
    """
    # Quiet the libraries before the pipeline import: transformers logs at import time, and its
    # "Loading weights" bar would break --quiet and the one-line error contract.
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    from diffusers import StableDiffusionPipeline

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    common = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    path = Path(model).expanduser()
    text = str(model)
    check_model_source(model, config)

    if path.is_file():
        pipe = _load_single_file(StableDiffusionPipeline, path, config, common)
    elif path.is_dir():
        pipe = _from_pretrained(StableDiffusionPipeline, str(path), common, local_only=True)
    else:
        pipe = _load_hub_model(StableDiffusionPipeline, text, common)

    parts = StableDiffusion.from_parts(pipe, name=text, device=dev, dtype=torch_dtype)
    return parts


def _refuse_sdxl_folder(folder: Path) -> None:
    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenFlowError(
            f"cannot read {folder / 'model_index.json'} ({type(exc).__name__}); the model folder"
            " is damaged: save it again with diffusers' save_pretrained"
        ) from exc
    if not isinstance(index, dict):
        raise TokenFlowError(f"{folder / 'model_index.json'} is not a JSON object; re-save it")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise TokenFlowError(
            f"{folder} is an SDXL model; SDXL is not yet supported (use SD 1.x/2.x)"
        )


def _from_pretrained(cls, name: str, common: dict, local_only: bool):
    try:
        return cls.from_pretrained(
            name, local_files_only=local_only, use_safetensors=True, **common
        )
    except TokenFlowError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "safetensors" in first.lower():
            raise TokenFlowError(
                f"{name} has no safetensors weights; tokenflow does not unpickle .bin files."
                " Convert it with diffusers' save_pretrained(safe_serialization=True)"
            ) from exc
        raise TokenFlowError(f"could not load model {name}: {first}") from exc


def _load_hub_model(cls, repo_id: str, common: dict, local: str | None = None):
    """Hub id: use the HF cache; download only when online; say how to get it when not.

    ``local`` names the local alternative in the message (default: --model's).
    """
    local = local or "a local diffusers folder or a .safetensors file to --model"
    how = (
        f"on a connected machine run `hf download {repo_id}` and copy the HF cache here, or pass"
        f" {local}"
    )
    try:
        return cls.from_pretrained(repo_id, local_files_only=True, use_safetensors=True, **common)
    except Exception as cached_exc:  # noqa: BLE001 - not in the cache (or incomplete there)
        if _offline():
            raise TokenFlowError(
                f"model {repo_id} is not in the Hugging Face cache and the Hub is offline; {how}"
            ) from cached_exc
    try:
        return cls.from_pretrained(repo_id, use_safetensors=True, **common)
    except Exception as exc:  # noqa: BLE001
        raise TokenFlowError(
            f"model {repo_id} is not in the Hugging Face cache and could not be downloaded"
            f" ({type(exc).__name__}); {how}"
        ) from exc
