"""The summary of a job list run: one row per output, as CSV (for a spreadsheet) and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_text
from .runner import SCORES, STATUSES, OutputRow

COLUMNS = ("job", "clip", "prompt", "status", "time_s", "unet_evaluations", "out", "error")


def summary_stem(jobs_file: Path, shard: tuple[int, int] | None = None) -> Path:
    """Where the summary goes by default: beside the job list, one per shard."""
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return jobs_file.with_name(f"{jobs_file.stem}{tag}.summary")


def counts(rows: list[OutputRow]) -> dict[str, int]:
    seen = Counter(row.status for row in rows)
    return {status: seen[status] for status in STATUSES}


def _csv(rows: list[OutputRow], scored: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS + (SCORES if scored else ()))
    for row in rows:
        values = [getattr(row, name) for name in COLUMNS]
        values = ["" if v is None else v for v in values]
        if scored:
            values += ["" if row.scores.get(s) is None else row.scores[s] for s in SCORES]
        writer.writerow(values)
    return buffer.getvalue()


def write_summary(
    rows: list[OutputRow], stem: Path, meta: dict[str, Any], scored: bool = False
) -> tuple[Path, Path]:
    """Write ``stem``.csv and ``stem``.json (each atomically); returns their paths."""
    rows = sorted(rows, key=lambda row: row.job)  # stable: a job's prompts keep their order
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    write_text(csv_path, _csv(rows, scored))
    data = {**meta, "counts": counts(rows), "rows": [asdict(row) for row in rows]}
    write_text(json_path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")
    return csv_path, json_path


def table(rows: list[OutputRow]) -> str:
    """The rows as aligned text for the terminal: job, status, time, evaluations, output."""
    lines = [("job", "status", "time", "UNet evals", "output / error")]
    for row in sorted(rows, key=lambda row: row.job):
        time_s = "" if row.time_s is None else f"{row.time_s:.1f} s"
        evals = "" if row.unet_evaluations is None else str(row.unet_evaluations)
        lines.append((str(row.job), row.status, time_s, evals, row.error or row.out))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths, strict=True)) + "  " + line[4]
        for line in lines
    )
