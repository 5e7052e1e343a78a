"""The denoising loop: at every step, the UNet passes a structure asks for, then DDIM.

Every editing UNet call carries three branches of the same frames, concatenated along the batch
axis: the source (its inverted latents at this timestep, with the inversion prompt), the
unconditional and the conditional branch (the latents being edited, with the negative and the
target prompt). Only the last two are used for classifier-free guidance; the source branch
donates features (PnP injection) and correspondences (propagation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .context import UNetCall
from .control import ControlCondition
from .errors import NonFiniteError
from .families.base import Conditioning
from .install import TokenFlowUNet
from .inversion import Inversion, edit_timesteps
from .memory import release_freed_memory
from .methods import Injection, UNetPass, method_for, structure_for
from .options import EditOptions
from .progress import StageProgress

ALL_BRANCHES = (0, 1, 2)  # the batch groups of an editing call: source, uncond, cond
# keyframe passes of up to this many keyframes run their three branches in one UNet call, as
# the authors batch them; larger ones (long clips in reference mode) one branch at a time
JOINT_KEYFRAMES = 8
STAGE_OF_KIND = {"keyframes": "keyframe_passes", "propagation": "block_passes"}


@dataclass
class Denoised:
    """The loop's result and what it cost."""

    latents: torch.Tensor
    keyframes: list[list[int]]
    evaluations: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)


def initial_latents(
    scheduler, z0: torch.Tensor, inversion: Inversion, t0: int, noise: str, seed: int
) -> torch.Tensor:
    """Noise the clean latents to ``t0``.

    ``ddim``: with the noise implied by the inversion's end, ε_T = (z_T − √ᾱ_T·z0) / √(1−ᾱ_T);
    ``random``: with Gaussian noise drawn from ``seed`` (the same draw for every frame, as
    the authors intended). Then DDIM's ``add_noise(z0, ε, t0)``.
    """
    if noise == "ddim":
        alpha_t = scheduler.alphas_cumprod[inversion.final_timestep]
        eps = (inversion.final.to(z0) - alpha_t**0.5 * z0) / (1 - alpha_t) ** 0.5
    else:
        g = torch.Generator("cpu").manual_seed(seed)
        eps = torch.randn(z0.shape[1:], generator=g).to(z0).expand_as(z0)
    return scheduler.add_noise(z0, eps, torch.tensor([t0]))


def denoise(
    unet: TokenFlowUNet,
    scheduler,
    z0: torch.Tensor,
    inversion: Inversion,
    branches: list[Conditioning],
    options: EditOptions,
    control: ControlCondition | None = None,
    progress: StageProgress | None = None,
) -> Denoised:
    """Edit the latents ``z0`` (frames, 4, h, w) as ``options`` say; ``branches`` holds the
    conditioning of the source, unconditional and conditional branch."""
    method = method_for(options)
    structure = structure_for(len(z0), options)
    timesteps = edit_timesteps(scheduler, options.steps)[method.first_step() :]
    runner = _PassRunner(unet, branches, control, scheduler, options.guidance_scale, progress)
    runner.counts.update(dict.fromkeys(structure.counters, 0))
    x = initial_latents(scheduler, z0, inversion, timesteps[0], options.noise, options.seed)
    for i, t in enumerate(timesteps):
        unet.context.step = i
        # 1. what the method injects at this step
        injection = method.injection(i)
        # 2. the structure's UNet passes, each block's latents one DDIM step further
        source = inversion.latents[t]  # stays where it is stored; each call moves its frames
        denoised = {}
        for unet_pass in structure.step():
            noise = runner.run(unet_pass, source, x, torch.tensor(t, device=x.device), injection)
            if unet_pass.block is not None:
                denoised[unet_pass.block] = runner.ddim(noise, t, x[unet_pass.frames])
        unet.clear_keyframes()
        # 3. the step's latents, in frame order
        x = torch.cat([denoised[b] for b in sorted(denoised)])
        check_finite(x, f"latents at step {i + 1}")
    release_freed_memory()
    return Denoised(x, structure.keyframes, runner.counts, runner.timings)


