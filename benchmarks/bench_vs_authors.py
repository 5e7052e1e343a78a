"""Our engine against the authors' original TokenFlow code (omerbt/TokenFlow), side by side.

Why: "reference mode" claims to compute what the authors' code computes; this benchmark shows
what that costs in wall time and peak memory next to their code, on the same machine, model,
clip and settings, and checks that the edited frames (and the inverted latents) agree.

The authors' code runs through the harness in ``../shared/refcheck`` (``run_reference.py``:
their ``preprocess.prep`` DDIM inversion, then ``run_tokenflow_pnp.run``, fp32 on the CPU) in
their own venv; ours runs as ``python -m tokenflow edit`` (PnP, reference propagation) with this
interpreter. Each side is one fresh process with the same thread count (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``--threads`` for the harness' ``torch.set_num_threads``); its wall time
is measured around the process and its peak RSS is the ``ru_maxrss`` that ``os.wait4`` returns
for that child. Setting up the authors' side (see ``../shared/refcheck/README.md``)::

    git --git-dir="$TOKENFLOW_GIT" archive HEAD -- . ':(exclude)assets' | tar -x -C "$REF_TREE"
    bash ../shared/refcheck/setup_ref_venv.sh "$REF_VENV"
    "$REF_VENV/bin/python" ../shared/refcheck/make_tiny_model.py "$MODELS/mid" --size mid

Then, from the repository root with our venv active::

    python benchmarks/bench_vs_authors.py --ref-tree "$REF_TREE" --ref-venv "$REF_VENV" \\
        --model "$MODELS/mid" --frames 16 --size 256 --inversion-steps 10 --steps 10

It prints per-stage times, the keyframe draws and the latent comparison as ``#`` lines, then
one markdown table row per run (``--no-header`` leaves the header out, to stack settings).
The authors' side also runs a DDIM reconstruction after its inversion (a diagnostic of their
preprocessing that we do not run) and drops frames past the last full block; both sides read
the same video, and ``--keep`` leaves both output folders in ``--work`` for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
REFCHECK = SHARED / "refcheck"
CLIP = SHARED / "data" / "woman-running.mp4"
MIB = 1024 * 1024


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` in a fresh process; its wall time (s) and peak RSS (MiB, ``ru_maxrss``)."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"{cmd[0]} ... failed ({proc.returncode}):\n" + "\n".join(tail))
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def compare_frames(a: list[Path], b: list[Path]) -> dict[str, float]:
    """Mean / max absolute difference in grey levels over the frames both sides wrote."""
    n = min(len(a), len(b))
    diffs = [np.abs(read_png(x) - read_png(y)) for x, y in zip(a[:n], b[:n], strict=True)]
    d = np.stack(diffs)
    return {
        "frames": n,
        "mean": float(d.mean()),
        "max": int(d.max()),
        "share_over_1": float((d > 1).mean()),
        "max_per_frame": [int(x.max()) for x in diffs],
    }


def compare_latents(ref_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Inverted latents per timestep: the authors' dumped ``noisy_latents_<t>.pt`` against our
    inversion cache entry (tensors named by timestep)."""
    import torch
    from safetensors import safe_open

    entries = sorted(cache_dir.glob("*.safetensors"))
    if not entries or not ref_dir.is_dir():
        return {}
    out: dict[str, Any] = {}
    with safe_open(str(entries[0]), framework="pt") as f:
        for key in sorted(f.keys(), key=int):
            ref_file = ref_dir / f"noisy_latents_{key}.pt"
            if not ref_file.is_file():
                continue
            ours = f.get_tensor(key).float()
            theirs = torch.load(ref_file, map_location="cpu").float()
            n = min(len(ours), len(theirs))
            diff = (ours[:n] - theirs[:n]).abs()
            out[key] = {"max": float(diff.max()), "scale": float(theirs[:n].abs().max())}
    return out


