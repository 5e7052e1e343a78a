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

import time

from common import clip_frames, edit_parser, random_model

PROMPTS = ("a fox", "a marble statue of a wolf", "a red husky", "a watercolor painting", "a cat")
WAYS = {
    "separate": "one run per prompt (inversion once, then cached)",
    "together": "one run of all prompts",
    "packed": "one run, max_batch 1000 (every pass in one call)",
}


def main() -> None:
    p = edit_parser(__doc__, size="tiny", res=64, steps=10, inversion_steps=10, clip="wolf.mp4")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--prompts", type=int, default=3, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--repeat", type=int, default=3, help="timings of each way; the best is shown")
    args = p.parse_args()

    import numpy as np
    import torch

    from tokenflow.pipeline import TokenFlowPipeline

    torch.set_num_threads(args.threads)
    frames = clip_frames(args.clip, args.frames, args.res)
    pipe = TokenFlowPipeline(random_model(args.size))
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
