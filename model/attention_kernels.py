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