class _PassRunner:
    """Runs one ``UNetPass``: batch the branches, call the UNet, count and time it."""

    def __init__(
        self,
        unet: TokenFlowUNet,
        branches: list[Conditioning],
        control: ControlCondition | None,
        scheduler,
        guidance_scale: float,
        progress: StageProgress | None,
    ) -> None:
        self.unet = unet
        self.branches = branches
        self.control = control
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.progress = progress
        self.counts: dict[str, int] = {}
        self.timings = {"keyframe_passes": 0.0, "block_passes": 0.0, "correspondence": 0.0}
        unet.context.timings = self.timings

    def run(
        self,
        unet_pass: UNetPass,
        source: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        injection: Injection,
    ) -> torch.Tensor:
        clock, before = self._clock(x), self.unet.evaluations
        if unet_pass.records:
            # drop the previous recordings before the next pass makes new ones, so two sets
            # never coexist
            self.unet.clear_keyframes()
            noise = self._keyframe_pass(unet_pass, source, x, t, injection)
        else:
            call = _call(unet_pass, injection, ALL_BRANCHES)
            noise = self._predict(unet_pass.frames, source, x, t, call)
        self.counts[unet_pass.kind] += self.unet.evaluations - before
        self.timings[STAGE_OF_KIND.get(unet_pass.kind, "block_passes")] += self._clock(x) - clock
        if self.progress is not None:  # also the place where a caller may stop the job
            self.progress.advance(0 if unet_pass.records else len(unet_pass.frames))
        return noise

    def _keyframe_pass(
        self,
        unet_pass: UNetPass,
        source: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        injection: Injection,
    ) -> None:
        """Edit the keyframes jointly and record their tokens for the block passes.

        Up to ``JOINT_KEYFRAMES`` keyframes, the three branches share one UNet call, as in the
        authors' code. Beyond, each branch gets its own call -- the source first, whose
        recordings then feed the edited branches' injection -- which cuts the activations held
        at once by three; the branches never mix, so only float rounding can differ.
        """
        if len(unet_pass.frames) <= JOINT_KEYFRAMES:
            groups: list[tuple[int, ...]] = [ALL_BRANCHES]
        else:
            groups = [(b,) for b in ALL_BRANCHES]
            # a pass this large is the peak of the step: start it from a trimmed heap (not done
            # for small passes, where re-faulting the block passes' pages costs ~5 % of the time)
            release_freed_memory()
        for group in groups:
            call = _call(unet_pass, injection, group)
            self._predict(unet_pass.frames, source, x, t, call, group)
        return None  # the keyframe pass's noise prediction is discarded

    def _predict(
        self,
        frames: torch.Tensor,
        source: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        call: UNetCall,
        branches: tuple[int, ...] = ALL_BRANCHES,
    ) -> torch.Tensor:
        """Noise prediction of ``branches`` (0 source, 1 uncond, 2 cond) for ``frames``."""
        edited = x[frames]
        latents = torch.cat(
            [
                source[frames].to(x.device, x.dtype, non_blocking=True) if b == 0 else edited
                for b in branches
            ]
        )
        text = Conditioning.cat([self.branches[b].expand(len(frames)) for b in branches])
        extra = {}
        if self.control is not None:
            extra = self.control(latents, t, text, frames.repeat(len(branches)))
        return self.unet(latents, t, text, call, **extra)

    def ddim(self, noise: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the uncond/cond branches, then one DDIM step."""
        _, uncond, cond = noise.chunk(3)
        guided = uncond + self.guidance_scale * (cond - uncond)
        return self.scheduler.step(guided, torch.tensor(t, device=x.device), x).prev_sample

    @staticmethod
    def _clock(like: torch.Tensor) -> float:
        """Wall time for stage timings; waits for queued GPU work so stages are not blurred."""
        if like.device.type == "cuda":
            torch.cuda.synchronize(like.device)
        return time.perf_counter()


def _call(unet_pass: UNetPass, injection: Injection, group: tuple[int, ...]) -> UNetCall:
    """How the layers behave in ``unet_pass`` for the branches in ``group``.

    A keyframe pass records its tokens; when its source branch runs apart, the edited branches
    take their injection from those recordings. Propagated passes compute no attention, so
    only residual injection applies there.
    """
    return UNetCall(
        unet_pass.mode,
        branches=len(group),
        has_source=0 in group,
        recorded_source=0 not in group,
        first_branch=group[0],
        inject_qk=injection.qk and unet_pass.propagation is None,
        inject_residual=injection.residual,
        record=unet_pass.records,
        propagation=unet_pass.propagation,
    )


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"non-finite values in the {what} (a float16 overflow?); rerun with `dtype` bfloat16"
            " or float32"
        )
