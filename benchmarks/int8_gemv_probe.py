"""Where the one-row int8 GEMV loses its bandwidth: variants of `model.quant_kernels._int8_gemv` on
the LM's four weight shapes (40 layers of each in one CUDA graph: cold weights, as in the step).
One JSON object a line; `us` per layer, `tb_per_s` of int8 weights read.

    python benchmarks/int8_gemv_probe.py [--int4]

Modes: `bits` (the model's kernel: each weight's float from its bits, x loaded as a vector and
broadcast), `prmt` (the same float made by one byte-permute instruction a weight, inline PTX),
`no_x` (prmt, times 1 instead of x: what loading and broadcasting x costs), `x2d` (prmt, x loaded in
the weights' two-dimensional shape, so that no layout conversion through shared memory is needed),
`bits_x2d` (bits, x as in x2d), `load_only` (the weights read as 32-bit words and xor-ed together: the bandwidth of the access
pattern itself), `tma` (bits, the weight tiles copied by the tensor memory accelerator through
shared memory), plus `bf16` (cuBLAS F.linear on bf16 weights of the same shape, its bytes). With
--int4 also the 4-bit GEMV of `model.quant_kernels` (`int4`), the same with x loaded in the weights'
shape (`int4_x3d`), and tinygemm (`int4_tinygemm`, aten._weight_int4pack_mm).

Measured (session 25, an H100; benchmarks/results/h100_session25.txt): `prmt` 0.5-2% faster than
`bits`, `x2d` and `no_x` no faster (the broadcast of x is not what limits the kernel), `load_only`
only 7-11% faster than `bits`: on the H100 the model's GEMV reads at 2.45-2.61 TB/s, about cuBLAS's
bf16 rate (2.53-2.77) and 90-94% of what its access pattern reads with no arithmetic at all.
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

MODES = {"bits": 0, "prmt": 1, "no_x": 2, "x2d": 3, "load_only": 4, "bits_x2d": 5}


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


@triton.jit
def _int4_gemv(x_ptr, w_ptr, sz_ptr, y_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUPS: tl.constexpr, X3D: tl.constexpr):
    """`model.quant_kernels._int4_gemv`, with x loaded either as (G, HALF) and broadcast over the rows
    (as there) or in the weights' (BN, G, HALF) shape (X3D)."""
    HALF: tl.constexpr = GROUP // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    n_groups = K // GROUP
    for g0 in range(0, n_groups, GROUPS):
        gg = g0 + rg
        gmask = gg < n_groups
        byte = gg[:, None] * HALF + rj[None, :]
        m3 = (rn[:, None, None] < N) & gmask[None, :, None]
        b = tl.load(w_ptr + rn[:, None, None] * (K // 2) + byte[None, :, :], mask=m3, other=0)
        if X3D:
            xe = tl.load(x_ptr + 2 * byte[None, :, :] + 0 * rn[:, None, None], mask=m3, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * byte[None, :, :] + 1 + 0 * rn[:, None, None], mask=m3, other=0.0).to(tl.float32)
            qx = tl.sum((b >> 4).to(tl.float32) * xe + (b & 15).to(tl.float32) * xo, axis=2)
            sx = tl.sum(xe + xo, axis=2)
        else:
            xe = tl.load(x_ptr + 2 * byte, mask=gmask[:, None], other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * byte + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
            qx = tl.sum((b >> 4).to(tl.float32) * xe[None] + (b & 15).to(tl.float32) * xo[None], axis=2)
            sx = tl.sum(xe + xo, axis=1)[None, :]
        szp = sz_ptr + (gg[None, :] * N + rn[:, None]) * 2
        smask = (rn[:, None] < N) & gmask[None, :]
        s = tl.load(szp, mask=smask, other=0.0).to(tl.float32)
        z = tl.load(szp + 1, mask=smask, other=0.0).to(tl.float32)
        acc += s * (qx - 8.0 * sx) + z * sx
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


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


INT4_CONFIGS = [(8, 4, 4), (16, 2, 4), (16, 4, 8), (32, 2, 8), (32, 4, 8)]


@torch.no_grad()
def int4(n, k, x, graph_time):
    torch.manual_seed(0)
    ws = [(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
           torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16) / k ** 0.5) for _ in range(40)]
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    from model.quant import dequantize_int4
    ref = x.float() @ dequantize_int4(*ws[0], 128, torch.float32).t()
    packed = [(torch.ops.aten._convert_weight_to_int4pack(q, 8), sz) for q, sz in ws[:20]]
    us = graph_time(lambda: [torch.ops.aten._weight_int4pack_mm(x, p, 128, sz) for p, sz in packed], iters=10) / 20 * 1e3
    emit(bench="probe", out=n, inp=k, mode="int4_tinygemm", us=us, tb_per_s=n * k / 2 / us / 1e6)
    del packed
    for x3d in (False, True):
        best = None
        for bn, g, nw in INT4_CONFIGS:
            def call(q, sz, bn=bn, g=g, nw=nw):
                _int4_gemv[(triton.cdiv(n, bn),)](x, q, sz, y, n, k, GROUP=128, BLOCK_N=bn, GROUPS=g, X3D=x3d,
                                                  num_warps=nw, num_stages=3)
            try:
                call(*ws[0])
                err = ((y.float() - ref).norm() / ref.norm()).item()
                us = graph_time(lambda: [call(*w) for w in ws], iters=10) / len(ws) * 1e3
            except Exception as e:
                emit(bench="probe", out=n, inp=k, mode=f"int4_x3d_{x3d}", config=[bn, g, nw], error=f"{type(e).__name__}: {e}"[:300])
                continue
            if best is None or us < best[0]:
                best = (us, [bn, g, nw], err)
        if best:
            emit(bench="probe", out=n, inp=k, mode="int4_x3d" if x3d else "int4", us=best[0],
                 tb_per_s=n * k / 2 / best[0] / 1e6, config=best[1], rel_err=best[2])


CONFIGS = [(4, 1024, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8), (4, 2048, 8), (16, 512, 8)]


def emit(**f):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()}), flush=True)


@torch.no_grad()
def main() -> None:
    from benchmarks.inference import graph_time
    from config import ArgumentParser
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int4", action="store_true", help="also the 4-bit GEMVs and tinygemm")
    ap.add_argument("--modes", default=",".join(["bf16", *MODES, "tma"]),
                    help="comma-separated int8 modes to time (default: all)")
    args = ap.parse_args()
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
                                                    num_warps=nw, num_stages=st)
                    try:
                        call(*ws[0])
                        err = ((y.float() - ref).norm() / ref.norm()).item() if mode in ("bits", "prmt", "x2d", "bits_x2d") else None
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
        del ws
        if args.int4:
            int4(n, k, x, graph_time)


if __name__ == "__main__":
    main()
