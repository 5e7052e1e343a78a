"""One typed configuration for an edit, with YAML in and out.

The same ``EditConfig`` is filled from ``--config FILE.yaml`` (a plain YAML mapping, or the
``run.json`` of an earlier run so it can be reproduced) and then overridden by CLI flags.
Defaults follow the authors' ``configs/config_pnp.yaml``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import TokenFlowError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
METHODS = ("pnp", "sdedit", "controlnet")
BASELINES = ("per-frame", "extended-attention", "fixed-keyframes")


@dataclass
class EditConfig:
    """Every setting of an edit. ``None`` means "decide from the input" (size, device, dtype)."""

    input: str = ""
    prompt: str = ""
    inversion_prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    model: str = DEFAULT_MODEL
    model_config: str | None = None  # a single-file --model's diffusers config folder
    out: str = ""
    method: str = "pnp"
    baseline: str | None = None  # per-frame | extended-attention | fixed-keyframes
    propagation: str = "reference"  # reference (authors' code) | paper (the paper's text)
    # SDEdit
    strength: float = 0.9
    strength_compat: bool = False  # the authors' off-by-one slicing (44 of 50 steps at 0.9)
    noise: str = "ddim"  # ddim (inverted noise) | random
    # ControlNet
    controlnet: str | None = None
    control: str | None = None  # canny | depth | a video / frames folder of control images
    control_scale: float = 1.0
    canny_low: int = 100
    canny_high: int = 200
    depth_model: str | None = None
    # frames
    start: str | None = None
    end: str | None = None
    stride: int = 1
    frames: int | None = None
    size: str | None = None
    fit: str = "crop"
    short_side: int = 512
    fps: float | None = None
    # diffusion
    steps: int = 50
    inversion_steps: int = 500
    guidance: float = 7.5
    block_size: int = 8
    max_keyframes: int = 0  # long-video mode: keyframes per UNet call (0: all, reference)
    keyframe_memory_mb: int | None = None  # keyframe recordings kept in memory (None: auto)
    pnp_attn_t: float = 0.5
    pnp_f_t: float = 0.8
    seed: int = 1
    device: str | None = None
    dtype: str | None = None
    compile: bool = False  # torch.compile the UNet's plain layers (see README)
    # outputs
    audio: bool = True
    gif: bool = False
    overwrite: bool = False
    cache: bool = True
    cache_dir: str | None = None

    def validate(self, editing: bool = True) -> EditConfig:
        """Raise a ``TokenFlowError`` naming the first bad setting and how to fix it.

        ``editing=False`` checks only what an inversion needs (no target prompt).
        """
        if editing and not self.prompt.strip():
            raise TokenFlowError(
                "the prompt is empty; describe the edit, e.g. --prompt 'a marble statue'"
            )
        if self.method not in METHODS:
            raise TokenFlowError(
                f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.baseline is not None and self.baseline not in BASELINES:
            raise TokenFlowError(
                f"unknown --baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}"
            )
        if self.propagation not in ("reference", "paper"):
            raise TokenFlowError(f"--propagation {self.propagation!r}: choose reference or paper")
        if self.noise not in ("ddim", "random"):
            raise TokenFlowError(f"--noise {self.noise!r}: choose ddim or random")
        if not 0 < self.strength <= 1:
            raise TokenFlowError(f"--strength {self.strength} must be within (0, 1]")
        if self.method == "controlnet" and not (self.controlnet and self.control):
            raise TokenFlowError(
                "--method controlnet needs --controlnet ID_OR_DIR and --control canny|depth|PATH"
            )
        if self.controlnet and self.method != "controlnet":
            raise TokenFlowError("--controlnet is given but --method is not controlnet; add it")
        _at_least("steps", self.steps, 1)
        _at_least("inversion-steps", self.inversion_steps, 1)
        _at_least("block-size", self.block_size, 1)
        if self.max_keyframes and self.max_keyframes < 4:
            raise TokenFlowError(
                f"--max-keyframes {self.max_keyframes}: use 0 (reference mode) or at least 4"
            )
        if self.keyframe_memory_mb is not None:
            _at_least("keyframe-memory", self.keyframe_memory_mb, 0)
        _at_least("stride", self.stride, 1)
        _at_least("short-side", self.short_side, 8)
        if self.frames is not None:
            _at_least("frames", self.frames, 1)
        if self.inversion_steps < self.steps:
            raise TokenFlowError(
                f"--inversion-steps {self.inversion_steps} is fewer than --steps {self.steps};"
                " inversion must pass through every editing timestep (500 suits 50 steps)"
            )
        if not 0 <= self.guidance <= 50:
            raise TokenFlowError(
                f"--guidance {self.guidance} is out of range; use 0..50 (7.5 is usual)"
            )
        for name in ("pnp_attn_t", "pnp_f_t"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                flag = "--" + name.replace("_", "-")
                raise TokenFlowError(
                    f"{flag} {value} must be within [0, 1] (a fraction of the steps)"
                )
        if self.fit not in ("crop", "pad", "stretch"):
            raise TokenFlowError(f"--fit {self.fit!r}: choose crop, pad or stretch")
        if not self.inversion_prompt.strip():
            warnings.warn(
                "no --inversion-prompt: the source is inverted with an empty prompt; a plain"
                " description of the source video (e.g. 'a woman running') works better",
                stacklevel=2,
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def updated(self, **changes: Any) -> EditConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: "not given")."""
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        return EditConfig(**values)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise TokenFlowError(f"--{name} {value} must be at least {low}")


def load_config(path: str | Path) -> EditConfig:
    """Read a YAML config, or an earlier ``run.json`` (its ``config`` section) to reproduce it."""
    path = Path(path)
    if not path.is_file():
        raise TokenFlowError(f"config file {path} does not exist")
    try:
        text = path.read_text("utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise TokenFlowError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from exc
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run.json
    if not isinstance(data, dict):
        raise TokenFlowError(f"config {path} must be a mapping of setting: value")
    known = {f.name for f in fields(EditConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TokenFlowError(f"config {path}: unknown setting(s) {', '.join(unknown)}")
    return EditConfig(**data)
