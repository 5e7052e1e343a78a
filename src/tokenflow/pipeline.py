"""The Python API: ``TokenFlowPipeline`` edits frames in memory, in the style of diffusers.

The pipeline holds only the model (and its compiled regions); everything that belongs to one
edit -- options, scheduler state, the UNet's TokenFlow patching, ControlNet images, timings and
evaluation counts -- is created by the call and returned in its ``EditResult``, so two edits in
one process never influence each other. Files, caching and reports live in ``job.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .context import AttentionMode, UNetCall
from .control import ControlCondition
from .denoise import check_finite, denoise
from .distributed import stages
from .distributed.comm import Communicator
from .distributed.faults import failure_guard
from .distributed.plan import DenoisePlan
from .families import DiffusionModel, load_model
from .families.base import Conditioning
from .install import TokenFlowUNet, compile_regions
from .inversion import Inversion, ddim_invert, edit_timesteps
from .memory import release_freed_memory
from .methods import method_for
from .options import EditOptions, OptionError
from .progress import ProgressCallback, StageProgress
from .recordings import default_budget

if TYPE_CHECKING:
    from .checkpoint import StepCheckpoint


@dataclass
class EditResult:
    """Edited frames plus what it took to make them."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    latents: torch.Tensor  # final latents, before decoding
    keyframes: list[list[int]]  # keyframe indices drawn at each step
    inversion: Inversion  # the source latents used (computed or given)
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: dict[str, int] = field(default_factory=dict)
    # the prompts edited together in one run: ``timings`` and ``unet_evaluations`` are the whole
    # run's, shared by all of them
    prompts: list[str] = field(default_factory=list)
    resumed_from: int = 0  # denoising steps an interrupted run had completed
    # over several ranks: how many, the backend, and what each rank received (bytes by purpose)
    distributed: dict[str, Any] = field(default_factory=dict)


def edit_options(options: EditOptions | None, overrides: dict[str, Any]) -> EditOptions:
    """``options`` (or the defaults) with keyword overrides, type-checked."""
    return (options or EditOptions()).replace(**overrides)


