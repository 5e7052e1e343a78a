"""Where the keyframe pass's tokens wait for the block passes, within a memory budget.

The keyframe pass records, for every self-attention layer, the source branch's attention inputs
(what correspondences are searched against) and every branch's attention outputs (what is
propagated); the block passes that follow each read two keyframes of them. In reference mode
all keyframes are edited in one pass, so these recordings grow with the clip: about 9 MB per
keyframe for a small model at 256², 90 MB for SD 2.1 at 512² in float16.

``KeyframeRecordings`` keeps the first ``budget_bytes`` of them where they were computed and
spills the rest: to host RAM for a GPU model, else to an unlinked temporary file (the OS page
cache keeps it fast and may write it out under memory pressure; nothing is left behind, even
on a crash). Reads fetch only the keyframes a block needs, so the spill costs one copy out and
two back per step, and the values are unchanged bit for bit.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import torch

from .errors import TokenFlowError
from .memory import to_device


def default_budget(device: torch.device) -> int:
    """Recordings kept in memory by default: a quarter of a GPU's memory (host transfers cost
    time there); 64 MiB elsewhere, where a spill is a page-cache write, cheap next to a UNet."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 64 * 2**20


Part = str | int  # "features", or a branch index for attention outputs


@dataclass
class _FileEntry:
    """A spilled tensor: its rows lie one after another in the spill file."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def row_bytes(self) -> int:
        return torch.Size(self.shape[1:]).numel() * self.dtype.itemsize


def _spill_error(error: OSError) -> TokenFlowError:
    return TokenFlowError(
        f"cannot spill keyframe recordings to a temporary file in {tempfile.gettempdir()}"
        f" ({error.strerror or error}); free space there, point TMPDIR at a larger disk, or keep"
        " more in memory with a larger `keyframe_memory` (MB)"
    )


class _SpillFile:
    """An unlinked temporary file, rewritten from the start by every keyframe pass."""

    def __init__(self) -> None:
        try:
            # closed by ``close``; unlinked at creation, so the OS frees it even after a crash
            self.file = tempfile.TemporaryFile(prefix="tokenflow-keyframes-")  # noqa: SIM115
        except OSError as error:
            raise _spill_error(error) from error
        self.end = 0

    def write(self, value: torch.Tensor) -> _FileEntry:
        entry = _FileEntry(self.end, tuple(value.shape), value.dtype, value.device)
        data = value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        try:
            self.file.seek(self.end)
            self.file.write(memoryview(data))
        except OSError as error:
            raise _spill_error(error) from error
        self.end += data.nbytes
        return entry

    def read(self, entry: _FileEntry, rows: list[int]) -> torch.Tensor:
        out = torch.empty((len(rows), *entry.shape[1:]), dtype=entry.dtype)
        buffer = out.view(-1).view(torch.uint8).numpy()
        size = entry.row_bytes
        for i, row in enumerate(rows):
            self.file.seek(entry.offset + row * size)
            if self.file.readinto(memoryview(buffer[i * size : (i + 1) * size])) != size:
                raise RuntimeError("keyframe spill file is shorter than what was written to it")
        return out

    def rewind(self) -> None:
        self.end = 0

    def close(self) -> None:
        self.file.close()


def _own(value: torch.Tensor, size: int) -> torch.Tensor:
    """``value``, or a copy of it when it is a view of a larger activation (which it would keep
    alive). A compiled graph cannot ask about storage, and copies."""
    if torch.compiler.is_compiling():
        return value.clone()
    whole = value.storage_offset() == 0 and value.untyped_storage().nbytes() == size
    return value if whole and value.is_contiguous() else value.clone()


class KeyframeRecordings:
    """Per-layer keyframe tensors (keyframes along the first axis), kept within a budget.

    Tensors are kept whole, in the order they arrive, until ``budget_bytes`` is used up; later
    ones are spilled (see the module docstring).
    """

    def __init__(self, budget_bytes: float = math.inf) -> None:
        self.budget_bytes = budget_bytes
        self._kept: dict[tuple[str, Part], torch.Tensor] = {}
        self._host: dict[tuple[str, Part], tuple[torch.Tensor, torch.device]] = {}
        self._file: dict[tuple[str, Part], _FileEntry] = {}
        self._spill: _SpillFile | None = None
        # the keyframe rows that calls read, as indices on the device (see ``_index``)
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self.kept_bytes = 0
        self.spilled_bytes = 0

    def put(self, layer: str, part: Part, value: torch.Tensor) -> None:
        """Record ``value`` ((keyframes, ...)) as ``part`` of ``layer``; it must be new."""
        key = (layer, part)
        if any(key in store for store in (self._kept, self._host, self._file)):
            raise RuntimeError(f"{layer}: {part!r} recorded twice in one keyframe pass")
        size = value.numel() * value.element_size()
        if self.kept_bytes + size <= self.budget_bytes:
            self._kept[key] = _own(value, size)
            self.kept_bytes += size
        elif value.is_cuda:
            self._host[key] = (value.to("cpu"), value.device)
            self.spilled_bytes += size
        else:
            if self._spill is None:
                self._spill = _SpillFile()
            self._file[key] = self._spill.write(value)
            self.spilled_bytes += size

    def get(self, layer: str, part: Part, rows: list[int] | None = None) -> torch.Tensor:
        """``part`` of ``layer``, only the keyframes ``rows`` (all when None), where computed."""
        key = (layer, part)
        if key in self._kept:
            value = self._kept[key]
            return value if rows is None else value.index_select(0, self._index(rows, value))
        if key in self._host:
            value, device = self._host[key]
            return to_device(value if rows is None else value[rows], device)
        if key in self._file:
            entry = self._file[key]
            rows = list(range(entry.shape[0])) if rows is None else rows
            return to_device(self._spill.read(entry, rows), entry.device)
        raise RuntimeError(f"{layer}: no {part!r} recorded (is a keyframe pass missing?)")

    def _index(self, rows: list[int], like: torch.Tensor) -> torch.Tensor:
        """``rows`` as an index on ``like``'s device, made once per keyframe pass: indexing a GPU
        tensor with a list copies the list to the GPU, which waits for its queue, in every
        layer of every call."""
        key = (tuple(rows), like.device)
        if key not in self._indices:
            self._indices[key] = to_device(torch.tensor(rows, dtype=torch.long), like.device)
        return self._indices[key]

    def parts(self) -> list[tuple[str, Part]]:
        """Every recorded (layer, part), in recording order."""
        return [*self._kept, *self._host, *self._file]

    def row_layout(self, layer: str, part: Part) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape of one keyframe's row of ``part`` of ``layer``, and its dtype."""
        key = (layer, part)
        if key in self._file:
            entry = self._file[key]
            return entry.shape[1:], entry.dtype
        value = self._kept[key] if key in self._kept else self._host[key][0]
        return tuple(value.shape[1:]), value.dtype

    def extend(self, layer: str, part: Part, rows: torch.Tensor) -> None:
        """Append keyframe ``rows`` to ``part`` of ``layer`` (keyframes recorded on another
        rank, see distributed/plan.py), where its first rows are."""
        key = (layer, part)
        added = rows.numel() * rows.element_size()
        if key in self._kept:  # in place: no round trip of the rows already there
            value = self._kept[key]
            self._kept[key] = torch.cat([value, rows.to(value.device, value.dtype)])
            self.kept_bytes += added
            return
        if key in self._host:
            value, device = self._host[key]
            self._host[key] = (torch.cat([value, rows.to("cpu", value.dtype)]), device)
            self.spilled_bytes += added
            return
        # in the spill file: read back once and written again at its end (the file is rewound
        # by the next keyframe pass)
        before = self.get(layer, part)
        del self._file[key]
        self.spilled_bytes -= before.numel() * before.element_size()
        self.put(layer, part, torch.cat([before, rows.to(before.device, before.dtype)]))

    def clear(self) -> None:
        """Forget everything; the spill file is kept and rewritten by the next pass."""
        for store in (self._kept, self._host, self._file, self._indices):
            store.clear()
        self.kept_bytes = self.spilled_bytes = 0
        if self._spill is not None:
            self._spill.rewind()

    def close(self) -> None:
        self.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
