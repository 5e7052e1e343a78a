"""Warp error (Lai et al. 2018, as used by Pix2Video and TokenFlow; method doc, section 6).

Optical flow is computed on the *source* frames, the edited frame t+1 is warped back to t,
occluded pixels are masked by the forward/backward consistency rule, and the mean squared
difference (images in [0, 1]) is averaged over frame pairs. The paper uses RAFT; RAFT needs
torchvision and its weights on disk, so OpenCV's DIS flow is the always-available fallback (its
numbers are not comparable to the paper's). Pure functions of uint8 ``(N, H, W, 3)`` frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from tokenflow.errors import TokenFlowError

if TYPE_CHECKING:
    pass

FLOW_METHODS = ("dis", "raft")

# Lai et al. 2018 forward/backward consistency thresholds (method doc, section 6).
_OCCLUSION_ALPHA = 0.01
_OCCLUSION_BETA = 0.5

_RAFT_INSTALL_HINT = "pip install 'tokenflow[raft]'"
_RAFT_MIN_SIDE = 128  # torchvision RAFT: feature maps (1/8 scale) must be at least 16 px


# --------------------------------------------------------------------------- input checks


def _as_frames(frames: Any, name: str) -> np.ndarray:
    """Validate a clip as uint8 (N, H, W, 3) so every metric sees the same pixel convention."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise TokenFlowError(
            f"{name} must be RGB frames shaped (N, H, W, 3), got shape {tuple(arr.shape)}; "
            "stack the frames into one uint8 array"
        )
    if arr.dtype != np.uint8:
        raise TokenFlowError(
            f"{name} must be uint8 frames (0-255), got {arr.dtype}; convert with "
            "(x * 255).round().astype(np.uint8) if they are floats in [0, 1]"
        )
    return arr


