"""``tokenflow eval``: score edited videos against their source by the paper's protocol.

One row per edited video: warp error (flow from the source, method doc section 6), CLIP text score
and CLIP frame consistency (consecutive and all pairs). The flow metrics never need a download; when
the CLIP model is missing the CLIP columns are left empty and the report says why, so a machine
without the model can still compare temporal consistency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.errors import TokenFlowError
from tokenflow.metrics import (
    DEFAULT_CLIP_MODEL,
    FLOW_METHODS,
    ClipScorer,
    consistency_from_embeddings,
    pair_flows,
    resize_frames,
    resolve_flow,
    text_score_from_embeddings,
    warp_error_from_flows,
)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_MISSING = "—"
_FLOW_NAMES = {"dis": "DIS (OpenCV, preset medium)", "raft": "RAFT (torchvision)"}


# --------------------------------------------------------------------------- reading frames


def _numbered_images(folder: Path) -> list[Path]:
    """Image files named by a frame number (00000.png ...), in numeric order."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and p.stem.isdigit()
    ]
    return sorted(files, key=lambda p: int(p.stem))


def _read_images(files: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    frames = []
    for path in files:
        try:
            with Image.open(path) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except OSError as exc:
            raise TokenFlowError(f"cannot read frame {path} ({exc}); replace or remove it") from exc
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise TokenFlowError(
            f"frames in {files[0].parent} differ in size ({sorted(sizes)}); resize them to one size"
        )
    return np.stack(frames)


def _read_video(path: Path, max_frames: int | None = None) -> np.ndarray:
    """Decode RGB frames with PyAV, stopping after ``max_frames`` to save time on long sources."""
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TokenFlowError(f"{path} has no video stream; pass a video file or frames")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.FFmpegError, OSError) as exc:
        raise TokenFlowError(
            f"cannot read video {path} ({type(exc).__name__}); pass a video PyAV can decode "
            "(e.g. .mp4) or a folder of numbered frames"
        ) from exc
    if not frames:
        raise TokenFlowError(f"video {path} has no frames; pass a non-empty video")
    return np.stack(frames)


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Frames of a video file or a folder of numbered images, uint8 (N, H, W, 3)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = _numbered_images(p)
        if not files:
            raise TokenFlowError(
                f"{p} has no numbered frames (00000.png ...); pass a folder of frames or a video"
            )
        return _read_images(files[:max_frames] if max_frames is not None else files)
    if p.is_file():
        return _read_video(p, max_frames)
    raise TokenFlowError(f"{p} does not exist; pass a video file or a folder of numbered frames")


@dataclass
class EditedClip:
    """An edited video to score: its frames, label and which source frames it was made from."""

    path: Path
    label: str
    frames: np.ndarray
    frame_indices: list[int] | None = None


def _label_from_run(run: dict[str, Any], fallback: str) -> str:
    parts = [str(run[k]) for k in ("method", "baseline") if run.get(k) not in (None, "")]
    return " / ".join(parts) if parts else fallback


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenFlowError(f"cannot read {path} ({exc}); fix or remove the file") from exc
    if not isinstance(data, dict):
        raise TokenFlowError(f"{path} must hold a JSON object; fix or remove the file")
    return data


