"""Files users bring, written from tiny random models: original-layout single-file checkpoints,
LoRAs (kohya/A1111 and diffusers formats) and textual-inversion embeddings.

``original_checkpoint`` is the inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written once here from the models' structure, so a test can
load the file back through diffusers and compare.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def unet_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module name -> original (sgm/ldm) module name, for every UNet module with
    weights: the block numbering of ``input_blocks`` / ``middle_block`` / ``output_blocks``."""
    per_block = unet.config.layers_per_block + 1
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            i = 1 + b * per_block + j
            names[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if getattr(block, "attentions", None):
                names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if block.downsamplers:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = (
                f"input_blocks.{(b + 1) * per_block}.0.op"
            )
    for b, block in enumerate(unet.up_blocks):
        attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            names[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{b * per_block + j}.0"
            if attention:
                names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{b * per_block + j}.1"
        if block.upsamplers:
            last = (b + 1) * per_block - 1
            names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{last}.{1 + attention}.conv"
    return names


def _renamed(state: dict[str, torch.Tensor], names: dict[str, str], inner: dict[str, str]):
    """Keys renamed by their longest module prefix in ``names``; inside resnets (``inner``)
    the first part of the rest is renamed too."""
    out = {}
    for key, tensor in state.items():
        prefix = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1 :]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            head, _, tail = rest.partition(".")
            rest = f"{inner.get(head, head)}.{tail}"
        out[f"{names[prefix]}.{rest}"] = tensor
    return out


def original_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = unet.state_dict()
    return {
        f"model.diffusion_model.{k}": v
        for k, v in _renamed(state, unet_module_names(unet), UNET_RESNET).items()
    }


def original_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    names = {}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            names[f"{part}.{name}"] = f"{part}.{name}"
        names[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        names[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for k in range(2):
            names[f"{part}.mid_block.resnets.{k}"] = f"{part}.mid.block_{k + 1}"
    for i in range(blocks):
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
            f"decoder.up.{blocks - 1 - i}.upsample.conv"
        )
        for j in range(3):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{blocks - 1 - i}.block.{j}"
    for name in ("quant_conv", "post_quant_conv"):
        names[name] = name
    out = {}
    for key, tensor in _renamed(vae.state_dict(), names, {"conv_shortcut": "nin_shortcut"}).items():
        if ".mid.attn_1." in key:  # 1x1 convolutions in the original
            for theirs, mine in VAE_ATTENTION.items():
                key = key.replace(f".attn_1.{theirs}.", f".attn_1.{mine}.")
            tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
        out[f"first_stage_model.{key}"] = tensor
    return out


def _clip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights with their ``text_model.`` prefix (which
    ``CLIPTextModel`` no longer has in recent transformers)."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
        for k, v in encoder.state_dict().items()
    }


def original_clip(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP as the original checkpoints keep it: transformers' own names."""
    return {f"{prefix}transformer.{k}": v for k, v in _clip_state(encoder).items()}


def original_open_clip(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's layout: fused q/k/v ``in_proj``, ``resblocks``, a (hidden, proj) projection."""
    state = {k.removeprefix("text_model."): v for k, v in _clip_state(encoder).items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for theirs, mine in OPEN_CLIP_LAYER.items():
                out[f"{block}{mine}.{kind}"] = state.pop(f"{layer}{theirs}.{kind}")
    assert not state, f"unconverted text encoder weights: {sorted(state)[:3]}"
    return {prefix + k: v for k, v in out.items()}


def original_checkpoint(parts) -> dict[str, torch.Tensor]:
    """All weights of a tiny SD 1.5 / 2.1 / SDXL model in the original single-file layout:
    SD 1.x keeps OpenAI CLIP, SD 2.x OpenCLIP (``cond_stage_model``), SDXL both
    (``conditioner.embedders.0`` / ``.1``)."""
    out = {**original_unet(parts.unet), **original_vae(parts.vae)}
    if getattr(parts, "text_encoder_2", None) is not None:
        out.update(original_clip(parts.text_encoder, "conditioner.embedders.0."))
        out.update(original_open_clip(parts.text_encoder_2, "conditioner.embedders.1.model."))
    elif parts.unet.config.use_linear_projection:  # SD 2.x
        out.update(original_open_clip(parts.text_encoder, "cond_stage_model.model."))
    else:
        out.update(original_clip(parts.text_encoder, "cond_stage_model."))
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_original_checkpoint(parts, path: Path) -> Path:
    save_file(original_checkpoint(parts), str(path))
    return path


# -- LoRAs ------------------------------------------------------------------------------------


def random_lora(parts, rank: int = 2, seed: int = 0, std: float = 0.3):
    """Random low-rank (down, up) pairs for every attention projection of the UNet and the
    text encoder(s): {(component, diffusers module name): (down (r, in), up (out, r))}."""
    g = torch.Generator().manual_seed(seed)
    components = {"unet": parts.unet, "text_encoder": parts.text_encoder}
    if getattr(parts, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = parts.text_encoder_2
    targets = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
    pairs = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                if component != "unet":
                    name = name if name.startswith("text_model.") else f"text_model.{name}"
                down = torch.randn(rank, module.in_features, generator=g) * std
                up = torch.randn(module.out_features, rank, generator=g) * std
                pairs[component, name] = (down, up)
    return pairs


def save_diffusers_lora(pairs, path: Path) -> Path:
    """diffusers/peft format: ``unet.<module>.lora_A.weight`` (alpha = rank: scale 1)."""
    tensors = {}
    for (component, name), (down, up) in pairs.items():
        tensors[f"{component}.{name}.lora_A.weight"] = down
        tensors[f"{component}.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def save_kohya_lora(pairs, path: Path, unet: torch.nn.Module | None = None) -> Path:
    """kohya-ss / A1111 format: ``lora_unet_<module with _>.lora_down.weight`` plus ``.alpha``;
    given the ``unet`` (SDXL), UNet modules get the original (sgm) names kohya trains SDXL on."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    if unet is not None:
        prefixes["text_encoder"] = "lora_te1_"
        sgm = unet_module_names(unet)
    tensors = {}
    for (component, name), (down, up) in pairs.items():
        if component == "unet" and unet is not None:
            prefix = max((p for p in sgm if name.startswith(p + ".")), key=len)
            name = sgm[prefix] + name[len(prefix) :]
        key = prefixes[component] + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(tensors, str(path))
    return path


# -- textual-inversion embeddings ---------------------------------------------------------------


def save_embedding(path: Path, vectors: dict[str, torch.Tensor]) -> Path:
    """An embedding file: {"<token>": (n, d)} (diffusers), {"emb_params": (n, d)} (A1111) or
    {"clip_l": ..., "clip_g": ...} (SDXL)."""
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
    return path
