"""ControlNet conditioning for TokenFlow: load a ControlNet, build per-frame control images.

``load_control`` is what an edit job calls when a ControlNet is given (it composes with any
method). It returns a ``ControlNetCondition`` (the ``control.ControlCondition`` the pipeline
calls before every UNet evaluation: inversion and all three editing branches) and an identity
dict that goes into the inversion cache key, since the inversion is conditioned too.

Control images are kept as uint8 (N, H, W, 3) at the clip's working size: Canny edges
(``cv2.Canny`` on the 8-bit RGB frame, as the authors' preprocessing does), depth from a
transformers depth-estimation model (normalised per frame), or a video / frames folder of
precomputed maps read with the same frame selection as the clip.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import TokenFlowError
from .families.base import Conditioning, DiffusionModel
from .hub import download_hint, looks_like_path
from .loading import first_line, from_hub, from_local, weights_fingerprint
from .options import EditOptions
from .video import VideoClip, read_clip

CONTROL_KINDS = ("canny", "depth")


class ControlNetCondition:
    """ControlNet residuals for a batch of latents, each with its own frame's control image.

    ``frames[i]`` is the source frame of batch element ``i`` (the pipeline repeats the indices
    for the source/uncond/cond branches), so every branch sees its frame's control image.
    """

    def __init__(self, controlnet: nn.Module, images: np.ndarray, scale: float = 1.0) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError("control images must be uint8 (N, H, W, 3)")
        self.controlnet = controlnet
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.scale = float(scale)
        self.evaluations = 0  # batch elements pushed through the ControlNet

    def __len__(self) -> int:
        return len(self.images)

    def condition(self, frames: torch.Tensor, device: torch.device, dtype: torch.dtype):
        """Control images of ``frames`` as ControlNet wants them: (B, 3, H, W) in [0, 1]."""
        x = self.images[frames.cpu().long()].permute(0, 3, 1, 2)
        return x.to(device=device, dtype=torch.float32).div(255).to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        frames: torch.Tensor,
    ) -> dict[str, Any]:
        if len(frames) != len(latents):
            raise ValueError(f"{len(frames)} frame indices for a batch of {len(latents)}")
        self.evaluations += len(latents)
        down, mid = self.controlnet(
            latents,
            t,
            **conditioning.unet_kwargs(),
            controlnet_cond=self.condition(frames, latents.device, latents.dtype),
            conditioning_scale=self.scale,
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


# -- control images -------------------------------------------------------------------------


def canny_images(frames: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of every frame, 3 channels, uint8 0/255 (``cv2.Canny(image, low, high)``)."""
    import cv2

    if not 0 <= low <= high:
        raise TokenFlowError(f"`canny_low` {low} / `canny_high` {high}: need 0 <= low <= high")
    edges = [cv2.Canny(np.ascontiguousarray(frame), low, high) for frame in frames]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)


def _load_depth_model(name: str | None):
    """A transformers depth-estimation model and its image processor, safetensors only."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    if not name:
        raise TokenFlowError(
            "control depth needs a `depth_model` (e.g. Intel/dpt-hybrid-midas, or a local folder"
            " with a transformers depth-estimation model)"
        )
    local = "a local folder with a transformers depth-estimation model as `depth_model`"
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            model = from_local(AutoModelForDepthEstimation.from_pretrained, str(path))
        elif looks_like_path(name):
            raise TokenFlowError(f"`depth_model` {name}: no such folder")
        else:
            model = from_hub(
                AutoModelForDepthEstimation.from_pretrained, name, "depth model", local
            )
            processor = AutoImageProcessor.from_pretrained(name)
    except TokenFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise TokenFlowError(
            f"could not load depth model {name} ({first_line(exc)}); pass {local} (safetensors"
            f" weights and its image processor), or run {download_hint(name)} on a connected"
            " machine and copy the HF cache here"
        ) from exc
    return processor, model.eval()


@torch.no_grad()
def depth_images(
    frames: np.ndarray,
    depth_model: str | None,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
) -> np.ndarray:
    """Estimated depth of every frame at its size, min-max normalised per frame, 3 channels.

    Per-frame normalisation is what ControlNet's depth training data looks like (MiDaS maps
    scaled to 0..255); values are quantised to uint8 like a saved depth image.
    """
    processor, model = _load_depth_model(depth_model)
    model = model.to(device, torch.float32)
    height, width = frames.shape[1:3]
    maps = []
    for i in range(0, len(frames), batch_size):
        batch = [frame for frame in frames[i : i + batch_size]]
        inputs = processor(images=batch, return_tensors="pt").to(device)
        depth = model(**inputs).predicted_depth.float()
        if depth.ndim == 3:
            depth = depth[:, None]
        depth = torch.nn.functional.interpolate(
            depth, size=(height, width), mode="bicubic", align_corners=False
        )[:, 0]
        low = depth.amin(dim=(1, 2), keepdim=True)
        high = depth.amax(dim=(1, 2), keepdim=True)
        span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)  # flat map -> 0
        maps.append(((depth - low) / span).clamp(0, 1).cpu())
    depth = (torch.cat(maps) * 255).round().to(torch.uint8).numpy()
    return np.repeat(depth[..., None], 3, axis=-1)


def precomputed_images(path: Path, options: EditOptions, clip: VideoClip) -> np.ndarray:
    """Control images from a video or frames folder, with the clip's frame selection and size."""
    control = read_clip(path, **{**options.reader_kwargs(), "size": clip.size})
    if len(control) != len(clip):
        raise TokenFlowError(
            f"`control` {path} gives {len(control)} frames but the input gives {len(clip)} with"
            " the same `start`/`end`/`stride`/`frames`; the control images must match the"
            " input frame for frame"
        )
    return control.frames


