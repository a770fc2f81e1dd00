"""Codec training speed: samples/s and peak memory of one full training step of train_codec.py's
recipe (generator step: mel + KL + adversarial + feature-matching losses, backward, AdamW; then
discriminator step), bf16 autocast + torch.compile against fp32 eager.

    python benchmarks/codec_train.py                                  # small and hertz_dev, 32 x 6 s, CUDA
    python benchmarks/codec_train.py --presets hertz_dev --modes bf16-compile bf16-eager
    python benchmarks/codec_train.py --device cpu --presets tiny --batch 2 --seconds 1 \
        --steps 2 --warmup 1 --modes fp32-eager                      # CPU smoke test
    python benchmarks/codec_train.py --data data/demo/train --presets small --workers 6   # the loader alone

`--data FOLDER` measures the trainer's input pipeline instead, no model: train_codec.py's training
loader (its dataset, `preload_max_gb`, `make_loader`, `infinite_batches`, pinned memory) at the
preset's batch and segment, iterated as fast as it delivers for `--batches` batches (several
epochs of a small corpus, so an epoch-boundary stall shows): samples/s, the wait for each batch
(p50, p99, max) and which batches waited over 3x the median.

Prints one JSON line per (preset, mode); `warmup_s` includes compilation. The audio is synthetic
(harmonic tones with a syllable envelope), so nothing but torch and numpy is needed: no audio
files, soundfile, wandb or pystoi. A configuration that runs out of memory prints its line with
"error" and the next one runs. TF32 is allowed for matmuls and convolutions in every mode, as in
train_codec.py; bf16 autocast applies on CUDA only.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.codec_config import PRESETS  # noqa: E402
from model.codec import Codec  # noqa: E402
from model.codec_losses import (MultiResolutionMelLoss, discriminator_loss, feature_matching_loss,  # noqa: E402
                                generator_adversarial_loss, latent_kl)
from model.discriminators import Discriminators  # noqa: E402

MODES = {"fp32-eager": ("float32", False), "bf16-compile": ("bfloat16", True), "bf16-eager": ("bfloat16", False)}


def synthetic_audio(batch: int, samples: int, sample_rate: int, device) -> torch.Tensor:
    """(B, 1, N) speech-like test signals: a gliding harmonic voice with a 4 Hz syllable envelope."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(samples) / sample_rate
    f0 = 100 + 80 * torch.rand(batch, 1, generator=g) + 30 * torch.sin(2 * math.pi * 0.7 * t)  # (B, N)
    phase = 2 * math.pi * torch.cumsum(f0, dim=-1) / sample_rate
    voice = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = torch.sin(math.pi * 4 * t + 6 * torch.rand(batch, 1, generator=g)).clamp_min(0)
    audio = 0.1 * voice * envelope + 0.003 * torch.randn(batch, samples, generator=g)
    return audio[:, None].to(device)


