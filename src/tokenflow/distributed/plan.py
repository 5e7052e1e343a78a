"""Who does what at each denoising step when one edit runs on several ranks.

Every rank draws the same keyframes (the structure's own seeded generator) and works out the
same plan from them, so no rank has to be told what the others do. Blocks go to ranks in
contiguous runs of about equal cost, fixed for the whole edit. Then, by structure:

* **shared** (TokenFlow in reference mode: one keyframe pass over every keyframe): each rank
  edits the keyframes of its own blocks; inside every extended-attention layer the keys and
  values of all keyframes are gathered in keyframe order and each rank attends for its own
  keyframes' queries, which is the single-process computation split by rows. A block that
  blends a keyframe edited on another rank (the first or last block of a run) receives just
  that keyframe's recordings, point to point;
* **windows** (long-video mode): windows are to ranks what blocks are, whole windows in
  contiguous runs; a window's keyframe pass and its blocks stay on one rank, so nothing is
  exchanged but the step's latents;
* **blocks** (baselines without keyframes): each rank denoises its blocks.

After every step the ranks all-gather the step's latents (a few KB per frame), so every rank
starts the next step from all of them, and rank 0 can checkpoint them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..context import Propagation
from ..keyframes import keyframe_windows
from ..methods import UNetPass, structure_for
from ..options import EditOptions
from ..recordings import KeyframeRecordings
from .comm import Communicator


def balanced_runs(costs: Sequence[float], parts: int) -> list[range]:
    """Items cut into ``parts`` contiguous runs of about equal total cost, in order.

    Every run holds at least one item while items remain (so with fewer items than parts the
    last runs are empty); each cut is put where the running cost is nearest its share.
    """
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    cuts = [0]
    for k in range(1, parts):
        low = min(cuts[-1] + 1, n)
        high = max(low, n - (parts - k))
        target = prefix[-1] * k / parts
        cuts.append(min(range(low, high + 1), key=lambda c: (abs(prefix[c] - target), c)))
    cuts.append(n)
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def frame_shards(n_frames: int, parts: int, unit: int) -> list[range]:
    """Frames cut into ``parts`` contiguous shards whose borders are multiples of ``unit``.

    With ``unit`` the frames per VAE and inversion call, every rank makes exactly the calls
    the single-process run makes for its frames, so their results are the same bit for bit.
    """
    units = [min(unit, n_frames - u) for u in range(0, n_frames, unit)]
    runs = balanced_runs(units, parts)
    return [range(min(r.start * unit, n_frames), min(r.stop * unit, n_frames)) for r in runs]


class KeyframeShare:
    """One rank's part of a keyframe pass split over ranks by keyframes (see the module
    docstring): what the attention processors gather, and which recordings are swapped."""

    def __init__(
        self,
        comm: Communicator,
        group: Any,
        counts: list[int],
        sends: dict[int, list[int]],
        receives: dict[int, int],
    ) -> None:
        self.comm = comm
        self.group = group
        self.counts = counts  # keyframes of each rank of ``group``, in keyframe order
        self.sends = sends  # rank -> this rank's recording rows it needs
        self.receives = receives  # rank -> how many keyframes it sends here

    @property
    def total(self) -> int:
        """Keyframes of the whole pass: its calls are batched as the single-process ones."""
        return sum(self.counts)

    def keys_values(
        self, k: torch.Tensor, v: torch.Tensor, branches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``branches`` branches of this rank's keyframes -> those of all
        keyframes, branch after branch, each in keyframe order."""
        n = k.shape[0] // branches
        both = torch.stack([k, v]).view(2, branches, n, *k.shape[1:])
        full = self.comm.all_gather_rows(
            both, self.counts, "keyframe keys/values", dim=2, group=self.group
        )
        full = full.reshape(2, -1, *k.shape[1:])
        return full[0], full[1]

    def exchange_recordings(self, recordings: KeyframeRecordings) -> None:
        """Send the recordings other ranks' blocks blend, receive those this rank's blend;
        received keyframes are appended after this rank's own, senders in rank order."""
        parts = sorted(recordings.parts(), key=lambda key: (key[0], str(key[1])))
        layouts = [recordings.row_layout(*key) for key in parts]
        dtypes = {dtype for _, dtype in layouts}
        if len(dtypes) > 1:
            raise RuntimeError(f"keyframe recordings of several dtypes: {sorted(map(str, dtypes))}")
        (dtype,) = dtypes
        per_row = sum(math.prod(shape) for shape, _ in layouts)
        sends = {
            rank: torch.cat([recordings.get(*key, rows).reshape(-1) for key in parts])
            for rank, rows in self.sends.items()
        }
        receives = {rank: ((rows * per_row,), dtype) for rank, rows in self.receives.items()}
        received = self.comm.exchange(sends, receives, "keyframe recordings")
        for rank in sorted(received):
            rows, offset = self.receives[rank], 0
            for key, (shape, _) in zip(parts, layouts, strict=True):
                size = rows * math.prod(shape)
                recordings.extend(*key, received[rank][offset : offset + size].view(rows, *shape))
                offset += size


@dataclass
class StepWork:
    """One step as one rank runs it: its passes, and every rank's blocks (whose latents each
    contributes to the step's all-gather, in rank order)."""

    passes: list[UNetPass]
    blocks: list[list[int]]


