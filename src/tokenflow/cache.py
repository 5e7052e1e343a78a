"""On-disk cache of DDIM inversions.

Inverting a clip is the most expensive stage of an edit, and it depends only on the source
frames, the model and the inversion schedule, never on the edit prompt. Caching it means a
second prompt on the same clip skips inversion entirely.

An entry is one safetensors file, ``<key>.safetensors``, whose tensors are named by timestep and
whose header metadata carries the key, the final timestep, the format version, the creation time,
caller-supplied ``meta`` (shown by ``tokenflow cache list``) and a sha256 of the tensor data.
Writes are atomic (temp file, fsync, ``os.replace``) so a crash or a full disk never leaves a
half-written entry under a real key, and a damaged entry is detected on load, deleted and
recomputed rather than silently producing a wrong edit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import platformdirs
import torch
from safetensors import safe_open
from safetensors.torch import save as _save_safetensors

from .atomic import fsync_folder, pending
from .errors import TokenFlowError
from .inversion import Inversion

#: Bump when the file layout or what the key covers changes; it is hashed into every key, so
#: old entries simply stop matching (``tokenflow cache clear`` removes them).
FORMAT_VERSION = 1
ENV_VAR = "TOKENFLOW_CACHE"
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
_MIB = 1024 * 1024
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_RE = re.compile(r"([0-9a-f]{64})\.safetensors")
_TMP_RE = re.compile(r"\.([0-9a-f]{64})\..*\.tmp")
_MAX_HEADER = 100 * _MIB  # safetensors' own limit; a larger length field means a damaged file


def default_cache_dir() -> Path:
    """``$TOKENFLOW_CACHE`` if set (so CI and shared machines can relocate it), else the
    platform's user cache folder."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else _platform_cache_dir()


def _platform_cache_dir() -> Path:
    # appauthor=False: on Windows, avoid a redundant tokenflow\tokenflow level.
    return Path(platformdirs.user_cache_dir("tokenflow", appauthor=False)) / "inversions"


def _dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.float16`` and ``"float16"`` name the same inversion, so they share a key."""
    return str(dtype).removeprefix("torch.")


def frames_digest(frames: np.ndarray) -> str:
    """sha256 of a (N, H, W, 3) uint8 clip: its shape and its pixels in C order.

    Hashes the decoded, resized pixels rather than the video file, so re-encoding or renaming a
    file that decodes identically still hits, and any change in decoding or resizing misses.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(
            f"frames must be a (N, H, W, 3) uint8 array, got {type(frames).__name__} "
            f"{getattr(frames, 'dtype', '')} {getattr(frames, 'shape', '')}"
        )
    h = hashlib.sha256()
    h.update(json.dumps(list(frames.shape)).encode())
    h.update(memoryview(np.ascontiguousarray(frames)).cast("B"))
    return h.hexdigest()


