"""Triton kernels of the weight-only quantized linears on CUDA: y = x @ dequant(W).T for bf16/fp16
activations x (M, K) and int8 or 4-bit weights W (N, K), read once, dequantized in registers.

- `int8_linear(x, qweight, scale)`: qweight int8 (N, K), one scale per output channel.
- `int4_linear(x, qweight, scales_and_zeros, group_size)`: qweight uint8 (N, K/2) (the even column
  in the high nibble, `model.quant.pack_nibbles`), scales_and_zeros (K/g, N, 2): w = (q - 8) * s + z.

Each has two kernels: a GEMV for one row (weights times a vector on the CUDA cores, the decode
step's case) and a tiled matrix product on the tensor cores (tl.dot, rows padded to 16) for more
rows (batched sessions, prefill). Both are autotuned by Triton per weight shape and row bucket; for
one row the faster of the two is chosen on first use by timing them (`_choose`), outside CUDA-graph
capture (the engines' warm-up runs every shape first). The int8 GEMV makes each weight's float from
its bits rather than with the int-to-float instruction (`BITS`, below). The backward gives the
activations' gradient only (frozen weights: LoRA on a quantized base). Both are registered as torch custom ops
(`hertz::int8_linear`, `hertz::int4_linear`), so `torch.compile` keeps them as one call in the
compiled block and CUDA graphs replay them. Figures: benchmarks/quant_kernels.py.

Imported only on CUDA (`model.quant` calls it there): the CPU paths need no Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_DOT_MAX_ROWS = 128  # more rows (prefill): a tile of 128 rows a program, the grid grows along M
BITS = True          # the int8 GEMV makes floats from the integers' bits (see below), not by conversion
# The one-row int8 GEMVs as programmatic dependent launches (Hopper): each may start while the
# kernel before it finishes, waiting (griddepcontrol.wait) before it reads anything, and lets the
# kernel after it start once its own programs are past their loads. Off until measured
# (`benchmarks/inference.py --pdl-linears`); session 27's trial let the next kernel start first
# thing, which slowed the step.
PDL = False
NORM_MAX_K = 8192    # the GEMV with a LayerNorm reads the row whole: in_features up to this many


# Few configurations, timed briefly (and remembered on disk): autotuning runs at the first call of
# each weight shape, inside an engine's warm-up. The loads along K are software-pipelined
# (num_stages): a one-row product is bound by how many bytes are in flight.
def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=3, rep=12, quantiles=quantiles)


def _gemv_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))
            for w in (4, 8) for s in (3, 4)]


def _dot_configs(bks):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=s)
            for bn in (16, 32, 64, 128) for bk in bks for s in (3, 5)]


# --- int8 ------------------------------------------------------------------------------------------
# The int-to-float instruction runs at a quarter of the float rate (16 a clock per SM on the H100 /
# H200), and a one-row product converts every weight it reads once, so at int8 converting takes
# about as long as reading. With BITS the GEMV makes the float from the integer's bits instead (the
# "magic number" of FasterTransformer's and Marlin's dequantizers): for 0 <= u < 2^23 the float whose
# bits are 0x4B000000 | u is 2^23 + u exactly, so one bitwise op and one float subtraction give the
# weight, exactly. Measured (H200, benchmarks/quant_kernels.py --per-shape, us per layer, instruction
# -> bits): 4096x11008 19.2 -> 15.4, 4096x4096 8.7 -> 7.4, 12288x4096 18.8 -> 17.2, 22016x4096
# 30.6 -> 28.1. Not in the tile product, whose weights then need a float32 -> bf16 conversion
# (slower there: 19.6 -> 25.6 us at 4096x11008), nor for int4 (the GEMV lost 4.61 -> 4.92 ms a
# pass; benchmarks/results/h200_session14.txt).

@triton.jit
def _f32_of_int8(w, BITS: tl.constexpr):
    """int8 -> float32, exact."""
    if BITS:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080  # bits of 2^23 + (w + 128)
        return u.to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _gemv_tile(acc, acc_up, w, wu, x_ptr, nw_ptr, kk, K, mean, rstd, dt: tl.constexpr, BITS: tl.constexpr,
               NORM: tl.constexpr, SWIGLU: tl.constexpr):
    """One K-tile of the one-row product: the accumulators plus the weight tile(s) times x's
    columns kk (normed, and rounded as the norm's output is, with NORM)."""
    x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    if NORM:
        g = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        x = ((x - mean) * rstd * g).to(dt).to(tl.float32)
    acc += _f32_of_int8(w, BITS) * x[None, :]
    if SWIGLU:
        acc_up += _f32_of_int8(wu, BITS) * x[None, :]
    return acc, acc_up


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "BITS", "NORM", "SWIGLU", "RESIDUAL", "PDL"], do_bench=_bench,
                 cache_results=True)
