"""Latent quantizer: Linear -> SwiGLU FFN -> FSQ (levels 8,8,8,8,8: 32768 codes, 15 bits).

Names follow the original `LatentQuantizer` / lucidrains-style `FSQ` so `inference_volcano_3.pt`
loads with `strict=True`. Unlike the original (which runs under `no_grad`), the forward pass is
differentiable through FSQ's straight-through rounding, so the quantizer can be trained.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .transformer import FFNN


def round_ste(z: Tensor) -> Tensor:
    """Round with straight-through gradients."""
    return z + (z.round() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantization with projections in and out of the `len(levels)`-dim code space."""

    def __init__(self, levels: tuple[int, ...], dim: int):
        super().__init__()
        self.levels = tuple(levels)
        self.codebook_size = math.prod(self.levels)
        self.codebook_dim = len(self.levels)
        self.project_in = nn.Linear(dim, self.codebook_dim)
        self.project_out = nn.Linear(self.codebook_dim, dim)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """Derived constants; rebuilt after a model built on `meta` is materialised."""
        basis = [1]
        for level in self.levels[:-1]:
            basis.append(basis[-1] * level)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int32, device=device), persistent=False)

    def bound(self, z: Tensor, eps: float = 1e-3) -> Tensor:
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: Tensor) -> Tensor:
        """(..., d) -> codes in [-1, 1] on the FSQ grid (straight-through)."""
        return round_ste(self.bound(z)) / (self._levels // 2)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        half_width = self._levels // 2
        return ((codes * half_width + half_width) * self._basis).sum(dim=-1).round().to(torch.int32)

    def indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """(...) int -> (..., d) codes in [-1, 1] (before `project_out`)."""
        half_width = self._levels // 2
        levels = (indices[..., None] // self._basis) % self._levels
        return (levels - half_width) / half_width

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int -> (..., dim): the projected codes, as `forward` returns them."""
        codes = self.indices_to_level_codes(indices).to(self.project_out.weight.dtype)
        return self.project_out(codes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(..., dim) -> projected codes (..., dim), indices (...) int32."""
        z = self.project_in(z)
        # Quantize in float32 whatever the autocast/compute dtype: the grid must be exact.
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self.quantize(z.float())
            indices = self.codes_to_indices(codes)
        return self.project_out(codes.to(z.dtype)), indices


class LatentQuantizer(nn.Module):
    """Continuous 32-dim codec latents -> 15-bit FSQ codes (what the LM predicts)."""

    def __init__(self, cfg):
        super().__init__()
        self.compressor = FSQ(cfg.fsq_levels, cfg.quantizer_dim)
        self.ffnn = FFNN(cfg.quantizer_dim, cfg.quantizer_ff_dim)
        self.input = nn.Linear(cfg.latent_dim, cfg.quantizer_dim)
        self.dim = cfg.quantizer_dim

    @property
    def codebook_size(self) -> int:
        return self.compressor.codebook_size

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, 32) -> projected codes (B, T, dim), indices (B, T) int32."""
        return self.compressor(self.ffnn(self.input(latents)))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, T) indices -> (B, T, dim) projected codes."""
        return self.compressor.indices_to_codes(indices)
