"""Metrics on real pixels: DIS flow, warping, occlusion masks, warp error and CLIP scores."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from tokenflow import hub, metrics, testing
from tokenflow.errors import TokenFlowError
from tokenflow.video import read_clip

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 96


@pytest.fixture(scope="module")
def woman() -> np.ndarray:
    """The first 12 frames of woman-running at 96x96."""
    path = DATA / "woman-running.mp4"
    assert path.is_file(), f"test video missing: {path}"
    return read_clip(path, max_frames=12, size=(SIZE, SIZE)).frames


def translated_clip(image: np.ndarray, dx: int, dy: int, n: int = 6) -> np.ndarray:
    """Crops of ``image`` whose content moves by (dx, dy) pixels per frame."""
    x0, y0 = 40, 30
    return np.stack(
        [
            image[y0 - dy * t : y0 - dy * t + SIZE, x0 - dx * t : x0 - dx * t + SIZE]
            for t in range(n)
        ]
    )


def texture(h: int, w: int, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


# --------------------------------------------------------------------------- flow and warping


def test_dis_recovers_known_translation(woman: np.ndarray) -> None:
    big = read_clip(DATA / "woman-running.mp4", max_frames=1, size=(160, 160)).frames[0]
    clip = translated_clip(big, dx=3, dy=2)
    forward, backward = metrics.pair_flows(clip)
    assert forward.shape == (5, SIZE, SIZE, 2)
    interior_fw = forward[:, 16:-16, 16:-16]
    interior_bw = backward[:, 16:-16, 16:-16]
    # Measured: every interior pixel within 0.25 px of (3, 2), mean error 0.03 px.
    assert np.abs(interior_fw - np.array([3.0, 2.0])).max() < 0.5
    assert np.abs(np.median(interior_fw, axis=(0, 1, 2)) - [3.0, 2.0]).max() < 0.05
    assert np.abs(interior_bw + np.array([3.0, 2.0])).max() < 0.5


def test_warp_error_of_translated_clip_against_itself_is_near_zero(woman: np.ndarray) -> None:
    big = read_clip(DATA / "woman-running.mp4", max_frames=1, size=(160, 160)).frames[0]
    clip = translated_clip(big, dx=3, dy=2)
    result = metrics.warp_error(clip, clip, flow="dis")
    # Measured 1.9e-5 (sub-pixel flow error under bilinear sampling); a wrong warp direction or
    # unmasked borders give > 1e-3.
    assert result.mean < 1e-4
    assert len(result.per_pair) == 5 and result.flow_method == "dis" and result.note == ""


def test_warp_brings_next_frame_onto_current_grid() -> None:
    image = texture(40, 50, 1.0, 0).astype(np.float32)
    flow = np.zeros((40, 50, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, 2.0
    warped = metrics.warp(image, flow)
    # out(x, y) = image(x + 3, y + 2) exactly for integer flows.
    np.testing.assert_array_equal(warped[:-2, :-3], image[2:, 3:])
    half = metrics.warp(image, flow * 0.5 + 0.25)  # (1.75, 1.25): bilinear mix of 4 neighbours
    expect = (
        0.25 * 0.75 * image[1:-1, 1:-1]
        + 0.75 * 0.75 * image[1:-1, 2:]
        + 0.25 * 0.25 * image[2:, 1:-1]
        + 0.75 * 0.25 * image[2:, 2:]
    )
    np.testing.assert_allclose(half[:38, :48], expect, atol=0.05)


def test_source_as_edit_has_far_lower_warp_error_than_shuffled(woman: np.ndarray) -> None:
    own = metrics.warp_error(woman, woman)
    shuffled = metrics.warp_error(woman, woman[[5, 9, 2, 11, 0, 7, 3, 10, 1, 6, 4, 8]])
    # Measured at 96x96 with DIS: 1.26e-3 vs 26.2e-3 (about 21x).
    assert own.mean < 3e-3
    assert shuffled.mean > 5 * own.mean
    assert len(own.per_pair) == 11
    assert own.mean == pytest.approx(np.mean(own.per_pair))


def test_warp_error_is_computed_at_the_edited_size(woman: np.ndarray) -> None:
    big_source = metrics.resize_frames(woman, (192, 192))
    small = metrics.warp_error(woman, woman)
    resized = metrics.warp_error(big_source, woman)  # source resized down to 96x96 inside
    assert resized.mean < 2 * small.mean + 1e-3
    with pytest.raises(TokenFlowError, match="frames"):
        metrics.warp_error(woman, woman[:5])


# --------------------------------------------------------------------------- occlusion


def square_flows(size: int, x: int, y: int, side: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact flows for a square moving right by v px over a static background."""
    fw = np.zeros((size, size, 2), np.float32)
    bw = np.zeros((size, size, 2), np.float32)
    fw[y : y + side, x : x + side, 0] = v
    bw[y : y + side, x + v : x + side + v, 0] = -v
    return fw, bw


