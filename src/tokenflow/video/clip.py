"""The clip ``read_clip`` returns: frames plus the timing needed to write a faithful result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: ``progress(done, total)`` after each frame read or written (``tokenflow.progress``'s
#: ``stage_callback`` makes one from a stage callback).
Progress = Callable[[int, int], None]


@dataclass
class VideoClip:
    """Frames ready for the engine plus what is needed to write a faithful result.

    Two clocks, both in seconds:

    * ``start_time``/``end_time`` place the clip in the source, counted from the video's first
      frame by presentation timestamps (``end_time`` is the end of the last kept frame). A run
      report records them, and they are the span of source audio that belongs to the clip.
    * ``timestamps`` (one per frame, ``timestamps[0] == 0``) and ``duration`` (when the last
      frame ends) are the playback timing the writers reproduce (``timing``). They are the
      source's presentation timestamps: on an exact grid for a constant-rate clip, as stored
      for a variable-rate one. After an ``fps`` override, frame ``i`` plays at
      ``i * stride / fps`` and ``duration`` differs from ``end_time - start_time``; writers
      time-stretch the span's sound to fit.

    ``fps`` is the playback rate: exact for constant-rate clips (``constant_rate``), the average
    ``len / duration`` otherwise.
    """

    frames: np.ndarray
    fps: float
    source: Path
    frame_indices: list[int]
    start_time: float
    end_time: float
    has_audio: bool
    source_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    duration: float = 0.0
    constant_rate: bool = True

    def __post_init__(self) -> None:
        # A clip built from a rate alone (older callers, tests) is constant-rate at that rate.
        if not self.timestamps:
            self.timestamps = [index / self.fps for index in range(len(self))]
        if not self.duration:
            self.duration = len(self) / self.fps

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """Working size as (W, H), the order users type it in."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    @property
    def timing(self) -> dict[str, Any]:
        """Keyword arguments that make a writer reproduce this clip's timing.

        ``write_video(path, frames, **clip.timing, audio_source=clip.source,
        audio_span=clip.audio_span)``.
        """
        return {"fps": self.fps, "timestamps": list(self.timestamps), "duration": self.duration}

    @property
    def audio_span(self) -> tuple[float, float]:
        """The stretch of the source's sound that goes with these frames."""
        return self.start_time, self.end_time
