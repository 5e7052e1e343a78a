"""Models named by a Hugging Face Hub id or a local path, resolved the same way everywhere.

Stable Diffusion, ControlNet, CLIP and depth models are all given as "a Hub id or a folder". The
rules live here once: what counts as a path, whether the Hub is offline (huggingface_hub's own
setting), whether an id is in the local HF cache, and whether the Hub can be reached at all, so
a machine without network fails at once with the right download command instead of spending
half a minute in connection retries.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from pathlib import Path
from urllib.parse import urlparse


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    text = str(name)
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def local_path(name: str) -> Path | None:
    """The existing file or folder ``name`` points to, or None when it is not a local path."""
    path = Path(str(name)).expanduser()
    return path if path.exists() else None


def hub_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``, as the library itself reads it)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def in_hf_cache(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False
    return isinstance(found, str)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a connection within ``timeout`` s (checked once).

    huggingface_hub retries unreachable hosts for tens of seconds with a log line per try; a
    single short connection attempt tells a machine without network apart first.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    with contextlib.suppress(OSError), socket.create_connection((url.hostname, port), timeout):
        return True
    return False


def download_hint(repo_id: str) -> str:
    """The command that fetches ``repo_id`` into the HF cache (huggingface_hub's own CLI)."""
    return f"`hf download {repo_id}`"


def can_download() -> bool:
    """Downloads are allowed (not offline) and the Hub answers."""
    return not hub_offline() and hub_reachable()
