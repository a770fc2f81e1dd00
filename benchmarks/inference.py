"""Inference speed with random weights and synthetic audio: the live duplex step, a mono
completion, peak GPU memory. One JSON object per line.

    python benchmarks/inference.py                      # CUDA, hertz_dev size, batches 1,4,8
    python benchmarks/inference.py --check              # first: graph/compiled steps vs eager on the GPU
    python benchmarks/inference.py --device cpu         # tiny and small on the CPU, for reference
    python benchmarks/inference.py --quantize none,int8,int4 --kv-dtype auto,fp8   # modes side by side

Lines: {"bench": "live_step", batch, p50_ms, p99_ms, ...} (one live step as the server calls it:
stream-encode one user chunk per row + LM + resynthesizer + stream-decode one model chunk per
row, host copies included), "live_step_full_context" (the same with every row at the end of the
context), "mono_completion" (3 s prompt + 20 s: latents/s), "peak_memory" (duplex, batch 1),
"breakdown" (each part of the step as its own CUDA graph), "check" (equalities on the GPU),
"weights" (bytes of the weights, and the step's floor at the measured read bandwidth),
"memory_stages" (GPU memory of the weights, of an engine's state, of its CUDA graphs),
"step_profile" / "step_kernel" (--profile: a step's device time by kind of kernel, its top kernels).
Every line of a mode carries its `quantize` (none, int8, int4: weight-only, `model/quant.py`)
and `kv_dtype` (auto, fp8); on CUDA, several modes run one after another, each in a process of
its own (a process keeps some memory of a freed model: the next mode's peak would include it).
Needs only torch, numpy and tqdm (no soundfile/soxr).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import ArgumentParser  # noqa: E402
from config.codec_config import PRESETS as CODEC_PRESETS  # noqa: E402
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS  # noqa: E402
from model import Codec, HertzDev, build  # noqa: E402
from model.decode import draw_noise, step_logits, step_mixture  # noqa: E402
from model.generator import Generator  # noqa: E402
from model.live import LiveEngine  # noqa: E402
from model.quant import MODES, quantize_model, weight_bytes  # noqa: E402
from model import transformer  # noqa: E402
from model.transformer import KV_DTYPES  # noqa: E402
from model.sampling import SamplingParams, row_seed, sample_latents, sample_tokens  # noqa: E402

T0 = time.time()
# Switches that run a CUDA step as it was before a kernel, to compare, in the same run: flag ->
# (module, attribute, value, tag, tag value, what). Each sets the attribute before the model is
# built; the lines of that mode carry the tag. --int-to-float applies to quantized modes only.
SWITCHES = {
    "int_to_float": ("model.quant_kernels", "BITS", False, "convert", "instruction",
                     "quantized kernels convert with the int-to-float instruction"),
    "unfused_prologue": ("model.transformer", "FUSED_PROLOGUE", False, "prologue", "unfused",
                         "decode steps run the attention prologue as five kernels a layer, as before its one kernel"),
    "split_prologue": ("model.attention_kernels", "SPLIT_PROLOGUE", True, "prologue", "split",
                       "the fused prologue with three programs a row, q, k and v side by side"),
    "torch_noise": ("model.sampling", "NOISE_KERNEL", False, "noise", "torch",
                    "the step's noise by torch's elementwise kernels, as before its Triton kernel"),
    "pdl_linears": ("model.quant_kernels", "PDL", True, "pdl", "on",
                    "the one-row int8 GEMVs as programmatic dependent launches"),
    "fused_linears": ("model.quant", "FUSED_LINEARS", True, "linears", "fused",
                      "an int8 decode step's norms, gating and residual adds inside its one-row GEMVs (off by "
                      "default until its CUDA tests have run)"),
    "torch_codec": ("model.stream_codec", "KERNELS", False, "codec", "torch",
                    "the live codec's convolutions by torch's operations (five kernels a convolution), as before "
                    "its Triton kernels (two)"),
}


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def make_model(size: str, duplex: bool, device, dtype, quantize: str = "none") -> HertzDev:
    """Random weights; `quantize` int8 or int4 quantizes the transformer in place, layer by layer
    (each float weight is dropped once its layer is quantized)."""
    cfg = dataclasses.replace(TRANSFORMER_PRESETS[size], duplex=duplex)
    model = build(HertzDev, cfg, device=device, dtype=dtype)
    if quantize != "none":
        quantize_model(model, quantize)
    codec_size = size if size in CODEC_PRESETS else "hertz_dev"
    model.codec = build(Codec, CODEC_PRESETS[codec_size], device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def synthetic_audio(channels: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(channels, N) chirps, tones and noise at speech-like levels (never zeros)."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    out = []
    for c in range(channels):
        f0 = 120 + 80 * c
        x = 0.2 * np.sin(2 * np.pi * f0 * t * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t)))
        x += 0.05 * g.standard_normal(t.shape) * (np.sin(2 * np.pi * 3 * t) > 0)
        out.append(x)
    return torch.tensor(np.stack(out), dtype=torch.float32)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def percentiles(times_ms) -> dict:
    a = np.asarray(times_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def engine_args(variant: dict) -> dict:
    """An engine's keyword arguments from a variant; its "attention" ("kernel", the default, or
    "sdpa") sets how decode steps attend (`model.transformer.DECODE_KERNEL`)."""
    variant = dict(variant)
    transformer.DECODE_KERNEL = variant.pop("attention", "kernel") == "kernel"
    return variant


def live_engine(model, batch, variant, prompt_s=3.0):
    e = LiveEngine(model, max_sessions=batch, **engine_args(variant))
    prompt = synthetic_audio(2, prompt_s, seed=1)
    for r in range(batch):
        e.reset(r, seed=row_seed(0, r), prompt=prompt)
    return e


def time_live(e: LiveEngine, steps: int, warm: int = 5) -> tuple[list, float]:
    B = e.max_sessions
    user = synthetic_audio(B, (steps + warm) * 0.125, seed=2).numpy().reshape(B, steps + warm, 2000).transpose(1, 0, 2)
    for i in range(warm):
        e.step(user[i])
    times = []
    for i in range(steps):
        t = time.perf_counter()
        e.step(user[warm + i])
        times.append((time.perf_counter() - t) * 1e3)
    return times, float(np.mean(e.positions))


def allocated_gb(device) -> Optional[float]:
    return torch.cuda.memory_allocated() / 1e9 if torch.device(device).type == "cuda" else None


def bench_live(model, batch, variant, name, steps, device, full_context=True, tags=None):
    before = allocated_gb(device)
    e = live_engine(model, batch, variant)
    engine = allocated_gb(device)
    t = time.perf_counter()
    e.warmup()
    sync(device)
    start = time.perf_counter() - t
    if before is not None:  # where the memory of a session goes: weights, engine state, graphs
        emit(bench="memory_stages", variant=name, **(tags or {}), batch=batch, model_gb=before,
             engine_state_gb=engine - before, graphs_gb=allocated_gb(device) - engine,
             kv_gb=e.state.kv_bytes / 1e9)
    times, mean_pos = time_live(e, steps)
    stats = percentiles(times)
    emit(bench="live_step", variant=name, **(tags or {}), batch=batch, steps=steps, mean_position=mean_pos, **stats,
         setup_s=start, keeps_cadence=bool(stats["p99_ms"] < 125))
    if full_context:
        st = e.state
        near_end = st.max_len - steps - 10
        st.pos.fill_(near_end)
        st.host_pos[:] = near_end
        times, mean_pos = time_live(e, steps)
        emit(bench="live_step_full_context", variant=name, **(tags or {}), batch=batch, steps=steps,
             mean_position=mean_pos, **percentiles(times))
    return e, stats["p50_ms"]


def graph_time(fn, iters=50) -> float:
    """Median ms of `fn` captured as a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


