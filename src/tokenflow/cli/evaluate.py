"""``tokenflow eval``: the paper's table for edited videos (see ``tokenflow.evaluation``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TokenFlowError
from ..evaluation import evaluate, write_json, write_plot
from ..evaluation.sources import FITS
from ..metrics import DEFAULT_CLIP_MODEL, FLOW_METHODS, ClipUnavailableError

_EVAL_DESCRIPTION = """\
Score edited videos against their source: warp error (optical flow on the
source frames), CLIP text score and CLIP frame consistency, one row each.

Which source frames an edit is compared with:
  - a `tokenflow edit` output folder: the source is re-read with the frame
    selection and sizing recorded in its run.json (start, end, stride,
    frames, size, fit, short side, fps), so the flow is computed on exactly
    the frames and geometry that were edited; if that does not give the
    edit's frame count and size, it is an error (wrong source).
  - a plain video or frames folder (no run.json): the source is read from
    its first frame and brought to the edit's size with --fit (crop by
    default, as `tokenflow edit` does); it must have as many frames.
  - the source itself among --edited (the floor of the table): scored on
    the source frames of the first edit, at its size.
Videos are read as displayed (rotation metadata applied); edits must have
sizes that are multiples of 8.
"""


def _clip_model_arg(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tokenflow eval`` options to ``parser``."""
    if parser.description is None:
        parser.description = _EVAL_DESCRIPTION
    parser.add_argument(
        "--source",
        required=True,
        type=Path,
        help="the video file or folder of numbered frames (00000.png ...) the edits were made from",
    )
    parser.add_argument(
        "--edited",
        required=True,
        nargs="+",
        type=Path,
        metavar="OUT",
        help="`tokenflow edit` output folders and/or video files, one table row each (labels: "
        "method / baseline from run.json, with the folder name added where two would be equal); "
        "include the source itself for the consistency floor",
    )
    parser.add_argument("--prompt", required=True, help="target prompt for the CLIP text score")
    parser.add_argument(
        "--flow",
        choices=FLOW_METHODS,
        default=None,
        help="optical flow for warp error (default: raft if torchvision and its weights are "
        "available locally, else dis)",
    )
    parser.add_argument(
        "--flow-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="torchvision RAFT weights (.pth state dict or .safetensors); never downloaded",
    )
    parser.add_argument(
        "--clip-model",
        type=_clip_model_arg,
        default=DEFAULT_CLIP_MODEL,
        metavar="ID_OR_DIR",
        help=f"CLIP model: a local folder or a Hub id (default: {DEFAULT_CLIP_MODEL}, as in the "
        "paper). A Hub id is taken from the local HF cache, or downloaded when HF_HUB_OFFLINE is "
        "unset and the Hub answers. A model that cannot be loaded is an error before anything "
        "is computed; 'none' skips the CLIP scores",
    )
    parser.add_argument(
        "--fit",
        choices=FITS,
        default="crop",
        help="for edits without run.json: how the source is brought to the edit's size (default: "
        "crop, as `tokenflow edit` does; tokenflow edit outputs use their own recorded fit)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write scores")
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="FILE.png", help="plot per-pair warp error"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _cli_clip_error(exc: ClipUnavailableError) -> TokenFlowError:
    """The library's CLIP error, with the fix spelled in ``tokenflow eval`` flags."""
    skip = "or --clip-model none to skip the CLIP scores"
    if exc.hub_id is not None:
        fix = (
            f"get it with `hf download {exc.hub_id}` on a connected machine (then copy the HF "
            f"cache here), pass --clip-model a local CLIP folder, {skip}"
        )
    else:
        fix = f"{exc.fix} with --clip-model, {skip}"
    return TokenFlowError(f"{exc.problem}; {fix}")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``tokenflow eval`` from parsed arguments; prints the table and returns the exit code."""
    for out in (args.json, args.plot):
        if out is not None and not out.expanduser().parent.is_dir():
            raise TokenFlowError(f"cannot write {out}: folder {out.parent} does not exist")
    try:
        report = evaluate(
            source=args.source,
            edited=args.edited,
            prompt=args.prompt,
            flow=args.flow,
            flow_model=args.flow_model,
            clip_model=args.clip_model,
            device=args.device,
            fit=getattr(args, "fit", "crop"),
        )
    except ClipUnavailableError as exc:
        raise _cli_clip_error(exc) from exc
    print(report.to_table())
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
