"""Atomic writes: a result appears under its final name complete, or not at all.

Every file and folder tokenflow writes goes through here, so an interrupted or failed run never
leaves half a video, a truncated JSON or a partial output folder behind. Temporary names are
hidden siblings of the destination (same filesystem, so the final ``os.replace`` is atomic) and
are created by the writer itself, so results get the user's normal permissions (umask), never
the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import TokenFlowError

#: Temporary files and folders being written right now. A front end that must stop at once
#: (a second Ctrl-C, a job stuck in a long native call) removes them with ``discard_pending``.
_PENDING: set[Path] = set()
_PENDING_LOCK = threading.Lock()


def _track(path: Path, pending: bool) -> None:
    with _PENDING_LOCK:
        (_PENDING.add if pending else _PENDING.discard)(path)


@contextlib.contextmanager
def pending(path: Path) -> Iterator[Path]:
    """Mark ``path`` as being written for the duration of the block."""
    _track(path, True)
    try:
        yield path
    finally:
        _track(path, False)


def discard_pending() -> None:
    """Remove every temporary file or folder still being written (nothing finished is lost)."""
    with _PENDING_LOCK:
        paths = list(_PENDING)
        _PENDING.clear()
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def sibling(path: Path, tag: str) -> Path:
    """An unused hidden name beside ``path``: ``.<stem>.<random>.<tag><suffix>``."""
    while True:
        candidate = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.{tag}{path.suffix}")
        if not candidate.exists():
            return candidate


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise TokenFlowError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise TokenFlowError(f"cannot write {path}: a folder with that name exists")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only on success."""
    path = Path(path)
    _check_parent(path)
    with pending(sibling(path, "part")) as temporary:
        try:
            yield temporary
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``durable`` also fsyncs the file and its folder."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    if durable:
        fsync_folder(Path(path).parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); not possible, and not needed, on Windows."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_staging_folder(destination: Path) -> Path:
    """A new empty hidden folder beside ``destination`` (normal permissions) to build it in."""
    staging = sibling(destination, "partial")
    staging.mkdir()
    _track(staging, True)
    return staging


def replace_folder(staging: Path, destination: Path) -> None:
    """Move a finished ``staging`` folder to ``destination``, replacing any folder there.

    If the swap fails half-way the previous folder is put back.
    """
    _track(staging, False)
    if not destination.exists():
        os.replace(staging, destination)
        return
    old = sibling(destination, "old")
    os.replace(destination, old)
    try:
        os.replace(staging, destination)
    except BaseException:
        os.replace(old, destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``destination``, on failure it is removed."""
    destination = Path(destination)
    staging = make_staging_folder(destination)
    try:
        yield staging
        replace_folder(staging, destination)
    except BaseException:
        remove_staging(staging)
        raise


def remove_staging(staging: Path) -> None:
    """Remove a staging folder that will not be finished."""
    shutil.rmtree(staging, ignore_errors=True)
    _track(staging, False)
