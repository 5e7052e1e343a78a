"""Working size: how a displayed frame becomes the frame the engine sees.

The VAE needs sides that are multiples of 8, so sizes are checked here before any decoding, and
the resize follows the reference code: scale the whole frame first, then crop or pad.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import TokenFlowError

WARN_PIXELS = 1024 * 1024
MAX_PIXELS = 4096 * 4096
FITS = ("crop", "pad", "stretch")
RESAMPLERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def _nearest_multiple(value: float, multiple: int = 8) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _check_size(width: int, height: int) -> None:
    """Refuse sizes the VAE cannot take, naming the closest one it can."""
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise TokenFlowError(
            f"size {width}x{height} is not valid: both sides must be positive multiples of 8; "
            f"try {_nearest_multiple(width)}x{_nearest_multiple(height)}"
        )


def parse_size(text: str) -> tuple[int, int]:
    """Parse "512x320" into (W, H); the VAE needs multiples of 8, so others are refused here."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise TokenFlowError(f"cannot read size {text!r}: write it as WIDTHxHEIGHT, e.g. 512x320")
    width, height = int(match.group(1)), int(match.group(2))
    _check_size(width, height)
    return width, height


@dataclass(frozen=True)
class Resize:
    """How one displayed frame becomes one working frame: resize to ``scaled``, then crop/pad."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    target: tuple[int, int]
    fit: str
    resample: Image.Resampling

    @property
    def identity(self) -> bool:
        return self.source == self.scaled == self.target

    def describe(self) -> str | None:
        (sw, sh), (rw, rh), (tw, th) = self.source, self.scaled, self.target
        if self.identity:
            return None
        if self.fit == "stretch":
            return f"stretched {sw}x{sh} -> {tw}x{th} (aspect ratio not kept)"
        steps = [] if self.scaled == self.source else [f"resized {sw}x{sh} -> {rw}x{rh}"]
        if self.scaled != self.target:
            verb = "centre-cropped" if self.fit == "crop" else "padded with black"
            steps.append(f"{verb} to {tw}x{th}")
        return ", ".join(steps)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Resize the full frame first (as the reference code does), then crop or pad."""
        if self.identity:
            return frame
        if self.scaled != self.source:
            image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
            frame = np.array(image.resize(self.scaled, self.resample))
        (rw, rh), (tw, th) = self.scaled, self.target
        if (rw, rh) == (tw, th):
            return frame
        if self.fit == "crop":
            left, top = (rw - tw) // 2, (rh - th) // 2
            return np.ascontiguousarray(frame[top : top + th, left : left + tw])
        canvas = np.zeros((th, tw, 3), dtype=np.uint8)
        left, top = (tw - rw) // 2, (th - rh) // 2
        canvas[top : top + rh, left : left + rw] = frame
        return canvas


@dataclass(frozen=True)
class Sizing:
    """How displayed frames become working frames: an explicit ``size`` met by ``fit``, or the
    short side at ``short_side`` with both sides cut to multiples of ``multiple``."""

    size: tuple[int, int] | None
    fit: str = "crop"
    short_side: int = 512
    multiple: int = 64
    resample: str = "lanczos"

    def check(self) -> Sizing:
        """Validate before decoding, so a typo fails in milliseconds."""
        _check_sizing(self.size, self.fit, self.short_side, self.multiple, self.resample)
        return self

    def plan(self, source: tuple[int, int]) -> Resize:
        """How a displayed frame of ``source`` size (W, H) becomes the working frame."""
        return _plan_resize(source, self)

    def start(self, source: tuple[int, int], notes: list[str]) -> Resize:
        """``plan``, plus a note on the resize and a warning about a very large working size."""
        plan = self.plan(source)
        width, height = plan.target
        if width * height > WARN_PIXELS:
            message = (
                f"working size {width}x{height} is above 1024x1024 pixels: editing will be slow"
                " and may run out of GPU memory"
            )
            warnings.warn(message, stacklevel=5)
        description = plan.describe()
        if description:
            notes.append(description)
        return plan


def _check_sizing(
    size: tuple[int, int] | None, fit: str, short_side: int, multiple: int, resample: str
) -> None:
    if resample not in RESAMPLERS:
        raise TokenFlowError(
            f"unknown resample {resample!r}: choose one of {', '.join(sorted(RESAMPLERS))}"
        )
    if fit not in FITS:
        raise TokenFlowError(f"unknown fit {fit!r}: choose one of {', '.join(FITS)}")
    if size is not None:
        width, height = int(size[0]), int(size[1])
        _check_size(width, height)
        if width * height > MAX_PIXELS:
            raise _too_large(width, height)
        return
    for name, value in (("short_side", short_side), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
            raise TokenFlowError(
                f"{name}={value!r} is not valid: it must be a positive multiple of 8; "
                f"try {_nearest_multiple(float(value) if value else 8)}"
            )
    if short_side < multiple:
        raise TokenFlowError(
            f"short_side={short_side} is smaller than multiple={multiple}: raise short_side to at "
            f"least {multiple}"
        )


def _too_large(width: int, height: int) -> TokenFlowError:
    return TokenFlowError(
        f"working size {width}x{height} is too large (over 4096x4096 pixels): pass a smaller "
        "size or short_side"
    )


def _plan_resize(source: tuple[int, int], sizing: Sizing) -> Resize:
    """Work out how the displayed frame becomes the working frame (options already checked)."""
    sw, sh = source
    size, fit, short_side, multiple = sizing.size, sizing.fit, sizing.short_side, sizing.multiple
    if size is None:
        scale = short_side / min(sw, sh)
        scaled = (max(1, round(sw * scale)), max(1, round(sh * scale)))
        # The short side lands exactly on short_side whatever the rounding of the scale.
        scaled = (short_side, scaled[1]) if sw <= sh else (scaled[0], short_side)
        target = (scaled[0] // multiple * multiple, scaled[1] // multiple * multiple)
        fit = "crop"
    else:
        tw, th = int(size[0]), int(size[1])
        target = (tw, th)
        if fit == "stretch":
            scaled = target
        else:
            pick = max if fit == "crop" else min
            scale = pick(tw / sw, th / sh)
            scaled = (max(1, round(sw * scale)), max(1, round(sh * scale)))
            # Rounding must never leave a gap (crop) or overflow the canvas (pad).
            if fit == "crop":
                scaled = (max(scaled[0], tw), max(scaled[1], th))
            else:
                scaled = (min(scaled[0], tw), min(scaled[1], th))
            if sw * th == sh * tw:
                scaled = target
    if target[0] * target[1] > MAX_PIXELS:
        raise _too_large(*target)
    return Resize(source, scaled, target, fit, RESAMPLERS[sizing.resample])