class TokenFlowPipeline:
    """Text-driven video editing with TokenFlow on a Stable Diffusion model.

    >>> pipe = TokenFlowPipeline.from_pretrained("stabilityai/stable-diffusion-2-1-base")
    >>> result = pipe(frames, prompt="a marble sculpture of a woman running",
    ...               inversion_prompt="a woman running")
    """

    # frames per VAE call: at full resolution the VAE's activations dominate peak memory, and
    # 2 frames per call are as fast as 8 (and bit-identical on CPU, where 1 frame is not)
    vae_batch_size = 2
    # frames per inversion UNet call: fewer, larger calls amortise the per-call overhead; a
    # frame's inversion does not depend on its batch (see tests/test_inversion.py)
    inversion_batch_size = 16

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        model_config: str | None = None,
    ) -> TokenFlowPipeline:
        """Load a Hub id (HF cache), a diffusers folder or a single ``.safetensors`` file."""
        return cls(load_model(model, device=device, dtype=dtype, config=model_config))

    def compile(self, **options: Any) -> int:
        """``torch.compile`` the UNet's resnets, cross-attentions and feed-forwards.

        TokenFlow's own layers stay eager (see ``compile_regions``); ``options`` go to
        ``torch.compile``. The first calls at each new shape are slow while it compiles, so it
        pays off on long runs on CUDA. Returns the number of compiled modules.
        """
        return compile_regions(self.model.unet, self.model.layers(), **options)

    def enable_channels_last(self) -> None:
        """Store the UNet's and the VAE's 4-D weights channels-last (NHWC).

        GPUs' tensor cores convolve NHWC natively; NCHW costs layout transposes around every
        convolution. Convolutions then also return NHWC activations, so the whole UNet runs in
        that layout. The values are the same up to rounding (a convolution's kernel choice).
        """
        for module in (self.model.unet, self.model.vae):
            # nn.Module's own ``to``: diffusers' override warns about dtypes when none changes
            torch.nn.Module.to(module, memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- the edit ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        frames: np.ndarray,
        options: EditOptions | None = None,
        *,
        inversion: Inversion | None = None,
        control: ControlCondition | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> EditResult:
        """Edit ``frames`` ((N, H, W, 3) uint8) as ``options`` (and keyword overrides) say.

        ``inversion`` skips the DDIM inversion (e.g. from the cache); it must come from the same
        frames, model, inversion prompt and schedule. ``control`` conditions every UNet call
        (ControlNet). ``progress(stage, done, total)`` is called after every VAE and UNet call;
        raising from it (e.g. ``progress.Cancelled``) stops the edit there.
        """
        options = edit_options(options, overrides)
        results = self.edit_prompts(
            frames, [options.prompt], options, inversion=inversion, control=control,
            progress=progress,
        )  # fmt: skip
        return results[0]

    @torch.no_grad()
    def edit_prompts(
        self,
        frames: np.ndarray,
        prompts: Sequence[str],
        options: EditOptions | None = None,
        *,
        inversion: Inversion | None = None,
        control: ControlCondition | None = None,
        progress: ProgressCallback | None = None,
        checkpoint: StepCheckpoint | None = None,
        on_inverted: Callable[[Inversion], None] | None = None,
        **overrides: Any,
    ) -> list[EditResult]:
        """Edit ``frames`` once per prompt in one run; ``options.prompt`` is replaced by each.

        One inversion and one denoising loop: every UNet call carries the source branch once
        plus an unconditional and a conditional branch per prompt (1 + 2P batch groups instead
        of 3P in P runs), with the same keyframes for all prompts, so each result is what
        ``pipe(frames, options, prompt=p)`` gives. Calls that would exceed ``max_batch`` entries
        are split between prompts. The results share ``timings`` and ``unet_evaluations``.

        ``checkpoint`` keeps the state after every denoising step and resumes from it (see
        checkpoint.py); ``on_inverted`` receives the inversion as soon as it is computed (not
        when it was given), e.g. to cache it before the editing starts.

        In an initialised ``torch.distributed`` process group, every rank calls this with the
        same arguments (``inversion``, ``checkpoint`` and ``on_inverted`` count on rank 0
        only) and the edit runs over all of them (see ``tokenflow.distributed``): the results
        are the single-process ones; rank 0's hold every frame, the other ranks' none, and
        each rank's ``inversion`` holds the source latents it read.
        """
        with failure_guard(comm := Communicator.current()):
            return self._edit_prompts(
                frames, prompts, edit_options(options, overrides), inversion, control, progress,
                checkpoint, on_inverted, comm,
            )  # fmt: skip

    def _edit_prompts(
        self,
        frames: np.ndarray,
        prompts: Sequence[str],
        options: EditOptions,
        inversion: Inversion | None,
        control: ControlCondition | None,
        progress: ProgressCallback | None,
        checkpoint: StepCheckpoint | None,
        on_inverted: Callable[[Inversion], None] | None,
        comm: Communicator | None,
    ) -> list[EditResult]:
        # 1. check the options, and what the method makes of them, before any heavy work
        if not prompts:
            raise OptionError("no `prompt` given: edit at least one")
        for prompt in prompts:
            options.replace(prompt=prompt).require("prompt").validate()
        method_for(options).first_step()
        timings: dict[str, float] = {}
        evaluations = {"inversion": 0}
        scheduler = self.model.new_scheduler()

        # 2. encode the prompts of the branches: source, then unconditional and conditional per
        # prompt (the negative prompt encoded once)
        size = tuple(frames.shape[1:3])  # (H, W): SDXL is conditioned on the working size
        branches = [self.model.encode_prompt(options.inversion_prompt, size)]
        negative = self.model.encode_prompt(options.negative_prompt, size)
        for prompt in prompts:
            branches += [negative, self.model.encode_prompt(prompt, size)]

        # over several ranks: who denoises which frames (distributed/plan.py)
        plan = DenoisePlan(comm, len(frames), options) if comm is not None else None

        # 3. encode the frames with the VAE (over ranks: a shard each, then all of them on all)
        clock = time.perf_counter()
        if plan is None:
            z0 = self.encode_frames(frames, progress)
        else:
            z0 = stages.encode(self, frames, plan, progress)
        timings["encode"] = time.perf_counter() - clock

        # 4. invert them, unless the inversion is given (over ranks: a shard each, gathered on
        # rank 0 for the cache, then each rank gets the source latents of its own frames)
        if plan is not None:
            clock = time.perf_counter()
            inversion, evaluations["inversion"] = stages.invert(
                self, z0, inversion, options, branches[0], control, progress, plan, on_inverted
            )
            timings["inversion"] = time.perf_counter() - clock
        elif inversion is None:
            clock = time.perf_counter()
            inversion, evaluations["inversion"] = self._invert(
                z0, options, scheduler, branches[0], control, progress
            )
            timings["inversion"] = time.perf_counter() - clock
            if on_inverted is not None:
                on_inverted(inversion)

        # 5. denoise: keyframe passes with extended attention, propagated block passes
        clock = time.perf_counter()
        frames_per_step = len(z0) if plan is None else plan.frames_per_step()
        stage = StageProgress(progress, "edit", frames_per_step * len(self._steps_run(options)))
        with TokenFlowUNet(self.model.unet, self.model.layers(), self._budget(options)) as unet:
            result = denoise(
                unet, scheduler, z0, inversion, branches, options, control, stage, plan=plan,
                checkpoint=checkpoint,
            )  # fmt: skip
        stage.finish()
        timings["denoise"] = time.perf_counter() - clock
        timings.update(result.timings)
        evaluations.update(result.evaluations)

        # 6. decode the edited latents, each prompt's frames in calls of their own, as one run
        # (over ranks: a shard each, gathered on rank 0)
        clock = time.perf_counter()
        if plan is None:
            stage = StageProgress(progress, "decode", sum(len(x) for x in result.latents))
            edited = [self._decode(latents, stage) for latents in result.latents]
        else:
            share = stages.decoded_share(self, len(z0), plan)
            stage = StageProgress(progress, "decode", share * len(result.latents))
            edited = [stages.decode(self, latents, plan, stage) for latents in result.latents]
        timings["decode"] = time.perf_counter() - clock
        spread = {} if plan is None else stages.summary(plan, evaluations)
        return [
            EditResult(
                pixels,
                latents,
                result.keyframes,
                inversion,
                timings,
                evaluations,
                prompts=list(prompts),
                resumed_from=result.resumed_from,
                distributed=spread,
            )
            for pixels, latents in zip(edited, result.latents, strict=True)
        ]

    def _steps_run(self, options: EditOptions) -> list[int]:
        scheduler = self.model.new_scheduler()
        return edit_timesteps(scheduler, options.steps)[method_for(options).first_step() :]

    def _budget(self, options: EditOptions) -> float:
        """Bytes of keyframe recordings kept in (device) memory (see recordings.py)."""
        if options.keyframe_memory is None:
            return default_budget(self.device)
        return options.keyframe_memory * 2**20

    # -- inversion --------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        latents: torch.Tensor,
        options: EditOptions | None = None,
        *,
        control: ControlCondition | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> Inversion:
        """DDIM-invert source latents with the inversion prompt, keeping the editing
        timesteps and the noisiest one (``options``: inversion_prompt, inversion_steps, steps)."""
        options = edit_options(options, overrides).validate()
        scheduler = self.model.new_scheduler()
        size = tuple(n * self.model.vae_scale_factor for n in latents.shape[-2:])
        source = self.model.encode_prompt(options.inversion_prompt, size)
        return self._invert(latents, options, scheduler, source, control, progress)[0]

    def _invert(
        self,
        latents: torch.Tensor,
        options: EditOptions,
        scheduler,
        source: Conditioning,
        control: ControlCondition | None,
        progress: ProgressCallback | None,
        offset: int = 0,
    ) -> tuple[Inversion, int]:
        """``offset``: the clip's index of the first of ``latents`` (for control images)."""
        keep = edit_timesteps(scheduler, options.steps)
        stage = StageProgress(progress, "invert", len(latents) * options.inversion_steps)
        call = UNetCall(AttentionMode.FRAME, branches=1)
        with TokenFlowUNet(self.model.unet, self.model.layers()) as unet:

            def predict(z: torch.Tensor, t: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
                text = source.expand(len(z))
                extra = control(z, t, text, frames + offset) if control is not None else {}
                return unet(z, t, text, call, **extra)

            inversion = ddim_invert(
                predict,
                scheduler,
                latents,
                options.inversion_steps,
                keep,
                self.inversion_batch_size,
                on_step=stage.advance,
                store_device="cpu" if self.device.type == "cuda" else None,
            )
            evaluations = unet.evaluations
        release_freed_memory()
        check_finite(inversion.final, "inverted latents")
        return inversion, evaluations

    # -- pixels and latents -----------------------------------------------------------------

    @torch.no_grad()
    def encode_frames(
        self, frames: np.ndarray, progress: ProgressCallback | None = None
    ) -> torch.Tensor:
        """VAE posterior mean x scaling factor, ``vae_batch_size`` frames per call."""
        stage = StageProgress(progress, "encode", len(frames))
        out = self._vae_batches(frames, self.model.encode_images, stage)
        release_freed_memory()
        # one memory layout whatever the VAE's kernels returned, so results do not depend on
        # whether latents were just computed or loaded from the cache
        return torch.cat(out).contiguous()

    @torch.no_grad()
    def decode_latents(
        self, latents: torch.Tensor, progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Latents -> (N, H, W, 3) uint8, rounded."""
        return self._decode(latents, StageProgress(progress, "decode", len(latents)))

    def _decode(self, latents: torch.Tensor, stage: StageProgress) -> np.ndarray:
        def decode(z: torch.Tensor) -> np.ndarray:
            x = self.model.decode_latents(z)
            check_finite(x, "decoded pixels")
            return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

        return np.concatenate(self._vae_batches(latents, decode, stage))

    def _vae_batches(self, items, work: Callable[[Any], Any], stage: StageProgress) -> list[Any]:
        out = []
        for i in range(0, len(items), self.vae_batch_size):
            out.append(work(items[i : i + self.vae_batch_size]))
            stage.advance(len(out[-1]))
        return out
