"""Codec training speed: samples/s and peak memory of one full training step of train_codec.py's
recipe (generator forward, discriminators on real and on the reconstruction, mel + KL +
adversarial + feature-matching losses into the generator, LSGAN loss into the discriminators,
AdamW on each), bf16 autocast + torch.compile against fp32 eager.

    python benchmarks/codec_train.py                                  # small and hertz_dev, 32 x 6 s, CUDA
    python benchmarks/codec_train.py --presets hertz_dev --modes bf16-compile bf16-eager
    python benchmarks/codec_train.py --device cpu --presets tiny --batch 2 --seconds 1 \
        --steps 2 --warmup 1 --modes fp32-eager                      # CPU smoke test
    python benchmarks/codec_train.py --presets small --modes bf16-eager --steps 3 --profile \
        --variants base,disc_nchw,host_sync               # where the time goes, and A/Bs
    python benchmarks/codec_train.py --data data/demo/train --presets small --workers 6   # the loader alone

`--variants` (a comma list, default base) measures each variant in turn in the same process, from
the same initial weights, one line each with its "variant":
- `base`: train_codec.py's step, cuDNN benchmark mode on (as the trainer sets it on CUDA), the
  generator on (B, C, 1, L) channels-last activations (`Codec.use_channels_last`) and the
  discriminators on channels-last activations (`Discriminators.use_channels_last`), as the trainer
  on CUDA; and the discriminators' weight-normed weights computed once for their two passes
  (`parametrize.cached()`, as the trainer);
- `joint_disc`: `base` with the discriminators run once on real audio and the reconstruction
  together (`Discriminators.judge`: half the convolution launches, but the backward into the
  reconstruction also runs over the real half); measured slower on the H200 (0.393 s a step
  against 0.352), so not the trainer's;
- `loop_fm`: `base` with the feature-matching loss as a loop over the feature maps (four calls a
  map), the trainer's before its multi-tensor sums (`feature_matching_loss(..., foreach=False)`);
- `disc_nchw`: `base` with the discriminators on contiguous (NCHW) activations, the trainer's
  step of session 11 (2026-12-03);
- `host_sync`: `base` with the host checking each update's loss and gradient norm before it
  (two syncs a step, as the trainer did before its `FiniteGuard`; `ncl` and `alternating` too),
  where `base` skips a non-finite update on the device;
- `ncl`: the step as the trainer had it before 2026-12-03: the generator on (B, C, L) activations
  (cuDNN converts each conv's input, output and gradients to and from NHWC), the discriminators
  on NCHW activations and their weights computed at each pass;
- `uncached`: `base` with the discriminators' weights computed at each pass;
- `no_cudnn_benchmark`: cuDNN's default algorithm choice instead;
- `compiled_disc`: with `bf16-compile`, the discriminators compiled as well as the generator
  (train_codec.py compiles the generator only: a compiled discriminator's backward is one graph
  that computes its weight gradients whenever the generator's loss back-propagates through it, so
  that step does the discriminators' backward twice);
- `unfused_act`: `base` (with the preset's `disc_kernels` on) with each discriminator convolution's
  bias added by cuDNN's own add and the leaky ReLU and the bias gradient as torch's ops
  (`Discriminators.use_kernels(False)`), not the fused Triton kernels
  (`model.discriminator_kernels.bias_leaky_relu`);
- `torch_fm`: `base` (with `disc_kernels` on) with the feature-matching L1 as torch's multi-tensor
  ops (`feature_matching_loss(..., kernel=False)`), not a Triton kernel a map each way;
- `no_disc_kernels`: both of the above off (`disc_kernels=false`), the trainer's step of session
  18 (2026-12-04) and `small_fast`'s; `disc_kernels`: both on, whatever the preset says;
- `cudnn_dilated`: the generator's dilated convs by cuDNN, not over phases, else as `base`;
- `alternating`: the step train_codec.py had before (cuDNN's dilated convs too): a generator step with the discriminators
  frozen (D(fake) with a gradient, D(real) without, float32 feature matching), then a discriminator
  step on cat[real, fake.detach()] — four discriminator forwards of a batch where `base` has two.
Each line also says how many of the discriminators' 2-D convolutions are handed a channels_last
input ("conv2d_inputs_channels_last": "k/n").

`--profile` then runs `--steps` more steps under torch.profiler (CPU and CUDA activities on CUDA),
with a record_function range around each phase of the step (gen_forward, mel_loss, kl, disc_on_real,
disc_on_fake (`joint_disc`: disc_on_both), adv_fm_loss, disc_loss, gen_backward, disc_backward,
gen_clip_opt, disc_clip_opt; `alternating` also disc_forward; inside the discriminators' passes,
mpd_forward and mrd_forward: each kind of discriminator's forward), and prints after the variant's
line one with "profile" ("cuda" or "cpu"), per step: `phases_ms` (CUDA: device time of the kernels
launched inside each range, the backward's from autograd's own thread included; CPU: each range's
own wall time), `unattributed_ms` and `phase_spans_ms` (the ranges on the GPU timeline) on CUDA,
`top_kernels` ([name, ms, calls] of the 20 kernels with the most device time; on CPU the ops with
the most self CPU time), `total_device_ms`, and `step_s` (wall time of a profiled step). What the
profiler does not offer is left out with an "error" and its own table, rather than a traceback.

`--data FOLDER` measures the trainer's input pipeline instead, no model: train_codec.py's training
loader (its dataset, `preload_max_gb`, `make_loader`, `infinite_batches`, pinned memory) at the
preset's batch and segment, iterated as fast as it delivers for `--batches` batches (several
epochs of a small corpus, so an epoch-boundary stall shows): samples/s, the wait for each batch
(p50, p99, max) and which batches waited over 3x the median.

Prints one JSON line per (preset, mode, variant); `warmup_s` includes compilation. The audio is
synthetic (harmonic tones with a syllable envelope), so nothing but torch and numpy is needed: no
audio files, soundfile, wandb or pystoi. A configuration that runs out of memory prints its line with
"error" and the next one runs. TF32 is allowed for matmuls and convolutions in every mode, as in
train_codec.py; bf16 autocast applies on CUDA only.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser  # noqa: E402
from config.codec_config import PRESETS  # noqa: E402
from model.codec import Codec, compile_codec  # noqa: E402
from model.codec_losses import (MultiResolutionMelLoss, discriminator_loss, feature_matching_loss,  # noqa: E402
                                generator_adversarial_loss, latent_kl)
from model.discriminators import Discriminators, PeriodDiscriminator  # noqa: E402

MODES = {"fp32-eager": ("float32", False), "bf16-compile": ("bfloat16", True), "bf16-eager": ("bfloat16", False)}
VARIANTS = ("base", "joint_disc", "loop_fm", "alternating", "ncl", "uncached", "cudnn_dilated",
            "disc_nchw", "host_sync", "no_cudnn_benchmark", "compiled_disc", "unfused_act", "torch_fm",
            "no_disc_kernels", "disc_kernels")
# record_function ranges of one step (disc_forward: the alternating variant's discriminator step)
PHASES = ("gen_forward", "mel_loss", "kl", "disc_on_both", "disc_on_fake", "disc_on_real", "mpd_forward",
          "mrd_forward", "adv_fm_loss", "gen_backward", "gen_clip_opt", "disc_forward", "disc_loss", "disc_backward",
          "disc_clip_opt")


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


def bench(preset: str, mode: str, variant: str, args) -> tuple[dict, dict | None]:
    """One (preset, mode, variant): its timed line, and with --profile the profiled steps' summary."""
    dtype, use_compile = MODES[mode]
    cfg = PRESETS[preset]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # train_codec.py lets cuDNN pick the fastest convs for its fixed crop length
        torch.backends.cudnn.benchmark = variant != "no_cudnn_benchmark"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == "bfloat16" \
        else torch.autocast(device.type, enabled=False)
    # the discriminators' Triton kernels (on CUDA): as the preset's disc_kernels, unless the variant says
    kernels = cuda and (variant == "disc_kernels" or (cfg.disc_kernels and variant != "no_disc_kernels"))
    fused_act = kernels and variant != "unfused_act"
    feature_kernel = kernels and variant != "torch_fm"
    torch.manual_seed(0)  # every variant starts from the same weights
    generator = Codec(cfg).to(device)
    discriminators = Discriminators(cfg).to(device)
    if cuda:  # as train_codec.py does; the step before (alternating) had cuDNN's dilated convs and (B, C, L)
        generator.dilated_convs_polyphase(1 << 30 if variant in ("alternating", "cudnn_dilated") else 512)
        generator.use_channels_last(variant not in ("alternating", "ncl"))
        discriminators.use_channels_last(variant not in ("alternating", "ncl", "disc_nchw"))
        discriminators.use_kernels(fused_act)
    mel_loss = MultiResolutionMelLoss(cfg.mel_windows, cfg.mel_bins, cfg.sample_rate).to(device)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=1e-4, betas=(cfg.beta1, cfg.beta2), fused=True)
    opt_d = torch.optim.AdamW(discriminators.parameters(), lr=1e-4, betas=(cfg.beta1, cfg.beta2), fused=True)
    gen, disc = generator, discriminators
    if use_compile:  # as train_codec.py does: the generator only
        gen = compile_codec(generator)
        disc = compile_codec(discriminators) if variant == "compiled_disc" else discriminators
    samples = round(args.seconds * cfg.sample_rate)
    audio = synthetic_audio(args.batch, samples, cfg.sample_rate, device)
    mask = torch.ones(args.batch, samples, device=device)
    hop = math.prod(cfg.strides)
    profiling = False

    def phase(name):
        return torch.profiler.record_function(name) if profiling else contextlib.nullcontext()

    gen_params, disc_params = list(generator.parameters()), list(discriminators.parameters())

    def weights_once():
        """As train_codec.py: the discriminators' weight-normed weights computed once for both passes."""
        cache = variant not in ("ncl", "uncached", "compiled_disc")
        return torch.nn.utils.parametrize.cached() if cache else contextlib.nullcontext()

    def update(name, module, optimizer, max_norm, loss):
        """Clip `module`'s gradients and take `optimizer`'s step, as train_codec.py does: the step
        skipped on the device if the loss or the norm is not finite (`FiniteGuard`), or with
        `host_sync` after the host has checked them (the trainer's rule before 2026-12-03). The
        rule is restated here, not imported: `model.training` imports `model.audio`, hence
        soundfile, which the GPU image lacks (`tests/test_train_codec.py` runs this without it)."""
        with phase(name):
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
            finite = torch.isfinite(torch.stack([loss.float(), norm.float()])).all().float()
            if variant in ("host_sync", "ncl", "alternating"):
                assert finite.item() == 1
            else:
                optimizer.found_inf = 1.0 - finite
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def reconstruct():
        """The generator's forward and its own losses (under autocast): fake, mel * w + kl * w."""
        with phase("gen_forward"):
            out = gen(audio)
            fake = out["recon"] * mask[:, None]
        with phase("mel_loss"):
            mel = mel_loss(fake, audio, mask)
        with phase("kl"):
            kl = latent_kl(out["mu"], out["logvar"], mask[:, ::hop])
        return fake, cfg.mel_weight * mel + cfg.kl_weight * kl

    def step():
        if variant == "alternating":
            return alternating_step()
        # train_codec.py's step: one discriminator forward of real and one of fake; each loss
        # back-propagates into its own side only
        with autocast:
            fake, reconstruction = reconstruct()
            if variant == "joint_disc":
                with phase("disc_on_both"):
                    d_real, d_fake = discriminators.judge(audio, fake)
            else:
                with weights_once():
                    with phase("disc_on_real"):
                        d_real = disc(audio)
                    with phase("disc_on_fake"):
                        d_fake = disc(fake)
            with phase("adv_fm_loss"):
                total = (reconstruction + cfg.adv_weight * generator_adversarial_loss(d_fake, cfg.gan_loss) +
                         cfg.feature_weight * feature_matching_loss(d_real, d_fake, foreach=variant != "loop_fm",
                                                                           kernel=feature_kernel))
            with phase("disc_loss"):
                loss_d = discriminator_loss(d_real, d_fake, cfg.gan_loss)
        with phase("gen_backward"):
            total.backward(inputs=gen_params, retain_graph=True)
        with phase("disc_backward"):
            loss_d.backward(inputs=disc_params)
        update("gen_clip_opt", generator, opt_g, cfg.grad_clip, total.detach())
        update("disc_clip_opt", discriminators, opt_d, cfg.disc_grad_clip, loss_d.detach())
        return total.detach(), loss_d.detach()

    def alternating_step():
        # the step before (session 3): generator step with the discriminators frozen (D on fake
        # with grad, D on real without), float32 feature matching; then a discriminator step on
        # real and the detached fake concatenated
        disc.requires_grad_(False)
        with autocast:
            fake, reconstruction = reconstruct()
            with phase("disc_on_fake"):
                d_fake = disc(fake)
            with phase("disc_on_real"), torch.no_grad():
                d_real = disc(audio)
            with phase("adv_fm_loss"):
                fm = sum(torch.mean((a.detach().float() - b.float()).abs())
                         for (_, fr), (_, ff) in zip(d_real, d_fake) for a, b in zip(fr, ff))
                total = (reconstruction + cfg.adv_weight * generator_adversarial_loss(d_fake, cfg.gan_loss) +
                         cfg.feature_weight * fm)
        with phase("gen_backward"):
            total.backward()
        update("gen_clip_opt", generator, opt_g, cfg.grad_clip, total.detach())
        disc.requires_grad_(True)
        with autocast:
            with phase("disc_forward"):
                both = disc(torch.cat([audio, fake.detach()]))
            with phase("disc_loss"):
                loss_d = discriminator_loss([(l.chunk(2)[0], []) for l, _ in both],
                                            [(l.chunk(2)[1], []) for l, _ in both], cfg.gan_loss)
        with phase("disc_backward"):
            loss_d.backward()
        update("disc_clip_opt", discriminators, opt_d, cfg.disc_grad_clip, loss_d.detach())
        return total.detach(), loss_d.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation and cuDNN's benchmarking
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
    row = {"preset": preset, "mode": mode, "variant": variant, "batch": args.batch, "seconds": args.seconds,
           "generator_params_m": round(sum(p.numel() for p in generator.parameters()) / 1e6, 2),
           "discriminator_params_m": round(sum(p.numel() for p in discriminators.parameters()) / 1e6, 2),
           "warmup_s": round(warmup_s, 1), "step_s": round(elapsed / args.steps, 4),
           "samples_per_s": round(args.batch * args.steps / elapsed, 2),
           "audio_s_per_s": round(args.batch * args.steps * args.seconds / elapsed, 1),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
           "loss": round(losses[0].item(), 3), "loss_disc": round(losses[1].item(), 3),
           "conv2d_inputs_channels_last": conv_input_formats(discriminators, audio, autocast)}
    if not args.profile:
        return row, None
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiling = True
    # the forwards of the two kinds of discriminator, as ranges of their own (inside disc_on_*)
    open_ranges = []
    for sub in discriminators.discriminators:
        name = "mpd_forward" if isinstance(sub, PeriodDiscriminator) else "mrd_forward"
        sub.register_forward_pre_hook(lambda m, a, name=name: open_ranges.append(
            torch.profiler.record_function(name).__enter__()))
        sub.register_forward_hook(lambda m, a, out: open_ranges.pop().__exit__(None, None, None))
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        elapsed = time.perf_counter() - t0
    return row, {"profile": "cuda" if cuda else "cpu", "preset": preset, "mode": mode, "variant": variant,
                 "batch": args.batch, "seconds": args.seconds, "steps": args.steps,
                 "step_s": round(elapsed / args.steps, 4), **profile_summary(prof, args.steps, cuda)}


