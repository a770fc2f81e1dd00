"""Transformer blocks shared by the latent LM and the resynthesizer.

Pre-norm blocks, LayerNorm (no bias) on the full q and k projections, rotary positions
(half-rotation, as in the original `ShapeRotator`), SwiGLU feed-forward, fused QKV projection,
grouped-query capable. Parameter names follow the original `transformer.py`.

One forward serves training (no cache: causal attention over the input), prefill and one-step
decode (a cache passed in). A `KVCache` is preallocated at full length for a batch and written by
position (`index_put_` with a position tensor, never by concatenation); attention reads a window
(a prefix of the cache, `Positions.window`), so a decode step has static shapes and can be
compiled or captured in a CUDA graph per window. Each batch row has its own positions, so rows
(server sessions) may be at different points of their streams.

A cache may hold its keys and values in float8 (`KV_DTYPES["fp8"]`, e4m3: half the memory of
bf16, for many server sessions). Entries are stored without a scale: keys come out of a LayerNorm
and the rotary (a rotation), values out of a projection of a normed input, so both are O(1)
(measured on the tiny random model: |k|, |v| <= 4), far inside e4m3's +-448, and e4m3 keeps 3
mantissa bits at every magnitude down to 2^-6, so a per-tensor scale would not add precision
(and without one, each row's entries depend on that row alone). The outputs of cached forwards
move by 0.8-3% relative on the tiny model (tests/test_kv_fp8.py). Writes clamp to +-448 (a cast
beyond it gives NaN on CUDA). A CUDA decode step over a large window reads the float8 cache as
it is (`attend_cache`, `model.attention_kernels`); elsewhere attention upcasts the window to the
compute dtype before SDPA. The same code runs on the CPU, under torch.compile and in CUDA graphs (static shapes, no
host reads).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from config.transformer_config import KV_DTYPE_NAMES
from .quant import block_linear


class Norm(nn.Module):
    """LayerNorm with a weight and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.weight.shape[0],), weight=self.weight, bias=None, eps=self.eps)


