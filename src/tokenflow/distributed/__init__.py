"""One edit over several ranks with ``torch.distributed`` (``torchrun``; NCCL between GPUs,
gloo between CPUs), with the single-process results.

Without an initialised process group nothing here runs. With one (the caller's, or the one
``torchrun`` describes, joined by ``launch.join``), ``TokenFlowPipeline.edit_prompts`` runs
on every rank: the frames are sharded for the VAE and the inversion (``stages.py``), the
denoising is split by blocks, keyframes or long-video windows (``plan.py``) with PyTorch's
own collectives and point-to-point transfers (``comm.py``), and a rank that fails or dies
stops all of them with one line naming it (``faults.py``).
"""

from .faults import RankFailure, failure_guard, stopped_by_signal
from .launch import join, launch_rank, launch_world, launched, leave

__all__ = [
    "RankFailure",
    "failure_guard",
    "join",
    "launch_rank",
    "launch_world",
    "launched",
    "leave",
    "stopped_by_signal",
]
