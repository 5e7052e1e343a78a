"""Keyframe draws and the reference propagation weights."""

from __future__ import annotations

import torch

from tokenflow.keyframes import KeyframeSampler, block_bounds, reference_propagation


def test_draws_follow_the_reference_formula_step_after_step():
    sampler = KeyframeSampler(n_frames=24, block_size=8, seed=1)
    g = torch.Generator("cpu").manual_seed(1)
    for _ in range(5):
        expected = torch.randint(8, (3,), generator=g) + torch.arange(0, 24, 8)
        assert torch.equal(sampler.draw(), expected)


def test_seed_1_gives_the_authors_first_draws():
    # the authors' code seeded with 1, 16 frames, blocks of 8 (refcheck run_info.json)
    sampler = KeyframeSampler(16, 8, seed=1)
    assert [sampler.draw().tolist() for _ in range(3)] == [[5, 11], [4, 8], [7, 9]]


def test_a_short_last_block_keeps_its_frames_and_gets_its_own_keyframe():
    assert block_bounds(11, 4) == [(0, 4), (4, 8), (8, 11)]
    sampler = KeyframeSampler(11, 4, seed=3)
    for _ in range(50):
        kf = sampler.draw()
        assert len(kf) == 3
        for (start, end), k in zip(block_bounds(11, 4), kf.tolist(), strict=True):
            assert start <= k < end


def test_fixed_keyframes_are_block_centres():
    sampler = KeyframeSampler(11, 4, seed=3, fixed=True)
    assert sampler.draw().tolist() == [2, 6, 9]
    assert sampler.draw().tolist() == [2, 6, 9]


def test_reference_blend_weights():
    bounds = block_bounds(24, 8)
    first = reference_propagation(bounds, 0)
    assert first.slot_a.tolist() == [0] * 8 and first.slot_b.tolist() == [-1] * 8
    prop = reference_propagation(bounds, 2)
    assert prop.slot_a.tolist() == [2] * 8 and prop.slot_b.tolist() == [1] * 8
    f = torch.arange(16, 24)
    d1, d2 = (f - 20).abs(), (f - 12).abs()
    torch.testing.assert_close(prop.weight_a, torch.sigmoid(d2 / (d1 + d2)))
    # the authors' weights stay within [0.62, 0.73] for blocks of 8
    assert prop.weight_a.min() > 0.62 and prop.weight_a.max() < 0.74