@torch.no_grad()
def breakdown(e: LiveEngine, name: str) -> None:
    """Each part of the live step alone, as its own CUDA graph (rows inactive: no state moves)."""
    model, st, k = e.model, e.state, e.kernels
    saved = st.active.clone()
    st.active.zero_()
    key = e.graphs.key(int(st.host_pos.max()) + 1, False)
    W = key.window
    pos = st.pos.clamp(max=W - 1)[:, None]
    x = torch.cat([e.m, e.m], dim=-1)
    noise = draw_noise(model, st)
    logits = step_logits(model, x, pos, st, W, k.block)
    tokens = sample_tokens(logits, noise.token, st.params, top_p=False)
    mixture = step_mixture(model, x, tokens, pos, st, W, k.block)
    parts = {
        "encode": lambda: k.encode(e.codec, e.user, e.enc),
        "noise": lambda: draw_noise(model, st),
        "lm": lambda: step_logits(model, x, pos, st, W, k.block),
        "sample_tokens": lambda: sample_tokens(logits, noise.token, st.params, top_p=False),
        "sample_tokens_top_p": lambda: sample_tokens(logits, noise.token, st.params, top_p=True),
        "resynth": lambda: step_mixture(model, x, tokens, pos, st, W, k.block),
        "sample_latents": lambda: sample_latents(*mixture, noise.mixture, noise.gaussian, st.params),
        "decode": lambda: k.decode(e.codec, e.m, e.dec),
        "step": lambda: e._step(key),
    }
    out = {p: graph_time(f) for p, f in parts.items()}
    st.active.copy_(saved)
    emit(bench="breakdown", variant=name, batch=e.max_sessions, window=W, **{f"{p}_ms": v for p, v in out.items()},
         parts_sum_ms=sum(v for p, v in out.items() if p not in ("step", "sample_tokens_top_p")))


