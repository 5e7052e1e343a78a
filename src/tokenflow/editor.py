"""The TokenFlow editing pipeline: encode, invert, denoise with keyframes + propagation, decode.

``TokenFlowPipeline`` works on frames in memory (uint8 arrays) and is the Python API; file
handling, caching and reporting live in ``run.py`` / ``cli.py`` on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DEFAULT_NEGATIVE_PROMPT
from .context import AttentionMode, UNetCall
from .errors import NonFiniteError, TokenFlowError
from .install import TokenFlowUNet
from .inversion import Inversion, ddim_invert
from .keyframes import KeyframeSampler, reference_propagation
from .models import StableDiffusion, load_model


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

    vae_batch_size = 8
    inversion_batch_size = 8

    def __init__(self, model: StableDiffusion, progress: bool = True) -> None:
        self.model = model
        self.progress = progress

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        progress: bool = True,
    ) -> TokenFlowPipeline:
        return cls(load_model(model, device=device, dtype=dtype), progress=progress)

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
        ids = tok(
            prompt,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.model.text_encoder(ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """VAE posterior mean × scaling factor, in batches (frames: (N, H, W, 3) uint8)."""
        vae = self.model.vae
        out = []
        for i in range(0, len(frames), self.vae_batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + self.vae_batch_size]))
            x = x.permute(0, 3, 1, 2).float().div(255).to(self.device, self.dtype)
            out.append(vae.encode(2 * x - 1).latent_dist.mean * vae.config.scaling_factor)
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

            def predict(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return unet(z, t, text.expand(len(z), -1, -1), call)

            inversion = ddim_invert(
                predict,
                self.model.scheduler,
                latents,
                inversion_steps,
                keep,
                self.inversion_batch_size,
                on_step=bar.update,
            )
            self.last_inversion_evaluations = unet.evaluations
        bar.close()
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
        inversion: Inversion | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> EditResult:
        """Edit ``frames`` ((N, H, W, 3) uint8) towards ``prompt`` with TokenFlow + PnP.

        ``inversion`` skips the DDIM inversion (e.g. from the cache); it must come from the same
        frames, model, inversion prompt and schedule.
        """
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
        latents, keyframes, unet_counts = self.denoise(
            z0,
            inversion,
            prompt,
            inversion_prompt,
            negative_prompt,
            steps,
            guidance_scale,
            block_size,
            pnp_attn_t,
            pnp_f_t,
            seed,
            callback,
        )
        timings["denoise"] = time.perf_counter() - clock
        evaluations.update(unet_counts)

        clock = time.perf_counter()
        edited = self.decode_latents(latents)
        timings["decode"] = time.perf_counter() - clock
        return EditResult(edited, latents, keyframes, inversion, timings, evaluations)

    def initial_latents(self, z0: torch.Tensor, inversion: Inversion, t0: int) -> torch.Tensor:
        """Noise the clean latents to ``t0`` with the noise implied by the inversion's end.

        ε_T = (z_T − √ᾱ_T·z0) / √(1−ᾱ_T), then DDIM's ``add_noise(z0, ε_T, t0)``.
        """
        scheduler = self.model.scheduler
        alpha_t = scheduler.alphas_cumprod[inversion.final_timestep]
        eps = (inversion.final.to(z0) - alpha_t**0.5 * z0) / (1 - alpha_t) ** 0.5
        return scheduler.add_noise(z0, eps, torch.tensor([t0]))

    def denoise(
        self,
        z0,
        inversion,
        prompt,
        inversion_prompt,
        negative_prompt,
        steps,
        guidance_scale,
        block_size,
        pnp_attn_t,
        pnp_f_t,
        seed,
        callback=None,
    ) -> tuple[torch.Tensor, list[list[int]], dict[str, int]]:
        """The TokenFlow + PnP denoising loop (reference mode)."""
        if block_size < 1:
            raise TokenFlowError("--block-size must be at least 1")
        n = len(z0)
        scheduler = self.model.scheduler
        timesteps = self.edit_timesteps(steps)
        qk_steps, residual_steps = int(steps * pnp_attn_t), int(steps * pnp_f_t)
        source_text = self.encode_prompt(inversion_prompt)
        uncond_text = self.encode_prompt(negative_prompt)
        cond_text = self.encode_prompt(prompt)

        def texts(count: int) -> torch.Tensor:
            return torch.cat(
                [e.expand(count, -1, -1) for e in (source_text, uncond_text, cond_text)]
            )

        sampler = KeyframeSampler(n, block_size, seed)
        bounds = sampler.bounds
        propagations = [reference_propagation(bounds, b) for b in range(len(bounds))]
        x = self.initial_latents(z0, inversion, timesteps[0])
        drawn: list[list[int]] = []
        counts = {"keyframes": 0, "propagation": 0}
        bar = self._bar(steps, "editing", "step")
        with TokenFlowUNet(self.model.unet) as unet:
            for i, t in enumerate(timesteps):
                unet.context.step = i
                tt = torch.tensor(t, device=self.device)
                source = inversion.latents[t].to(self.device, self.dtype)
                kf = sampler.draw()
                drawn.append(kf.tolist())
                inject_qk, inject_res = i < qk_steps, i < residual_steps

                before = unet.evaluations
                unet(
                    torch.cat([source[kf], x[kf], x[kf]]),
                    tt,
                    texts(len(kf)),
                    UNetCall(
                        AttentionMode.EXTENDED,
                        branches=3,
                        has_source=True,
                        inject_qk=inject_qk,
                        inject_residual=inject_res,
                        record=True,
                    ),
                )
                counts["keyframes"] += unet.evaluations - before

                before = unet.evaluations
                denoised = []
                for b, (s, e) in enumerate(bounds):
                    noise = unet(
                        torch.cat([source[s:e], x[s:e], x[s:e]]),
                        tt,
                        texts(e - s),
                        UNetCall(
                            AttentionMode.PROPAGATE,
                            branches=3,
                            has_source=True,
                            inject_residual=inject_res,
                            propagation=propagations[b],
                        ),
                    )
                    _, uncond, cond = noise.chunk(3)
                    guided = uncond + guidance_scale * (cond - uncond)
                    denoised.append(scheduler.step(guided, tt, x[s:e]).prev_sample)
                counts["propagation"] += unet.evaluations - before
                x = torch.cat(denoised)
                _check_finite(x, f"latents at step {i + 1}")
                bar.update(1)
                if callback is not None:
                    callback(i, steps)
        bar.close()
        return x, drawn, counts

    def _bar(self, total: int, desc: str, unit: str):
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"non-finite values in the {what} (a float16 overflow?); rerun with --dtype bfloat16"
            " or --dtype float32"
        )
