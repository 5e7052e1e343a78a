"""Which frames an evaluation compares: the edits as written, and the source frames each edit
was made from, read by the same reader as ``tokenflow edit`` with the edit's own selection and
sizing (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.errors import TokenFlowError
from tokenflow.options import FIELD_INFO, EditOptions
from tokenflow.video import read_clip

FITS = FIELD_INFO["fit"].choices or ()
# Numbered frame files, as read_clip reads them from a folder.
_FRAME_FILE = re.compile(r"^\d+\.(png|jpe?g)$", re.IGNORECASE)


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise TokenFlowError(f"unknown fit {fit!r}; use one of {', '.join(FITS)}")


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """read_clip warns that big working sizes make *editing* slow; scoring them is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"working size .* is above")
        yield


def _displayed(path: Path, max_frames: int | None = None) -> Any:
    """A video or frames folder as shown (display rotation applied), without any resampling.

    Sizes must be multiples of 8 (what ``tokenflow edit`` produces and ``read_clip`` works at).
    """
    with _reading():
        width, height = read_clip(path, max_frames=1, short_side=64).source_size
        if width % 8 or height % 8:
            raise TokenFlowError(
                f"{path} is {width}x{height}, but videos are scored at sizes that are multiples "
                f"of 8 (as tokenflow edit makes them); resize it, e.g. to "
                f"{max(8, width // 8 * 8)}x{max(8, height // 8 * 8)}"
            )
        return read_clip(path, max_frames=max_frames, size=(width, height))


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Frames of a video or frames folder at their displayed size, uint8 (N, H, W, 3)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenFlowError(
            f"{p} does not exist; pass a video file or a folder of numbered frames"
        )
    return _displayed(p, max_frames).frames


def _has_frame_files(folder: Path) -> bool:
    return any(_FRAME_FILE.match(entry.name) for entry in folder.iterdir())


@dataclass
class EditedClip:
    """An edited video to score: its frames, label and its ``run.json`` ({} when it has none)."""

    path: Path
    label: str
    frames: np.ndarray
    frame_indices: list[int] | None = None
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the edited frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def _label_from_run(run: dict[str, Any], fallback: str) -> str:
    parts = [str(run[k]) for k in ("method", "baseline") if run.get(k) not in (None, "")]
    return " / ".join(parts) if parts else fallback


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenFlowError(f"cannot read {path} ({exc}); fix or remove the file") from exc
    if not isinstance(data, dict):
        raise TokenFlowError(f"{path} must hold a JSON object; fix or remove the file")
    return data


