#!/usr/bin/env bash
# Every GPU measurement of the speed work in one run, for a GPU machine held for minutes only:
# SD 2.1's architecture (random weights) at 512², fp16, 40 frames of woman-running.
#
#   bash benchmarks/gpu_checks.sh prepare   # on a machine with PyPI: wheels + clip into .gpu/
#   bash benchmarks/gpu_checks.sh run       # on the GPU machine (no network needed)
#
# `run` needs the GPU machine's own torch and the packages it lacks as wheels in .gpu/wheels
# (`prepare` fetches diffusers, av, platformdirs and importlib_metadata for Python $GPU_PYTHON).
# It prints, in this order, and keeps each log in $OUT (default gpu-results/):
#   1. the machine: GPU, torch, cuDNN, a measured fp16 matmul rate;
#   2. one rank under torchrun with NCCL writes the plain run's frames (bit for bit);
#   3. per engine variant (layout, inversion batch, SDPA backend, compilation): evaluations/s per
#      stage, % of peak, TokenFlow/plain-UNet ratios, peak memory, difference from the baseline;
#   4. a profile of one inversion batch and one editing step of the fastest variant;
#   5. end to end at the defaults (500 inversion + 50 editing steps) with the fastest variant;
#   6. the compiled variants (torch.compile, CUDA graphs), with the time left.
# A section that would not finish before $DEADLINE seconds (default 540) is skipped, saying so,
# and none runs past DEADLINE + 30 s.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON=${GPU_PYTHON:-3.12}
OUT=${OUT:-gpu-results}
DEADLINE=${DEADLINE:-540}
CLIP=${CLIP:-.gpu/woman-running.mp4} # where `prepare` puts it; else the clips beside the checkout
[[ -f $CLIP ]] || CLIP=../shared/data/woman-running.mp4
# the setting measured (SIZE=tiny RES=64 FRAMES=6 DEVICE=cpu DTYPE=float32: a dry run on a CPU)
SIZE=${SIZE:-sd21} RES=${RES:-512} FRAMES=${FRAMES:-40} DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
WORK=$(mktemp -d)
MODEL=$WORK/model # the random model, saved once, loaded by every step
BENCH="python3 benchmarks"
SHAPE=(--res "$RES" --frames "$FRAMES" --clip "$CLIP" --device "$DEVICE" --dtype "$DTYPE"
    --threads 8)

prepare() {
    mkdir -p .gpu/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels \
        diffusers==0.42.1 av==18.1.0 platformdirs==4.14.8 importlib_metadata==8.7.0
    cp ../shared/data/woman-running.mp4 .gpu/
    du -sh .gpu
}

# whether a section of about $1 seconds still fits before the deadline
fits() {
    if ((SECONDS + $1 > DEADLINE)); then
        echo "skipped: $2 (needs ~$1 s, $((DEADLINE - SECONDS)) s left)"
        return 1
    fi
}

# `timeout` for a section: whatever is left of the deadline's margin
limited() { timeout $((DEADLINE + 30 - SECONDS)) "$@"; }

# a log without the lines every run repeats (profiler, diffusers' dtype notes, warnings)
quiet() { grep -v "^\(USDT\|There are modules\|W[0-9]\)" "$1"; }

# bench_throughput per "label|flags" (the short schedule, after a warm-up edit); each one's log,
# final latents and flags stay in $OUT
variants() {
    local label flags cost i
    for variant in "$@"; do
        label=${variant%%|*} flags=${variant#*|}
        cost=$([[ $flags == *compile* ]] && echo 150 || echo 45)
        fits "$cost" "$label" || continue
        i=$(($(cat "$OUT/variants.txt" 2>/dev/null | wc -l) + 1))
        echo "### $label"
        # shellcheck disable=SC2086
        limited $BENCH/bench_throughput.py --model "$MODEL" "${SHAPE[@]}" \
            --steps 5 --inversion-steps 10 --warmup $flags --save "$OUT/latents$i.npy" \
            >"$OUT/variant$i.log" 2>&1
        quiet "$OUT/variant$i.log" | tail -9
        echo "$i|$label|$flags" >>"$OUT/variants.txt"
    done
}

# every variant so far: its rate and its final latents' difference from the baseline's (on
# stderr); the fastest one's flags (on stdout)
fastest() {
    python3 - "$OUT" <<'EOF'
import re, sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1])
base = np.load(out / "latents1.npy") if (out / "latents1.npy").exists() else None
rates = {}
for line in (out / "variants.txt").read_text().splitlines():
    i, label, flags = line.split("|")
    found = re.search(r"all UNet stages: ([\d.]+) evals/s", (out / f"variant{i}.log").read_text())
    if not found or not (out / f"latents{i}.npy").exists():
        print(f"{label}: failed (see variant{i}.log)", file=sys.stderr)
        continue
    rates[flags] = float(found[1])
    x = np.load(out / f"latents{i}.npy")
    diff = np.linalg.norm(x - base) / np.linalg.norm(base) if base is not None else float("nan")
    print(f"{label}: {rates[flags]:.1f} evals/s; final latents vs baseline {diff:.2e}"
          " (relative L2)", file=sys.stderr)
