"""Keyframe recordings: kept within a memory budget, spilled beyond it, read back unchanged."""

from __future__ import annotations

import pytest
import torch

from tokenflow.recordings import KeyframeRecordings


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(5, 16, 8, generator=g).to(dtype) for i in range(4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spilled_recordings_read_back_bit_identical(dtype):
    values = _tensors(dtype)
    size = next(iter(values.values())).numel() * dtype.itemsize
    recordings = KeyframeRecordings(budget_bytes=int(1.5 * size))  # room for one tensor
    for layer, value in values.items():
        recordings.put(layer, "features", value)
    assert recordings.kept_bytes == size and recordings.spilled_bytes == 3 * size
    for layer, value in values.items():
        assert torch.equal(recordings.get(layer, "features"), value)
        assert torch.equal(recordings.get(layer, "features", [3, 1]), value[[3, 1]])
        assert recordings.get(layer, "features", [4]).dtype == dtype
    recordings.close()


def test_the_spill_file_is_rewritten_not_grown_by_each_pass():
    recordings = KeyframeRecordings(budget_bytes=0)
    for step in range(3):
        values = {k: v + step for k, v in _tensors(torch.float32).items()}
        for layer, value in values.items():
            recordings.put(layer, 0, value)
        assert torch.equal(recordings.get("layer2", 0, [1]), values["layer2"][[1]])
        size = recordings._spill.file.seek(0, 2)
        assert size == sum(v.numel() * 4 for v in values.values())  # one pass's worth
        recordings.clear()
    recordings.close()


def test_kept_recordings_do_not_hold_the_activation_they_were_cut_from():
    activation = torch.randn(3 * 4, 10, 6)  # three branches of four keyframes
    recordings = KeyframeRecordings()  # no budget: everything kept
    recordings.put("attn1", 1, activation[4:8])
    kept = recordings.get("attn1", 1)
    assert torch.equal(kept, activation[4:8])
    assert kept.untyped_storage().nbytes() == kept.numel() * 4  # a copy of its own rows only
    whole = torch.randn(4, 10, 6)
    recordings.put("attn1", 2, whole)
    assert recordings.get("attn1", 2).data_ptr() == whole.data_ptr()  # no needless copy


def test_recording_twice_or_reading_what_was_never_recorded_fails():
    recordings = KeyframeRecordings(budget_bytes=0)
    recordings.put("attn1", "features", torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="recorded twice"):
        recordings.put("attn1", "features", torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="no 0 recorded"):
        recordings.get("attn1", 0)
    recordings.clear()
    with pytest.raises(RuntimeError, match="no 'features' recorded"):
        recordings.get("attn1", "features")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="spilling to host RAM needs a GPU")
def test_gpu_recordings_spill_to_host_and_come_back_to_the_gpu():
    value = torch.randn(4, 16, 8, device="cuda")
    recordings = KeyframeRecordings(budget_bytes=0)
    recordings.put("attn1", 0, value)
    assert recordings._host and not recordings._file
    back = recordings.get("attn1", 0, [2, 0])
    assert back.is_cuda and torch.equal(back, value[[2, 0]])


def test_a_full_temporary_disk_is_an_actionable_error(monkeypatch):
    import errno
    import tempfile

    from tokenflow.cli.flags import flag_for
    from tokenflow.errors import TokenFlowError

    class FullDisk:
        def seek(self, offset):
            return offset

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: FullDisk())
    recordings = KeyframeRecordings(budget_bytes=0)
    with pytest.raises(TokenFlowError, match="No space left on device.*TMPDIR") as error:
        recordings.put("attn1", 0, torch.zeros(2, 3, 4))
    assert "a larger --keyframe-memory (MB)" in error.value.render(flag_for)  # as the CLI says it


@pytest.mark.parametrize("budget", [2**20, 0])  # kept in memory; spilled to the file
def test_rows_from_another_rank_are_appended_after_the_own_ones(budget):
    own, received = torch.randn(3, 4, 2), torch.randn(2, 4, 2)
    recordings = KeyframeRecordings(budget_bytes=budget)
    recordings.put("attn1", "k", own.clone())
    recordings.put("attn1", "v", own.clone() * 2)
    recordings.extend("attn1", "k", received)
    assert torch.equal(recordings.get("attn1", "k"), torch.cat([own, received]))
    assert torch.equal(recordings.get("attn1", "k", [4, 0]), torch.stack([received[1], own[0]]))
    assert torch.equal(recordings.get("attn1", "v"), own * 2)  # its neighbour untouched
    total = (own.numel() * 2 + received.numel()) * own.element_size()
    assert recordings.kept_bytes + recordings.spilled_bytes == total
