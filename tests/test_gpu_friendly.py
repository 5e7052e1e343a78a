"""The hot path is GPU-friendly, checked on the CPU: TokenFlow's layers never wait for the host
inside a UNet call, compile as whole graphs, and batch the propagation per call."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenflow.attention import propagate_tokens
from tokenflow.context import AttentionMode, Propagation, UNetCall
from tokenflow.install import TokenFlowUNet
from tokenflow.pipeline import TokenFlowPipeline
from tokenflow.timing import StageClock

ENGINE = Path(__file__).parents[1] / "src" / "tokenflow"


def test_propagation_of_mixed_keyframe_pairs_equals_the_per_frame_formula():
    """One call whose frames read different keyframe pairs, or a single keyframe, as the
    paper's propagation rule makes them: gathered and blended at once, frame by frame right."""
    g = torch.Generator().manual_seed(2)
    features = torch.randn(4, 10, 6, generator=g)
    kf_features = torch.randn(3, 10, 6, generator=g)
    kf_tokens = torch.randn(2, 3, 10, 6, generator=g)  # (branches, K, tokens, dim)
    plan = Propagation(
        torch.tensor([0, 1, 2, 1]), torch.tensor([1, 2, -1, 0]), torch.tensor([0.3, 0.6, 1, 0.9])
    )
    out = propagate_tokens(features, kf_features, kf_tokens, plan, chunk_bytes=100)
    unit = F.normalize
    for i in range(4):
        blend = torch.zeros(2, 10, 6)
        pairs = [(int(plan.slot_a[i]), float(plan.weight_a[i]))]
        if plan.slot_b[i] >= 0:
            pairs.append((int(plan.slot_b[i]), 1 - float(plan.weight_a[i])))
        for slot, weight in pairs:
            nearest = (unit(features[i], dim=-1) @ unit(kf_features[slot], dim=-1).T).argmax(-1)
            blend += weight * kf_tokens[:, slot, nearest]
        torch.testing.assert_close(out[:, i], blend, rtol=0, atol=1e-6)
    single = int(plan.slot_a[2])  # a single keyframe is taken exactly, not blended
    nearest = (unit(features[2], dim=-1) @ unit(kf_features[single], dim=-1).T).argmax(-1)
    assert torch.equal(out[:, 2], kf_tokens[:, single, nearest])


@pytest.fixture(scope="module")
def attached(tiny_model):
    """The tiny UNet with TokenFlow attached (recordings in memory), one q/k-injection layer."""
    unet = TokenFlowUNet(tiny_model.unet, tiny_model.layers(), keyframe_memory=math.inf)
    unet.context.clock = StageClock(torch.device("cpu"))
    layer = tiny_model.layers().qk_injection[0]
    yield unet, layer, tiny_model.unet.get_submodule(layer)
    unet.detach()


def test_processors_compile_as_whole_graphs_in_every_mode(attached):
    """``torch.compile(fullgraph=True)`` raises on any graph break. Dynamo's ``eager`` backend
    traces exactly as for a real backend, then runs the captured ops: same values."""
    unet, layer, attn = attached
    context, processor = unet.context, attn.processor
    x = torch.randn(3 * 2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    plan = Propagation(torch.tensor([1, 0]), torch.tensor([0, -1]), torch.tensor([0.7, 1.0]))
    calls = {
        "frame": UNetCall(AttentionMode.FRAME, branches=3, has_source=True),
        "keyframe pass": UNetCall(
            AttentionMode.EXTENDED, branches=3, has_source=True, inject_qk=True, record=True
        ),
        "propagation": UNetCall(
            AttentionMode.PROPAGATE, branches=3, has_source=True, propagation=plan
        ),
    }
    recorded = None
    for name, call in calls.items():
        context.call = call
        if call.propagation is not None:  # what TokenFlowUNet does before every call
            call.propagation.compact()[1].on(x.device, x.dtype)
        eager = processor(attn, x)
        if call.record:
            recorded = context.recordings.get(layer, 2).clone()
            context.recordings.clear()
        compiled = torch.compile(processor.__call__, fullgraph=True, backend="eager")
        assert torch.equal(compiled(attn, x), eager), name
        if call.record:
            assert torch.equal(context.recordings.get(layer, 2), recorded)
    torch._dynamo.reset()


def test_tokenflow_layers_never_wait_for_the_host_during_an_edit(
    tiny_model, wolf_frames, monkeypatch
):
    """Reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool()``, ...) makes a
    GPU drain its queue. None may come from TokenFlow's code while the UNet runs (the plan's
    host-side work is done before each call)."""
    in_unet = [False]
    syncs: list[str] = []

    def engine_frame() -> str | None:
        for frame in traceback.extract_stack()[:-2]:
            if Path(frame.filename).is_relative_to(ENGINE):
                return f"{Path(frame.filename).name}:{frame.lineno}"
        return None

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if in_unet[0] and (where := engine_frame()):
                syncs.append(f"{name} at {where}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        spy(name)
    pre = tiny_model.unet.register_forward_pre_hook(lambda *a: in_unet.__setitem__(0, True))
    post = tiny_model.unet.register_forward_hook(lambda *a: in_unet.__setitem__(0, False))
    try:
        for settings in ({}, {"propagation": "paper"}, {"baseline": "extended-attention"}):
            TokenFlowPipeline(tiny_model)(
                wolf_frames[:5],
                prompt="a fox",
                inversion_prompt="a wolf",
                steps=2,
                inversion_steps=2,
                block_size=2,
                **settings,
            )
    finally:
        pre.remove()
        post.remove()
    assert syncs == []
