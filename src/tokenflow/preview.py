"""A preview: a fast look at an edit before paying for the whole clip.

K evenly spaced frames of the clip are edited as one block with extended attention -- the
joint keyframe edit at the heart of TokenFlow, without the propagation to the other frames --
with the same prompts, seed and injection as the full edit. A frame's inversion does not
depend on the frames inverted with it, so the K frames' inversion is sliced from the cached
whole-clip inversion when there is one, else computed for them alone (K/N of the inversion).
Editing costs 3·K UNet frame-evaluations per step, K/N of the full edit's per-frame denoising.

``preview_edit`` is the Python API (frames in memory); ``run_preview`` is the job behind
``tokenflow edit ... --preview [K]``: it writes a contact sheet (source | edited for each chosen
frame), the K edited frames and a ``run.json`` that states what the full edit will cost, in UNet
evaluations (exact) and seconds (extrapolated from the preview's measured rates).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import atomic_folder
from .control import ControlCondition
from .errors import TokenFlowError
from .inversion import Inversion, edit_timesteps
from .keyframes import block_bounds
from .methods import method_for, structure_for
from .options import EditOptions
from .outputs import RUN_FILE
from .pipeline import EditResult, edit_options
from .progress import ProgressCallback, StageProgress

if TYPE_CHECKING:
    from .families import DiffusionModel
    from .job import JobReport, Log
    from .pipeline import TokenFlowPipeline

SHEET_FILE = "contact_sheet.png"
SHEET_COLUMNS = 3  # (source | edited) pairs per row of the contact sheet
SHEET_CELL = 256  # the long side of a frame on the contact sheet, at most


def preview_count(n_frames: int, options: EditOptions) -> int:
    """K: ``options.preview``, or (0) the full edit's keyframe count; at most the clip."""
    wanted = options.preview or len(block_bounds(n_frames, options.block_size))
    return max(1, min(wanted, n_frames))


