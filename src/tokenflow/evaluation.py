"""``tokenflow eval``: score edited videos against their source by the paper's protocol.

One row per edited video: warp error (flow from the source, method doc section 6), CLIP text score
and CLIP frame consistency (consecutive and all pairs).

Every video, source and edits alike, is read by :func:`tokenflow.video.read_clip`, the reader
``tokenflow edit`` uses, so the flow is computed on exactly the frames and geometry that were
edited (rotation from the display matrix, frame selection, resize and crop):

- a ``tokenflow edit`` output folder: the source is re-read with the options recorded in the
  ``config`` section of its ``run.json`` (start, end, stride, frames, size, fit, short_side,
  fps), and must then give the edit's frame count, size and ``frame_indices``;
- an edit without run.json (a plain video or frames folder, read at its displayed size): the
  source is read from its first frame and brought to the edit's size with ``fit`` (crop by
  default, as ``tokenflow edit`` does; pad or stretch on request), and must have as many frames;
- the source passed among the edits (the floor of the table) is scored on the source frames of
  the first edit, so it is comparable with the edits' rows.

A CLIP model that cannot be loaded is an error raised before any flow is computed;
``clip_model=None`` skips the CLIP scores.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow import atomic
from tokenflow.errors import TokenFlowError
from tokenflow.metrics import (
    DEFAULT_CLIP_MODEL,
    ClipScorer,
    consistency_from_embeddings,
    pair_flows,
    resolve_flow,
    text_score_from_embeddings,
    warp_error_from_flows,
)
from tokenflow.video import read_clip

_MISSING = "—"
_FLOW_NAMES = {"dis": "DIS (OpenCV, preset medium)", "raft": "RAFT (torchvision)"}
_FITS = ("crop", "pad", "stretch")
# Numbered frame files, as read_clip reads them from a folder.
_FRAME_FILE = re.compile(r"^\d+\.(png|jpe?g)$", re.IGNORECASE)


# --------------------------------------------------------------------------- reading frames


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """read_clip warns that big working sizes make *editing* slow; scoring them is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"working size .* is above")
        yield


def _displayed(path: Path, max_frames: int | None = None) -> Any:
    """A video or frames folder as shown (display rotation applied), without any resampling.

    Sizes must be multiples of 8 (what ``tokenflow edit`` produces and ``read_clip`` works at).
    """
    with _reading():
        width, height = read_clip(path, max_frames=1, short_side=64).source_size
        if width % 8 or height % 8:
            raise TokenFlowError(
                f"{path} is {width}x{height}, but videos are scored at sizes that are multiples "
                f"of 8 (as tokenflow edit makes them); resize it, e.g. to "
                f"{max(8, width // 8 * 8)}x{max(8, height // 8 * 8)}"
            )
        return read_clip(path, max_frames=max_frames, size=(width, height))


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Frames of a video or frames folder at their displayed size, uint8 (N, H, W, 3)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenFlowError(
            f"{p} does not exist; pass a video file or a folder of numbered frames"
        )
    return _displayed(p, max_frames).frames


def _has_frame_files(folder: Path) -> bool:
    return any(_FRAME_FILE.match(entry.name) for entry in folder.iterdir())


@dataclass
class EditedClip:
    """An edited video to score: its frames, label and its ``run.json`` ({} when it has none)."""

    path: Path
    label: str
    frames: np.ndarray
    frame_indices: list[int] | None = None
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the edited frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


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
    Frames are read at their displayed size.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenFlowError(
            f"edited video {p} does not exist; pass a `tokenflow edit` output folder or a video"
        )
    if p.is_file():
        return EditedClip(p, p.stem, _displayed(p).frames)

    run_path = p / "run.json"
    run = _read_run_json(run_path) if run_path.is_file() else {}
    frames_dir = p / "frames"
    if frames_dir.is_dir() and _has_frame_files(frames_dir):
        frames = _displayed(frames_dir).frames
    elif (p / "edited.mp4").is_file():
        frames = _displayed(p / "edited.mp4").frames
    elif _has_frame_files(p):
        frames = _displayed(p).frames
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
    return EditedClip(p, _label_from_run(run, p.name), frames, indices, run)