def default_ff_dim(dim: int) -> int:
    """The original FFNN width when none is given: 256 * ceil(int(8 * dim / 3) / 256)."""
    return 256 * ((int(2 * 4 * dim / 3) + 256 - 1) // 256)


class FFNN(nn.Module):
    """SwiGLU: down(up * silu(gate)), gate and up from one fused projection; in a block, of the
    normed input and with the residual added (`block_linear`: one GEMV each in an int8 decode step)."""

    def __init__(self, dim: int, expand_dim: Optional[int] = None):
        super().__init__()
        self.expand_dim = expand_dim or default_ff_dim(dim)
        self.gateup_proj = nn.Linear(dim, 2 * self.expand_dim, bias=False)
        self.down_proj = nn.Linear(self.expand_dim, dim, bias=False)

    def forward(self, x: Tensor, norm: Optional[nn.Module] = None, residual: Optional[Tensor] = None) -> Tensor:
        """down(up * silu(gate)) of x (of norm(x) with a norm), plus `residual` when given."""
        return block_linear(self.down_proj, block_linear(self.gateup_proj, x, norm, swiglu=True), residual=residual)


@dataclass
class Positions:
    """Where a forward pass sits in time, computed once per pass and shared by every layer.

    cos, sin: (B|1, T, head_dim) rotary tables for the queries and new keys.
    input_pos: (B|1, T) cache slots the new keys and values are written to (cached passes only).
    mask: (B|1, 1, T, W) additive attention bias over the first W cache slots (0 where a query
    may attend, -inf elsewhere; cached passes only). W is the attention window: a decode step
    attends over a prefix of the cache only, so it has the same shapes for every position below W
    (what a CUDA graph per window needs).
    """
    cos: Tensor
    sin: Tensor
    input_pos: Optional[Tensor] = None
    mask: Optional[Tensor] = None

    @property
    def window(self) -> Optional[int]:
        """The cache slots attention covers (None: no cache, causal attention over the input)."""
        return None if self.mask is None else self.mask.shape[-1]

    @staticmethod
    def make(head_dim: int, theta: float, pos: Tensor, window: Optional[int] = None,
             dtype: torch.dtype = torch.float32) -> "Positions":
        """Rotary tables for integer positions `pos` (B|1, T); with `window`, also the write
        slots and the causal mask over the first `window` cache slots, as a bias in `dtype`."""
        # float32 as the original: t * inv_freq, then cos/sin of cat(freqs, freqs).
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
        freqs = pos.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        if window is None:
            return Positions(emb.cos(), emb.sin())
        slots = torch.arange(window, device=pos.device)
        allowed = (slots[None, None, :] <= pos[..., None])[:, None]  # (B, 1, T, W)
        # An additive bias, made once per pass instead of once per layer inside attention.
        bias = torch.zeros(allowed.shape, device=pos.device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        return Positions(emb.cos(), emb.sin(), pos, bias)

    def repeat(self, n: int) -> "Positions":
        """The same positions for `n` streams stacked on the batch axis; tensors with a batch of 1
        are left to broadcast."""
        def rep(t):
            return t if t is None or t.shape[0] == 1 else torch.cat([t] * n, dim=0)
        return Positions(rep(self.cos), rep(self.sin), rep(self.input_pos), rep(self.mask))


def rotate_half(x: Tensor) -> Tensor:
    """(..., D) -> cat(-x[..., D/2:], x[..., :D/2]): the half-rotation of the original rotary."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos, sin (B|1, T, D). Computed in float32, returned in x's dtype."""
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


KV_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}  # what --kv-dtype names; auto: the weights' dtype
assert tuple(KV_DTYPES) == KV_DTYPE_NAMES, "a KV dtype named in config/transformer_config.py without its torch dtype here"
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


# The torch dtypes a cache may be given as: float8 e4m3 (as "fp8"), or a float dtype the attention
# reads as it is. Any other (int8, bool, float8 e5m2, whose writes are not saturated) made a cache
# that rounded every key and value into its type: completions of noise, without an error.
KV_TORCH_DTYPES = (FP8, torch.bfloat16, torch.float16, torch.float32, torch.float64)


def kv_dtype_of(name: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """A cache dtype from a name of `KV_DTYPES`, a dtype of KV_TORCH_DTYPES, or None (None: the
    weights' dtype); a ValueError naming `kv_dtype` otherwise."""
    if name is None or name in KV_TORCH_DTYPES:
        return name
    if isinstance(name, torch.dtype):
        raise ValueError(f"kv_dtype {name} is not a dtype a KV cache can hold: use one of {', '.join(KV_DTYPES)} "
                         f"(or {', '.join(str(d) for d in KV_TORCH_DTYPES)})")
    if not isinstance(name, str) or name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {name!r}")
    return KV_DTYPES[name]


# Triton compiles float8 (e4m3) loads and stores for compute capability 8.9 and up only (Ada,
# Hopper, Blackwell; tests/test_kernels_compile.py checks the bound against the compiler). On older
# GPUs (A100, A10, RTX 30xx, V100, T4) a float8 cache still halves the memory, but its decode steps
# take the torch paths: the prologue's five kernels and SDPA over an upcast window.
FP8_KERNELS_MIN_CAPABILITY = (8, 9)


def fp8_kernels_supported(capability: tuple[int, int]) -> bool:
    """Whether the Triton kernels can read and write a float8 cache on a GPU of this capability."""
    return tuple(capability) >= FP8_KERNELS_MIN_CAPABILITY


_FP8_KERNELS: dict = {}


def assume_constant_result(fn):
    """`torch.compiler.assume_constant_result` without its `import torch._dynamo` (seconds at every
    process start, for the servers, `complete.py` and every trainer that stops at a config error):
    the mark Dynamo's tracer reads (torch/_dynamo/decorators.py sets just this attribute)."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def _fp8_kernels_on(index: int) -> bool:
    if index not in _FP8_KERNELS:
        _FP8_KERNELS[index] = fp8_kernels_supported(torch.cuda.get_device_capability(index))
    return _FP8_KERNELS[index]


def fp8_kernels_on(device: torch.device) -> bool:
    """`fp8_kernels_supported` for a CUDA device (asked once per device; a constant to torch.compile)."""
    return _fp8_kernels_on(device.index if device.index is not None else torch.cuda.current_device())


def to_cache(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the cache's dtype; float8 saturates at +-448 instead of overflowing to NaN."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def row_index(batch_size: int, device=None) -> Tensor:
    """torch.arange(batch_size) on `device`: the rows a cache or state writes. On `meta` (a sizing
    build: `generator.completion_problem`) only its shape: arange there runs a Python kernel whose
    first call imports sympy (about 0.6 s of CPU at every start of complete.py)."""
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(batch_size, dtype=torch.int64, device=device)
    return torch.arange(batch_size, device=device)


class LayerCache:
    """One layer's keys and values over an attention window: k, v (B, kv_heads, W, head_dim),
    views of a `KVCache`; rows (B,) = 0..B-1, the batch index of each row's write.

    A plain class, not a tuple or dataclass: wrappers that cast or move the tensors of a forward's
    arguments (FSDP2 mixed precision) must not replace the cache by a copy."""

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor):
        self.k, self.v, self.rows = k, v, rows

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, kv_heads, D) at slots input_pos (B|1, T) of each row (an in-place
        `index_put_`, which torch.compile keeps in place); returns the window's k and v."""
        idx = (self.rows[:, None], slice(None), input_pos)
        self.k[idx] = to_cache(k, self.k.dtype)
        self.v[idx] = to_cache(v, self.v.dtype)
        return self.k, self.v


class KVCache:
    """Keys and values of a stack of layers: (layers, B, kv_heads, max_len, head_dim), zeroed,
    in `dtype` (the model's, or float8: see the module docstring).

    `layer(i, window)` is layer i's cache over the first `window` slots; attention writes the new
    entries there at their positions (`LayerCache.update`) and reads the window, masked by
    `Positions` (slots not yet written, or left from an earlier stream, are hidden).
    """

    def __init__(self, layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (layers, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = row_index(batch_size, device)  # preallocated: the write index of each row
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def layer(self, i: int, window: Optional[int] = None) -> LayerCache:
        """Layer i over slots 0..window-1 (default: all), as views (writes land here)."""
        w = window or self.max_len
        return LayerCache(self.k[i, :, :, :w], self.v[i, :, :, :w], self.rows)

    def select(self, rows: slice) -> "KVCache":
        """The same memory restricted to some batch rows (writes land here)."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, rows], self.v[:, rows]
        view.rows = self.rows[:view.k.shape[1]]
        return view


# Decode steps on CUDA (one query per row) over a float8 cache whose window holds at least
# DECODE_KERNEL_MIN_SLOTS slots of all rows together attend with `model.attention_kernels`; below
# it, and with DECODE_KERNEL False, with SDPA as everywhere else. Measured in the int8 live step on
# the H200 (benchmarks/decode_attention.py --step, batch 1): the kernel saves 0.79 ms a step at a
# window of 2048 and costs 0.21 ms at windows of 128-256 (a small cache; timed alone, one layer's
# call is faster than SDPA's there too, but with the caches warm in L2; why the step is not was
# not found).
DECODE_KERNEL = True
DECODE_KERNEL_MIN_SLOTS = 1024
# A CUDA decode step's q/k norms, rotary and cache writes in one kernel (`model.attention_kernels.
# decode_prologue`, five kernels a layer otherwise; 200 fewer kernels a duplex hertz_dev step, int8
# step 5.44 -> 5.32 ms, mono completion 207 -> 230 latents/s on the H200). False: the five kernels.
FUSED_PROLOGUE = True


def attend_cache(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, gqa: bool) -> Tensor:
    """Attention of q (B, H, T, D) over a cache window k, v (B, Hkv, W, D) with the additive
    `mask` (B|1, 1, T, W) -> (B, H, T, D). A decode step on CUDA over a large enough float8 cache
    (above) runs the split-window kernel of `model.attention_kernels`, which reads the cache as it
    is stored (on GPUs of capability 8.9 and up: `fp8_kernels_on`); otherwise SDPA, a float8 cache
    upcast first (one window-sized copy per layer). On a bf16 cache cuDNN's SDPA is as fast or
    faster (benchmarks/decode_attention.py)."""
    if (DECODE_KERNEL and q.is_cuda and q.shape[2] == 1 and k.dtype == FP8
            and k.shape[0] * k.shape[2] >= DECODE_KERNEL_MIN_SLOTS and fp8_kernels_on(q.device)):
        from .attention_kernels import decode_attention  # Triton: imported only where CUDA is used
        return decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)


class GQA(nn.Module):
    """Causal self-attention with a fused QKV projection, full-width q/k LayerNorms and rotary."""

    def __init__(self, dim: int, n_head: int, kv_heads: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        self.n_heads = n_head
        self.kv_heads = kv_heads or n_head
        assert dim % n_head == 0 and n_head % self.kv_heads == 0
        self.head_dim = dim // n_head
        self.proj_qkv = nn.Linear(dim, self.head_dim * (n_head + 2 * self.kv_heads), bias=False)
        self.norm_q = Norm(self.head_dim * n_head, eps=eps)
        self.norm_k = Norm(self.head_dim * self.kv_heads, eps=eps)
        self.attn_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, pos: Positions, cache: Optional[LayerCache] = None, norm: Optional[nn.Module] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). Without a cache: causal attention over x (training, full
        forwards). With one: the new keys and values are written at `pos.input_pos` and the
        queries attend over the cache window, masked by `pos.mask` (prefill, decode steps).
        In a block: of norm(x), plus `residual` (`block_linear` applies both with the projections)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.kv_heads, self.head_dim
        if (FUSED_PROLOGUE and cache is not None and T == 1 and x.is_cuda
                and (cache.k.dtype != FP8 or fp8_kernels_on(x.device))):
            from .attention_kernels import decode_prologue  # Triton: imported only where CUDA is used
            q = decode_prologue(block_linear(self.proj_qkv, x, norm), self.norm_q.weight, self.norm_k.weight, self.norm_q.eps,
                                pos.cos, pos.sin, pos.input_pos, cache.k, cache.v, H)
            y = attend_cache(q, cache.k, cache.v, pos.mask, Hkv != H)
            return block_linear(self.attn_out, y.transpose(1, 2).reshape(B, T, -1), residual=residual)
        q, k, v = block_linear(self.proj_qkv, x, norm).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        # q and k rotated together: one rotary pass instead of two (fewer kernels when not compiled).
        qk = torch.cat([self.norm_q(q).view(B, T, H, hd), self.norm_k(k).view(B, T, Hkv, hd)], dim=2).transpose(1, 2)
        q, k = apply_rotary(qk, pos.cos, pos.sin).split([H, Hkv], dim=1)  # (B, H|Hkv, T, hd)
        gqa = Hkv != H
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v.view(B, T, Hkv, hd).transpose(1, 2), is_causal=True,
                                               enable_gqa=gqa)
        else:
            kc, vc = cache.update(pos.input_pos, k.transpose(1, 2), v.view(B, T, Hkv, hd))
            y = attend_cache(q, kc, vc, pos.mask, gqa)
        return block_linear(self.attn_out, y.transpose(1, 2).reshape(B, T, -1), residual=residual)


class PreNormAttn(nn.Module):
    """Pre-norm attention with its residual."""

    def __init__(self, dim, n_head, kv_heads=None, eps=1e-5):
        super().__init__()
        self.attn_norm = Norm(dim, eps=eps)
        self.attn = GQA(dim, n_head, kv_heads, eps=eps)

    def forward(self, x: Tensor, pos: Positions, cache: Optional[LayerCache] = None) -> Tensor:
        """x + attention(norm(x))."""
        return self.attn(x, pos, cache, norm=self.attn_norm, residual=x)


class PreNormFFNN(nn.Module):
    """Pre-norm feed-forward with its residual."""

    def __init__(self, dim, ff_dim=None, eps=1e-5):
        super().__init__()
        self.ffnn_norm = Norm(dim, eps=eps)
        self.ffnn = FFNN(dim, ff_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x + ffnn(norm(x))."""
        return self.ffnn(x, norm=self.ffnn_norm, residual=x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffnn(norm(h))."""

    def __init__(self, dim: int, n_head: int, kv_heads: Optional[int] = None,
                 ff_dim: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        self.attn = PreNormAttn(dim, n_head, kv_heads, eps=eps)
        self.ffnn = PreNormFFNN(dim, ff_dim, eps=eps)
        self.dim = dim

    def forward(self, x: Tensor, pos: Positions, cache: Optional[LayerCache] = None) -> Tensor:
        """x (B, T, dim) at `pos` -> (B, T, dim); `cache`: this layer's, written and attended."""
        return self.ffnn(self.attn(x, pos, cache))

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original initialisation: truncated normals with std 1/sqrt(fan-in)."""
        std = 1.0 / math.sqrt(self.dim)
        for w in (self.ffnn.ffnn.gateup_proj.weight, self.attn.attn.proj_qkv.weight, self.attn.attn.attn_out.weight):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        xstd = 1.0 / math.sqrt(self.ffnn.ffnn.expand_dim)
        nn.init.trunc_normal_(self.ffnn.ffnn.down_proj.weight, std=xstd, a=-3 * xstd, b=3 * xstd)


def run_block(block: Block, x: Tensor, pos: Positions, cache: Optional[LayerCache] = None) -> Tensor:
    """`block(x, pos, cache)`: how the LM and the resynthesizer run a block by default. An engine
    passes `torch.compile(run_block)` instead to compile one block, reused by every layer."""
    return block(x, pos, cache)


def positions_for(x: Tensor, head_dim: int, theta: float, cache: Optional[KVCache],
                  input_pos: Optional[Tensor], window: Optional[int] = None) -> Positions:
    """Positions of a pass over x (B, T, ...): without a cache, 0..T-1 (or `input_pos`); with one,
    `input_pos` (B|1, T), attending over the first `window` slots (default: the whole cache)."""
    if cache is None:
        if input_pos is None:
            input_pos = torch.arange(x.shape[1], device=x.device)[None]
        return Positions.make(head_dim, theta, input_pos)
    if input_pos is None:
        raise ValueError("a cached pass needs input_pos (B, T): the cache slots of the new latents")
    return Positions.make(head_dim, theta, input_pos, window or cache.max_len, x.dtype)
