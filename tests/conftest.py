"""Shared fixtures: the real clips beside the checkout and tiny random SD models built in code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# before anything imports huggingface_hub, which reads it once: tests never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wolf.mp4").is_file():  # CI has ../shared beside the checkout: never skip there
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"test clips not found in {DATA}")
    return DATA


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny SD-2.1-structured model on the CPU in float32 (shared, read-only)."""
    from tokenflow.families.sd import StableDiffusion
    from tokenflow.testing import make_tiny_sd

    return StableDiffusion.from_parts(make_tiny_sd("tiny", seed=0), name="tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The same tiny model saved as a diffusers folder, for loading like a real model."""
    from tokenflow.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_model):
    """A ControlNet for the tiny model whose conditioning visibly matters (shared, read-only)."""
    from tokenflow.testing import make_tiny_controlnet

    return make_tiny_controlnet(tiny_model.unet, seed=0)


@pytest.fixture(scope="session")
def tiny_controlnet_dir(tiny_controlnet, tmp_path_factory) -> Path:
    """The tiny ControlNet saved as a diffusers folder (safetensors) for ``--controlnet``."""
    folder = tmp_path_factory.mktemp("models") / "tiny-controlnet"
    tiny_controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def wolf_frames(data_dir) -> np.ndarray:
    """The first 6 frames of wolf.mp4 at 64x64."""
    from tokenflow.video import read_clip

    return read_clip(data_dir / "wolf.mp4", max_frames=6, size=(64, 64)).frames


@pytest.fixture(scope="session")
def tiny_edit_args() -> list[str]:
    """CLI flags for a fast edit: 5 frames at 64x64, 4 + 8 steps, blocks of 2."""
    return [
        "--frames",
        "5",
        "--size",
        "64x64",
        "--steps",
        "4",
        "--inversion-steps",
        "8",
        "--block-size",
        "2",
        "--inversion-prompt",
        "a wolf",
        "--quiet",
    ]


@pytest.fixture
def trace(monkeypatch):
    """Every injection / recording of the next edits, as ``(step, kind, layer)``."""
    from tokenflow.install import TokenFlowUNet

    events: list[tuple[int, str, str]] = []
    original_init = TokenFlowUNet.__init__

    def tracing_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.context.trace = events

    monkeypatch.setattr(TokenFlowUNet, "__init__", tracing_init)
    return events


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
