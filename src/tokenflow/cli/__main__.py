"""``python -m tokenflow.cli``."""

from . import entry

entry()
