"""An edit job end to end: check, read the clip, load the model, invert (or hit the cache), edit,
write the output folder. The CLI, the web UI and batch runs all go through here.

Everything that can be checked without decoding the video or loading weights is checked first
(``preflight``), so a typo fails in milliseconds, not after minutes of work.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__, distributed
from .cache import InversionCache, inversion_key
from .checkpoint import StepCheckpoint, checkpoint_path, run_identity
from .control import ControlCondition
from .errors import TokenFlowError
from .families import DiffusionModel, check_model_source, family_of, load_model
from .families.addons import EmbeddingFile, LoraFile
from .hub import local_path, looks_like_path
from .inversion import Inversion, edit_timesteps
from .keyframes import block_bounds
from .loading import resolve_device, resolve_dtype
from .options import EditOptions, OptionError
from .outputs import check_output_folder, write_outputs
from .pipeline import EditResult, TokenFlowPipeline
from .progress import ProgressCallback, StageProgress, stage_callback
from .video import VideoClip, read_clip

Log = Callable[[str], None]
# above this many keyframes edited jointly, suggest the long-video mode
JOINT_KEYFRAMES_NOTE = 16


@dataclass
class JobReport:
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


def _read_paths(options: EditOptions) -> dict[str, Path]:
    """Everything the run reads from disk, which an output folder must never touch."""
    from huggingface_hub import constants

    paths = {"input": Path(options.input or "")}
    if options.control and options.control not in ("canny", "depth"):
        paths["control images"] = Path(options.control)
    paths["inversion cache"] = InversionCache(options.cache_dir).root
    for what, name in (
        ("model", options.model),
        ("model config", options.model_config),
        ("ControlNet", options.controlnet),
        ("depth model", options.depth_model),
    ):
        if name and local_path(name) is not None:
            paths[what] = Path(name)
    if options.vae and local_path(options.vae) is not None:
        paths["VAE"] = Path(options.vae)
    for what, addon in (("LoRA", LoraFile), ("embedding", EmbeddingFile)):
        for i, text in enumerate(getattr(options, what.lower())):
            paths[f"{what} {i + 1}"] = addon.parse(text).path
    paths["Hugging Face cache"] = Path(constants.HF_HUB_CACHE)
    return paths


def preflight(options: EditOptions, *, editing: bool = True, output: bool = True) -> None:
    """Every check that needs no decoding and no weights: options, paths, model, device (and,
    ``output``: the output folder; over several ranks only rank 0 writes it)."""
    options.require("input", *(("prompt", "out") if editing else ())).validate()
    if not Path(options.input).exists():
        raise TokenFlowError(f"input {options.input} does not exist")
    device = resolve_device(options.device)
    resolve_dtype(options.dtype, device)
    check_model_source(
        options.model,
        options.model_config,
        vae=options.vae,
        lora=options.lora,
        embedding=options.embedding,
    )
    controlnet = options.controlnet
    if controlnet and looks_like_path(controlnet) and local_path(controlnet) is None:
        raise TokenFlowError(f"`controlnet` {controlnet}: no such folder")
    cache_dir = InversionCache(options.cache_dir).root
    if cache_dir.exists() and not cache_dir.is_dir():
        raise TokenFlowError(f"the inversion cache {cache_dir} is a file; give a folder")
    if editing and output:
        check_output_folder(Path(options.out), options.overwrite, _read_paths(options))


def model_defaults(options: EditOptions) -> EditOptions:
    """``options`` with what follows from the model filled in: an unset ``short_side`` is the
    model family's default working size (512 for SD 1.x/2.x, 1024 for SDXL)."""
    if options.short_side is not None:
        return options
    family = family_of(options.model, options.model_config)
    return options.replace(short_side=family.default_short_side)


def read_input(options: EditOptions, progress: ProgressCallback | None = None) -> VideoClip:
    """The clip as the options select and size it."""
    reading = stage_callback(progress, "read")
    kwargs = model_defaults(options).reader_kwargs()
    return read_clip(Path(options.input), **kwargs, progress=reading)


@dataclass
class Prepared:
    """The clip, the pipeline and the inversion cache slot an edit or an inversion works on."""

    clip: VideoClip
    pipe: TokenFlowPipeline
    control: ControlCondition | None
    cache: InversionCache
    key: str
    fingerprint: str
    timings: dict[str, float]
    control_identity: dict[str, Any] | None = None