@triton.jit
def _int8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, nw_ptr, r_ptr, eps, BITS: tl.constexpr, NORM: tl.constexpr,
               SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, KP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y = r + f(W g(x)) for one row: g the row's LayerNorm with weight nw (NORM; KP = K rounded up
    # to a power of two: the row is read whole, once, for its mean and variance), f SwiGLU over the
    # two halves of W's rows, up * silu(gate), N outputs from 2N rows (SWIGLU), r a residual
    # (RESIDUAL). Each intermediate is rounded to the activations' dtype where the operations one
    # after another round it (`model.quant.block_linear`): the normed row, each half's product, the
    # gate's silu, the gated product. With NORM or PDL the first weight tile is asked for before
    # anything else (before the row's statistics, before waiting on the previous kernel): no kernel
    # writes the weights. Without the flags, the model's GEMV as it was.
    dt = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    mean, rstd = 0.0, 1.0
    if NORM or PDL:  # the first tile on its own, asked for first
        m = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=m, other=0)
        wu = w
        if SWIGLU:
            wu = tl.load(w_ptr + (rn[:, None] + N) * K + rk[None, :], mask=m, other=0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if NORM:  # the row's mean, then its variance about the mean, in float32 (as F.layer_norm)
            rp = tl.arange(0, KP)
            xs = tl.load(x_ptr + rp, mask=rp < K, other=0.0).to(tl.float32)
            mean = tl.sum(xs, axis=0) / K
            d = tl.where(rp < K, xs - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / K + eps)
        acc, acc_up = _gemv_tile(acc, acc_up, w, wu, x_ptr, nw_ptr, rk, K, mean, rstd, dt, BITS, NORM, SWIGLU)
    for k0 in range(BLOCK_K if NORM or PDL else 0, K, BLOCK_K):
        kk = k0 + rk
        m = (rn[:, None] < N) & (kk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=m, other=0)
        wu = w
        if SWIGLU:
            wu = tl.load(w_ptr + (rn[:, None] + N) * K + kk[None, :], mask=m, other=0)
        acc, acc_up = _gemv_tile(acc, acc_up, w, wu, x_ptr, nw_ptr, kk, K, mean, rstd, dt, BITS, NORM, SWIGLU)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * s
    if SWIGLU:
        gate = y.to(dt).to(tl.float32)
        up = (tl.sum(acc_up, axis=1) * tl.load(s_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)).to(dt)
        y = up.to(tl.float32) * (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(dt), mask=rn < N)


@triton.autotune(configs=_dot_configs((128, 256)), key=["BLOCK_M", "N", "K"], do_bench=_bench,
                 cache_results=True)
@triton.jit
def _int8_dot(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# --- int4 ------------------------------------------------------------------------------------------

@triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "GROUPS": g}, num_warps=w, num_stages=s)
                          for bn, g in ((8, 4), (16, 2), (16, 4), (32, 2), (32, 4)) for w in (4, 8) for s in (3, 4)],
                 key=["N", "K", "GROUP"], do_bench=_bench, cache_results=True)