def load_edited(path: str | Path) -> EditedClip:
    """Load a ``tokenflow edit`` output folder (frames/ preferred, else edited.mp4) or a video.

    Lossless ``frames/*.png`` are preferred over the mp4 so compression does not add warp error.
    Frames are read at their displayed size.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenFlowError(
            f"edited video {p} does not exist; pass a `tokenflow edit` output folder or a video"
        )
    if p.is_file():
        return EditedClip(p, p.stem, _displayed(p).frames)

    run_path = p / "run.json"
    run = _read_run_json(run_path) if run_path.is_file() else {}
    frames_dir = p / "frames"
    if frames_dir.is_dir() and _has_frame_files(frames_dir):
        frames = _displayed(frames_dir).frames
    elif (p / "edited.mp4").is_file():
        frames = _displayed(p / "edited.mp4").frames
    elif _has_frame_files(p):
        frames = _displayed(p).frames
    else:
        raise TokenFlowError(
            f"{p} has no frames/ folder, edited.mp4 or numbered frames; pass a `tokenflow edit` "
            "output folder or a video file"
        )

    indices = run.get("frame_indices")
    if indices is not None:
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            raise TokenFlowError(
                f"{run_path}: frame_indices must be a list of source frame numbers (ints >= 0)"
            )
        if len(indices) != len(frames):
            raise TokenFlowError(
                f"{run_path} lists {len(indices)} frame_indices but {p} has {len(frames)} frames; "
                "re-export the edit or fix run.json"
            )
    return EditedClip(p, _label_from_run(run, p.name), frames, indices, run)


@dataclass
class SourceFrames:
    """The source frames an edit was made from, read as the edit read them."""

    frames: np.ndarray
    frame_indices: list[int]
    how: str  # for the table's footer
    key: tuple[Any, ...]  # the same key means the same frames (flows are shared)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def _span(indices: list[int]) -> str:
    if len(indices) > 2:
        step = indices[1] - indices[0]
        if step > 0 and all(b - a == step for a, b in zip(indices, indices[1:], strict=False)):
            stride = f" (every {step})" if step > 1 else ""
            return f"frames {indices[0]}..{indices[-1]}{stride}"
    return "frames " + ", ".join(map(str, indices))


def _read_source(source: Path, options: dict[str, Any], cache: dict[Any, Any] | None) -> Any:
    key = tuple(sorted(options.items()))
    if cache is not None and key in cache:
        return cache[key]
    with _reading():
        clip = read_clip(source, **options)
    if cache is not None:
        cache[key] = clip
    return clip


def source_frames_for(
    edited: EditedClip,
    source: str | Path,
    fit: str = "crop",
    _cache: dict[Any, Any] | None = None,
) -> SourceFrames:
    """The frames of ``source`` that ``edited`` was made from, at the edit's geometry.

    - run.json with a ``config`` section (a ``tokenflow edit`` output): the source is re-read with
      the edit's own selection and sizing; the frame count, size and ``frame_indices`` must then
      match the edit's, else the source is not the one the edit was made from.
    - run.json with ``frame_indices`` only: those frames, brought to the edit's size with ``fit``.
    - no run.json: the source from its first frame, brought to the edit's size with ``fit``
      (``crop``, ``pad`` or ``stretch``); it must have exactly as many frames as the edit.
    """
    source = Path(source).expanduser()
    check_fit(fit)
    count = len(edited.frames)
    width, height = edited.size
    run_path = edited.path / "run.json"
    config = edited.run.get("config")

    if isinstance(config, dict):
        options = EditOptions.from_mapping(config, where=str(run_path)).reader_kwargs()
        clip = _read_source(source, options, _cache)
        got_w, got_h = clip.size
        if len(clip) != count or (got_w, got_h) != (width, height):
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} gives {len(clip)} "
                f"frames of {got_w}x{got_h} but the edit has {count} frames of {width}x{height}; "
                "pass the source the edit was made from"
            )
        if edited.frame_indices is not None and list(clip.frame_indices) != edited.frame_indices:
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} selects source "
                f"{_span(list(clip.frame_indices))} but run.json lists "
                f"{_span(edited.frame_indices)}; pass the source the edit was made from"
            )
        recorded = edited.run.get("input") if isinstance(edited.run.get("input"), dict) else {}
        recorded_size = recorded.get("size")
        if isinstance(recorded_size, list) and recorded_size != [got_w, got_h]:
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} gives frames of "
                f"{got_w}x{got_h} but run.json records {recorded_size}; pass the source the "
                "edit was made from"
            )
        indices = list(clip.frame_indices)
        how = f"source {_span(indices)} read as the edit read them (run.json)"
        made_from = recorded.get("path")
        if isinstance(made_from, str) and Path(made_from).name != source.name:
            how += f"; run.json says it was made from {made_from}"
        return SourceFrames(clip.frames, indices, how, ("run", tuple(sorted(options.items()))))

    if edited.frame_indices is not None:
        wanted = edited.frame_indices
        options = {
            "start": min(wanted, default=0),
            "end": max(wanted, default=0) + 1,
            "size": (width, height),
            "fit": fit,
        }
        clip = _read_source(source, options, _cache)
        position = {index: i for i, index in enumerate(clip.frame_indices)}
        missing = [i for i in wanted if i not in position]
        if missing:
            raise TokenFlowError(
                f"{edited.path} uses source frame {max(missing)} but the source has only "
                f"{clip.frame_indices[-1] + 1} frames; pass the source the edit was made from"
            )
        frames = clip.frames[[position[i] for i in wanted]]
        how = (
            f"run.json has no config: source {_span(wanted)} it lists, brought to "
            f"{width}x{height} with fit {fit}"
        )
        key = ("indices", tuple(wanted), width, height, fit)
        return SourceFrames(frames, list(wanted), how, key)

    options = {"max_frames": count + 1, "size": (width, height), "fit": fit}
    clip = _read_source(source, options, _cache)
    if len(clip) != count:
        found = len(clip) if len(clip) < count else f"more than {count}"
        raise TokenFlowError(
            f"{edited.path} has {count} frames but the source has {found}, and no run.json says "
            "which source frames were edited; pass a `tokenflow edit` output folder, or trim the "
            "source to the edited frames"
        )
    indices = list(clip.frame_indices[:count])
    how = f"no run.json: source {_span(indices)} brought to {width}x{height} with fit {fit}"
    return SourceFrames(clip.frames, indices, how, ("plain", count, width, height, fit))
