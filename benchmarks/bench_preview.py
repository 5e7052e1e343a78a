"""How far a preview is from the full edit, and what each costs, on a real clip.

For each clip length, edits the clip in full (reference TokenFlow), then previews it with the
same settings, reusing the full edit's inversion as ``tokenflow edit --preview`` does from the
cache. Prints one table: K, UNet frame-evaluations and seconds of both, the preview's estimate
of the full edit's time, and how far the preview's frames are from the same frames of the full
edit (mean and max absolute difference, grey levels out of 255)::

    python benchmarks/bench_preview.py --clip woman-running.mp4 --frames 16,40 --res 128 \\
        --steps 10 --inversion-steps 100

A random model's edits are not pictures, but the difference still measures how much the
preview's joint edit of K frames departs from TokenFlow's (keyframes drawn per step, tokens
propagated): with a trained model the same structure applies to a real edit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="woman-running.mp4", help="a clip in ../shared/data")
    parser.add_argument("--frames", default="16,40", help="clip lengths, comma separated")
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--size", default="tiny", help="random model size (tokenflow.testing)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inversion-steps", type=int, default=100)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tokenflow import EditOptions, TokenFlowPipeline
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.preview import editing, preview_edit
    from tokenflow.testing import make_tiny_sd
    from tokenflow.video import read_clip

    torch.set_num_threads(args.threads)
    model = StableDiffusion.from_parts(make_tiny_sd(args.size, seed=0), name=args.size)
    pipe = TokenFlowPipeline(model)
    options = EditOptions(
        prompt="a marble sculpture", inversion_prompt="a woman running", steps=args.steps,
        inversion_steps=args.inversion_steps, block_size=args.block_size,
    )  # fmt: skip
    print(
        "| frames | K | full: evals (editing) | full: s after inversion | preview: evals"
        " | preview: s | its estimate of the full s | mean diff | max diff |"
    )
    print("|" + " --- |" * 9)
    for count in (int(c) for c in args.frames.split(",")):
        frames = read_clip(DATA / args.clip, max_frames=count, size=(args.res, args.res)).frames
        clock = time.perf_counter()
        full = pipe(frames, options)
        full_s = time.perf_counter() - clock
        clock = time.perf_counter()
        preview = preview_edit(pipe, frames, options, inversion=full.inversion)
        preview_s = time.perf_counter() - clock
        # the preview found the inversion "cached": compare with the full edit after it
        after_inversion = full_s - full.timings.get("inversion", 0.0)
        diff = np.abs(preview.result.frames.astype(int) - full.frames[preview.indices])
        print(
            f"| {len(frames)} | {len(preview.indices)} | {sum(full.unet_evaluations.values())}"
            f" ({editing(full.unet_evaluations)}) | {after_inversion:.1f}"
            f" | {sum(preview.result.unet_evaluations.values())} | {preview_s:.1f}"
            f" | {preview.estimate_s:.1f} | {diff.mean():.1f} | {diff.max()} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