def load_job_model(options: EditOptions) -> DiffusionModel:
    """The model ``options`` name, on their device and dtype (a batch loads it once for all
    jobs that name the same)."""
    return load_model(
        options.model,
        device=options.device,
        dtype=options.dtype,
        config=options.model_config,
        vae=options.vae,
        lora=options.lora,
        embedding=options.embedding,
    )


def prepare(
    options: EditOptions,
    progress: ProgressCallback | None = None,
    log: Log = print,
    model: DiffusionModel | None = None,
) -> Prepared:
    """Read the clip and load the model (unless an already loaded ``model`` is given, as a
    long-running front end does); work out the inversion's cache key."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    clip = read_input(options, progress)
    timings["read"] = time.perf_counter() - clock
    width, height = clip.size
    log(f"input: {len(clip)} frames, {width}x{height}, {clip.fps:g} fps")
    for note in clip.notes:
        log(f"note: {note}")

    clock = time.perf_counter()
    stage = StageProgress(progress, "load", 1)
    if model is None:
        model = load_job_model(options)
    stage.advance()
    timings["load_model"] = time.perf_counter() - clock
    control, control_identity = None, None
    if options.controlnet:
        from .controlnet import load_control

        clock = time.perf_counter()
        control, control_identity = load_control(options, clip, model)
        timings["control"] = time.perf_counter() - clock
    pipe = TokenFlowPipeline(model)
    if options.compile:
        pipe.compile()
    fingerprint = model.fingerprint()
    key = frames_key(options, clip.frames, model, fingerprint, control_identity)
    cache = InversionCache(options.cache_dir)
    return Prepared(clip, pipe, control, cache, key, fingerprint, timings, control_identity)


def frames_key(
    options: EditOptions,
    frames,
    model: DiffusionModel,
    fingerprint: str,
    control_identity: dict[str, Any] | None,
) -> str:
    """The inversion cache key of ``frames`` edited as ``options`` say."""
    return inversion_key(
        frames,
        model_fingerprint=fingerprint,
        inversion_prompt=options.inversion_prompt,
        inversion_steps=options.inversion_steps,
        edit_timesteps=edit_timesteps(model.new_scheduler(), options.steps),
        dtype=str(model.dtype).removeprefix("torch."),
        extra={"control": control_identity} if control_identity else None,
    )


def _cache_meta(options: EditOptions, clip: VideoClip) -> dict[str, Any]:
    width, height = clip.size
    return {
        "model": options.model,
        "prompt": options.inversion_prompt,
        "frames": len(clip),
        "size": f"{width}x{height}",
        "source": str(clip.source),
    }


def run_invert(
    options: EditOptions, progress: ProgressCallback | None = None, log: Log = print
) -> Path | None:
    """Precompute a clip's inversion into the cache (``tokenflow invert``)."""
    preflight(options, editing=False)
    options = model_defaults(options)
    job = prepare(options, progress, log)
    if job.cache.load(job.key, dtype=job.pipe.dtype) is not None:
        log(f"inversion already cached: {job.key[:16]}")
        return job.cache.path_for(job.key)
    latents = job.pipe.encode_frames(job.clip.frames, progress)
    inversion = job.pipe.invert(latents, options, control=job.control, progress=progress)
    path = job.cache.save(job.key, inversion, _cache_meta(options, job.clip))
    if path is not None:
        log(f"inversion cached: {job.key[:16]} ({path})")
    return path


def run_edit(
    options: EditOptions,
    progress: ProgressCallback | None = None,
    log: Log = print,
    model: DiffusionModel | None = None,
) -> JobReport:
    """Run one edit described by ``options`` and write its output folder (``preview`` set:
    a preview's, see ``preview.run_preview``). ``model``: an already loaded model to use."""
    if options.preview is not None:
        from .preview import run_preview

        if distributed.launch_world() > 1:
            raise OptionError("`preview` runs in one process: start it without torchrun")
        return run_preview(options, progress, log, model)
    return run_edits([options], progress, log, model)[0]


