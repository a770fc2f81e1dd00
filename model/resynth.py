"""Resynthesizer: predicts the next continuous latent as an 8-component Gaussian mixture,
given the history of latents and the quantized code of that next latent.

The code is injected at layer `layers // 2` (the "plex" layer): position t receives the
projected FSQ code of latent t+1. Duplex: the lower half runs once on the sum of the two
channels' input projections; the upper half runs once per channel with the same weights, each
stream with its own injection projection and cache; both streams use the one mixture head.
Here the two upper streams are stacked on the batch axis (one pass, weights read once), which is
the same computation.

Names follow the original `TransformerVAE` (`io`, `io2`, `stack.layers`, `plex_projection`,
`plex_projection2`, `out_norm`) so the official files load with `strict=True`. The quantizer is
not a submodule (it has its own official file): it is passed in where codes are computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .transformer import Block, KVCache, Norm, positions_for, run_block

Mixture = tuple[Tensor, Tensor, Tensor]  # locs (B, T, K, 32), scales (B, T, K, 32), logits (B, T, K)


class GaussianMixtureIOLayer(nn.Module):
    """Latent input projection and the mixture head (the original `GaussianMixtureIOLayer`)."""

    def __init__(self, latent_dim: int, dim: int, num_components: int, head: bool = True):
        super().__init__()
        self.latent_dim = latent_dim
        self.num_components = num_components
        self.input_projection = nn.Linear(latent_dim, dim)
        if head:
            self.fc_loc = nn.Linear(dim, num_components * latent_dim)
            self.fc_scale = nn.Linear(dim, num_components * latent_dim)
            self.fc_weight = nn.Linear(dim, num_components)

    def output(self, h: Tensor) -> Mixture:
        """(B, T, D) -> locs, scales (softplus-like square-plus, >= 1e-6), mixture logits."""
        B, T, _ = h.shape
        locs = self.fc_loc(h).view(B, T, self.num_components, self.latent_dim)
        s = self.fc_scale(h)
        scales = torch.clamp((s + torch.sqrt(s * s + 4)) / 2, min=1e-6).view(B, T, self.num_components, self.latent_dim)
        logits = self.fc_weight(h).view(B, T, self.num_components)
        return locs, scales, logits


def mixture_nll(x: Tensor, mixture: Mixture) -> Tensor:
    """Negative log-likelihood of x (..., 32) under the diagonal Gaussian mixture, per position:
    -log sum_k softmax(logits)_k N(x; loc_k, diag(scale_k^2)). Computed in float32."""
    locs, scales, logits = (t.float() for t in mixture)
    x = x.float().unsqueeze(-2)
    log_probs = -0.5 * torch.sum(((x - locs) / scales) ** 2 + 2 * torch.log(scales) + math.log(2 * math.pi), dim=-1)
    return -torch.logsumexp(F.log_softmax(logits, dim=-1) + log_probs, dim=-1)


@dataclass
class ResynthCache:
    """KV caches of the resynthesizer: the shared lower half (batch B) and the upper half
    (batch B * channels: one stream per channel)."""
    lower: KVCache
    upper: KVCache

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values."""
        return self.lower.nbytes + self.upper.nbytes

    def row(self, r: int) -> "ResynthCache":
        """Batch row `r` alone, as views (writes land here). The upper streams are stacked
        channel-major on the batch axis, so row r's streams are r, r + B, ..."""
        B = self.lower.batch_size
        return ResynthCache(self.lower.select(slice(r, r + 1)), self.upper.select(slice(r, None, B)))


