"""What keeps the web UI safe to leave running: where it listens, who may use it, and which
files a browser can make it read or serve.

* It binds 127.0.0.1 by default; any other address makes it reachable from other machines, so
  it needs a user and password (``--auth USER:PASSWORD`` or ``TOKENFLOW_UI_AUTH``).
* A browser names files only by choosing among what the server lists or by uploading; every
  path that reaches a job or a download is confined to the UI's folders (``confine``), and
  ``FileGuard`` refuses any file request outside them before Gradio sees it -- including
  Gradio's fetch-a-URL proxy, so the page can never make the server reach the network.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from ..errors import TokenFlowError

AUTH_ENV = "TOKENFLOW_UI_AUTH"
DEFAULT_MAX_UPLOAD = 2 * 1024**3  # bytes
_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def is_local(host: str) -> bool:
    """Only this machine can reach ``host`` (a loopback address or ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` as a pair (the password may contain colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise TokenFlowError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


def required_auth(host: str, auth: str | None) -> tuple[str, str] | None:
    """The login the UI needs when bound to ``host``: none on localhost; elsewhere ``auth``
    (or ``$TOKENFLOW_UI_AUTH``), which is then required."""
    auth = auth or os.environ.get(AUTH_ENV) or None
    if auth is None:
        if is_local(host):
            return None
        raise TokenFlowError(
            f"binding {host} makes the UI reachable from other machines: give --auth"
            f" USER:PASSWORD (or set {AUTH_ENV}), or keep the default --host 127.0.0.1"
        )
    return parse_auth(auth)


def parse_size(text: str | int) -> int:
    """An upload limit in bytes from ``2GB``, ``500 MB``, ``1024`` (bytes) ..."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(text).lower())
    if not match or float(match[1]) <= 0:
        raise TokenFlowError(f"cannot read the upload limit {text!r}: write e.g. 2GB or 500MB")
    unit = match[2] if match[2] in _UNITS else match[2] + "b"  # "2g" is "2gb"
    return int(float(match[1]) * _UNITS[unit])


def inside(path: Path, roots: Iterable[Path]) -> bool:
    """``path`` (resolved, links followed) is one of ``roots`` or lies inside one."""
    resolved = path.expanduser().resolve()
    for root in roots:
        root = root.expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return True
    return False


def confine(path: str | os.PathLike[str], roots: Iterable[Path], what: str = "file") -> Path:
    """``path`` resolved, if it exists inside one of ``roots``; else a ``TokenFlowError``."""
    roots = list(roots)
    candidate = Path(path)
    if not inside(candidate, roots) or not candidate.exists():
        raise TokenFlowError(f"the {what} is not one this UI offers (uploads and outputs only)")
    return candidate.resolve()


class FileGuard:
    """ASGI middleware: a request for a file (Gradio's ``/file=...`` routes) is served only
    when the file lies inside the allowed folders; URLs (Gradio would fetch them) are refused.
    Everything else passes through to the app."""

    MARK = "/file="

    def __init__(self, app, roots: Iterable[Path]) -> None:
        self.app = app
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def allows(self, raw_path: str) -> bool:
        """Whether a request path may go on to the app."""
        path = unquote(raw_path)
        if self.MARK not in path:
            return True
        target = path.split(self.MARK, 1)[1]
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            return False  # a URL, or a scheme such as data: or file:
        return os.path.isabs(target) and inside(Path(target), self.roots)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.allows(scope.get("path", "")):
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b"File not allowed."})
            return
        await self.app(scope, receive, send)
