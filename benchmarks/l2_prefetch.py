"""Does prefetching a layer's weights into L2 while the device waits on something else shorten an
int8 one-row step? One JSON object a line. CUDA only.

    python benchmarks/l2_prefetch.py

A stand-in for the LM's 32 layers at the hertz_dev size, int8 weights (`model.quant_kernels`), each
layer: QKV GEMV, an idle wait standing in for attention and the norms (`torch.cuda._sleep`), the
output projection, a shorter wait, gate/up, down. Distinct weights per layer (6.5 GB), so nothing
is in L2 unless prefetched. The whole pass is one CUDA graph (median of replays). Variants: `none`;
`loads-C` (C programs read the output projection's weights with evict_last loads on a side stream
during the wait); `lines` (`prefetch.global.L2::evict_last` per 128-byte line, side stream);
`bulk` (Hopper's `cp.async.bulk.prefetch.L2`, 16 KiB a request, side stream). Also each kernel's
time cold and hot (its weights just read), the most a prefetch could save.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from config import ArgumentParser  # noqa: E402
from benchmarks.inference import graph_time  # noqa: E402
from model.quant_kernels import int8_linear  # noqa: E402

LAYERS, D, QKV, UP, HID = 32, 4096, 12288, 22016, 11008
SLEEP_ATT, SLEEP_SMALL = 20_000, 4_000  # cycles (~10 us and ~2 us at ~1.98 GHz)


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


@triton.jit
def _prefetch_loads(ptr, out_ptr, n_words, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _prefetch_lines(ptr, out_ptr, n_bytes, LINES: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.minimum((pid * LINES + tl.arange(0, LINES)).to(tl.int64) * 128, n_bytes - 128)
    r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptr + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + pid, tl.sum(r))


@triton.jit
def _prefetch_bulk(ptr, out_ptr, n_bytes, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.minimum((pid * CHUNKS + tl.arange(0, CHUNKS)).to(tl.int64) * CHUNK, n_bytes - CHUNK)
    size = tl.full((CHUNKS,), CHUNK, tl.int32)
    r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + pid, tl.sum(r))


def prefetcher(kind: str, out: torch.Tensor):
    def loads(w, programs):
        words = w.view(torch.int32).view(-1)
        iters = triton.cdiv(words.numel(), programs * 1024)
        _prefetch_loads[(programs,)](words, out, words.numel(), ITERS=iters, BLOCK=1024, num_warps=4)

    def lines(w):
        b = w.view(-1)
        _prefetch_lines[(triton.cdiv(b.numel(), 128 * 256),)](b, out, b.numel(), LINES=256, num_warps=4)

    def bulk(w):
        b = w.view(-1)
        chunk = 16384
        _prefetch_bulk[(triton.cdiv(b.numel(), chunk * 32),)](b, out, b.numel(), CHUNK=chunk, CHUNKS=32, num_warps=1)

    if kind.startswith("loads-"):
        programs = int(kind.split("-")[1])
        return lambda w: loads(w, programs)
    return {"lines": lines, "bulk": bulk}[kind]


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"

    def q(n, k):
        return (torch.randint(-127, 128, (LAYERS, n, k), dtype=torch.int8, device=dev),
                torch.rand(LAYERS, n, device=dev, dtype=torch.bfloat16) * 1e-3)

    wqkv, wo, wup, wdown = q(QKV, D), q(D, D), q(UP, D), q(D, HID)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    xh = torch.randn(1, HID, device=dev, dtype=torch.bfloat16)
    out = torch.zeros(4096, dtype=torch.int32, device=dev)
    side = torch.cuda.Stream()

    def step(pre=None, what="o"):
        for i in range(LAYERS):
            int8_linear(x, wqkv[0][i], wqkv[1][i])
            if pre is not None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    pre(wo[0][i])
                    if what == "o+up":
                        pre(wup[0][i][:6144])  # the first 25 MB of gate/up
            torch.cuda._sleep(SLEEP_ATT)
            if pre is not None:
                torch.cuda.current_stream().wait_stream(side)
            int8_linear(x, wo[0][i], wo[1][i])
            torch.cuda._sleep(SLEEP_SMALL)
            int8_linear(x, wup[0][i], wup[1][i])
            torch.cuda._sleep(SLEEP_SMALL // 2)
            int8_linear(xh, wdown[0][i], wdown[1][i])

    step()  # kernel choices and autotuning outside capture
    torch.cuda.synchronize()
    emit(bench="sleep_only", ms=graph_time(lambda: [torch.cuda._sleep(SLEEP_ATT + SLEEP_SMALL * 3 // 2)
                                                   for _ in range(LAYERS)]))
    for kind in ("none", "loads-66", "loads-132", "lines", "bulk"):
        for what in (("o",) if kind == "none" else ("o", "o+up")):
            try:
                pre = None if kind == "none" else prefetcher(kind, out)
                emit(bench="l2_prefetch", variant=kind, prefetch=what, ms=graph_time(lambda: step(pre, what), iters=30))
            except Exception as e:  # a variant that fails to compile still leaves the others' figures
                emit(bench="l2_prefetch", variant=kind, prefetch=what, error=f"{type(e).__name__}: {str(e)[:300]}")

    for name, (w, s), xi in (("qkv", wqkv, x), ("o", wo, x), ("up", wup, x), ("down", wdown, xh)):
        cold = graph_time(lambda: [int8_linear(xi, w[i], s[i]) for i in range(LAYERS)]) / LAYERS
        twice = graph_time(lambda: [int8_linear(xi, w[i], s[i]) for i in range(LAYERS) for _ in range(2)]) / LAYERS
        emit(bench="kernel_l2", layer=name, bytes=w[0].numel(), cold_us=cold * 1e3, hot_us=(twice - cold) * 1e3,
             cold_tb_s=w[0].numel() / cold / 1e9)


if __name__ == "__main__":
    ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # (--help)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/l2_prefetch.py measures CUDA kernels and needs a CUDA GPU")
    main()
