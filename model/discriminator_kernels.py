"""Triton kernels for the discriminators' training step on CUDA: a convolution's bias and the
leaky ReLU after it in one pass, forward and backward (`bias_leaky_relu`), and the feature-matching
loss's L1 between maps in one pass a map each way (`feature_l1`).

Why: cuDNN computes a convolution without its bias, and PyTorch then adds the bias in a kernel of
its own (`output.add_(bias)`, a broadcast, so the strided elementwise path), reads the sum again
for the leaky ReLU, and in the backward sums the gradient over batch and positions for the bias's
gradient in a reduction of its own. The discriminators' activations are large (about 4.5 GB in
bf16 a pass for `small`'s recipe at 32 x 6 s, on real audio and on the reconstruction), so these
passes over them are a visible share of a step. Here the forward reads the convolution's output
once and writes the activation; the backward reads the incoming gradient and the activation once,
writes the gradient of the convolution's output and sums its columns for the bias (partial sums
per block of rows, added in a fixed order: the same bits from run to run).

Activations are channels-last (B, C, H, W), that is rows of C contiguous values: a (B*H*W, C)
matrix. `model.discriminators` calls this on CUDA for channels-last activations
(`model.discriminators.FUSED_BIAS_ACT`); elsewhere it runs `F.leaky_relu(conv(x))`. The tests run
the kernels on the CPU in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ELEMENTS = 8192  # values a program handles: BLOCK_M rows of BLOCK_C channels


@triton.jit
def _forward(y_ptr, b_ptr, out_ptr, M, C, slope, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    v = tl.load(y_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    v += tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    v = tl.where(v > 0, v, v * slope)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward(g_ptr, out_ptr, gy_ptr, partial_ptr, M, C, slope, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    gy = tl.where(out > 0, g, g * slope)  # the activation is positive exactly where its input is
    tl.store(gy_ptr + offsets, gy.to(gy_ptr.dtype.element_ty), mask=inside)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(gy, axis=0), mask=cols < C)


def blocks(m: int, c: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for an (m, c) matrix: up to 128 channels a program, ELEMENTS values."""
    block_c = min(triton.next_power_of_2(c), 128)
    return max(ELEMENTS // block_c, 16), block_c


def matrix_grid(t: Tensor) -> tuple[int, int, tuple[int, int], dict]:
    """A channels-last (B, C, H, W) `t` read as its (m, c) matrix: m, c, the grid of programs over
    it and the block sizes (`blocks`) as a kernel's keyword arguments."""
    c = t.shape[1]
    m = t.numel() // c
    block_m, block_c = blocks(max(m, 1), c)
    return m, c, (triton.cdiv(m, block_m), triton.cdiv(c, block_c)), {"BLOCK_M": block_m, "BLOCK_C": block_c}


def channels_last_dense(t: Tensor) -> Tensor:
    """A (B, C, H, W) tensor whose memory is its (B*H*W, C) matrix, row after row: `t` itself when it
    is channels-last dense, which the kernels read through its pointer (no view is made: each is a
    call into torch, and a step makes about 500 of these calls), else a channels-last copy (a
    gradient arriving as a strided view, e.g. the slice of a concatenation)."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


class BiasLeakyReLU(torch.autograd.Function):
    """leaky_relu(y + bias[None, :, None, None], slope) for a channels-last (B, C, H, W) `y`, in the
    dtype of `y`; the bias is added in float32."""

    @staticmethod
    def forward(ctx, y: Tensor, bias: Tensor, slope: float) -> Tensor:
        y = channels_last_dense(y)
        out = torch.empty_like(y)  # channels-last, as `y`
        m, c, grid, block = matrix_grid(y)
        if m:
            _forward[grid](y, bias, out, m, c, slope, **block)
        ctx.save_for_backward(out)
        ctx.slope, ctx.bias_dtype = slope, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, = ctx.saved_tensors
        gy = torch.empty_like(out)  # channels-last, as `out`
        m, c, grid, block = matrix_grid(out)
        if not m:
            return gy, torch.zeros(c, device=out.device, dtype=ctx.bias_dtype), None
        # every (program row, channel) entry is written by its program: no zeroing needed
        partial = torch.empty(grid[0], c, device=out.device, dtype=torch.float32)
        _backward[grid](channels_last_dense(grad), out, gy, partial, m, c, ctx.slope, **block)
        bias_grad = partial.sum(0) if ctx.needs_input_grad[1] else None
        if bias_grad is not None and bias_grad.dtype != ctx.bias_dtype:
            bias_grad = bias_grad.to(ctx.bias_dtype)
        return gy, bias_grad, None


def bias_leaky_relu(y: Tensor, bias: Tensor, slope: float) -> Tensor:
    """See `BiasLeakyReLU`: `y` channels-last (B, C, H, W) on CUDA (or the CPU in Triton's
    interpreter), `bias` (C,)."""
    if y.dim() != 4 or bias.shape != (y.shape[1],):
        raise ValueError(f"bias_leaky_relu takes (B, C, H, W) and (C,), got {tuple(y.shape)} and {tuple(bias.shape)}")
    return BiasLeakyReLU.apply(y, bias, slope)


# --- feature matching: sum over maps of mean |a - b|, one kernel a map each way -----------------

L1_BLOCK = 4096  # values a program sums


@triton.jit
def _l1_forward(a_ptr, b_ptr, partial_ptr, start, n, inv_n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + start + tl.program_id(0), tl.sum(tl.abs(a - b), axis=0) * inv_n)


@triton.jit
def _l1_backward(a_ptr, b_ptr, g_ptr, gb_ptr, n, inv_n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    g = tl.load(g_ptr) * inv_n
    gb = tl.where(a > b, -g, tl.where(a < b, g, 0.0))  # d|a - b| / db = -sign(a - b), 0 where equal
    tl.store(gb_ptr + i, gb.to(gb_ptr.dtype.element_ty), mask=i < n)


def dense(t: Tensor) -> bool:
    """Whether `t`'s elements fill a block of memory without gaps or overlaps, in any order of dims."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`a` and `b` laid out alike and without gaps, so that their storage can be read as flat
    arrays of the same elements (any layout: the sum of |a - b| does not depend on the order); a
    copy of one or both only when they are not."""
    if a.stride() == b.stride() and (b.is_contiguous() or b.is_contiguous(memory_format=torch.channels_last)):
        return a, b  # the common case, without `dense`'s loop in Python
    if a.stride() != b.stride() or not dense(b):
        a, b = a.contiguous(), b.contiguous()
    return a, b


class FeatureL1(torch.autograd.Function):
    """sum_l mean |a_l - b_l| over pairs of maps of one shape (the first half of `maps` the a's,
    the second the b's), in float32; gradients into the b's only (the a's are constants: the
    discriminators' maps of real audio). Forward: per map, partial sums of |a - b| over blocks
    (scaled by 1 / numel), added in a fixed order; backward: -sign(a - b) * grad / numel, in the
    b's dtype and layout. Against torch's multi-tensor ops (`_foreach_sub`, `_foreach_norm`, and
    their backward's sign, product and negation) no difference map is written or kept."""

    @staticmethod
    def forward(ctx, *maps: Tensor) -> Tensor:
        half = len(maps) // 2
        pairs = [dense_pair(a.detach(), b) for a, b in zip(maps[:half], maps[half:])]
        blocks_of = [triton.cdiv(b.numel(), L1_BLOCK) for _, b in pairs]
        # every block of every map writes its own entry: no zeroing needed (but at least one entry)
        total = sum(blocks_of)
        partial = (torch.empty if total else torch.zeros)(max(total, 1), device=maps[0].device, dtype=torch.float32)
        start = 0
        for (a, b), count in zip(pairs, blocks_of):
            if count:
                _l1_forward[(count,)](a, b, partial, start, b.numel(), 1.0 / b.numel(), BLOCK=L1_BLOCK)
            start += count
        ctx.save_for_backward(*[t for pair in pairs for t in pair])
        return partial.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        grad = grad.float().reshape(1).contiguous()
        grads = []
        for i in range(0, len(saved), 2):
            a, b = saved[i], saved[i + 1]
            gb = torch.empty_like(b)  # `b` is dense (`dense_pair`): the same strides
            if b.numel():
                _l1_backward[(triton.cdiv(b.numel(), L1_BLOCK),)](a, b, grad, gb, b.numel(), 1.0 / b.numel(),
                                                                  BLOCK=L1_BLOCK)
            grads.append(gb)
        return (None,) * len(grads) + tuple(grads)


def feature_l1(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """sum_l mean |real_l - fake_l| in float32, gradients into `fake` only (`FeatureL1`)."""
    if len(real) != len(fake) or any(a.shape != b.shape for a, b in zip(real, fake)):
        raise ValueError("feature_l1 takes two lists of maps of the same shapes")
    return FeatureL1.apply(*real, *fake)
