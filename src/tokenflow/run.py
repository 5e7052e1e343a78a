"""An edit job end to end: read the clip, invert (or hit the cache), edit, write the outputs.

Outputs go to a temporary folder beside ``--out`` and are renamed into place only when complete,
so an interrupted or failed run leaves nothing half-written, and an existing output folder is
replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .cache import InversionCache, inversion_key
from .config import EditConfig
from .editor import EditResult, TokenFlowPipeline
from .errors import TokenFlowError
from .keyframes import block_bounds
from .models import check_model_source, load_model
from .video import VideoClip, parse_size, read_clip, write_frames, write_gif, write_side_by_side
from .video import write_video as write_mp4


@dataclass
class RunReport:
    """What ``run_edit`` made and where."""

    out: Path
    clip: VideoClip
    result: EditResult
    info: dict[str, Any] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "av", "numpy", "safetensors")
    versions = {"tokenflow": __version__, "python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            versions[name] = "missing"
    return versions


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail before any heavy work if the results could not be written."""
    if out.exists() and not out.is_dir():
        raise TokenFlowError(f"--out {out} is a file; give a folder path")
    if out.exists() and not overwrite:
        raise TokenFlowError(
            f"output folder {out} already exists; pass --overwrite or pick another --out"
        )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise TokenFlowError(f"cannot create {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TokenFlowError(f"cannot write to {parent}: permission denied; pick another --out")


def check_cheap(config: EditConfig) -> None:
    """What is checked in milliseconds from names alone, before decoding or loading anything."""
    path = Path(config.input)
    if not path.exists():
        raise TokenFlowError(f"input {path} does not exist")
    if config.size:
        parse_size(config.size)
    check_model_source(config.model, config.model_config)


def read_input(config: EditConfig) -> VideoClip:
    path = Path(config.input)
    if not path.exists():
        raise TokenFlowError(f"input {path} does not exist")
    return read_clip(
        path,
        start=config.start,
        end=config.end,
        stride=config.stride,
        max_frames=config.frames,
        size=parse_size(config.size) if config.size else None,
        fit=config.fit,
        short_side=config.short_side,
        fps=config.fps,
    )


@dataclass
class Prepared:
    """The clip, the model and the inversion cache slot an edit or an inversion works on."""

    clip: VideoClip
    pipe: TokenFlowPipeline
    cache: InversionCache
    key: str
    fingerprint: str
    timings: dict[str, float]


def prepare(config: EditConfig, *, progress: bool = True, log=print) -> Prepared:
    """Read the clip and load the model; work out the inversion's cache key."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    clip = read_input(config)
    timings["read"] = time.perf_counter() - clock
    width, height = clip.size
    log(f"input: {len(clip)} frames, {width}x{height}, {clip.fps:g} fps")
    for note in clip.notes:
        log(f"note: {note}")

    clock = time.perf_counter()
    model = load_model(
        config.model, device=config.device, dtype=config.dtype, config=config.model_config
    )
    timings["load_model"] = time.perf_counter() - clock
    control, control_identity = None, None
    if config.method == "controlnet":
        from .controlnet import load_control

        clock = time.perf_counter()
        control, control_identity = load_control(config, clip, model)
        timings["control"] = time.perf_counter() - clock
    pipe = TokenFlowPipeline(model, progress=progress, control=control)
    if config.keyframe_memory_mb is not None:
        pipe.keyframe_memory = config.keyframe_memory_mb * 2**20
    if config.compile:
        pipe.compile()
    fingerprint = model.fingerprint()
    key = inversion_key(
        clip.frames,
        model_fingerprint=fingerprint,
        inversion_prompt=config.inversion_prompt,
        inversion_steps=config.inversion_steps,
        edit_timesteps=pipe.edit_timesteps(config.steps),
        dtype=str(model.dtype).removeprefix("torch."),
        extra={"control": control_identity} if control_identity else None,
    )
    cache = InversionCache(Path(config.cache_dir) if config.cache_dir else None)
    return Prepared(clip, pipe, cache, key, fingerprint, timings)


def _cache_meta(config: EditConfig, clip: VideoClip) -> dict[str, Any]:
    width, height = clip.size
    return {
        "model": config.model,
        "prompt": config.inversion_prompt,
        "frames": len(clip),
        "size": f"{width}x{height}",
        "source": str(clip.source),
    }


def run_invert(config: EditConfig, *, progress: bool = True, log=print) -> Path | None:
    """Precompute a clip's inversion into the cache (``tokenflow invert``)."""
    config.validate(editing=False)
    check_cheap(config)
    job = prepare(config, progress=progress, log=log)
    model = job.pipe.model
    if job.cache.load(job.key, dtype=model.dtype) is not None:
        log(f"inversion already cached: {job.key[:16]}")
        return job.cache.path_for(job.key)
    latents = job.pipe.encode_frames(job.clip.frames)
    inversion = job.pipe.invert(
        latents, config.inversion_prompt, config.inversion_steps, config.steps
    )
    path = job.cache.save(job.key, inversion, _cache_meta(config, job.clip))
    if path is not None:
        log(f"inversion cached: {job.key[:16]} ({path})")
    return path


def run_edit(config: EditConfig, *, progress: bool = True, log=print) -> RunReport:
    """Run one edit described by ``config`` and write its output folder."""
    config.validate()
    out = Path(config.out)
    check_output_folder(out, config.overwrite)
    check_cheap(config)
    started = time.perf_counter()
    job = prepare(config, progress=progress, log=log)
    clip, pipe, model = job.clip, job.pipe, job.pipe.model
    timings = job.timings

    inversion = job.cache.load(job.key, dtype=model.dtype) if config.cache else None
    cache_status = "hit" if inversion is not None else ("miss" if config.cache else "disabled")
    log(f"inversion cache: {cache_status}")
    _note_joint_keyframes(config, len(clip), log)

    result = pipe.edit(
        clip.frames,
        prompt=config.prompt,
        inversion_prompt=config.inversion_prompt,
        negative_prompt=config.negative_prompt,
        steps=config.steps,
        inversion_steps=config.inversion_steps,
        guidance_scale=config.guidance,
        block_size=config.block_size,
        max_keyframes=config.max_keyframes,
        pnp_attn_t=config.pnp_attn_t,
        pnp_f_t=config.pnp_f_t,
        seed=config.seed,
        method="sdedit" if config.method == "sdedit" else "pnp",
        strength=config.strength,
        strength_compat=config.strength_compat,
        noise=config.noise,
        baseline=config.baseline,
        propagation=config.propagation,
        inversion=inversion,
    )
    timings.update(result.timings)
    if config.cache and inversion is None:
        job.cache.save(job.key, result.inversion, _cache_meta(config, clip))

    width, height = clip.size
    info = {
        "tokenflow": __version__,
        "config": config.to_dict(),
        "method": config.method,
        "baseline": config.baseline,
        "propagation": config.propagation,
        "model": {
            "name": config.model,
            "fingerprint": job.fingerprint,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
        },
        "seed": config.seed,
        "input": {
            "path": str(clip.source),
            "frames": len(clip),
            "size": [width, height],
            "fps": clip.fps,
            "source_size": list(clip.source_size),
            "start_time": clip.start_time,
            "end_time": clip.end_time,
            "notes": clip.notes,
        },
        "frame_indices": clip.frame_indices,
        "inversion_cache": cache_status,
        "inversion_key": job.key,
        "unet_frame_evaluations": result.unet_evaluations,
        "keyframes": result.keyframes,
        "versions": package_versions(),
    }
    write_outputs(out, clip, result, info, config, timings, started)
    return RunReport(out, clip, result, info)


# above this many keyframes edited jointly, suggest the long-video mode
JOINT_KEYFRAMES_NOTE = 16


def _note_joint_keyframes(config: EditConfig, frames: int, log) -> None:
    """Reference mode edits all keyframes in one pass: say when that makes memory grow."""
    keyframes = len(block_bounds(frames, config.block_size))  # one keyframe per block
    joint = config.baseline in (None, "fixed-keyframes") and not config.max_keyframes
    if joint and keyframes > JOINT_KEYFRAMES_NOTE:
        log(
            f"note: {keyframes} keyframes are edited jointly (reference mode), so memory and the"
            f" keyframe pass grow with the clip; --max-keyframes {JOINT_KEYFRAMES_NOTE} bounds"
            " them (long-video mode)"
        )


def write_outputs(
    out: Path,
    clip: VideoClip,
    result: EditResult,
    info: dict,
    config: EditConfig,
    timings: dict[str, float],
    started: float,
) -> None:
    """Write every output into a temporary folder, then move it to ``out`` in one rename."""
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.resolve().parent)
    )
    try:
        clock = time.perf_counter()
        audio = clip.source if config.audio and clip.has_audio else None
        span = (clip.start_time, clip.end_time)
        write_mp4(
            staging / "edited.mp4", result.frames, clip.fps, audio_source=audio, audio_span=span
        )
        write_side_by_side(
            staging / "side_by_side.mp4",
            clip.frames,
            result.frames,
            clip.fps,
            audio_source=audio,
            audio_span=span,
        )
        write_frames(staging / "frames", result.frames)
        if config.gif:
            write_gif(staging / "edited.gif", result.frames, clip.fps)
        timings["write"] = time.perf_counter() - clock
        info["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        info["wall_time_s"] = round(time.perf_counter() - started, 4)
        (staging / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n", "utf-8")
        os.chmod(staging, 0o755)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
