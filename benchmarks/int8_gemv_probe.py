"""Where the one-row int8 GEMV loses its bandwidth: variants of `model.quant_kernels._int8_gemv` on
the LM's four weight shapes (40 layers of each in one CUDA graph: cold weights, as in the step).
One JSON object a line; `us` per layer, `tb_per_s` of int8 weights read.

    python benchmarks/int8_gemv_probe.py [--modes bits,tma]

Modes: `bits` (the model's kernel: each weight's float from its bits, x loaded as a vector and
broadcast), `prmt` (the same float made by one byte-permute instruction a weight, inline PTX),
`no_x` (prmt, times 1 instead of x: what loading and broadcasting x costs), `x2d` (prmt, x loaded in
the weights' two-dimensional shape, so that no layout conversion through shared memory is needed),
`bits_x2d` (bits, x as in x2d), `load_only` (the weights read as 32-bit words and xor-ed together: the bandwidth of the access
pattern itself), `tma` (bits, the weight tiles copied by the tensor memory accelerator through
shared memory), `pdl_wait` and `pdl` (bits as a programmatic dependent launch, Hopper: its programs
may start while the previous kernel's last ones run; pdl_wait waits for that kernel first thing,
pdl loads its first weight tile before waiting; on the square shape a chain of 40 layers, each
reading the previous output, checks them bit for bit against bits: the `pdl_chain` lines), plus
`bf16` (cuBLAS F.linear on bf16 weights of the same shape, its bytes).
Session 25 also timed the 4-bit GEMV with x loaded in the weights' shape: 1.7-2.1x slower than
`model.quant_kernels._int4_gemv` (the `int4_x3d` lines of the results file; that variant is not
kept here).

Measured (session 25, an H100; benchmarks/results/h100_session25.txt): `prmt` 0.5-2% faster than
`bits`, `x2d` and `no_x` no faster (the broadcast of x is not what limits the kernel), `load_only`
only 7-11% faster than `bits`: on the H100 the model's GEMV reads at 2.45-2.61 TB/s, about cuBLAS's
bf16 rate (2.53-2.77) and 90-94% of what its access pattern reads with no arithmetic at all.
Session 27 (benchmarks/results/h100_session27.txt, h200_session27.txt): `tma` is slower than `bits`
on every shape (H100: 25.2 against 20.5 us at 12288x4096, 16.9 against 8.4 at 4096x4096); on the
H200 `pdl` is 4-15% faster a layer than `bits` in these back-to-back chains (4096x4096: 6.44
against 7.57 us; 22016x4096: 26.4 against 28.6), equal bit for bit, but the model's int8 step with
its GEMVs so launched was no faster (5.29 ms against 5.09; 5.06 with the compiled block's kernels
as dependent launches too; session 7 had found the same with its GEMV: README, Memory and speed),
so the model does not use it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MODES = {"bits": 0, "prmt": 1, "no_x": 2, "x2d": 3, "load_only": 4, "bits_x2d": 5, "pdl_wait": 6, "pdl": 7}
PDL_MODES = ("pdl_wait", "pdl")


@triton.jit
def _f32_prmt(w):
    """Four int8 in one register -> four float32 2^23 + 128 + w (bits 0x4B0000uu, u = w ^ 0x80)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t;
        xor.b32 t, $4, 0x80808080;
        prmt.b32 $0, t, 0x4B000000, 0x7540;
        prmt.b32 $1, t, 0x4B000000, 0x7541;
        prmt.b32 $2, t, 0x4B000000, 0x7542;
        prmt.b32 $3, t, 0x4B000000, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,r", args=[w], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if MODE == 4:
        wp = w_ptr.to(tl.pointer_type(tl.int32))
        K4 = K // 4
        rk4 = tl.arange(0, BLOCK_K // 4)
        acci = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.int32)
        for k0 in range(0, K4, BLOCK_K // 4):
            kk = k0 + rk4
            acci ^= tl.load(wp + rn[:, None] * K4 + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K4), other=0)
        y = tl.xor_sum(acci, axis=1).to(tl.float32)
    elif MODE == 6 or MODE == 7:
        # `bits` launched as a programmatic dependent launch (Hopper): this kernel's programs may
        # start while the previous kernel's last ones run, and wait (griddepcontrol.wait) before
        # reading what it wrote; pdl_wait waits first thing, pdl loads its first weight tile
        # (which no kernel writes) before waiting
        tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if MODE == 6:
            tl.extra.cuda.gdc_wait()
        m = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=m, other=0)
        if MODE == 7:
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
        acc += ((w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
                - 8388736.0) * x.to(tl.float32)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            kk = k0 + rk
            m = (rn[:, None] < N) & (kk[None, :] < K)
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=m, other=0)
            f = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            acc += f * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            m = (rn[:, None] < N) & (kk[None, :] < K)
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=m, other=0)
            if MODE == 0 or MODE == 5:
                f = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            else:
                f = _f32_prmt(w) - 8388736.0
            if MODE == 2:
                acc += f
            elif MODE == 3 or MODE == 5:
                x = tl.load(x_ptr + kk[None, :] + 0 * rn[:, None], mask=m, other=0.0)
                acc += f * x.to(tl.float32)
            else:
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
                acc += f * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, (y * s).to(y_ptr.dtype.element_ty), mask=rn < N)