# --------------------------------------------------------------------------- source frames


@dataclass
class SourceFrames:
    """The source frames an edit was made from, read as the edit read them."""

    frames: np.ndarray
    frame_indices: list[int]
    how: str  # for the table's footer
    key: tuple[Any, ...]  # the same key means the same frames (flows are shared)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def _config_size(value: Any, run_path: Path) -> tuple[int, int] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", value)
        if match:
            return int(match.group(1)), int(match.group(2))
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TokenFlowError(f"{run_path}: config size {value!r} is not WIDTHxHEIGHT; fix run.json")


def _edit_read_options(config: dict[str, Any], run_path: Path) -> dict[str, Any]:
    """read_clip's keyword arguments from a run.json ``config``, as ``tokenflow edit`` used them."""
    return {
        "start": config.get("start"),
        "end": config.get("end"),
        "stride": config.get("stride") or 1,
        "max_frames": config.get("frames"),
        "size": _config_size(config.get("size"), run_path),
        "fit": config.get("fit") or "crop",
        "short_side": config.get("short_side") or 512,
        "fps": config.get("fps"),
    }


def _span(indices: list[int]) -> str:
    if len(indices) > 2:
        step = indices[1] - indices[0]
        if step > 0 and all(b - a == step for a, b in zip(indices, indices[1:], strict=False)):
            stride = f" (every {step})" if step > 1 else ""
            return f"frames {indices[0]}..{indices[-1]}{stride}"
    return "frames " + ", ".join(map(str, indices))


def _read_source(source: Path, options: dict[str, Any], cache: dict[Any, Any] | None) -> Any:
    key = tuple(sorted(options.items()))
    if cache is not None and key in cache:
        return cache[key]
    with _reading():
        clip = read_clip(source, **options)
    if cache is not None:
        cache[key] = clip
    return clip


def source_frames_for(
    edited: EditedClip,
    source: str | Path,
    fit: str = "crop",
    _cache: dict[Any, Any] | None = None,
) -> SourceFrames:
    """The frames of ``source`` that ``edited`` was made from, at the edit's geometry.

    - run.json with a ``config`` section (a ``tokenflow edit`` output): the source is re-read with
      the edit's own selection and sizing; the frame count, size and ``frame_indices`` must then
      match the edit's, else the source is not the one the edit was made from.
    - run.json with ``frame_indices`` only: those frames, brought to the edit's size with ``fit``.
    - no run.json: the source from its first frame, brought to the edit's size with ``fit``
      (``crop``, ``pad`` or ``stretch``); it must have exactly as many frames as the edit.
    """
    source = Path(source).expanduser()
    if fit not in _FITS:
        raise TokenFlowError(f"unknown fit {fit!r}; use one of {', '.join(_FITS)}")
    count = len(edited.frames)
    width, height = edited.size
    run_path = edited.path / "run.json"
    config = edited.run.get("config")

    if isinstance(config, dict):
        options = _edit_read_options(config, run_path)
        clip = _read_source(source, options, _cache)
        got_w, got_h = clip.size
        if len(clip) != count or (got_w, got_h) != (width, height):
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} gives {len(clip)} "
                f"frames of {got_w}x{got_h} but the edit has {count} frames of {width}x{height}; "
                "pass the source the edit was made from"
            )
        if edited.frame_indices is not None and list(clip.frame_indices) != edited.frame_indices:
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} selects source "
                f"{_span(list(clip.frame_indices))} but run.json lists "
                f"{_span(edited.frame_indices)}; pass the source the edit was made from"
            )
        recorded = edited.run.get("input") if isinstance(edited.run.get("input"), dict) else {}
        recorded_size = recorded.get("size")
        if isinstance(recorded_size, list) and recorded_size != [got_w, got_h]:
            raise TokenFlowError(
                f"re-reading {source} with the edit's settings in {run_path} gives frames of "
                f"{got_w}x{got_h} but run.json records {recorded_size}; pass the source the "
                "edit was made from"
            )
        indices = list(clip.frame_indices)
        how = f"source {_span(indices)} read as the edit read them (run.json)"
        made_from = recorded.get("path")
        if isinstance(made_from, str) and Path(made_from).name != source.name:
            how += f"; run.json says it was made from {made_from}"
        return SourceFrames(clip.frames, indices, how, ("run", tuple(sorted(options.items()))))

    if edited.frame_indices is not None:
        wanted = edited.frame_indices
        options = {
            "start": min(wanted, default=0),
            "end": max(wanted, default=0) + 1,
            "size": (width, height),
            "fit": fit,
        }
        clip = _read_source(source, options, _cache)
        position = {index: i for i, index in enumerate(clip.frame_indices)}
        missing = [i for i in wanted if i not in position]
        if missing:
            raise TokenFlowError(
                f"{edited.path} uses source frame {max(missing)} but the source has only "
                f"{clip.frame_indices[-1] + 1} frames; pass the source the edit was made from"
            )
        frames = clip.frames[[position[i] for i in wanted]]
        how = (
            f"run.json has no config: source {_span(wanted)} it lists, brought to "
            f"{width}x{height} with fit {fit}"
        )
        key = ("indices", tuple(wanted), width, height, fit)
        return SourceFrames(frames, list(wanted), how, key)

    options = {"max_frames": count + 1, "size": (width, height), "fit": fit}
    clip = _read_source(source, options, _cache)
    if len(clip) != count:
        found = len(clip) if len(clip) < count else f"more than {count}"
        raise TokenFlowError(
            f"{edited.path} has {count} frames but the source has {found}, and no run.json says "
            "which source frames were edited; pass a `tokenflow edit` output folder, or trim the "
            "source to the edited frames"
        )
    indices = list(clip.frame_indices[:count])
    how = f"no run.json: source {_span(indices)} brought to {width}x{height} with fit {fit}"
    return SourceFrames(clip.frames, indices, how, ("plain", count, width, height, fit))


