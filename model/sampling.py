"""Sampling the next FSQ token (temperature, top-p, min-p) and the next latent from the mixture
(mixture temperature, Gaussian temperature).

No host synchronisation: categorical draws use the exponential-race form of the Gumbel-max trick
(argmax p / E, E ~ Exp(1)), so a whole generation step can be captured in a CUDA graph.
Temperature 0 means greedy (argmax; the mixture's mean component for latents).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the original's `temps=(0.8, (0.5, 0.1))`."""
    token_temp: float = 0.8        # LM softmax temperature
    top_p: float = 1.0             # nucleus: keep the smallest set of tokens with mass >= top_p
    min_p: float = 0.0             # drop tokens with p < min_p * p_max
    mixture_temp: float = 0.5      # temperature of the mixture component choice
    gaussian_temp: float = 0.1     # scale of the Gaussian noise around the chosen component

    def validate(self) -> "SamplingParams":
        for name in ("token_temp", "mixture_temp", "gaussian_temp", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p > 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        return self


def _race(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One categorical draw per row of (..., K) probabilities: argmax p / Exp(1)."""
    e = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / e, dim=-1)


def filter_probs(probs: Tensor, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Zero out tokens outside the top-p nucleus or below min_p * max; rows are not renormalised
    (the race draw does not need it)."""
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        total = sorted_p.sum(dim=-1, keepdim=True)
        sorted_p = sorted_p.masked_fill(before >= top_p * total, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def sample_token(logits: Tensor, temperature: float = 0.8, top_p: float = 1.0, min_p: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """(..., V) logits -> (...) int64 token ids."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return _race(filter_probs(probs, top_p, min_p), generator)


def sample_latent(locs: Tensor, scales: Tensor, logits: Tensor, mixture_temp: float = 0.5,
                  gaussian_temp: float = 0.1, generator: Optional[torch.Generator] = None) -> Tensor:
    """Mixture (..., K, Z), (..., K, Z), (..., K) -> a latent (..., Z): choose a component from
    softmax(logits / mixture_temp), then loc + gaussian_temp * scale * N(0, 1)."""
    if mixture_temp <= 0:
        k = torch.argmax(logits, dim=-1)
    else:
        k = _race(torch.softmax(logits.float() / mixture_temp, dim=-1), generator)
    idx = k[..., None, None].expand(*k.shape, 1, locs.shape[-1])
    loc = torch.gather(locs, -2, idx).squeeze(-2)
    scale = torch.gather(scales, -2, idx).squeeze(-2)
    noise = torch.randn(loc.shape, device=loc.device, dtype=loc.dtype, generator=generator)
    return loc + gaussian_temp * scale * noise
