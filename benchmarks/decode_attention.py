"""The decode step's attention on CUDA: SDPA (as the forward called it before, a float8 cache
upcast first) against `model.attention_kernels.decode_attention`, at the hertz_dev shapes (LM: 32
heads of 128; resynthesizer: 16 heads of 256), for each attention window of the engines, a few
batch sizes and both cache dtypes. Each figure is the time of one layer's call, from a CUDA graph
of one call per layer over 4-40 layers (about 400 MB of caches, at most 40 layers): at one row and
windows up to 512 the 40 layers' caches (40-84 MB) are partly or wholly in the H200's 50 MB L2, so
those figures are of a warm cache, which the live step, streaming its weights, does not have.
One JSON line each.

    python benchmarks/decode_attention.py                   # the table
    python benchmarks/decode_attention.py --sweep           # also the kernel's chunking settings
    python benchmarks/decode_attention.py --step 1,32       # the int8 + fp8-KV live step, both ways

`--step` builds the hertz_dev duplex model (random weights, int8) and, per batch size, two live
engines with float8 caches that differ only in how decode steps attend (the kernel, SDPA), and
times them in alternating rounds (steps near the start of the context, then at its end), so
that both see the same state of the machine: one JSON line per batch and phase with the median
of the rounds' p50s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import ArgumentParser  # noqa: E402
from model import attention_kernels as ak  # noqa: E402

SHAPES = {"lm": (32, 32, 128), "resynth": (16, 16, 256)}  # heads, kv heads, head dim


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def graph_us(fns, reps: int = 20) -> float:
    """Microseconds per function of one CUDA graph calling each of `fns` once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps / len(fns) * 1e6


def sdpa(q, k, v, bias, gqa):
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias, enable_gqa=gqa)