# --------------------------------------------------------------------------- report


@dataclass
class EvalRow:
    """Scores of one edited video. CLIP fields are None when the CLIP scores were skipped."""

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
    notes: list[str] = field(default_factory=list)  # which source frames each row was scored on

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
        lines.extend(self.notes)
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
            "notes": list(self.notes),
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


def unique_labels(labels: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Make row labels unique: rows sharing a label get the shortest path tail that tells them
    apart ("pnp (a)", "pnp (b)"; "pnp (x/run)", "pnp (y/run)"), then a number if still equal."""
    out = list(labels)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        parts = [Path(paths[i]).expanduser().absolute().parts for i in members]
        depth = 1
        while True:
            tails = ["/".join(p[-depth:]) for p in parts]
            if len(set(tails)) == len(tails) or depth >= max(len(p) for p in parts):
                break
            depth += 1
        for i, tail in zip(members, tails, strict=True):
            out[i] = f"{label} ({tail})"
    seen: dict[str, int] = {}
    for i, label in enumerate(out):  # the same path twice: number the repeats
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            out[i] = f"{label} #{seen[label]}"
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def evaluate(
    source: str | Path,
    edited: Sequence[str | Path],
    prompt: str,
    flow: str | None = None,
    flow_model: str | Path | None = None,
    clip_model: str | Path | None = DEFAULT_CLIP_MODEL,
    device: str | None = "auto",
    fit: str = "crop",
) -> EvalReport:
    """Score each edited video against ``source``; the Python API behind ``tokenflow eval``.

    ``flow=None`` uses RAFT when torchvision and its weights are available locally, else DIS.
    ``clip_model=None`` skips the CLIP scores; a CLIP model that cannot be loaded raises
    :class:`~tokenflow.metrics.ClipUnavailableError` before any frame is read. ``fit`` brings the
    source to the size of edits that have no run.json (see :func:`source_frames_for`).
    """
    if not edited:
        raise TokenFlowError("no edited video given; pass at least one")
    if fit not in _FITS:
        raise TokenFlowError(f"unknown fit {fit!r}; use one of {', '.join(_FITS)}")
    dev = _resolve_device(device)
    source_path = Path(source).expanduser()
    if not source_path.exists():
        raise TokenFlowError(
            f"source {source_path} does not exist; pass the video or frames folder the edits "
            "were made from"
        )
    paths = [Path(p).expanduser() for p in edited]
    for p in paths:
        if not p.exists():
            raise TokenFlowError(
                f"edited video {p} does not exist; pass a `tokenflow edit` output folder or a video"
            )

    # Cheap checks first, then the CLIP model: a missing model fails before any decoding or flow.
    choice = resolve_flow(flow, flow_model, dev)
    scorer = ClipScorer(clip_model, dev) if clip_model is not None else None
    report = EvalReport(
        prompt=prompt,
        source=str(source_path),
        flow_method=choice.method,
        flow_note=choice.note,
        clip_model=str(clip_model) if clip_model is not None else "",
        clip_note="" if scorer is not None else "no CLIP model given",
    )
    text_embed = scorer.text_embedding(prompt) if scorer is not None else None

    is_source = [_same_path(p, source_path) for p in paths]
    clips = [None if own else load_edited(p) for p, own in zip(paths, is_source, strict=True)]
    source_name = source_path.stem if source_path.is_file() else source_path.name
    labels = unique_labels(
        [f"{source_name} (source)" if c is None else c.label for c in clips], paths
    )

    reads: dict[Any, Any] = {}
    used = [None if c is None else source_frames_for(c, source_path, fit, reads) for c in clips]
    edits = [(labels[i], s) for i, s in enumerate(used) if s is not None]
    for label, src in edits:
        report.notes.append(f"{label}: {src.how}")
    reference: SourceFrames | None = edits[0][1] if edits else None
    if any(is_source):
        if reference is None:
            clip = _displayed(source_path)
            indices = list(clip.frame_indices)
            reference = SourceFrames(
                clip.frames, indices, f"source {_span(indices)} at its displayed size", ("own",)
            )
            how = reference.how
        else:
            how = f"scored on the source frames of {edits[0][0]}, as the edits' rows"
            if any(src.key != reference.key for _, src in edits):
                how += (
                    "; the edits were made from different source frames or sizes, so it uses "
                    f"those of the first edit, {edits[0][0]}"
                )
        for i in (i for i, own in enumerate(is_source) if own):
            report.notes.append(f"{labels[i]}: {how}")

    flow_cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
    for i, path in enumerate(paths):
        src = used[i] if used[i] is not None else reference
        assert src is not None
        clip = clips[i]
        frames = src.frames if clip is None else clip.frames
        if len(frames) < 2:
            raise TokenFlowError(f"{path} has {len(frames)} frame; warp error needs 2+")
        if src.key not in flow_cache:
            flow_cache[src.key] = pair_flows(src.frames, choice.method, choice.raft_model)
        per_pair = warp_error_from_flows(frames, *flow_cache[src.key])
        finite = [e for e in per_pair if math.isfinite(e)]
        height, width = frames.shape[1:3]
        row = EvalRow(
            label=labels[i],
            path=str(path),
            frames=len(frames),
            width=int(width),
            height=int(height),
            source_frame_indices=list(src.frame_indices),
            warp_error=float(np.mean(finite)) if finite else float("nan"),
            warp_error_per_pair=per_pair,
        )
        if scorer is not None and text_embed is not None:
            embeds = scorer.image_embeddings(frames)
            row.clip_text_score = text_score_from_embeddings(embeds, text_embed)
            row.frame_consistency_consecutive = consistency_from_embeddings(embeds, "consecutive")
            row.frame_consistency_all_pairs = consistency_from_embeddings(embeds, "all")
        report.rows.append(row)
    return report


# --------------------------------------------------------------------------- outputs


def write_json(report: EvalReport, path: str | Path) -> None:
    """Write :meth:`EvalReport.to_json` atomically, with the user's normal permissions."""
    text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    atomic.write_text(Path(path).expanduser(), text)


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
    atomic.write_bytes(Path(path).expanduser(), buf.getvalue())


# --------------------------------------------------------------------------- CLI


__all__ = [
    "EditedClip",
    "EvalReport",
    "EvalRow",
    "SourceFrames",
    "evaluate",
    "load_edited",
    "read_frames",
    "source_frames_for",
    "unique_labels",
    "write_json",
    "write_plot",
]
