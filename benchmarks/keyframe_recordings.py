"""Keyframe recordings per keyframe for a model's real architecture at a working size.

Reference mode keeps, for every self-attention layer and every keyframe, the source branch's
attention input and the three branches' attention outputs -- 4 tensors of tokens x width --
from the keyframe pass until the block passes have used them (``recordings.py``). This counts
them by running the real UNet layout on the meta device (no weights are allocated) with a hook
on every self-attention, so the number follows the architecture, not a formula typed by hand::

    python benchmarks/keyframe_recordings.py                       # SD 2.1 at 512, SDXL at 1024
    python benchmarks/keyframe_recordings.py --model sdxl --res 768,1024,1536 --dtype float32

Prints one row per model and size: self-attention layers, tokens x width of one frame summed
over them, and MB per keyframe.
"""

from __future__ import annotations

import argparse

import torch

DEFAULT_RES = {"sd21": 512, "sdxl": 1024}
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
TENSORS_PER_LAYER = 4  # the source's attention input + the three branches' outputs


def _unet_on_meta(model: str):
    from diffusers import UNet2DConditionModel

    from tokenflow.testing import sd_unet_config, sdxl_unet_config

    config = sdxl_unet_config("sdxl") if model == "sdxl" else sd_unet_config("sd21")
    with torch.device("meta"):
        return UNet2DConditionModel(**config).eval()


def self_attention_elements(model: str, res: int) -> tuple[int, int]:
    """(layers, elements per frame) of every self-attention input at res x res pixels."""
    unet = _unet_on_meta(model)
    sizes: list[int] = []

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        sizes.append(hidden[0].numel())  # tokens x width of one frame

    hooks = [
        m.register_forward_pre_hook(count, with_kwargs=True)
        for name, m in unet.named_modules()
        if name.endswith("attn1")
    ]
    config = unet.config
    latents = torch.empty(1, 4, res // 8, res // 8, device="meta")
    text = torch.empty(1, 77, config.cross_attention_dim, device="meta")
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.empty(1, pooled, device="meta"),
            "time_ids": torch.empty(1, 6, device="meta"),
        }
    with torch.no_grad():
        unet(latents, torch.tensor(500, device="meta"), text, added_cond_kwargs=added)
    for hook in hooks:
        hook.remove()
    return len(sizes), sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd21", "sdxl", "both"), default="both")
    parser.add_argument("--res", default=None, help="comma-separated square sizes in pixels")
    parser.add_argument("--dtype", choices=tuple(BYTES), default="float16")
    args = parser.parse_args()
    models = ("sd21", "sdxl") if args.model == "both" else (args.model,)
    print("| model | size | self-attention layers | tokens x width per frame | MB per keyframe |")
    print("| --- | --- | --- | --- | --- |")
    for model in models:
        sizes = [int(r) for r in args.res.split(",")] if args.res else [DEFAULT_RES[model]]
        for res in sizes:
            layers, elements = self_attention_elements(model, res)
            mb = elements * TENSORS_PER_LAYER * BYTES[args.dtype] / 1e6
            print(f"| {model} | {res}x{res} | {layers} | {elements:,} | {mb:.1f} ({args.dtype}) |")


if __name__ == "__main__":
    main()