CONFIGS = [(4, 1024, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8), (4, 2048, 8), (16, 512, 8)]


@triton.jit
def _gemv_tma(x_ptr, w_desc, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`bits`, the weight tiles brought in by the Hopper tensor memory accelerator (a host-made
    descriptor; Triton pipelines the copies through shared memory over num_stages)."""
    n0 = tl.program_id(0) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_desc.load([n0, k0])
        x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0)
        f = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        acc += f * x.to(tl.float32)[None, :]
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, (tl.sum(acc, axis=1) * s).to(y_ptr.dtype.element_ty), mask=rn < N)


TMA_CONFIGS = [(16, 256, 4, 4), (16, 256, 4, 6), (32, 256, 4, 4), (32, 256, 8, 4), (8, 256, 4, 6), (64, 128, 4, 6)]


@torch.no_grad()
def tma(n, k, ws, x, y, ref, graph_time):
    from triton.tools.tensor_descriptor import TensorDescriptor
    best = None
    for bn, bk, nw, st in TMA_CONFIGS:
        descs = [(TensorDescriptor.from_tensor(q, [bn, bk]), s) for q, s in ws]

        def call(d, s, bn=bn, bk=bk, nw=nw, st=st):
            _gemv_tma[(triton.cdiv(n, bn),)](x, d, s, y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st)
        try:
            call(*descs[0])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            us = graph_time(lambda: [call(*d) for d in descs], iters=10) / len(descs) * 1e3
        except Exception as e:
            emit(bench="probe", out=n, inp=k, mode="tma", config=[bn, bk, nw, st], error=f"{type(e).__name__}: {e}"[:300])
            continue
        if best is None or us < best[0]:
            best = (us, [bn, bk, nw, st], err)
    if best:
        emit(bench="probe", out=n, inp=k, mode="tma", us=best[0], tb_per_s=n * k / best[0] / 1e6, config=best[1],
             rel_err=best[2])


@torch.no_grad()
def pdl_chain_check(n, ws):
    """The PDL modes where each layer reads what the kernels before it wrote (the model's case; the
    timings above read one x): 40 square layers, each GEMV's input the previous output through a
    torch kernel (not a dependent launch), then through a dependent launch alone, replayed as one
    CUDA graph 20 times. Each output must equal `bits`' bit for bit (same configuration)."""
    outs = {}
    for mode in ("bits", *PDL_MODES):
        xs = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws) + 1)]
        x0 = torch.randn(1, n, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))

        def chain(mode=mode, xs=xs, x0=x0):
            xs[0].copy_(x0)
            for i, (q, s) in enumerate(ws):
                _gemv[(triton.cdiv(n, 16),)](xs[i], q, s * 64, xs[i + 1], n, n, MODE=MODES[mode], BLOCK_N=16,
                                             BLOCK_K=256, num_warps=4, num_stages=3, launch_pdl=mode in PDL_MODES)
                if i % 2:
                    xs[i + 1].copy_(torch.nn.functional.normalize(xs[i + 1].float(), dim=-1) * n ** 0.5)
        g = torch.cuda.CUDAGraph()
        chain()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            chain()
        results = []
        for _ in range(20):
            xs[-1].zero_()
            g.replay()
            torch.cuda.synchronize()
            results.append(xs[-1].clone())
        outs[mode] = results
    for mode in PDL_MODES:
        same = sum(bool(torch.equal(a, b)) for a, b in zip(outs[mode], outs["bits"]))
        emit(bench="pdl_chain", mode=mode, size=n, layers=len(ws), replays=20, equal_to_bits=same,
             finite=bool(torch.isfinite(outs["bits"][0]).all()))