def test_occlusion_mask_on_exact_flows_is_the_covered_and_uncovered_strips() -> None:
    x, y, side, v = 20, 30, 24, 5
    fw, bw = square_flows(96, x, y, side, v)
    covered = np.zeros((96, 96), bool)
    covered[y : y + side, x + side : x + side + v] = True
    np.testing.assert_array_equal(metrics.occlusion_mask(fw, bw), covered)
    # Backward direction, on frame t+1's grid: the strip uncovered behind the square.
    uncovered = np.zeros((96, 96), bool)
    uncovered[y : y + side, x : x + v] = True
    np.testing.assert_array_equal(metrics.occlusion_mask(bw, fw), uncovered)


def test_occlusion_mask_masks_pixels_leaving_the_frame() -> None:
    fw = np.zeros((32, 40, 2), np.float32)
    fw[..., 0], fw[..., 1] = 3.0, 2.0
    bw = -fw
    mask = metrics.occlusion_mask(fw, bw)
    expect = np.zeros((32, 40), bool)
    expect[:, -3:] = True
    expect[-2:, :] = True
    np.testing.assert_array_equal(mask, expect)
    assert not metrics.occlusion_mask(fw, bw, out_of_frame=False).any()


def test_occlusion_mask_from_dis_flow_on_moving_square() -> None:
    size, side, v, y = 96, 28, 6, 34
    background = texture(size, size, 1.5, 1)
    square = texture(side, side, 1.0, 2)
    frames = []
    for t in range(4):
        frame = background.copy()
        frame[y : y + side, 16 + v * t : 16 + v * t + side] = square
        frames.append(frame)
    fw, bw = metrics.pair_flows(np.stack(frames))
    for t in range(3):
        x = 16 + v * t
        mask_t = metrics.occlusion_mask(fw[t], bw[t])
        mask_next = metrics.occlusion_mask(bw[t], fw[t])
        far = np.zeros((size, size), bool)
        far[8:-8, 8:-8] = True
        far[y - 16 : y + side + 16, x - 16 : x + side + v + 16] = False
        # Measured masked fractions: covered strip 0.70 / 0.71 / 1.00, uncovered strip
        # 0.70 / 0.78 / 0.88, far background 0.00.
        assert mask_t[y + 2 : y + side - 2, x + side : x + side + v].mean() >= 0.5
        assert mask_next[y + 2 : y + side - 2, x : x + v].mean() >= 0.5
        assert mask_t[far].mean() <= 0.01
        assert mask_next[far].mean() <= 0.01


# --------------------------------------------------------------------------- RAFT plumbing


class ConstantFlowModel(torch.nn.Module):
    """Stands in for RAFT: records its inputs and predicts a constant flow at every refinement."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []
        self.ranges: list[tuple[float, float]] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(tuple(a.shape))
        self.ranges.append((float(a.min()), float(a.max())))
        flow = torch.zeros(a.shape[0], 2, a.shape[2], a.shape[3])
        flow[:, 0], flow[:, 1] = 1.5, -0.5
        return [flow * 0, flow]


def test_raft_path_pads_to_multiple_of_eight_and_crops_back() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (6, 30, 45, 3), dtype=np.uint8)
    model = ConstantFlowModel()
    flow = metrics.compute_flow(frames[:-1], frames[1:], method="raft", raft_model=model)
    assert flow.shape == (5, 30, 45, 2)
    np.testing.assert_allclose(flow[..., 0], 1.5)
    np.testing.assert_allclose(flow[..., 1], -0.5)
    # torchvision RAFT needs sides that are multiples of 8 and at least 128 px.
    assert all(s[2:] == (128, 128) for s in model.seen)
    assert [s[0] for s in model.seen] == [4, 1]  # batches of 4
    assert min(r[0] for r in model.ranges) >= -1.0 and max(r[1] for r in model.ranges) <= 1.0
    result = metrics.warp_error(frames, frames, raft_model=model)
    assert result.flow_method == "raft" and len(result.per_pair) == 5


def block_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torchvision", "torchvision.models", "torchvision.models.optical_flow"):
        monkeypatch.setitem(sys.modules, name, None)


def test_raft_request_falls_back_to_dis_without_torchvision(
    monkeypatch: pytest.MonkeyPatch, woman: np.ndarray
) -> None:
    block_torchvision(monkeypatch)
    choice = metrics.resolve_flow("raft")
    assert choice.method == "dis" and "torchvision" in choice.note
    assert metrics.resolve_flow(None).method == "dis"
    result = metrics.warp_error(woman[:3], woman[:3], flow="raft")
    assert result.flow_method == "dis" and "RAFT unavailable" in result.note
    with pytest.raises(metrics.RaftUnavailableError, match="torchvision"):
        metrics.compute_flow(woman[:2], woman[1:3], method="raft")


class TinyFlowNet(torch.nn.Module):
    """Fake torchvision builder target: a module whose state dict RAFT loading must round-trip."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        return [torch.zeros(a.shape[0], 2, a.shape[2], a.shape[3]) + self.layer.bias[0]]


