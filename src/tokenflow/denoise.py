"""The denoising loop: at every step, the UNet passes a structure asks for, then DDIM.

Every editing UNet pass carries the branches of the same frames, concatenated along the batch
axis: the source (its inverted latents at this timestep, with the inversion prompt), then for
each prompt an unconditional and a conditional branch (that prompt's latents being edited, with
the negative and the target prompt): 1 + 2P branches for P prompts, the authors' three for one.
Only the edited branches are used for classifier-free guidance; the source branch donates
features (PnP injection) and correspondences (propagation), once for all prompts, which all see
the same keyframes. A pass whose branches would make too large a batch runs in several calls
(``branch_groups``), the source in the first; branches never mix, so each prompt's latents are
those of a run of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .checkpoint import DenoiseState
from .context import UNetCall
from .control import ControlCondition
from .errors import NonFiniteError
from .families.base import Conditioning
from .install import TokenFlowUNet
from .inversion import Inversion, edit_timesteps
from .memory import release_freed_memory, to_device
from .methods import Injection, UNetPass, method_for, structure_for
from .options import EditOptions
from .progress import StageProgress
from .timing import StageClock

if TYPE_CHECKING:
    from .checkpoint import StepCheckpoint
    from .distributed.plan import DenoisePlan

SOURCE = 0  # the source branch; prompt p has its uncond branch at 2p + 1, its cond at 2p + 2
# keyframe passes of up to this many keyframes run their branches in one UNet call, as the
# authors batch them; larger ones (long clips in reference mode) one branch at a time
JOINT_KEYFRAMES = 8
STAGE_OF_KIND = {"keyframes": "keyframe_passes", "propagation": "block_passes"}


def branch_count(prompts: int) -> int:
    """Branches of an edit of ``prompts`` prompts: the source, then uncond/cond per prompt."""
    return 1 + 2 * prompts


def branch_groups(
    frames: int, prompts: int, max_batch: int, apart: bool = False
) -> list[tuple[int, ...]]:
    """The UNet calls of one pass over ``frames`` frames, as runs of consecutive branches.

    ``apart``: one branch per call (the keyframe pass of a long clip). Otherwise the source and
    the first prompt share a call, as in a one-prompt run, so one prompt is never split; each
    further prompt joins a call while it holds at most ``max_batch`` batch entries, else opens
    the next one. Memory then grows with the prompts only through the keyframe recordings.
    """
    if apart:
        return [(b,) for b in range(branch_count(prompts))]
    per_call = max(3, max_batch // max(frames, 1))
    groups = [[SOURCE, 1, 2]]
    for p in range(1, prompts):
        if len(groups[-1]) + 2 > per_call:
            groups.append([])
        groups[-1] += [2 * p + 1, 2 * p + 2]
    return [tuple(g) for g in groups]


@dataclass
class Denoised:
    """The loop's result and what it cost; ``latents[p]`` are prompt p's."""

    latents: list[torch.Tensor]
    keyframes: list[list[int]]
    evaluations: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0  # steps an interrupted edit had completed (0: a run from the start)


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
    *,
    plan: DenoisePlan | None = None,
    checkpoint: StepCheckpoint | None = None,
) -> Denoised:
    """Edit the latents ``z0`` (frames, 4, h, w) as ``options`` say, once per prompt;
    ``branches`` holds the conditioning of the source, then of each prompt's unconditional and
    conditional branch (see ``branch_count``). ``options.prompt`` is not read here.

    ``plan``: this rank's share of an edit over several ranks (distributed/plan.py; None: the
    whole edit here). ``checkpoint``: where the state after every step is kept, and which one
    the loop continues from when it resumes an interrupted edit (checkpoint.py).
    """
    if len(branches) < 3 or len(branches) % 2 == 0:
        raise ValueError("branches: the source, then an uncond and a cond branch per prompt")
    method = method_for(options)
    structure = structure_for(len(z0), options)
    timesteps = edit_timesteps(scheduler, options.steps)[method.first_step() :]
    runner = _PassRunner(unet, branches, control, scheduler, options, progress)
    runner.counts.update(dict.fromkeys(structure.counters, 0))
    start = _resumed(checkpoint, plan)
    if start is None:
        x = initial_latents(scheduler, z0, inversion, timesteps[0], options.noise, options.seed)
        xs = [x] * runner.prompts  # every prompt starts from the same latents
        first = 0
    else:
        xs = [x.to(z0.device, z0.dtype) for x in start.latents]
        for _ in range(start.step):  # the keyframe draws of the steps done, from the same seed
            structure.step()
        first = start.step
        if progress is not None:  # the steps done before count as done
            progress.advance(first * (len(z0) if plan is None else plan.frames_per_step()))
    # on the device once: a tensor made from a host value per UNet call would be a copy that
    # makes a GPU drain its queue before every call
    on_device = torch.tensor(timesteps, device=z0.device)
    for i, t in enumerate(timesteps[first:], first):
        unet.context.step = i
        # 1. what the method injects at this step
        injection = method.injection(i)
        # 2. the structure's UNet passes (this rank's share of them), each block's latents one
        # DDIM step further
        source = inversion.latents[t]  # stays where it is stored; each call moves its frames
        denoised: dict[int, list[torch.Tensor]] = {}
        passes = structure.step()
        work = plan.assign(passes) if plan is not None else None
        for unet_pass in work.passes if work is not None else passes:
            index = to_device(unet_pass.frames, z0.device)  # one copy for the whole pass
            noise = runner.run(unet_pass, index, source, xs, on_device[i], injection)
            if unet_pass.block is not None:
                denoised[unet_pass.block] = [
                    runner.ddim(noise, p, t, xs[p][index]) for p in range(len(xs))
                ]
        unet.clear_keyframes()
        # 3. the step's latents, in frame order (of every rank's blocks)
        if work is None:
            xs = [torch.cat([denoised[b][p] for b in sorted(denoised)]) for p in range(len(xs))]
        else:
            xs = plan.gather_latents(denoised, work, xs)
        for x in xs:
            check_finite(x, f"latents at step {i + 1}")
        if checkpoint is not None:
            checkpoint.save(DenoiseState(i + 1, xs))
    release_freed_memory()
    return Denoised(
        xs, structure.keyframes, runner.counts, runner.clock.totals(), resumed_from=first
    )


def _resumed(checkpoint: StepCheckpoint | None, plan: DenoisePlan | None) -> DenoiseState | None:
    """The state an interrupted edit reached (rank 0 reads it and hands it to every rank)."""
    state = checkpoint.restore() if checkpoint is not None else None
    if plan is not None:
        state = plan.comm.broadcast_object(state, "the checkpoint")
    return state


class _PassRunner:
    """Runs one ``UNetPass``: batch the branches into calls, call the UNet, count and time it."""

    def __init__(
        self,
        unet: TokenFlowUNet,
        branches: list[Conditioning],
        control: ControlCondition | None,
        scheduler,
        options: EditOptions,
        progress: StageProgress | None,
    ) -> None:
        self.unet = unet
        self.branches = branches
        self.prompts = (len(branches) - 1) // 2
        self.control = control
        self.scheduler = scheduler
        self.guidance_scale = options.guidance_scale
        self.max_batch = options.max_batch
        self.progress = progress
        self.counts: dict[str, int] = {}
        stages = ("keyframe_passes", "block_passes", "correspondence")
        self.clock = unet.context.clock = StageClock(unet.unet.device, stages)

    def run(
        self,
        unet_pass: UNetPass,
        index: torch.Tensor,
        source: torch.Tensor,
        xs: list[torch.Tensor],
        t: torch.Tensor,
        injection: Injection,
    ) -> dict[int, torch.Tensor]:
        """The noise predicted for each branch (none for a keyframe pass: it is discarded);
        ``index``: the pass's frames on the latents' device."""
        before = self.unet.evaluations
        frames = unet_pass.frames
        # a keyframe pass split over ranks is batched as the whole pass would be
        count = unet_pass.share.total if unet_pass.share is not None else len(frames)
        apart = unet_pass.records and count > JOINT_KEYFRAMES
        groups = branch_groups(count, self.prompts, self.max_batch, apart)
        if unet_pass.records:
            # drop the previous recordings before the next pass makes new ones, so two sets
            # never coexist
            self.unet.clear_keyframes()
            if apart:
                # a pass this large is the peak of the step: start it from a trimmed heap (not
                # done for small passes, where re-faulting the block passes' pages costs ~5 %)
                release_freed_memory()
        noise: dict[int, torch.Tensor] = {}
        stage = STAGE_OF_KIND.get(unet_pass.kind, "block_passes")
        self.unet.context.share = unet_pass.share
        try:
            with self.clock.measure(stage):
                for i, group in enumerate(groups):
                    later = i + 1 < len(groups)
                    call = _call(unet_pass, injection, group, keep_source=later)
                    out = self._predict(frames, index, source, xs, t, call, group)
                    if not unet_pass.records:  # the keyframe pass's prediction is discarded
                        noise.update(zip(group, out.chunk(len(group)), strict=True))
                    if later and self.progress is not None:  # a caller may stop the job here
                        self.progress.advance(0)
        finally:
            self.unet.context.pass_source.clear()
            self.unet.context.share = None
        if unet_pass.share is not None:  # keyframes other ranks' blocks blend, and back
            unet_pass.share.exchange_recordings(self.unet.context.recordings)
        self.counts[unet_pass.kind] += self.unet.evaluations - before
        if self.progress is not None:  # also the place where a caller may stop the job
            self.progress.advance(0 if unet_pass.records else len(frames))
        return noise

    def _predict(
        self,
        frames: torch.Tensor,
        index: torch.Tensor,
        source: torch.Tensor,
        xs: list[torch.Tensor],
        t: torch.Tensor,
        call: UNetCall,
        branches: tuple[int, ...],
    ) -> torch.Tensor:
        """Noise prediction of ``branches`` (0 source, 2p + 1 / 2p + 2 prompt p's uncond /
        cond) for ``frames`` (``index``: the same on the latents' device)."""
        x = xs[0]
        edited = {p: xs[p][index] for p in {(b - 1) // 2 for b in branches if b != SOURCE}}

        def branch_latents(b: int) -> torch.Tensor:
            if b != SOURCE:
                return edited[(b - 1) // 2]
            # gathered where it is stored (host RAM for a GPU model), copied without a wait
            here = source[frames] if source.device.type == "cpu" else source[index]
            return to_device(here, x.device, x.dtype)

        latents = torch.cat([branch_latents(b) for b in branches])
        text = Conditioning.cat([self.branches[b].expand(len(frames)) for b in branches])
        extra = {}
        if self.control is not None:
            extra = self.control(latents, t, text, frames.repeat(len(branches)))
        return self.unet(latents, t, text, call, **extra)

    def ddim(
        self, noise: dict[int, torch.Tensor], prompt: int, t: int, x: torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance over ``prompt``'s uncond/cond branches, one DDIM step."""
        uncond, cond = noise[2 * prompt + 1], noise[2 * prompt + 2]
        guided = uncond + self.guidance_scale * (cond - uncond)
        # ``t`` stays a host int: the scheduler indexes its (host) table with it and compares it,
        # which with a device tensor would read its value back from the device (a sync) per call
        return self.scheduler.step(guided, t, x).prev_sample


def _call(
    unet_pass: UNetPass, injection: Injection, group: tuple[int, ...], keep_source: bool
) -> UNetCall:
    """How the layers behave in ``unet_pass`` for the branches in ``group``.

    A keyframe pass records its tokens. When a pass runs in several calls, the first (with the
    source) keeps what the later ones read: the source's attention inputs and residual
    features, for their injection and correspondences. Propagated passes compute no attention,
    so only residual injection applies there.
    """
    has_source = group[0] == SOURCE
    return UNetCall(
        unet_pass.mode,
        branches=len(group),
        has_source=has_source,
        recorded_source=not has_source,
        keep_source=keep_source and has_source,
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