def check_prompt_runs(runs: list[EditOptions]) -> None:
    """``runs`` may share one run: the same settings but ``prompt`` and ``out``, each distinct."""
    if not runs:
        raise OptionError("no `prompt` given: edit at least one")
    shared = {k: v for k, v in runs[0].to_dict().items() if k not in ("prompt", "out")}
    for other in runs[1:]:
        for key, value in other.to_dict().items():
            if key in shared and shared[key] != value:
                raise OptionError(f"prompts in one run share their settings, but `{key}` differs")
    for key in ("prompt", "out"):
        values = [getattr(o, key) for o in runs]
        twice = next((v for v in values if values.count(v) > 1), None)
        if twice is not None:
            raise OptionError(f"`{key}` {twice!r} is given twice; each prompt needs its own")
    if runs[0].preview is not None and len(runs) > 1:
        raise OptionError("`preview` looks at one prompt at a time; give one `prompt`")


def run_edits(
    runs: list[EditOptions],
    progress: ProgressCallback | None = None,
    log: Log = print,
    model: DiffusionModel | None = None,
) -> list[JobReport]:
    """Edit one clip with several prompts in one run (``runs`` differ only in ``prompt`` and
    ``out``) and write each output folder: one read, one inversion, one denoising loop whose
    UNet calls carry the source branch once for all prompts (see ``pipeline.edit_prompts``).

    The state after every denoising step is checkpointed beside the (first) output folder;
    ``resume`` continues from it. Started by torchrun, every rank runs this: it joins the
    process group, rank 0 alone reads and writes the cache, the checkpoint and the outputs,
    and a failure of any rank stops all of them with one line naming it (distributed/)."""
    check_prompt_runs(runs)
    comm = distributed.join(runs[0])
    # not only the pipeline's: a rank failing in its own work before the edit (reading the clip,
    # loading the model; rank 0's output, cache and checkpoint checks) is named by it, not
    # taken for a rank that stopped responding (or one torchrun terminated)
    with distributed.failure_guard(comm):
        return _run_edits(runs, progress, log, model, comm is None or comm.rank == 0)


def _run_edits(
    runs: list[EditOptions],
    progress: ProgressCallback | None,
    log: Log,
    model: DiffusionModel | None,
    writer: bool,
) -> list[JobReport]:
    if not writer:  # the other ranks' work shows in rank 0's
        log = _silent
    for options in runs:
        preflight(options, output=writer)
    runs = [model_defaults(o) for o in runs]  # run.json records the size the model chose
    options = runs[0]
    if writer:
        options.warn_about_weak_settings()
    started = time.perf_counter()
    job = prepare(options, progress, log, model)
    clip, pipe = job.clip, job.pipe
    timings = job.timings

    inversion: Inversion | None = None
    if options.cache and writer:
        inversion = job.cache.load(job.key, dtype=pipe.dtype)
    cache_status = "hit" if inversion is not None else ("miss" if options.cache else "disabled")
    log(f"inversion cache: {cache_status}")
    if inversion is not None:
        StageProgress(progress, "invert", 0)  # skipped: say so to whoever shows the stages
    _note_joint_keyframes(options, len(clip), log)
    checkpoint = None
    if writer and (options.checkpoint or options.resume):
        identity = run_identity(runs, job.key)
        checkpoint = StepCheckpoint(checkpoint_path(Path(options.out)), identity, options.resume)
        _note_resume(checkpoint, options, log)

    def cache_inversion(computed: Inversion) -> None:  # before the editing, for a resume
        if options.cache:
            job.cache.save(job.key, computed, _cache_meta(options, clip))

    prompts = [o.prompt for o in runs]
    results = pipe.edit_prompts(
        clip.frames, prompts, options, inversion=inversion, control=job.control,
        progress=progress, checkpoint=checkpoint, on_inverted=cache_inversion,
    )  # fmt: skip
    timings.update(results[0].timings)
    if len(runs) > 1:
        log(f"{len(runs)} prompts in one run: {_shared_run(results[0])['note']}")

    reports = []
    for i, (run, result) in enumerate(zip(runs, results, strict=True)):
        info = run_info(run, job, cache_status, result)
        clock = time.perf_counter()
        if not writer:
            _finish_info(info, timings, clock, started)
            reports.append(JobReport(Path(run.out), clip, result, info))
            continue

        def write_progress(done: int, total: int, i: int = i) -> None:
            if progress is not None:  # all outputs as one stage
                progress("write", i * total + done, len(runs) * total)

        notes = write_outputs(
            Path(run.out),
            clip,
            result.frames,
            info,
            audio=run.audio,
            gif=run.gif,
            progress=write_progress,
            finish=lambda info=info, clock=clock: _finish_info(info, timings, clock, started),
        )
        for note in notes:
            log(f"note: {note}")
        reports.append(JobReport(Path(run.out), clip, result, info))
    if checkpoint is not None:  # every output is written: nothing left to resume
        checkpoint.remove()
    return reports


