"""Joining the process group that ``torchrun`` describes in the environment.

``torchrun --nproc-per-node N [--nnodes ...] -m tokenflow edit ...`` starts N processes per
node with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address set; an edit then
joins the group once: NCCL with one GPU per process (``LOCAL_RANK``) when it runs on CUDA, gloo
otherwise, with the ``rank_timeout`` the options give, which bounds how long a rank waits for a
peer that hangs. A process started any other way is a single-process run, unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..loading import resolve_device
from ..options import EditOptions
from .comm import Communicator, active

_joined = False  # whether this module initialised the group (and so takes it down)


def launched() -> bool:
    """Whether torchrun (or another launcher of its kind) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def launch_rank() -> int | None:
    """This process's rank as the launcher says, before any group exists; None if not launched."""
    return int(os.environ["RANK"]) if launched() else None


def launch_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def join(options: EditOptions) -> Communicator | None:
    """The communicator of the group this edit runs in: an initialised group (the Python API's
    caller's), else the one torchrun describes, joined now; None for a single-process run."""
    global _joined
    if active():
        return Communicator()
    if not launched():
        return None
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=options.rank_timeout))
    _joined = True
    return Communicator()


def leave() -> None:
    """Take down the group this module joined (after a successful edit)."""
    global _joined
    if _joined and active():
        dist.destroy_process_group()
    _joined = False
