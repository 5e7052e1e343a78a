"""Command-line flags generated from ``EditOptions``: one flag per option, never written twice.

Flag names, types, choices, defaults and help come from the options' field metadata; the CLI
only decides which options each command takes. The same table turns the option names in the
library's messages back into the flags a user typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..errors import render_options
from ..options import (
    FIELD_INFO,
    FIELDS,
    GROUPS,
    EditOptions,
    item_type,
    load_options,
    value_type,
)

REQUIRED_TITLE = "required (on the command line or in --config)"


def flag_for(name: str) -> str:
    """The flag that sets option ``name`` (``--no-audio`` for options that default to on)."""
    info = FIELD_INFO[name]
    if info.flag == "":
        return info.metavar or name.upper()
    if info.flag:
        return info.flag
    dashed = name.replace("_", "-")
    if value_type(name) is bool and FIELDS[name].default is True:
        return f"--no-{dashed}"
    return f"--{dashed}"


def as_flags(text: str) -> str:
    """A library message or note with its option names shown as flags."""
    return render_options(text, flag_for)


def _help(name: str) -> str:
    info = FIELD_INFO[name]
    default = FIELDS[name].default
    shown = "" if default in (None, "", False, True, ()) else f" (default: {default})"
    # the help says what the option does; its --no-X flag turns that off
    text = f"switch off (on by default): {info.help}" if default is True else info.help
    return text.replace("%", "%%") + shown


def add_option_flags(
    parser: argparse.ArgumentParser, names: Iterable[str], repeated: Iterable[str] = ()
) -> None:
    """Add a flag for each option in ``names``, in help sections by group.

    Every flag defaults to ``SUPPRESS``, so ``options_from_args`` knows what was typed and
    ``--config`` values are only overridden by flags actually given. The options in
    ``repeated`` take their flag several times, as options of several values do (``edit``'s
    ``--prompt``: one run per prompt, see ``runs_from_args``).
    """
    repeated = set(repeated)
    names = list(names)
    sections: dict[str, argparse._ArgumentGroup] = {}
    required = [n for n in names if FIELD_INFO[n].required and FIELD_INFO[n].flag != ""]
    if required:
        sections["required"] = parser.add_argument_group(REQUIRED_TITLE)
    for group, title in GROUPS.items():
        if any(FIELD_INFO[n].group == group for n in names if n not in required):
            sections[group] = parser.add_argument_group(title)
    for name in names:
        info = FIELD_INFO[name]
        section = sections["required" if name in required else info.group]
        kind = value_type(name)
        more = "; repeat it for several in one run" if name in repeated else ""
        common = dict(default=argparse.SUPPRESS, help=_help(name) + more)
        if info.flag == "":
            section.add_argument(name, nargs="?", metavar=info.metavar, **common)
        elif kind is bool:
            action = "store_false" if FIELDS[name].default is True else "store_true"
            section.add_argument(flag_for(name), dest=name, action=action, **common)
        elif item_type(name) is not None or name in repeated:  # the flag is repeated
            section.add_argument(
                flag_for(name),
                *info.aliases,
                dest=name,
                action="append",
                type=item_type(name) or kind,
                choices=info.choices,
                metavar=info.metavar,
                **common,
            )
        else:
            # an option with a ``const`` takes its flag alone too (``--preview`` = ``--preview 0``)
            bare = {} if info.const is None else dict(nargs="?", const=info.const)
            section.add_argument(
                flag_for(name),
                *info.aliases,
                dest=name,
                type=kind,
                choices=info.choices,
                metavar=info.metavar,
                **bare,
                **common,
            )


def inversion_options() -> list[str]:
    """The options that shape the inversion (``tokenflow invert`` takes exactly these)."""
    return [name for name, info in FIELD_INFO.items() if info.inversion]


def options_from_args(args: argparse.Namespace) -> EditOptions:
    """``--config`` (if any), then every flag that was given on the command line."""
    config = getattr(args, "config", None)
    options = load_options(config) if config else EditOptions()
    return options.replace(**{k: v for k, v in vars(args).items() if k in FIELDS})


def runs_from_args(args: argparse.Namespace) -> list[EditOptions]:
    """``edit``'s runs: one per ``--prompt`` given (several: each in ``--out``/<its slug>, see
    ``batch.prompt_runs``), else the one of ``--config``."""
    from ..batch.jobs import prompt_runs

    prompts = vars(args).get("prompt")
    if not isinstance(prompts, list):
        return [options_from_args(args)]
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "prompt"})
    return prompt_runs(options_from_args(rest), prompts)
