"""Tiny, randomly initialised Stable Diffusion models for tests, benchmarks and demos.

No weights can be downloaded where this project is tested, and the method's invariants
(correspondences, injection, extended attention, determinism, frame counts) do not depend on
what the weights are, only on the layout. So these models have Stable Diffusion 2.1's exact block
layout -- 4 down blocks (3 with cross attention), a cross-attention mid block, 4 up blocks
(3 with cross attention), 2 layers per block, linear-projection transformers, a factor-8 VAE,
a CLIP text encoder and an offline byte-level CLIP tokenizer -- with very few channels, built
in code from a fixed seed.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


def _by_size(names: tuple[str, ...], **fields: tuple) -> dict[str, dict]:
    """A table of model sizes written field by field (one value per size, in ``names`` order),
    so the sizes can be compared side by side."""
    return {name: {k: values[i] for k, values in fields.items()} for i, name in enumerate(names)}


#: Channel and head counts per size; ``sd21`` is SD-2.1-base's real architecture.
SIZES: dict[str, dict] = _by_size(
    ("tiny", "mid", "sd21"),
    unet_channels=((32, 64, 64, 64), (64, 128, 256, 256), (320, 640, 1280, 1280)),
    unet_heads=((2, 4, 4, 4), (2, 4, 8, 8), (5, 10, 20, 20)),
    unet_groups=(16, 32, 32),
    vae_channels=((16, 32, 32, 32), (32, 64, 64, 64), (128, 256, 512, 512)),
    vae_groups=(8, 16, 32),
    text_hidden=(32, 128, 1024),
    text_layers=(2, 4, 23),
    text_heads=(4, 4, 16),
    text_ffn=(64, 512, 4096),
)

#: SD 2.1-base's scheduler settings.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


@dataclass
class TinyStableDiffusion:
    """The five components of a Stable Diffusion pipeline."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    def save(self, folder: str | Path) -> Path:
        """Save as a diffusers folder (safetensors) that ``--model`` loads like a real model."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        folder = Path(folder)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's BPE uses for raw bytes (GPT-2's reversible table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def make_tokenizer(pad_token: str = "!", max_length: int = 77):
    """An offline CLIP tokenizer: byte-level vocabulary, no merges, SD 2.x's ``!`` padding."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(
            json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8"
        )
        (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "model_max_length": max_length,
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": pad_token,
                }
            ),
            "utf-8",
        )
        return CLIPTokenizer.from_pretrained(folder)


#: What every family's UNet shares: 4 latent channels in and out, SD's timestep embedding.
_LATENT_UNET = dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0)


def sd_unet_config(size: str = "tiny", version: str = "2.1") -> dict:
    """``UNet2DConditionModel`` arguments of SD 2.1's layout (SD 1.5's: ``version="1.5"``)."""
    cfg = SIZES[size]
    return dict(
        **_LATENT_UNET,
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=cfg["unet_channels"],
        layers_per_block=2,
        norm_num_groups=cfg["unet_groups"],
        cross_attention_dim=cfg["text_hidden"],
        attention_head_dim=cfg["unet_heads"],
        use_linear_projection=version != "1.5",
    )


def make_tiny_sd(size: str = "tiny", seed: int = 0, version: str = "2.1") -> TinyStableDiffusion:
    """A random SD-2.1-structured model; the same ``size`` and ``seed`` give the same weights.

    ``version="1.5"`` gives SD 1.5's differences instead: convolutional projections in the
    transformers (``proj_in``/``proj_out``) and ``<|endoftext|>`` padding.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if version not in ("1.5", "2.1"):
        raise ValueError(f"unknown SD version {version!r}; choose 1.5 or 2.1")
    cfg = SIZES[size]

    torch.manual_seed(seed)
    text_encoder = _text_encoder(
        CLIPTextModel, cfg["text_hidden"], cfg["text_ffn"], cfg["text_layers"], cfg["text_heads"]
    )

    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**sd_unet_config(size, version)).eval()

    torch.manual_seed(seed + 2)
    vae = _vae(cfg["vae_channels"], cfg["vae_groups"], scaling_factor=0.18215)

    return TinyStableDiffusion(
        tokenizer=make_tokenizer("<|endoftext|>" if version == "1.5" else "!"),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


def save_tiny_sd(
    folder: str | Path, size: str = "tiny", seed: int = 0, version: str = "2.1"
) -> Path:
    """Build and save a tiny model folder in one call (tests, benchmarks, demos)."""
    return make_tiny_sd(size, seed, version).save(folder)


def _text_encoder(cls, hidden: int, ffn: int, layers: int, heads: int, projection: int = 0):
    """A random CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection``)."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return cls(config).eval()


