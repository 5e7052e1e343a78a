"""One typed description of an edit: every setting with its type, default, help and checks.

``EditOptions`` is the only carrier of settings. The Python API takes it (keyword arguments fill
it), YAML files and ``run.json`` load into it, and the CLI's flags, help texts, choices and
defaults -- and the web UI's form -- are generated from its field metadata. Adding an option is
one field here plus the code that uses it.

Errors name options, not flags: an ``OptionError`` marks option names in backticks
(``block_size`` must be at least 1), and each front end renders them its own way (the CLI as
``--block-size``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TokenFlowError
from .methods import edit_methods, propagation_rules, structures

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
METHODS = tuple(edit_methods())
BASELINES = tuple(name for name in structures() if name is not None)
PROPAGATIONS = propagation_rules()

#: Help sections, in the order front ends show them.
GROUPS = {
    "input": "input clip",
    "prompts": "prompts",
    "method": "method",
    "control": "ControlNet",
    "diffusion": "diffusion",
    "model": "model and device",
    "memory": "long clips and memory",
    "output": "output",
}

MAX_PIXELS = 4096 * 4096  # the largest working size (width x height) that is accepted

#: Names used by earlier releases' config files and run.json, and what they are now.
RENAMED = {"guidance": "guidance_scale", "keyframe_memory_mb": "keyframe_memory"}


class OptionError(TokenFlowError):
    """A bad setting (its message marks option names in backticks, see ``errors.py``)."""


@dataclass(frozen=True)
class OptionInfo:
    """What front ends need to know about an option besides its type and default."""

    help: str
    group: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None
    metavar: str | None = None
    flag: str | None = None  # CLI flag when not --name-with-dashes ("" for a positional)
    aliases: tuple[str, ...] = ()  # further CLI flags that set it
    required: bool = False  # an edit cannot run without it (the CLI lists it as required)
    inversion: bool = False  # it shapes the DDIM inversion (``tokenflow invert`` takes it)
    const: Any = None  # the value of its flag given without one (``--preview`` alone)
    # it changes the edited frames: a resume must keep it (False: where and how the run writes,
    # caches or waits; see checkpoint.run_identity)
    shapes_frames: bool = True


def option(default: Any, help: str, group: str, **info: Any) -> Any:
    return field(default=default, metadata={"option": OptionInfo(help, group, **info)})


@dataclass
class EditOptions:
    """Every setting of an edit. ``None`` means "decide from the input" (size, device, dtype)."""

    # input clip
    input: str | None = option(
        None,
        "video file (mp4, mov, webm, avi, gif ...) or folder of numbered frames (00000.png ...)",
        "input", flag="", metavar="INPUT", required=True, inversion=True,
    )  # fmt: skip
    start: str | None = option(
        None, "first frame: a frame number (12) or a time (1.5s, 00:01.5)", "input",
        inversion=True,
    )  # fmt: skip
    end: str | None = option(
        None, "end, exclusive: a frame number or a time", "input", inversion=True
    )
    stride: int = option(1, "keep every k-th frame", "input", minimum=1, inversion=True)
    frames: int | None = option(
        None, "at most this many frames", "input", minimum=1, inversion=True
    )
    size: str | None = option(
        None,
        "working size WxH, multiples of 8 (default: the short side at short_side, both sides"
        " multiples of 64 by the smallest centre crop)",
        "input", metavar="WxH", inversion=True,
    )  # fmt: skip
    fit: str = option(
        "crop", "how an explicit size is met", "input", choices=("crop", "pad", "stretch"),
        inversion=True,
    )  # fmt: skip
    short_side: int | None = option(
        None,
        "default sizing: the short side in pixels (default: the model's, 512 for SD 1.x/2.x,"
        " 1024 for SDXL)",
        "input", minimum=8, inversion=True,
    )  # fmt: skip
    fps: float | None = option(
        None,
        "frame rate of a frames folder (default 10); on a video, a new playback rate (its audio"
        " is time-stretched to stay in sync)",
        "input", above=0, inversion=True,
    )  # fmt: skip
    # prompts
    prompt: str = option("", "the edit: what the video should become", "prompts", required=True)
    inversion_prompt: str = option(
        "", "a plain description of the source video (e.g. 'a woman running')", "prompts",
        inversion=True,
    )  # fmt: skip
    negative_prompt: str = option(DEFAULT_NEGATIVE_PROMPT, "what to steer away from", "prompts")
    # method
    method: str = option(
        "pnp",
        "pnp: Plug-and-Play injection from the source; sdedit: no injection, start from the"
        " inverted noise at strength",
        "method", choices=METHODS,
    )  # fmt: skip
    baseline: str | None = option(
        None,
        "the paper's baselines/ablations: each frame alone, joint attention over each block, or"
        " keyframes fixed at the block centres",
        "method", choices=BASELINES,
    )  # fmt: skip
    propagation: str = option(
        "reference",
        "token blend: the authors' code (its block's and the previous block's keyframe) or the"
        " paper's text (nearest keyframes before and after)",
        "method", choices=PROPAGATIONS,
    )  # fmt: skip
    strength: float = option(
        0.9, "sdedit: the noise level to start from", "method", above=0, maximum=1
    )
    strength_compat: bool = option(
        False, "sdedit: the authors' slicing (44 of 50 steps at 0.9 instead of 45)", "method"
    )
    noise: str = option(
        "ddim", "start from the inverted noise or seeded random noise", "method",
        choices=("ddim", "random"),
    )  # fmt: skip
    pnp_attn_t: float = option(
        0.5, "pnp: fraction of steps with query/key injection", "method", minimum=0, maximum=1
    )
    pnp_f_t: float = option(
        0.8, "pnp: fraction of steps with residual injection", "method", minimum=0, maximum=1
    )
    # ControlNet: conditioning that composes with any method
    controlnet: str | None = option(
        None, "a ControlNet (HF id or diffusers folder) conditioning every UNet call", "control",
        metavar="ID_OR_DIR", inversion=True,
    )  # fmt: skip
    control: str | None = option(
        None, "control images: canny, depth, or a video / frames folder of them", "control",
        inversion=True,
    )  # fmt: skip
    control_scale: float = option(
        1.0, "ControlNet conditioning scale", "control", minimum=0, inversion=True
    )
    canny_low: int = option(100, "Canny low threshold", "control", minimum=0, inversion=True)
    canny_high: int = option(200, "Canny high threshold", "control", minimum=0, inversion=True)
    depth_model: str | None = option(
        None, "depth-estimation model (HF id or folder) for control depth", "control",
        metavar="ID_OR_DIR", inversion=True,
    )  # fmt: skip
    # diffusion
    steps: int = option(50, "editing DDIM steps", "diffusion", minimum=1, inversion=True)
    inversion_steps: int = option(
        500, "DDIM inversion steps", "diffusion", minimum=1, inversion=True
    )
    guidance_scale: float = option(
        7.5, "classifier-free guidance scale", "diffusion", minimum=0, maximum=50,
        aliases=("--guidance",),
    )  # fmt: skip
    block_size: int = option(8, "frames per keyframe block", "diffusion", minimum=1)
    seed: int = option(1, "seed of the keyframe draws (and of random noise)", "diffusion")
    # model and device
    model: str = option(
        DEFAULT_MODEL, "HF id, diffusers folder or .safetensors file", "model",
        metavar="ID_OR_PATH", inversion=True,
    )  # fmt: skip
    model_config: str | None = option(
        None,
        "for a .safetensors model: a diffusers folder of the same base model (SD 1.5 or 2.1) to"
        " read its component configs and tokenizer from; needed offline",
        "model", metavar="DIR", inversion=True,
    )  # fmt: skip
    device: str | None = option(
        None, "where to run (default: CUDA, then MPS, then the CPU)", "model",
        choices=("auto", "cpu", "cuda", "mps"), inversion=True,
    )  # fmt: skip
    dtype: str | None = option(
        None, "precision (default float16 on CUDA, float32 elsewhere)", "model",
        choices=("auto", "float32", "float16", "bfloat16"), inversion=True,
    )  # fmt: skip
    vae: str | None = option(
        None,
        "a replacement VAE (HF id or diffusers folder), e.g. an fp16-safe SDXL VAE such as"
        " madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in float16, so it runs in"
        " float32)",
        "model", metavar="ID_OR_DIR", inversion=True,
    )  # fmt: skip
    lora: tuple[str, ...] = option(
        (),
        "a LoRA to apply, FILE.safetensors[:SCALE] (kohya/A1111 or diffusers format, scale"
        " 1 by default); repeat it for several",
        "model", metavar="FILE[:SCALE]", inversion=True,
    )  # fmt: skip
    embedding: tuple[str, ...] = option(
        (),
        "a textual-inversion embedding, FILE.safetensors[:TOKEN]: TOKEN in a prompt stands for"
        " it (default: the token stored in the file, else the file's name); repeat it for"
        " several",
        "model", metavar="FILE[:TOKEN]", inversion=True,
    )  # fmt: skip
    compile: bool = option(
        False, "torch.compile the UNet's resnets and feed-forwards (the first edit compiles)",
        "model", inversion=True,
    )  # fmt: skip
    rank_timeout: float = option(
        600,
        "several GPUs or machines (torchrun): seconds a rank waits for the others before the"
        " run fails",
        "model", above=0, metavar="S", shapes_frames=False,
    )  # fmt: skip
    # long clips and memory
    max_keyframes: int = option(
        0,
        "long-video mode: edit at most K keyframes per UNet call, so memory does not grow with"
        " the clip (0: all keyframes jointly, the reference)",
        "memory", minimum=0, metavar="K",
    )  # fmt: skip
    keyframe_overlap: int = option(
        2, "long-video mode: keyframes shared by consecutive windows", "memory", minimum=1
    )
    keyframe_memory: int | None = option(
        None,
        "MB of keyframe tokens kept in memory between the keyframe and block passes; the rest"
        " goes to host RAM (GPU) or a temporary file (CPU) (default: a quarter of the GPU's"
        " memory; 64 on the CPU)",
        "memory", minimum=0, metavar="MB", shapes_frames=False,
    )  # fmt: skip
    max_batch: int = option(
        24,
        "several prompts in one run: most batch entries (frames x branches) per UNet call; more"
        " prompts go to further calls (one prompt's source, unconditional and conditional"
        " branch always share one)",
        "memory", minimum=1, metavar="N",
    )  # fmt: skip
    # output
    out: str | None = option(
        None,
        "output folder (edited.mp4, side_by_side.mp4, frames/, run.json); parents are created",
        "output", metavar="DIR", required=True,
    )  # fmt: skip
    overwrite: bool = option(
        False, "replace an existing output folder (only an earlier output, or an empty one)",
        "output", shapes_frames=False,
    )  # fmt: skip
    resume: bool = option(
        False,
        "continue an interrupted run of the same options from its last completed step (it"
        " keeps a checkpoint beside out after every step)",
        "output", shapes_frames=False,
    )  # fmt: skip
    checkpoint: bool = option(
        True,
        "keep the state after every denoising step beside out, so that `resume` can continue a"
        " stopped run (a finished run removes it)",
        "output", shapes_frames=False,
    )  # fmt: skip
    audio: bool = option(
        True, "copy the source's audio into the outputs", "output", shapes_frames=False
    )
    gif: bool = option(False, "also write edited.gif", "output", shapes_frames=False)
    cache: bool = option(
        True, "read and write the inversion cache", "output", inversion=True, shapes_frames=False
    )
    cache_dir: str | None = option(
        None, "inversion cache folder (default $TOKENFLOW_CACHE or the user cache)", "output",
        metavar="DIR", inversion=True, shapes_frames=False,
    )  # fmt: skip
    preview: int | None = option(
        None,
        "a quick look before the full edit: edit only K evenly spaced frames, jointly, and write"
        " a contact sheet (source | edited), the K frames and run.json with what the full edit"
        " will cost (0 or no K: the full edit's keyframe count)",
        "output", minimum=0, metavar="K", const=0, shapes_frames=False,
    )  # fmt: skip

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "options") -> EditOptions:
        """Options from a plain mapping (YAML, run.json), every value type-checked.

        Errors name ``where`` (e.g. the file), the key as written, its value and the type it
        needs, in one line.
        """
        values = {}
        for key, value in data.items():
            name = RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name not in FIELDS:
                raise TokenFlowError(f"{where}: unknown setting {key!r}{_suggest(name)}")
            if name == "method" and value == "controlnet":  # earlier releases' spelling
                value = "pnp"
            values[name] = coerce(name, value, f"{where}: {key}")
        return cls(**values)

    def replace(self, **changes: Any) -> EditOptions:
        """A copy with ``changes`` (option names; each type-checked)."""
        for name in changes:
            if name not in FIELDS:
                raise OptionError(f"unknown option {name!r}{_suggest(name)}")
        checked = {name: coerce(name, v, f"`{name}`") for name, v in changes.items()}
        return dataclasses.replace(self, **checked)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reader_kwargs(self) -> dict[str, Any]:
        """``video.read_clip``'s keyword arguments for the frames these options select and
        how they are sized: every reader of a clip (edit, ControlNet images, eval) uses this.
        An unset ``short_side`` leaves the reader's default (jobs set the model's first)."""
        kwargs = {
            "start": self.start,
            "end": self.end,
            "stride": self.stride,
            "max_frames": self.frames,
            "size": check_size_text(self.size) if self.size else None,
            "fit": self.fit,
            "short_side": self.short_side,
            "fps": self.fps,
        }
        if self.short_side is None:
            del kwargs["short_side"]
        return kwargs

    # -- checking ---------------------------------------------------------------------------

    def validate(self) -> EditOptions:
        """Raise an ``OptionError`` naming the first bad setting and how to fix it."""
        for f in dataclasses.fields(self):
            _check_value(f.name, getattr(self, f.name), f.metadata["option"])
        if self.size is not None:
            check_size_text(self.size)
        if self.controlnet and not self.control:
            raise OptionError("`controlnet` needs `control`: canny, depth, or a path of images")
        if self.control and not self.controlnet:
            raise OptionError("`control` needs a `controlnet` (HF id or diffusers folder)")
        if self.canny_low > self.canny_high:
            raise OptionError(
                f"`canny_low` {self.canny_low} is above `canny_high` {self.canny_high}"
            )
        if self.inversion_steps < self.steps:
            raise OptionError(
                f"`inversion_steps` {self.inversion_steps} is fewer than `steps` {self.steps}:"
                " the inversion must pass through every editing timestep (500 suits 50 steps)"
            )
        if self.max_keyframes and self.max_keyframes < self.keyframe_overlap + 2:
            raise OptionError(
                f"`max_keyframes` {self.max_keyframes} is too small for a `keyframe_overlap` of"
                f" {self.keyframe_overlap}: a window needs the anchor, the overlap and one new"
                f" keyframe (use 0, or at least {self.keyframe_overlap + 2})"
            )
        return self

    def require(self, *names: str) -> EditOptions:
        """Raise an ``OptionError`` when any of ``names`` is not set."""
        for name in names:
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and not value.strip()):
                example = FIELD_INFO[name].metavar or ""
                raise OptionError(f"`{name}` is not set{f' (give {example})' if example else ''}")
        return self

    def warn_about_weak_settings(self) -> None:
        """Legal settings that usually give a worse edit."""
        if not self.inversion_prompt.strip():
            warnings.warn(
                "no `inversion_prompt`: the source is inverted with an empty prompt; a plain"
                " description of the source video (e.g. 'a woman running') works better",
                stacklevel=2,
            )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EditOptions)}
FIELD_INFO: dict[str, OptionInfo] = {n: f.metadata["option"] for n, f in FIELDS.items()}
_HINTS = typing.get_type_hints(EditOptions)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(FIELDS) + list(RENAMED), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def value_type(name: str) -> type:
    """The option's type without ``None`` (int, float, bool, str, or ``tuple[T, ...]`` for an
    option that takes several values)."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def item_type(name: str) -> type | None:
    """The type of each value of an option that takes several (``tuple[T, ...]``), else None.

    Such an option is a YAML list (or one value), a repeatable flag, a tuple in Python; a tuple
    so that its default is immutable like every other option's.
    """
    kind = value_type(name)
    return typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None


def optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


_TYPE_WORDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "text",
}


def coerce(name: str, value: Any, label: str) -> Any:
    """``value`` as option ``name``'s type, or a ``TokenFlowError`` naming ``label`` and the
    value. Frame positions (``start``/``end``) may be given as whole numbers; an option that
    takes several values takes a list (or one value) and checks each."""
    item = item_type(name)
    if item is not None:
        values = () if value is None else [value] if isinstance(value, str) else value
        if not isinstance(values, list | tuple):
            raise OptionError(f"{label} is {value!r}, not a list of {_TYPE_WORDS[item]}")
        return tuple(_coerce_to(item, name, v, f"{label}[{i}]") for i, v in enumerate(values))
    kind = value_type(name)
    if value is None:
        if optional(name):
            return None
        raise OptionError(f"{label} cannot be empty: it takes {_TYPE_WORDS[kind]}")
    return _coerce_to(kind, name, value, label)


def _coerce_to(kind: type, name: str, value: Any, label: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        if name in ("start", "end") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    if not ok:
        hint = ' (put text in quotes, e.g. "123")' if kind is str else ""
        raise OptionError(f"{label} is {value!r}, not {_TYPE_WORDS[kind]}{hint}")
    return value


def _check_value(name: str, value: Any, info: OptionInfo) -> None:
    if value is None:
        return
    if isinstance(value, tuple):  # an option of several values: each is checked
        for item in value:
            _check_value(name, item, info)
        return
    if info.choices is not None and value not in info.choices:
        raise OptionError(f"`{name}` {value!r}: choose one of {', '.join(info.choices)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"`{name}` {value} is not a finite number")
    if info.minimum is not None and value < info.minimum:
        raise OptionError(f"`{name}` {value:g} must be at least {info.minimum:g}")
    if info.above is not None and value <= info.above:
        raise OptionError(f"`{name}` {value:g} must be above {info.above:g}")
    if info.maximum is not None and value > info.maximum:
        raise OptionError(f"`{name}` {value:g} must be at most {info.maximum:g}")


def check_size_text(text: str) -> tuple[int, int]:
    """``"WxH"`` as (W, H); the VAE needs positive multiples of 8."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise OptionError(f"cannot read `size` {text!r}: write it as WIDTHxHEIGHT, e.g. 512x320")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        near = [max(8, round(v / 8) * 8) for v in (width, height)]
        raise OptionError(
            f"`size` {width}x{height}: both sides must be positive multiples of 8;"
            f" try {near[0]}x{near[1]}"
        )
    if width * height > MAX_PIXELS:
        raise OptionError(f"`size` {width}x{height} is too large (over 4096x4096 pixels)")
    return width, height


def read_config_file(path: str | Path, what: str = "config") -> Any:
    """The data of a YAML (or, by its suffix, JSON) file; a missing file or a syntax error is a
    one-line ``TokenFlowError`` naming ``what`` file it is, and the line and column."""
    path = Path(path)
    if not path.is_file():
        raise TokenFlowError(f"{what} file {path} does not exist")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFlowError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise TokenFlowError(
            f"{what} {path}: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    except yaml.YAMLError as exc:
        raise TokenFlowError(f"{what} {path}: {_yaml_problem(exc)}") from exc


def load_options(path: str | Path) -> EditOptions:
    """Options from a YAML file, or an earlier ``run.json`` (its ``config`` section)."""
    path = Path(path)
    data = read_config_file(path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run.json
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokenFlowError(f"config {path} must be a mapping of setting: value")
    return EditOptions.from_mapping(data, where=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem on one line, with 1-based lines and columns (and where the construct
    it was parsing began, which is usually the line to fix)."""

    def where(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    problem = getattr(exc, "problem", None)
    if problem is None:
        return str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    begun = f"{context}{where(getattr(exc, 'context_mark', None))}: " if context else ""
    return f"{begun}{problem}{where(getattr(exc, 'problem_mark', None))}"
