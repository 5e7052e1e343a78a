"""DDIM inversion of the source latents.

The source branch of every editing step needs the source frames' latents at that step's
timestep, so inversion walks the DDIM schedule upwards and keeps the latents at each editing
timestep plus the noisiest one (from which the initial noise is derived).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import TokenFlowError


@dataclass
class Inversion:
    """Source latents by timestep: ``latents[t]`` is (frames, 4, h, w) at timestep ``t``."""

    latents: dict[int, torch.Tensor]
    final_timestep: int

    @property
    def final(self) -> torch.Tensor:
        return self.latents[self.final_timestep]

    def frames(self, start: int, end: int) -> Inversion:
        """The inversion of a span of frames (per-frame independent, so slicing is exact)."""
        return Inversion({t: z[start:end] for t, z in self.latents.items()}, self.final_timestep)

    def select(self, indices: list[int]) -> Inversion:
        """The inversion of some frames, in the order given (exact, as for ``frames``)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return Inversion(
            {t: z.index_select(0, index.to(z.device)) for t, z in self.latents.items()},
            self.final_timestep,
        )


def edit_timesteps(scheduler, steps: int) -> list[int]:
    """The editing schedule's timesteps, noisiest first."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def _timesteps(scheduler, steps: int) -> list[int]:
    scheduler.set_timesteps(steps)
    return [int(t) for t in reversed(scheduler.timesteps)]


def inversion_timesteps(scheduler, inversion_steps: int, keep: list[int]) -> list[int]:
    """Ascending inversion timesteps; checks that every editing timestep (``keep``) is among
    them."""
    timesteps = _timesteps(scheduler, inversion_steps)
    if set(keep) <= set(timesteps):
        return timesteps
    limit = scheduler.config.num_train_timesteps
    valid = next(
        (
            s
            for s in range(inversion_steps, limit + 1)
            if set(keep) <= set(_timesteps(scheduler, s))
        ),
        limit,
    )
    _timesteps(scheduler, inversion_steps)
    raise TokenFlowError(
        f"`inversion_steps` {inversion_steps} does not pass through the editing timesteps;"
        f" use {valid} (the inversion must stop at every editing step)"
    )


def _latent_store(
    like: torch.Tensor, frames: int, device: torch.device | str | None
) -> torch.Tensor:
    """Room for one timestep's latents of every frame. Host room for a GPU model's latents is
    pinned (page-locked): the GPU writes into it while it goes on, and the editing steps read it
    back asynchronously, overlapped with compute."""
    device = like.device if device is None else torch.device(device)
    pinned = like.is_cuda and device.type == "cpu"
    shape = (frames, *like.shape[1:])
    return torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pinned)


@torch.no_grad()
def ddim_invert(
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    inversion_steps: int,
    keep: list[int],
    batch_size: int = 8,
    on_step: Callable[[int], None] | None = None,
    store_device: torch.device | str | None = None,
) -> Inversion:
    """Invert ``latents`` (frames, 4, h, w) along DDIM's deterministic path.

    ``predict_noise(z, t, frames)`` is the UNet's noise prediction for the frames with indices
    ``frames``, with the inversion prompt (no
    guidance). At step i, with ᾱ_prev = ᾱ[t_{i-1}] (``final_alpha_cumprod`` for the first step):
    x0 = (z − √(1−ᾱ_prev)·ε) / √ᾱ_prev and z ← √ᾱ[t_i]·x0 + √(1−ᾱ[t_i])·ε. Frames are
    independent, so they are processed in batches of ``batch_size``, each through all steps.
    Returns the latents at the timesteps in ``keep`` and at the last (noisiest) one, on
    ``store_device`` if given (host RAM for a GPU model: (S+1)·N latents need not occupy it).
    """
    timesteps = inversion_timesteps(scheduler, inversion_steps, keep)
    alphas = scheduler.alphas_cumprod
    kept = {t: _latent_store(latents, len(latents), store_device) for t in {*keep, timesteps[-1]}}
    # on the device once: a tensor made from a host value per call would be a copy that makes a
    # GPU drain its queue before every call
    on_device = torch.tensor(timesteps, device=latents.device)
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size].clone()
        frames = torch.arange(start, start + len(z))
        alpha_prev = scheduler.final_alpha_cumprod
        for t, t_on_device in zip(timesteps, on_device, strict=True):
            alpha = alphas[t]
            eps = predict_noise(z, t_on_device, frames)
            x0 = (z - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
            z = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps
            alpha_prev = alpha
            if t in kept:
                kept[t][start : start + len(z)].copy_(z, non_blocking=True)
            if on_step is not None:
                on_step(z.shape[0])
    if latents.is_cuda:  # the host copies must have landed before anyone reads them
        torch.cuda.synchronize(latents.device)
    return Inversion(dict(sorted(kept.items())), timesteps[-1])
