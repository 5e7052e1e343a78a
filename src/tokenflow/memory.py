"""Host memory: freed heap pages back to the OS at stage boundaries, and copies to a GPU that
do not stall it."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch


def to_device(
    x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x`` on ``device`` (in ``dtype``), without making a GPU wait.

    A copy to a GPU from ordinary (pageable) host memory -- including the index a list or host
    tensor becomes when it indexes a GPU tensor -- first waits for all the work queued on the
    GPU, so the host can no longer run ahead of it. From pinned memory the copy joins the queue
    like a kernel; torch's caching host allocator keeps the pinned block until it has landed.
    """
    if torch.device(device).type != "cuda" or x.device.type != "cpu":
        return x.to(device, dtype)
    staged = x if x.is_pinned() else x.pin_memory()
    return staged.to(device, non_blocking=True).to(dtype or x.dtype)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc; a no-op elsewhere).

    Each stage allocates differently shaped activations (16-frame inversion batches, then the
    keyframe pass's, then 24-entry block passes), and glibc keeps what one stage freed, too
    fragmented for the next to reuse: on a 480-frame clip that added 126 MB to the peak. The
    next stage faults its pages in again, so this is for stage boundaries, not every call.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
