"""Benchmark the real pipeline on a real clip with a random Stable Diffusion of a chosen size.

Every configuration runs in a fresh subprocess, so the peak process memory (``ru_maxrss``) of
one row never carries over to the next. Prints one table: wall time per stage, UNet
frame-evaluations per output frame, peak process memory (and peak CUDA memory on a GPU)::

    python benchmarks/bench_edit.py --size mid --res 256 --frames 16,40,120 --steps 2 \\
        --inversion-steps 2
    python benchmarks/bench_edit.py --size tiny --res 128 --frames 120,480,1000 --max-keyframes 8
    python benchmarks/bench_edit.py --size sd21 --res 512 --frames 16,40 --device cuda \\
        --dtype float16 --compile

A clip shorter than the requested frame count is extended by playing it back and forth (the
frames stay a real, continuous video). ``--compare`` also runs reference mode on the same clip
and reports the pixel difference and warp errors of the two modes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    bench_pipeline,
    clip_frames,
    edit_parser,
    edit_settings,
    timed_edit,
    variant_label,
)

STAGES = (
    "decode",
    "encode",
    "inversion",
    "keyframe_passes",
    "block_passes",
    "correspondence",
    "vae_decode",
    "write",
    "end_to_end",  # decode + the edit + write: all a user waits for once the model is loaded
)


def run_one(args: argparse.Namespace, count: int) -> dict:
    """One configuration, in this process; returns the row as a dict."""
    import numpy as np
    import torch

    from tokenflow.video import write_video

    torch.set_num_threads(args.threads)
    row: dict = {"frames": count}
    clock = time.perf_counter()
    frames = clip_frames(args.clip, count, args.res)
    row["decode"] = time.perf_counter() - clock
    pipe = bench_pipeline(args)
    row["rss_model_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kwargs = edit_settings(args)
    if args.max_keyframes:
        kwargs["max_keyframes"] = args.max_keyframes
    if args.keyframe_memory is not None:
        kwargs["keyframe_memory"] = args.keyframe_memory
    edit = timed_edit(pipe, frames, args, **kwargs)
    result, row["edit"] = edit.result, edit.seconds
    if edit.warmup_seconds is not None:
        row["warmup"] = edit.warmup_seconds
    t = result.timings
    for stage in ("encode", "inversion", "keyframe_passes", "block_passes", "correspondence"):
        row[stage] = t.get(stage)
    row["vae_decode"] = t.get("decode")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_video(Path(tmp) / "edited.mp4", result.frames, 25)
    row["write"] = time.perf_counter() - clock
    row["end_to_end"] = row["decode"] + row["edit"] + row["write"]
    row["evals_per_frame"] = sum(result.unet_evaluations.values()) / count
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if pipe.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.save:
        np.save(args.save, result.frames)
        row["latents_path"] = args.save
    return row


def _subprocess_row(args: argparse.Namespace, count: int, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", str(count), *sys.argv[1:], *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        return {"frames": count, "error": out.stderr.strip().splitlines()[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    cols = ["frames", *STAGES, "evals_per_frame", "rss_model_mb", "peak_rss_mb"]
    if any("warmup" in r for r in rows):
        cols.insert(1, "warmup")
    if any("peak_cuda_mb" in r for r in rows):
        cols.append("peak_cuda_mb")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['frames']} | error: {r['error']}")
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _compare(args: argparse.Namespace, count: int) -> str:
    """Long-video vs reference mode on the same clip: pixel difference and warp errors."""
    import numpy as np

    from tokenflow.metrics import warp_error

    with tempfile.TemporaryDirectory() as tmp:
        long_path, ref_path = str(Path(tmp) / "long.npy"), str(Path(tmp) / "ref.npy")
        _subprocess_row(args, count, ["--save", long_path])
        _subprocess_row(args, count, ["--save", ref_path, "--max-keyframes", "0"])
        long, ref = np.load(long_path), np.load(ref_path)
    source = clip_frames(args.clip, count, args.res)
    diff = np.abs(long.astype(int) - ref.astype(int))
    we_long = warp_error(source, long).mean
    we_ref = warp_error(source, ref).mean
    return (
        f"{count} frames: |long - reference| mean {diff.mean():.2f}, max {diff.max()} grey levels;"
        f" warp error ×1e-3: reference {we_ref * 1e3:.3f}, long-video {we_long * 1e3:.3f}"
    )


def main() -> None:
    p = edit_parser(__doc__, engine=True)
    p.add_argument("--frames", default="16,40,120", help="comma-separated frame counts")
    p.add_argument("--max-keyframes", type=int, default=0, help="long-video mode (0: reference)")
    p.add_argument(
        "--keyframe-memory",
        type=int,
        help="MB of keyframe recordings kept in memory (default: the pipeline's)",
    )
    p.add_argument("--compare", action="store_true", help="long-video vs reference outputs")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    counts = [int(c) for c in args.frames.split(",")]
    mode = f"long-video, max {args.max_keyframes} keyframes" if args.max_keyframes else "reference"
    if args.keyframe_memory is not None:
        mode += f", {args.keyframe_memory:g} MB of keyframe recordings in memory"
    print(
        f"# {args.model or args.size} {args.res}² {variant_label(args)}, {args.inversion_steps}"
        f" inversion + {args.steps} editing steps, blocks of {args.block_size}, {mode};"
        " seconds, MiB (peak RSS: whole process, fresh per row)"
    )
    print(_table([_subprocess_row(args, c, []) for c in counts]), flush=True)
    if args.compare:
        for c in counts:
            print(_compare(args, c), flush=True)


if __name__ == "__main__":
    main()
