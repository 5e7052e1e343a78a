"""The TokenFlow editing pipeline: encode, invert, denoise with keyframes + propagation, decode.

``TokenFlowPipeline`` works on frames in memory (uint8 arrays) and is the Python API; file
handling, caching and reporting live in ``run.py`` / ``cli.py`` on top of it.
"""

from __future__ import annotations

import ctypes
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DEFAULT_NEGATIVE_PROMPT
from .context import AttentionMode, UNetCall
from .control import ControlCondition
from .errors import NonFiniteError, TokenFlowError
from .install import TokenFlowUNet, compile_regions
from .inversion import Inversion, ddim_invert
from .keyframes import (
    KeyframeSampler,
    keyframe_windows,
    paper_propagation,
    reference_propagation,
)
from .models import StableDiffusion, load_model
from .recordings import default_budget

METHODS = ("pnp", "sdedit")
BASELINES = ("per-frame", "extended-attention", "fixed-keyframes")
PROPAGATIONS = ("reference", "paper")
ALL_BRANCHES = (0, 1, 2)  # the batch groups of an editing call: source, uncond, cond


@dataclass
class DenoisePlan:
    """The settings of the denoising loop, checked once."""

    prompt: str
    inversion_prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    block_size: int
    pnp_attn_t: float
    pnp_f_t: float
    seed: int
    method: str = "pnp"
    strength: float = 0.9
    strength_compat: bool = False
    noise: str = "ddim"
    baseline: str | None = None
    propagation: str = "reference"
    max_keyframes: int = 0  # long-video mode: at most this many keyframes per UNet call (0: all)
    keyframe_overlap: int = 2  # long-video mode: keyframes shared by consecutive windows

    def checked(self) -> DenoisePlan:
        choices = {
            "method": (self.method, METHODS),
            "propagation": (self.propagation, PROPAGATIONS),
            "noise": (self.noise, ("ddim", "random")),
        }
        if self.baseline is not None:
            choices["baseline"] = (self.baseline, BASELINES)
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise TokenFlowError(
                    f"unknown --{name} {value!r}; choose one of {', '.join(allowed)}"
                )
        if self.block_size < 1:
            raise TokenFlowError("--block-size must be at least 1")
        if not 0 < self.strength <= 1:
            raise TokenFlowError(f"--strength {self.strength} must be within (0, 1]")
        if self.method == "sdedit" and self.first_step() >= self.steps:
            raise TokenFlowError(f"--strength {self.strength} leaves no step to run; raise it")
        if self.max_keyframes < 0:
            raise TokenFlowError("--max-keyframes must be 0 (no cap) or positive")
        if self.max_keyframes and not 1 <= self.keyframe_overlap < self.max_keyframes - 1:
            raise TokenFlowError(
                f"--max-keyframes {self.max_keyframes} is too small for a keyframe overlap of"
                f" {self.keyframe_overlap}: it needs the anchor, the overlap and one new keyframe"
                f" (at least {max(self.keyframe_overlap, 1) + 2})"
            )
        return self

    @property
    def tokenflow(self) -> bool:
        """Keyframe pass + propagation (TokenFlow), as opposed to the no-propagation baselines."""
        return self.baseline not in ("per-frame", "extended-attention")

    def first_step(self) -> int:
        """Index of the first editing step: 0, or SDEdit's start at ``strength``.

        ``strength`` 0.9 of 50 steps runs the last 45; the authors' slicing
        ``timesteps[int(1 - strength * S):]`` runs 44, kept as ``strength_compat``.
        """
        if self.method != "sdedit":
            return 0
        if self.strength_compat:
            return self.steps + int(1 - self.strength * self.steps)
        return self.steps - int(round(self.strength * self.steps))

    def injection_steps(self) -> tuple[int, int]:
        """How many leading steps get q/k and residual injection (none for SDEdit)."""
        if self.method == "sdedit":
            return 0, 0
        return int(self.steps * self.pnp_attn_t), int(self.steps * self.pnp_f_t)


