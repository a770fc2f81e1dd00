"""Transformer config: the latent quantizer, the latent LM and the resynthesizer, mono or duplex.

`hertz_dev` is exactly the official architecture (`duplex=true`: scion + care; `duplex=false`:
caraway/syrup + whip; volcano is the quantizer of both). `tiny` trains in seconds on a CPU,
`small` on one GPU, `medium` (LM + resynthesizer 1.07B parameters) is the size used by the
training benchmark. `hertz_dev` trains with FSDP and activation checkpointing; the others with DDP.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from config import COUNT, DEVICE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, PATH, ConfigError

# What a user can name on the command line and in configs, kept here (no torch) so every parser
# offers the same choices: the weight-only quantization modes (`model/quant.py`) and the KV
# cache element types (`model/transformer.py` KV_DTYPES; auto: the weights' dtype).
Quantize = Literal["int8", "int4"]
KVDtype = Literal["auto", "fp8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)
KV_DTYPE_NAMES: tuple[str, ...] = get_args(KVDtype)
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the loaders' dtypes by name (`model/loading.py` DTYPES)

# Marks on the fields (`fields_marked`, `config_diff` in config/__init__.py):
ARCH = {"arch": True}          # the networks: a checkpoint that differs cannot be loaded into them
RESUME = {"resume": True}      # what is trained: a resumed run must agree (as on the architecture)


# Beyond these a config builds no usable model (`check_architecture`): the LM's output layer would
# hold MAX_VOCAB x lm_dim weights (the official vocabulary is 8^5 = 32,768), and the official
# model has 32 + 8 layers.
MAX_VOCAB = 1 << 24
MAX_LAYERS = 4096


@dataclass(frozen=True)
class TransformerConfig:
    # --- shared -------------------------------------------------------------------------------
    latent_dim: int = field(default=32, metadata={**ARCH, **COUNT})   # per channel; duplex inputs are 2 * latent_dim
    duplex: bool = field(default=True, metadata=ARCH)                 # two channels, one speaker each
    seq_len: int = field(default=2048, metadata=COUNT)  # context in latents (8 per second)
    # rotary base: pair i of a head turns theta ** (-2i / head_dim) radians a position; > 1, so that
    # the pairs turn ever slower (at or below 1 none is slower than a radian a position, and a tiny
    # base makes the rates infinite in float32: NaN attention at the first step)
    theta: float = field(default=10_000.0, metadata={**ARCH, "above": 1})
    eps: float = field(default=1e-5, metadata={**ARCH, **POSITIVE})   # LayerNorm eps

    # --- latent quantizer: Linear -> SwiGLU FFN -> FSQ ----------------------------------------
    # 8**5 = 32768 codes (15 bits); >= 2 each: FSQ scales by (level - 1) / 2, so a level of 1 is a NaN loss
    fsq_levels: tuple[int, ...] = field(default=(8, 8, 8, 8, 8), metadata={**ARCH, "min": 2})
    quantizer_dim: int = field(default=2048, metadata={**ARCH, **COUNT})
    quantizer_ff_dim: int = field(default=8192, metadata={**ARCH, **COUNT})

    # --- latent LM: predicts the FSQ index of the next latent ---------------------------------
    lm_dim: int = field(default=4096, metadata={**ARCH, **COUNT})
    lm_layers: int = field(default=32, metadata={**ARCH, **COUNT})
    lm_heads: int = field(default=32, metadata={**ARCH, **COUNT})
    lm_kv_heads: Optional[int] = field(default=None, metadata={**ARCH, **COUNT})  # None: as many as lm_heads
    # None: 256 * ceil(int(8 * dim / 3) / 256)
    lm_ff_dim: Optional[int] = field(default=None, metadata={**ARCH, **COUNT})

    # --- resynthesizer: next continuous latent, Gaussian mixture, code injected mid-stack ------
    resynth_dim: int = field(default=4096, metadata={**ARCH, **COUNT})
    resynth_layers: int = field(default=8, metadata={**ARCH, **COUNT})
    resynth_heads: int = field(default=16, metadata={**ARCH, **COUNT})
    resynth_kv_heads: Optional[int] = field(default=16, metadata={**ARCH, **COUNT})
    resynth_ff_dim: Optional[int] = field(default=11008, metadata={**ARCH, **COUNT})
    num_components: int = field(default=8, metadata={**ARCH, **COUNT})
    plex_roll: int = field(default=1, metadata={**ARCH, **NON_NEGATIVE})  # the code injected at t is that of latent t+1

    # --- data ---------------------------------------------------------------------------------
    # a folder of audio files, or a .jsonl manifest of them; `~` is expanded in every path (PATH)
    train_data_path: str = field(default="data/demo/train", metadata=PATH)
    val_data_path: str = field(default="data/demo/val", metadata=PATH)
    sample_rate: int = field(default=16000, metadata=COUNT)
    codec_checkpoint: str = field(default="official", metadata=PATH)  # "official" or a path to one of our codecs
    # encoded corpora (mu, logvar), one folder per codec
    latents_dir: str = field(default="data/latents", metadata=PATH)
    mono_to_stereo: Literal["silence", "duplicate"] = "silence"   # duplex: a one-channel file's 2nd speaker
    model_channel: Literal[0, 1] = 1            # duplex: the stereo files' channel whose speaker the model is
                                                # to be (0 swaps the channels: moshi-finetune has it on the left)
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)  # DataLoader workers (audio decoding, latent crops)
    val_crops: int = field(default=256, metadata=COUNT)  # validation sequences at most (fixed crops)
    val_crops_per_file: int = field(default=4, metadata=COUNT)
    ckpt_dir: str = field(default="ckpt", metadata=PATH)  # where official weights are looked up / downloaded

    # --- optimisation -------------------------------------------------------------------------
    # what is trained (see README); model/objectives.py STAGES says which parts each trains
    stage: Literal["quantizer", "resynthesizer", "lm", "all"] = field(default="all", metadata=RESUME)
    lm_loss_weight: float = field(default=1.0, metadata=NON_NEGATIVE)  # total = sum(weight[k] * loss[k])
    resynth_loss_weight: float = field(default=1.0, metadata=NON_NEGATIVE)
    batch_size: int = field(default=8, metadata=COUNT)
    grad_accum_steps: int = field(default=1, metadata=COUNT)
    learning_rate: float = field(default=3e-4, metadata=NON_NEGATIVE)
    min_lr: float = field(default=3e-5, metadata=NON_NEGATIVE)
    warmup_steps: int = field(default=1000, metadata=NON_NEGATIVE)
    max_steps: int = field(default=100_000, metadata=COUNT)
    weight_decay: float = field(default=0.1, metadata=NON_NEGATIVE)
    beta1: float = field(default=0.9, metadata=FRACTION)
    beta2: float = field(default=0.95, metadata=FRACTION)
    grad_clip: float = field(default=1.0, metadata=NON_NEGATIVE)

    # --- fine-tuning (README "Fine-tuning the official model"; model/finetune.py) ---------------
    # "lora": low-rank adapters on the frozen init_from base (stage=lm the LM, stage=resynthesizer the
    # resynthesizer, stage=all both; the quantizer stays frozen); "full": every weight of the stage
    finetune: Literal["full", "lora"] = field(default="full", metadata=RESUME)
    lora_rank: int = field(default=128, metadata={**RESUME, **COUNT})
    lora_alpha: float = field(default=256.0, metadata={**RESUME, **POSITIVE})  # the update is scaled by alpha / rank
    # a training setting, as learning_rate: may change on resume
    lora_dropout: float = field(default=0.0, metadata=FRACTION)
    lora_targets: Literal["attention", "feedforward", "both", "all"] = field(default="both", metadata=RESUME)
    base_quantize: Optional[Literal["int8"]] = field(default=None, metadata=RESUME)  # the frozen base in int8

    # --- scale --------------------------------------------------------------------------------
    parallel: Literal["ddp", "fsdp"] = "fsdp"  # how torchrun ranks share the model
    activation_checkpointing: bool = True       # recompute each block in backward

    # --- run ----------------------------------------------------------------------------------
    log_interval: int = field(default=50, metadata=COUNT)
    eval_interval: int = field(default=1000, metadata=COUNT)
    save_interval: int = field(default=1000, metadata=COUNT)
    checkpoint_dir: str = field(default="checkpoints/transformer", metadata=PATH)
    keep_checkpoints: int = field(default=3, metadata=NON_NEGATIVE)  # step_*.pt kept (and latest, best); 0: all
    # > 0: eval, save and stop at the first step past this wall time
    max_minutes: float = field(default=0.0, metadata=NON_NEGATIVE)
    # > 0: eval, save and stop at this step; the schedule still ends at max_steps (run again to continue)
    stop_step: int = field(default=0, metadata=NON_NEGATIVE)
    sample_seconds: float = field(default=5.0, metadata=NON_NEGATIVE)  # audio completion generated at each evaluation
    peak_tflops: float = field(default=0.0, metadata=NON_NEGATIVE)  # per GPU, for MFU; 0: known GPUs (H100/H200 989)
    device: str = field(default="cuda", metadata=DEVICE)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    compile: bool = True                        # torch.compile each transformer block and the losses
    seed: int = field(default=1337, metadata=SEED)
    # None, "official", a variant name, or one of ours (.safetensors)
    init_from: Optional[str] = field(default=None, metadata=PATH)
    resume: bool = True
    eval_only: bool = False
    eval_quantize: Literal["none", Quantize] = "none"  # eval_only: the weights quantized (model/quant.py)
    eval_kv_dtype: Literal["none", "fp8"] = "none"  # eval_only: forwards through a KV cache in float8
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "hertz-dev-transformer"

    def check_architecture(self) -> None:
        """ConfigError naming the fields whose values contradict each other in the networks they
        build (an assertion when the model is built, or a shape error at its first step): what the
        loaders (`config.from_dict`, a checkpoint's header) and train_transformer.py both check."""
        if not self.fsq_levels:  # (a vocabulary of one code: a loss of 0 and an accuracy of 1, learning nothing)
            raise ConfigError("fsq_levels: expected at least one level (the official (8, 8, 8, 8, 8)), got ()")
        # sizes no model of this kind has, whose build would take the machine's memory (or minutes) before
        # it failed: an edited header, a typo on the command line
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(f"fsq_levels={self.fsq_levels}: a vocabulary of {self.vocab_size:.3g} codes, more than "
                              f"{MAX_VOCAB:,} (the official 32,768)")
        for part in ("lm", "resynth"):
            if (layers := getattr(self, f"{part}_layers")) > MAX_LAYERS:
                raise ConfigError(f"{part}_layers={layers}: more than {MAX_LAYERS} layers (the official LM has 32)")
        for part in ("lm", "resynth"):
            dim, heads, kv = (getattr(self, f"{part}_{k}") for k in ("dim", "heads", "kv_heads"))
            if dim % heads or dim // heads % 2:  # rotary rotates pairs of dims in each head
                raise ConfigError(f"{part}_dim={dim} and {part}_heads={heads}: the heads split {part}_dim into equal "
                                  f"heads of an even size (rotary turns pairs of dims); choose {part}_heads so that "
                                  f"{part}_dim / {part}_heads is an even whole number")
            if kv is not None and heads % kv:
                raise ConfigError(f"{part}_heads={heads} and {part}_kv_heads={kv}: each key/value head serves an "
                                  f"equal group of query heads; choose a {part}_kv_heads that divides {part}_heads")

    @property
    def vocab_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def channels(self) -> int:
        return 2 if self.duplex else 1


hertz_dev = TransformerConfig()

medium = dataclasses.replace(
    hertz_dev,
    quantizer_dim=1024, quantizer_ff_dim=4096,
    lm_dim=2048, lm_layers=14, lm_heads=16, lm_ff_dim=None,
    resynth_dim=2048, resynth_layers=4, resynth_heads=16, resynth_kv_heads=16, resynth_ff_dim=None,
    batch_size=8, parallel="ddp", activation_checkpointing=False,
)

small = dataclasses.replace(
    hertz_dev,
    seq_len=1024,
    quantizer_dim=512, quantizer_ff_dim=2048,
    lm_dim=768, lm_layers=12, lm_heads=12, lm_ff_dim=None,
    resynth_dim=768, resynth_layers=4, resynth_heads=12, resynth_kv_heads=12, resynth_ff_dim=None,
    batch_size=16, warmup_steps=500, max_steps=50_000, parallel="ddp", activation_checkpointing=False,
)

tiny = dataclasses.replace(
    hertz_dev,
    seq_len=64,
    quantizer_dim=32, quantizer_ff_dim=64,
    lm_dim=64, lm_layers=2, lm_heads=4, lm_ff_dim=None,
    resynth_dim=64, resynth_layers=2, resynth_heads=4, resynth_kv_heads=4, resynth_ff_dim=128,
    batch_size=4, learning_rate=1e-3, min_lr=1e-4, warmup_steps=5, max_steps=20,
    log_interval=5, eval_interval=10, save_interval=10,
    device="cpu", dtype="float32", compile=False, parallel="ddp", activation_checkpointing=False,
    codec_checkpoint="checkpoints/codec/best.safetensors", num_workers=0, val_crops=32, sample_seconds=2.0,
)

PRESETS = {"tiny": tiny, "small": small, "medium": medium, "hertz_dev": hertz_dev}
