"""Single-file checkpoints in the original (non-diffusers) layout, as community fine-tunes ship.

One ``.safetensors`` file holds the UNet (``model.diffusion_model.*``), the VAE
(``first_stage_model.*``) and the text encoder(s): ``cond_stage_model.*`` for SD 1.x/2.x,
``conditioner.embedders.{0,1}.*`` for SDXL. Which model it is can be told from the header's
tensor names and shapes alone, in milliseconds and without unpickling anything; loading goes
through diffusers' ``from_single_file``, with the component configs and tokenizers read from
``model_config`` (a diffusers folder of the same base model) or fetched from the Hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import TokenFlowError
from ..loading import first_line, tensor_shapes

UNET = "model.diffusion_model."
#: the diffusers pipeline a checkpoint of each kind loads as (what ``claims`` is asked about)
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
#: text-conditioning widths (the UNet's cross-attention input) of the released base models
WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def width_name(width: int) -> str:
    """``768 (SD 1.x)`` for a known base model's width, else just the number."""
    return f"{width} ({WIDTHS[width]})" if width in WIDTHS else str(width)


def checkpoint_kind(path: Path) -> str:
    """``"sd"`` or ``"sdxl"`` from the header; one-line errors for what TokenFlow cannot edit
    with (SDXL refiner, inpainting models) and for files that are not a model at all."""
    shapes = tensor_shapes(path)
    keys = list(shapes)
    if any("lora_" in k or ".lora." in k for k in keys):
        raise TokenFlowError(f"{path} is a LoRA, not a model: give it as `lora` FILE[:SCALE]")
    if not any(k.startswith(UNET) for k in keys):
        hint = (
            "; it looks like one model in diffusers' layout: pass the whole diffusers folder"
            if any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in keys)
            else ""
        )
        raise TokenFlowError(
            f"{path} has no UNet weights in the original layout (model.diffusion_model.*): not"
            f" a Stable Diffusion checkpoint{hint}"
        )
    first_conv = shapes.get(f"{UNET}input_blocks.0.0.weight", (0, 4))
    if len(first_conv) == 4 and first_conv[1] != 4:
        raise TokenFlowError(
            f"{path} is an inpainting (or depth) checkpoint: its UNet takes {first_conv[1]} input"
            " channels; TokenFlow needs a text-to-image model"
        )
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise TokenFlowError(
            f"{path} is an SDXL refiner checkpoint (one OpenCLIP text encoder, aesthetic-score"
            " conditioning); TokenFlow needs SDXL base 1.0 or a fine-tune of it"
        )
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    return "sd"


def checkpoint_width(path: Path) -> int | None:
    """The UNet's text-conditioning width (input of a cross-attention key projection)."""
    pattern = re.compile(re.escape(UNET) + r".*attn2\.to_k\.weight")
    for key, shape in tensor_shapes(path).items():
        if pattern.fullmatch(key) and len(shape) == 2:
            return shape[1]
    return None


def check_config_fits(path: Path, config: str) -> None:
    """A ``model_config`` folder whose UNet conditioning width differs from the file's is
    the wrong base model (an SD 1.5 config for an SD 2.1 fine-tune): say so before loading."""
    unet_config = Path(config).expanduser() / "unet" / "config.json"
    try:
        theirs = json.loads(unet_config.read_text("utf-8")).get("cross_attention_dim")
    except (OSError, ValueError):
        return  # diffusers names a missing or damaged config when it loads
    mine = checkpoint_width(path)
    if isinstance(theirs, int) and mine is not None and mine != theirs:
        raise TokenFlowError(
            f"{path} has {width_name(mine)}-wide text conditioning but `model_config` {config} is"
            f" a model with {width_name(theirs)}; give the diffusers folder of the checkpoint's"
            " own base model"
        )


def load_single_file(pipeline_cls, path: Path, config: str | None, kwargs: dict[str, Any]):
    """``pipeline_cls.from_single_file``: configs from ``config`` when given, else the Hub
    (when it can be reached); one-line errors either way."""
    from ..hub import can_download

    online = can_download()
    kwargs = dict(kwargs, local_files_only=not online)
    if config is not None:
        kwargs["config"] = str(Path(config).expanduser())
    try:
        return pipeline_cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here
        if config is None and not online:
            raise TokenFlowError(
                f"could not load {path}: a single file carries no component configs or"
                " tokenizer, those of its base model are not in the Hugging Face cache, and the"
                " Hub cannot be reached; give `model_config` (a diffusers folder of the same"
                " base model)"
            ) from exc
        raise TokenFlowError(
            f"could not load {path} as a single-file checkpoint "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from exc