def _check_flow(flow: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(flow, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise TokenFlowError(f"{name} must be a flow field shaped (H, W, 2), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------- optical flow


@dataclass(frozen=True)
class FlowChoice:
    """The flow method actually used, with the loaded RAFT model and why a fallback happened."""

    method: str
    raft_model: torch.nn.Module | None = None
    note: str = ""


def _import_raft_builders() -> tuple[Any, Any, Any, Any]:
    """Import torchvision's RAFT lazily: torchvision is an optional extra and may not import."""
    from torchvision.models.optical_flow import (  # type: ignore[import-not-found]
        Raft_Large_Weights,
        Raft_Small_Weights,
        raft_large,
        raft_small,
    )

    return raft_large, raft_small, Raft_Large_Weights, Raft_Small_Weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load RAFT weights without executing pickled code (weights_only / safetensors)."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/parsing failure means a bad file
        raise TokenFlowError(
            f"cannot read flow model {path} ({type(exc).__name__}); pass a torchvision RAFT "
            "state dict saved with torch.save(model.state_dict()) or a .safetensors file"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TokenFlowError(
            f"flow model {path} does not hold a state dict; save it with "
            "torch.save(raft.state_dict(), PATH)"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


class RaftUnavailableError(TokenFlowError):
    """RAFT cannot run here (no torchvision, or no local weights): callers may fall back to DIS."""


def load_raft(flow_model: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
    """Build torchvision RAFT from local weights only; never downloads.

    ``flow_model`` is a state-dict file (``.pth``/``.pt`` loaded with ``weights_only=True``, or
    ``.safetensors``) for ``raft_large`` or ``raft_small``. Without it, the weights must already be
    in torchvision's cache (``torch.hub.get_dir()/checkpoints``). Raises
    :class:`RaftUnavailableError` when torchvision or the cached weights are missing, and
    :class:`TokenFlowError` for a bad file.
    """
    try:
        raft_large, raft_small, large_w, small_w = _import_raft_builders()
    except Exception as exc:  # a broken torchvision is just unavailable
        raise RaftUnavailableError(
            f"torchvision does not import here ({type(exc).__name__}); install it with "
            f"{_RAFT_INSTALL_HINT} or use DIS flow"
        ) from exc

    builders = [raft_large, raft_small]
    if flow_model is not None:
        path = Path(flow_model).expanduser()
        if not path.is_file():
            raise TokenFlowError(
                f"flow model file {path} does not exist; pass the path of a torchvision RAFT "
                "state dict (.pth or .safetensors)"
            )
        state = _read_state_dict(path)
        for build in builders:
            model = build(weights=None, progress=False)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError:
                continue
            return model.to(device).eval()
        raise TokenFlowError(
            f"flow model {path} matches neither torchvision raft_large nor raft_small; pass the "
            "state dict of torchvision.models.optical_flow.raft_large/raft_small"
        )

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for build, weights_enum in zip(builders, (large_w, small_w), strict=True):
        cached = checkpoints / os.path.basename(weights_enum.DEFAULT.url)
        if cached.is_file():
            model = build(weights=None, progress=False)
            model.load_state_dict(_read_state_dict(cached), strict=True)
            return model.to(device).eval()
    raise RaftUnavailableError(
        f"RAFT weights are not in torchvision's cache ({checkpoints}) and no flow model file was "
        "given; pass a RAFT state dict as the flow model or use DIS flow"
    )


def resolve_flow(
    method: str | None = None,
    flow_model: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FlowChoice:
    """Pick the flow method: RAFT when asked for (or by default) and usable locally, else DIS.

    ``method=None`` means "RAFT if available". A RAFT request that cannot be met here falls back to
    DIS with the reason in ``note`` rather than failing, because warp error is still informative; a
    ``flow_model`` file that is missing or unreadable is a user mistake and raises.
    """
    if method is not None and method not in FLOW_METHODS:
        raise TokenFlowError(
            f"unknown flow method {method!r}; use one of {', '.join(FLOW_METHODS)}"
        )
    if flow_model is not None and not Path(flow_model).expanduser().is_file():
        raise TokenFlowError(
            f"flow model file {flow_model} does not exist; pass the path of a torchvision RAFT "
            "state dict (.pth or .safetensors), or none to use torchvision's cache"
        )
    if method == "dis":
        return FlowChoice("dis")
    try:
        model = load_raft(flow_model, device)
    except RaftUnavailableError as exc:
        return FlowChoice("dis", note=f"RAFT unavailable, used DIS: {exc}")
    return FlowChoice("raft", raft_model=model)


def _dis_flow(frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    out = np.empty(frames_a.shape[:3] + (2,), dtype=np.float32)
    for i, (a, b) in enumerate(zip(frames_a, frames_b, strict=True)):
        gray_a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
        gray_b = cv2.cvtColor(np.ascontiguousarray(b), cv2.COLOR_RGB2GRAY)
        out[i] = dis.calc(gray_a, gray_b, None)
    return out


def _raft_flow(
    frames_a: np.ndarray, frames_b: np.ndarray, raft_model: Any, batch_size: int = 4
) -> np.ndarray:
    """Run RAFT on padded frames, cropping the result back.

    torchvision's RAFT needs sides that are multiples of 8 and at least 128 px (its correlation
    pyramid downsamples the 1/8 feature maps 3 more times), so small frames are edge-padded.
    """
    param = next(iter(raft_model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    n, h, w = frames_a.shape[:3]
    pad_h = max(_RAFT_MIN_SIDE, h + (-h) % 8) - h
    pad_w = max(_RAFT_MIN_SIDE, w + (-w) % 8) - w
    out = np.empty((n, h, w, 2), dtype=np.float32)

    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float()
        t = t / 127.5 - 1.0  # RAFT expects [-1, 1]
        if pad_h or pad_w:
            t = F.pad(t, (0, pad_w, 0, pad_h), mode="replicate")
        return t

    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            preds = raft_model(prep(frames_a[start:stop]), prep(frames_b[start:stop]))
            flow = preds[-1] if isinstance(preds, (list, tuple)) else preds
            flow = flow[:, :, :h, :w].permute(0, 2, 3, 1).float().cpu().numpy()
            out[start:stop] = flow
    return out


def compute_flow(
    frames_a: np.ndarray,
    frames_b: np.ndarray,
    method: str = "dis",
    raft_model: Any = None,
) -> np.ndarray:
    """Optical flow from each ``frames_a[i]`` to ``frames_b[i]``, shaped (N, H, W, 2) in pixels.

    Convention: ``frames_a[i](x) ~ frames_b[i](x + flow[i](x))``, channel 0 = x (right), 1 = y
    (down). ``method="dis"`` uses OpenCV DIS (preset medium) on grayscale; ``method="raft"`` uses
    ``raft_model`` or, if none is given, torchvision RAFT from local weights (raises if missing).
    """
    a = _as_frames(frames_a, "frames_a")
    b = _as_frames(frames_b, "frames_b")
    if a.shape != b.shape:
        raise TokenFlowError(
            f"flow needs two clips of the same shape, got {a.shape} and {b.shape}; resize one"
        )
    if method == "dis":
        return _dis_flow(a, b)
    if method == "raft":
        model = raft_model if raft_model is not None else load_raft()
        return _raft_flow(a, b, model)
    raise TokenFlowError(f"unknown flow method {method!r}; use one of {', '.join(FLOW_METHODS)}")


def pair_flows(
    frames: np.ndarray, method: str = "dis", raft_model: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Forward (t -> t+1) and backward (t+1 -> t) flows between consecutive frames of one clip."""
    clip = _as_frames(frames, "frames")
    if len(clip) < 2:
        raise TokenFlowError(f"warp error needs at least 2 frames, got {len(clip)}")
    forward = compute_flow(clip[:-1], clip[1:], method, raft_model)
    backward = compute_flow(clip[1:], clip[:-1], method, raft_model)
    return forward, backward


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``image`` by ``flow``: ``out(x) = image(x + flow(x))``, bilinear, float32.

    With the forward flow t -> t+1 this brings frame t+1 onto frame t's pixel grid. Samples outside
    the image repeat the border (those pixels are masked by :func:`occlusion_mask`). OpenCV
    interpolates at 1/32-pixel resolution, far below DIS/RAFT flow error.
    """
    flow = _check_flow(flow, "flow")
    img = np.asarray(image, dtype=np.float32)
    if img.shape[:2] != flow.shape[:2]:
        raise TokenFlowError(
            f"image {img.shape[:2]} and flow {flow.shape[:2]} differ in size; resize the image"
        )
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0]
    map_y = grid_y + flow[..., 1]
    return cv2.remap(
        np.ascontiguousarray(img), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def occlusion_mask(
    flow_fw: np.ndarray, flow_bw: np.ndarray, out_of_frame: bool = True
) -> np.ndarray:
    """Boolean (H, W) mask of pixels of frame t with no reliable match in frame t+1.

    Lai et al. 2018 rule: occluded where
    ``|f_fw + w(f_bw)|^2 > 0.01 (|f_fw|^2 + |w(f_bw)|^2) + 0.5``, with ``w(f_bw)`` the backward
    flow warped onto frame t. With ``out_of_frame`` (default), pixels whose forward flow leaves the
    image are masked too, since they have no correspondence at all.
    """
    fw = _check_flow(flow_fw, "flow_fw")
    bw = _check_flow(flow_bw, "flow_bw")
    if fw.shape != bw.shape:
        raise TokenFlowError(f"forward flow {fw.shape} and backward flow {bw.shape} differ")
    bw_warped = warp(bw, fw)
    mismatch = np.sum((fw + bw_warped) ** 2, axis=-1)
    magnitude = np.sum(fw**2, axis=-1) + np.sum(bw_warped**2, axis=-1)
    occluded = mismatch > _OCCLUSION_ALPHA * magnitude + _OCCLUSION_BETA
    if out_of_frame:
        h, w = fw.shape[:2]
        grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
        tx = grid_x + fw[..., 0]
        ty = grid_y + fw[..., 1]
        # Pixel centres are at integers, so a pixel's area ends half a pixel past the last centre.
        occluded |= (tx < -0.5) | (tx > w - 0.5) | (ty < -0.5) | (ty > h - 0.5)
    return occluded


@dataclass(frozen=True)
class WarpErrorResult:
    """Mean warp error over frame pairs, each pair's value, and how the flow was obtained."""

    mean: float
    per_pair: list[float] = field(default_factory=list)
    flow_method: str = "dis"
    note: str = ""


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 frames to (width, height) with Lanczos, as the evaluation uses."""
    from PIL import Image

    width, height = size
    if frames.shape[2] == width and frames.shape[1] == height:
        return frames
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS))
            for f in frames
        ]
    )


def warp_error_from_flows(
    edited_frames: np.ndarray, flow_fw: np.ndarray, flow_bw: np.ndarray
) -> list[float]:
    """Per-pair warp errors of an edited clip given the source's consecutive flows.

    NaN for a pair whose every pixel is occluded (it carries no information).
    """
    edited = _as_frames(edited_frames, "edited_frames")
    if flow_fw.shape[0] != len(edited) - 1 or flow_fw.shape[1:3] != edited.shape[1:3]:
        raise TokenFlowError(
            f"flows {flow_fw.shape} do not fit {len(edited)} edited frames of size "
            f"{edited.shape[1:3]}; compute them on the source resized to the edited size"
        )
    errors: list[float] = []
    for t in range(len(edited) - 1):
        valid = ~occlusion_mask(flow_fw[t], flow_bw[t])
        if not valid.any():
            errors.append(float("nan"))
            continue
        current = edited[t].astype(np.float32) / 255.0
        warped_next = warp(edited[t + 1].astype(np.float32) / 255.0, flow_fw[t])
        sq = (current - warped_next) ** 2
        errors.append(float(sq[valid].mean()))
    return errors


def warp_error(
    source_frames: np.ndarray,
    edited_frames: np.ndarray,
    flow: str = "dis",
    raft_model: Any = None,
    flow_model: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> WarpErrorResult:
    """Warp error of an edit, with flow taken from the source clip (lower is more consistent).

    The source is resized to the edited size (Lanczos) before computing flows, so edits at any
    resolution can be scored. ``flow="raft"`` without a usable RAFT falls back to DIS and says so in
    ``note``.
    """
    source = _as_frames(source_frames, "source_frames")
    edited = _as_frames(edited_frames, "edited_frames")
    if len(source) != len(edited):
        raise TokenFlowError(
            f"source has {len(source)} frames but the edit has {len(edited)}; pass the source "
            "frames that the edit was made from"
        )
    if len(edited) < 2:
        raise TokenFlowError(f"warp error needs at least 2 frames, got {len(edited)}")
    source = resize_frames(source, (edited.shape[2], edited.shape[1]))
    if raft_model is not None:
        choice = FlowChoice("raft", raft_model=raft_model)
    else:
        choice = resolve_flow(flow, flow_model, device)
    flow_fw, flow_bw = pair_flows(source, choice.method, choice.raft_model)
    per_pair = warp_error_from_flows(edited, flow_fw, flow_bw)
    finite = [e for e in per_pair if np.isfinite(e)]
    mean = float(np.mean(finite)) if finite else float("nan")
    note = choice.note
    skipped = len(per_pair) - len(finite)
    if skipped:
        note = (note + "; " if note else "") + f"{skipped} fully occluded pair(s) left out"
    return WarpErrorResult(mean, per_pair, choice.method, note)
