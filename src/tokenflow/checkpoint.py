"""Step checkpoints: an interrupted edit continues from its last completed denoising step.

After every denoising step an edit writes what the next step starts from -- each prompt's
latents and the step count -- into one safetensors file beside its output folder (a hidden
sibling, like the staging folder), atomically and durably, so a crash, a SIGKILL or a
preempted job loses at most the step under way. ``resume`` continues from it: with the cached
inversion, the latents, and the keyframe draws of the steps done replayed from the
structure's seeded generator, every later step computes exactly what the uninterrupted run
did. The file also records every setting that shapes the result and the inversion's cache
key (clip, model, inversion settings); a resume whose settings differ is refused, naming
what differs. A finished edit removes its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from .atomic import write_bytes
from .errors import TokenFlowError
from .options import FIELD_INFO, EditOptions

FORMAT = 1
#: options a resume may change: those that do not change the edited frames (the options'
#: ``shapes_frames``), the prompt (recorded with the run's other prompts, in order) and out
#: (the checkpoint lives beside it); the clip and model enter through the inversion key
NEUTRAL = frozenset(
    {"prompt", "out"} | {name for name, info in FIELD_INFO.items() if not info.shapes_frames}
)


def checkpoint_path(out: Path) -> Path:
    """Where the edit writing ``out`` keeps its checkpoint: a hidden sibling of it."""
    return out.with_name(f".{out.name}.resume.safetensors")


def run_identity(runs: list[EditOptions], inversion_key: str) -> dict[str, Any]:
    """What must be equal for a resume to give the uninterrupted run's frames."""
    settings = {k: v for k, v in runs[0].to_dict().items() if k not in NEUTRAL}
    identity = {
        "settings": settings,
        "prompts": [o.prompt for o in runs],
        "inversion": inversion_key,
    }
    return json.loads(json.dumps(identity))  # as it reads back from the file (lists, not tuples)


@dataclass
class DenoiseState:
    """Where the denoising loop stands after ``step`` completed steps."""

    step: int
    latents: list[torch.Tensor]  # each prompt's, every frame


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("inversion") != new["inversion"]:
        return "the clip's frames, the model or the inversion settings differ"
    before, now = old.get("settings", {}), new["settings"]
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        return ", ".join(f"`{k}` was {before.get(k)!r}, now {now.get(k)!r}" for k in changed[:3])
    return f"the prompts were {old.get('prompts')}, now {new['prompts']}"


class StepCheckpoint:
    """The checkpoint of one edit (all its prompts) at ``path``; ``resume``: continue from it."""

    def __init__(self, path: Path, identity: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.identity = identity
        self.resume = resume

    def _read(self, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """The file's metadata, and its tensors unless ``tensors`` is False (the header alone)."""
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                keys = f.keys() if tensors else []
                loaded = {k: f.get_tensor(k) for k in keys}
            if meta.get("format") != str(FORMAT):
                raise ValueError(f"format {meta.get('format')!r}")
            json.loads(meta["identity"])
        except Exception as error:  # any damage of the file, whatever its type
            raise TokenFlowError(
                f"cannot resume from {self.path}: the checkpoint is damaged ({error}); delete it,"
                " or run without `resume` to start over"
            ) from error
        return meta, loaded

    def inspect(self) -> int | None:
        """The steps an interrupted run completed, when resuming from a checkpoint of these
        settings (a mismatch is refused); None when there is nothing to resume from."""
        if not (self.resume and self.path.is_file()):
            return None
        meta, _ = self._read(tensors=False)
        old = json.loads(meta["identity"])
        if old != self.identity:
            differs = _differences(old, self.identity)
            raise TokenFlowError(
                f"cannot resume the interrupted run ({self.path.name}): {differs}; give the"
                " interrupted run's options, or leave out `resume` to start over"
            )
        return int(meta["step"])

    def restore(self) -> DenoiseState | None:
        """The state to continue from (None: start from the first step)."""
        if self.inspect() is None:
            return None
        meta, tensors = self._read()
        prompts = len(json.loads(meta["identity"])["prompts"])
        return DenoiseState(int(meta["step"]), [tensors[f"latents.{p}"] for p in range(prompts)])

    def save(self, state: DenoiseState) -> None:
        """Replace the checkpoint with ``state``, atomically and durably."""
        tensors = {
            f"latents.{p}": x.detach().to("cpu").contiguous() for p, x in enumerate(state.latents)
        }
        identity = json.dumps(self.identity)
        meta = {"format": str(FORMAT), "identity": identity, "step": str(state.step)}
        self.path.parent.mkdir(parents=True, exist_ok=True)  # as the outputs will be
        write_bytes(self.path, _safetensors_bytes(tensors, meta), durable=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
