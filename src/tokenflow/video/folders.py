"""Frames folders: numbered image files (00000.png, 00001.png, ...) as a clip without a file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import TokenFlowError

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = 10.0
_EXIF_ORIENTATION = 0x0112
_FRAME_NAME = re.compile(r"^(\d+)(\.[A-Za-z]+)$")


def is_frame_file(path: Path) -> bool:
    match = _FRAME_NAME.match(path.name)
    return bool(match) and match.group(2).lower() in FRAME_EXTENSIONS and path.is_file()


def list_frame_files(folder: Path) -> list[Path]:
    """Numbered frames in numeric order; gaps, duplicates and mixed formats are user errors."""
    numbered: dict[int, Path] = {}
    suffixes: set[str] = set()
    for entry in folder.iterdir():
        match = _FRAME_NAME.match(entry.name)
        if not match or match.group(2).lower() not in FRAME_EXTENSIONS or not entry.is_file():
            continue
        number = int(match.group(1))
        if number in numbered:
            raise TokenFlowError(
                f"frames folder {folder} has two files for frame {number} "
                f"({numbered[number].name}, {entry.name}): keep one"
            )
        numbered[number] = entry
        suffixes.add(match.group(2).lower())
    if not numbered:
        raise TokenFlowError(
            f"frames folder {folder} has no numbered frames: expected 00000.png, 00001.png, ... "
            "(or .jpg/.jpeg)"
        )
    if len(suffixes) > 1:
        raise TokenFlowError(
            f"frames folder {folder} mixes {', '.join(sorted(suffixes))} files: convert them to "
            "one format"
        )
    numbers = sorted(numbered)
    for expected, number in enumerate(numbers, start=numbers[0]):
        if number != expected:
            raise TokenFlowError(
                f"frames folder {folder} is missing frame {expected} (found {numbers[0]}.."
                f"{numbers[-1]}): renumber the frames without gaps"
            )
    return [numbered[n] for n in numbers]


def load_image(path: Path) -> tuple[np.ndarray, bool, bool]:
    """8-bit RGB pixels of one frame file, plus whether it was EXIF-rotated or had alpha."""
    try:
        with Image.open(path) as opened:
            rotated = opened.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
            image = ImageOps.exif_transpose(opened)
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.uint32)
                image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
            return np.array(image.convert("RGB")), rotated, alpha
    except (OSError, ValueError) as error:
        raise TokenFlowError(f"cannot read frame {path}: {error}; replace the file") from error