class _Stack(nn.Module):
    """The blocks, under the original's name `stack.layers`."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class Resynthesizer(nn.Module):
    """The resynthesizer: latents and the next latent's codes -> a Gaussian mixture over it."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.duplex = cfg.duplex
        self.channels = 2 if cfg.duplex else 1
        self.head_dim = cfg.resynth_dim // cfg.resynth_heads
        self.kv_heads = cfg.resynth_kv_heads or cfg.resynth_heads
        self.plex_layer = cfg.resynth_layers // 2
        self.io = GaussianMixtureIOLayer(cfg.latent_dim, cfg.resynth_dim, cfg.num_components)
        self.stack = _Stack(Block(cfg.resynth_dim, cfg.resynth_heads, cfg.resynth_kv_heads, cfg.resynth_ff_dim, cfg.eps)
                            for _ in range(cfg.resynth_layers))
        self.plex_projection = nn.Linear(cfg.quantizer_dim, cfg.resynth_dim)
        self.out_norm = Norm(cfg.resynth_dim, cfg.eps)
        if self.duplex:
            self.io2 = GaussianMixtureIOLayer(cfg.latent_dim, cfg.resynth_dim, cfg.num_components, head=False)
            self.plex_projection2 = nn.Linear(cfg.quantizer_dim, cfg.resynth_dim)

    def init_weights(self) -> None:
        """The original initialisation of the blocks."""
        for layer in self.stack.layers:
            layer.init_weights()

    def make_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> ResynthCache:
        """Zeroed caches for `batch_size` rows of `max_len` slots (default: seq_len)."""
        p = self.plex_projection.weight
        args = (self.kv_heads, max_len or self.config.seq_len, self.head_dim, device or p.device, dtype or p.dtype)
        n = len(self.stack.layers)
        return ResynthCache(KVCache(self.plex_layer, batch_size, *args),
                            KVCache(n - self.plex_layer, batch_size * self.channels, *args))

    def forward(self, latents: Tensor, plex: Union[Tensor, tuple[Tensor, ...]], cache: Optional[ResynthCache] = None,
                input_pos: Optional[Tensor] = None, window: Optional[int] = None, checkpoint: bool = False,
                block: Callable = run_block) -> Union[Mixture, tuple[Mixture, Mixture]]:
        """latents (B, T, C*32) and plex, the projected FSQ codes of the *next* latent at each
        position ((B, T, qdim), or one per channel for duplex) -> the mixture over latent t+1;
        duplex: a pair of mixtures, one per channel.

        Positions, cache, window, checkpointing and `block` as in `LatentLM.forward`."""
        B = latents.shape[0]
        if self.duplex:
            x1, x2 = latents.chunk(2, dim=-1)
            x = self.io.input_projection(x1) + self.io2.input_projection(x2)
        else:
            x = self.io.input_projection(latents)
        pos = positions_for(x, self.head_dim, self.config.theta, cache.lower if cache else None, input_pos, window)
        layers = self.stack.layers
        for i in range(self.plex_layer):
            x = self._layer(block, layers[i], x, pos, cache.lower if cache else None, i, checkpoint)
        if self.duplex:
            plex1, plex2 = plex
            # Two streams stacked on the batch axis: (2B, T, D).
            x = torch.cat([x + self.plex_projection(plex1), x + self.plex_projection2(plex2)], dim=0)
            pos = pos.repeat(2)
        else:
            x = x + self.plex_projection(plex)
        for i in range(self.plex_layer, len(layers)):
            x = self._layer(block, layers[i], x, pos, cache.upper if cache else None, i - self.plex_layer, checkpoint)
        out = self.io.output(self.out_norm(x))
        if self.duplex:
            return tuple(t[:B] for t in out), tuple(t[B:] for t in out)
        return out

    def _layer(self, block, layer, x, pos, cache, index, checkpoint):
        c = cache.layer(index, pos.window) if cache is not None else None
        if checkpoint and self.training:
            return torch.utils.checkpoint.checkpoint(block, layer, x, pos, c, use_reentrant=False)
        return block(layer, x, pos, c)


def plex_codes(quantizer, latents: Tensor, duplex: bool, roll: int = 1,
               next_tokens: Optional[Union[Tensor, tuple[Tensor, Tensor]]] = None):
    """The original injection input: each channel's projected FSQ codes of `latents`, shifted
    `roll` steps back in time with wrap-around (position t gets the code of latent t+roll; the
    last position wraps to the first frame), and, if `next_tokens` (B, 1) indices are given,
    the last position replaced by their code (what generation does).

    Returns (B, T, qdim), or a tuple of two for duplex.
    """
    chans = latents.chunk(2, dim=-1) if duplex else (latents,)
    toks = (next_tokens if duplex else (next_tokens,)) if next_tokens is not None else (None,) * len(chans)
    out = []
    for x, tok in zip(chans, toks):
        codes, _ = quantizer(x)
        codes = torch.roll(codes, -roll, dims=1)
        if tok is not None:
            codes = torch.cat([codes[:, :-1], quantizer.indices_to_codes(tok).to(codes.dtype)], dim=1)
        out.append(codes)
    return tuple(out) if duplex else out[0]
