"""Earlier runs in the UI's outputs folder: listing them and naming new ones.

A run is an output folder the CLI could have written (it holds our ``run.json``), so a UI run
is reproduced with ``tokenflow edit --config run.json`` and CLI runs written there show up too.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TokenFlowError
from ..options import EditOptions, load_options
from ..outputs import RUN_FILE, is_earlier_output
from .safety import confine

THUMBNAIL = Path("frames") / "00000.png"


@dataclass
class Run:
    folder: Path
    prompt: str
    created: float  # when its run.json was written (seconds since the epoch)
    info: dict[str, Any]

    @property
    def thumbnail(self) -> Path | None:
        path = self.folder / THUMBNAIL
        return path if path.is_file() else None

    @property
    def caption(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return f"{self.prompt or '(no prompt)'} · {when}"


def list_runs(outputs: Path) -> list[Run]:
    """The runs in ``outputs``, newest first (hidden staging folders are never runs)."""
    runs = []
    if not outputs.is_dir():
        return runs
    for folder in outputs.iterdir():
        if folder.name.startswith(".") or not folder.is_dir() or not is_earlier_output(folder):
            continue
        run_file = folder / RUN_FILE
        try:
            info = json.loads(run_file.read_text("utf-8"))
            created = run_file.stat().st_mtime
        except (OSError, ValueError):
            continue
        prompt = str((info.get("config") or {}).get("prompt", ""))
        runs.append(Run(folder, prompt, created, info))
    return sorted(runs, key=lambda run: run.created, reverse=True)


def run_settings(outputs: Path, folder: str | Path) -> EditOptions:
    """The options of the run in ``folder``, which must be one of ``outputs``' runs."""
    found = confine(folder, [outputs], "run")
    if found.parent != outputs.resolve() or not is_earlier_output(found):
        raise TokenFlowError("that run is not in the outputs folder")
    return load_options(found / RUN_FILE)


def new_run_folder(outputs: Path, prompt: str, now: float | None = None) -> Path:
    """An unused folder name in ``outputs`` for a new run: its time and the prompt's words."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "run"
    folder, count = outputs / f"{stamp}-{words}", 1
    while folder.exists():
        count += 1
        folder = outputs / f"{stamp}-{words}-{count}"
    return folder
