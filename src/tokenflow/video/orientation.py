"""Display orientation: rotate and mirror frames as a player would show them."""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
from av.sidedata.sidedata import Type as SideDataType


@dataclass(frozen=True)
class Orientation:
    """An axis-aligned display transform read from the display matrix (rotation and mirroring)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    note: str | None = None

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def displayed_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.transpose else (width, height)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        if self.transpose:
            frame = frame.transpose(1, 0, 2)
        if self.flip_rows:
            frame = frame[::-1]
        if self.flip_cols:
            frame = frame[:, ::-1]
        return np.ascontiguousarray(frame)


def orientation_of(frame: av.VideoFrame) -> Orientation:
    """Map FFmpeg's display matrix to the transform a player applies.

    In FFmpeg's convention a source pixel (x, y) is shown at (a*x + c*y, b*x + d*y) with
    a, b, c, d = m[0], m[1], m[3], m[4]; rotations other than multiples of 90° are snapped to
    the nearest one, since players that honour them are rare and we need a rectangular frame.
    """
    matrix = None
    for data in frame.side_data:
        if data.type == SideDataType.DISPLAYMATRIX:
            matrix = np.frombuffer(bytes(data), dtype=np.int32)
            break
    if matrix is None or matrix.size < 9:
        return Orientation()
    a, b, c, d = (float(v) for v in matrix[[0, 1, 3, 4]])
    if max(abs(a), abs(b), abs(c), abs(d)) == 0:
        return Orientation()
    degrees = frame.rotation  # counter-clockwise, what av_display_rotation_get reports
    if abs(a) >= abs(b):
        result = Orientation(flip_rows=d < 0, flip_cols=a < 0)
    else:
        # Display row comes from the source column: transpose, then mirror per the signs.
        result = Orientation(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
    if result.identity:
        if abs(degrees) > 1:
            return Orientation(note=f"rotation of {degrees}° in metadata ignored (under 45°)")
        return result
    note = _ORIENTATION_NAMES[(result.transpose, result.flip_rows, result.flip_cols)]
    note += " per metadata"
    mirrored = (a * d - b * c) < 0
    if not mirrored and abs(degrees - round(degrees / 90.0) * 90) > 1:
        note += f" (it says {degrees}°; snapped to a multiple of 90°)"
    return Orientation(result.transpose, result.flip_rows, result.flip_cols, note)


# (transpose, flip rows, flip columns) -> what a person would call it.
_ORIENTATION_NAMES = {
    (False, False, True): "mirrored left-right",
    (False, True, False): "flipped upside down",
    (False, True, True): "rotated 180°",
    (True, True, False): "rotated 90° counter-clockwise",
    (True, False, True): "rotated 90° clockwise",
    (True, False, False): "rotated 90° and mirrored (transposed)",
    (True, True, True): "rotated 90° and mirrored (anti-transposed)",
}