def _silent(line: str) -> None:
    """The log of a rank other than 0."""


def _note_resume(checkpoint: StepCheckpoint, options: EditOptions, log: Log) -> None:
    """Say what ``resume`` will do, or that an interrupted run's checkpoint is replaced; a
    checkpoint of other settings is refused here, before any heavy work."""
    done = checkpoint.inspect()
    name = checkpoint.path.name
    if done is not None:
        log(f"resume: continuing the interrupted run ({name}) after its step {done}")
    elif options.resume:
        log(f"note: no interrupted run to resume ({name} does not exist); starting from step 1")
    elif checkpoint.path.exists():
        log(
            f"note: the checkpoint of an interrupted run ({name}) is replaced by this run's;"
            " `resume` would have continued it"
        )


def _shared_run(result: EditResult) -> dict[str, Any]:
    """What editing several prompts in one run saved: the source branch is evaluated once
    instead of once per prompt, so P prompts cost (1 + 2P) / 3P of P separate runs' editing."""
    prompts = len(result.prompts)
    editing = sum(v for k, v in result.unet_evaluations.items() if k != "inversion")
    separate = editing * 3 * prompts // (1 + 2 * prompts)
    return {
        "prompts": result.prompts,
        "editing_unet_frame_evaluations": editing,
        "separate_runs_editing_unet_frame_evaluations": separate,
        "note": (
            f"{editing} UNet frame-evaluations for editing instead of {separate} in separate"
            f" runs ({separate - editing} saved, {1 - editing / separate:.0%})"
        ),
    }


def _finish_info(info: dict, timings: dict, write_started: float, started: float) -> None:
    timings["write"] = time.perf_counter() - write_started
    info["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    info["wall_time_s"] = round(time.perf_counter() - started, 4)


def run_info(
    options: EditOptions, job: Prepared, cache_status: str, result: EditResult
) -> dict[str, Any]:
    """run.json: every setting, model identity, seed, versions and what the edit cost."""
    clip = job.clip
    width, height = clip.size
    return {
        "tokenflow": __version__,
        "config": options.to_dict(),
        "method": options.method,
        "baseline": options.baseline,
        "propagation": options.propagation,
        "controlnet": options.controlnet,
        "model": {**job.pipe.model.describe(), "fingerprint": job.fingerprint},
        "seed": options.seed,
        "input": {
            "path": str(clip.source),
            "frames": len(clip),
            "size": [width, height],
            "fps": clip.fps,
            "source_size": list(clip.source_size),
            "start_time": clip.start_time,
            "end_time": clip.end_time,
            "constant_rate": clip.constant_rate,
            "duration": clip.duration,
            "notes": clip.notes,
        },
        "frame_indices": clip.frame_indices,
        **({} if clip.constant_rate else {"timestamps": clip.timestamps}),
        "inversion_cache": cache_status,
        "inversion_key": job.key,
        "unet_frame_evaluations": result.unet_evaluations,
        # a resumed run: the steps the interrupted one had completed (its evaluations are not
        # counted here, and its inversion was cached)
        **({"resumed_from_step": result.resumed_from} if result.resumed_from else {}),
        **({"distributed": result.distributed} if result.distributed else {}),
        # several prompts edited in one run share its evaluations and times
        **({"shared_run": _shared_run(result)} if len(result.prompts) > 1 else {}),
        "keyframes": result.keyframes,
        "versions": package_versions(),
    }


def _note_joint_keyframes(options: EditOptions, frames: int, log: Log) -> None:
    """Reference mode edits all keyframes in one pass: say when that makes memory grow."""
    keyframes = len(block_bounds(frames, options.block_size))  # one keyframe per block
    joint = options.baseline in (None, "fixed-keyframes") and not options.max_keyframes
    if joint and keyframes > JOINT_KEYFRAMES_NOTE:
        log(
            f"note: {keyframes} keyframes are edited jointly (reference mode), so memory and the"
            f" keyframe pass grow with the clip; `max_keyframes` {JOINT_KEYFRAMES_NOTE} bounds"
            " them (long-video mode)"
        )