def conv_input_formats(discriminators, audio, autocast) -> str:
    """"k/n": how many of the discriminators' n 2-D convolutions are handed a channels_last input,
    in one no-grad forward of two crops; a (B, 1, H, W) input counts as both layouts."""
    seen, conv2d = [], F.conv2d

    def noting(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return conv2d(x, *args, **kwargs)

    F.conv2d = noting  # what nn.Conv2d and the channels-last path both call
    try:
        with torch.no_grad(), autocast:
            discriminators(audio[:2])
    finally:
        F.conv2d = conv2d
    return f"{sum(seen)}/{len(seen)}"


def profile_summary(prof, steps: int, cuda: bool) -> dict:
    """Per-step milliseconds from a torch.profiler run over `steps` steps.

    CUDA: `phases_ms` sums the device time of the kernels launched while each record_function
    range was open, from any thread (backward's kernels are launched by autograd's device thread,
    outside the range's own tree of ops, which is why a range's `device_time_total` in
    `key_averages()` misses them); kernels are tied to the op that launched them by the
    profiler's correlation ids. `unattributed_ms` is what no range claims, `phase_spans_ms` the
    ranges' spans on the GPU timeline where the profiler records them. `top_kernels` are
    [name, ms, calls] per step by device time. CPU: each range's own wall time (less the ranges inside it), and the ops by self
    CPU time instead of kernels.
    """
    def ms(us):
        return round(us / steps / 1e3, 3)

    def on_cpu(e):
        return str(getattr(e, "device_type", "DeviceType.CPU")).endswith("CPU")

    out = {}
    try:
        events = list(prof.events())
        ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                        if on_cpu(e) and e.name in PHASES)
        starts = [r[0] for r in ranges]

        def phase_at(t):
            i = bisect.bisect_right(starts, t) - 1
            return ranges[i][2] if i >= 0 and t <= ranges[i][1] else None

        phases = {}
        if cuda:
            for e in events:
                launched = sum(k.duration for k in getattr(e, "kernels", ()) or ())
                if on_cpu(e) and launched:
                    name = phase_at(e.time_range.start) or "unattributed"
                    phases[name] = phases.get(name, 0.0) + launched
            kernels, spans = {}, {}
            for e in events:
                if on_cpu(e):
                    continue
                if e.name in PHASES:
                    spans[e.name] = spans.get(e.name, 0.0) + e.time_range.elapsed_us()
                elif not (getattr(e, "is_user_annotation", False) or e.name.startswith("ProfilerStep")):
                    us, calls = kernels.get(e.name, (0.0, 0))
                    kernels[e.name] = (us + e.time_range.elapsed_us(), calls + 1)
            total = sum(us for us, _ in kernels.values())
            unattributed = total - sum(v for k, v in phases.items() if k != "unattributed")
            phases.pop("unattributed", None)
            out["phases_ms"] = {k: ms(v) for k, v in sorted(phases.items(), key=lambda kv: PHASES.index(kv[0]))}
            out["unattributed_ms"] = ms(unattributed)
            if spans:
                out["phase_spans_ms"] = {k: ms(v) for k, v in sorted(spans.items(), key=lambda kv: PHASES.index(kv[0]))}
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
            out["top_kernels"] = [[name[:80], ms(us), round(calls / steps, 1)] for name, (us, calls) in top]
            out["total_device_ms"] = ms(total)
        else:
            for i, (start, end, name) in enumerate(ranges):  # each range's own time: less the ranges inside it
                phases[name] = phases.get(name, 0.0) + end - start
                outer = [r for r in ranges[:i] if r[1] >= end]
                if outer:
                    phases[outer[-1][2]] -= end - start
            out["phases_ms"] = {k: ms(v) for k, v in sorted(phases.items(), key=lambda kv: PHASES.index(kv[0]))}
            ops = [a for a in prof.key_averages() if a.key not in PHASES and not a.key.startswith("ProfilerStep")]
            ops.sort(key=lambda a: -a.self_cpu_time_total)
            out["top_kernels"] = [[a.key[:80], ms(a.self_cpu_time_total), round(a.count / steps, 1)] for a in ops[:20]]
            out["total_device_ms"] = ms(sum(phases.values()))
    except Exception as e:  # an API this torch lacks: say so, and show what the profiler has
        out["error"] = f"{type(e).__name__}: {e}"
        try:
            out["table"] = prof.key_averages().table(row_limit=30, max_name_column_width=60)
        except Exception as e2:
            out["table_error"] = f"{type(e2).__name__}: {e2}"
    return out


