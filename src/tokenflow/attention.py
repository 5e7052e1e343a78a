"""Self-attention for TokenFlow, as a diffusers attention processor.

One ``TokenFlowAttnProcessor`` sits on every ``attn1`` of the UNet and does, per call (see
``context.UNetCall``):

* frame attention -- plain self-attention per frame (inversion, per-frame baselines);
* extended attention -- the keyframe pass: every edited frame's queries attend to the keys and
  values of all frames of its branch. Flattening the frames into one token sequence gives
  exactly that, so one SDPA call does it without materialising per-keyframe copies of K/V;
* PnP query/key injection -- on the chosen decoder layers, the edited branches use the source
  branch's queries and keys;
* propagation -- the per-block pass: self-attention is not computed; each token takes the
  recorded keyframe output at its nearest neighbour (cosine similarity of the source branch's
  attention inputs), blended between two keyframes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .context import AttentionMode, Propagation, TokenFlowContext, UNetCall


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads*dim) -> (batch, heads, tokens, dim)."""
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) -> (batch, tokens, heads*dim)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk_tokens: int = 0
) -> torch.Tensor:
    """Scaled dot-product attention over (batch, heads, tokens, dim), optionally query-chunked.

    Chunking the queries bounds the temporary memory of backends that materialise the score
    matrix; the result is the same since queries are independent.
    """
    if chunk_tokens <= 0 or q.shape[2] <= chunk_tokens:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, i : i + chunk_tokens], k, v, scale=scale)
            for i in range(0, q.shape[2], chunk_tokens)
        ],
        dim=2,
    )


