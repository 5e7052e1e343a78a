"""The output folder: where an edit may write, and writing it all at once.

An output folder is built in a hidden staging folder beside it and renamed into place when
complete, so a failed or interrupted run leaves nothing half-written. It may never be, contain
or lie inside anything the run reads (the input, the cache, the model), and an existing folder
is replaced only when asked and only when it is an earlier output or empty: a mistyped path
must never cost the user a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import make_staging_folder, remove_staging, replace_folder
from .errors import TokenFlowError
from .video import VideoClip, write_frames, write_gif, write_side_by_side, write_video

RUN_FILE = "run.json"


def is_earlier_output(folder: Path) -> bool:
    """A folder an edit wrote: it holds our ``run.json`` (an object naming a tokenflow version)."""
    try:
        data = json.loads((folder / RUN_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "tokenflow" in data


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


def check_output_folder(out: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Fail before any heavy work if the results could not, or must not, be written there.

    ``protected`` names what the run reads (input, cache, model ...): the output folder may
    never be one of them, hold one or lie inside one, whatever ``overwrite`` says.
    """
    target = out.expanduser().resolve()
    for what, path in protected.items():
        relation = _relation(target, path.expanduser().resolve())
        if relation is not None:
            raise TokenFlowError(
                f"the output folder {out} {relation} the {what} ({path}); writing there could"
                " destroy it, so pick an `out` folder elsewhere"
            )
    if out.exists() and not out.is_dir():
        raise TokenFlowError(f"the output {out} is a file; give a folder path as `out`")
    if out.exists():
        if not overwrite:
            raise TokenFlowError(
                f"output folder {out} already exists; set `overwrite` or pick another `out`"
            )
        if any(out.iterdir()) and not is_earlier_output(out):
            raise TokenFlowError(
                f"{out} is not an earlier tokenflow output (it has no {RUN_FILE} of ours) and is"
                " not empty; it is never replaced, so pick another `out` folder"
            )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TokenFlowError(f"cannot create {out}: {ancestor} is a file; pick another `out`")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TokenFlowError(f"cannot write to {ancestor}: permission denied; pick another `out`")


def write_outputs(
    out: Path,
    clip: VideoClip,
    edited: np.ndarray,
    info: dict[str, Any],
    *,
    audio: bool,
    gif: bool,
    progress: Callable[[int, int], None] | None = None,
    finish: Callable[[], None] | None = None,
) -> list[str]:
    """Write every output into a staging folder, then move it to ``out`` in one rename.

    The videos keep the clip's timing (constant or per-frame) and its sound, in sync. Missing
    parent folders are created, and removed again if the write fails. ``finish`` runs just
    before ``run.json`` is written (to add the write time to ``info``). Returns notes about the
    sound (time-stretched, or dropped and why), also recorded in ``run.json``.
    """
    n = len(edited)
    total = n * (4 if gif else 3)
    done = 0

    def part(offset: int) -> Callable[[int, int], None] | None:
        """``progress`` for one output, counted within all of them."""
        if progress is None:
            return None
        return lambda frames_done, _: progress(offset + frames_done, total)

    created = _make_parents(out)
    try:
        staging = make_staging_folder(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        sound = dict(audio_source=clip.source if audio and clip.has_audio else None)
        sound["audio_span"] = clip.audio_span
        notes = write_video(
            staging / "edited.mp4", edited, **clip.timing, **sound, progress=part(done)
        )
        done += n
        write_side_by_side(
            staging / "side_by_side.mp4",
            clip.frames,
            edited,
            **clip.timing,
            **sound,
            progress=part(done),
        )
        done += n
        write_frames(staging / "frames", edited, progress=part(done))
        done += n
        if gif:
            write_gif(staging / "edited.gif", edited, **clip.timing, progress=part(done))
        info["output_notes"] = notes
        if finish is not None:
            finish()
        (staging / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n", "utf-8")
        replace_folder(staging, out)
    except BaseException:
        remove_staging(staging)
        _remove_empty(created)
        raise
    return notes


def _make_parents(out: Path) -> list[Path]:
    """Create ``out``'s missing parents; returns them, deepest first."""
    missing = []
    parent = out.resolve().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
