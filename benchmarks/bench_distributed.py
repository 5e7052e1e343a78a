"""One edit over 1, 2, ... ranks on the CPU (gloo, one thread per rank), and what it predicts
for GPUs.

Each rank count runs the real pipeline on a real clip with a random Stable Diffusion of a chosen
size, under ``torchrun`` (one rank: a plain single process), and prints per stage rank 0's wall
time, the bytes each rank received per denoising step and the peak memory of every rank::

    python benchmarks/bench_distributed.py --size mid --res 256 --frames 48 --ranks 1,2
    python benchmarks/bench_distributed.py --size mid --res 256 --frames 48 --ranks 1,2 \\
        --max-keyframes 4

``--predict`` adds the model of SD 2.1 at 512² in float16 on GPUs: the bytes a step exchanges
(from the UNet's own layer shapes, checked against what the CPU runs measured), the compute per
step (from a stated time per UNet frame-evaluation), the speed-up that gives for R GPUs at a
stated bandwidth, and the longest clip whose per-rank memory fits a 24 or 80 GB GPU, from the
per-frame and per-keyframe memory measured here (activations counted tensor by tensor at a small
size on the CPU, scaled by the token count and to float16) and the exact sizes of weights,
recordings and latents.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref

from common import clip_frames, edit_parser, edit_settings, random_model

STAGES = ("encode", "inversion", "keyframe_passes", "block_passes", "decode")
PER_STEP = ("keyframe keys/values", "keyframe recordings", "latents")
MB = 2**20


def rank_row(args: argparse.Namespace) -> dict | None:
    """This rank's edit (under torchrun, or alone); rank 0 returns every rank's figures."""
    import torch
    import torch.distributed as dist

    from tokenflow.pipeline import TokenFlowPipeline

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    frames = clip_frames(args.clip, args.frames, args.res)
    model = random_model(args.size)
    clock = time.perf_counter()
    settings = edit_settings(args, max_keyframes=args.max_keyframes)
    result = TokenFlowPipeline(model)(frames, **settings)
    wall = time.perf_counter() - clock
    mine = {
        "timings": result.timings,
        "wall": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evaluations": result.unet_evaluations,
    }
    if not dist.is_initialized():
        return {"ranks": 1, "per_rank": [mine], "received": [{}], "split": "single process"}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    row = None
    if dist.get_rank() == 0:
        spread = result.distributed
        row = {"ranks": spread["ranks"], "per_rank": everyone}
        row.update(received=spread["received_bytes"], split=spread["split"])
    dist.destroy_process_group()
    return row


def run_ranks(args: argparse.Namespace, ranks: int) -> dict:
    """One row, in fresh processes (so no peak memory carries over)."""
    me = [__file__, "--worker", *sys.argv[1:]]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={ranks}", *me]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{ranks} ranks failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], steps: int) -> str:
    head = ["ranks", *STAGES, "total s", "speed-up", "received MB/step", "peak RSS MB per rank"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    base = rows[0]["per_rank"][0]["wall"]
    for row in rows:
        zero = row["per_rank"][0]
        cells = [f"{row['ranks']} ({row['split']})"]
        cells += [f"{zero['timings'].get(s, 0.0):.2f}" for s in STAGES]
        cells += [f"{zero['wall']:.2f}", f"{base / zero['wall']:.2f}×"]
        per_step = [sum(r.get(k, 0) for k in PER_STEP) / steps / MB for r in row["received"]]
        cells.append(" / ".join(f"{b:.1f}" for b in per_step) if row["ranks"] > 1 else "-")
        cells.append(" / ".join(f"{r['peak_rss_mb']:.0f}" for r in row["per_rank"]))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# -- the GPU model ---------------------------------------------------------------------------


class LiveBytes:
    """Peak bytes of tensors created in a block that are alive at once (storages counted once),
    counted tensor by tensor: no allocator, no cache, no other process in the figure."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, tuple | list) else (out,):
                    tracker._hold(t)
                return out

        self.mode = Mode()
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def _hold(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __enter__(self) -> LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def _layer_tokens(unet, res: int) -> dict[str, tuple[int, int]]:
    """(tokens, channels) of every self-attention layer at res² (shapes only, meta tensors)."""
    import torch

    from tokenflow.layers import find_layers

    shapes: dict[str, tuple[int, int]] = {}

    def note(name: str):
        def hook(module, args) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    layers = find_layers(unet).self_attention
    hooks = [unet.get_submodule(n).register_forward_pre_hook(note(n)) for n in layers]
    latents = torch.zeros(1, 4, res // 8, res // 8, device="meta")
    text = torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta")
    with torch.no_grad():
        unet(latents, torch.tensor(1, device="meta"), encoder_hidden_states=text)
    for hook in hooks:
        hook.remove()
    return shapes


def _unet(size: str, device: str = "meta"):
    import torch
    from diffusers import UNet2DConditionModel

    from tokenflow.testing import sd_unet_config

    with torch.device(device):
        return UNet2DConditionModel(**sd_unet_config(size)).eval()


def exchange_bytes(size: str, res: int, itemsize: int) -> dict[str, float]:
    """Per keyframe and step: its keys/values of every layer for one edited branch (what the
    all-gathers move) and of the largest layer, its recordings (source inputs and 3 branches'
    outputs: what a boundary block receives); per frame its latents."""
    shapes = _layer_tokens(_unet(size), res)
    per_layer = [t * c * itemsize for t, c in shapes.values()]
    return {
        "kv": 2 * sum(per_layer),
        "kv_largest": 2 * max(per_layer),
        "recordings": 4 * sum(per_layer),
        "latents": 4 * (res // 8) ** 2 * itemsize,
    }


def activation_bytes(res: int) -> tuple[float, float]:
    """Activation bytes per batch entry of one SD 2.1 UNet call at res² (float32, CPU), from the
    peak live bytes of calls of 1 and 3 entries: (with the feed-forward sliced one entry at a
    time, the feed-forward's own share). The pipeline slices it by 24 entries, so a call of
    n entries holds about n x the first + min(n, 24) x the second."""
    import torch

    unet = _unet("sd21", "cpu")
    text = torch.zeros(1, 77, unet.config.cross_attention_dim)
    slopes = []
    for chunk in (1, None):
        for module in unet.modules():
            if hasattr(module, "set_chunk_feed_forward"):
                module.set_chunk_feed_forward(chunk, 0)
        peaks = []
        for n in (1, 3):
            latents = torch.randn(n, 4, res // 8, res // 8)
            with torch.no_grad(), LiveBytes() as live:
                unet(latents, torch.tensor(1), encoder_hidden_states=text.expand(n, -1, -1))
            peaks.append(live.peak)
        slopes.append((peaks[1] - peaks[0]) / 2)
    return slopes[0], slopes[1] - slopes[0]


def predict(args: argparse.Namespace, rows: list[dict]) -> str:
    lines = []
    measured = next((r for r in rows if r["ranks"] > 1 and r["split"] == "shared"), None)
    if measured is not None:
        from types import SimpleNamespace

        from tokenflow.distributed.plan import DenoisePlan
        from tokenflow.options import EditOptions

        comm = SimpleNamespace(rank=0, world=measured["ranks"], new_group=lambda ranks: None)
        plan = DenoisePlan(comm, args.frames, EditOptions(block_size=args.block_size))
        widest = max(len(run) for run in plan.block_runs)
        others = measured["ranks"] - 1
        small = exchange_bytes(args.size, args.res, 4)
        # every other rank's keyframes (padded to the widest share), 2 edited branches, per step
        want = small["kv"] * 2 * widest * others * args.steps
        got = measured["received"][0]["keyframe keys/values"]
        lines.append(
            f"check: keys/values received by rank 0, predicted {want / MB:.1f} MB, measured"
            f" {got / MB:.1f} MB ({args.size} at {args.res}², float32, {args.steps} steps)"
        )
    sizes = exchange_bytes("sd21", 512, 2)
    scale = (512 / args.activation_res) ** 2 / 2  # tokens, and float32 -> float16
    rest, ff = (b * scale for b in activation_bytes(args.activation_res))
    lines += [
        "",
        "SD 2.1, 512², float16: per keyframe and step, keys/values of one edited branch"
        f" {sizes['kv'] / MB:.1f} MB (largest layer {sizes['kv_largest'] / MB:.1f} MB),"
        f" recordings {sizes['recordings'] / MB:.1f} MB; latents {sizes['latents'] / 1024:.0f}"
        f" KB per frame; UNet activations per batch entry {rest / MB:.1f} MB + {ff / MB:.1f} MB"
        f" in the feed-forward (counted at {args.activation_res}² on the CPU, scaled)",
        "",
    ]
    lines += _speedups(sizes, args)
    lines += [""] + _capacity(sizes, rest, ff)
    return "\n".join(lines)


def _speedups(sizes: dict[str, float], args: argparse.Namespace) -> list[str]:
    """Reference mode, N frames in blocks of 8, one prompt: per step, 3(N + K) UNet
    frame-evaluations split over R ranks, against what each rank receives: every other rank's
    keyframes' keys/values for 2 edited branches, 2 boundary keyframes' recordings, and the
    other ranks' latents."""
    t_eval = args.eval_ms / 1000
    head = "frames | GPUs | link | compute s/step | exchange s/step | speed-up"
    lines = [head, " | ".join("---" for _ in head.split(" | "))]
    for n in (240, 1200):
        k = n // 8
        for r in (2, 8):
            for link, gbps in (("NVLink", args.nvlink_gbs), ("PCIe / IB", args.network_gbs)):
                compute = 3 * (n + k) * t_eval / r
                widest = -(-k // r)
                wire = 2 * sizes["kv"] * widest * (r - 1) + 2 * sizes["recordings"]
                wire += sizes["latents"] * n * (r - 1) / r
                exchange = wire / (gbps * 1e9)
                single = 3 * (n + k) * t_eval
                lines.append(
                    f"{n} | {r} | {link} {gbps:g} GB/s | {compute:.2f} | {exchange:.3f} |"
                    f" {single / (compute + exchange):.2f}×"
                )
    return lines


def _capacity(sizes: dict[str, float], rest: float, ff: float) -> list[str]:
    """The longest clip whose per-rank GPU memory fits, blocks of 8, one prompt: weights, a
    block pass (8 frames x 3 branches), 3 latents per frame; in reference mode, the rank's K/R
    keyframes in one call per branch, every keyframe's keys/values of the largest layer gathered
    (twice: the parts and the whole) and recordings kept up to a quarter of the GPU (the rest
    spills to host RAM); in long-video mode one window of 8 keyframes on the rank."""
    weights = 2.6e9  # SD 2.1 in float16: UNet 1.73 GB, text encoder 0.68 GB, VAE 0.17 GB

    def call(entries: float) -> float:
        return entries * rest + min(entries, 24) * ff

    block_pass = call(24)
    lines = ["GPU | ranks | reference mode: frames | long-video (8 keyframes): frames"]
    lines.append("--- | --- | --- | ---")
    for gpu in (24e9, 80e9):
        for r in (1, 8):

            def reference(n: int, gpu=gpu, r=r) -> float:
                k = n / 8
                kept = min(sizes["recordings"] * (k / r + 2), gpu / 4)
                keyframe_pass = call(k / r) + 2 * sizes["kv_largest"] * k
                held = kept + 3 * sizes["latents"] * n
                return weights + max(block_pass, keyframe_pass) + held

            def long_video(n: int) -> float:
                held = 8 * sizes["recordings"] + 3 * sizes["latents"] * n
                return weights + block_pass + held

            lines.append(
                f"{gpu / 1e9:.0f} GB | {r} | {_largest(reference, gpu)} |"
                f" {_largest(long_video, gpu)}"
            )
    return lines


def _largest(need, budget: float) -> int:
    low, high = 8, 8
    while need(high) <= budget and high < 10**8:
        high *= 2
    while high - low > 8:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= budget else (low, mid)
    return low


def main() -> None:
    p = edit_parser(__doc__, threads=None)  # one thread per rank
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--max-keyframes", type=int, default=0, help="long-video mode (0: reference)")
    p.add_argument("--predict", action="store_true", help="also the GPU model (SD 2.1, 512²)")
    p.add_argument("--activation-res", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument(
        "--eval-ms",
        type=float,
        default=4.1,
        help="ms per UNet frame-evaluation of SD 2.1 at 512² in float16 (4.1: an H200, from"
        " the README's 40-frame edit)",
    )
    p.add_argument("--nvlink-gbs", type=float, default=150, help="all-gather GB/s within a node")
    p.add_argument("--network-gbs", type=float, default=20, help="GB/s over PCIe or InfiniBand")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        row = rank_row(args)
        if row is not None:
            print(json.dumps(row))
        return
    rows = [run_ranks(args, int(r)) for r in args.ranks.split(",")]
    mode = f"long-video, {args.max_keyframes} keyframes" if args.max_keyframes else "reference"
    print(
        f"{args.size} model at {args.res}², {args.frames} frames in blocks of {args.block_size},"
        f" {mode}, {args.steps} + {args.inversion_steps} steps, one thread per rank\n"
    )
    print(_table(rows, args.steps))
    if args.predict:
        print()
        print(predict(args, rows))


if __name__ == "__main__":
    main()
