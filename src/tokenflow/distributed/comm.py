"""This process's place in a ``torch.distributed`` group, and the few exchanges an edit makes.

Every transfer goes through PyTorch's own runtime (NCCL between GPUs, gloo between CPUs); this
module only shapes tensors for it: uneven shares are padded to the largest for a collective
and cut back after, point-to-point transfers are batched, and tensors travel on the backend's
device (the GPU for NCCL, host memory for gloo) and come back where they were. Each call counts
the bytes this rank receives, by purpose, for run.json and the benchmark.

A failed transfer means another rank is gone or stuck: it becomes a ``PeerLost``, so that the
fault handling (``faults.py``) can tell it from this rank's own errors.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TokenFlowError, first_line


class PeerLost(TokenFlowError):
    """A transfer with another rank failed: the cause lies with another rank (see faults.py)."""

    exit_code = 1


def active() -> bool:
    """Whether an edit here runs over ranks: a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class Communicator:
    """The group's ranks as one edit sees them; ``Communicator.current()`` is None without a
    process group, and then nothing in the engine changes."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = str(dist.get_backend())
        if self.backend == "nccl":
            self.wire = torch.device("cuda", torch.cuda.current_device())
        else:
            self.wire = torch.device("cpu")
        #: bytes this rank received, by purpose (padding included: it crosses the wire too)
        self.received: Counter[str] = Counter()
        #: sub-groups made for this edit, destroyed when it ends (``release_groups``)
        self.groups: list[Any] = []

    @classmethod
    def current(cls) -> Communicator | None:
        return cls() if active() else None

    def __repr__(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.backend})"

    # -- collectives --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as error:  # gloo/NCCL errors, timeouts, closed connections
            first = first_line(error) or type(error).__name__
            raise PeerLost(f"lost contact with the other ranks during {what} ({first})") from error

    def all_gather_rows(
        self,
        x: torch.Tensor,
        counts: Sequence[int],
        what: str,
        dim: int = 0,
        group: Any = None,
    ) -> torch.Tensor:
        """Every rank's ``x`` joined along ``dim`` in rank order; ``counts[i]``: rows of the
        i-th rank of ``group`` (the world when None) along ``dim``."""
        size = max(counts)
        wire = x.to(self.wire)
        if wire.shape[dim] < size:
            shape = list(wire.shape)
            shape[dim] = size - wire.shape[dim]
            wire = torch.cat([wire, wire.new_zeros(shape)], dim)
        wire = wire.contiguous()
        parts = [torch.empty_like(wire) for _ in counts]
        with self._talking(what):
            dist.all_gather(parts, wire, group=group)
        self.received[what] += wire.numel() * wire.element_size() * (len(counts) - 1)
        joined = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, counts, strict=True)], dim)
        return joined.to(x.device)

    def exchange(
        self,
        sends: dict[int, torch.Tensor],
        receives: dict[int, tuple[tuple[int, ...], torch.dtype]],
        what: str,
        device: torch.device | str | None = None,
    ) -> dict[int, torch.Tensor]:
        """Point-to-point: send each ``sends[rank]``, receive a tensor of each
        ``receives[rank]`` (shape, dtype), all at once; received tensors land on ``device``."""
        ops, received = [], {}
        for peer, tensor in sorted(sends.items()):
            ops.append(dist.P2POp(dist.isend, tensor.to(self.wire).contiguous(), peer))
        for peer, (shape, dtype) in sorted(receives.items()):
            received[peer] = torch.empty(shape, dtype=dtype, device=self.wire)
            ops.append(dist.P2POp(dist.irecv, received[peer], peer))
        if ops:
            with self._talking(what):
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
        for tensor in received.values():
            self.received[what] += tensor.numel() * tensor.element_size()
        if device is None:
            return received
        return {peer: tensor.to(device) for peer, tensor in received.items()}

    def gather_rows(
        self, x: torch.Tensor, counts: Sequence[int], what: str, per_round: int = 0
    ) -> torch.Tensor | None:
        """Every rank's rows of ``x`` joined in rank order on rank 0, the one that writes
        (None elsewhere); ``counts``: each rank's rows; ``per_round`` rows at most travel from
        each rank at once (0: all), which bounds the receiver's memory on the wire device."""
        shape, step = tuple(x.shape[1:]), per_round or max(max(counts), 1)
        pieces: list[list[torch.Tensor]] = [[] for _ in counts]
        for start in range(0, max(counts), step):
            if self.rank == 0:
                receives = {
                    rank: ((min(step, n - start), *shape), x.dtype)
                    for rank, n in enumerate(counts)
                    if rank != 0 and n > start
                }
                for rank, part in self.exchange({}, receives, what, x.device).items():
                    pieces[rank].append(part)
            elif counts[self.rank] > start:
                self.exchange({0: x[start : start + step]}, {}, what)
        if self.rank != 0:
            return None
        pieces[0] = [x]
        return torch.cat([part for parts in pieces for part in parts])

    def broadcast_object(self, value: Any, what: str) -> Any:
        """``value`` of rank 0 (the one that reads the cache and the checkpoint) on every rank
        (small objects: flags, a checkpoint)."""
        box = [value if self.rank == 0 else None]
        with self._talking(what):
            dist.broadcast_object_list(box, src=0, device=self.wire)
        return box[0]

    def all_objects(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order (small objects: counts, statistics)."""
        out: list[Any] = [None] * self.world
        with self._talking(what):
            dist.all_gather_object(out, value)
        return out

    def new_group(self, ranks: Sequence[int]) -> Any:
        """A sub-group of ``ranks`` (every rank must call this, in the same order); None for
        the whole world. It lives until ``release_groups``: a group left alive per edit would
        pile up in a process that runs many."""
        if list(ranks) == list(range(self.world)):
            return None
        with self._talking("setting up a group of ranks"):
            group = dist.new_group(list(ranks))
        self.groups.append(group)  # on the ranks outside it too: each rank releases the same
        return group

    def release_groups(self) -> None:
        """Destroy the sub-groups ``new_group`` made, newest first. Every rank calls this at
        the same point (the end of the edit), as it called ``new_group``: some NCCL versions
        take a communicator down collectively."""
        while self.groups:
            group = self.groups.pop()
            # a rank outside the group holds a placeholder, which destroying leaves alone; a
            # world taken down already took its sub-groups with it
            if dist.is_initialized():
                dist.destroy_process_group(group)

    def traffic(self) -> dict[str, int]:
        return dict(self.received)