@dataclass
class EditResult:
    """Edited frames plus what it took to make them."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    latents: torch.Tensor  # final latents, before decoding
    keyframes: list[list[int]]  # keyframe indices drawn at each step
    inversion: Inversion  # the source latents used (computed or given)
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: dict[str, int] = field(default_factory=dict)


class TokenFlowPipeline:
    """Text-driven video editing with TokenFlow on a Stable Diffusion 1.x/2.x model.

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
    # keyframe passes of up to this many keyframes run their three branches in one UNet call;
    # larger ones (long clips in reference mode) one branch at a time (see ``_keyframe_pass``)
    joint_keyframes = 8
    # bytes of keyframe recordings kept in (device) memory, the rest spilled to host RAM or a
    # temporary file (see recordings.py); None: ``default_budget`` of the device, inf: no spill
    keyframe_memory: float | None = None

    def __init__(
        self, model: StableDiffusion, progress: bool = True, control: ControlCondition | None = None
    ) -> None:
        self.model = model
        self.progress = progress
        self.control = control  # ControlNet conditioning applied to every UNet call
        self._truncated_warned: set[str] = set()  # prompts already warned about, warn once

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        progress: bool = True,
    ) -> TokenFlowPipeline:
        return cls(load_model(model, device=device, dtype=dtype), progress=progress)

    def compile(self, **options) -> int:
        """``torch.compile`` the UNet's resnets, cross-attentions and feed-forwards.

        TokenFlow's own layers stay eager (see ``compile_regions``); ``options`` go to
        ``torch.compile``. The first calls at each new shape are slow while it compiles, so it
        pays off on long runs on CUDA. Returns the number of compiled modules.
        """
        return compile_regions(self.model.unet, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- text, pixels, latents -------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP text embedding (1, 77, d), truncated to the encoder's length as SD does."""
        tok = self.model.tokenizer
        self._warn_if_truncated(prompt)
        ids = tok(
            prompt,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.model.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def _warn_if_truncated(self, prompt: str) -> None:
        """SD silently drops tokens past the encoder's length; say so once per prompt."""
        if prompt in self._truncated_warned:
            return
        tok = self.model.tokenizer
        count = len(tok(prompt, truncation=False).input_ids)
        if count > tok.model_max_length:
            self._truncated_warned.add(prompt)
            warnings.warn(
                f"prompt {prompt[:40]!r}... is {count} tokens but the text encoder takes"
                f" {tok.model_max_length}; it is truncated, so shorten it",
                stacklevel=3,
            )

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """VAE posterior mean × scaling factor, in batches (frames: (N, H, W, 3) uint8)."""
        vae = self.model.vae
        out = []
        for i in range(0, len(frames), self.vae_batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + self.vae_batch_size]))
            x = x.permute(0, 3, 1, 2).float().div(255).to(self.device, self.dtype)
            out.append(vae.encode(2 * x - 1).latent_dist.mean * vae.config.scaling_factor)
        release_freed_memory()
        # one memory layout whatever the VAE's kernels returned, so results do not depend on
        # whether latents were just computed or loaded from the cache
        return torch.cat(out).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> (N, H, W, 3) uint8, rounded; in batches."""
        vae = self.model.vae
        out = []
        for i in range(0, len(latents), self.vae_batch_size):
            z = latents[i : i + self.vae_batch_size] / vae.config.scaling_factor
            x = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
            _check_finite(x, "decoded pixels")
            out.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    # -- inversion ---------------------------------------------------------------------------

    def edit_timesteps(self, steps: int) -> list[int]:
        self.model.scheduler.set_timesteps(steps)
        return [int(t) for t in self.model.scheduler.timesteps]

    @torch.no_grad()
    def invert(
        self,
        latents: torch.Tensor,
        inversion_prompt: str,
        inversion_steps: int,
        steps: int,
    ) -> Inversion:
        """DDIM-invert source latents, keeping the editing timesteps and the noisiest one."""
        keep = self.edit_timesteps(steps)
        text = self.encode_prompt(inversion_prompt)
        bar = self._bar(len(latents) * inversion_steps, "inversion", "frame-steps")
        with TokenFlowUNet(self.model.unet) as unet:
            call = UNetCall(AttentionMode.FRAME, branches=1)

            def predict(z: torch.Tensor, t: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
                texts = text.expand(len(z), -1, -1)
                extra = self.control(z, t, texts, frames) if self.control else {}
                return unet(z, t, texts, call, **extra)

            inversion = ddim_invert(
                predict,
                self.model.scheduler,
                latents,
                inversion_steps,
                keep,
                self.inversion_batch_size,
                on_step=bar.update,
                store_device="cpu" if self.device.type == "cuda" else None,
            )
            self.last_inversion_evaluations = unet.evaluations
        bar.close()
        release_freed_memory()
        _check_finite(inversion.final, "inverted latents")
        return inversion

    # -- editing -----------------------------------------------------------------------------

    def __call__(self, frames: np.ndarray, **kwargs) -> EditResult:
        return self.edit(frames, **kwargs)

    @torch.no_grad()
    def edit(
        self,
        frames: np.ndarray,
        prompt: str,
        inversion_prompt: str = "",
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        steps: int = 50,
        inversion_steps: int = 500,
        guidance_scale: float = 7.5,
        block_size: int = 8,
        pnp_attn_t: float = 0.5,
        pnp_f_t: float = 0.8,
        seed: int = 1,
        method: str = "pnp",
        strength: float = 0.9,
        strength_compat: bool = False,
        noise: str = "ddim",
        baseline: str | None = None,
        propagation: str = "reference",
        max_keyframes: int = 0,
        keyframe_overlap: int = 2,
        inversion: Inversion | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> EditResult:
        """Edit ``frames`` ((N, H, W, 3) uint8) towards ``prompt``.

        ``method``: ``pnp`` (Plug-and-Play injection from the source branch) or ``sdedit``
        (no injection, start from the inverted noise at ``strength``). ``baseline``: ``None``
        (TokenFlow), ``per-frame``, ``extended-attention`` or ``fixed-keyframes``.
        ``propagation``: ``reference`` (the authors' code) or ``paper`` (the paper's text).
        ``inversion`` skips the DDIM inversion (e.g. from the cache); it must come from the same
        frames, model, inversion prompt and schedule. ``max_keyframes`` > 0 is the long-video
        mode: keyframes are edited in windows of at most that many per UNet call, consecutive
        windows sharing ``keyframe_overlap`` keyframes, so memory does not grow with the clip
        (see ``keyframe_windows``); with a cap of at least the keyframe count it is reference
        mode exactly.
        """
        plan = DenoisePlan(
            prompt=prompt,
            inversion_prompt=inversion_prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            block_size=block_size,
            pnp_attn_t=pnp_attn_t,
            pnp_f_t=pnp_f_t,
            seed=seed,
            method=method,
            strength=strength,
            strength_compat=strength_compat,
            noise=noise,
            baseline=baseline,
            propagation=propagation,
            max_keyframes=max_keyframes,
            keyframe_overlap=keyframe_overlap,
        ).checked()
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        z0 = self.encode_frames(frames)
        timings["encode"] = time.perf_counter() - clock
        evaluations = {"inversion": 0}
        if inversion is None:
            clock = time.perf_counter()
            inversion = self.invert(z0, inversion_prompt, inversion_steps, steps)
            timings["inversion"] = time.perf_counter() - clock
            evaluations["inversion"] = self.last_inversion_evaluations

        clock = time.perf_counter()
        latents, keyframes, unet_counts = self.denoise(z0, inversion, plan, callback)
        timings["denoise"] = time.perf_counter() - clock
        timings.update(self.last_denoise_timings)
        evaluations.update(unet_counts)

        clock = time.perf_counter()
        edited = self.decode_latents(latents)
        timings["decode"] = time.perf_counter() - clock
        return EditResult(edited, latents, keyframes, inversion, timings, evaluations)

    def initial_latents(
        self, z0: torch.Tensor, inversion: Inversion, t0: int, noise: str = "ddim", seed: int = 1
    ) -> torch.Tensor:
        """Noise the clean latents to ``t0``.

        ``ddim``: with the noise implied by the inversion's end, ε_T = (z_T − √ᾱ_T·z0) / √(1−ᾱ_T);
        ``random``: with Gaussian noise drawn from ``seed`` (the same draw for every frame, as
        the authors intended). Then DDIM's ``add_noise(z0, ε, t0)``.
        """
        scheduler = self.model.scheduler
        if noise == "ddim":
            alpha_t = scheduler.alphas_cumprod[inversion.final_timestep]
            eps = (inversion.final.to(z0) - alpha_t**0.5 * z0) / (1 - alpha_t) ** 0.5
        else:
            g = torch.Generator("cpu").manual_seed(seed)
            eps = torch.randn(z0.shape[1:], generator=g).to(z0).expand_as(z0)
        return scheduler.add_noise(z0, eps, torch.tensor([t0]))

    def denoise(
        self,
        z0: torch.Tensor,
        inversion: Inversion,
        plan: DenoisePlan,
        callback: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, list[list[int]], dict[str, int]]:
        """The denoising loop: keyframe pass + propagated block passes at every step."""
        n = len(z0)
        all_timesteps = self.edit_timesteps(plan.steps)
        timesteps = all_timesteps[plan.first_step() :]
        qk_steps, residual_steps = plan.injection_steps()
        texts = self._branch_texts(plan)

        sampler = KeyframeSampler(
            n, plan.block_size, plan.seed, fixed=plan.baseline == "fixed-keyframes"
        )
        bounds = sampler.bounds
        x = self.initial_latents(z0, inversion, timesteps[0], plan.noise, plan.seed)
        drawn: list[list[int]] = []
        counts = {"keyframes": 0, "propagation": 0} if plan.tokenflow else {"blocks": 0}
        stages = {"keyframe_passes": 0.0, "block_passes": 0.0, "correspondence": 0.0}
        self.last_denoise_timings = stages
        bar = self._bar(len(timesteps), "editing", "step")
        budget = self.keyframe_memory
        budget = default_budget(self.device) if budget is None else budget
        with TokenFlowUNet(self.model.unet, keyframe_memory=budget) as unet:
            unet.context.timings = stages
            for i, t in enumerate(timesteps):
                unet.context.step = i
                tt = torch.tensor(t, device=self.device)
                # the source latents stay where the inversion keeps them (host RAM for a GPU
                # model); every call moves only its own frames to the device
                source = inversion.latents[t]
                inject_qk, inject_res = i < qk_steps, i < residual_steps
                denoised: list[torch.Tensor] = [x[s:e] for s, e in bounds]

                if plan.tokenflow:
                    kf = sampler.draw()
                    drawn.append(kf.tolist())
                    propagations = (
                        [reference_propagation(bounds, b) for b in range(len(bounds))]
                        if plan.propagation == "reference"
                        else [paper_propagation(bounds, b, kf) for b in range(len(bounds))]
                    )
                    windows = keyframe_windows(
                        propagations, plan.max_keyframes, plan.keyframe_overlap
                    )
                    for window in windows:
                        # drop the previous recordings before the next pass makes new ones, so
                        # two sets never coexist
                        unet.clear_keyframes()
                        clock, before = self._clock(), unet.evaluations
                        self._keyframe_pass(
                            unet, source, x, kf[window.slots], tt, texts, inject_qk, inject_res
                        )
                        counts["keyframes"] += unet.evaluations - before
                        stages["keyframe_passes"] += self._clock() - clock
                        clock, before = self._clock(), unet.evaluations
                        for b in window.blocks:
                            call = UNetCall(
                                AttentionMode.PROPAGATE,
                                branches=3,
                                has_source=True,
                                inject_residual=inject_res,
                                propagation=window.local(propagations[b]),
                            )
                            denoised[b] = self._block_step(
                                unet, source, x, bounds[b], tt, texts, call, plan
                            )
                        counts["propagation"] += unet.evaluations - before
                        stages["block_passes"] += self._clock() - clock
                    unet.clear_keyframes()
                else:  # baselines without propagation: attention within each frame/block
                    clock, before = self._clock(), unet.evaluations
                    mode = (
                        AttentionMode.EXTENDED
                        if plan.baseline == "extended-attention"
                        else AttentionMode.FRAME
                    )
                    call = UNetCall(
                        mode,
                        branches=3,
                        has_source=True,
                        inject_qk=inject_qk,
                        inject_residual=inject_res,
                    )
                    for b, span in enumerate(bounds):
                        denoised[b] = self._block_step(unet, source, x, span, tt, texts, call, plan)
                    counts["blocks"] += unet.evaluations - before
                    stages["block_passes"] += self._clock() - clock
                x = torch.cat(denoised)
                _check_finite(x, f"latents at step {i + 1}")
                bar.update(1)
                if callback is not None:
                    callback(i, len(timesteps))
        bar.close()
        release_freed_memory()
        return x, drawn, counts

    def _branch_texts(self, plan: DenoisePlan) -> Callable[..., torch.Tensor]:
        """Text embeddings for a call of ``count`` frames of ``branches`` (0 source, 1 uncond,
        2 cond)."""
        embeddings = [
            self.encode_prompt(p)
            for p in (plan.inversion_prompt, plan.negative_prompt, plan.prompt)
        ]

        def texts(count: int, branches: tuple[int, ...] = ALL_BRANCHES) -> torch.Tensor:
            return torch.cat([embeddings[b].expand(count, -1, -1) for b in branches])

        return texts

    def _keyframe_pass(
        self,
        unet: TokenFlowUNet,
        source: torch.Tensor,
        x: torch.Tensor,
        keyframes: torch.Tensor,
        t: torch.Tensor,
        texts: Callable[..., torch.Tensor],
        inject_qk: bool,
        inject_residual: bool,
    ) -> None:
        """Edit ``keyframes`` jointly and record their tokens for the block passes.

        Up to ``joint_keyframes`` keyframes, the three branches share one UNet call, as in the
        authors' code. Beyond, each branch gets its own call -- the source first, whose
        recordings then feed the edited branches' injection -- which cuts the activations held
        at once by three; the branches never mix, so only float rounding can differ.
        """
        if len(keyframes) <= self.joint_keyframes:
            groups: list[tuple[int, ...]] = [ALL_BRANCHES]
        else:
            groups = [(b,) for b in ALL_BRANCHES]
            # a pass this large is the peak of the step: start it from a trimmed heap (not done
            # for small passes, where re-faulting the block passes' pages costs ~5 % of the time)
            release_freed_memory()
        for group in groups:
            call = UNetCall(
                AttentionMode.EXTENDED,
                branches=len(group),
                has_source=0 in group,
                recorded_source=0 not in group,
                first_branch=group[0],
                inject_qk=inject_qk,
                inject_residual=inject_residual,
                record=True,
            )
            self._predict(unet, source, x, keyframes, t, texts, call, group)

    def _block_step(
        self,
        unet: TokenFlowUNet,
        source: torch.Tensor,
        x: torch.Tensor,
        span: tuple[int, int],
        t: torch.Tensor,
        texts: Callable[..., torch.Tensor],
        call: UNetCall,
        plan: DenoisePlan,
    ) -> torch.Tensor:
        """One block's UNet call, classifier-free guidance and DDIM step."""
        s, e = span
        noise = self._predict(unet, source, x, torch.arange(s, e), t, texts, call)
        _, uncond, cond = noise.chunk(3)
        guided = uncond + plan.guidance_scale * (cond - uncond)
        return self.model.scheduler.step(guided, t, x[s:e]).prev_sample

    def _clock(self) -> float:
        """Wall time for stage timings; waits for queued GPU work so stages are not blurred."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _predict(
        self,
        unet: TokenFlowUNet,
        source: torch.Tensor,
        x: torch.Tensor,
        frames: torch.Tensor,
        t: torch.Tensor,
        texts: Callable[..., torch.Tensor],
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
        text = texts(len(frames), branches)
        extra = self.control(latents, t, text, frames.repeat(len(branches))) if self.control else {}
        return unet(latents, t, text, call, **extra)

    def _bar(self, total: int, desc: str, unit: str):
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False)


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


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"non-finite values in the {what} (a float16 overflow?); rerun with --dtype bfloat16"
            " or --dtype float32"
        )
