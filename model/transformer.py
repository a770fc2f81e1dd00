"""Transformer blocks shared by the latent LM and the resynthesizer.

Pre-norm blocks, LayerNorm (no bias) on the full q and k projections, rotary positions
(half-rotation, as in the original `ShapeRotator`), SwiGLU feed-forward, fused QKV projection,
grouped-query capable. Parameter names follow the original `transformer.py`.

Caching: a `KVCache` is preallocated at full length for a batch and written by position
(`index`/`scatter` with a position tensor, never by concatenation), so a decode step has static
shapes and can be compiled or captured in a CUDA graph. Each batch row has its own positions,
so rows (server sessions) may be at different points of their streams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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
    """SwiGLU: down(up * silu(gate)), gate and up from one fused projection."""

    def __init__(self, dim: int, expand_dim: Optional[int] = None):
        super().__init__()
        self.expand_dim = expand_dim or default_ff_dim(dim)
        self.gateup_proj = nn.Linear(dim, 2 * self.expand_dim, bias=False)
        self.down_proj = nn.Linear(self.expand_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gateup_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


@dataclass
class Positions:
    """Where a forward pass sits in time, computed once per pass and shared by every layer.

    cos, sin: (B|1, T, head_dim) rotary tables for the queries and new keys.
    input_pos: (B, T) cache slots the new keys and values are written to (cached passes only).
    mask: (B, 1, T, L) which cache slots each query may attend to (cached passes only).
    """
    cos: Tensor
    sin: Tensor
    input_pos: Optional[Tensor] = None
    mask: Optional[Tensor] = None

    @staticmethod
    def make(head_dim: int, theta: float, pos: Tensor, cache_len: Optional[int] = None) -> "Positions":
        """Rotary tables for integer positions `pos` (B|1, T); with `cache_len`, also the write
        slots and the causal mask over a cache of that length."""
        # float32 as the original: t * inv_freq, then cos/sin of cat(freqs, freqs).
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
        freqs = pos.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        mask = None
        if cache_len is not None:
            slots = torch.arange(cache_len, device=pos.device)
            mask = (slots[None, None, :] <= pos[..., None])[:, None]  # (B, 1, T, L)
        return Positions(emb.cos(), emb.sin(), pos if cache_len is not None else None, mask)

    def repeat(self, n: int) -> "Positions":
        """The same positions for `n` streams stacked on the batch axis; tensors with a batch of 1
        are left to broadcast."""
        def rep(t):
            return t if t is None or t.shape[0] == 1 else torch.cat([t] * n, dim=0)
        return Positions(rep(self.cos), rep(self.sin), rep(self.input_pos), rep(self.mask))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos, sin (B|1, T, D). Computed in float32, returned in x's dtype."""
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class KVCache:
    """Keys and values of a stack of layers: (layers, B, kv_heads, max_len, head_dim), zeroed.

    `update` writes the new entries at their positions and returns the layer's whole cache;
    the mask in `Positions` hides slots not yet written (or left over from an earlier stream).
    """

    def __init__(self, layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (layers, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, kv_heads, T, D) at positions input_pos (B, T)."""
        idx = input_pos[:, None, :, None].expand_as(k)
        kc, vc = self.k[layer], self.v[layer]
        kc.scatter_(2, idx, k.to(kc.dtype))
        vc.scatter_(2, idx, v.to(vc.dtype))
        return kc, vc

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


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

    def forward(self, x: Tensor, pos: Positions, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.proj_qkv(x).split([self.n_heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = self.norm_q(q).view(B, T, self.n_heads, hd).transpose(1, 2)   # (B, H, T, hd)
        k = self.norm_k(k).view(B, T, self.kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary(q, pos.cos, pos.sin), apply_rotary(k, pos.cos, pos.sin)
        gqa = self.kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(layer, pos.input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=pos.mask, enable_gqa=gqa)
        return self.attn_out(y.transpose(1, 2).reshape(B, T, -1))


class PreNormAttn(nn.Module):
    def __init__(self, dim, n_head, kv_heads=None, eps=1e-5):
        super().__init__()
        self.attn_norm = Norm(dim, eps=eps)
        self.attn = GQA(dim, n_head, kv_heads, eps=eps)

    def forward(self, x, pos, cache=None, layer=0):
        return x + self.attn(self.attn_norm(x), pos, cache, layer)


class PreNormFFNN(nn.Module):
    def __init__(self, dim, ff_dim=None, eps=1e-5):
        super().__init__()
        self.ffnn_norm = Norm(dim, eps=eps)
        self.ffnn = FFNN(dim, ff_dim)

    def forward(self, x):
        return x + self.ffnn(self.ffnn_norm(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffnn(norm(h))."""

    def __init__(self, dim: int, n_head: int, kv_heads: Optional[int] = None,
                 ff_dim: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        self.attn = PreNormAttn(dim, n_head, kv_heads, eps=eps)
        self.ffnn = PreNormFFNN(dim, ff_dim, eps=eps)
        self.dim = dim

    def forward(self, x: Tensor, pos: Positions, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        return self.ffnn(self.attn(x, pos, cache, layer))

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original initialisation: truncated normals with std 1/sqrt(fan-in)."""
        std = 1.0 / math.sqrt(self.dim)
        for w in (self.ffnn.ffnn.gateup_proj.weight, self.attn.attn.proj_qkv.weight, self.attn.attn.attn_out.weight):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
        xstd = 1.0 / math.sqrt(self.ffnn.ffnn.expand_dim)
        nn.init.trunc_normal_(self.ffnn.ffnn.down_proj.weight, std=xstd, a=-3 * xstd, b=3 * xstd)


def positions_for(x: Tensor, head_dim: int, theta: float, cache: Optional[KVCache],
                  input_pos: Optional[Tensor]) -> Positions:
    """Positions of a pass over x (B, T, ...): 0..T-1 without a cache, `input_pos` (B, T) with one."""
    if cache is None:
        if input_pos is None:
            input_pos = torch.arange(x.shape[1], device=x.device)[None]
        return Positions.make(head_dim, theta, input_pos)
    if input_pos is None:
        raise ValueError("a cached pass needs input_pos (B, T): the cache slots of the new latents")
    return Positions.make(head_dim, theta, input_pos, cache.max_len)