def inversion_key(
    frames: np.ndarray,
    *,
    model_fingerprint: str,
    inversion_prompt: str,
    inversion_steps: int,
    edit_timesteps: list[int],
    dtype: str | torch.dtype,
    extra: dict[str, Any] | None = None,
) -> str:
    """The cache key: sha256 over everything the stored inversion depends on.

    ``edit_timesteps`` is taken as a set (the inversion keeps them sorted, so their order does
    not matter). ``extra`` holds anything else that shapes the inversion, e.g. a ControlNet's
    fingerprint and control-image hash; it must be JSON-serializable, and ``None`` equals ``{}``.
    """
    doc = {
        "format": FORMAT_VERSION,
        "frames": frames_digest(frames),
        "model": str(model_fingerprint),
        "inversion_prompt": str(inversion_prompt),
        "inversion_steps": int(inversion_steps),
        "edit_timesteps": sorted({int(t) for t in edit_timesteps}),
        "dtype": _dtype_name(dtype),
        "extra": extra or {},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor of any dtype (bfloat16 has no numpy equivalent)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and data, in timestep order.

    safetensors checks offsets but not contents, so without this a flipped bit on disk would
    load as a slightly wrong inversion and quietly damage the edit.
    """
    h = hashlib.sha256()
    for name in sorted(tensors, key=int):
        tensor = tensors[name]
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _write_payload(file: BinaryIO, payload: bytes) -> None:
    """Write the serialized entry (a seam so tests can simulate a failure mid-write)."""
    file.write(payload)


def _read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= _MAX_HEADER:
            raise ValueError(f"bad header length {n}")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


class _Corrupt(Exception):
    """An entry that exists but cannot be trusted; the message says why."""


@dataclass
class CacheEntry:
    """One cached inversion as listed by ``InversionCache.entries``.

    ``meta`` is what the caller passed to ``save`` (empty when the header cannot be read).
    """

    key: str
    path: Path
    size_bytes: int
    created: float
    meta: dict


class InversionCache:
    """A folder of inversions keyed by ``inversion_key``; safe to share between processes."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path_for(self, key: str) -> Path:
        """Where the entry for ``key`` lives (the key is checked so it cannot escape the root)."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
        return self.root / f"{key}{SUFFIX}"

    # ------------------------------------------------------------------------------- load

    def load(
        self,
        key: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Inversion | None:
        """The cached inversion for ``key``, or ``None`` if there is none.

        A corrupt entry warns, is deleted and gives ``None``, so the caller recomputes and
        saves a good one. ``device``/``dtype`` convert the tensors after verification.
        """
        path = self.path_for(key)
        try:
            with path.open("rb") as f:  # opened first so a permission error is not "corrupt"
                stat = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            warnings.warn(
                f"cannot read inversion cache entry {key} ({exc}); recomputing", stacklevel=2
            )
            return None
        try:
            latents, final_timestep = self._parse(key, path)
        except FileNotFoundError:
            return None  # removed by another process meanwhile
        except _Corrupt as exc:
            warnings.warn(
                f"inversion cache entry {key} is corrupt ({exc}); recomputing", stacklevel=2
            )
            self._discard(path, stat)
            return None
        if device is not None or dtype is not None:
            latents = {t: z.to(device=device, dtype=dtype) for t, z in latents.items()}
        return Inversion(latents, final_timestep)

    @staticmethod
    def _parse(key: str, path: Path) -> tuple[dict[int, torch.Tensor], int]:
        """Read and verify an entry; raises ``_Corrupt`` with the reason.

        ``safe_open`` memory-maps the file, so a large clip is held in memory once, and it
        refuses a file whose size does not match its header (truncation).
        """
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = list(f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
                tensors = {name: f.get_tensor(name) for name in names}
        except FileNotFoundError:
            raise
        except Exception as exc:  # any parse failure of a damaged file, whatever its type
            raise _Corrupt(f"cannot be parsed: {exc}") from exc
        if meta.get("format") != str(FORMAT_VERSION):
            raise _Corrupt(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        if meta.get("key") != key:
            raise _Corrupt(f"metadata names key {str(meta.get('key'))[:12]!r}")
        try:
            timesteps = [int(t) for t in json.loads(meta["timesteps"])]
            final_timestep = int(meta["final_timestep"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _Corrupt(f"bad metadata: {exc!r}") from exc
        missing = sorted((set(timesteps) | {final_timestep}) - {int(k) for k in tensors})
        if missing or len(tensors) != len(set(timesteps)):
            raise _Corrupt(f"missing timesteps {missing[:5]}" if missing else "unexpected tensors")
        if tensors_checksum(tensors) != meta.get("checksum"):
            raise _Corrupt("checksum mismatch")
        return {int(k): v for k, v in tensors.items()}, final_timestep

    @staticmethod
    def _discard(path: Path, stat: os.stat_result) -> None:
        """Delete a corrupt entry unless another process has replaced it since we read it."""
        with contextlib.suppress(OSError):
            now = path.stat()
            same = (now.st_ino, now.st_size, now.st_mtime_ns) == (
                stat.st_ino,
                stat.st_size,
                stat.st_mtime_ns,
            )
            if same:
                path.unlink()

    # ------------------------------------------------------------------------------- save

    def save(self, key: str, inversion: Inversion, meta: dict[str, Any]) -> Path | None:
        """Store ``inversion`` under ``key`` atomically; returns its path.

        The edit has already succeeded when this runs, so an I/O failure (disk full, read-only
        folder) warns and returns ``None`` instead of raising; no partial file is left behind.
        """
        path = self.path_for(key)
        if inversion.final_timestep not in inversion.latents:
            raise ValueError(f"final_timestep {inversion.final_timestep} has no latents")
        tensors = {
            str(int(t)): z.detach().to("cpu").contiguous() for t, z in inversion.latents.items()
        }
        metadata = {
            "format": str(FORMAT_VERSION),
            "key": key,
            "final_timestep": str(int(inversion.final_timestep)),
            "timesteps": json.dumps(sorted(int(t) for t in inversion.latents)),
            "created": repr(time.time()),
            "meta": json.dumps(meta, sort_keys=True, default=str),
            "checksum": tensors_checksum(tensors),
        }
        payload = _save_safetensors(tensors, metadata)
        tmp: str | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=TMP_SUFFIX)
            with pending(Path(tmp)), os.fdopen(fd, "wb") as f:
                _write_payload(f, payload)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)
            tmp = None
            fsync_folder(self.root)
        except OSError as exc:
            warnings.warn(
                f"could not save inversion cache entry {key[:12]} in {self.root} ({exc}); "
                f"the edit is unaffected, but the next one will invert again",
                stacklevel=2,
            )
            return None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return path

    # ------------------------------------------------------------------------- housekeeping

    def entries(self) -> list[CacheEntry]:
        """Cached inversions, newest first; temp files and foreign files are left out.

        An entry whose header cannot be read is still listed (with empty ``meta``) so that
        ``size`` counts it and ``clear`` removes it.
        """
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _ENTRY_RE.fullmatch(path.name)
            if match is None or not path.is_file():
                continue
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile
            created, meta = stat.st_mtime, {}
            with contextlib.suppress(OSError, ValueError, TypeError):
                header = _read_metadata(path)
                created = float(header.get("created", created))
                loaded = json.loads(header.get("meta", "{}"))
                meta = loaded if isinstance(loaded, dict) else {}
            found.append(CacheEntry(match.group(1), path, stat.st_size, created, meta))
        return sorted(found, key=lambda e: (e.created, e.key), reverse=True)

    def size(self) -> int:
        """Total bytes of all entries."""
        return sum(e.size_bytes for e in self.entries())

    def _temp_files(self) -> list[tuple[str, Path]]:
        if not self.root.is_dir():
            return []
        return [
            (m.group(1), p)
            for p in self.root.iterdir()
            if (m := _TMP_RE.fullmatch(p.name)) is not None
        ]

    def clear(self, key: str | None = None) -> int:
        """Remove all entries, or those whose key starts with ``key``; returns how many.

        Leftover temp files (from a crashed save) go too. A prefix that matches several
        entries is refused, so a short typo cannot wipe the cache.
        """
        entries = self.entries()
        if key is not None:
            prefix = key.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
                raise TokenFlowError(f"{key!r} is not a cache key (64 hexadecimal digits)")
            entries = [e for e in entries if e.key.startswith(prefix)]
            if len(entries) > 1:
                raise TokenFlowError(
                    f"key prefix {prefix!r} matches {len(entries)} cache entries; give more "
                    "characters of the key"
                )
        removed = 0
        for entry in entries:
            try:
                entry.path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # removed by someone else meanwhile
            except OSError as exc:
                raise TokenFlowError(
                    f"cannot remove {entry.path} ({exc}); check the folder's permissions"
                ) from exc
        for tmp_key, tmp in self._temp_files():
            if key is None or tmp_key.startswith(key.strip().lower()):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return removed


__all__ = [
    "FORMAT_VERSION",
    "CacheEntry",
    "InversionCache",
    "default_cache_dir",
    "frames_digest",
    "inversion_key",
    "tensors_checksum",
]