def bench_data(preset: str, args) -> dict:
    """The training loader of train_codec.py alone: samples/s and the wait for each batch."""
    import numpy as np

    from model.data import AudioCropDataset, infinite_batches, make_loader
    cfg = PRESETS[preset]
    t0 = time.perf_counter()
    try:
        dataset = AudioCropDataset(args.data, cfg.segment_seconds, cfg.sample_rate, train=True, seed=cfg.seed,
                                   preload_max_gb=cfg.preload_max_gb if args.preload is None else args.preload)
    except FileNotFoundError as e:  # the scan's: no such folder, a file, or a folder without audio it reads
        sys.exit(f"error: --data: {e}")
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


def bench_convs(preset: str, args) -> list[dict]:
    """Each distinct stride-1 causal convolution of the preset's generator, forward and backward
    (input and weight gradients) at the benchmark's batch and crop, bf16 autocast on CUDA: by
    cuDNN, and for the dilated ones also over phases (`dilated_conv1d_polyphase`, the trainer's)."""
    from model.codec import CausalConv1d, dilated_conv1d_polyphase
    cfg = PRESETS[preset]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    generator = Codec(cfg).to(device)
    seen, rows = {}, []
    samples = round(args.seconds * cfg.sample_rate)

    def note(module, inputs, output):  # the input length each conv sees in a forward of the crop
        key = (module.in_channels, module.conv.out_channels, module.conv.kernel_size[0], module.conv.dilation[0],
               inputs[0].shape[-1])
        if module.conv.stride[0] == 1 and key not in seen:
            seen[key] = module
    hooks = [m.register_forward_hook(note) for m in generator.modules() if isinstance(m, CausalConv1d)]
    with torch.no_grad():
        generator(torch.zeros(1, 1, samples, device=device))
    for h in hooks:
        h.remove()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for (cin, cout, k, d, n), module in seen.items():
        conv = torch.nn.Conv1d(cin, cout, k, dilation=d, bias=False).to(device)
        x = torch.randn(args.batch, cin, n + (k - 1) * d, device=device,
                        dtype=torch.bfloat16 if cuda else torch.float32, requires_grad=True)
        row = {"preset": preset, "conv": f"{cin}->{cout} k{k} d{d}", "length": n, "batch": args.batch}
        ways = [("cudnn_ms", lambda: conv(x))] + ([("polyphase_ms", lambda: dilated_conv1d_polyphase(x, conv))]
                                                 if d > 1 else [])
        for name, fn in ways:
            def once():
                with autocast:
                    y = fn()
                y.backward(torch.ones_like(y))
            for _ in range(2):
                once()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                once()
            if cuda:
                torch.cuda.synchronize(device)
            row[name] = round(1000 * (time.perf_counter() - t0) / args.steps, 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "hertz_dev"], choices=list(PRESETS))
    ap.add_argument("--modes", nargs="+", default=["fp32-eager", "bf16-compile"], choices=list(MODES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="base",
                    help=f"comma list, each measured in turn in this process: {','.join(VARIANTS)}")
    ap.add_argument("--profile", action="store_true",
                    help="then profile --steps more steps: device time per phase and the top kernels")
    ap.add_argument("--convs", action="store_true",
                    help="instead: each stride-1 conv of the generator, forward + backward (cuDNN; dilated: also over phases)")
    ap.add_argument("--data", type=os.path.expanduser, help="measure train_codec.py's training loader over this folder instead, no model")
    ap.add_argument("--workers", type=int, default=6, help="DataLoader workers (--data)")
    ap.add_argument("--batches", type=int, default=80, help="batches to read (--data)")
    ap.add_argument("--preload", type=float, help="preload_max_gb (--data); default: the preset's")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"--variants: unknown {','.join(unknown) or '(none given)'}; choose from {','.join(VARIANTS)}")
    if args.convs:
        torch.backends.cudnn.benchmark = True
        for preset in args.presets:
            for row in bench_convs(preset, args):
                print(json.dumps(row), flush=True)
        return
    if args.data:
        for preset in args.presets:
            print(json.dumps(bench_data(preset, args)), flush=True)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True  # cudnn.benchmark is set for each variant
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    for preset in args.presets:
        for mode in args.modes:
            for variant in variants:
                try:
                    row, profile = bench(preset, mode, variant, args)
                except torch.cuda.OutOfMemoryError:
                    row, profile = {"preset": preset, "mode": mode, "variant": variant, "batch": args.batch,
                                    "seconds": args.seconds, "error": "out of memory"}, None
                print(json.dumps({**row, **info}), flush=True)
                if profile is not None:
                    print(json.dumps(profile), flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