def emit(**f):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()}), flush=True)


@torch.no_grad()
def main() -> None:
    from benchmarks.inference import graph_time
    from config import ArgumentParser
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(["bf16", *MODES, "tma"]),
                    help="comma-separated int8 modes to time (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/int8_gemv_probe.py measures CUDA kernels and needs a CUDA GPU")
    modes = set(args.modes.split(","))
    if modes - {"bf16", "tma", *MODES}:
        ap.error(f"--modes: unknown {', '.join(sorted(modes - {'bf16', 'tma', *MODES}))}")
    emit(bench="env", torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name())
    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        torch.manual_seed(0)
        ws = [(torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8),
               torch.rand(n, device="cuda", dtype=torch.bfloat16) / 127 / k ** 0.5) for _ in range(40)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ (ws[0][0].float() * ws[0][1].float()[:, None]).t())
        if "bf16" in modes:
            bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(20)]
            us = graph_time(lambda: [F.linear(x, w) for w in bf], iters=20) / len(bf) * 1e3
            emit(bench="probe", out=n, inp=k, mode="bf16", us=us, tb_per_s=2 * n * k / us / 1e6)
            del bf
        for mode, code in MODES.items():
            if mode not in modes:
                continue
            best = None
            for bn, bk, nw in CONFIGS:
                for st in (3,):
                    def call(q, s, bn=bn, bk=bk, nw=nw, st=st):
                        _gemv[(triton.cdiv(n, bn),)](x, q, s, y, n, k, MODE=code, BLOCK_N=bn, BLOCK_K=bk,
                                                    num_warps=nw, num_stages=st, launch_pdl=mode in PDL_MODES)
                    try:
                        call(*ws[0])
                        err = ((y.float() - ref).norm() / ref.norm()).item() if mode in ("bits", "prmt", "x2d", "bits_x2d", *PDL_MODES) else None
                        us = graph_time(lambda: [call(*w) for w in ws], iters=10) / len(ws) * 1e3
                    except Exception as e:
                        emit(bench="probe", out=n, inp=k, mode=mode, config=[bn, bk, nw, st], error=f"{type(e).__name__}: {e}"[:300])
                        continue
                    if best is None or us < best[0]:
                        best = (us, [bn, bk, nw, st], err)
            if best:
                emit(bench="probe", out=n, inp=k, mode=mode, us=best[0], tb_per_s=n * k / best[0] / 1e6,
                     config=best[1], rel_err=best[2])
        if "tma" in modes:
            tma(n, k, ws, x, y, ref, graph_time)
        if n == k and modes & set(PDL_MODES):
            pdl_chain_check(n, ws)
        del ws


if __name__ == "__main__":
    main()
