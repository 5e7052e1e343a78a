"""What each rank runs in the distributed tests, launched by ``torchrun`` (gloo, CPU).

``edits OUT DATA NAME...``: the named ``EDITS`` through the Python API, in one process group;
rank 0 saves each result's latents, frames and keyframes to ``OUT`` for the test to compare
with the single-process run, and under ``LIVE_GROUPS`` its count of live process groups
before the first edit and after each one.

``cli FAULT RANK STEP ARGS...``: ``tokenflow`` with ``ARGS`` (what ``python -m tokenflow``
runs), where rank ``RANK`` fails at denoising step ``STEP``: ``raise`` raises an error there,
``kill`` SIGKILLs its own process, ``early`` raises while preparing (before the pipeline's
edit; ``STEP`` unused), ``none`` does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

COMMON = dict(inversion_prompt="a wolf", steps=3, inversion_steps=3, seed=1)

#: name -> (clip, frames, (width, height), settings): each with uneven shares over 2 and 3
#: ranks and a short last block. The bit-identical ones keep every rank's keyframe calls on the
#: side of CPU kernel switches the single-process calls are on (see test_distributed.py).
EDITS = {
    # 5 keyframes (2 + 3 over 2 ranks): every keyframe call below 16 batch entries
    "reference": ("wolf.mp4", 9, (128, 128), dict(block_size=2)),
    # 49 keyframes edited one branch per call, 16-17 per rank on 3 ranks, 24-25 on 2
    "per-branch": (
        "woman-running.mp4",
        97,
        (128, 64),
        dict(block_size=2, steps=2, inversion_steps=2),
    ),
    # windows of 4 keyframes: each window whole on one rank
    "long-video": ("wolf.mp4", 13, (128, 128), dict(block_size=2, max_keyframes=4)),
    "per-frame": ("wolf.mp4", 13, (128, 128), dict(block_size=3, baseline="per-frame")),
    # two prompts, the paper's blend (keyframes from the next rank too): float rounding only
    "prompts-paper": ("wolf.mp4", 13, (128, 128), dict(block_size=2, propagation="paper")),
    # 2 blocks: over 3 ranks the keyframe pass runs on a sub-group of ranks 0 and 1
    "idle-rank": ("wolf.mp4", 3, (128, 128), dict(block_size=2)),
}
PROMPTS = {"prompts-paper": ["a fox", "a red dog"]}
LIVE_GROUPS = "live groups"


def tiny_pipeline():
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.pipeline import TokenFlowPipeline
    from tokenflow.testing import make_tiny_sd

    model = StableDiffusion.from_parts(make_tiny_sd("tiny", seed=0), name="tiny", device="cpu")
    return TokenFlowPipeline(model)


def clip_frames(data: Path, name: str):
    from tokenflow.video import read_clip

    clip, count, size, _ = EDITS[name]
    return read_clip(data / clip, max_frames=count, size=size).frames


def run_edit(pipe, data: Path, name: str):
    settings = {**COMMON, **EDITS[name][3]}
    return pipe.edit_prompts(clip_frames(data, name), PROMPTS.get(name, ["a fox"]), **settings)


def _edits(out: Path, data: Path, names: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    pipe = tiny_pipeline()
    live = [len(dist.distributed_c10d._world.pg_map)]
    saved: dict = {LIVE_GROUPS: live}
    for name in names:
        results = run_edit(pipe, data, name)
        saved[name] = {
            "latents": [r.latents for r in results],
            "frames": [torch.from_numpy(r.frames) for r in results],
            "keyframes": results[0].keyframes,
            "evaluations": results[0].unet_evaluations,
            "distributed": results[0].distributed,
        }
        live.append(len(dist.distributed_c10d._world.pg_map))
    if dist.get_rank() == 0:
        torch.save(saved, out)
    dist.destroy_process_group()


def _faulty_cli(fault: str, rank: int, step: int, argv: list[str]) -> None:
    import tokenflow.denoise
    import tokenflow.job
    from tokenflow.cli import entry

    if fault == "early" and int(os.environ["RANK"]) == rank:

        def failing_prepare(*args, **kwargs):
            raise ZeroDivisionError("injected before the edit")

        tokenflow.job.prepare = failing_prepare
    elif fault != "none" and int(os.environ["RANK"]) == rank:
        run = tokenflow.denoise._PassRunner.run

        def failing(self, *args, **kwargs):
            if self.unet.context.step == step:
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ZeroDivisionError("injected at this step")
            return run(self, *args, **kwargs)

        tokenflow.denoise._PassRunner.run = failing
    sys.argv = ["tokenflow", *argv]
    entry()


if __name__ == "__main__":
    if sys.argv[1] == "edits":
        _edits(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        _faulty_cli(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
