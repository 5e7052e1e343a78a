"""The edit form, generated from ``EditOptions``' field metadata like the CLI's flags.

Every option a browser may set becomes one input (checkbox, dropdown, number or text box) with
the option's default, choices, range and help; options that name files or folders on the
server (the input, the output, the model, the cache ...) are never offered, the server sets
them. A few options are placed in the Clip, Prompts and Method sections; every other one,
including any option added later, lands in the "Advanced" panel under its help group, so the
UI never lags the CLI. Library errors name options; ``render_error`` shows them by label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import TokenFlowError
from ..options import FIELD_INFO, FIELDS, GROUPS, EditOptions, OptionError, optional, value_type

#: what each job sets itself: the clip, where it writes, and whether it is a preview
JOB_SWITCHES = frozenset({"input", "out", "overwrite", "preview", "resume", "checkpoint"})
_PATH_WORDS = ("FILE", "DIR", "PATH", "ID_OR")  # in a metavar: a path or Hub id on the server


def server_side(name: str) -> bool:
    """Whether only the server sets option ``name``: the job's switches and anything that
    names a file, folder or model (a browser must never make the server read a path), which
    includes any such option added later; and values the form has no input for (lists)."""
    metavar = FIELD_INFO[name].metavar or ""
    return (
        name in JOB_SWITCHES
        or name == "control"  # canny, depth, or a folder of images
        or any(word in metavar for word in _PATH_WORDS)
        or value_type(name) not in (bool, int, float, str)
    )


#: set by the server, never by the browser
SERVER_SIDE = frozenset(name for name in FIELDS if server_side(name))
#: options shown outside the Advanced panel, by section
SECTIONS: dict[str, tuple[str, ...]] = {
    "clip": ("start", "end", "stride", "frames", "size", "fit", "short_side"),
    "prompts": ("prompt", "inversion_prompt", "negative_prompt"),
    "method": ("method", "strength"),
}
_PLACED = {name for names in SECTIONS.values() for name in names}
_NUMBER = {int: "a whole number", float: "a number"}
_LABELS = {"fps": "FPS", "pnp_attn_t": "PnP attention fraction", "pnp_f_t": "PnP feature fraction"}


def label(name: str) -> str:
    """The label of option ``name`` in the page (and in error messages)."""
    return _LABELS.get(name) or name.replace("_", " ").capitalize()


def render_error(error: TokenFlowError) -> str:
    """A library error as one line, its options named by their labels in the page."""
    return " ".join(error.render(lambda name: f"“{label(name)}”").split())


def advanced() -> dict[str, list[str]]:
    """The Advanced panel's options by help group (in ``GROUPS`` order)."""
    panel: dict[str, list[str]] = {}
    for group in GROUPS:
        names = [
            n for n, info in FIELD_INFO.items()
            if info.group == group and n not in _PLACED and n not in SERVER_SIDE
        ]  # fmt: skip
        if names:
            panel[group] = names
    return panel


def form_names() -> list[str]:
    """Every option in the form, in page order: the sections, then the Advanced panel."""
    names = [n for section in SECTIONS.values() for n in section]
    return names + [n for group in advanced().values() for n in group]


def component(gr, name: str, value: Any = None, **extra: Any):
    """The Gradio input for option ``name``, from its metadata (``value``: its default)."""
    info, kind = FIELD_INFO[name], value_type(name)
    value = FIELDS[name].default if value is None else value
    common = dict(label=label(name), info=info.help, elem_id=f"opt-{name}", **extra)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if info.choices is not None:
        choices = list(info.choices)
        if optional(name) and "auto" not in choices:
            choices = ["", *choices]  # "" leaves it unset, like not giving the flag
        return gr.Dropdown(choices=choices, value=shown(name, value), **common)
    if kind in (int, float) and not optional(name):  # an optional number is text: empty = unset
        low = info.minimum if info.minimum is not None else info.above
        return gr.Number(
            value=value, minimum=low, maximum=info.maximum, precision=0 if kind is int else None,
            **common,
        )  # fmt: skip
    text = shown(name, value)
    return gr.Textbox(
        value="" if text is None else str(text),
        placeholder=info.metavar or ("auto" if optional(name) else ""),
        **common,
    )


def shown(name: str, value: Any) -> Any:
    """How the form shows an option's value: unset is "auto" where that is a choice, empty
    text for text and choices, no number for numbers."""
    if value is not None:
        return value
    choices = FIELD_INFO[name].choices or ()
    if "auto" in choices:
        return "auto"
    return "" if value_type(name) is str or optional(name) else None


def to_option(name: str, value: Any) -> Any:
    """A form value as the option's value: empty means unset (or an error if it must be set)."""
    kind = value_type(name)
    if isinstance(value, str) and not value.strip() and (kind is not str or optional(name)):
        return None
    if value == "auto" and optional(name) and "auto" in (FIELD_INFO[name].choices or ()):
        return None  # the same as unset, so a run's settings round-trip exactly
    if isinstance(value, str) and kind in (int, float):
        try:
            value = kind(value.strip())
        except ValueError:
            raise OptionError(f"`{name}` {value!r} is not {_NUMBER[kind]}") from None
    if kind is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value


def options_from_form(
    names: Sequence[str], values: Sequence[Any], base: EditOptions | None = None
) -> EditOptions:
    """The options the form describes, on top of ``base`` (the server's settings)."""
    changes = {name: to_option(name, value) for name, value in zip(names, values, strict=True)}
    return (base or EditOptions()).replace(**changes)


def form_values(names: Sequence[str], options: EditOptions) -> list[Any]:
    """The form's values for ``options`` (to fill it from an earlier run)."""
    return [shown(name, getattr(options, name)) for name in names]
