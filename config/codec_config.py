"""Codec VAE config: architecture (the original `ResNetStack`/`GaussianZ` fields) and training.

`hertz_dev` is exactly the official codec (`inference_apatosaurus_95000.pt`). `tiny` trains in
seconds on a CPU; `small` is a one-GPU model. Every preset keeps 2000 samples per latent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# Fields that define the network; a checkpoint whose values differ cannot be loaded into it.
ARCH_FIELDS = ("input_channels", "output_channels", "encode_channels", "decode_channel_multiplier",
               "kernel_size", "bias", "channel_ratios", "strides", "latent_dim", "norm_stddev",
               "weight_norm", "sample_rate")


@dataclass(frozen=True)
class CodecConfig:
    # --- architecture -------------------------------------------------------------------------
    input_channels: int = 1
    output_channels: int = 1
    encode_channels: int = 16                   # encoder width at the waveform end
    decode_channel_multiplier: int = 4          # decoder is this much wider than the encoder
    kernel_size: int = 7
    bias: bool = True
    channel_ratios: tuple[int, ...] = (4, 8, 16, 16, 16, 16)
    strides: tuple[int, ...] = (2, 2, 4, 5, 5, 5)   # product 2000: 8 latents/s at 16 kHz
    latent_dim: int = 32
    norm_stddev: float = 0.05                   # audio is divided by this before the encoder
    weight_norm: bool = True
    sample_rate: int = 16000

    # --- data ---------------------------------------------------------------------------------
    train_data_path: str = "data/demo/train"
    val_data_path: str = "data/demo/val"
    segment_seconds: float = 6.0                # random crops for training, fixed crops for val
    num_workers: int = 2

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = 32
    grad_accum_steps: int = 1
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    max_steps: int = 100_000
    weight_decay: float = 0.01
    beta1: float = 0.8
    beta2: float = 0.99
    grad_clip: float = 1.0

    # --- run ----------------------------------------------------------------------------------
    log_interval: int = 50
    eval_interval: int = 1000
    save_interval: int = 1000
    checkpoint_dir: str = "checkpoints/codec"
    device: str = "cuda"
    dtype: str = "bfloat16"
    compile: bool = False
    seed: int = 1337
    init_from: Optional[str] = None             # None, "official" or a path to one of ours
    resume: bool = True
    eval_only: bool = False
    wandb: str = "offline"                      # online | offline | disabled


hertz_dev = CodecConfig()

small = dataclasses.replace(
    hertz_dev,
    encode_channels=16, decode_channel_multiplier=2,
    batch_size=32, learning_rate=2e-4, warmup_steps=500, max_steps=50_000,
)

tiny = dataclasses.replace(
    hertz_dev,
    encode_channels=4, decode_channel_multiplier=1, channel_ratios=(1, 2, 4, 4, 4, 4),
    batch_size=4, segment_seconds=1.0, learning_rate=1e-3, min_lr=1e-4, warmup_steps=5,
    max_steps=20, log_interval=5, eval_interval=10, save_interval=10,
    device="cpu", dtype="float32", num_workers=0,
)

PRESETS = {"tiny": tiny, "small": small, "hertz_dev": hertz_dev}
