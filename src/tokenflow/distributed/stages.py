"""The pipeline's per-frame stages over ranks: VAE encoding, DDIM inversion, VAE decoding.

Frames are independent in all three, so each rank takes a contiguous shard of them whose
borders are multiples of the frames per VAE and per inversion call: every rank then makes
exactly the calls the single-process run makes for those frames, bit for bit. The encoded
latents are all-gathered (a few KB per frame). The inverted latents go to rank 0, the only one
that writes the inversion cache; from there (or from the cache, read by rank 0 alone) each rank
receives the source latents of just the frames it denoises, plus the noisiest timestep's of
every frame (the start of the edit). The decoded frames go to rank 0, which writes the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..inversion import Inversion, edit_timesteps, inversion_timesteps
from ..memory import to_device
from ..progress import ProgressCallback, StageProgress
from .plan import DenoisePlan, frame_shards

if TYPE_CHECKING:
    from ..control import ControlCondition
    from ..families.base import Conditioning
    from ..options import EditOptions
    from ..pipeline import TokenFlowPipeline


class FrameRows:
    """The rows of some frames of a per-frame tensor, indexed by frame number like the whole
    (a rank's share of the source latents at one timestep)."""

    def __init__(self, rows: torch.Tensor, frames: list[int], n_frames: int) -> None:
        self.rows = rows
        self.index = torch.full((n_frames,), -1, dtype=torch.long)
        self.index[frames] = torch.arange(len(frames))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def __getitem__(self, frames: torch.Tensor) -> torch.Tensor:
        index = self.index[frames.cpu()]  # host work: the map is on the host
        if (index < 0).any():
            raise RuntimeError(f"frames {frames[index < 0].tolist()} are not held by this rank")
        return self.rows[to_device(index, self.rows.device)]


def shard_unit(pipe: TokenFlowPipeline) -> int:
    """Frames per shard border: whole VAE and inversion calls."""
    return math.lcm(pipe.vae_batch_size, pipe.inversion_batch_size)


def _shards(pipe: TokenFlowPipeline, n_frames: int, plan: DenoisePlan) -> list[range]:
    return frame_shards(n_frames, plan.comm.world, shard_unit(pipe))


def encode(
    pipe: TokenFlowPipeline,
    frames: np.ndarray,
    plan: DenoisePlan,
    progress: ProgressCallback | None,
) -> torch.Tensor:
    """Every frame's latents on every rank, each rank encoding its shard."""
    shards = _shards(pipe, len(frames), plan)
    mine = shards[plan.comm.rank]
    if len(mine):
        z = pipe.encode_frames(frames[mine.start : mine.stop], progress)
    else:
        h, w = (n // pipe.model.vae_scale_factor for n in frames.shape[1:3])
        channels = pipe.model.vae.config.latent_channels
        z = torch.empty((0, channels, h, w), device=pipe.device, dtype=pipe.dtype)
    return plan.comm.all_gather_rows(z, [len(s) for s in shards], "encoded frames")


def invert(
    pipe: TokenFlowPipeline,
    z0: torch.Tensor,
    inversion: Inversion | None,
    options: EditOptions,
    source: Conditioning,
    control: ControlCondition | None,
    progress: ProgressCallback | None,
    plan: DenoisePlan,
    on_inverted: Callable[[Inversion], None] | None,
) -> tuple[Inversion, int]:
    """This rank's source latents (see ``FrameRows``) and its UNet evaluations. ``inversion``
    (rank 0's, from the cache) is used when rank 0 has one; else every rank inverts its shard
    and rank 0 gathers them and hands the whole inversion to ``on_inverted`` (the cache)."""
    comm = plan.comm
    scheduler = pipe.model.new_scheduler()
    keep = edit_timesteps(scheduler, options.steps)
    final = inversion_timesteps(scheduler, options.inversion_steps, keep)[-1]
    timesteps = sorted(set(keep) | {final})
    store = torch.device("cpu") if pipe.device.type == "cuda" else pipe.device
    evaluations = 0
    if not comm.broadcast_object(inversion is not None, "the inversion cache's answer"):
        shards = _shards(pipe, len(z0), plan)
        mine = shards[comm.rank]
        if len(mine):
            inversion, evaluations = pipe._invert(
                z0[mine.start : mine.stop], options, scheduler, source, control, progress,
                offset=mine.start,
            )  # fmt: skip
        else:
            StageProgress(progress, "invert", 0)
            empty = z0[:0].to(store)
            inversion = Inversion({t: empty for t in timesteps}, final)
        counts = [len(s) for s in shards]
        latents = {
            t: comm.gather_rows(inversion.latents[t], counts, "inverted latents") for t in timesteps
        }
        inversion = Inversion(latents, final) if comm.rank == 0 else None
        if inversion is not None and on_inverted is not None:
            on_inverted(inversion)
    return _spread(inversion, len(z0), timesteps, final, z0, store, plan), evaluations


def _spread(
    whole: Inversion | None,
    n_frames: int,
    timesteps: list[int],
    final: int,
    like: torch.Tensor,
    store: torch.device,
    plan: DenoisePlan,
) -> Inversion:
    """Rank 0's whole inversion -> each rank's: its frames at the editing timesteps, every
    frame at the noisiest one (the edit's starting noise is drawn from all of them)."""
    comm = plan.comm
    needed = [plan.needed_frames(rank) for rank in range(comm.world)]
    shape = tuple(like.shape[1:])
    dtype = comm.broadcast_object(whole.final.dtype if whole else None, "the inversion's dtype")
    latents: dict[int, torch.Tensor | FrameRows] = {}
    for t in timesteps:
        rows = [list(range(n_frames)) if t == final else frames for frames in needed]
        if comm.rank == 0:
            sends = {r: whole.latents[t][rows[r]] for r in range(1, comm.world) if rows[r]}
            comm.exchange(sends, {}, "source latents")
            mine = whole.latents[t][rows[0]].to(store)
        else:
            want = {0: ((len(rows[comm.rank]), *shape), dtype)} if rows[comm.rank] else {}
            got = comm.exchange({}, want, "source latents", store)
            mine = got.get(0, like[:0].to(store, dtype))
        latents[t] = mine if t == final else FrameRows(mine, rows[comm.rank], n_frames)
    return Inversion(latents, final)


def decode(
    pipe: TokenFlowPipeline, latents: torch.Tensor, plan: DenoisePlan, stage: StageProgress
) -> np.ndarray:
    """Rank 0: every frame decoded, each rank decoding its shard; other ranks: no frames."""
    shards = _shards(pipe, len(latents), plan)
    mine = shards[plan.comm.rank]
    h, w = (n * pipe.model.vae_scale_factor for n in latents.shape[-2:])
    none = np.empty((0, h, w, 3), np.uint8)
    pixels = pipe._decode(latents[mine.start : mine.stop], stage) if len(mine) else none
    joined = plan.comm.gather_rows(
        torch.from_numpy(pixels), [len(s) for s in shards], "edited frames", per_round=16
    )
    return none if joined is None else joined.numpy()


def decoded_share(pipe: TokenFlowPipeline, n_frames: int, plan: DenoisePlan) -> int:
    """Frames this rank decodes (its stage's total)."""
    return len(_shards(pipe, n_frames, plan)[plan.comm.rank])


def summary(plan: DenoisePlan, evaluations: dict[str, int]) -> dict[str, Any]:
    """The edit's UNet evaluations summed over ranks (in place: the single-process counts),
    and what run.json says about the ranks: how many, the backend, how the denoising was
    split, and the bytes each rank received, by purpose."""
    comm = plan.comm
    everyone = comm.all_objects((dict(evaluations), comm.traffic()), "the edit's totals")
    for key in evaluations:
        evaluations[key] = sum(counts.get(key, 0) for counts, _ in everyone)
    return {
        "ranks": comm.world,
        "backend": comm.backend,
        "split": plan.mode,
        "received_bytes": [traffic for _, traffic in everyone],
    }
