"""Reading source videos into frame arrays and writing edited results back out.

Everything the engine touches goes through here, so the rules live in one place:

* ``reading`` decodes a clip in presentation order and times its frames by their presentation
  timestamps (``timing``), never by the header's rate or frame count (``source``);
* ``sizing`` and ``orientation`` turn a decoded frame into the working frame;
* ``writing`` writes videos, GIFs and frames folders atomically with the source's timing, and
  ``audio`` carries the source's sound along in sync;
* ``folders`` handles numbered-image folders.
"""

from __future__ import annotations

from .clip import VideoClip
from .reading import read_clip
from .sizing import parse_size
from .source import probe_video
from .timing import parse_time
from .writing import write_frames, write_gif, write_side_by_side, write_video

__all__ = [
    "VideoClip",
    "parse_size",
    "parse_time",
    "probe_video",
    "read_clip",
    "write_frames",
    "write_gif",
    "write_side_by_side",
    "write_video",
]