KERNEL_KINDS = (("quant_linear", ("int8_", "int4_")), ("cublas_linear", ("gemm", "gemv", "sm90_", "cutlass", "Kernel2")),
                ("attention", ("attention", "fmha", "flash")), ("inductor_fused", ("triton_",)))


@torch.no_grad()
def profile_step(e: LiveEngine, name: str, reps: int = 5, top: int = 25) -> None:
    """Device time of one live step by kernel (the step run eagerly with the engine's kernels,
    `reps` times under torch.profiler), at an early window and at the rows' position: the `top`
    kernels, and the totals by kind."""
    for slot in (200, int(e.state.host_pos.max()) + 1):  # an early window (256 slots), and the rows' own
        profile_window(e, name, e.graphs.key(slot, False), reps, top)


def profile_window(e: LiveEngine, name: str, key, reps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    e.graphs.dry_run(e._step, key, times=1)  # rows inactive: no state moves
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        e.graphs.dry_run(e._step, key, times=reps)
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total / 1e3 / reps
            count[ev.name] += 1
    kinds = defaultdict(float)
    for k, ms in total.items():
        kind = next((kd for kd, marks in KERNEL_KINDS if any(m in k for m in marks)), "other")
        kinds[kind] += ms
    emit(bench="step_profile", variant=name, batch=e.max_sessions, window=key.window, kernels_per_step=sum(count.values()) / reps,
         device_ms=sum(total.values()), **{f"{k}_ms": v for k, v in kinds.items()})
    for k in sorted(total, key=total.get, reverse=True)[:top]:
        emit(bench="step_kernel", variant=name, kernel=k[:90], ms=total[k], calls=count[k] / reps)


def bandwidth() -> tuple[float, float]:
    """GB/s of a device-to-device copy (bytes read + written) and of a sum (bytes read)."""
    n = 2 * 1024 ** 3 // 2  # 2 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = graph_time(lambda: dst.copy_(src), iters=20)
    read_ms = graph_time(lambda: src.sum(dtype=torch.float32), iters=20)
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * 2 * 1024 ** 3 / (copy_ms * 1e-3) / 1e9, 2 * 1024 ** 3 / (read_ms * 1e-3) / 1e9


@torch.no_grad()
def bench_completion(model, variant, name, device, prompt_s=3.0, gen_s=20.0, tags=None):
    g = Generator(model, batch_size=1, **engine_args(variant))
    audio = synthetic_audio(1, prompt_s, seed=3)[None]
    steps = int(gen_s * 8)
    t = time.perf_counter()
    g.complete(audio, steps, seed=0)  # first call: compilation and graph capture
    sync(device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = g.complete(audio, steps, seed=1)
    sync(device)
    wall = time.perf_counter() - t
    frames = g.codec.encode(audio.to(device, next(g.codec.parameters()).dtype))[0]
    t = time.perf_counter()
    g.generate(frames, steps, seed=2)
    sync(device)
    gen = time.perf_counter() - t
    emit(bench="mono_completion", variant=name, **(tags or {}), prompt_s=prompt_s, generated_s=gen_s, latents=steps,
         latents_per_s=steps / wall, wall_s=wall, generate_only_latents_per_s=steps / gen,
         realtime_factor=gen_s / wall, first_call_s=first, out_samples=int(out.shape[-1]))


@torch.no_grad()
def check(device) -> None:
    """On the GPU: CUDA-graph steps equal eager steps; compiled steps match eager ones."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model("small", True, device, dtype)
        prompt = synthetic_audio(2, 2.0, seed=5)
        user = synthetic_audio(2, 30 * 0.125, seed=6).numpy().reshape(2, 30, 2000).transpose(1, 0, 2)
        outs = {}
        variants = [("eager", dict(cuda_graphs=False, compile=False)),
                    ("graphs", dict(cuda_graphs=True, compile=False))]
        if dtype == torch.float32:  # other kernels round differently: compare them where rounding is small
            from tests.conv_stream import ConvStreamCodec  # the reference codec (cuDNN convolutions)
            variants += [("graphs+conv-codec", dict(cuda_graphs=True, compile=False, codec=ConvStreamCodec(model.codec))),
                         ("graphs+compile-block", dict(cuda_graphs=True, compile=("block",)))]
        for name, variant in variants:
            e = LiveEngine(model, max_sessions=2, **engine_args(variant))
            for r in range(2):  # row 1 uses top-p for 15 steps, then not: both graphs of a window run
                e.reset(r, SamplingParams(top_p=0.9) if r else SamplingParams(), seed=r, prompt=prompt)
            o = []
            for i, u in enumerate(user):
                if i == 15:
                    e.set_params(1, SamplingParams())
                o.append(e.step(u))
            o = torch.stack(o)
            outs[name] = (o, e.state.toks.clone(), e.positions, e.state.pos.cpu().numpy())
        ref, ref_toks, ref_pos, _ = outs["eager"]
        for name, (o, toks, pos, dev_pos) in outs.items():
            emit(bench="check", what="live", dtype=str(dtype), variant=name,
                 rel_err=float((o - ref).norm() / ref.norm()),
                 max_abs=float((o - ref).abs().max()), token_slots_equal=int((toks == ref_toks).all(-1).all(0).sum()),
                 slots=int(pos.max()), positions_equal=bool((pos == ref_pos).all()),
                 device_matches_host=bool((dev_pos == pos).all()))
        g_ref = Generator(model, batch_size=2, cuda_graphs=False).complete(prompt[None].expand(2, -1, -1), 30, seed=1)
        g = Generator(model, batch_size=2, cuda_graphs=True).complete(prompt[None].expand(2, -1, -1), 30, seed=1)
        emit(bench="check", what="completion", dtype=str(dtype), variant="graphs",
             max_abs=float((g - g_ref).abs().max()), rel_err=float((g - g_ref).norm() / g_ref.norm()))
        del model
        emit(bench="check_done", elapsed_s=time.time() - T0)


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_mode(args, size, quantize, kv, device, dtype, names, variants, batches, steps, read_bw, over) -> None:
    """Everything for one size and mode: weights, the live step at batch 1 (each variant), the
    other batches (the fastest variant), the mono completion. The model is freed at the end."""
    cuda = device.type == "cuda"
    tags = dict(size=size, quantize=quantize, kv_dtype=kv)
    for flag, (module, name, value, tag, tag_value, _) in SWITCHES.items():
        if getattr(args, flag) and cuda and (flag != "int_to_float" or quantize != "none"):
            setattr(importlib.import_module(module), name, value)
            tags[tag] = tag_value
    model = make_model(size, True, device, dtype, quantize)
    free(cuda)  # the peak from here on: quantized weights + engine, not the float model quantized from
    wb = weight_bytes(model)
    emit(bench="weights", **tags, gb=wb["total"] / 1e9, transformer_bytes=wb["total"] - wb["codec"],
         floor_ms=wb["total"] / (read_bw * 1e9) * 1e3 if read_bw else None)
    p50, peak_done = {}, False
    for name in names:
        if over():
            break
        try:
            e, p50[name] = bench_live(model, 1, dict(variants[name], kv_dtype=kv), name,
                                      min(steps, 50) if name == "eager" else steps, device,
                                      full_context=name != "eager" or not cuda, tags=tags)
        except Exception as ex:  # a failed variant is reported, the others still run
            emit(bench="live_step", variant=name, **tags, batch=1, error=f"{type(ex).__name__}: {ex}"[:500])
            continue
        if cuda and name != "eager" and not peak_done:  # weights + one engine, before other variants' pools
            peak_done = True
            emit(bench="peak_memory", what="duplex live, batch 1", **tags,
                 gb=torch.cuda.max_memory_allocated() / 1e9, reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                 allocated_now_gb=torch.cuda.memory_allocated() / 1e9, kv_bytes=e.state.kv_bytes)
        if cuda and args.breakdown and name != "eager" and not over():
            breakdown(e, name)
        if cuda and args.profile and name != "eager" and not over():
            profile_step(e, name)
        del e
        gc.collect()
    if p50:
        best = min(p50, key=p50.get)
        for b in batches:
            if b == 1 or over():
                continue
            free(cuda)
            e, _ = bench_live(model, b, dict(variants[best], kv_dtype=kv), best, steps, device, tags=tags)
            emit(bench="peak_memory", what=f"duplex live, batch {b}", **tags, kv_bytes=e.state.kv_bytes,
                 gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None)
            del e
    del model
    free(cuda)
    if args.no_mono or over() or not p50:
        return
    model = make_model(size, False, device, dtype, quantize)
    free(cuda)
    bench_completion(model, dict(variants[best], kv_dtype=kv), best, device, gen_s=args.gen_seconds, tags=tags)
    del model
    free(cuda)


def run_alone(args, size: str, quantize: str, kv: str, budget_s: float) -> None:
    """This benchmark for one size and mode in a child process (its lines go to our stdout).
    A process keeps ~0.5-0.7 GB of GPU memory after a model, its engines and its compiled blocks
    are freed (measured on the H200), which the next mode's peak would otherwise include."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--sizes", size,
           "--quantize", quantize, "--kv-dtype", kv, "--variants", args.variants,
           "--gen-seconds", str(args.gen_seconds), "--budget-s", str(max(budget_s, 0.0))]
    cmd += ["--batches", args.batches] if args.batches else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    flags = ("breakdown", "profile", "no_mono", *SWITCHES)
    cmd += [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag)]
    rc = subprocess.run(cmd).returncode
    if rc:
        emit(bench="mode_failed", size=size, quantize=quantize, kv_dtype=kv, returncode=rc)


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated presets (default: hertz_dev on cuda, tiny,small on cpu)")
    ap.add_argument("--batches", default=None, help="live batch sizes (default 1,4,8 on cuda, 1,4 on cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed live steps per batch")
    ap.add_argument("--variants", default="graphs,graphs+compile-block",
                    help="cuda: some of eager, graphs, graphs+compile-block, graphs+compile-block+sdpa (decode attention by SDPA, as before the decode kernel), graphs+compile; the fastest at batch 1 runs the other batches and the completion")
    ap.add_argument("--check", action="store_true", help="GPU equality checks first")
    ap.add_argument("--breakdown", action="store_true", help="time each part of the live step")
    ap.add_argument("--profile", action="store_true", help="device time of a live step by kernel (torch.profiler)")
    ap.add_argument("--no-mono", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--quantize", default="none", help=f"comma-separated weight modes: none, {', '.join(MODES)}")
    ap.add_argument("--kv-dtype", default="auto", help="comma-separated KV cache dtypes: auto, fp8")
    ap.add_argument("--gen-seconds", type=float, default=20.0, help="length of the mono completion")
    for flag, (module, name, value, tag, tag_value, what) in SWITCHES.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", action="store_true",
                        help=f"{what} ({module}.{name} = {value}), to compare (CUDA); lines say {tag}: {tag_value}")
    args = ap.parse_args()
    for q in args.quantize.split(","):
        if q not in ("none",) + MODES:
            ap.error(f"--quantize: unknown mode {q!r}; choose from none, {', '.join(MODES)}")
    for kv in args.kv_dtype.split(","):
        if kv not in KV_DTYPES:
            ap.error(f"--kv-dtype: unknown dtype {kv!r}; choose from {', '.join(KV_DTYPES)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():  # (after the flags' own errors)
        sys.exit("error: --device cuda: this machine has no CUDA GPU (--device cpu times tiny and small on the CPU)")
    sizes = (args.sizes or ("hertz_dev" if cuda else "tiny,small")).split(",")
    batches = [int(b) for b in (args.batches or ("1,4,8" if cuda else "1,4")).split(",")]
    steps = args.steps or (200 if cuda else 20)
    dtype = torch.bfloat16 if cuda else torch.float32
    variants = {"eager": dict(cuda_graphs=False, compile=False), "graphs": dict(cuda_graphs=True, compile=False),
                "graphs+compile-block": dict(cuda_graphs=True, compile=("block",)),
                "graphs+compile-block+sdpa": dict(cuda_graphs=True, compile=("block",), attention="sdpa"),
                "graphs+compile": dict(cuda_graphs=True, compile=True)}
    names = args.variants.split(",") if cuda else ["eager"]
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu",
         threads=torch.get_num_threads())
    modes = [(size, q, kv) for size in sizes for q in args.quantize.split(",") for kv in args.kv_dtype.split(",")]
    alone = cuda and len(modes) > 1  # each mode in a process of its own: its memory figures are its own
    if cuda and not alone:  # (a child measures the bandwidth for its mode)
        torch.backends.cudnn.benchmark = True
        copy_bw, read_bw = bandwidth()
        emit(bench="bandwidth", copy_gb_per_s=copy_bw, read_gb_per_s=read_bw)

    def over():
        return time.time() - T0 > args.budget_s

    for i, (size, quantize, kv) in enumerate(modes):
        if over():  # say what the budget left out rather than end silently
            for left in modes[i:]:
                emit(bench="skipped", **dict(zip(("size", "quantize", "kv_dtype"), left)),
                     reason=f"--budget-s {args.budget_s:g} spent")
            break
        if alone:
            run_alone(args, size, quantize, kv, args.budget_s - (time.time() - T0))
        else:
            bench_mode(args, size, quantize, kv, device, dtype, names, variants, batches, steps,
                       read_bw if cuda else None, over)
    if args.check and cuda and not over():  # last: the equalities were also checked in earlier runs
        try:
            check(device)
        except Exception as ex:
            emit(bench="check", error=f"{type(ex).__name__}: {ex}"[:1000])
    emit(bench="done", elapsed_s=time.time() - T0)


if __name__ == "__main__":
    main()