class DenoisePlan:
    """The distribution of one edit's denoising over the group's ranks (module docstring)."""

    def __init__(self, comm: Communicator, n_frames: int, options: EditOptions) -> None:
        self.comm = comm
        structure = structure_for(n_frames, options)  # a fresh one: only its layout is read
        self.bounds = structure.bounds
        self.block_size = options.block_size
        sizes = [e - s for s, e in self.bounds]
        if "keyframes" not in structure.counters:
            self.mode = "blocks"
            self.block_runs = balanced_runs(sizes, comm.world)
        else:
            own_slot = [
                Propagation(torch.tensor([b]), torch.tensor([-1]), torch.tensor([1.0]))
                for b in range(len(self.bounds))
            ]  # every block reads its own keyframe: no window is left empty
            windows = keyframe_windows(own_slot, options.max_keyframes, options.keyframe_overlap)
            if len(windows) == 1:
                self.mode = "shared"
                self.block_runs = balanced_runs([s + 1 for s in sizes], comm.world)
            else:
                self.mode = "windows"
                costs = [len(w.slots) + sum(sizes[b] for b in w.blocks) for w in windows]
                runs = balanced_runs(costs, comm.world)
                self.window_owner = {
                    tuple(windows[i].slots): rank for rank, run in enumerate(runs) for i in run
                }
                self.window_blocks = [
                    sorted({b for i in run for b in windows[i].slots}) for run in runs
                ]
                self.block_runs = [
                    range(0)
                    if not run
                    else range(windows[run[0]].blocks[0], windows[run[-1]].blocks[-1] + 1)
                    for run in runs
                ]
        self.owner = {b: r for r, run in enumerate(self.block_runs) for b in run}
        self.group = None
        if self.mode == "shared":
            self.sharing = [r for r, run in enumerate(self.block_runs) if run]
            self.group = comm.new_group(self.sharing)

    # -- what each rank holds -------------------------------------------------------------------

    def _frames_of(self, blocks) -> list[int]:
        return [f for b in blocks for f in range(*self.bounds[b])]

    def needed_frames(self, rank: int) -> list[int]:
        """The frames whose source latents ``rank`` reads: those of its blocks, and in
        long-video mode those of every keyframe its windows may edit."""
        if self.mode == "windows":
            return self._frames_of(self.window_blocks[rank])
        return self._frames_of(self.block_runs[rank])

    def frames_per_step(self) -> int:
        """Frames this rank denoises per step (long-video mode: as the windows were cut)."""
        return len(self._frames_of(self.block_runs[self.comm.rank]))

    # -- one step ---------------------------------------------------------------------------

    def assign(self, passes: list[UNetPass]) -> StepWork:
        """This rank's share of a step's passes (as every rank would work it out)."""
        if self.mode == "shared":
            return self._share(passes)
        blocks: list[list[int]] = [[] for _ in range(self.comm.world)]
        mine, owner = [], None
        for unet_pass in passes:
            if unet_pass.records:
                if self.mode != "windows":
                    raise RuntimeError("a keyframe pass in a structure planned without one")
                slots = tuple(int(f) // self.block_size for f in unet_pass.frames)
                owner = self.window_owner[slots]
            elif self.mode == "blocks":
                owner = self.owner[unet_pass.block]
            if unet_pass.block is not None:
                blocks[owner].append(unet_pass.block)
            if owner == self.comm.rank:
                mine.append(unet_pass)
        return StepWork(mine, blocks)

    def _share(self, passes: list[UNetPass]) -> StepWork:
        keyframe_pass, block_passes = passes[0], passes[1:]
        if not keyframe_pass.records or len(keyframe_pass.frames) != len(self.bounds):
            raise RuntimeError("reference mode: expected one keyframe pass over every block")
        rank = self.comm.rank
        blocks = [list(run) for run in self.block_runs]
        needs: dict[tuple[int, int], set[int]] = defaultdict(set)  # (from, to) -> keyframes
        for unet_pass in block_passes:
            to = self.owner[unet_pass.block]
            for slot in unet_pass.propagation.slots():
                if self.owner[slot] != to:
                    needs[self.owner[slot], to].add(slot)
        own = blocks[rank]
        if not own:
            return StepWork([], blocks)
        row = {slot: i for i, slot in enumerate(own)}
        received = [
            s for (_, to), slots in sorted(needs.items()) if to == rank for s in sorted(slots)
        ]
        share = KeyframeShare(
            self.comm,
            self.group,
            [len(blocks[r]) for r in self.sharing],
            {
                to: [row[s] for s in sorted(slots)]
                for (fr, to), slots in needs.items()
                if fr == rank
            },
            {fr: len(slots) for (fr, to), slots in needs.items() if to == rank},
        )
        rows = own + received  # keyframe slot of each recording row on this rank
        mine = [replace(keyframe_pass, frames=keyframe_pass.frames[own], share=share)]
        mine += [
            replace(p, propagation=p.propagation.relabel(rows))
            for p in block_passes
            if self.owner[p.block] == rank
        ]
        return StepWork(mine, blocks)

    def gather_latents(
        self, denoised: dict[int, list[torch.Tensor]], work: StepWork, xs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Every rank's denoised blocks -> each prompt's latents of all frames, on every rank
        (``xs``: the step's starting latents, for their shape)."""
        mine = work.blocks[self.comm.rank]
        local = torch.stack(
            [torch.cat([denoised[b][p] for b in mine]) if mine else x[:0] for p, x in enumerate(xs)]
        )
        counts = [len(self._frames_of(blocks)) for blocks in work.blocks]
        full = self.comm.all_gather_rows(local, counts, "latents", dim=1)
        order = [b for blocks in work.blocks for b in blocks]
        if sorted(order) != list(range(len(self.bounds))):
            raise RuntimeError(f"the ranks denoised blocks {order}, not each block once")
        if order != sorted(order):  # back to frame order
            index = torch.tensor(self._frames_of(order), device=full.device)
            full = torch.empty_like(full).index_copy_(1, index, full)
        return list(full.unbind(0))
