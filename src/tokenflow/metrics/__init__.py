"""Evaluation metrics for edited videos, by the TokenFlow paper's protocol (method doc,
section 6): warp error (``flow.py``) and CLIP scores (``clip.py``)."""

from .clip import (
    DEFAULT_CLIP_MODEL,
    ClipScorer,
    ClipUnavailableError,
    clip_in_cache,
    consistency_from_embeddings,
    text_score_from_embeddings,
)
from .flow import (
    FLOW_METHODS,
    FlowChoice,
    RaftUnavailableError,
    WarpErrorResult,
    compute_flow,
    load_raft,
    occlusion_mask,
    pair_flows,
    resize_frames,
    resolve_flow,
    warp,
    warp_error,
    warp_error_from_flows,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "FLOW_METHODS",
    "ClipScorer",
    "ClipUnavailableError",
    "FlowChoice",
    "RaftUnavailableError",
    "WarpErrorResult",
    "clip_in_cache",
    "compute_flow",
    "consistency_from_embeddings",
    "load_raft",
    "occlusion_mask",
    "pair_flows",
    "resize_frames",
    "resolve_flow",
    "text_score_from_embeddings",
    "warp",
    "warp_error",
    "warp_error_from_flows",
]
