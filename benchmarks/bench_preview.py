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

import time

import numpy as np
from common import DATA, EDIT_PROMPTS, clip_frames, edit_parser, random_model


def main() -> None:
    parser = edit_parser(__doc__, size="tiny", res=128, steps=10, inversion_steps=100, threads=2)
    parser.add_argument("--frames", default="16,40", help="clip lengths, comma separated")
    args = parser.parse_args()

    import torch

    from tokenflow import EditOptions, TokenFlowPipeline
    from tokenflow.preview import editing, preview_edit

    torch.set_num_threads(args.threads)
    pipe = TokenFlowPipeline(random_model(args.size))
    options = EditOptions(
        **EDIT_PROMPTS, steps=args.steps, inversion_steps=args.inversion_steps,
        block_size=args.block_size,
    )  # fmt: skip
    print(
        "| frames | K | full: evals (editing) | full: s after inversion | preview: evals"
        " | preview: s | its estimate of the full s | mean diff | max diff |"
    )
    print("|" + " --- |" * 9)
    for count in (int(c) for c in args.frames.split(",")):
        frames = clip_frames(DATA / args.clip, count, args.res)  # a name: a clip in ../shared/data
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
