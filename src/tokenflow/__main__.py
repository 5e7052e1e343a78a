"""``python -m tokenflow`` (e.g. under ``torchrun``)."""

from .cli import entry

entry()
