"""Which UNet layers TokenFlow acts on, read from the model's own structure.

The authors name these layers by index (``up_blocks[1].attentions[1]`` ...). We derive the same
set from the layout instead, so the rule is written once and holds for SD 1.x/2.x and SDXL:

* every self-attention (``attn1``) of every transformer block runs extended attention / token
  propagation (16 layers in SD 1.x/2.x, 70 in SDXL);
* PnP's query/key injection acts on the decoder's self-attention layers, all but the first
  transformer of the lowest-resolution decoder block that has attention, at every depth of each
  transformer (8 layers in SD 1.x/2.x, whose transformers are one block deep; in SDXL the
  transformers ``up_blocks[0].attentions[1, 2]`` (10 deep) and ``up_blocks[1].attentions[0..2]``
  (2 deep), 26 layers: see docs/sdxl.md for why);
* PnP's residual-feature injection acts on the second resnet of that same decoder block
  (``up_blocks[1].resnets[1]`` in SD 1.x/2.x, ``up_blocks[0].resnets[1]`` in SDXL: both at 1/32
  of the image's side, 16² at SD's 512², 32² at SDXL's 1024²).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TokenFlowLayers:
    """Module names (as in ``unet.named_modules()``) of the layers TokenFlow touches."""

    self_attention: tuple[str, ...]
    qk_injection: tuple[str, ...]
    residual_injection: str


def _self_attention_names(module: nn.Module, prefix: str) -> list[str]:
    return [
        f"{prefix}.{name}" if prefix else name
        for name, _ in module.named_modules()
        if name.endswith("attn1")
    ]


def find_layers(unet: nn.Module) -> TokenFlowLayers:
    """Locate the self-attention and PnP injection layers of a Stable Diffusion (XL) UNet."""
    decoder_with_attention = [
        i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)
    ]
    if not decoder_with_attention:
        raise ValueError("this UNet's decoder has no attention blocks: not a Stable Diffusion UNet")
    first = decoder_with_attention[0]
    first_block = unet.up_blocks[first]
    if len(first_block.resnets) < 2:
        raise ValueError("the first decoder attention block has fewer than 2 resnets")

    qk: list[str] = []
    for i in decoder_with_attention:
        for j, attention in enumerate(unet.up_blocks[i].attentions):
            if i == first and j == 0:
                continue  # PnP leaves the first layer of the lowest resolution alone
            qk += _self_attention_names(attention, f"up_blocks.{i}.attentions.{j}")

    return TokenFlowLayers(
        self_attention=tuple(_self_attention_names(unet, "")),
        qk_injection=tuple(qk),
        residual_injection=f"up_blocks.{first}.resnets.1",
    )
