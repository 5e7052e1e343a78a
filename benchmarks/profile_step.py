"""Where one inversion batch and one editing step spend their time: a torch.profiler trace split
by stage, the device's busy time against the gaps between its kernels, and the top kernels.

After a warm-up at the same shapes, one inversion UNet call (``inversion_batch_size`` frames)
and one editing step (the keyframe pass and every block pass, plus the VAE around them) run
under the profiler. The stages are the spans the engine marks (``StageClock``: keyframe_passes,
block_passes); on a GPU they are read on the GPU's own timeline. Gaps are the share of a span
with no kernel running: launch overhead and host work the GPU waits for. On a GPU it also
lists the kernel families and top kernels of the step's UNet calls, and the source lines where
the host waits for the GPU (CUDA's sync debug mode, in a run apart). Prints the tables and
writes the Chrome trace (``--trace``, open it in Perfetto)::

    python benchmarks/profile_step.py --size mid --res 256 --frames 16
    python benchmarks/profile_step.py --model sd21 --res 512 --frames 40 --device cuda \\
        --dtype float16 --channels-last
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from common import (
    EDIT_PROMPTS,
    attention_backend,
    bench_pipeline,
    clip_frames,
    edit_parser,
    variant_label,
)

REGIONS = ("inversion batch", "editing step", "keyframe_passes", "block_passes")
#: kernel families by name, first match wins (cuDNN/cuBLAS/CUTLASS/Triton names on CUDA)
FAMILIES = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|xmma|cutlass|matmul|cublas|mm_"),
    ("convolution", r"conv|implicit|winograd|cudnn|nhwc|nchw"),
    ("normalisation", r"norm"),
    ("copy / layout", r"copy|memcpy|memset|transpose|permute|cat|index|gather|scatter"),
    ("elementwise / reduction", r"elementwise|vectorized|reduce|triton|silu|gelu|add|mul"),
)


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as disjoint, sorted ones (nested ops count once)."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered(spans: list[tuple[float, float]], work: list[tuple[float, float]]) -> float:
    """Time inside ``spans`` during which some ``work`` interval runs."""
    total = 0.0
    for s0, s1 in merged(spans):
        for w0, w1 in work:
            total += max(0.0, min(s1, w1) - max(s0, w0))
    return total


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def analyse(trace: dict, on_gpu: bool) -> tuple[list[list[str]], dict[str, list], float]:
    """Per region: spans, wall, busy and gaps; by name, the work inside the editing step's UNet
    calls (on a GPU), and the busy time there."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    span_category = "gpu_user_annotation" if on_gpu else "user_annotation"
    if on_gpu and not any(e.get("cat") == span_category for e in events):
        span_category = "user_annotation"  # an older profiler: spans on the host's timeline
    if on_gpu:
        work_events = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    else:
        work_events = [e for e in events if e.get("cat") == "cpu_op"]
    work = merged([(e["ts"], e["ts"] + e["dur"]) for e in work_events])
    spans = defaultdict(list)
    for e in events:
        if e.get("cat") == span_category and e["name"] in REGIONS:
            spans[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
    rows = []
    for region in REGIONS:
        region_spans = merged(spans[region])
        length = sum(b - a for a, b in region_spans)
        if not length:
            continue
        busy = covered(region_spans, work)
        rows.append([
            region, str(len(spans[region])), f"{length / 1e3:.1f}", f"{busy / 1e3:.1f}",
            f"{100 * (1 - busy / length):.1f}",
        ])  # fmt: skip
    # the step's UNet calls, without the VAE around them
    step = merged(spans["keyframe_passes"] + spans["block_passes"])
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in work_events if on_gpu else []:  # on the CPU, torch's own self-time table instead
        inside = covered(step, [(e["ts"], e["ts"] + e["dur"])])
        if inside:
            by_name[e["name"]][0] += inside
            by_name[e["name"]][1] += 1
    return rows, by_name, covered(step, work)


def host_syncs(work) -> Counter:
    """Where ``work`` makes the host wait for the GPU (CUDA's sync debug mode: ``.item()``,
    copies to pageable memory, ...), by source line; run apart from the profile, which it
    would slow."""
    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(row))


def main() -> None:
    p = edit_parser(__doc__, threads=2, engine=True)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--trace", help="write the Chrome trace here (default: a temporary file)")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    frames = clip_frames(args.clip, args.frames, args.res)
    pipe = bench_pipeline(args)
    on_gpu = pipe.device.type == "cuda"
    step = dict(EDIT_PROMPTS, steps=1, inversion_steps=1, block_size=args.block_size)
    batch = min(pipe.inversion_batch_size, len(frames))

    def profiled(inversion):
        with record_function("inversion batch"):
            pipe.invert(latents, **step)
        with record_function("editing step"):
            pipe(frames, inversion=inversion, **step)
        if on_gpu:
            torch.cuda.synchronize()

    with attention_backend(args):
        latents = pipe.encode_frames(frames[:batch])
        warm = pipe(frames, **step)  # every shape once: kernel choices, allocator, compilation
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            profiled(warm.inversion)
        syncs = host_syncs(lambda: profiled(warm.inversion)) if on_gpu else None
    path = Path(args.trace or tempfile.mkstemp(suffix=".json")[1])
    prof.export_chrome_trace(str(path))
    rows, by_name, busy = analyse(json.loads(path.read_text()), on_gpu)

    unit = "device" if on_gpu else "CPU op"
    print(
        f"# {args.model or args.size} {args.res}² {variant_label(args)}, {args.frames} frames,"
        f" blocks of {args.block_size}, inversion batch {batch}; ms; trace: {path}"
    )
    print_table(["region", "spans", "wall", f"{unit} busy", "gaps %"], rows)
    if not on_gpu:
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        return
    families: dict[str, float] = defaultdict(float)
    for name, (time, _) in by_name.items():
        families[family(name)] += time
    print()
    print_table(
        ["kernel family (editing step's UNet calls)", "ms", "% of busy"],
        [[f, f"{t / 1e3:.1f}", f"{100 * t / busy:.1f}"]
         for f, t in sorted(families.items(), key=lambda kv: -kv[1])],
    )  # fmt: skip
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]
    print()
    print_table(
        ["kernel (editing step's UNet calls)", "calls", "ms", "% of busy"],
        [[name[:90], str(n), f"{t / 1e3:.1f}", f"{100 * t / busy:.1f}"]
         for name, (t, n) in top],
    )  # fmt: skip
    print()
    where = ", ".join(f"{line} ({n})" for line, n in syncs.most_common(8)) or "none"
    print(f"host syncs in one inversion batch and one editing step: {syncs.total()}: {where}")


if __name__ == "__main__":
    main()