@triton.jit
def _int4_gemv(x_ptr, w_ptr, sz_ptr, y_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUPS: tl.constexpr):
    # Per group: sum_k w_k x_k = s * (sum_k q_k x_k - 8 sum_k x_k) + z * sum_k x_k, so the inner loop
    # is one integer-to-float conversion and one multiply-add a weight.
    HALF: tl.constexpr = GROUP // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    n_groups = K // GROUP
    for g0 in range(0, n_groups, GROUPS):
        gg = g0 + rg                                                        # (G,)
        gmask = gg < n_groups
        byte = gg[:, None] * HALF + rj[None, :]                             # (G, HALF): byte within the row
        b = tl.load(w_ptr + rn[:, None, None] * (K // 2) + byte[None, :, :],
                    mask=(rn[:, None, None] < N) & gmask[None, :, None], other=0)   # (BN, G, HALF)
        xe = tl.load(x_ptr + 2 * byte, mask=gmask[:, None], other=0.0).to(tl.float32)       # (G, HALF)
        xo = tl.load(x_ptr + 2 * byte + 1, mask=gmask[:, None], other=0.0).to(tl.float32)
        qx = tl.sum((b >> 4).to(tl.float32) * xe[None] + (b & 15).to(tl.float32) * xo[None], axis=2)  # (BN, G)
        sx = tl.sum(xe + xo, axis=1)                                         # (G,)
        szp = sz_ptr + (gg[None, :] * N + rn[:, None]) * 2
        smask = (rn[:, None] < N) & gmask[None, :]
        s = tl.load(szp, mask=smask, other=0.0).to(tl.float32)
        z = tl.load(szp + 1, mask=smask, other=0.0).to(tl.float32)
        acc += s * (qx - 8.0 * sx[None, :]) + z * sx[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(configs=[triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=s)
                          for bn in (32, 64, 128) for s in (3, 5)],
                 key=["BLOCK_M", "N", "K", "GROUP"], do_bench=_bench, cache_results=True)
@triton.jit
def _int4_dot(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, GROUP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One group a step along K. The 4-bit values go into the product as they are (integers below
    # 16 are exact in bf16/fp16) and the group's scale and zero apply to the (BLOCK_M, BLOCK_N)
    # partial sums: sum_k x_k w_k = s * (sum_k x_k q_k - 8 sum_k x_k) + z * sum_k x_k. Per weight
    # that leaves unpacking and one conversion; the multiply-adds run on the tensor cores.
    HALF: tl.constexpr = GROUP // 2
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    rk = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        x = tl.load(x_ptr + rm[:, None] * K + g * GROUP + rk[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(w_ptr + rn[:, None] * (K // 2) + g * HALF + rj[None, :], mask=rn[:, None] < N, other=0)
        q = tl.interleave(b >> 4, b & 15).to(x.dtype)                        # (BN, GROUP), even column first
        qx = tl.dot(x, tl.trans(q))                                           # (BM, BN), float32
        sx = tl.sum(x.to(tl.float32), axis=1)                                 # (BM,)
        szp = sz_ptr + (g * N + rn) * 2
        s = tl.load(szp, mask=rn < N, other=0.0).to(tl.float32)
        z = tl.load(szp + 1, mask=rn < N, other=0.0).to(tl.float32)
        acc += (qx - 8.0 * sx[:, None]) * s[None, :] + sx[:, None] * z[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# --- dispatch --------------------------------------------------------------------------------------

def _block_m(M: int) -> int:
    return min(_DOT_MAX_ROWS, max(16, triton.next_power_of_2(M)))


def _int8_gemv_call(x, w, s, y, norm_weight=None, eps=0.0, swiglu=False, residual=None):
    N, K = y.shape[1], w.shape[1]  # BITS read at each call: the benchmarks set it
    _int8_gemv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, w, s, y, N, K, x if norm_weight is None else norm_weight, x if residual is None else residual, eps,
        BITS=BITS, NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None, PDL=PDL,
        KP=triton.next_power_of_2(K) if norm_weight is not None else 1, launch_pdl=PDL)


def _int8_dot_call(x, w, s, y):
    M, (N, K) = x.shape[0], w.shape
    bm = _block_m(M)
    _int8_dot[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))](x, w, s, y, M, N, K, BLOCK_M=bm)


def _int4_gemv_call(x, w, sz, y, group):
    N, K = w.shape[0], x.shape[1]
    _int4_gemv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x, w, sz, y, N, K, GROUP=group)


def _int4_dot_call(x, w, sz, y, group):
    M, N, K = x.shape[0], w.shape[0], x.shape[1]
    bm = _block_m(M)
    _int4_dot[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))](x, w, sz, y, M, N, K,
                                                                                  GROUP=group, BLOCK_M=bm)


_CHOSEN: dict = {}


def _time(fn, reps: int = 10) -> float:
    """GPU milliseconds of `reps` calls of fn. The calls queue behind a ~2 ms sleep kernel, so
    they run back to back: the time of the kernels, not of their launches from Python (which
    take longer than a small layer's kernel and made the choice a matter of chance: the same
    weights got different kernels from one process to the next)."""
    fn()  # autotuning, compilation
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(4_000_000)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _choose(key, candidates: dict, *args):
    """The faster of `candidates` for `key` (each timed twice on first use, outside graph
    capture, the better time kept; while capturing an unseen key the first candidate is used)."""
    name = _CHOSEN.get(key)
    if name is None:
        if torch.cuda.is_current_stream_capturing():
            name = next(iter(candidates))
        else:
            times = {n: min(_time(lambda f=f: f(*args)) for _ in range(2)) for n, f in candidates.items()}
            name = _CHOSEN[key] = min(times, key=times.get)
    return candidates[name](*args)


def kernel_choices() -> dict:
    """{(kind, N, K, ...): kernel} chosen so far (for the benchmarks): ("int8", N, K, BITS),
    ("int4", N, K), ("int8_block", N, K, BITS, PDL, norm, swiglu, residual)."""
    return dict(_CHOSEN)


@torch.library.custom_op("hertz::int8_linear", mutates_args=())
def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) bf16/fp16 contiguous, qweight int8 (N, K), scale (N,) -> (M, N) in x's dtype."""
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0] == 1:
        _choose(("int8", *qweight.shape, BITS), {"dot": _int8_dot_call, "gemv": _int8_gemv_call},
                x, qweight, scale, y)
    else:
        _int8_dot_call(x, qweight, scale, y)
    return y