def preview_frames(n_frames: int, k: int) -> list[int]:
    """K evenly spaced frame positions from the first to the last (the middle one for K=1)."""
    if n_frames < 1:
        raise ValueError("a clip has at least one frame")
    k = max(1, min(int(k), n_frames))
    if k == 1:
        return [(n_frames - 1) // 2]
    # spacing (N-1)/(K-1) >= 1, so rounding never picks a frame twice
    return [round(i * (n_frames - 1) / (k - 1)) for i in range(k)]


def preview_options(options: EditOptions, k: int) -> EditOptions:
    """The preview's settings: the K frames form one block edited with extended attention."""
    return options.replace(
        baseline="extended-attention", block_size=k, max_keyframes=0, preview=None
    )


def steps_run(model: DiffusionModel, options: EditOptions) -> int:
    """Editing steps the method runs (SDEdit starts part-way)."""
    return (
        len(edit_timesteps(model.new_scheduler(), options.steps)) - method_for(options).first_step()
    )


def planned_evaluations(
    n_frames: int, options: EditOptions, steps: int, inversion: bool = True
) -> dict[str, int]:
    """UNet frame-evaluations an edit of ``n_frames`` will take, counted as ``EditResult`` does
    (three branches per frame of every pass, and ``inversion_steps`` per frame unless the
    inversion is cached), from the structure's own passes: exact, and nothing is run."""
    structure = structure_for(n_frames, options)
    counts = {"inversion": n_frames * options.inversion_steps if inversion else 0}
    counts.update(dict.fromkeys(structure.counters, 0))
    for _ in range(steps):
        for unet_pass in structure.step():
            counts[unet_pass.kind] = counts.get(unet_pass.kind, 0) + 3 * len(unet_pass.frames)
    return counts


def editing(evaluations: dict[str, int]) -> int:
    """The denoising part of an evaluation count (everything but the inversion)."""
    return sum(v for k, v in evaluations.items() if k != "inversion")


@dataclass
class Preview:
    """A preview's frames and what the full edit will cost."""

    indices: list[int]  # the clip positions of the previewed frames
    result: EditResult  # the K edited frames (``result.frames``) and what they cost
    n_frames: int  # frames of the full edit
    full_evaluations: dict[str, int]  # UNet frame-evaluations of the full edit
    estimate_s: float | None  # the full edit's time, extrapolated from the preview's rates

    def report(self) -> dict[str, Any]:
        """run.json's ``preview`` section."""
        preview = editing(self.result.unet_evaluations)
        full = editing(self.full_evaluations)
        return {
            "frames": self.indices,
            "k": len(self.indices),
            "clip_frames": self.n_frames,
            "unet_frame_evaluations": self.result.unet_evaluations,
            "editing_fraction_of_full": round(preview / full, 4) if full else None,
            "full_edit": {
                "unet_frame_evaluations": self.full_evaluations,
                "total": sum(self.full_evaluations.values()),
                "estimated_seconds": None if self.estimate_s is None else round(self.estimate_s, 1),
            },
        }

    def note(self) -> str:
        """One line on the cost, for a front end to show beside the frames."""
        k, n = len(self.indices), self.n_frames
        preview = sum(self.result.unet_evaluations.values())
        full = sum(self.full_evaluations.values())
        took = sum(self.result.timings.get(s, 0.0) for s in _TIMED)
        line = (
            f"preview: {k} of {n} frames, {preview} UNet frame-evaluations in {took:.1f} s;"
            f" the full edit: {full} evaluations"
        )
        if self.estimate_s is not None:
            line += f", about {_duration(self.estimate_s)} (extrapolated from the preview)"
        return line


_TIMED = ("encode", "inversion", "denoise", "decode")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_seconds(
    result: EditResult, k: int, n_frames: int, full: dict[str, int]
) -> float | None:
    """The full edit's time at the preview's measured rates: seconds per UNet evaluation of the
    editing (and of the inversion, when the preview ran one) and per frame of the VAE."""
    timings, counts = result.timings, result.unet_evaluations
    edited = editing(counts)
    if not edited or not timings.get("denoise"):
        return None
    per_edit = timings["denoise"] / edited
    per_invert = timings["inversion"] / counts["inversion"] if counts.get("inversion") else per_edit
    per_frame = (timings.get("encode", 0.0) + timings.get("decode", 0.0)) / k
    return n_frames * per_frame + full["inversion"] * per_invert + editing(full) * per_edit


def _remap(control: ControlCondition | None, indices: list[int]) -> ControlCondition | None:
    """ControlNet conditioning of the chosen frames (it looks control images up by position)."""
    if control is None:
        return None
    positions = torch.tensor(indices)

    def chosen(latents, t, conditioning, frames):
        return control(latents, t, conditioning, positions[frames.cpu()])

    return chosen


def preview_edit(
    pipe: TokenFlowPipeline,
    frames: np.ndarray,
    options: EditOptions | None = None,
    *,
    indices: list[int] | None = None,
    inversion: Inversion | None = None,
    control: ControlCondition | None = None,
    progress: ProgressCallback | None = None,
    inversion_cached: bool = False,
    **overrides: Any,
) -> Preview:
    """Edit K evenly spaced frames of ``frames`` ((N, H, W, 3) uint8) jointly.

    K is ``options.preview`` (0 or None: the full edit's keyframe count), or the length of
    ``indices`` when they are given. ``inversion`` may hold all N frames (the K are sliced from
    it) or the K chosen ones; without it they are inverted alone. ``inversion_cached`` says the
    full edit will find the whole clip's inversion in the cache (its cost leaves it out).
    """
    options = edit_options(options, overrides)
    n = len(frames)
    if indices is None:
        indices = preview_frames(n, preview_count(n, options))
    k = len(indices)
    if inversion is not None:
        held = len(inversion.final)
        if held == n and k != n:
            inversion = inversion.select(indices)
        elif held != k:
            raise TokenFlowError(
                f"the inversion holds {held} frames: give the whole clip's ({n}) or the chosen"
                f" frames' ({k})"
            )
        inversion_cached = inversion_cached or held == n
    result = pipe(
        np.ascontiguousarray(frames[indices]),
        preview_options(options, k),
        inversion=inversion,
        control=_remap(control, indices),
        progress=progress,
    )
    full = planned_evaluations(
        n, options.replace(preview=None), steps_run(pipe.model, options), not inversion_cached
    )
    return Preview(list(indices), result, n, full, estimate_seconds(result, k, n, full))


def contact_sheet(
    sources: np.ndarray, edited: np.ndarray, labels: list[str], columns: int = SHEET_COLUMNS
) -> Image.Image:
    """(source | edited) pairs in a grid, each frame at most ``SHEET_CELL`` pixels, labelled."""
    height, width = sources.shape[1:3]
    scale = min(1.0, SHEET_CELL / max(height, width))
    cell = (max(1, round(width * scale)), max(1, round(height * scale)))
    gap, caption = 8, 16
    columns = max(1, min(columns, len(sources)))
    rows = math.ceil(len(sources) / columns)
    pair_w, pair_h = 2 * cell[0] + gap // 2, cell[1] + caption
    sheet = Image.new(
        "RGB", (columns * (pair_w + gap) + gap, rows * (pair_h + gap) + gap), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for i, (source, result, label) in enumerate(zip(sources, edited, labels, strict=True)):
        left = gap + (i % columns) * (pair_w + gap)
        top = gap + (i // columns) * (pair_h + gap)
        for j, frame in enumerate((source, result)):
            image = Image.fromarray(frame, "RGB").resize(cell, Image.Resampling.LANCZOS)
            sheet.paste(image, (left + j * (cell[0] + gap // 2), top))
        draw.text((left, top + cell[1] + 2), label, fill=(40, 40, 40))
    return sheet


def run_preview(
    options: EditOptions,
    progress: ProgressCallback | None = None,
    log: Log = print,
    model: DiffusionModel | None = None,
) -> JobReport:
    """``tokenflow edit ... --preview [K]``: preview an edit and write its folder (see the
    module docstring). The K frames' inversion is cached under their own key when it was
    computed, so previewing another prompt on the same clip skips it too."""
    from .job import JobReport, frames_key, preflight, prepare, run_info

    preflight(options)
    options.warn_about_weak_settings()
    started = time.perf_counter()
    job = prepare(options, progress, log, model)
    clip, pipe = job.clip, job.pipe
    n = len(clip)
    indices = preview_frames(n, preview_count(n, options))
    subset_key = frames_key(
        options, clip.frames[indices], pipe.model, job.fingerprint, job.control_identity
    )
    inversion, status = None, "disabled"
    if options.cache:
        inversion, status = job.cache.load(job.key, dtype=pipe.dtype), "hit (whole clip)"
        if inversion is None:
            inversion, status = job.cache.load(subset_key, dtype=pipe.dtype), "hit"
        status = status if inversion is not None else "miss"
    log(f"preview: {len(indices)} of {n} frames ({', '.join(map(str, indices))})")
    log(f"inversion cache: {status}")
    if inversion is not None:
        StageProgress(progress, "invert", 0)
    preview = preview_edit(
        pipe, clip.frames, options, indices=indices, inversion=inversion, control=job.control,
        progress=progress, inversion_cached=status == "hit (whole clip)",
    )  # fmt: skip
    if options.cache and inversion is None:
        width, height = clip.size
        meta = {"model": options.model, "prompt": options.inversion_prompt, "frames": len(indices)}
        meta.update(size=f"{width}x{height}", source=f"{clip.source} (preview frames)")
        job.cache.save(subset_key, preview.result.inversion, meta)
    info = run_info(options, job, status, preview.result)
    info["preview"] = preview.report()
    info["preview"]["note"] = preview.note()
    info["wall_time_s"] = round(time.perf_counter() - started, 4)  # the write excluded
    write_preview(Path(options.out), clip.frames[indices], preview, info, progress)
    log(preview.note())
    return JobReport(Path(options.out), clip, preview.result, info)


def write_preview(
    out: Path,
    sources: np.ndarray,
    preview: Preview,
    info: dict[str, Any],
    progress: ProgressCallback | None = None,
) -> None:
    """The preview folder, built in a staging folder and renamed into place when complete."""
    edited = preview.result.frames
    stage = StageProgress(progress, "write", len(edited) + 1)
    info["timings_s"] = {k: round(v, 4) for k, v in preview.result.timings.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as staging:
        labels = [f"frame {i}" for i in preview.indices]
        contact_sheet(sources, edited, labels).save(staging / SHEET_FILE)
        stage.advance()
        (staging / "frames").mkdir()
        for position, frame in zip(preview.indices, edited, strict=True):
            Image.fromarray(frame, "RGB").save(staging / "frames" / f"{position:05d}.png")
            stage.advance()
        text = json.dumps(info, indent=2, default=str) + "\n"
        (staging / RUN_FILE).write_text(text, "utf-8")
