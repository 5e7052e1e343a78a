"""Blocks, keyframe draws and the propagation weights that tie frames to keyframes.

Reference rule (the authors' code): split the clip into blocks of B consecutive frames and, at
every denoising step, draw one keyframe per block with
``torch.randint(B, (N // B,), generator=g) + b * B``. We make that exact call, so with
N % B == 0 the keyframes equal the authors' for the same seed. The authors drop the frames past
the last full block; we keep them as a last, shorter block of r = N % B frames whose keyframe is
drawn right after, with ``torch.randint(r, (1,), generator=g)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import Propagation


def block_bounds(n_frames: int, block_size: int) -> list[tuple[int, int]]:
    """[start, end) of every block; the last one may be shorter."""
    if block_size < 1:
        raise ValueError("block size must be at least 1")
    return [(s, min(s + block_size, n_frames)) for s in range(0, n_frames, block_size)]


class KeyframeSampler:
    """Draws one keyframe per block at each step (or the block centres, for the ablation)."""

    def __init__(self, n_frames: int, block_size: int, seed: int, fixed: bool = False) -> None:
        self.n_frames = n_frames
        self.block_size = block_size
        self.fixed = fixed
        self.bounds = block_bounds(n_frames, block_size)
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def draw(self) -> torch.Tensor:
        """Keyframe index of every block for the next step."""
        if self.fixed:
            return torch.tensor([s + (e - s) // 2 for s, e in self.bounds])
        n, b = self.n_frames, self.block_size
        offsets = torch.randint(b, (n // b,), generator=self.generator)
        if n % b:
            offsets = torch.cat([offsets, torch.randint(n % b, (1,), generator=self.generator)])
        return offsets + torch.arange(0, n, b)


def reference_propagation(
    bounds: list[tuple[int, int]], block: int, keyframes: torch.Tensor | None = None
) -> Propagation:
    """The authors' blend for the frames of ``block``: its keyframe and the previous block's.

    Weights come from the distances to the two block *centres* (start + length // 2):
    ``w = sigmoid(d_prev / (d_own + d_prev))``, whichever frames were drawn as keyframes.
    Block 0 uses its own keyframe alone.
    """
    start, end = bounds[block]
    frames = torch.arange(start, end)
    own = torch.full((end - start,), block)
    if block == 0:
        return Propagation(own, torch.full_like(own, -1), torch.ones(end - start))
    centre = start + (end - start) // 2
    prev_start, prev_end = bounds[block - 1]
    prev_centre = prev_start + (prev_end - prev_start) // 2
    d_own, d_prev = (frames - centre).abs(), (frames - prev_centre).abs()
    return Propagation(own, own - 1, torch.sigmoid(d_prev / (d_own + d_prev)))


def paper_propagation(
    bounds: list[tuple[int, int]], block: int, keyframes: torch.Tensor
) -> Propagation:
    """The paper's blend: the nearest keyframes before and after each frame.

    Weights are linear in true temporal distance: a frame at f between keyframes p < f < q gets
    ``(q - f) / (q - p)`` of p's tokens. A keyframe, or a frame before the first / after the
    last keyframe, takes the one nearest keyframe alone. Slots index ``keyframes`` (ascending).
    """
    start, end = bounds[block]
    kf = keyframes.tolist()
    slot_a, slot_b, weight = [], [], []
    for f in range(start, end):
        before = max((j for j, k in enumerate(kf) if k <= f), default=None)
        after = min((j for j, k in enumerate(kf) if k >= f), default=None)
        if before is None or after is None or before == after:
            slot_a.append(after if before is None else before)
            slot_b.append(-1)
            weight.append(1.0)
        else:
            p, q = kf[before], kf[after]
            slot_a.append(before)
            slot_b.append(after)
            weight.append((q - f) / (q - p))
    return Propagation(torch.tensor(slot_a), torch.tensor(slot_b), torch.tensor(weight))


@dataclass
class KeyframeWindow:
    """Keyframes edited jointly in one UNet call, and the blocks propagated from them.

    ``slots`` are keyframe (block) indices, ascending; ``local`` maps a propagation's global
    slots to positions in this window's recordings.
    """

    slots: list[int]
    blocks: list[int]

    def local(self, propagation: Propagation) -> Propagation:
        return propagation.relabel(self.slots)


def keyframe_windows(
    propagations: list[Propagation], max_keyframes: int = 0, overlap: int = 2
) -> list[KeyframeWindow]:
    """Split the keyframe pass into windows of at most ``max_keyframes`` keyframes (long video).

    ``max_keyframes`` 0, or at least the keyframe count: one window with every keyframe and every
    block (reference mode). Otherwise each window holds keyframe 0 as a shared *anchor* (every
    window attends to the same first keyframe, which ties their appearance together) plus a run
    of ``max_keyframes - 1`` consecutive keyframes; consecutive runs share ``overlap`` keyframes
    so the two keyframes a block blends are always edited in one window. Each block goes to the
    first window holding every keyframe it reads. Memory of a keyframe pass and of its
    recordings is then bounded by ``max_keyframes``, whatever the clip length.
    """
    count = len(propagations)
    if max_keyframes <= 0 or max_keyframes >= count:
        return [KeyframeWindow(list(range(count)), list(range(count)))]
    width = max_keyframes - 1
    if not 1 <= overlap < width:
        raise ValueError("need 1 <= overlap < max_keyframes - 1")
    runs, start = [], 1
    while True:
        runs.append(list(range(start, min(start + width, count))))
        if start + width >= count:
            break
        start += width - overlap
    windows = [KeyframeWindow([0, *run], []) for run in runs]
    for block, prop in enumerate(propagations):
        needed = set(prop.slots())
        home = next((w for w in windows if needed <= set(w.slots)), None)
        if home is None:
            raise ValueError(f"block {block} reads keyframes {sorted(needed)} in no one window")
        home.blocks.append(block)
    return [w for w in windows if w.blocks]
