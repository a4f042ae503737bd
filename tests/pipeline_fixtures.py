"""A diffusers StableDiffusionLatentUpscalePipeline folder with random weights in shrunk real configs."""

import json
from pathlib import Path

import torch

from conftest import SPEC


def small_unet_config() -> dict:
    config = json.loads((SPEC / "unet_config.json").read_text())
    config.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=8,
                  cross_attention_dim=32, time_cond_proj_dim=128 + 32)
    return config


def small_vae_config() -> dict:
    config = json.loads((SPEC / "vae_config.json").read_text())
    config.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=16)
    return config


def small_text_config() -> dict:
    config = json.loads((SPEC / "text_encoder_config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
    return config


def make_diffusers_pipeline(folder: Path, unet_config=None, vae_config=None, text_config=None) -> Path:
    """Save a random-weight pipeline (real classes, real tokenizer vocabulary) with save_pretrained."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentup.text.tokenizer import write_hf_tokenizer_files

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config or small_unet_config())
    with torch.no_grad():  # diffusers initialises conv_out like any conv; make the output clearly non-trivial
        unet.conv_out.weight.mul_(20)
    vae = AutoencoderKL.from_config(vae_config or small_vae_config())
    text = CLIPTextModel(CLIPTextConfig(**(text_config or small_text_config())))
    tokenizer = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(folder / "_tok"))
    scheduler = EulerDiscreteScheduler.from_config(json.loads((SPEC / "scheduler_config.json").read_text()))
    pipe = StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"
