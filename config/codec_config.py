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
from dataclasses import dataclass, field
from typing import Literal, Optional

from config import COUNT, DEVICE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, WINDOW, PATH, ConfigError

# Marks on the fields (`fields_marked`, `config_diff` in config/__init__.py):
ARCH = {"arch": True}          # the codec network: a checkpoint that differs cannot be loaded into it
DISC = {"disc": True}          # the discriminators: a resumed run must agree; init_from loads them if equal
RESUME = {"resume": True}      # fixes the data order (counted in micro-batches): a resumed run must agree
SCHEDULE = {"schedule": True}  # may change on resume, with a note


@dataclass(frozen=True)
class CodecConfig:
    # --- architecture -------------------------------------------------------------------------
    input_channels: int = field(default=1, metadata={**ARCH, **COUNT})
    output_channels: int = field(default=1, metadata={**ARCH, **COUNT})
    encode_channels: int = field(default=16, metadata={**ARCH, **COUNT})  # encoder width at the waveform end
    decode_channel_multiplier: int = field(default=4, metadata={**ARCH, **COUNT})  # decoder is this much wider
    kernel_size: int = field(default=7, metadata={**ARCH, **COUNT})
    bias: bool = field(default=True, metadata=ARCH)
    channel_ratios: tuple[int, ...] = field(default=(4, 8, 16, 16, 16, 16), metadata={**ARCH, **COUNT})
    # product 2000: 8 latents/s
    strides: tuple[int, ...] = field(default=(2, 2, 4, 5, 5, 5), metadata={**ARCH, **COUNT})
    latent_dim: int = field(default=32, metadata={**ARCH, **COUNT})
    # audio is divided by this first (its standard deviation); >= one 16-bit step, 2 ** -15: below it no
    # audio's, and 1e-30 made the latents infinite (a NaN loss at step 0, blamed on the data)
    norm_stddev: float = field(default=0.05, metadata={**ARCH, "min": 2 ** -15})
    weight_norm: bool = field(default=True, metadata=ARCH)
    # the residual units' activation: ELU (the original's) or Snake (x + sin^2(a x) / a with a learned
    # frequency a per channel, BigVGAN's and DAC's: a periodic bias for voiced speech's harmonics)
    activation: Literal["elu", "snake"] = field(default="elu", metadata=ARCH)
    sample_rate: int = field(default=16000, metadata={**ARCH, **COUNT})

    # --- data ---------------------------------------------------------------------------------
    # a folder of audio files, or a .jsonl manifest of them; `~` is expanded in every path (PATH)
    train_data_path: str = field(default="data/demo/train", metadata=PATH)
    val_data_path: str = field(default="data/demo/val", metadata=PATH)
    segment_seconds: float = field(default=6.0, metadata={**RESUME, **POSITIVE})  # random crops to train, fixed for val
    # validation crops, if not segment_seconds (0): comparable figures
    val_segment_seconds: float = field(default=0.0, metadata=NON_NEGATIVE)
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)
    # decode a corpus into RAM (float32) up to this size; 0: stream
    preload_max_gb: float = field(default=4.0, metadata=NON_NEGATIVE)
    val_crops: int = field(default=128, metadata=COUNT)  # at most this many validation crops (STOI runs on CPU)
    val_mos: bool = False                       # DNSMOS column too (pip install speechmos onnxruntime librosa)

    # --- recipe: losses and their weights (total = sum of weight * loss) ----------------------
    mel_weight: float = field(default=15.0, metadata=NON_NEGATIVE)
    kl_weight: float = field(default=1e-4, metadata=NON_NEGATIVE)  # KL per latent (summed over its 32 dims)
    adv_weight: float = field(default=1.0, metadata=NON_NEGATIVE)
    feature_weight: float = field(default=2.0, metadata=NON_NEGATIVE)
    gan_loss: Literal["lsgan", "hinge"] = "lsgan"      # least-squares (HiFi-GAN, DAC) or hinge (MelGAN)
    # hop = window / 4
    mel_windows: tuple[int, ...] = field(default=(32, 64, 128, 256, 512, 1024, 2048), metadata=WINDOW)
    mel_bins: tuple[int, ...] = field(default=(5, 10, 20, 40, 80, 160, 320), metadata=COUNT)  # one per window
    # phase-aware terms, off by default (DAC has none; EnCodec has a waveform L1): the mel loss is
    # blind to phase, these are not (SI-SDR); 0 leaves the term out of the loss and the logs
    wave_weight: float = field(default=0.0, metadata=NON_NEGATIVE)  # waveform L1 over real samples
    # complex-STFT L1, relative to the reference's magnitude
    stft_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    # its STFT windows, hop = window / 4
    stft_windows: tuple[int, ...] = field(default=(128, 512, 2048), metadata=WINDOW)
    # log-magnitude STFT L1 in every bin, off by default: blind to phase like the mel loss, but fine enough
    # at these windows to resolve the low band's harmonics, whose magnitude costs the codec's PESQ most
    # (README, "A codec taken apart"); 0 leaves the term out of the loss and the logs
    logmag_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    logmag_windows: tuple[int, ...] = field(default=(1024, 2048), metadata=WINDOW)  # hop = window / 4

    # --- discriminators -------------------------------------------------------------------------
    mpd_periods: tuple[int, ...] = field(default=(2, 3, 5, 7, 11), metadata={**DISC, **COUNT})  # HiFi-GAN multi-period
    mpd_channels: tuple[int, ...] = field(default=(32, 128, 512, 1024, 1024), metadata={**DISC, **COUNT})
    # DAC multi-res. complex STFT; >= 18: its lowest band, a tenth of the window / 2 + 1 bins, holds one
    mrd_windows: tuple[int, ...] = field(default=(2048, 1024, 512), metadata={**DISC, "min": 18})
    mrd_channels: int = field(default=32, metadata={**DISC, **COUNT})
    # adversarial losses and D updates from here
    disc_start_step: int = field(default=0, metadata={**SCHEDULE, **NON_NEGATIVE})
    # follows the generator's schedule, scaled
    disc_learning_rate: float = field(default=1e-4, metadata={**SCHEDULE, **NON_NEGATIVE})
    disc_grad_clip: float = field(default=10.0, metadata=NON_NEGATIVE)
    # on CUDA, the discriminators' bias + leaky ReLU and feature matching as Triton kernels: fewer
    # passes over their activations on the GPU (small, 6 s crops: +12%), two launches from Python a
    # layer on the host (2 s crops, a step the host already bounds: slower); same values up to rounding
    disc_kernels: bool = True

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = field(default=32, metadata={**RESUME, **COUNT})
    grad_accum_steps: int = field(default=1, metadata={**RESUME, **COUNT})
    learning_rate: float = field(default=1e-4, metadata={**SCHEDULE, **NON_NEGATIVE})
    min_lr: float = field(default=1e-5, metadata={**SCHEDULE, **NON_NEGATIVE})
    warmup_steps: int = field(default=1000, metadata={**SCHEDULE, **NON_NEGATIVE})
    max_steps: int = field(default=100_000, metadata={**SCHEDULE, **COUNT})
    weight_decay: float = field(default=0.01, metadata=NON_NEGATIVE)
    beta1: float = field(default=0.8, metadata=FRACTION)
    beta2: float = field(default=0.99, metadata=FRACTION)
    grad_clip: float = field(default=1.0, metadata=NON_NEGATIVE)
    # an exponential moving average of the codec's weights, updated after each step (0: none); with
    # one, validation, best.pt's ranking and the .safetensors exports use the average (the .pt
    # states hold both), and val_raw=true also scores the training weights (val_raw/...; twice the
    # evaluation time)
    ema_decay: float = field(default=0.0, metadata={**SCHEDULE, **FRACTION})
    val_raw: bool = False

    # --- run ----------------------------------------------------------------------------------
    log_interval: int = field(default=50, metadata=COUNT)
    eval_interval: int = field(default=1000, metadata=COUNT)
    save_interval: int = field(default=1000, metadata=COUNT)  # also saved after every evaluation and at the end
    # step_*.pt files kept (latest and best always kept); 0: every one
    keep_checkpoints: int = field(default=3, metadata=NON_NEGATIVE)
    # stop (eval + save) at the first step past this wall time; 0: never
    max_minutes: float = field(default=0.0, metadata=NON_NEGATIVE)
    # stop (eval + save) at this step; 0: at max_steps. The schedule still ends at max_steps, so runs
    # of one recipe stopped early compare at equal steps, and a stopped run continues when run again
    stop_step: int = field(default=0, metadata=NON_NEGATIVE)
    # input/reconstruction pairs logged at each evaluation
    num_audio_samples: int = field(default=3, metadata=NON_NEGATIVE)
    # the run folder: checkpoints, metrics, plots, samples
    checkpoint_dir: str = field(default="checkpoints/codec", metadata=PATH)
    device: str = field(default="cuda", metadata=DEVICE)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    compile: bool = False                       # torch.compile the generator (small, H200: ~150 s, then 10% faster)
    # on CUDA, each training pass (forward, losses, backward) replayed from a CUDA graph: one launch
    # instead of each kernel's from Python, for steps the host bounds (2 s crops); in one process,
    # not under float16's loss scale (eager there)
    cuda_graph: bool = False
    seed: int = field(default=1337, metadata={**RESUME, **SEED})
    init_from: Optional[str] = field(default=None, metadata=PATH)  # None, "official" or a path to one of ours
    resume: bool = True
    eval_only: bool = False
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "hertz-dev-codec"

    def check_architecture(self) -> None:
        """ConfigError naming the fields whose values contradict each other in the codec they build
        (an assertion when it is built): what the loaders (`config.from_dict`, a checkpoint's header)
        and train_codec.py both check."""
        if len(self.strides) != len(self.channel_ratios):
            raise ConfigError(f"strides={self.strides} and channel_ratios={self.channel_ratios} need one item per "
                              "encoder block each")


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

