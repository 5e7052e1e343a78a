"""Several prompts in one run vs one run per prompt, on the same clip.

One run of P prompts inverts once and makes every UNet call carry the source branch once plus an
unconditional and a conditional branch per prompt (1 + 2P batch groups), where P runs carry
3P (and, with the inversion cache, invert once too). After a warm-up of each, the ways are timed
in turn, ``--repeat`` times (so a busy machine slows them alike), and the best time of each is
shown. ``max_diff`` is the largest difference of any prompt's pixels from its own run (0:
bit-identical)::

    python benchmarks/bench_prompts.py --size tiny --res 64 --frames 8 --steps 10 \\
        --inversion-steps 10 --prompts 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = ("a fox", "a marble statue of a wolf", "a red husky", "a watercolor painting", "a cat")
WAYS = {
    "separate": "one run per prompt (inversion once, then cached)",
    "together": "one run of all prompts",
    "packed": "one run, max_batch 1000 (every pass in one call)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "mid", "sd21"))
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inversion-steps", type=int, default=10)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=3, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timings of each way; the best is shown")
    p.add_argument("--clip", default=str(DATA / "wolf.mp4"))
    args = p.parse_args()

    import numpy as np
    import torch

    from tokenflow.families.sd import StableDiffusion
    from tokenflow.pipeline import TokenFlowPipeline
    from tokenflow.testing import make_tiny_sd
    from tokenflow.video import read_clip

    torch.set_num_threads(args.threads)
    frames = read_clip(Path(args.clip), max_frames=args.frames, size=(args.res, args.res)).frames
    pipe = TokenFlowPipeline(StableDiffusion.from_parts(make_tiny_sd(args.size), name=args.size))
    prompts = list(PROMPTS[: args.prompts])
    common = dict(
        inversion_prompt="a wolf",
        steps=args.steps,
        inversion_steps=args.inversion_steps,
        block_size=args.block_size,
    )

    def edit(way: str) -> list:
        if way != "separate":
            packed = dict(max_batch=1000) if way == "packed" else {}
            return pipe.edit_prompts(frames, prompts, **common, **packed)
        first = pipe(frames, prompt=prompts[0], **common)
        rest = [pipe(frames, prompt=p, inversion=first.inversion, **common) for p in prompts[1:]]
        return [first, *rest]

    rows = {way: {"total": float("inf")} for way in WAYS}
    for round_ in range(args.repeat + 1):  # round 0 warms every way up (first calls per shape)
        for way, row in rows.items():
            clock = time.perf_counter()
            results = edit(way)
            total = time.perf_counter() - clock
            if round_ == 0 or total >= row["total"]:
                continue
            runs = results if way == "separate" else results[:1]  # P runs, or one shared run
            row["total"] = total
            for key in ("inversion", "denoise", "decode"):
                row[key] = sum(r.timings.get(key, 0.0) for r in runs)
            evaluations = [(k, v) for r in runs for k, v in r.unet_evaluations.items()]
            row["inversion_evals"] = sum(v for k, v in evaluations if k == "inversion")
            row["editing_evals"] = sum(v for k, v in evaluations if k != "inversion")
            row["frames"] = np.stack([r.frames for r in results]).astype(int)

    print(
        f"# {args.size} {args.res}², {args.frames} frames, {args.inversion_steps} inversion +"
        f" {args.steps} editing steps, blocks of {args.block_size}, {args.prompts} prompts,"
        f" {args.threads} thread(s); seconds (best of {args.repeat}), UNet frame-evaluations"
    )
    cols = ["way", "total", "inversion", "denoise", "decode", "inversion_evals", "editing_evals"]
    print(" | ".join([*cols, "max_diff"]) + "\n" + " | ".join("---" for _ in range(len(cols) + 1)))
    for way, row in rows.items():
        row["way"] = WAYS[way]
        diff = int(np.abs(row["frames"] - rows["separate"]["frames"]).max())
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in map(row.get, cols)]
        print(" | ".join([*cells, str(diff)]))


if __name__ == "__main__":
    main()
