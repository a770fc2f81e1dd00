"""A Triton kernel for the decode step's attention: one query per row over a KV-cache window.

`decode_attention(q, k, v, bias)`: q (B, H, 1, D); k, v (B, Hkv, W, D) views of a `KVCache` (any
strides along B, Hkv and W; D contiguous), bf16, fp16, float32 or float8 (read as they are stored,
upcast in registers: no window-sized copy of a float8 cache); bias (B|1, 1, 1, W) the additive
mask of `Positions` (0 or -inf). Returns softmax(q k^T / sqrt(D) + bias) v as (B, H, 1, D) in q's
dtype: what `F.scaled_dot_product_attention` returns for these arguments, up to rounding.

Why: with one query a head, SDPA's kernels run one tile per (row, head), 32 thread blocks for a
hertz_dev LM layer at batch 1, and spend 12-22 us a layer on the H200 where the window's keys and
values are a few MB (benchmarks/decode_attention.py). Here the window is split into chunks
(flash-decoding): each program reads one chunk of one head's keys and values once and keeps a
running softmax (its maximum, its sum and the weighted sum of values, in float32); a second small
kernel combines the chunks of each head. The chunk length is chosen so that a call has about
TARGET_PROGRAMS programs (fewer when the window is short: a chunk is at least BLOCK_S slots).

Registered as a torch custom op (`hertz::decode_attention`), so torch.compile keeps it as one call
in the compiled block and CUDA graphs replay it. Forward only (decoding needs no gradient).

`decode_prologue(...)` (below): the step's attention up to the attention itself (q/k LayerNorms,
rotary, the cache writes) as one kernel, `hertz::decode_prologue`, which writes the caches in
place; used when `model.transformer.FUSED_PROLOGUE` is on (the default: measured on the H200, the
int8 step 5.44 -> 5.32 ms p50, 200 fewer kernels; benchmarks/results/h200_session15.txt).
Imported where a CUDA decode step runs (`model.transformer`); the tests also run it on the CPU in
Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Chosen by `benchmarks/decode_attention.py --sweep` on the H200 (float8 caches, hertz_dev shapes,
# batches 1-64, windows 256-2048): the best or within 3% of it in every case measured.
BLOCK_S = 64            # cache slots a program reads per iteration
TARGET_PROGRAMS = 4096  # programs per call the chunk length aims at (the H200 has 132 multiprocessors)
NUM_WARPS = 4


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, ml_ptr, scale, W, H, GROUP, NSPLIT,
             s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_bb,
             CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    """One (row, head, chunk): the chunk's running maximum m, sum l and unnormalised output."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    hk = (bh % H) // GROUP
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + (bh % H) * s_qh + rd).to(tl.float32) * scale
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for i in range(0, CHUNK, BLOCK_S):
        rs = split * CHUNK + i + tl.arange(0, BLOCK_S)
        inside = rs < W
        k = tl.load(k_base + rs[:, None] * s_ks + rd[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s += tl.load(bias_ptr + b * s_bb + rs, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp() finite
        p = tl.exp(s - m_ref)
        alpha = tl.exp(m - m_ref)
        v = tl.load(v_base + rs[:, None] * s_vs + rd[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    part = bh * NSPLIT + split
    tl.store(o_ptr + part * D + rd, acc)
    r1 = tl.arange(0, 1)
    tl.store(ml_ptr + part * 2 + r1, m)
    tl.store(ml_ptr + part * 2 + 1 + r1, l)


@triton.jit
def _combine(o_ptr, ml_ptr, y_ptr, NSPLIT, BLOCK_SPLIT: tl.constexpr, D: tl.constexpr):
    """One (row, head): the chunks' outputs weighted by exp(m_i - max m), over the weighted sums."""
    bh = tl.program_id(0)
    rp = tl.arange(0, BLOCK_SPLIT)
    rd = tl.arange(0, D)
    inside = rp < NSPLIT
    part = bh * NSPLIT + rp
    m = tl.load(ml_ptr + part * 2, mask=inside, other=float("-inf"))
    l = tl.load(ml_ptr + part * 2 + 1, mask=inside, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx))
    o = tl.load(o_ptr + part[:, None] * D + rd[None, :], mask=inside[:, None], other=0.0)
    den = tl.sum(w * l, axis=0)
    y = tl.sum(w[:, None] * o, axis=0) / tl.where(den == 0.0, 1.0, den)
    tl.store(y_ptr + bh * D + rd, y.to(y_ptr.dtype.element_ty))


def chunk_length(rows_heads: int, window: int) -> int:
    """Cache slots per program: a power of two from BLOCK_S up, with about TARGET_PROGRAMS
    programs a call (more chunks than that only add to the combine)."""
    chunks = max(1, TARGET_PROGRAMS // rows_heads)
    return max(BLOCK_S, triton.next_power_of_2(triton.cdiv(window, chunks)))


@torch.library.custom_op("hertz::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """q (B, H, 1, D), k and v (B, Hkv, W, D), bias (B|1, 1, 1, W) -> (B, H, 1, D) in q's dtype."""
    B, H, T, D = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    if T != 1 or k.stride(3) != 1 or v.stride(3) != 1 or bias.shape[-1] != W or D & (D - 1):
        raise ValueError(f"decode_attention: one query per row, D a power of two and contiguous; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} strides {k.stride()}, bias {tuple(bias.shape)}")
    q = q.reshape(B, H, D)
    if q.stride(2) != 1:
        q = q.contiguous()
    bias = bias.reshape(bias.shape[0], W)
    if bias.stride(1) != 1:
        bias = bias.contiguous()
    chunk = chunk_length(B * H, W)
    nsplit = triton.cdiv(W, chunk)
    o = torch.empty(B * H * nsplit * D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * H * nsplit * 2, device=q.device, dtype=torch.float32)
    _partial[(B * H, nsplit)](q, k, v, bias, o, ml, D ** -0.5, W, H, H // Hkv, nsplit,
                              q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2), bias.stride(0) if bias.shape[0] > 1 else 0,
                              CHUNK=chunk, BLOCK_S=BLOCK_S, D=D, num_warps=NUM_WARPS)
    y = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    _combine[(B * H,)](o, ml, y, nsplit, BLOCK_SPLIT=triton.next_power_of_2(nsplit), D=D, num_warps=4)
    return y


@decode_attention.register_fake
def _(q, k, v, bias):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --- the decode step's attention prologue ---------------------------------------------------------
# In a decode step each layer's attention starts with five small kernels under torch.compile (the
# q and k LayerNorms, the rotary and its concatenation, the key and value cache writes: ~1.5 us
# each on the H200 plus the gap before the next, 40 layers a step). `decode_prologue` does all of
# it in one kernel, one program per row (`model.transformer.FUSED_PROLOGUE`, on by default;
# `benchmarks/inference.py --unfused-prologue` compares). At one session that one program is the
# whole kernel (4.6 us a layer on the H200, its q, k and v parts one after another):
# `SPLIT_PROLOGUE` runs three programs a row instead, one per part, side by side (the LayerNorm of
# q or k needs only its own part). Off until measured (`benchmarks/inference.py --split-prologue`).
SPLIT_PROLOGUE = False

@triton.jit
def _norm_rotate(x_ptr, w_ptr, eps, c1, c2, s1, s2, dt, N: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """N heads of D features at x_ptr: a LayerNorm over all N * D (float32 statistics, weight at
    w_ptr, no bias, the output rounded to the model's dtype `dt` as F.layer_norm returns it), then
    each head rotated by halves in float32 as `model.transformer.apply_rotary` does. Returns both
    halves (BN, D/2) in float32, the offsets of the first half and the mask of the real heads."""
    HALF: tl.constexpr = D // 2
    rh = tl.arange(0, BN)
    m = (rh < N)[:, None]
    off = rh[:, None] * D + tl.arange(0, HALF)[None, :]
    x1 = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + off + HALF, mask=m, other=0.0).to(tl.float32)
    mean = (tl.sum(tl.sum(x1, 1), 0) + tl.sum(tl.sum(x2, 1), 0)) / (N * D)
    d1, d2 = tl.where(m, x1 - mean, 0.0), tl.where(m, x2 - mean, 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(tl.sum(d1 * d1, 1), 0) + tl.sum(tl.sum(d2 * d2, 1), 0)) / (N * D) + eps)
    n1 = (d1 * rstd * tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    n2 = (d2 * rstd * tl.load(w_ptr + off + HALF, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    return n1 * c1[None, :] - n2 * s1[None, :], n2 * c2[None, :] + n1 * s2[None, :], off, m


@triton.jit
def _prologue_q(x_row, wq_ptr, q_ptr, b, eps, c1, c2, s1, s2, H: tl.constexpr, BH: tl.constexpr, D: tl.constexpr):
    """q: normed and rotated, out in the model's dtype."""
    HALF: tl.constexpr = D // 2
    dt = q_ptr.dtype.element_ty
    o1, o2, off, m = _norm_rotate(x_row, wq_ptr, eps, c1, c2, s1, s2, dt, H, BH, D)
    tl.store(q_ptr + b * H * D + off, o1.to(dt), mask=m)
    tl.store(q_ptr + b * H * D + off + HALF, o2.to(dt), mask=m)


@triton.jit
def _prologue_k(x_row, wk_ptr, k_ptr, dt, b, pos, eps, c1, c2, s1, s2, s_kb, s_kh, s_ks,
                H: tl.constexpr, HKV: tl.constexpr, BHKV: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr):
    """k: the same over its HKV heads, rounded to the model's dtype, then into the cache at the row's slot."""
    HALF: tl.constexpr = D // 2
    rj = tl.arange(0, HALF)
    rk = tl.arange(0, BHKV)
    o1, o2, off, m = _norm_rotate(x_row + H * D, wk_ptr, eps, c1, c2, s1, s2, dt, HKV, BHKV, D)
    o1, o2 = o1.to(dt).to(tl.float32), o2.to(dt).to(tl.float32)
    if FP8:  # `model.transformer.to_cache`: saturate at +-448 rather than overflow
        o1, o2 = tl.clamp(o1, -448.0, 448.0), tl.clamp(o2, -448.0, 448.0)
    kslot = k_ptr + b * s_kb + pos * s_ks + rk[:, None] * s_kh + rj[None, :]
    tl.store(kslot, o1.to(k_ptr.dtype.element_ty), mask=m)
    tl.store(kslot + HALF, o2.to(k_ptr.dtype.element_ty), mask=m)


@triton.jit
def _prologue_v(x_row, v_ptr, b, pos, s_vb, s_vh, s_vs,
                H: tl.constexpr, HKV: tl.constexpr, BHKV: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr):
    """v: as projected, into the cache."""
    HALF: tl.constexpr = D // 2
    rj = tl.arange(0, HALF)
    rk = tl.arange(0, BHKV)
    m = (rk < HKV)[:, None]
    off = rk[:, None] * D + rj[None, :]
    v1 = tl.load(x_row + (H + HKV) * D + off, mask=m, other=0.0).to(tl.float32)
    v2 = tl.load(x_row + (H + HKV) * D + off + HALF, mask=m, other=0.0).to(tl.float32)
    if FP8:
        v1, v2 = tl.clamp(v1, -448.0, 448.0), tl.clamp(v2, -448.0, 448.0)
    vslot = v_ptr + b * s_vb + pos * s_vs + rk[:, None] * s_vh + rj[None, :]
    tl.store(vslot, v1.to(v_ptr.dtype.element_ty), mask=m)
    tl.store(vslot + HALF, v2.to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def _prologue(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, eps,
              s_xb, s_cb, s_pb, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
              H: tl.constexpr, HKV: tl.constexpr, BH: tl.constexpr, BHKV: tl.constexpr, D: tl.constexpr,
              FP8: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    rj = tl.arange(0, HALF)
    x_row = qkv_ptr + b * s_xb
    c1 = tl.load(cos_ptr + b * s_cb + rj)
    c2 = tl.load(cos_ptr + b * s_cb + HALF + rj)
    s1 = tl.load(sin_ptr + b * s_cb + rj)
    s2 = tl.load(sin_ptr + b * s_cb + HALF + rj)
    pos = tl.load(pos_ptr + b * s_pb)
    dt = q_ptr.dtype.element_ty
    if SPLIT:  # three programs a row, one part each
        part = tl.program_id(1)
        if part == 0:
            _prologue_q(x_row, wq_ptr, q_ptr, b, eps, c1, c2, s1, s2, H, BH, D)
        elif part == 1:
            _prologue_k(x_row, wk_ptr, k_ptr, dt, b, pos, eps, c1, c2, s1, s2, s_kb, s_kh, s_ks, H, HKV, BHKV, D, FP8)
        else:
            _prologue_v(x_row, v_ptr, b, pos, s_vb, s_vh, s_vs, H, HKV, BHKV, D, FP8)
    else:  # one program a row, the parts one after another
        _prologue_q(x_row, wq_ptr, q_ptr, b, eps, c1, c2, s1, s2, H, BH, D)
        _prologue_k(x_row, wk_ptr, k_ptr, dt, b, pos, eps, c1, c2, s1, s2, s_kb, s_kh, s_ks, H, HKV, BHKV, D, FP8)
        _prologue_v(x_row, v_ptr, b, pos, s_vb, s_vh, s_vs, H, HKV, BHKV, D, FP8)


@torch.library.custom_op("hertz::decode_prologue", mutates_args=("k_cache", "v_cache"))
def decode_prologue(qkv: Tensor, wq: Tensor, wk: Tensor, eps: float, cos: Tensor, sin: Tensor, input_pos: Tensor,
                    k_cache: Tensor, v_cache: Tensor, n_heads: int) -> Tensor:
    """A decode step's attention up to the attention itself, for one query per row: qkv (B, 1,
    (H + 2 Hkv) D) the fused projection; wq (H D,), wk (Hkv D,) the q and k LayerNorms' weights
    (no bias), `eps` theirs; cos, sin (B|1, 1, D) float32 rotary tables; input_pos (B|1, 1) the
    slot each row writes; k_cache, v_cache (B, Hkv, W, D) views of a `KVCache` (written in place:
    the row's rotated key and its value at its slot). Returns the rotated queries (B, H, 1, D)."""
    B, T, width = qkv.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    if T != 1 or width != (n_heads + 2 * Hkv) * D or D & (D - 1) or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"decode_prologue: one query per row, D a power of two, caches contiguous in D; got "
                         f"qkv {tuple(qkv.shape)}, {n_heads} heads, cache {tuple(k_cache.shape)} "
                         f"strides {k_cache.stride()}")
    qkv = qkv.reshape(B, width)
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.reshape(cos.shape[0], D).contiguous(), sin.reshape(sin.shape[0], D).contiguous()
    pos = input_pos.reshape(input_pos.shape[0])
    q = torch.empty(B, n_heads, 1, D, device=qkv.device, dtype=qkv.dtype)
    _prologue[(B, 3 if SPLIT_PROLOGUE else 1)](qkv, wq, wk, cos, sin, pos, q, k_cache, v_cache, eps,
                    qkv.stride(0), cos.stride(0) if cos.shape[0] > 1 else 0, pos.stride(0) if pos.shape[0] > 1 else 0,
                    k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                    v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                    H=n_heads, HKV=Hkv, BH=triton.next_power_of_2(n_heads), BHKV=triton.next_power_of_2(Hkv),
                    D=D, FP8=k_cache.dtype == torch.float8_e4m3fn, SPLIT=SPLIT_PROLOGUE, num_warps=4)
    return q


@decode_prologue.register_fake
def _(qkv, wq, wk, eps, cos, sin, input_pos, k_cache, v_cache, n_heads):
    return qkv.new_empty(qkv.shape[0], n_heads, 1, k_cache.shape[3])
