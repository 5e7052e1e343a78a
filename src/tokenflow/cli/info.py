"""``tokenflow info``: versions, device, cache, the Hub, and whether a model loads from here:
its family, default working size, and the VAE, LoRAs and embeddings applied to it."""

from __future__ import annotations

import argparse

import torch

from .. import hub
from ..cache import InversionCache
from ..errors import TokenFlowError
from ..families import load_model
from ..job import package_versions
from ..loading import resolve_device, resolve_dtype
from .flags import add_option_flags, as_flags


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="also check whether this model (HF id, folder, file) loads"
    )
    parser.add_argument(
        "--model-config", default=None, help="for a .safetensors --model: its diffusers folder"
    )
    add_option_flags(parser, ["vae", "lora", "embedding"])


def hub_state() -> str:
    """One consistent word on the Hub: what model loading will actually do."""
    if hub.hub_offline():
        return "offline (HF_HUB_OFFLINE): models come from the HF cache only"
    if hub.hub_reachable():
        return "online: models missing from the HF cache are downloaded"
    return "online but unreachable: models come from the HF cache only"


def run_info(args: argparse.Namespace) -> int:
    for name, version in package_versions().items():
        print(f"{name:14s} {version}")
    device = resolve_device(None)
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    print(f"{'device':14s} {device}{gpu}")
    print(f"{'dtype':14s} {str(resolve_dtype(None, device)).removeprefix('torch.')}")
    cache = InversionCache()
    entries = cache.entries()
    size = sum(e.size_bytes for e in entries) / 2**20
    print(f"{'cache':14s} {cache.root} ({len(entries)} entries, {size:.1f} MiB)")
    print(f"{'hub':14s} {hub_state()}")
    if not args.model:
        return 0
    addons = {name: getattr(args, name, None) or () for name in ("lora", "embedding")}
    try:
        model = load_model(
            args.model,
            device="cpu",
            dtype="float32",
            config=args.model_config,
            vae=getattr(args, "vae", None),
            **addons,
        )
    except TokenFlowError as exc:
        print(f"{'model':14s} {args.model}: cannot be loaded: {as_flags(str(exc.args[0]))}")
        return 1
    described = model.describe()
    print(f"{'model':14s} {args.model}: loads (fingerprint {model.fingerprint()})")
    print(f"{'family':14s} {described['family']}")
    print(f"{'default size':14s} short side {described['default_short_side']}")
    if described["vae"]:
        print(f"{'vae':14s} {described['vae']} ({described['vae_dtype']})")
    for lora in described["loras"]:
        fused = "fused" if lora["fused"] else "not fused"
        print(f"{'lora':14s} {lora['file']} (scale {lora['scale']:g}, {fused})")
    for embedding in described["embeddings"]:
        vectors = f"{embedding['vectors']} vector{'s' if embedding['vectors'] > 1 else ''}"
        print(f"{'embedding':14s} {embedding['file']} (token {embedding['token']}, {vectors})")
    return 0
