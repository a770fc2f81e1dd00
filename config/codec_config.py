"""Codec VAE config: architecture (the original `ResNetStack`/`GaussianZ` fields), the training
recipe (losses, their weights, the discriminators) and the run.

`hertz_dev` is exactly the official codec (`inference_apatosaurus_95000.pt`). `tiny` trains in
seconds on a CPU; `small` is a one-GPU model. Every preset keeps 2000 samples per latent.

The recipe follows DAC (descript-audio-codec) and HiFi-GAN: a multi-resolution log-mel L1 loss
(DAC's seven windows and weight 15), LSGAN adversarial losses from multi-period (HiFi-GAN) and
multi-resolution complex-STFT (DAC) discriminators with feature matching (weights 1 and 2), plus
a small KL term that keeps the latent Gaussian.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# Fields that define the network; a checkpoint whose values differ cannot be loaded into it.
ARCH_FIELDS = ("input_channels", "output_channels", "encode_channels", "decode_channel_multiplier",
               "kernel_size", "bias", "channel_ratios", "strides", "latent_dim", "norm_stddev",
               "weight_norm", "sample_rate")
# Fields that define the discriminators (checked when a run resumes).
DISC_ARCH_FIELDS = ("mpd_periods", "mpd_channels", "mrd_windows", "mrd_channels")


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
    val_crops: int = 128                        # at most this many validation crops (STOI runs on CPU)

    # --- recipe: losses and their weights (total = sum of weight * loss) ----------------------
    mel_weight: float = 15.0
    kl_weight: float = 1e-4                     # KL per latent (summed over its 32 dims)
    adv_weight: float = 1.0
    feature_weight: float = 2.0
    gan_loss: str = "lsgan"                     # lsgan | hinge
    mel_windows: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)   # hop = window / 4
    mel_bins: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320)            # one per window

    # --- discriminators -------------------------------------------------------------------------
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)           # HiFi-GAN multi-period
    mpd_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    mrd_windows: tuple[int, ...] = (2048, 1024, 512)          # DAC multi-resolution complex STFT
    mrd_channels: int = 32
    disc_start_step: int = 0                    # adversarial losses and D updates from this step
    disc_learning_rate: float = 1e-4            # follows the generator's schedule, scaled
    disc_grad_clip: float = 10.0

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
    save_interval: int = 1000                   # also saved after every evaluation and at the end
    keep_checkpoints: int = 3                   # step_*.pt files kept (latest and best always kept)
    max_minutes: float = 0.0                    # stop cleanly (eval + save) after this wall time; 0: never
    num_audio_samples: int = 3                  # input/reconstruction pairs logged at each evaluation
    checkpoint_dir: str = "checkpoints/codec"   # the run folder: checkpoints, metrics, plots, samples
    device: str = "cuda"
    dtype: str = "bfloat16"
    compile: bool = False
    seed: int = 1337
    init_from: Optional[str] = None             # None, "official" or a path to one of ours
    resume: bool = True
    eval_only: bool = False
    wandb: str = "offline"                      # online | offline | disabled
    wandb_project: str = "hertz-dev-codec"


hertz_dev = CodecConfig()

small = dataclasses.replace(
    hertz_dev,
    encode_channels=16, decode_channel_multiplier=2,
    batch_size=32, learning_rate=2e-4, disc_learning_rate=2e-4, warmup_steps=500, max_steps=50_000,
)

tiny = dataclasses.replace(
    hertz_dev,
    encode_channels=4, decode_channel_multiplier=1, channel_ratios=(1, 2, 4, 4, 4, 4),
    batch_size=4, segment_seconds=1.0, learning_rate=1e-3, min_lr=1e-4, warmup_steps=5,
    max_steps=20, log_interval=5, eval_interval=10, save_interval=10,
    device="cpu", dtype="float32", num_workers=0, val_crops=16, num_audio_samples=2,
    mpd_channels=(4, 8, 16, 16, 16), mrd_windows=(512, 128), mrd_channels=4, disc_learning_rate=1e-3,
)

PRESETS = {"tiny": tiny, "small": small, "hertz_dev": hertz_dev}
