"""Latent LM: a decoder-only transformer over codec latents that predicts, at each position,
the FSQ index (one of 32768) of the next latent. Duplex: the two channels' input projections
are summed into one stream, and two output heads predict one index per channel.

Names follow the original `HertzDevModel` (`input`, `input2`, `layers`, `output`, `output2`)
so the official LM files load with `strict=True`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from .transformer import Block, KVCache, Norm, positions_for, run_block


class GPTOutput(nn.Module):
    """Final norm and projection to the code vocabulary."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.norm = Norm(dim, eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.norm(x))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal output weights with std 1/dim."""
        std = 1.0 / self.dim  # the original: 1 / sqrt(dim ** 2)
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)


class LatentLM(nn.Module):
    """The latent LM: input projection(s), pre-norm blocks, one output head per channel."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.duplex = cfg.duplex
        self.head_dim = cfg.lm_dim // cfg.lm_heads
        self.kv_heads = cfg.lm_kv_heads or cfg.lm_heads
        self.input = nn.Linear(cfg.latent_dim, cfg.lm_dim)
        if self.duplex:
            self.input2 = nn.Linear(cfg.latent_dim, cfg.lm_dim)
        self.layers = nn.ModuleList(
            Block(cfg.lm_dim, cfg.lm_heads, cfg.lm_kv_heads, cfg.lm_ff_dim, cfg.eps) for _ in range(cfg.lm_layers))
        self.output = GPTOutput(cfg.lm_dim, cfg.vocab_size, cfg.eps)
        if self.duplex:
            self.output2 = GPTOutput(cfg.lm_dim, cfg.vocab_size, cfg.eps)

    def init_weights(self) -> None:
        """The original initialisation of the blocks and output heads."""
        for m in self.modules():
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    def make_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> KVCache:
        """A zeroed KV cache for `batch_size` rows of `max_len` slots (default: seq_len), on the
        weights' device and dtype unless given."""
        p = self.input.weight
        return KVCache(len(self.layers), batch_size, self.kv_heads, max_len or self.config.seq_len,
                       self.head_dim, device or p.device, dtype or p.dtype)

    def embed(self, latents: Tensor) -> Tensor:
        """(B, T, C*32) latents -> (B, T, dim); duplex sums the two channels' projections."""
        if self.duplex:
            x1, x2 = latents.chunk(2, dim=-1)
            return self.input(x1) + self.input2(x2)
        return self.input(latents)

    def hidden(self, latents: Tensor, cache: Optional[KVCache] = None, input_pos: Optional[Tensor] = None,
               window: Optional[int] = None, checkpoint: bool = False, block: Callable = run_block) -> Tensor:
        """(B, T, C*32) -> last hidden states (B, T, dim). See `forward`."""
        x = self.embed(latents)
        pos = positions_for(x, self.head_dim, self.config.theta, cache, input_pos, window)
        for i, layer in enumerate(self.layers):
            c = cache.layer(i, pos.window) if cache is not None else None
            if checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, layer, x, pos, c, use_reentrant=False)
            else:
                x = block(layer, x, pos, c)
        return x

    def heads(self, h: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Hidden states (B, T, dim) -> logits (B, T, 32768); duplex: one per channel."""
        if self.duplex:
            return self.output(h), self.output2(h)
        return self.output(h)

    def forward(self, latents: Tensor, cache: Optional[KVCache] = None, input_pos: Optional[Tensor] = None,
                window: Optional[int] = None, checkpoint: bool = False,
                block: Callable = run_block) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """(B, T, C*32) latents -> logits (B, T, 32768) over the next latent's FSQ index;
        duplex: a pair, one per channel.

        Training and full forwards: no cache (positions 0..T-1, causal). Prefill and decode:
        `cache` and `input_pos` (B|1, T), the slots of these latents; the keys and values are
        written there and attention covers the first `window` slots (default: the whole cache).
        `checkpoint`: activation checkpointing per block while training. `block`: the function
        that runs a block (`run_block`, or a compiled version of it)."""
        return self.heads(self.hidden(latents, cache, input_pos, window, checkpoint, block))