def load_edited(path: str | Path) -> EditedClip:
    """Load a ``tokenflow edit`` output folder (frames/ preferred, else edited.mp4) or a video.

    Lossless ``frames/*.png`` are preferred over the mp4 so compression does not add warp error.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenFlowError(
            f"edited video {p} does not exist; pass a `tokenflow edit` output folder or a video"
        )
    if p.is_file():
        return EditedClip(p, p.stem, _read_video(p))

    run_path = p / "run.json"
    run = _read_run_json(run_path) if run_path.is_file() else {}
    frames_dir = p / "frames"
    if frames_dir.is_dir() and _numbered_images(frames_dir):
        frames = _read_images(_numbered_images(frames_dir))
    elif (p / "edited.mp4").is_file():
        frames = _read_video(p / "edited.mp4")
    elif _numbered_images(p):
        frames = _read_images(_numbered_images(p))
    else:
        raise TokenFlowError(
            f"{p} has no frames/ folder, edited.mp4 or numbered frames; pass a `tokenflow edit` "
            "output folder or a video file"
        )

    indices = run.get("frame_indices")
    if indices is not None:
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            raise TokenFlowError(
                f"{run_path}: frame_indices must be a list of source frame numbers (ints >= 0)"
            )
        if len(indices) != len(frames):
            raise TokenFlowError(
                f"{run_path} lists {len(indices)} frame_indices but {p} has {len(frames)} frames; "
                "re-export the edit or fix run.json"
            )
    return EditedClip(p, _label_from_run(run, p.name), frames, indices)


# --------------------------------------------------------------------------- report


@dataclass
class EvalRow:
    """Scores of one edited video. CLIP fields are None when no CLIP model could be loaded."""

    label: str
    path: str
    frames: int
    width: int
    height: int
    source_frame_indices: list[int]
    warp_error: float
    warp_error_per_pair: list[float]
    clip_text_score: float | None = None
    frame_consistency_consecutive: float | None = None
    frame_consistency_all_pairs: float | None = None


def _json_number(x: float | None) -> float | None:
    """JSON has no NaN: an undefined score (e.g. every pixel occluded) is written as null."""
    return None if x is None or not math.isfinite(x) else x


def _fmt(x: float | None, scale: float = 1.0, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return _MISSING
    return f"{x * scale:.{digits}f}"


@dataclass
class EvalReport:
    """All rows of one evaluation, plus which flow and CLIP model produced them."""

    prompt: str
    source: str
    flow_method: str
    rows: list[EvalRow] = field(default_factory=list)
    flow_note: str = ""
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_note: str = ""

    @property
    def clip_available(self) -> bool:
        return not self.clip_note

    def to_table(self) -> str:
        """A plain-text table, one row per edited video, with footer lines on flow and CLIP."""
        header = [
            "video",
            "frames",
            "resolution",
            "warp err ×1e-3 ↓",
            "CLIP text ↑",
            "frame cons. (consec.) ↑",
            "frame cons. (all) ↑",
        ]
        body = [
            [
                row.label,
                str(row.frames),
                f"{row.width}x{row.height}",
                _fmt(row.warp_error, 1e3, 2),
                _fmt(row.clip_text_score),
                _fmt(row.frame_consistency_consecutive),
                _fmt(row.frame_consistency_all_pairs),
            ]
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        lines = [line(header), line(["-" * w for w in widths]), *(line(r) for r in body)]
        flow_name = _FLOW_NAMES.get(self.flow_method, self.flow_method)
        flow_line = f"warp error: {flow_name} flow on the source frames"
        if self.flow_method == "dis":
            flow_line += (
                "; warp errors computed with DIS flow are not comparable to the paper's "
                "RAFT numbers"
            )
        lines.append(flow_line)
        if self.flow_note:
            lines.append(self.flow_note)
        if self.clip_available:
            lines.append(f"CLIP model: {self.clip_model}; prompt: {self.prompt!r}")
        else:
            lines.append(f"CLIP scores skipped: {self.clip_note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The same numbers as the table (unscaled), plus per-pair warp errors."""
        return {
            "source": self.source,
            "prompt": self.prompt,
            "flow_method": self.flow_method,
            "flow_note": self.flow_note,
            "clip_model": self.clip_model if self.clip_available else None,
            "clip_note": self.clip_note,
            "rows": [
                {
                    "label": row.label,
                    "path": row.path,
                    "frames": row.frames,
                    "width": row.width,
                    "height": row.height,
                    "source_frame_indices": row.source_frame_indices,
                    "warp_error": _json_number(row.warp_error),
                    "warp_error_per_pair": [_json_number(e) for e in row.warp_error_per_pair],
                    "clip_text_score": _json_number(row.clip_text_score),
                    "frame_consistency_consecutive": _json_number(
                        row.frame_consistency_consecutive
                    ),
                    "frame_consistency_all_pairs": _json_number(row.frame_consistency_all_pairs),
                }
                for row in self.rows
            ],
        }


# --------------------------------------------------------------------------- evaluation


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise TokenFlowError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenFlowError(f"device {device!r} asked for but CUDA is not available; use cpu")
    return str(dev)


def _source_indices(clip: EditedClip, source_count: int | None) -> list[int]:
    if clip.frame_indices is not None:
        return list(clip.frame_indices)
    if source_count is not None and source_count != len(clip.frames):
        raise TokenFlowError(
            f"{clip.path} has {len(clip.frames)} frames but the source has {source_count} and no "
            "run.json frame_indices say which were edited; pass a `tokenflow edit` output folder "
            "or trim the source to the same frames"
        )
    return list(range(len(clip.frames)))


