"""``tokenflow eval``: score edited videos against their source by the paper's protocol.

One row per edited video: warp error (flow from the source, method doc section 6), CLIP text score
and CLIP frame consistency (consecutive and all pairs).

Every video, source and edits alike, is read by :func:`tokenflow.video.read_clip`, the reader
``tokenflow edit`` uses, so the flow is computed on exactly the frames and geometry that were
edited (rotation from the display matrix, frame selection, resize and crop):

- a ``tokenflow edit`` output folder: the source is re-read with the options recorded in the
  ``config`` section of its ``run.json`` (start, end, stride, frames, size, fit, short_side,
  fps), and must then give the edit's frame count, size and ``frame_indices``;
- an edit without run.json (a plain video or frames folder, read at its displayed size): the
  source is read from its first frame and brought to the edit's size with ``fit`` (crop by
  default, as ``tokenflow edit`` does; pad or stretch on request), and must have as many frames;
- the source passed among the edits (the floor of the table) is scored on the source frames of
  the first edit, so it is comparable with the edits' rows.

A CLIP model that cannot be loaded is an error raised before any flow is computed;
``clip_model=None`` skips the CLIP scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.errors import TokenFlowError
from tokenflow.loading import resolve_device
from tokenflow.metrics import (
    DEFAULT_CLIP_MODEL,
    ClipScorer,
    consistency_from_embeddings,
    pair_flows,
    resolve_flow,
    text_score_from_embeddings,
    warp_error_from_flows,
)

from .report import EvalReport, EvalRow, write_json, write_plot
from .sources import (
    EditedClip,
    SourceFrames,
    _displayed,
    _span,
    check_fit,
    load_edited,
    read_frames,
    source_frames_for,
)


def unique_labels(labels: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Make row labels unique: rows sharing a label get the shortest path tail that tells them
    apart ("pnp (a)", "pnp (b)"; "pnp (x/run)", "pnp (y/run)"), then a number if still equal."""
    out = list(labels)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        parts = [Path(paths[i]).expanduser().absolute().parts for i in members]
        depth = 1
        while True:
            tails = ["/".join(p[-depth:]) for p in parts]
            if len(set(tails)) == len(tails) or depth >= max(len(p) for p in parts):
                break
            depth += 1
        for i, tail in zip(members, tails, strict=True):
            out[i] = f"{label} ({tail})"
    seen: dict[str, int] = {}
    for i, label in enumerate(out):  # the same path twice: number the repeats
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            out[i] = f"{label} #{seen[label]}"
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def evaluate(
    source: str | Path,
    edited: Sequence[str | Path],
    prompt: str,
    flow: str | None = None,
    flow_model: str | Path | None = None,
    clip_model: str | Path | None = DEFAULT_CLIP_MODEL,
    device: str | None = "auto",
    fit: str = "crop",
) -> EvalReport:
    """Score each edited video against ``source``; the Python API behind ``tokenflow eval``.

    ``flow=None`` uses RAFT when torchvision and its weights are available locally, else DIS.
    ``clip_model=None`` skips the CLIP scores; a CLIP model that cannot be loaded raises
    :class:`~tokenflow.metrics.ClipUnavailableError` before any frame is read. ``fit`` brings the
    source to the size of edits that have no run.json (see :func:`source_frames_for`).
    """
    if not edited:
        raise TokenFlowError("no edited video given; pass at least one")
    check_fit(fit)
    dev = str(resolve_device(device))
    source_path = Path(source).expanduser()
    if not source_path.exists():
        raise TokenFlowError(
            f"source {source_path} does not exist; pass the video or frames folder the edits "
            "were made from"
        )
    paths = [Path(p).expanduser() for p in edited]
    for p in paths:
        if not p.exists():
            raise TokenFlowError(
                f"edited video {p} does not exist; pass a `tokenflow edit` output folder or a video"
            )

    # Cheap checks first, then the CLIP model: a missing model fails before any decoding or flow.
    choice = resolve_flow(flow, flow_model, dev)
    scorer = ClipScorer(clip_model, dev) if clip_model is not None else None
    report = EvalReport(
        prompt=prompt,
        source=str(source_path),
        flow_method=choice.method,
        flow_note=choice.note,
        clip_model=str(clip_model) if clip_model is not None else "",
        clip_note="" if scorer is not None else "no CLIP model given",
    )
    text_embed = scorer.text_embedding(prompt) if scorer is not None else None

    is_source = [_same_path(p, source_path) for p in paths]
    clips = [None if own else load_edited(p) for p, own in zip(paths, is_source, strict=True)]
    source_name = source_path.stem if source_path.is_file() else source_path.name
    labels = unique_labels(
        [f"{source_name} (source)" if c is None else c.label for c in clips], paths
    )

    reads: dict[Any, Any] = {}
    used = [None if c is None else source_frames_for(c, source_path, fit, reads) for c in clips]
    edits = [(labels[i], s) for i, s in enumerate(used) if s is not None]
    for label, src in edits:
        report.notes.append(f"{label}: {src.how}")
    reference: SourceFrames | None = edits[0][1] if edits else None
    if any(is_source):
        if reference is None:
            clip = _displayed(source_path)
            indices = list(clip.frame_indices)
            reference = SourceFrames(
                clip.frames, indices, f"source {_span(indices)} at its displayed size", ("own",)
            )
            how = reference.how
        else:
            how = f"scored on the source frames of {edits[0][0]}, as the edits' rows"
            if any(src.key != reference.key for _, src in edits):
                how += (
                    "; the edits were made from different source frames or sizes, so it uses "
                    f"those of the first edit, {edits[0][0]}"
                )
        for i in (i for i, own in enumerate(is_source) if own):
            report.notes.append(f"{labels[i]}: {how}")

    flow_cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
    for i, path in enumerate(paths):
        src = used[i] if used[i] is not None else reference
        assert src is not None
        clip = clips[i]
        frames = src.frames if clip is None else clip.frames
        if len(frames) < 2:
            raise TokenFlowError(f"{path} has {len(frames)} frame; warp error needs 2+")
        if src.key not in flow_cache:
            flow_cache[src.key] = pair_flows(src.frames, choice.method, choice.raft_model)
        per_pair = warp_error_from_flows(frames, *flow_cache[src.key])
        finite = [e for e in per_pair if math.isfinite(e)]
        height, width = frames.shape[1:3]
        row = EvalRow(
            label=labels[i],
            path=str(path),
            frames=len(frames),
            width=int(width),
            height=int(height),
            source_frame_indices=list(src.frame_indices),
            warp_error=float(np.mean(finite)) if finite else float("nan"),
            warp_error_per_pair=per_pair,
        )
        if scorer is not None and text_embed is not None:
            embeds = scorer.image_embeddings(frames)
            row.clip_text_score = text_score_from_embeddings(embeds, text_embed)
            row.frame_consistency_consecutive = consistency_from_embeddings(embeds, "consecutive")
            row.frame_consistency_all_pairs = consistency_from_embeddings(embeds, "all")
        report.rows.append(row)
    return report


__all__ = [
    "EditedClip",
    "EvalReport",
    "EvalRow",
    "SourceFrames",
    "evaluate",
    "load_edited",
    "read_frames",
    "source_frames_for",
    "unique_labels",
    "write_json",
    "write_plot",
]