def compare_inputs(ref_frames: list[Path], n: int, width: int, height: int) -> int | None:
    """Max grey-level difference between the authors' extracted input frames and ours."""
    try:
        from tokenflow.video import read_clip
    except ImportError:
        return None
    ours = read_clip(CLIP, max_frames=n, size=(width, height)).frames.astype(np.int16)
    theirs = np.stack([read_png(p) for p in ref_frames[:n]])
    return int(np.abs(ours - theirs).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-tree", required=True, help="extracted omerbt/TokenFlow work tree")
    p.add_argument("--ref-venv", required=True, help="venv made by setup_ref_venv.sh")
    p.add_argument("--model", required=True, help="diffusers folder from make_tiny_model.py")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="square working size in pixels")
    p.add_argument("--inversion-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="editing steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="the harness' default seed")
    p.add_argument("--prompt", default="a marble sculpture of a woman running")
    p.add_argument("--inversion-prompt", default="a woman running")
    p.add_argument("--negative-prompt", default="ugly, blurry, low res, unrealistic, unaesthetic")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--work", help="folder for both outputs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep --work's outputs")
    p.add_argument("--no-header", action="store_true", help="print the table row only")
    p.add_argument("--json", help="also write every number to this file")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vs_authors_"))
    work.mkdir(parents=True, exist_ok=True)
    ref_out, our_out, cache = work / "authors", work / "ours", work / "ours_cache"
    for path in (ref_out, our_out, cache):
        shutil.rmtree(path, ignore_errors=True)
    env = thread_env(args.threads)
    block_size = 8
    common = dict(prompt=args.prompt, inv=args.inversion_prompt, neg=args.negative_prompt)

    ref_cmd = [
        str(Path(args.ref_venv) / "bin" / "python"),
        str(REFCHECK / "run_reference.py"),
        *("--ref-tree", args.ref_tree, "--model", args.model, "--video", str(CLIP)),
        *("--out", str(ref_out), "--method", "pnp", "--n-frames", str(args.frames)),
        *("--height", str(args.size), "--width", str(args.size)),
        *("--inversion-steps", str(args.inversion_steps), "--steps", str(args.steps)),
        *("--batch-size", str(block_size), "--seed", str(args.seed)),
        *("--prompt", common["prompt"], "--inversion-prompt", common["inv"]),
        *("--negative-prompt", common["neg"], "--guidance", str(args.guidance)),
        *("--threads", str(args.threads), "--dump-latents"),
    ]
    our_cmd = [
        sys.executable,
        *("-m", "tokenflow", "edit", str(CLIP), "--frames", str(args.frames)),
        *("--size", f"{args.size}x{args.size}", "--method", "pnp", "--propagation", "reference"),
        *("--inversion-steps", str(args.inversion_steps), "--steps", str(args.steps)),
        *("--block-size", str(block_size), "--seed", str(args.seed)),
        *("--prompt", common["prompt"], "--inversion-prompt", common["inv"]),
        *("--negative-prompt", common["neg"], "--guidance-scale", str(args.guidance)),
        *("--model", args.model, "--device", "cpu", "--dtype", "float32"),
        *("--out", str(our_out), "--cache-dir", str(cache), "--no-audio", "--quiet"),
    ]
    theirs = run_measured(ref_cmd, env, work / "authors.log")
    ours = run_measured(our_cmd, env, work / "ours.log")

    info = json.loads((ref_out / "run_info.json").read_text())
    run = json.loads((our_out / "run.json").read_text())
    ref_frames = sorted(ref_out.glob("[0-9]*.png"))
    frames = compare_frames(ref_frames, sorted((our_out / "frames").glob("*.png")))
    latents = compare_latents(ref_out / "inverted_latents", cache)
    extracted = sorted((ref_out / "work" / "data" / CLIP.stem).glob("*.png"))
    inputs = compare_inputs(extracted, frames["frames"], args.size, args.size)

    setting = f"{args.frames} frames, {args.size}², {args.inversion_steps} + {args.steps} steps"
    t, r = info["timings_s"], run["timings_s"]
    print(f"# {setting}; {args.threads} threads, float32, model {Path(args.model).name}")
    print(
        "# authors: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
        + f"; process {theirs['wall_s']:.1f} s, {theirs['peak_mib']:.0f} MiB"
    )
    print(
        "# ours:    "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r.items())
        + f"; run.json wall {run['wall_time_s']:.1f} s;"
        + f" process {ours['wall_s']:.1f} s, {ours['peak_mib']:.0f} MiB"
    )
    their_keys = (info.get("keyframes") or {}).get("keyframe_indices")
    if their_keys == run["keyframes"]:
        print(f"# keyframes: identical ({len(their_keys)} steps, first {their_keys[0]})")
    else:
        print(f"# keyframes differ: ours {run['keyframes']}, authors {their_keys}")
    if inputs is not None:
        print(f"# input frames max diff (their extraction vs our reader): {inputs}")
    print(
        f"# frames ({frames['frames']}): mean {frames['mean']:.3f}, max {frames['max']},"
        f" {100 * frames['share_over_1']:.3f} % of values off by more than 1;"
        f" max per frame {frames['max_per_frame']}"
    )
    if latents:
        worst = max(latents.values(), key=lambda v: v["max"])
        print(
            f"# inverted latents at {len(latents)} common timesteps: max abs diff"
            f" {worst['max']:.2e} (largest |latent| {worst['scale']:.2f})"
        )
    if not args.no_header:
        header = [
            "setting",
            "authors wall s",
            "ours wall s",
            "ratio",
            "authors peak MB",
            "ours peak MB",
            "ratio",
            "frames max diff",
        ]
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
    cells = [
        setting,
        f"{theirs['wall_s']:.1f}",
        f"{ours['wall_s']:.1f}",
        f"{ours['wall_s'] / theirs['wall_s']:.2f}x",
        f"{theirs['peak_mib']:.0f}",
        f"{ours['peak_mib']:.0f}",
        f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x",
        f"{frames['max']} (mean {frames['mean']:.2f})",
    ]
    print("| " + " | ".join(cells) + " |", flush=True)

    if args.json:
        doc = {
            "args": vars(args),
            "authors": {**theirs, "timings_s": t, "keyframes": info.get("keyframes")},
            "ours": {**ours, "timings_s": r, "keyframes": run["keyframes"]},
            "frames": frames,
            "latents": latents,
            "input_max_diff": inputs,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
