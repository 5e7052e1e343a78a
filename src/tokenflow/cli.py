"""The ``tokenflow`` command: edit, invert, cache, info, eval.

A thin layer over the Python API: it parses flags into an ``EditConfig`` (``--config`` first,
flags on top), runs the job, and turns ``TokenFlowError`` into one line on stderr with exit
code 2 (130 on Ctrl-C) instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields

from . import __version__
from .config import (
    BASELINES,
    DEFAULT_MODEL,
    DEFAULT_NEGATIVE_PROMPT,
    METHODS,
    EditConfig,
    load_config,
)
from .errors import TokenFlowError

EDIT_EXAMPLES = """examples:
  tokenflow edit clip.mp4 --prompt "a marble sculpture of a woman running" \\
      --inversion-prompt "a woman running" --out results/marble
  tokenflow edit clip.mov --start 2s --end 6s --stride 2 --size 672x384 --fit crop \\
      --prompt "a watercolor painting" --inversion-prompt "a dog" --out results/dog
  tokenflow edit frames/ --fps 24 --model ./my-sd15-folder --prompt "..." --out out/
  tokenflow edit --config results/marble/run.json --out results/again   # reproduce a run
"""


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    p.add_argument("input", nargs="?", default=s, help="video file or folder of numbered frames")
    p.add_argument("--config", help="YAML config (or an earlier run.json); flags override it")
    p.add_argument(
        "--model",
        default=s,
        help=f"HF id, diffusers folder or .safetensors file (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--model-config",
        default=s,
        help="for a .safetensors --model: a diffusers folder of the same base model (SD 1.5 or"
        " 2.1) to read its component configs and tokenizer from; needed offline",
    )
    p.add_argument("--inversion-prompt", default=s, help="plain description of the source video")
    p.add_argument("--start", default=s, help="first frame: a frame number (12) or a time (1.5s)")
    p.add_argument("--end", default=s, help="end (exclusive): a frame number or a time")
    p.add_argument("--stride", type=int, default=s, help="keep every k-th frame (default 1)")
    p.add_argument("--frames", type=int, default=s, help="at most this many frames")
    p.add_argument(
        "--size", default=s, help="working size WxH, multiples of 8 (default: keep aspect)"
    )
    p.add_argument(
        "--fit",
        choices=("crop", "pad", "stretch"),
        default=s,
        help="how --size is met (default crop)",
    )
    p.add_argument(
        "--short-side", type=int, default=s, help="default sizing: short side in pixels (512)"
    )
    p.add_argument(
        "--fps", type=float, default=s, help="frame rate of a frames folder (default 10)"
    )
    p.add_argument("--steps", type=int, default=s, help="editing DDIM steps (default 50)")
    p.add_argument(
        "--inversion-steps", type=int, default=s, help="DDIM inversion steps (default 500)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=s)
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default=s,
        help="default float16 on CUDA, float32 elsewhere",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=s,
        help="torch.compile the UNet's resnets and feed-forwards (the first edit compiles)",
    )
    p.add_argument(
        "--cache-dir",
        default=s,
        help="inversion cache folder (default $TOKENFLOW_CACHE or the user cache)",
    )
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        default=s,
        help="do not read or write the inversion cache",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _add_control_flags(p: argparse.ArgumentParser) -> None:
    """The method and its ControlNet: they change the inversion too, so invert takes them."""
    s = argparse.SUPPRESS
    p.add_argument("--method", choices=METHODS, default=s, help="editing method (default pnp)")
    p.add_argument("--controlnet", default=s, help="controlnet: ControlNet HF id or folder")
    p.add_argument(
        "--control",
        default=s,
        help="controlnet: canny, depth, or a video/frames folder of control images",
    )
    p.add_argument("--control-scale", type=float, default=s, help="controlnet: scale (1.0)")
    p.add_argument("--canny-low", type=int, default=s, help="canny low threshold (100)")
    p.add_argument("--canny-high", type=int, default=s, help="canny high threshold (200)")
    p.add_argument("--depth-model", default=s, help="--control depth: depth model id or folder")


def _add_edit_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    p.add_argument("--prompt", default=s, help="the edit: what the video should become")
    p.add_argument("--negative-prompt", default=s, help=f"default: {DEFAULT_NEGATIVE_PROMPT!r}")
    p.add_argument(
        "--out", default=s, help="output folder (edited.mp4, frames/, side_by_side.mp4, run.json)"
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default=s,
        help="paper baselines/ablations: per-frame PnP, joint attention, fixed keyframes",
    )
    p.add_argument(
        "--propagation",
        choices=("reference", "paper"),
        default=s,
        help="token blend: the authors' code (default) or the paper's text",
    )
    p.add_argument(
        "--strength", type=float, default=s, help="sdedit: noise level to start from (0.9)"
    )
    p.add_argument(
        "--strength-compat",
        action="store_true",
        default=s,
        help="sdedit: the authors' slicing (44 of 50 steps at 0.9 instead of 45)",
    )
    p.add_argument(
        "--noise",
        choices=("ddim", "random"),
        default=s,
        help="sdedit: start from the inverted noise (default) or random noise",
    )
    p.add_argument(
        "--guidance", type=float, default=s, help="classifier-free guidance scale (default 7.5)"
    )
    p.add_argument(
        "--block-size", type=int, default=s, help="frames per keyframe block (default 8)"
    )
    p.add_argument(
        "--max-keyframes",
        type=int,
        default=s,
        help="long-video mode: edit at most K keyframes per UNet call, memory independent of"
        " the clip length (default 0: all keyframes jointly, the reference)",
    )
    p.add_argument(
        "--keyframe-memory",
        dest="keyframe_memory_mb",
        type=int,
        default=s,
        metavar="MB",
        help="keyframe tokens kept in memory between the keyframe and block passes; the rest"
        " goes to host RAM (GPU) or a temporary file (CPU) (default: a quarter of the GPU's"
        " memory; 64 on the CPU)",
    )
    p.add_argument(
        "--pnp-attn-t", type=float, default=s, help="fraction of steps with q/k injection (0.5)"
    )
    p.add_argument(
        "--pnp-f-t", type=float, default=s, help="fraction of steps with residual injection (0.8)"
    )
    p.add_argument("--seed", type=int, default=s, help="keyframe draws (default 1)")
    p.add_argument(
        "--no-audio", dest="audio", action="store_false", default=s, help="drop the source's audio"
    )
    p.add_argument("--gif", action="store_true", default=s, help="also write edited.gif")
    p.add_argument(
        "--overwrite", action="store_true", default=s, help="replace an existing --out folder"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one ``error:`` line, not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cache import add_cache_arguments
    from .evaluation import add_eval_arguments

    parser = _Parser(
        prog="tokenflow",
        description="Text-driven video editing with TokenFlow (Stable Diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"tokenflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fmt = argparse.RawDescriptionHelpFormatter
    edit = sub.add_parser(
        "edit", help="edit a video with a prompt", epilog=EDIT_EXAMPLES, formatter_class=fmt
    )
    _add_input_flags(edit)
    _add_control_flags(edit)
    _add_edit_flags(edit)

    invert = sub.add_parser(
        "invert",
        help="precompute a clip's DDIM inversion into the cache",
        formatter_class=fmt,
        epilog="example:\n  tokenflow invert clip.mp4 --inversion-prompt 'a woman running'\n",
    )
    _add_input_flags(invert)
    _add_control_flags(invert)

    add_cache_arguments(sub.add_parser("cache", help="list, measure or clear the inversion cache"))

    info = sub.add_parser("info", help="versions, device, cache location, model availability")
    info.add_argument("--model", default=None, help="also check whether this model loads offline")
    info.add_argument("--model-config", default=None, help="diffusers folder for a .safetensors")

    add_eval_arguments(
        sub.add_parser(
            "eval",
            help="warp error and CLIP scores of edited videos",
            formatter_class=fmt,
            epilog="example:\n  tokenflow eval --source a.mp4 --edited out/a out/b --prompt ...\n",
        )
    )
    return parser


def config_from_args(args: argparse.Namespace) -> EditConfig:
    """``--config`` (if any), then every flag that was given on the command line."""
    config = load_config(args.config) if args.config else EditConfig()
    names = {f.name for f in fields(EditConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return config.updated(**given)


def _log(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    return log


def _cmd_edit(args: argparse.Namespace) -> int:
    from .run import run_edit

    config = config_from_args(args)
    if not config.input:
        raise TokenFlowError("no input: give a video file or a frames folder")
    if not config.out:
        raise TokenFlowError("no --out folder given; e.g. --out results/my-edit")
    report = run_edit(config, progress=not args.quiet, log=_log(args.quiet))
    _log(args.quiet)(f"wrote {report.out} ({report.info['wall_time_s']:.1f} s)")
    return 0


def _cmd_invert(args: argparse.Namespace) -> int:
    from .run import run_invert

    config = config_from_args(args)
    if not config.input:
        raise TokenFlowError("no input: give a video file or a frames folder")
    run_invert(config, progress=not args.quiet, log=_log(args.quiet))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .cache import InversionCache
    from .models import load_model, resolve_device, resolve_dtype
    from .run import package_versions

    for name, version in package_versions().items():
        print(f"{name:14s} {version}")
    device = resolve_device(None)
    print(
        f"{'device':14s} {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(f"{'dtype':14s} {str(resolve_dtype(None, device)).removeprefix('torch.')}")
    cache = InversionCache()
    print(
        f"{'cache':14s} {cache.root} ({len(cache.entries())} entries,"
        f" {cache.size() / 2**20:.1f} MiB)"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    print(f"{'hub':14s} {'offline (HF_HUB_OFFLINE)' if offline else 'online allowed'}")
    if args.model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            model = load_model(args.model, device="cpu", dtype="float32", config=args.model_config)
        except TokenFlowError as exc:
            print(f"{'model':14s} NOT available offline: {exc}")
            return 1
        print(f"{'model':14s} {args.model}: available offline (fingerprint {model.fingerprint()})")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .cache import run_cache

    return run_cache(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval

    return run_eval(args)


COMMANDS = {
    "edit": _cmd_edit,
    "invert": _cmd_invert,
    "cache": _cmd_cache,
    "info": _cmd_info,
    "eval": _cmd_eval,
}


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # scoped, so --quiet or the one-line format never leak into a caller that imports main
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings
        if getattr(args, "quiet", False):
            warnings.simplefilter("ignore")
        try:
            return COMMANDS[args.command](args)
        except TokenFlowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("error: interrupted: partial outputs removed, cache untouched", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
