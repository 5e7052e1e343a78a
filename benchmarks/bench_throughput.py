"""How close an edit runs to the hardware: UNet evaluations per second per stage, the share of
the device's peak they reach, and TokenFlow's overhead over a plain diffusers UNet call.

One edit runs on a random model with Stable Diffusion's layout (``--size sd21`` is SD 2.1's real
architecture) on a real clip. Then a plain diffusers UNet call (no TokenFlow processors, no
hook) is timed at the batch sizes the edit used: the inversion's batch, and the block pass's
three branches of ``block_size`` frames. FLOPs per UNet evaluation (one frame, one timestep)
are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one plain call (matmuls,
convolutions and attention as torch counts them: 2 per multiply-add); the device's peak is
its published dense rate for the dtype (``--peak-tflops`` to override) or, on a CPU, the rate
of a large matrix product measured here. Prints one table::

    python benchmarks/bench_throughput.py --size mid --res 256 --frames 16 --threads 2
    python benchmarks/bench_throughput.py --size sd21 --res 512 --frames 40 --device cuda \\
        --dtype float16 --steps 50 --inversion-steps 500 --warmup
"""

from __future__ import annotations

import time

from common import (
    attention_backend,
    bench_pipeline,
    clip_frames,
    edit_parser,
    edit_settings,
    timed_edit,
    variant_label,
)

#: Published dense (no sparsity) tensor-core rates in TFLOP/s, by device name and dtype.
PEAK_TFLOPS = {
    "H200": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0},
    "H100": {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0},
    "A100": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5},
    "L40S": {"float16": 362.0, "bfloat16": 362.0, "float32": 91.6},
    "L4": {"float16": 121.0, "bfloat16": 121.0, "float32": 30.3},
    "A10": {"float16": 125.0, "bfloat16": 125.0, "float32": 31.2},
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(device, dtype, override: float | None) -> tuple[float, str]:
    """FLOP/s the device can do at ``dtype``, and where the number comes from."""
    import torch

    if override:
        return override * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, rates in PEAK_TFLOPS.items():
            if key in name:
                return rates[str(dtype).removeprefix("torch.")] * 1e12, f"{name}, published"
    n = 4096 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    _sync(device)
    clock, repeats = time.perf_counter(), 3
    for _ in range(repeats):
        a @ a
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - clock), f"{n}² matmul measured here"


def flops_per_evaluation(model, shape: tuple[int, ...]) -> float:
    """FLOPs of one plain UNet evaluation of one frame, as torch's flop counter counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latents = torch.zeros(1, *shape, device=model.device, dtype=model.dtype)
    text = model.encode_prompt("a photo").unet_kwargs()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.unet(latents, torch.tensor(500, device=model.device), **text)
    return float(counter.get_total_flops())


def plain_rate(model, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Plain diffusers UNet evaluations (frames) per second at ``batch`` frames per call."""
    import torch

    latents = torch.randn(batch, *shape, device=model.device, dtype=model.dtype)
    text = model.encode_prompt("a photo").expand(batch).unet_kwargs()
    t = torch.tensor(500, device=model.device)
    with torch.no_grad():
        model.unet(latents, t, **text)  # warm-up (kernel choice, allocator)
        _sync(model.device)
        clock = time.perf_counter()
        for _ in range(repeats):
            model.unet(latents, t, **text)
        _sync(model.device)
    return batch * repeats / (time.perf_counter() - clock)


def main() -> None:
    p = edit_parser(__doc__, steps=4, inversion_steps=4, threads=2, engine=True)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, help="the device's peak, if not in the table")
    p.add_argument("--save", help="save the edit's final latents here (.npy), to compare variants")
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    frames = clip_frames(args.clip, args.frames, args.res)
    pipe = bench_pipeline(args)
    model = pipe.model
    edit = timed_edit(pipe, frames, args, **edit_settings(args))
    result, warm = edit.result, edit.warm
    if args.save:
        np.save(args.save, result.latents.float().cpu().numpy())
    shape = tuple(result.latents.shape[1:])
    flops = flops_per_evaluation(model, shape)
    peak, peak_source = device_peak(model.device, model.dtype, args.peak_tflops)

    t, e = result.timings, result.unet_evaluations
    keyframe_batch = 3 * -(-args.frames // args.block_size)
    rows = [
        ("inversion", e["inversion"], t["inversion"], pipe.inversion_batch_size),
        ("keyframe passes", e["keyframes"], t["keyframe_passes"], keyframe_batch),
        ("block passes", e["propagation"], t["block_passes"], 3 * args.block_size),
    ]
    repeats = max(1, args.steps // 2)
    print(
        f"# {args.model or args.size} {args.res}² {variant_label(args)}, {args.frames} frames,"
        f" {args.inversion_steps} + {args.steps} steps; {flops / 1e9:.2f} GFLOP per UNet"
        f" evaluation (torch's flop counter); peak {peak / 1e12:.2f} TFLOP/s ({peak_source})"
    )
    header = ["stage", "evals", "s", "evals/s", "% of peak", "plain evals/s", "TokenFlow/plain"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, evaluations, seconds, batch in rows:
        rate = evaluations / seconds
        with attention_backend(args):
            plain = plain_rate(model, shape, min(batch, evaluations), repeats)
        cells = [
            name,
            str(evaluations),
            f"{seconds:.2f}",
            f"{rate:.1f}",
            f"{100 * rate * flops / peak:.1f}",
            f"{plain:.1f}",
            f"{plain / rate:.2f}x",
        ]
        print(" | ".join(cells), flush=True)
    total = sum(e.values()) / (t["inversion"] + t["denoise"])
    print(f"all UNet stages: {total:.1f} evals/s, {100 * total * flops / peak:.1f} % of peak")
    if warm is not None:  # the floor for comparing variants: two runs of one variant
        change = (warm.latents - result.latents).float().norm() / result.latents.float().norm()
        print(f"final latents, warm-up edit vs timed edit: {change.item():.2e} (relative L2)")
    if model.device.type == "cuda":
        print(f"peak CUDA memory of the edit: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
