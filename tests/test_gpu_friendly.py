"""The hot path is GPU-friendly, checked on the CPU: TokenFlow's layers never wait for the host
inside a UNet call, compile as whole graphs, and batch the propagation per call."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


class _HostRoundTrips(TorchDispatchMode, TorchFunctionMode):
    """Counts values read back to the host (``.item()``, ``bool()``, indexing a host table with a
    device tensor: ``aten._local_scalar_dense``) and tensors made from host values straight on
    a device (``torch.tensor(..., device=...)``: a copy from pageable memory). Tensors made on
    the host and copied through pinned memory (``memory.to_device``) are no wait."""

    def __init__(self) -> None:
        TorchDispatchMode.__init__(self)
        TorchFunctionMode.__init__(self)
        self.reads = self.made = 0

    def __enter__(self):
        TorchFunctionMode.__enter__(self)
        return TorchDispatchMode.__enter__(self)

    def __exit__(self, *exc):
        TorchDispatchMode.__exit__(self, *exc)
        return TorchFunctionMode.__exit__(self, *exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        made = func in (torch.tensor, torch.as_tensor)
        self.made += made and (kwargs or {}).get("device") is not None
        return func(*args, **(kwargs or {}))


def test_host_round_trips_do_not_grow_with_the_unet_calls(tiny_model, wolf_frames):
    """On a GPU, a tensor made from a host value straight on the device is a copy that waits for
    the queue, and a value read back is a sync: either drains the GPU's queue. An edit's count
    of them must not grow with its UNet calls (blocks of one frame and inversion batches of one,
    against one block and one batch): what is left happens once per run, step or VAE batch."""
    counts = []
    for frames_per_call in (1, len(wolf_frames)):
        pipe = TokenFlowPipeline(tiny_model)
        pipe.inversion_batch_size = frames_per_call
        with _HostRoundTrips() as trips:
            result = pipe(wolf_frames, prompt="a fox", inversion_prompt="a wolf", steps=2,
                          inversion_steps=2, block_size=frames_per_call)  # fmt: skip
        counts.append((trips.reads, trips.made))
        calls = result.unet_evaluations
    assert calls["inversion"] == 2 * len(wolf_frames)  # the last edit: one batch per step
    assert counts[0] == counts[1], counts


def test_channels_last_changes_only_the_layout_not_the_edit(data_dir):
    """NHWC weights (``enable_channels_last``) give the NCHW edit up to rounding: no view or
    reshape in TokenFlow's layers assumes the NCHW layout of the activations."""
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.testing import make_tiny_sd
    from tokenflow.video import read_clip

    frames = read_clip(data_dir / "wolf.mp4", max_frames=5, size=(64, 64)).frames
    settings = dict(prompt="a fox", inversion_prompt="a wolf", steps=3, inversion_steps=3,
                    block_size=2)  # fmt: skip
    results = []
    for channels_last in (False, True):
        model = StableDiffusion.from_parts(make_tiny_sd("tiny", seed=0), name="tiny")
        pipe = TokenFlowPipeline(model)
        if channels_last:
            pipe.enable_channels_last()
            conv = model.unet.conv_in.weight
            assert conv.is_contiguous(memory_format=torch.channels_last)
            assert not conv.is_contiguous()
        results.append(pipe(frames, **settings))
    nchw, nhwc = results
    assert nchw.keyframes == nhwc.keyframes
    for ours, reference in ((nhwc.inversion.final, nchw.inversion.final),
                            (nhwc.latents, nchw.latents)):  # fmt: skip
        assert (
            (ours - reference).norm() / reference.norm()
        ).item() < 1e-4  # fp32 rounding, grown by the DDIM inversion
    assert abs(nhwc.frames.astype(int) - nchw.frames.astype(int)).max() <= 1
