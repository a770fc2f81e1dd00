"""A Triton kernel for `model.sampling.counter_uniform`: the counter-based uniforms of a step in one
kernel, equal bit for bit to the torch version.

Why: in torch the hash is ~60 elementwise kernels on a few hundred numbers (every xor, shift,
multiply and mask of four `lowbias32` rounds is a kernel of its own), about 0.1 ms of a live step
on the H200 in kernel starts and the gaps between them. torch.compile cannot take it either (the
int64 bit operations failed in Inductor's Triton code, benchmarks/NOTES_inference.md v1).

The torch version holds 32-bit values in int64 so that no product overflows; here they are uint32,
whose products wrap modulo 2^32, which is what the torch version's `& 0xFFFFFFFF` after each
product computes. The float is made from the top 24 bits, exactly, in both.

Imported where a CUDA step draws its noise (`model.sampling.counter_uniform`); the tests also run
it on the CPU in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 256  # uniforms a program makes (a duplex hertz_dev step draws 196 a row)


@triton.jit
def _mix32(x):
    """`lowbias32` (C. Wellons) on uint32: `model.sampling._mix32` without the masks."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _uniform(seed_ptr, counter_ptr, u_ptr, n, stream, s_seed, s_counter, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    seed = tl.load(seed_ptr + b * s_seed)
    counter = tl.load(counter_ptr + b * s_counter)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(lo ^ _mix32(hi ^ tl.cast(stream, tl.uint32)))  # (a stream of 1 arrives as a constant)
    key = _mix32(key ^ (counter & 0xFFFFFFFF).to(tl.uint32))
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = _mix32(key ^ _mix32(i.to(tl.uint32) + 0x9E3779B9))
    u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(u_ptr + b.to(tl.int64) * n + i, u, mask=i < n)


def counter_uniform(seed: Tensor, counter: Tensor, stream: int, n: int) -> Tensor:
    """(B,) int64 row seeds and counters -> (B, n) float32 uniforms in (0, 1): what
    `model.sampling.counter_uniform` returns, in one kernel launch."""
    if seed.dtype != torch.int64 or counter.dtype != torch.int64 or seed.dim() != 1 or counter.shape != seed.shape:
        raise ValueError(f"counter_uniform: (B,) int64 seeds and counters, got {seed.dtype} {tuple(seed.shape)} "
                         f"and {counter.dtype} {tuple(counter.shape)}")
    if not 0 < n < 0x61C88647:  # i + 0x9E3779B9 stays below 2^32, as in the int64 version
        raise ValueError(f"counter_uniform: n must be in [1, {0x61C88647 - 1}], got {n}")
    B = seed.shape[0]
    u = torch.empty(B, n, device=seed.device, dtype=torch.float32)
    if B:
        _uniform[(B, triton.cdiv(n, BLOCK))](seed, counter, u, n, stream, seed.stride(0), counter.stride(0),
                                             BLOCK=BLOCK, num_warps=2)
    return u