@int8_linear.register_fake
def _(x, qweight, scale):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("hertz::int8_block_linear", mutates_args=())
def int8_block_linear(x: Tensor, qweight: Tensor, scale: Tensor, norm_weight: Optional[Tensor], eps: float,
                      swiglu: bool, residual: Optional[Tensor]) -> Tensor:
    """One row's residual + f(x' @ dequant(W).T) in one GEMV (`model.quant.block_linear`): x (1, K),
    x' its LayerNorm with `norm_weight` (K,) and `eps` when given; f SwiGLU over the two halves of
    the output (up * silu(gate): N/2 outputs) when `swiglu`; residual (1, N or N/2) when given.
    Per shape, the faster of that GEMV and the tile product between the operations (`_choose`)."""
    n = qweight.shape[0] // 2 if swiglu else qweight.shape[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    key = ("int8_block", *qweight.shape, BITS, PDL, norm_weight is not None, swiglu, residual is not None)
    ways = {"gemv": _int8_gemv_call, "dot": _int8_dot_and_operations}
    if norm_weight is not None and x.shape[1] > NORM_MAX_K:  # the GEMV holds a normed row in registers
        del ways["gemv"]
    _choose(key, ways, x, qweight, scale, y, norm_weight, eps, swiglu, residual)
    return y


def _int8_dot_and_operations(x, w, s, y, norm_weight, eps, swiglu, residual):
    """`int8_block_linear` as the tile product between torch's operations, for a shape whose
    tile product is faster than its GEMV by more than the operations' kernels cost."""
    h = x if norm_weight is None else torch.nn.functional.layer_norm(x, (x.shape[1],), norm_weight, None, eps)
    t = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
    _int8_dot_call(h, w, s, t)
    if swiglu:
        gate, up = t.chunk(2, dim=-1)
        t = up * torch.nn.functional.silu(gate)
    y.copy_(t if residual is None else residual + t)


@int8_block_linear.register_fake
def _(x, qweight, scale, norm_weight, eps, swiglu, residual):
    return x.new_empty(1, qweight.shape[0] // 2 if swiglu else qweight.shape[0])


@torch.library.custom_op("hertz::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x (M, K) bf16/fp16 contiguous, qweight uint8 (N, K/2), scales_and_zeros (K/g, N, 2) -> (M, N)."""
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0] == 1:
        _choose(("int4", qweight.shape[0], x.shape[1]), {"dot": _int4_dot_call, "gemv": _int4_gemv_call},
                x, qweight, scales_and_zeros, y, group_size)
    else:
        _int4_dot_call(x, qweight, scales_and_zeros, y, group_size)
    return y


@int4_linear.register_fake
def _(x, qweight, scales_and_zeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


# The weights are frozen: the backward gives the activations' gradient only (LoRA on a quantized
# base, `model.lora`), through the dequantized weights, one layer at a time.

def _save_weights(ctx, inputs, output):
    ctx.weights = inputs[1:]


def _int8_backward(ctx, grad):
    from .quant import dequantize_int8
    return grad @ dequantize_int8(*ctx.weights, grad.dtype), None, None


def _int4_backward(ctx, grad):
    from .quant import dequantize_int4
    return grad @ dequantize_int4(*ctx.weights, grad.dtype), None, None, None


int8_linear.register_autograd(_int8_backward, setup_context=_save_weights)
int4_linear.register_autograd(_int4_backward, setup_context=_save_weights)