def fake_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    def large(weights: object = None, progress: bool = True) -> TinyFlowNet:
        return TinyFlowNet(4)

    def small(weights: object = None, progress: bool = True) -> TinyFlowNet:
        return TinyFlowNet(2)

    enum_l = SimpleNamespace(DEFAULT=SimpleNamespace(url="https://example.invalid/raft_l.pth"))
    enum_s = SimpleNamespace(DEFAULT=SimpleNamespace(url="https://example.invalid/raft_s.pth"))
    monkeypatch.setattr(
        metrics.flow, "_import_raft_builders", lambda: (large, small, enum_l, enum_s)
    )


def test_load_raft_reads_local_weights_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    fake_builders(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    small = TinyFlowNet(2)
    torch.nn.init.constant_(small.layer.bias, 0.75)
    pth = tmp_path / "raft_small.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}}, pth)
    loaded = metrics.load_raft(pth)
    assert isinstance(loaded, TinyFlowNet) and loaded.layer.weight.shape == (2, 2)
    assert float(loaded.layer.bias.detach()[0]) == 0.75
    st = tmp_path / "raft_small.safetensors"
    save_file(small.state_dict(), str(st))
    assert float(metrics.load_raft(st).layer.bias.detach()[1]) == 0.75

    wrong = tmp_path / "wrong.pth"
    torch.save({"other.weight": torch.zeros(3)}, wrong)
    with pytest.raises(TokenFlowError, match="neither"):
        metrics.load_raft(wrong)
    with pytest.raises(TokenFlowError, match="does not exist"):
        metrics.resolve_flow("raft", tmp_path / "missing.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TokenFlowError, match="cannot read flow model"):
        metrics.load_raft(tmp_path / "junk.safetensors")

    # No file given: only torchvision's cache is looked at, never the network.
    with pytest.raises(metrics.RaftUnavailableError, match="cache"):
        metrics.load_raft()
    assert metrics.resolve_flow(None).method == "dis"
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(TinyFlowNet(4).state_dict(), cache / "raft_l.pth")
    choice = metrics.resolve_flow(None)
    assert choice.method == "raft" and choice.raft_model.layer.weight.shape == (4, 4)


# --------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir: Path) -> metrics.ClipScorer:
    return metrics.ClipScorer(clip_dir, "cpu")


def test_clip_text_score_equals_hand_computed_cosine(
    scorer: metrics.ClipScorer, woman: np.ndarray
) -> None:
    model, processor = testing.make_tiny_clip(seed=0)
    frames = woman[:4]
    with torch.no_grad():
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        tokens = processor.tokenizer(["a woman running"], return_tensors="pt")
        text = model.get_text_features(**tokens)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cosines = torch.nn.functional.cosine_similarity(image, text.expand_as(image), dim=-1)
    expected = float(cosines.mean())
    assert scorer.text_score(frames, "a woman running") == pytest.approx(expected, abs=1e-5)
    assert scorer.text_score(frames, "a wolf") != pytest.approx(expected, abs=1e-4)


def test_frame_consistency_definitions(scorer: metrics.ClipScorer, woman: np.ndarray) -> None:
    same = np.repeat(woman[:1], 5, axis=0)
    assert scorer.frame_consistency(same, "consecutive") == pytest.approx(1.0, abs=1e-5)
    assert scorer.frame_consistency(same, "all") == pytest.approx(1.0, abs=1e-5)
    clip = woman[::2]
    backwards = clip[::-1].copy()
    for pairs in ("consecutive", "all"):
        forward_score = scorer.frame_consistency(clip, pairs)
        assert scorer.frame_consistency(backwards, pairs) == pytest.approx(forward_score, abs=1e-6)
    emb = scorer.image_embeddings(clip).numpy()
    sims = emb @ emb.T
    n = len(emb)
    consecutive = np.mean([sims[i, i + 1] for i in range(n - 1)])
    all_pairs = np.mean([sims[i, j] for i in range(n) for j in range(i + 1, n)])
    assert scorer.frame_consistency(clip, "consecutive") == pytest.approx(consecutive, abs=1e-5)
    assert scorer.frame_consistency(clip, "all") == pytest.approx(all_pairs, abs=1e-5)
    assert consecutive != pytest.approx(all_pairs, abs=1e-6)


def test_tiny_clip_is_deterministic_and_tokenizes_offline() -> None:
    a, processor = testing.make_tiny_clip(seed=3)
    b, _ = testing.make_tiny_clip(seed=3)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    ids = processor.tokenizer("a wolf")["input_ids"]
    vocab = processor.tokenizer.get_vocab()
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert len(ids) == len("awolf") + 2  # one token per byte, spaces split words


def test_missing_clip_model_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(TokenFlowError, match="does not exist"):
        metrics.ClipScorer(tmp_path / "no-clip")
    with pytest.raises(TokenFlowError, match="`hf download tokenflow-tests/no-such-clip`"):
        metrics.ClipScorer("tokenflow-tests/no-such-clip", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenFlowError, match="config.json"):
        metrics.ClipScorer(tmp_path / "empty")


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("unreachable", ["patched", "refusing endpoint"])
def test_uncached_clip_while_online_but_unreachable_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], unreachable: str
) -> None:
    """Downloads allowed but no Hub: one line naming `hf download`, no retries, no log lines."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if unreachable == "patched":
        monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    else:  # the real check, against an endpoint that refuses connections
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        hub.hub_reachable.cache_clear()
    capfd.readouterr()
    clock = time.perf_counter()
    try:
        with pytest.raises(TokenFlowError) as caught:
            metrics.ClipScorer("tokenflow-tests/no-such-clip")
    finally:
        if unreachable != "patched":
            hub.hub_reachable.cache_clear()
    elapsed = time.perf_counter() - clock
    message = str(caught.value)
    assert elapsed < 1.0, f"took {elapsed:.1f} s"
    assert "`hf download tokenflow-tests/no-such-clip`" in message
    assert "not in the local Hugging Face cache" in message and "unreachable" in message
    assert "\n" not in message and "--" not in message  # one line, no CLI flags
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def fake_hf_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``repo_id`` (refs/main -> one snapshot)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_cached_hub_id_loads_without_touching_the_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clip_dir: Path
) -> None:
    from huggingface_hub import constants

    cache = fake_hf_cache(tmp_path / "hf", "tokenflow-tests/tiny-clip", clip_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(timeout: float = 3.0) -> bool:
        raise AssertionError("the Hub was contacted for a cached model")

    monkeypatch.setattr(hub, "hub_reachable", no_network)
    assert metrics.clip_in_cache("tokenflow-tests/tiny-clip")
    scorer = metrics.ClipScorer("tokenflow-tests/tiny-clip")
    assert scorer.model.config.projection_dim == 16


def test_uncached_clip_is_downloaded_quietly_when_the_hub_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Online and reachable: one download attempt with the hub's log lines off, then restored."""
    import logging

    import transformers
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    calls: list[tuple[bool, int]] = []

    def fake_from_pretrained(source: str, local_files_only: bool = False, **kwargs: Any) -> None:
        calls.append((local_files_only, logging.getLogger("huggingface_hub").getEffectiveLevel()))
        raise OSError("404 Client Error: no such repo\nmore detail")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", fake_from_pretrained)
    before = logging.getLogger("huggingface_hub").getEffectiveLevel()
    with pytest.raises(metrics.ClipUnavailableError) as caught:
        metrics.ClipScorer("tokenflow-tests/no-such-clip")
    assert calls == [(False, logging.ERROR)]
    assert logging.getLogger("huggingface_hub").getEffectiveLevel() == before
    message = str(caught.value)
    assert "could not be downloaded (OSError: 404 Client Error: no such repo)" in message
    assert "\n" not in message and "`hf download tokenflow-tests/no-such-clip`" in message
