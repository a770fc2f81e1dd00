"""Training speed of the quantizer + LM + resynthesizer: latents/s, MFU and peak memory.

    python benchmarks/transformer_train.py                           # H100: medium preset (1.07B), ~3 min
    python benchmarks/transformer_train.py --device cpu --preset tiny --steps 2   # smoke test
    python benchmarks/transformer_train.py --preset hertz_dev --finetune full,lora,lora-int8 --configs compile:1:ac

The training step of train_transformer.py (`model.objectives.compute_losses`, blocks compiled by
`model.parallel.compile_blocks`, fused AdamW over float32 master weights, bf16 autocast, flash
attention through scaled_dot_product_attention, gradient clipping) on synthetic latents, so it
needs only torch and numpy. One JSON line per configuration.

FLOPs (model FLOPs, `model.objectives.train_flops_per_latent`): per latent, 6 x the matmul
weights it goes through (each duplex stream counted: the LM's blocks once and both output heads,
the resynthesizer's lower half once and its upper half, code projections and mixture head twice)
plus attention 6 * d * T per layer and stream (causal: QK^T and AV over T/2 keys on average, x3
for forward + backward), plus the quantizer. `mfu` divides by 989 TFLOP/s (H100/H200 dense bf16)
or --peak-tflops; `mfu_palm` counts attention as PaLM does (12 * L * d * T, no causal halving).
Activation recomputation is never counted.

`--finetune` takes a comma-separated list of modes, each run with every configuration, one after
the other in one process: `full` trains every weight of the stage; `lora` trains rank-`--lora-rank`
adapters on a frozen base (`model/finetune.py`, as train_transformer.py finetune=lora: the LM and
resynthesizer in bf16 on CUDA, the quantizer frozen); `lora-int8` the same on an int8 base
(base_quantize=int8). Its FLOPs are counted as full training's, though
the frozen weights get no weight gradients: its MFU overstates the work; compare latents/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser  # noqa: E402
from config.transformer_config import PRESETS  # noqa: E402
from model import HertzDev, build, finetune  # noqa: E402
from model.objectives import STAGE_LOSSES, STAGES, compute_losses, peak_flops, train_flops_per_latent  # noqa: E402
from model.parallel import compile_blocks  # noqa: E402


def run(cfg, stage: str, micro_batch: int, compiled: bool, checkpointing: bool, steps: int, warmup: int,
        device: torch.device, peak: float | None) -> dict:
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, stage=stage)
    model = build(HertzDev, cfg, device=device)
    trained = finetune.trained_parts(cfg)
    for name in ("quantizer", "lm", "resynth"):
        getattr(model, name).requires_grad_(name in trained).train(name in trained)
    if cfg.finetune == "lora":  # the frozen base cast (and quantized), then adapted
        finetune.setup(model, cfg, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if compiled:
        compile_blocks(model.lm)
        compile_blocks(model.resynth)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    T = cfg.seq_len
    x = torch.randn(micro_batch, T, cfg.latent_dim * cfg.channels, device=device)
    valid = torch.ones(micro_batch, T, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            losses, _ = compute_losses(model.quantizer, model.lm, model.resynth, x, valid, cfg.duplex,
                                       STAGE_LOSSES[stage], "quantizer" in trained, checkpointing, compiled)
            total = sum(losses.values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    for _ in range(warmup):
        loss = step()
    sync()
    warmup_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.time() - t0) / steps
    rate = micro_batch * T / dt
    flops = train_flops_per_latent(cfg, stage, T)
    flops_palm = train_flops_per_latent(cfg, stage, T, causal=False)
    n = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("quantizer", "lm", "resynth")}
    row = {"preset": cfg_name(cfg), "stage": stage, "duplex": cfg.duplex, "finetune": cfg.finetune,
           "base_quantize": cfg.base_quantize, "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
           "compile": compiled,
           "activation_checkpointing": checkpointing, "micro_batch": micro_batch, "seq_len": T,
           "params_m": {k: round(v / 1e6, 1) for k, v in n.items()}, "gflop_per_latent": round(flops / 1e9, 3),
           "step_s": round(dt, 4), "latents_per_s": round(rate), "tflops": round(rate * flops / 1e12, 1),
           "warmup_s": round(warmup_s, 1), "loss": round(loss.item(), 3)}
    if peak:
        row["mfu"] = round(rate * flops / peak, 4)
        row["mfu_palm"] = round(rate * flops_palm / peak, 4)
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        row["gpu"] = torch.cuda.get_device_name(device)
    return row


def cfg_name(cfg) -> str:
    for name, preset in PRESETS.items():
        if all(getattr(cfg, f) == getattr(preset, f) for f in ("lm_dim", "lm_layers", "resynth_dim", "resynth_layers")):
            return name
    return "custom"


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="medium", choices=list(PRESETS))
    ap.add_argument("--stage", default="all", choices=list(STAGES))
    ap.add_argument("--mono", action="store_true", help="the mono variant (default: duplex)")
    ap.add_argument("--finetune", default="full",
                    help="comma-separated modes: full (every weight of the stage), lora (adapters on a frozen bf16 "
                         "base), lora-int8 (adapters on a frozen int8 base)")
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--lora-targets", default="both", choices=("attention", "feedforward", "both", "all"))
    ap.add_argument("--seq-len", type=int, default=None, help="default: 2048 (the preset's on CPU)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile); default 3, 1 on CPU")
    ap.add_argument("--configs", default=None,
                    help="comma-separated MODE:MICRO_BATCH[:ac], MODE compile|eager, ac = activation checkpointing; "
                         "default on CUDA compile:8,compile:16:ac,eager:8; on CPU eager:2")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (default: known GPUs)")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = {"full": ("full", None), "lora": ("lora", None), "lora-int8": ("lora", "int8")}
    picked = args.finetune.split(",")
    if unknown := [m for m in picked if m not in modes]:
        ap.error(f"--finetune: unknown mode {unknown[0]!r}; expected a comma-separated list of {', '.join(modes)}")
    cfgs = []
    for name in picked:
        lora = {"lora_rank": args.lora_rank, "lora_alpha": 2.0 * args.lora_rank,
                "lora_targets": args.lora_targets} if modes[name][0] == "lora" else {}
        cfg = dataclasses.replace(PRESETS[args.preset], duplex=not args.mono, finetune=modes[name][0],
                                  base_quantize=modes[name][1], init_from="random",  # the base: random weights
                                  **lora)
        try:
            finetune.check_config(cfg, 1)
        except ValueError as e:  # ConfigError: one line, as the trainer
            ap.error(str(e))
        cfgs.append(dataclasses.replace(cfg, seq_len=args.seq_len or (2048 if cuda else cfg.seq_len)))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    peak = peak_flops(device, args.peak_tflops)
    configs = args.configs or ("compile:8,compile:16:ac,eager:8" if cuda else "eager:2")
    for cfg in cfgs:
        for spec in configs.split(","):
            one(cfg, spec, args, device, peak, warmup)


def one(cfg, spec: str, args, device: torch.device, peak: float | None, warmup: int) -> None:
    """One configuration (MODE:MICRO_BATCH[:ac]) of one fine-tuning mode: its JSON line, then memory freed."""
    mode, mb, *rest = spec.split(":")
    try:
        row = run(cfg, args.stage, int(mb), mode == "compile", rest == ["ac"], args.steps, warmup, device, peak)
    except torch.OutOfMemoryError:
        row = {"preset": args.preset, "finetune": cfg.finetune, "base_quantize": cfg.base_quantize,
               "compile": mode == "compile", "micro_batch": int(mb), "activation_checkpointing": rest == ["ac"],
               "error": "out of memory"}
    print(json.dumps(row), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


if __name__ == "__main__":
    main()