# `small`'s architecture and discriminators with a recipe for short runs (minutes on one GPU), so
# a checkpoint of either can init_from the other. Argued in README (Training the codec, Recipe):
# - 2 s crops (DAC 0.38 s, HiFi-GAN 0.5 s): a third of the compute per step, 3x the updates per
#   GPU-second; 16 latents per crop still cover the decoder's context;
# - learning rate 5e-4 with a 200-step warmup (small: 2e-4 after 500; HiFi-GAN 2e-4, EnCodec 3e-4,
#   DAC 1e-4 for 400k steps): a 15-minute run is limited by its number of updates (small's mel
#   distance was still falling steadily when its proof stopped), and grad_clip=1 guards the rate;
# - batch 16 (small: 32): at this budget updates count more than audio per update; a step of 16
#   crops took 0.080 s against 32's 0.137 s once the discriminators start (the step is bound by
#   launching its kernels, not by its audio), and 15 minutes of it beat 15 minutes of batch 32 on
#   every metric (one H100: 9,000 steps, STOI 0.869, PESQ 1.56 against 5,725, 0.858, 1.48;
#   benchmarks/results/h100_session39.txt); batch 8 gained nothing more at 6.5 minutes;
# - max_steps 9000: what 15 minutes hold at that step on one GPU with the step replayed from a
#   CUDA graph (the proof of 2026-12-07 on an H100 reached it after 13.9 minutes), so the cosine
#   decay ends near the end of such a run;
# - mel loss alone for the first 400 steps (disc_start_step): without the discriminators a step
#   costs about 40% of one with them, and the adversarial terms only refine a decoder that
#   already reconstructs the spectrum (HiFi-GAN and DAC start them at 0 on runs 1000x longer);
# - the adversarial side at twice DAC's weights (adversarial 2, feature matching 4, mel 15): what
#   asks for a self-consistent phase, which PESQ rewards; at equal steps it was ahead on STOI,
#   PESQ and SI-SDR (session 18), and its 15-minute run is the best so far (session 29);
# - cuda_graph: a 2 s crop's step is bound by the host launching each kernel; one graph replay
#   instead: 234 samples/s against 200-213 eagerly once the discriminators start (H100, 2026-12-06,
#   benchmarks/results/h100_session29.txt);
# - no discriminator kernels: with an eager step they add launches on the host (H200: 0.24-0.26 s a
#   step with them, 0.17-0.18 without; benchmarks/results/h200_session21.txt);
# - the rest is DAC's: AdamW betas (0.8, 0.99).
small_fast = dataclasses.replace(
    small,
    segment_seconds=2.0, val_segment_seconds=6.0, batch_size=16, learning_rate=5e-4, disc_learning_rate=5e-4, min_lr=5e-5,
    warmup_steps=200, max_steps=9000, disc_start_step=400, num_workers=6, disc_kernels=False, cuda_graph=True,
    adv_weight=2.0, feature_weight=4.0, log_interval=25, eval_interval=500, save_interval=500,
)

PRESETS = {"tiny": tiny, "small": small, "small_fast": small_fast, "hertz_dev": hertz_dev}