def bench(preset: str, mode: str, args) -> dict:
    dtype, use_compile = MODES[mode]
    cfg = PRESETS[preset]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == "bfloat16" \
        else torch.autocast(device.type, enabled=False)
    generator = Codec(cfg).to(device)
    discriminators = Discriminators(cfg).to(device)
    mel_loss = MultiResolutionMelLoss(cfg.mel_windows, cfg.mel_bins, cfg.sample_rate).to(device)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=1e-4, betas=(cfg.beta1, cfg.beta2), fused=cuda)
    opt_d = torch.optim.AdamW(discriminators.parameters(), lr=1e-4, betas=(cfg.beta1, cfg.beta2), fused=cuda)
    gen, disc = generator, discriminators
    if use_compile:  # as train_codec.py does
        gen, disc = torch.compile(generator, dynamic=False), torch.compile(discriminators, dynamic=False)
    samples = round(args.seconds * cfg.sample_rate)
    audio = synthetic_audio(args.batch, samples, cfg.sample_rate, device)
    mask = torch.ones(args.batch, samples, device=device)
    hop = math.prod(cfg.strides)

    def step():
        # generator step, discriminators frozen (as in train_codec.py)
        disc.requires_grad_(False)
        with autocast:
            out = gen(audio)
            fake = out["recon"] * mask[:, None]
            d_fake = disc(fake)
            with torch.no_grad():
                d_real = disc(audio)
            total = (cfg.mel_weight * mel_loss(fake, audio, mask) +
                     cfg.kl_weight * latent_kl(out["mu"], out["logvar"], mask[:, ::hop]) +
                     cfg.adv_weight * generator_adversarial_loss(d_fake, cfg.gan_loss) +
                     cfg.feature_weight * feature_matching_loss(d_real, d_fake))
        total.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        # discriminator step
        disc.requires_grad_(True)
        with autocast:
            both = disc(torch.cat([audio, fake.detach()]))
            loss_d = discriminator_loss([(l.chunk(2)[0], []) for l, _ in both],
                                        [(l.chunk(2)[1], []) for l, _ in both], cfg.gan_loss)
        loss_d.backward()
        torch.nn.utils.clip_grad_norm_(discriminators.parameters(), cfg.disc_grad_clip)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return total.detach(), loss_d.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step()
    sync()
    elapsed = time.perf_counter() - t0
    return {"preset": preset, "mode": mode, "batch": args.batch, "seconds": args.seconds,
            "generator_params_m": round(sum(p.numel() for p in generator.parameters()) / 1e6, 2),
            "discriminator_params_m": round(sum(p.numel() for p in discriminators.parameters()) / 1e6, 2),
            "warmup_s": round(warmup_s, 1), "step_s": round(elapsed / args.steps, 4),
            "samples_per_s": round(args.batch * args.steps / elapsed, 2),
            "audio_s_per_s": round(args.batch * args.steps * args.seconds / elapsed, 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
            "loss": round(losses[0].item(), 3), "loss_disc": round(losses[1].item(), 3)}


def bench_data(preset: str, args) -> dict:
    """The training loader of train_codec.py alone: samples/s and the wait for each batch."""
    import numpy as np

    from model.data import AudioCropDataset, infinite_batches, make_loader
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    dataset = AudioCropDataset(args.data, cfg.segment_seconds, cfg.sample_rate, train=True, seed=cfg.seed,
                               preload_max_gb=cfg.preload_max_gb if args.preload is None else args.preload)
    loader = make_loader(dataset, cfg.batch_size, num_workers=args.workers, distributed=True, seed=cfg.seed)
    batches = infinite_batches(loader)
    setup_s = time.perf_counter() - t0
    waits = []
    t0 = time.perf_counter()
    for _ in range(args.batches):
        t = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    ms = np.array(waits[1:]) * 1e3  # the first batch waits for the workers to start
    return {"preset": preset, "mode": "data", "batch": cfg.batch_size, "seconds": cfg.segment_seconds,
            "workers": args.workers, "preloaded": dataset.preloaded, "batches_per_epoch": len(loader),
            "batches": args.batches, "setup_s": round(setup_s, 2), "first_batch_s": round(waits[0], 3),
            "samples_per_s": round(cfg.batch_size * (args.batches - 1) / (elapsed - waits[0]), 1),
            "wait_ms_p50": round(float(np.percentile(ms, 50)), 2), "wait_ms_p99": round(float(np.percentile(ms, 99)), 2),
            "wait_ms_max": round(float(ms.max()), 2),
            "slow_batches": [i + 1 for i, w in enumerate(ms) if w > 3 * max(float(np.median(ms)), 1.0)],
            "cpus": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "hertz_dev"], choices=list(PRESETS))
    ap.add_argument("--modes", nargs="+", default=["fp32-eager", "bf16-compile"], choices=list(MODES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", help="measure train_codec.py's training loader over this folder instead, no model")
    ap.add_argument("--workers", type=int, default=6, help="DataLoader workers (--data)")
    ap.add_argument("--batches", type=int, default=80, help="batches to read (--data)")
    ap.add_argument("--preload", type=float, help="preload_max_gb (--data); default: the preset's")
    args = ap.parse_args()
    if args.data:
        for preset in args.presets:
            print(json.dumps(bench_data(preset, args)), flush=True)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    for preset in args.presets:
        for mode in args.modes:
            try:
                row = bench(preset, mode, args)
            except torch.cuda.OutOfMemoryError:
                row = {"preset": preset, "mode": mode, "batch": args.batch, "seconds": args.seconds,
                       "error": "out of memory"}
            print(json.dumps({**row, **info}), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