def _vae(channels: tuple[int, ...], groups: int, scaling_factor: float):
    """A random factor-8 KL autoencoder with SD's block layout."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=512,
        scaling_factor=scaling_factor,
    ).eval()


# -- SDXL -------------------------------------------------------------------------------------

#: SDXL's layout at a few channel counts; ``sdxl`` is SDXL base 1.0's real architecture (build
#: it on the meta device). Per text encoder: CLIP ViT-L, then OpenCLIP bigG with a projection.
SDXL_SIZES: dict[str, dict] = _by_size(
    ("tiny", "sdxl"),
    unet_channels=((32, 64, 64), (320, 640, 1280)),
    unet_heads=((2, 4, 4), (5, 10, 20)),
    transformer_depth=((1, 2, 3), (1, 2, 10)),
    unet_groups=(16, 32),
    vae_channels=((16, 32, 32, 32), (128, 256, 512, 512)),
    vae_groups=(8, 32),
    # two different widths, as in SDXL: single-file loading tells the encoders apart by it
    text_hidden=((32, 48), (768, 1280)),
    text_ffn=((64, 96), (3072, 5120)),
    text_layers=((2, 2), (12, 32)),
    text_heads=((4, 4), (12, 20)),
    projection=(32, 1280),
    time_embed=(8, 256),
)

#: SDXL base 1.0's scheduler (Euler; the family runs DDIM from the same settings).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def sdxl_unet_config(size: str = "tiny") -> dict:
    """``UNet2DConditionModel`` arguments of SDXL's layout: 3 levels (the first without
    attention), transformer depth growing with depth, and the "text_time" added conditioning
    (pooled text embedding + 6 size/crop ids)."""
    if size not in SDXL_SIZES:
        raise ValueError(f"unknown SDXL size {size!r}; choose one of {sorted(SDXL_SIZES)}")
    cfg = SDXL_SIZES[size]
    return dict(
        **_LATENT_UNET,
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=cfg["unet_channels"],
        layers_per_block=2,
        transformer_layers_per_block=cfg["transformer_depth"],
        attention_head_dim=cfg["unet_heads"],
        cross_attention_dim=sum(cfg["text_hidden"]),
        use_linear_projection=True,
        norm_num_groups=cfg["unet_groups"],
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg["time_embed"],
        projection_class_embeddings_input_dim=cfg["projection"] + 6 * cfg["time_embed"],
    )


@dataclass
class TinyStableDiffusionXL:
    """The seven components of an SDXL pipeline."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    def save(self, folder: str | Path) -> Path:
        """Save as a diffusers SDXL folder (safetensors)."""
        from diffusers import StableDiffusionXLPipeline

        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
        folder = Path(folder)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder


def make_tiny_sdxl(size: str = "tiny", seed: int = 0) -> TinyStableDiffusionXL:
    """A random SDXL-structured model (two text encoders, added conditioning, transformer depth
    above 1); the same ``size`` and ``seed`` give the same weights."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet_config = sdxl_unet_config(size)
    cfg = SDXL_SIZES[size]
    encoders = []
    for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + 10 * i)
        widths = (cfg["text_hidden"][i], cfg["text_ffn"][i], cfg["text_layers"][i])
        projection = cfg["projection"] if i else 0
        encoders.append(_text_encoder(cls, *widths, cfg["text_heads"][i], projection))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config).eval()
    torch.manual_seed(seed + 2)
    vae = _vae(cfg["vae_channels"], cfg["vae_groups"], scaling_factor=0.13025)
    return TinyStableDiffusionXL(
        tokenizer=make_tokenizer("<|endoftext|>"),
        tokenizer_2=make_tokenizer("!"),
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        unet=unet,
        vae=vae,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )


def save_tiny_sdxl(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a tiny SDXL folder in one call."""
    return make_tiny_sdxl(size, seed).save(folder)


def make_tiny_clip(seed: int = 0):
    """A tiny random CLIP model and its processor (32x32 images), for the evaluation tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = make_tokenizer(pad_token="<|endoftext|>", max_length=32)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`make_tiny_clip` as a folder ``tokenflow eval --clip-model`` can load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = make_tiny_clip(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_controlnet(unet: torch.nn.Module, seed: int = 0, std: float = 0.02):
    """A ControlNet for ``unet`` (e.g. the tiny SD's) whose conditioning visibly matters.

    ``ControlNetModel.from_unet`` zero-initialises the conditioning embedding's last conv and
    the residual output convs, so a fresh ControlNet adds exactly nothing; tests need an
    effect, so those are re-initialised with small random weights drawn from ``seed``. The
    layers ``from_unet`` creates are drawn from ``seed`` too, not from whatever state torch's
    global generator is in, so the same ``unet`` and ``seed`` always give the same ControlNet.
    """
    from diffusers import ControlNetModel

    # four stages: the control image is brought down by 8, to the latents' size, whatever the
    # UNet's depth (as ControlNet-SDXL's (16, 32, 96, 256))
    channels = tuple(min(16 * 2**i, 32) for i in range(4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    g = torch.Generator("cpu").manual_seed(seed)
    convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for conv in convs:
            for p in (conv.weight, conv.bias):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    if (unet.device, unet.dtype) != (controlnet.device, controlnet.dtype):
        controlnet = controlnet.to(unet.device, unet.dtype)
    return controlnet.eval()