print(max(rates, key=rates.get) if rates else "")
EOF
}

run() {
    mkdir -p "$OUT"
    rm -f "$OUT/variants.txt"
    export PYTHONUNBUFFERED=1
    if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            .gpu/wheels/*.whl || exit 1
        export PYTHONPATH=$PWD/src:/tmp/site
    else
        export PYTHONPATH=$PWD/src
    fi

    echo "## 1. the machine"
    [[ $DEVICE == cuda ]] &&
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 - "$DEVICE" "$DTYPE" <<'EOF'
import sys, time, torch
device, dtype = torch.device(sys.argv[1]), getattr(torch, sys.argv[2])
n = 8192 if device.type == "cuda" else 2048
a = torch.randn(n, n, device=device, dtype=dtype)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
for _ in range(3): a @ a
sync(); t = time.perf_counter()
for _ in range(10): a @ a
sync()
rate = 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12
name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {name}:"
      f" {sys.argv[2]} {n}³ matmul {rate:.1f} TFLOP/s")
EOF
    python3 -c "from tokenflow.testing import save_tiny_sd; save_tiny_sd('$MODEL', '$SIZE')" ||
        exit 1
    echo "saved the random $SIZE at ${SECONDS} s"

    echo "## 2. one rank under torchrun (NCCL on a GPU) against one plain process"
    local edit=("$CLIP" --model "$MODEL" --frames 8 --size 256x256 --steps 3
        --inversion-steps 3 --prompt "a marble sculpture" --inversion-prompt "a woman running"
        --device "$DEVICE" --dtype "$DTYPE" --no-cache --no-audio --quiet)
    if fits 90 "torchrun check"; then
        python3 -m tokenflow edit "${edit[@]}" --out "$WORK/plain" >"$OUT/torchrun.log" 2>&1 &&
            python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m tokenflow edit \
                "${edit[@]}" --out "$WORK/ranked" >>"$OUT/torchrun.log" 2>&1 &&
            python3 - "$WORK" <<'EOF' || tail -5 "$OUT/torchrun.log"
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
work = Path(sys.argv[1])
def frames(name):
    return np.stack([np.asarray(Image.open(p)) for p in sorted((work / name / "frames").iterdir())])
a, b = frames("plain"), frames("ranked")
info = json.loads((work / "ranked" / "run.json").read_text())["distributed"]
print(f"{len(a)} frames; under torchrun: {info}; bit-identical: {np.array_equal(a, b)},"
      f" max difference {np.abs(a.astype(int) - b.astype(int)).max()} grey levels")
EOF
    fi

    echo "## 3. engine variants: $FRAMES frames $RES² $DTYPE, 10 + 5 steps, after a warm-up edit"
    variants "baseline|" \
        "channels-last|--channels-last" \
        "channels-last, inversion batch $FRAMES|--channels-last --inversion-batch $FRAMES" \
        "channels-last, cuDNN attention first|--channels-last --sdpa cudnn"
    local best
    best=$(fastest)
    echo "fastest: ${best:-baseline}"

    echo "## 4. profile of one inversion batch and one editing step (fastest variant)"
    if fits 100 "profile"; then
        # shellcheck disable=SC2086
        limited $BENCH/profile_step.py --model "$MODEL" "${SHAPE[@]}" $best \
            --trace "$OUT/trace.json" >"$OUT/profile.log" 2>&1
        quiet "$OUT/profile.log" | tail -45
        gzip -f "$OUT/trace.json"
    fi

    echo "## 5. end to end at the defaults, 500 + 50 steps, first edit (fastest variant)"
    if fits 150 "end to end"; then
        # shellcheck disable=SC2086
        limited $BENCH/bench_edit.py --model "$MODEL" "${SHAPE[@]}" --steps 50 \
            --inversion-steps 500 $best >"$OUT/end_to_end.log" 2>&1
        quiet "$OUT/end_to_end.log" | tail -4
    fi

    echo "## 6. compiled variants, with the time left (compiling costs minutes)"
    variants "channels-last, compiled|--channels-last --compile" \
        "channels-last, compiled, CUDA graphs|--channels-last --compile reduce-overhead"
    fastest >/dev/null
    rm -rf "$WORK"
    echo "done in ${SECONDS} s"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*) sed -n 2,19p "$0" && exit 2 ;;
esac
