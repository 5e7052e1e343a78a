"""The evaluation's table and its files: rows of scores, text table, JSON, warp-error plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow import atomic
from tokenflow.metrics import DEFAULT_CLIP_MODEL

_MISSING = "—"
_FLOW_NAMES = {"dis": "DIS (OpenCV, preset medium)", "raft": "RAFT (torchvision)"}


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
