"""Triton kernels for the codec's Snake activation (`CodecConfig.activation="snake"`) in the
trainer's layout on CUDA: x + sin(a x)^2 / a in one pass forward and one backward (`snake`).

Why: written with torch's operations Snake is six elementwise kernels forward and about twelve
backward over every activation of the residual units (ELU is one each way), which made
`small_fast`'s training step 3.4x slower before the discriminators start and 2.0x after on an
H100 (`benchmarks/results/h100_session31.txt`). Here the forward reads x once and writes the
activation; the backward reads the incoming gradient and x once, writes the gradient of x and sums
each channel's gradient of its frequency per block of rows (partial sums added in a fixed order:
the same bits from run to run).

Activations are the trainer's channels-last (B, C, 1, L), that is rows of C contiguous values: a
(B*L, C) matrix. `model.codec.Snake` calls this on CUDA for such activations; elsewhere it runs
`model.codec.snake` with torch's operations. The tests run the kernels on the CPU in Triton's
interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .discriminator_kernels import channels_last_dense, matrix_grid

EPS = 1e-9  # as model.codec.snake: x + sin(a x)^2 / (a + EPS)


@triton.jit
def _forward(x_ptr, a_ptr, out_ptr, M, C, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)[None, :]
    s = tl.sin(a * x)
    tl.store(out_ptr + offsets, (x + s * s / (a + eps)).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward(g_ptr, x_ptr, a_ptr, gx_ptr, partial_ptr, M, C, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)[None, :]
    s = tl.sin(a * x)
    s2 = 2.0 * s * tl.cos(a * x)  # sin(2 a x): d/dx of sin(a x)^2
    inv = 1.0 / (a + eps)
    tl.store(gx_ptr + offsets, (g + g * s2 * inv * a).to(gx_ptr.dtype.element_ty), mask=inside)
    # d/da of sin(a x)^2 / (a + eps) = x sin(2 a x) / (a + eps) - sin(a x)^2 / (a + eps)^2
    ga = g * (x * s2 * inv - s * s * inv * inv)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(ga, axis=0), mask=cols < C)


class SnakeFunction(torch.autograd.Function):
    """x + sin(a x)^2 / (a + EPS) for a channels-last (B, C, H, W) `x` and `a` (C,), in the dtype
    of `x`, computed in float32."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor) -> Tensor:
        x = channels_last_dense(x)
        out = torch.empty_like(x)  # channels-last, as `x`
        m, c, grid, block = matrix_grid(x)
        if m:
            _forward[grid](x, alpha, out, m, c, EPS, **block)
        ctx.save_for_backward(x, alpha)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha = ctx.saved_tensors
        gx = torch.empty_like(x)  # channels-last, as `x`
        m, c, grid, block = matrix_grid(x)
        if not m:
            return gx, torch.zeros_like(alpha)
        # every (program row, channel) entry is written by its program: no zeroing needed
        partial = torch.empty(grid[0], c, device=x.device, dtype=torch.float32)
        _backward[grid](channels_last_dense(grad), x, alpha, gx, partial, m, c, EPS, **block)
        alpha_grad = partial.sum(0).to(alpha.dtype) if ctx.needs_input_grad[1] else None
        return gx, alpha_grad


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """See `SnakeFunction`: `x` channels-last (B, C, H, W) on CUDA (or the CPU in Triton's
    interpreter), `alpha` (C,)."""
    if x.dim() != 4 or alpha.shape != (x.shape[1],):
        raise ValueError(f"snake takes (B, C, H, W) and (C,), got {tuple(x.shape)} and {tuple(alpha.shape)}")
    return SnakeFunction.apply(x, alpha)