def evaluate(
    source: str | Path,
    edited: Sequence[str | Path],
    prompt: str,
    flow: str | None = None,
    flow_model: str | Path | None = None,
    clip_model: str | Path | None = DEFAULT_CLIP_MODEL,
    device: str | None = "auto",
) -> EvalReport:
    """Score each edited video against ``source``; the Python API behind ``tokenflow eval``.

    ``flow=None`` uses RAFT when torchvision and its weights are available locally, else DIS.
    ``clip_model=None`` skips the CLIP scores. A CLIP model that cannot be loaded does not stop the
    flow metrics: its columns are left empty and ``clip_note`` says why.
    """
    if not edited:
        raise TokenFlowError("no edited video given; pass at least one with --edited")
    dev = _resolve_device(device)
    source_path = Path(source).expanduser()
    clips = [load_edited(p) for p in edited]
    for clip in clips:  # the source scored as its own edit is the consistency floor: say so
        if clip.path.resolve() == source_path.resolve():
            clip.label = f"{clip.label} (source)"

    # Read the source once, and only as far as the furthest frame an edit names, when all do.
    needed = None
    if all(c.frame_indices is not None for c in clips):
        needed = max(max(c.frame_indices or [0]) + 1 for c in clips)
    source_frames = read_frames(source_path, needed)
    count = len(source_frames) if needed is None else None

    choice = resolve_flow(flow, flow_model, dev)
    report = EvalReport(
        prompt=prompt,
        source=str(source_path),
        flow_method=choice.method,
        flow_note=choice.note,
        clip_model=str(clip_model) if clip_model is not None else "",
    )

    scorer: ClipScorer | None = None
    if clip_model is None:
        report.clip_note = "no CLIP model given"
    else:
        try:
            scorer = ClipScorer(clip_model, dev)
        except TokenFlowError as exc:
            report.clip_note = str(exc)
    text_embed = scorer.text_embedding(prompt) if scorer is not None else None

    flow_cache: dict[tuple[tuple[int, ...], int, int], tuple[np.ndarray, np.ndarray]] = {}
    for clip in clips:
        indices = _source_indices(clip, count)
        if max(indices, default=0) >= len(source_frames):
            raise TokenFlowError(
                f"{clip.path} uses source frame {max(indices)} but the source has only "
                f"{len(source_frames)} frames; pass the source the edit was made from"
            )
        if len(clip.frames) < 2:
            raise TokenFlowError(f"{clip.path} has {len(clip.frames)} frame; warp error needs 2+")
        height, width = clip.frames.shape[1:3]
        key = (tuple(indices), height, width)
        if key not in flow_cache:
            src = resize_frames(source_frames[indices], (width, height))
            flow_cache[key] = pair_flows(src, choice.method, choice.raft_model)
        per_pair = warp_error_from_flows(clip.frames, *flow_cache[key])
        finite = [e for e in per_pair if math.isfinite(e)]
        row = EvalRow(
            label=clip.label,
            path=str(clip.path),
            frames=len(clip.frames),
            width=width,
            height=height,
            source_frame_indices=indices,
            warp_error=float(np.mean(finite)) if finite else float("nan"),
            warp_error_per_pair=per_pair,
        )
        if scorer is not None and text_embed is not None:
            embeds = scorer.image_embeddings(clip.frames)
            row.clip_text_score = text_score_from_embeddings(embeds, text_embed)
            row.frame_consistency_consecutive = consistency_from_embeddings(embeds, "consecutive")
            row.frame_consistency_all_pairs = consistency_from_embeddings(embeds, "all")
        report.rows.append(row)
    return report


# --------------------------------------------------------------------------- outputs


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path = path.expanduser()
    if not path.parent.is_dir():
        raise TokenFlowError(f"folder {path.parent} does not exist; create it or pick another path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: EvalReport, path: str | Path) -> None:
    """Write :meth:`EvalReport.to_json` atomically."""
    text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    _atomic_write(Path(path), text.encode("utf-8"))


def write_plot(report: EvalReport, path: str | Path) -> None:
    """Write a PNG line plot of per-pair warp error for each row (Agg canvas, no GUI needed)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row in report.rows:
        pairs = np.arange(len(row.warp_error_per_pair))
        ax.plot(pairs, np.asarray(row.warp_error_per_pair) * 1e3, marker="o", ms=3, label=row.label)
    ax.set_xlabel("frame pair (t → t+1)")
    ax.set_ylabel("warp error ×1e-3")
    ax.set_title(f"Warp error per frame pair ({report.flow_method.upper()} flow on the source)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(Path(path), buf.getvalue())


# --------------------------------------------------------------------------- CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tokenflow eval`` options to ``parser``."""
    parser.add_argument(
        "--source",
        required=True,
        type=Path,
        help="source video file or folder of numbered frames (00000.png ...)",
    )
    parser.add_argument(
        "--edited",
        required=True,
        nargs="+",
        type=Path,
        metavar="OUT",
        help="`tokenflow edit` output folders and/or video files, one table row each",
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
        default=DEFAULT_CLIP_MODEL,
        metavar="ID_OR_DIR",
        help=f"CLIP model Hub id or local folder (default: {DEFAULT_CLIP_MODEL}, as in the paper)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write scores")
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="FILE.png", help="plot per-pair warp error"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``tokenflow eval`` from parsed arguments; prints the table and returns the exit code."""
    report = evaluate(
        source=args.source,
        edited=args.edited,
        prompt=args.prompt,
        flow=args.flow,
        flow_model=args.flow_model,
        clip_model=args.clip_model,
        device=args.device,
    )
    print(report.to_table())
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


__all__ = [
    "EditedClip",
    "EvalReport",
    "EvalRow",
    "add_eval_arguments",
    "evaluate",
    "load_edited",
    "read_frames",
    "run_eval",
    "write_json",
    "write_plot",
]
