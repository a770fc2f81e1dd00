"""Triton kernels of the live codec (`model.stream_codec.StreamCodec`) on CUDA: each causal
convolution's input taps and its streaming state in two passes, where torch's operations take five.

Why: a live step's codec (one 2000-sample chunk encoded, one latent decoded) is ~330 kernels, each
a few microseconds of mostly launch, for 0.19 GB of weights: about 0.95 ms of a 5 ms int8 step on
the H200, the part of the step furthest from its floor (README, Quantized weights). A residual unit
was eight of them: the activation, the concatenation of the state and the chunk, the state's update,
the taps' copy, the matrix product, the second activation, the 1x1 product, the residual add. Here it
is four: `taps` (the activation and the taps, one pass), the product, `advance` (the state moved on
and the second activation, one pass), and the 1x1 product with the residual added by the product
itself (`torch.addmm(x, h, W2)`). The products stay cuBLAS's.

A causal convolution (kernel K, dilation D, stride S) of a chunk x (B, L, C), channel-last, with its
left context `state` (B, PAD, C) (the last PAD rows of its input so far, as the convolution took
them): output t reads rows t*S + j*D, j < K, of [state; act(x)]. `taps` writes those rows as the
(B*L', C*K) matrix of the convolution's product, its columns channel-major (column c*K + j), as
`model.stream_codec._Conv` lays its weight out; `act` is the activation before the convolution
(none, ELU, or Snake with one frequency a channel), applied to x's rows (the state holds its rows
activated already). `advance` then makes the state the last PAD rows of [state; act(x)] in the rows
whose `active` is set (others keep theirs: sessions paused in a shared batch), and applies a second
activation in place to a matrix (the unit's product, before its 1x1 product). Values are computed
in float32 and stored in the tensors' dtype, as torch's operations round each of theirs: equal to
the torch path up to rounding (the tests run both in Triton's interpreter on the CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .snake_kernels import EPS

ACTIVATIONS = {None: 0, "elu": 1, "snake": 2}


@triton.jit
def _activate(v, a, eps, ACT: tl.constexpr):
    """`v` (float32) through no activation (0), ELU (1, alpha 1) or Snake (2, frequency `a`)."""
    if ACT == 1:
        v = tl.where(v > 0, v, tl.exp(tl.minimum(v, 0.0)) - 1.0)
    elif ACT == 2:
        s = tl.sin(a * v)
        v = v + s * s / (a + eps)
    return v


@triton.jit
def _taps(x_ptr, state_ptr, alpha_ptr, cols_ptr, L, LO, C, PAD, eps,
          S: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ACT: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :, None]
    j = tl.arange(0, KP)[None, None, :]
    p = t * S + j * D - PAD  # the tap's row of the chunk; below 0, of the state (at PAD + p)
    valid = (t < LO) & (c < C) & (j < K)
    xv = tl.load(x_ptr + (b * L + p) * C + c, mask=valid & (p >= 0), other=0.0).to(tl.float32)
    sv = tl.load(state_ptr + (b * PAD + PAD + p) * C + c, mask=valid & (p < 0), other=0.0).to(tl.float32)
    a = 1.0
    if ACT == 2:
        a = tl.load(alpha_ptr + c, mask=c < C, other=1.0).to(tl.float32)
    v = tl.where(p >= 0, _activate(xv, a, eps, ACT), sv)
    tl.store(cols_ptr + ((b * LO + t) * C + c) * K + j, v.to(cols_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _advance(x_ptr, state_ptr, active_ptr, alpha_ptr, h_ptr, alpha2_ptr, L, C, PAD, M, eps, state_programs,
             ACT: tl.constexpr, ACT2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    if pid < state_programs:  # the state of one row, BLOCK_C of its channels: all its PAD rows at once
        c_blocks = tl.cdiv(C, BLOCK_C)
        b = (pid // c_blocks).to(tl.int64)
        i = tl.arange(0, BLOCK_P)[:, None]
        c = ((pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        q = L + i  # the new state's row i is row q of [state; act(x)]
        inside = (i < PAD) & (c < C)
        sv = tl.load(state_ptr + (b * PAD + q) * C + c, mask=inside & (q < PAD), other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (b * L + q - PAD) * C + c, mask=inside & (q >= PAD), other=0.0).to(tl.float32)
        a = 1.0
        if ACT == 2:
            a = tl.load(alpha_ptr + c, mask=c < C, other=1.0).to(tl.float32)
        v = tl.where(q < PAD, sv, _activate(xv, a, eps, ACT))
        moves = tl.load(active_ptr + b + 0 * c).to(tl.int32) != 0  # (1, BLOCK_C): the row's flag, as a block
        tl.debug_barrier()  # every row read before any is written over (the rows move up in place)
        tl.store(state_ptr + (b * PAD + i) * C + c, v.to(state_ptr.dtype.element_ty), mask=inside & moves)
    else:  # h = act2(h), a tile of the (M, C) matrix (names of their own: a branch's names must keep their types)
        tile = pid - state_programs
        tiles_c = tl.cdiv(C, BLOCK_C)
        rows = ((tile // tiles_c) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        cols = ((tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        within = (rows < M) & (cols < C)
        hv = tl.load(h_ptr + rows * C + cols, mask=within, other=0.0).to(tl.float32)
        a2 = 1.0
        if ACT2 == 2:
            a2 = tl.load(alpha2_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)
        tl.store(h_ptr + rows * C + cols, _activate(hv, a2, eps, ACT2).to(h_ptr.dtype.element_ty), mask=within)


def taps(x: Tensor, state: Tensor, k: int, dilation: int, stride: int, act: Optional[str] = None,
         alpha: Optional[Tensor] = None) -> Tensor:
    """The (B*L', C*k) taps of a causal convolution of the chunk `x` (B, L, C) (contiguous) after its
    left context `state` (B, PAD, C), with `act` ("elu", "snake" with `alpha` (C,), or None) applied
    to x's rows; L' = (PAD + L - (k-1)*dilation - 1) // stride + 1."""
    B, L, C = x.shape
    pad = state.shape[1]
    lo = (pad + L - (k - 1) * dilation - 1) // stride + 1
    cols = torch.empty(B * lo, C * k, device=x.device, dtype=x.dtype)
    kp = triton.next_power_of_2(k)
    block_c = min(triton.next_power_of_2(C), 64)
    block_t = max(1, min(triton.next_power_of_2(lo), 4096 // (block_c * kp)))
    grid = (triton.cdiv(lo, block_t), triton.cdiv(C, block_c), B)
    _taps[grid](x, state, alpha if alpha is not None else x, cols, L, lo, C, pad, EPS, S=stride, D=dilation, K=k,
                KP=kp, ACT=ACTIVATIONS[act], BLOCK_T=block_t, BLOCK_C=block_c)
    return cols


def advance(x: Tensor, state: Tensor, active: Tensor, act: Optional[str] = None, alpha: Optional[Tensor] = None,
            h: Optional[Tensor] = None, act2: Optional[str] = None, alpha2: Optional[Tensor] = None) -> None:
    """The rows of `state` (B, PAD, C) whose `active` (B, 1, 1) bool is set become the last PAD rows
    of [state; act(x)] (`x` (B, L, C) contiguous, `act` as `taps`); and, given `h` (M, C) contiguous,
    h = act2(h) in place. One kernel for both."""
    B, L, C = x.shape
    pad = state.shape[1]
    block_p = triton.next_power_of_2(max(pad, 1))
    block_c = max(1, min(triton.next_power_of_2(C), 4096 // block_p))
    state_programs = B * triton.cdiv(C, block_c) if pad else 0
    m, block_m = (h.shape[0], max(1, 4096 // block_c)) if h is not None else (0, 1)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(C, block_c) if h is not None else 0
    if state_programs + tiles == 0:
        return
    _advance[(state_programs + tiles,)](
        x, state, active, alpha if alpha is not None else x, h if h is not None else x,
        alpha2 if alpha2 is not None else x, L, C, pad, m, EPS, state_programs, ACT=ACTIVATIONS[act],
        ACT2=ACTIVATIONS[act2], BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_M=block_m)
