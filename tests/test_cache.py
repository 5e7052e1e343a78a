"""Properties of the inversion cache: exact round trips, sensitive and stable keys, detection of
damaged entries, atomic saves, and the ``tokenflow cache`` command."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenflow import cache as cache_mod
from tokenflow.cache import CacheEntry, InversionCache, default_cache_dir, inversion_key
from tokenflow.cli.cache import add_cache_arguments, run_cache
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import Inversion

TIMESTEPS = [1, 21, 41, 61, 81, 981]


def make_frames(n: int = 3, h: int = 8, w: int = 16) -> np.ndarray:
    """Deterministic uint8 frames (same bytes in every process)."""
    return (np.arange(n * h * w * 3, dtype=np.int64) * 7 % 251).astype(np.uint8).reshape(n, h, w, 3)


KEY_INPUTS = dict(
    model_fingerprint="0123456789abcdef",
    inversion_prompt="a wolf",
    inversion_steps=500,
    edit_timesteps=[981, 961, 941],
    dtype="float16",
    extra=None,
)


def make_key(**changes) -> str:
    frames = changes.pop("frames", None)
    return inversion_key(make_frames() if frames is None else frames, **{**KEY_INPUTS, **changes})


def make_inversion(dtype: torch.dtype = torch.float32, frames: int = 2, seed: int = 0) -> Inversion:
    g = torch.Generator().manual_seed(seed)
    latents = {t: torch.randn(frames, 4, 3, 5, generator=g).to(dtype) for t in TIMESTEPS}
    return Inversion(latents, TIMESTEPS[-1])


def key_of(i: int) -> str:
    """A distinct, valid key per ``i`` (different first digit up to 16)."""
    return f"{i:x}" + "0" * 63


def assert_same(a: Inversion, b: Inversion) -> None:
    assert a.final_timestep == b.final_timestep
    assert sorted(a.latents) == sorted(b.latents)
    for t in a.latents:
        assert a.latents[t].dtype == b.latents[t].dtype
        assert a.latents[t].shape == b.latents[t].shape
        assert torch.equal(a.latents[t].view(torch.uint8), b.latents[t].view(torch.uint8)), t


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_then_load_is_bit_identical(tmp_path, dtype):
    cache = InversionCache(tmp_path)
    inv = make_inversion(dtype)
    key = make_key()
    path = cache.save(key, inv, {"prompt": "a wolf"})
    assert path == cache.path_for(key) and path.is_file()
    loaded = cache.load(key)
    assert loaded is not None
    assert_same(inv, loaded)


def test_save_accepts_non_contiguous_tensors_and_load_converts(tmp_path):
    cache = InversionCache(tmp_path)
    base = make_inversion()
    # Transposed-and-back views are non-contiguous but hold the same values.
    odd = Inversion(
        {t: z.transpose(2, 3).contiguous().transpose(2, 3) for t, z in base.latents.items()},
        base.final_timestep,
    )
    assert not odd.latents[1].is_contiguous()
    cache.save(key_of(1), odd, {})
    assert_same(base, cache.load(key_of(1)))
    half = cache.load(key_of(1), device="cpu", dtype=torch.float16)
    assert all(z.dtype == torch.float16 for z in half.latents.values())
    assert torch.equal(half.final, base.final.half())


def test_load_of_absent_key_is_none_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert InversionCache(tmp_path / "missing").load(make_key()) is None


def test_keys_that_could_escape_the_folder_are_refused(tmp_path):
    cache = InversionCache(tmp_path)
    for bad in ["../" + "0" * 61, "A" * 64, "0" * 63, ""]:
        with pytest.raises(ValueError):
            cache.path_for(bad)


# ------------------------------------------------------------------------------ keys


def test_key_changes_when_any_single_input_changes():
    pixel = make_frames()
    pixel[2, 5, 9, 1] ^= 1
    variants = {
        "base": make_key(),
        "pixel": make_key(frames=pixel),
        "shape": make_key(frames=make_frames().reshape(3, 16, 8, 3)),
        "frame count": make_key(frames=make_frames()[:2]),
        "prompt": make_key(inversion_prompt="a wolf "),
        "steps": make_key(inversion_steps=1000),
        "timesteps": make_key(edit_timesteps=[981, 961]),
        "dtype": make_key(dtype="float32"),
        "fingerprint": make_key(model_fingerprint="0123456789abcdee"),
        "extra": make_key(extra={"controlnet": "abc"}),
        "extra value": make_key(extra={"controlnet": "abd"}),
    }
    assert len(set(variants.values())) == len(variants), variants
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in variants.values())


def test_key_changes_with_format_version(monkeypatch):
    before = make_key()
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)
    assert make_key() != before


def test_key_ignores_what_does_not_change_the_inversion():
    base = make_key(extra={"a": 1, "b": [1, 2]})
    # Same pixels in another memory layout, timesteps reordered/duplicated, torch dtype object,
    # extra keys in another order: same inversion, so the same key.
    fortran = np.asfortranarray(make_frames())
    assert (
        make_key(
            frames=fortran,
            edit_timesteps=[941, 981, 961, 961],
            dtype=torch.float16,
            extra={"b": [1, 2], "a": 1},
        )
        == base
    )
    assert make_key(extra=None) == make_key(extra={})


def test_key_is_stable_across_calls_and_processes():
    first, second = make_key(), make_key()
    assert first == second
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_cache as t; print(t.make_key())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.strip() == first


def test_key_rejects_frames_that_are_not_uint8_clips():
    with pytest.raises(ValueError, match="uint8"):
        make_key(frames=make_frames().astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        make_key(frames=make_frames()[0])


# ------------------------------------------------------------------------------ corruption


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # tensor data follows the JSON header
    for i in range(start + 3, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "damage, why",
    [
        (_corrupt_truncate, "cannot be parsed"),
        (_corrupt_flip_tensor_bytes, "checksum mismatch"),
        (_corrupt_empty, "cannot be parsed"),
    ],
)
def test_damaged_entry_warns_is_deleted_and_is_recomputed(tmp_path, damage, why):
    cache = InversionCache(tmp_path)
    key, inv = make_key(), make_inversion(torch.float16)
    path = cache.save(key, inv, {})
    damage(path)
    with pytest.warns(UserWarning, match=rf"entry {key} is corrupt \({why}.*recomputing"):
        assert cache.load(key) is None
    assert not path.exists()
    assert cache.save(key, inv, {}) == path
    assert_same(inv, cache.load(key))


def test_entry_under_the_wrong_key_is_corrupt(tmp_path):
    cache = InversionCache(tmp_path)
    cache.save(key_of(1), make_inversion(), {})
    os.replace(cache.path_for(key_of(1)), cache.path_for(key_of(2)))
    with pytest.warns(UserWarning, match="corrupt .*metadata names key"):
        assert cache.load(key_of(2)) is None
    assert cache_files(tmp_path) == []


def test_entry_missing_a_timestep_is_corrupt(tmp_path, monkeypatch):
    cache = InversionCache(tmp_path)
    inv = make_inversion()
    # Write a self-consistent file (valid checksum) that lacks one listed timestep.
    real_save = cache_mod._save_safetensors

    def drop_one(tensors, metadata):
        tensors = {k: v for k, v in tensors.items() if k != "41"}
        return real_save(tensors, {**metadata, "checksum": cache_mod.tensors_checksum(tensors)})

    monkeypatch.setattr(cache_mod, "_save_safetensors", drop_one)
    cache.save(key_of(3), inv, {})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"corrupt \(missing timesteps \[41\]\)"):
        assert cache.load(key_of(3)) is None
    assert cache_files(tmp_path) == []


# ------------------------------------------------------------------------------ atomic saves


def _failing_writer(file, payload):
    file.write(payload[: len(payload) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_leaves_nothing_and_warns(tmp_path, monkeypatch):
    cache = InversionCache(tmp_path)
    monkeypatch.setattr(cache_mod, "_write_payload", _failing_writer)
    with pytest.warns(UserWarning, match="could not save .*No space left"):
        assert cache.save(key_of(1), make_inversion(), {}) is None
    assert cache_files(tmp_path) == []
    assert cache.load(key_of(1)) is None


def test_failed_save_keeps_the_previous_good_entry(tmp_path, monkeypatch):
    cache = InversionCache(tmp_path)
    good = make_inversion(seed=1)
    path = cache.save(key_of(1), good, {"prompt": "good"})
    before = path.read_bytes()
    monkeypatch.setattr(cache_mod, "_write_payload", _failing_writer)
    with pytest.warns(UserWarning, match="could not save"):
        assert cache.save(key_of(1), make_inversion(seed=2), {"prompt": "new"}) is None
    assert cache_files(tmp_path) == [path.name]
    assert path.read_bytes() == before
    assert_same(good, cache.load(key_of(1)))


def test_save_into_an_unwritable_place_warns_instead_of_raising(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = InversionCache(blocker / "cache")
    with pytest.warns(UserWarning, match="could not save"):
        assert cache.save(key_of(1), make_inversion(), {}) is None
    assert cache.entries() == [] and cache.size() == 0


# ------------------------------------------------------------------------------ housekeeping


def test_tokenflow_cache_env_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    cache = InversionCache()
    assert cache.root == tmp_path / "elsewhere"
    cache.save(key_of(1), make_inversion(), {})
    assert cache_files(tmp_path / "elsewhere") == [f"{key_of(1)}.safetensors"]
    monkeypatch.delenv("TOKENFLOW_CACHE")
    default = default_cache_dir()
    assert default.name == "inversions" and "tokenflow" in str(default)


def _save_at(cache: InversionCache, monkeypatch, key: str, when: float, meta: dict) -> Path:
    monkeypatch.setattr(cache_mod, "time", SimpleNamespace(time=lambda: when))
    path = cache.save(key, make_inversion(), meta)
    monkeypatch.setattr(cache_mod, "time", time)
    return path


def test_entries_size_and_clear(tmp_path, monkeypatch):
    cache = InversionCache(tmp_path)
    for i, when in [(1, 100.0), (2, 300.0), (3, 200.0)]:
        _save_at(cache, monkeypatch, key_of(i), when, {"prompt": f"p{i}"})
    # Foreign files and a stale temp file are not entries.
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    stale = tmp_path / f".{key_of(4)}.abc123.tmp"
    stale.write_bytes(b"half")
    entries = cache.entries()
    assert [e.key for e in entries] == [key_of(2), key_of(3), key_of(1)]  # newest first
    assert all(isinstance(e, CacheEntry) for e in entries)
    assert [e.created for e in entries] == [300.0, 200.0, 100.0]
    assert entries[0].meta == {"prompt": "p2"}
    assert all(e.size_bytes == e.path.stat().st_size for e in entries)
    assert cache.size() == sum(e.size_bytes for e in entries)

    assert cache.clear(key_of(3)[:3]) == 1  # a unique prefix
    assert [e.key for e in cache.entries()] == [key_of(2), key_of(1)]
    assert stale.exists()  # only that key's temp files go with a keyed clear
    with pytest.raises(TokenFlowError, match="not a cache key"):
        cache.clear("xyz")
    assert cache.clear("f") == 0

    assert cache.clear() == 2
    assert cache.entries() == [] and cache.size() == 0
    assert cache_files(tmp_path) == ["model.safetensors", "notes.txt"]


def test_clear_refuses_an_ambiguous_prefix(tmp_path):
    cache = InversionCache(tmp_path)
    twin = key_of(1)[:-1] + "1"
    for key in (key_of(1), twin):
        cache.save(key, make_inversion(), {})
    with pytest.raises(TokenFlowError, match="matches 2 cache entries"):
        cache.clear(key_of(1)[:12])
    assert len(cache.entries()) == 2
    assert cache.clear(twin.upper()) == 1  # a full key is never ambiguous; case is ignored
    assert [e.key for e in cache.entries()] == [key_of(1)]


def test_unreadable_entry_is_listed_and_cleared(tmp_path):
    cache = InversionCache(tmp_path)
    cache.path_for(key_of(5)).write_bytes(b"\x00" * 32)
    [entry] = cache.entries()
    assert entry.key == key_of(5) and entry.meta == {} and entry.size_bytes == 32
    assert cache.clear() == 1 and cache_files(tmp_path) == []


# ------------------------------------------------------------------------------ CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenflow cache")
    add_cache_arguments(parser)
    return run_cache(parser.parse_args(argv))


def test_cli_list_size_clear(tmp_path, monkeypatch, capsys):
    cache = InversionCache(tmp_path)
    meta = {"model": "sd-2.1-base", "prompt": "a wolf in snow", "frames": 2, "size": [512, 384]}
    _save_at(cache, monkeypatch, key_of(1), 1_700_000_000.0, meta)
    _save_at(cache, monkeypatch, key_of(2), 1_700_000_100.0, {"prompt": "other"})
    sizes = [cache.path_for(key_of(i)).stat().st_size for i in (1, 2)]

    assert run_cli(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(key_of(2)[:12]) and out[1].startswith(key_of(1)[:12])
    for text in ["sd-2.1-base", '"a wolf in snow"', "2 frames", "512x384", "MiB"]:
        assert text in out[1]
    assert out[-1] == f"2 entries, {sum(sizes) / 2**20:.1f} MiB in {tmp_path}"

    assert run_cli(["size", "--cache-dir", str(tmp_path)]) == 0  # option after the command
    assert (
        capsys.readouterr().out.strip() == f"{sum(sizes) / 2**20:.1f} MiB in 2 entries ({tmp_path})"
    )

    assert run_cli(["--cache-dir", str(tmp_path), "clear", key_of(1)[:12]]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entry")
    assert [e.key for e in cache.entries()] == [key_of(2)]

    assert run_cli(["--cache-dir", str(tmp_path), "clear", "--all"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entry")
    assert run_cli(["--cache-dir", str(tmp_path), "clear", "abc"]) == 0
    assert "no cache entry matches" in capsys.readouterr().out


def test_cli_defaults_to_list_and_the_env_folder(tmp_path, capsys):
    # conftest points TOKENFLOW_CACHE at tmp_path/"cache", which does not exist yet.
    assert run_cli([]) == 0
    assert capsys.readouterr().out.strip() == f"no cached inversions in {tmp_path / 'cache'}"
    InversionCache().save(key_of(7), make_inversion(), {"prompt": "x"})
    assert run_cli(["size"]) == 0
    assert "in 1 entry" in capsys.readouterr().out


def test_cli_rejects_a_file_as_cache_dir(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(TokenFlowError, match="is a file"):
        run_cli(["--cache-dir", str(tmp_path / "f"), "list"])


def test_saved_metadata_is_readable_json(tmp_path):
    """The header carries key, final timestep, version, time and meta, for other tools."""
    cache = InversionCache(tmp_path)
    path = cache.save(key_of(1), make_inversion(), {"model": "m", "frames": 2})
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    assert meta["key"] == key_of(1) and meta["final_timestep"] == "981"
    assert meta["format"] == str(cache_mod.FORMAT_VERSION) and float(meta["created"]) > 0
    assert json.loads(meta["meta"]) == {"frames": 2, "model": "m"}
    assert sorted(k for k in header if k != "__metadata__") == sorted(map(str, TIMESTEPS))
