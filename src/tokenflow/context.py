"""What the current UNet call must do, shared by every TokenFlow processor and hook.

The denoising loop makes several kinds of UNet call (keyframe pass, per-block pass, inversion,
baselines). Rather than giving every layer its own flags, the loop describes the call once in a
``UNetCall`` and the attention processors / residual hook read it from the shared
``TokenFlowContext``.

Batch layout of every call: ``branches`` groups of ``n`` frames each, concatenated along the
batch axis. An edit of P prompts has 1 + 2P branches, numbered: 0 the source (the inverted
source latents with the inversion prompt), then an unconditional and a conditional branch per
prompt (2p + 1 and 2p + 2 for prompt p). One prompt gives the authors' three (source, uncond,
cond). A call carries a run of consecutive branches starting at ``first_branch``; when a pass
needs more than one call, the source runs in the first and keeps what the later ones read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from .memory import to_device
from .recordings import KeyframeRecordings
from .timing import StageClock

if TYPE_CHECKING:
    from .distributed.plan import KeyframeShare


class AttentionMode(str, Enum):
    """How self-attention behaves in a call."""

    FRAME = "frame"  # every frame attends to its own tokens (plain self-attention)
    EXTENDED = "extended"  # each edited branch attends jointly over all frames of the call
    PROPAGATE = "propagate"  # no attention: copy recorded keyframe tokens along correspondences


@dataclass
class Propagation:
    """Where each frame of a propagate call takes its tokens from.

    ``slot_a``/``slot_b`` index the keyframes recorded by the last keyframe pass (``-1`` in
    ``slot_b``: only one keyframe); frame tokens are ``w * tokens_a + (1 - w) * tokens_b``.
    """

    slot_a: torch.Tensor
    slot_b: torch.Tensor
    weight_a: torch.Tensor

    def __post_init__(self) -> None:
        if not (len(self.slot_a) == len(self.slot_b) == len(self.weight_a)):
            raise ValueError("slot_a, slot_b and weight_a must have one entry per frame")

    def slots(self) -> list[int]:
        """The recorded keyframes these frames read, ascending."""
        return sorted(set(self.slot_a.tolist()) | {s for s in self.slot_b.tolist() if s >= 0})

    def compact(self) -> tuple[list[int], Propagation]:
        """The keyframes read, and this propagation renumbered over just those: worked out
        once per call (on the host, from the plan), then used by every self-attention layer."""
        if "_compact" not in self.__dict__:
            slots = self.slots()
            self.__dict__["_compact"] = slots, self.relabel(slots)
        return self.__dict__["_compact"]

    def relabel(self, slots: list[int]) -> Propagation:
        """The same propagation with slot ``slots[i]`` renamed ``i``; ``slots`` must hold all."""
        if slots == list(range(len(slots))):
            return self
        lookup = torch.full((max(slots) + 1,), -1, dtype=torch.long)
        lookup[slots] = torch.arange(len(slots))
        slot_b = torch.where(self.slot_b >= 0, lookup[self.slot_b.clamp(min=0)], -1)
        return Propagation(lookup[self.slot_a], slot_b, self.weight_a)

    def on(self, device: torch.device, dtype: torch.dtype) -> Propagation:
        """The plan as the propagation kernels take it, on ``device``: a frame with one keyframe
        reads keyframe ``slot_a`` twice with weight 1 (no -1 left to branch on). Made once per
        call and device, then shared by every layer."""
        forms = self.__dict__.setdefault("_forms", {})
        if (device, dtype) not in forms:
            single = self.slot_b < 0
            forms[device, dtype] = Propagation(
                to_device(self.slot_a, device),
                to_device(torch.where(single, self.slot_a, self.slot_b), device),
                to_device(torch.where(single, 1.0, self.weight_a), device, dtype),
            )
        return forms[device, dtype]


@dataclass
class UNetCall:
    """The behaviour of one UNet evaluation."""

    mode: AttentionMode = AttentionMode.FRAME
    branches: int = 1
    has_source: bool = False  # branch 0 is the source branch (attends alone, donates q/k)
    # the source branch ran in an earlier call of this pass: its inputs are read from what that
    # call kept (the keyframe recordings, or the context's ``pass_source``)
    recorded_source: bool = False
    # later calls of this pass hold the edited branches: keep the source's inputs for them
    keep_source: bool = False
    first_branch: int = 0  # the batch's first branch (0 source, then uncond/cond per prompt)
    inject_qk: bool = False  # PnP: source queries/keys replace the edited ones (chosen layers)
    inject_residual: bool = False  # PnP: source residual features replace the edited ones
    record: bool = False  # keep this call's self-attention inputs/outputs as keyframe tokens
    propagation: Propagation | None = None

    def __post_init__(self) -> None:
        if self.mode is AttentionMode.PROPAGATE and self.propagation is None:
            raise ValueError("a propagate call needs a Propagation")
        has_source = self.has_source or self.recorded_source
        if (self.inject_qk or self.inject_residual) and not has_source:
            raise ValueError("injection needs a source branch")
        if self.has_source and self.recorded_source:
            raise ValueError("the source branch is either in the batch or recorded, not both")
        if self.keep_source and not self.has_source:
            raise ValueError("only a call holding the source branch can keep it")

    @property
    def edits(self) -> bool:
        """Whether the batch holds an edited branch (injection has somewhere to go)."""
        return self.branches > int(self.has_source)

    @property
    def branch_ids(self) -> range:
        """The branches of the batch, in order (their recordings are stored by these)."""
        return range(self.first_branch, self.first_branch + self.branches)


@dataclass
class TokenFlowContext:
    """Shared state between the denoising loop and the layers it patched.

    ``trace``, when a list, receives ``(step, kind, layer)`` for every injection and recording,
    so tests can check that they happen exactly where the schedule says.
    """

    call: UNetCall = field(default_factory=UNetCall)
    step: int = -1
    trace: list[tuple[int, str, str]] | None = None
    correspondence_chunk_bytes: int = 16 * 2**20
    attention_chunk_tokens: int = 0  # 0: let SDPA take all queries at once
    clock: StageClock | None = None  # when set: the propagation's "correspondence" is timed
    recordings: KeyframeRecordings = field(default_factory=KeyframeRecordings)
    # the source's attention inputs (by layer) and residual features of the current pass, kept
    # by its first call for its later ones (see ``UNetCall.keep_source``); cleared every pass
    pass_source: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    # during a keyframe pass split over ranks: this rank's part (its extended attention
    # gathers every keyframe's keys/values through it; distributed/plan.py)
    share: KeyframeShare | None = None

    def log(self, kind: str, layer: str) -> None:
        if self.trace is not None:
            self.trace.append((self.step, kind, layer))