def control_images(
    options: EditOptions, clip: VideoClip, device: torch.device | str = "cpu"
) -> np.ndarray:
    """The control image of every frame of ``clip`` (uint8 (N, H, W, 3)) for ``control``."""
    kind = options.control or ""
    if kind == "canny":
        return canny_images(clip.frames, options.canny_low, options.canny_high)
    if kind == "depth":
        return depth_images(clip.frames, options.depth_model, device)
    path = Path(kind).expanduser()
    if not path.exists():
        raise TokenFlowError(
            f"`control` {kind!r}: choose canny, depth, or give a video or frames folder of"
            " control images (this path does not exist)"
        )
    return precomputed_images(path, options, clip)


# -- the ControlNet ---------------------------------------------------------------------------


def load_controlnet(name: str, model: DiffusionModel) -> nn.Module:
    """A diffusers ControlNet (HF id or folder, safetensors only) on the model's device/dtype."""
    from diffusers import ControlNetModel

    path = Path(name).expanduser()
    if path.is_file():
        raise TokenFlowError(
            f"`controlnet` {path}: give a diffusers ControlNet folder (config.json +"
            " diffusion_pytorch_model.safetensors) or a Hub id, not a single file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TokenFlowError(
                f"`controlnet` {path} has no config.json: not a diffusers ControlNet folder"
            )
        controlnet = from_local(ControlNetModel.from_pretrained, str(path), torch_dtype=model.dtype)
    elif looks_like_path(name):
        raise TokenFlowError(f"`controlnet` {name}: no such folder")
    else:
        local = "a local ControlNet folder (saved by diffusers' save_pretrained) as `controlnet`"
        load = ControlNetModel.from_pretrained
        controlnet = from_hub(load, name, "ControlNet", local, torch_dtype=model.dtype)
    check_compatible(controlnet, model.unet, name)
    return controlnet.to(model.device, model.dtype).eval()


def check_compatible(controlnet: nn.Module, unet: nn.Module, name: str) -> None:
    """Refuse a ControlNet made for another Stable Diffusion family before it fails mid-run."""
    for key in ("cross_attention_dim", "block_out_channels"):
        mine = getattr(controlnet.config, key, None)
        theirs = getattr(unet.config, key, None)
        if (
            mine is not None
            and theirs is not None
            and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs))
        ):
            raise TokenFlowError(
                f"ControlNet {name} does not fit this model ({key} {mine} vs the UNet's {theirs});"
                " use a ControlNet trained for the same Stable Diffusion version as the `model`"
            )


def load_control(
    options: EditOptions, clip: VideoClip, model: DiffusionModel
) -> tuple[ControlNetCondition, dict[str, Any]]:
    """The ControlNet condition for ``options`` on ``clip`` and its identity for cache keys.

    The identity names the ControlNet, fingerprints its weights (like the model fingerprint),
    hashes the control images and records the scale: all of them change the inversion.
    """
    if not options.controlnet or not options.control:
        raise TokenFlowError("a ControlNet needs both `controlnet` and `control`")
    images = control_images(options, clip, model.device)
    controlnet = load_controlnet(options.controlnet, model)
    digest = hashlib.sha256(f"{images.shape}".encode())
    digest.update(images.tobytes())
    identity = {
        "controlnet": options.controlnet,
        "fingerprint": weights_fingerprint(controlnet),
        "control": options.control if options.control in CONTROL_KINDS else "images",
        "images": digest.hexdigest()[:16],
        "scale": float(options.control_scale),
    }
    return ControlNetCondition(controlnet, images, options.control_scale), identity
