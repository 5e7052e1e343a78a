"""What the benchmarks share: the test clips, the arguments of an edit on a random model with
Stable Diffusion's layout, that model, and the clip's frames at any length.

The benchmarks run as scripts (``python benchmarks/bench_edit.py``), so this module is imported
from their own folder. Heavy imports stay inside the functions: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: the edit the benchmarks time, on woman-running
EDIT_PROMPTS = {"prompt": "a marble sculpture", "inversion_prompt": "a woman running"}


def edit_parser(
    doc: str,
    *,
    size: str = "mid",
    res: int = 256,
    steps: int = 2,
    inversion_steps: int = 2,
    threads: int | None = 1,
    clip: str = "woman-running.mp4",
    engine: bool = False,
) -> argparse.ArgumentParser:
    """A parser with the arguments every benchmark's edit takes, at this script's defaults
    (``threads=None``: the script sets the threads itself; ``engine``: also the engine variants
    of ``bench_pipeline``); the script adds ``--frames`` and its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--size", default=size, choices=("tiny", "mid", "sd21"))
    p.add_argument("--res", type=int, default=res, help="square working size in pixels")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--inversion-steps", type=int, default=inversion_steps)
    p.add_argument("--block-size", type=int, default=8)
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--clip", default=str(DATA / clip))
    if engine:
        _engine_arguments(p)
    return p


def edit_settings(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    """The pipeline's keyword arguments for the benchmark edit at ``args``' settings."""
    return dict(
        EDIT_PROMPTS,
        steps=args.steps,
        inversion_steps=args.inversion_steps,
        block_size=args.block_size,
        **more,
    )


#: ``--sdpa`` choices: the backend SDPA tries first (others remain fallbacks); auto: torch's order
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that choose how the engine runs, for comparing variants on one device."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--model",
        help="a diffusers folder to load instead of building the random model of --size (e.g."
        " one saved by tokenflow.testing.save_tiny_sd: the same weights, without the build)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="UNet and VAE weights NHWC (the pipeline's"
        " enable_channels_last)",
    )  # fmt: skip
    p.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE",
        help="torch.compile the UNet's regions (MODE: torch.compile's, e.g. reduce-overhead for"
        " CUDA graphs); the first edit compiles: --warmup times the next",
    )  # fmt: skip
    p.add_argument("--inversion-batch", type=int, help="frames per inversion UNet call")
    p.add_argument(
        "--sdpa", default="auto", choices=SDPA_BACKENDS, help="the attention backend tried first"
    )
    p.add_argument("--warmup", action="store_true", help="time a second edit, not the first")


def bench_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline on the benchmark's model, run the way the engine arguments chose."""
    from tokenflow.pipeline import TokenFlowPipeline

    if args.model:
        pipe = TokenFlowPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    else:
        pipe = TokenFlowPipeline(random_model(args.size, args.device, args.dtype))
    if args.channels_last:
        pipe.enable_channels_last()
    if args.compile:
        pipe.compile(**({} if args.compile == "default" else {"mode": args.compile}))
    if args.inversion_batch:
        pipe.inversion_batch_size = args.inversion_batch
    return pipe


def attention_backend(args: argparse.Namespace) -> Any:
    """A context in which SDPA tries ``--sdpa``'s backend first (nothing changes for auto)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if args.sdpa == "auto":
        return contextlib.nullcontext()
    order = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    first = order.pop(args.sdpa)
    return sdpa_kernel([first, *order.values()], set_priority=True)


@dataclass
class TimedEdit:
    result: Any  # the timed edit's EditResult
    seconds: float
    warm: Any = None  # the warm-up edit's EditResult (``--warmup``)
    warmup_seconds: float | None = None


def timed_edit(pipe: Any, frames: Any, args: argparse.Namespace, **options: Any) -> TimedEdit:
    """The edit as the benchmarks time it: with ``--sdpa``'s backend, after a warm-up edit with
    ``--warmup`` (the first edit compiles, and picks CUDA's kernels), the peak CUDA memory
    counted from the timed edit on."""
    import torch

    with attention_backend(args):
        warm = warmup_seconds = None
        if args.warmup:
            clock = time.perf_counter()
            warm = pipe(frames, **options)
            warmup_seconds = time.perf_counter() - clock
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        result = pipe(frames, **options)
    return TimedEdit(result, time.perf_counter() - clock, warm, warmup_seconds)


def variant_label(args: argparse.Namespace) -> str:
    """The engine variant in words, for a table's title."""
    parts = [f"{args.device} {args.dtype}"]
    parts += ["channels-last"] if args.channels_last else []
    parts += [f"compiled ({args.compile})"] if args.compile else []
    parts += [f"inversion batch {args.inversion_batch}"] if args.inversion_batch else []
    parts += [f"SDPA {args.sdpa} first"] if args.sdpa != "auto" else []
    parts += ["after a warm-up edit"] if args.warmup else []
    return ", ".join(parts)


def random_model(size: str, device: str | None = None, dtype: str | None = None) -> Any:
    """The random model of ``size`` (``tokenflow.testing``, seed 0: the same weights every run)."""
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.testing import make_tiny_sd

    return StableDiffusion.from_parts(
        make_tiny_sd(size, seed=0), name=size, device=device, dtype=dtype
    )


def clip_frames(clip: str | Path, count: int, res: int) -> Any:
    """``count`` frames of ``clip`` at res², bounced back and forth when the clip is shorter."""
    import numpy as np

    from tokenflow.video import read_clip

    frames = read_clip(Path(clip), max_frames=count, size=(res, res)).frames
    if len(frames) < count:
        cycle = np.concatenate([frames, frames[-2:0:-1]]) if len(frames) > 2 else frames
        frames = cycle[np.arange(count) % len(cycle)]
    return frames