def case(kind, B, W, kv, max_len=2048):
    """Layers of caches (B, Hkv, max_len, D) viewed over the first W slots, queries, a mask with
    every row at the window's last slot."""
    H, Hkv, D = SHAPES[kind]
    per_layer = 2 * B * Hkv * W * D * (1 if kv == "fp8" else 2)
    layers = max(4, min(40, -(-400_000_000 // per_layer)))
    dt = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
    caches = []
    for _ in range(layers):
        k = torch.randn(B, Hkv, max_len, D, device="cuda").to(dt)[:, :, :W]
        v = torch.randn(B, Hkv, max_len, D, device="cuda").to(dt)[:, :, :W]
        caches.append((k, v))
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((B,), W - 1, device="cuda")
    pos[::2] = W // 2  # half the rows half-way: masked slots inside the window
    bias = torch.zeros(B, 1, 1, W, device="cuda", dtype=torch.bfloat16)
    bias.masked_fill_(~(torch.arange(W, device="cuda") <= pos[:, None])[:, None, None], float("-inf"))
    return q, caches, bias, Hkv != H


def measure(kind, B, W, kv):
    q, caches, bias, gqa = case(kind, B, W, kv)
    k, v = caches[0]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), enable_gqa=gqa)
    err = {name: float((f(q, k, v, bias, gqa).float() - ref).abs().max())
           for name, f in (("sdpa", sdpa), ("kernel", lambda *a: ak.decode_attention(*a[:4])))}
    t_sdpa = graph_us([lambda k=k, v=v: sdpa(q, k, v, bias, gqa) for k, v in caches])
    t_kernel = graph_us([lambda k=k, v=v: ak.decode_attention(q, k, v, bias) for k, v in caches])
    emit(bench="decode_attention", shape=kind, batch=B, window=W, kv_dtype=kv, layers=len(caches),
         sdpa_us=t_sdpa, kernel_us=t_kernel, speedup=t_sdpa / t_kernel,
         chunk=ak.chunk_length(B * SHAPES[kind][0], W), max_abs_err_sdpa=err["sdpa"], max_abs_err_kernel=err["kernel"])
    return t_sdpa, t_kernel


def step_compare(batches, steps: int = 50, rounds: int = 4) -> None:
    import numpy as np
    import inference as bi  # benchmarks/inference.py
    model = bi.make_model("hertz_dev", True, torch.device("cuda"), torch.bfloat16, "int8")
    for B in batches:
        engines = {}
        for name in ("kernel", "sdpa"):
            t = time.perf_counter()
            e = bi.live_engine(model, B, dict(cuda_graphs=True, compile=("block",), kv_dtype="fp8", attention=name))
            e.warmup()
            torch.cuda.synchronize()
            engines[name] = e
            emit(bench="step_setup", batch=B, attention=name, setup_s=time.perf_counter() - t)
        for phase in ("start", "end"):
            p50 = {name: [] for name in engines}
            for _ in range(rounds):
                for name, e in engines.items():
                    at = 100 if phase == "start" else e.state.max_len - steps - 10
                    e.state.pos.fill_(at)
                    e.state.host_pos[:] = at
                    times, _ = bi.time_live(e, steps)
                    p50[name].append(float(np.percentile(times, 50)))
            k, s = float(np.median(p50["kernel"])), float(np.median(p50["sdpa"]))
            emit(bench="step_compare", quantize="int8", kv_dtype="fp8", batch=B, phase=phase, steps=steps,
                 rounds=rounds, kernel_p50_ms=k, sdpa_p50_ms=s, saved_ms=s - k, kernel_rounds=p50["kernel"],
                 sdpa_rounds=p50["sdpa"])
        del engines, e
        torch.cuda.empty_cache()


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="128,256,512,1024,2048")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--sweep", action="store_true", help="time TARGET_PROGRAMS and BLOCK_S choices first")
    ap.add_argument("--step", default=None, help="batch sizes: compare the live step both ways instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/decode_attention.py measures CUDA kernels and needs a CUDA GPU")
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name())
    if args.step:
        return step_compare([int(b) for b in args.step.split(",")])
    windows = [int(w) for w in args.windows.split(",")]
    if args.sweep:
        default = (ak.TARGET_PROGRAMS, ak.BLOCK_S, ak.NUM_WARPS)
        for kind in SHAPES:
            for kv in ("fp8",):
                for B, W in ((1, 256), (1, 2048), (8, 2048), (64, 256), (64, 2048)):
                    q, caches, bias, _ = case(kind, B, W, kv)
                    for target in (256, 1024, 4096):
                        for block in (16, 32, 64):
                            for warps in (4, 8):
                                ak.TARGET_PROGRAMS, ak.BLOCK_S, ak.NUM_WARPS = target, block, warps
                                us = graph_us([lambda k=k, v=v: ak.decode_attention(q, k, v, bias) for k, v in caches])
                                emit(bench="sweep", shape=kind, kv_dtype=kv, batch=B, window=W, target_programs=target,
                                     block_s=block, num_warps=warps, chunk=ak.chunk_length(B * SHAPES[kind][0], W),
                                     kernel_us=us)
                    del q, caches, bias
                    torch.cuda.empty_cache()
        ak.TARGET_PROGRAMS, ak.BLOCK_S, ak.NUM_WARPS = default
    totals = {}
    for kind in SHAPES:
        for B in (int(b) for b in args.batches.split(",")):
            for kv in ("auto", "fp8"):
                for W in windows:
                    t = measure(kind, B, W, kv)
                    totals[(kind, B, kv, W)] = t
                    torch.cuda.empty_cache()
    # A hertz_dev step at batch 1: 32 LM layers and 8 resynthesizer layers.
    for kv in ("auto", "fp8"):
        for W in windows:
            lm, rs = totals.get(("lm", 1, kv, W)), totals.get(("resynth", 1, kv, W))
            if lm and rs:
                emit(bench="step_attention", batch=1, kv_dtype=kv, window=W,
                     sdpa_ms=(32 * lm[0] + 8 * rs[0]) / 1e3, kernel_ms=(32 * lm[1] + 8 * rs[1]) / 1e3)


if __name__ == "__main__":
    main()