def extended_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Attention of every frame's queries against the keys/values of all frames.

    q: (frames, tokens, heads*dim) for one branch; k, v: the same for all frames the queries
    attend to (the same frames, or more: a keyframe pass split over ranks gives a rank's
    keyframes' queries and every keyframe's keys/values). Returns q's shape. Queries are
    independent, so a split by queries computes exactly the rows of the whole.
    """
    n, t, c = q.shape
    flat = [_heads(x.reshape(1, -1, c), heads) for x in (q, k, v)]
    return _merge_heads(sdpa(*flat, scale=scale, chunk_tokens=chunk_tokens)).view(n, t, c)


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Plain self-attention of each frame with itself; (frames, tokens, heads*dim)."""
    out = sdpa(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale, chunk_tokens)
    return _merge_heads(out)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def nearest_tokens(
    features: torch.Tensor, keyframe_features: torch.Tensor, chunk_bytes: int = 16 * 2**20
) -> torch.Tensor:
    """Index of the most cosine-similar token in each keyframe, for every token of every frame.

    features: (frames, tokens, dim); keyframe_features: (k, tokens_kf, dim).
    Returns (frames, tokens, k) indices into the keyframe tokens. The similarity matrix is built
    in row chunks of at most ``chunk_bytes``, so memory stays bounded at any resolution.
    """
    n, t, d = features.shape
    k, t_kf, _ = keyframe_features.shape
    rows = _unit(features.reshape(n * t, d))
    cols = _unit(keyframe_features.reshape(k * t_kf, d)).T
    step = max(1, chunk_bytes // (cols.shape[1] * cols.element_size()))
    best = [
        (rows[i : i + step] @ cols).view(-1, k, t_kf).argmax(dim=-1) for i in range(0, n * t, step)
    ]
    return torch.cat(best).view(n, t, k)


def propagate_tokens(
    features: torch.Tensor,
    keyframe_features: torch.Tensor,
    keyframe_tokens: torch.Tensor,
    propagation: Propagation,
    chunk_bytes: int = 16 * 2**20,
) -> torch.Tensor:
    """TokenFlow propagation: each frame's tokens gathered from its keyframes' tokens.

    features: (n, tokens, dim) source-branch attention inputs of the frames;
    keyframe_features: (K, tokens, dim) the same for the keyframes the frames read;
    keyframe_tokens: (branches, K, tokens, dim) their recorded attention outputs;
    ``propagation`` numbers those K keyframes 0..K-1 (see ``Propagation.compact``).
    Returns (branches, n, tokens, dim). Correspondences come from the source features and are
    shared by all branches. All frames are matched and gathered at once, with no decision on
    tensor values in Python, so a GPU never waits for the host and the whole function compiles
    as one graph; a frame with one keyframe takes it with weight 1 (exactly its tokens).
    """
    branches, k, t, d = keyframe_tokens.shape
    n = features.shape[0]
    plan = propagation.on(keyframe_tokens.device, keyframe_tokens.dtype)
    index = nearest_tokens(features, keyframe_features, chunk_bytes)  # (n, t, K)
    flat = keyframe_tokens.reshape(branches, k * t, d)

    def gather(slots: torch.Tensor) -> torch.Tensor:
        """Each frame's tokens from keyframe ``slots[frame]``: (branches, n, t, d)."""
        nearest = index.gather(2, slots.view(n, 1, 1).expand(n, t, 1)).view(n, t)
        return flat[:, (slots.view(n, 1) * t + nearest).view(-1)].view(branches, n, t, d)

    w = plan.weight_a.view(1, n, 1, 1)
    return w * gather(plan.slot_a) + (1 - w) * gather(plan.slot_b)


class TokenFlowAttnProcessor:
    """Self-attention processor for one ``attn1`` layer; reads the call plan from the context.

    A recording call puts the source branch's attention inputs (``"features"``) and every
    branch's outputs (by branch index) into the context's ``KeyframeRecordings``; a propagate
    call reads back those of the keyframes its frames need.
    """

    def __init__(self, context: TokenFlowContext, layer: str, qk_injection: bool) -> None:
        self.context = context
        self.layer = layer
        self.qk_injection = qk_injection

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        call = self.context.call
        n = hidden_states.shape[0] // call.branches
        if call.mode is AttentionMode.PROPAGATE:
            return self._propagate(hidden_states, call, n).reshape(hidden_states.shape)

        out = self._attend(attn, hidden_states, call, n)
        if call.record:
            recordings = self.context.recordings
            if call.has_source:  # once per pass and layer, even when branches run apart
                recordings.put(self.layer, "features", hidden_states[:n])
                self.context.log("record", self.layer)
            for g, branch in enumerate(call.branch_ids):
                recordings.put(self.layer, branch, out[g * n : (g + 1) * n])
        return out

    def _keep_source(self, hidden_states: torch.Tensor, call: UNetCall, n: int) -> None:
        """Keep the source's inputs for the pass's later calls (a keyframe pass has them in its
        recordings already); a copy, so the whole batch's activation is not held."""
        if call.keep_source and not call.record:
            self.context.pass_source[self.layer, "features"] = hidden_states[:n].clone()

    def _source_inputs(self, hidden_states: torch.Tensor, call: UNetCall, n: int) -> torch.Tensor:
        """The source branch's attention inputs for this call's frames."""
        if call.has_source:
            return hidden_states[:n]
        if call.record:  # the source ran earlier in this keyframe pass; its inputs were recorded
            return self.context.recordings.get(self.layer, "features")
        return self.context.pass_source[self.layer, "features"]

    def _propagate(self, hidden_states: torch.Tensor, call: UNetCall, n: int) -> torch.Tensor:
        clock = self.context.clock
        with clock.measure("correspondence") if clock else contextlib.nullcontext():
            self._keep_source(hidden_states, call, n)
            slots, local = call.propagation.compact()
            recordings = self.context.recordings
            keyframe_tokens = torch.stack(
                [recordings.get(self.layer, b, slots) for b in call.branch_ids]
            )
            return propagate_tokens(
                self._source_inputs(hidden_states, call, n),
                recordings.get(self.layer, "features", slots),
                keyframe_tokens,
                local,
                self.context.correspondence_chunk_bytes,
            )

    def _attend(self, attn, x: torch.Tensor, call: UNetCall, n: int) -> torch.Tensor:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if call.inject_qk and self.qk_injection:
            self._keep_source(x, call, n)
        if call.inject_qk and self.qk_injection and call.edits:
            if call.has_source:
                source_q, source_k = q[:n], k[:n]
            else:  # the source ran in an earlier call of this pass
                source = self._source_inputs(x, call, n)
                source_q, source_k = attn.to_q(source), attn.to_k(source)
            q = source_q.repeat(call.branches, 1, 1)
            k = source_k.repeat(call.branches, 1, 1)
            self.context.log("qk", self.layer)

        heads, scale, chunk = attn.heads, attn.scale, self.context.attention_chunk_tokens
        if call.mode is AttentionMode.FRAME:
            out = frame_attention(q, k, v, heads, scale, chunk)
        else:
            first = 1 if call.has_source else 0
            parts = [frame_attention(q[:n], k[:n], v[:n], heads, scale, chunk)] if first else []
            edited_k, edited_v = k[first * n :], v[first * n :]
            share, edited = self.context.share, call.branches - first
            if share is not None and edited:  # this rank's keyframes of a pass over ranks
                edited_k, edited_v = share.keys_values(edited_k, edited_v, edited)
            m = len(edited_k) // max(edited, 1)  # frames attended to: n, or all keyframes
            for b in range(edited):
                sl, kv = slice((first + b) * n, (first + b + 1) * n), slice(b * m, (b + 1) * m)
                parts.append(
                    extended_attention(q[sl], edited_k[kv], edited_v[kv], heads, scale, chunk)
                )
            out = torch.cat(parts)

        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor
