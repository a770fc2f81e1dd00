"""Sampling the next FSQ token (temperature, top-p, min-p) and the next latent from the mixture
(mixture temperature, Gaussian temperature), for a batch of rows with their own parameters and
their own counter-based random streams.

No host synchronisation and no generator state: a whole generation step can be captured in a
CUDA graph. Temperature 0 means greedy (argmax; the likeliest mixture component for latents).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .protocol import check_params


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the original's `temps=(0.8, (0.5, 0.1))`. Checked when made (`validate`): a
    value outside its range is a ValueError naming the field where it is written, not later."""
    token_temp: float = 0.8        # LM softmax temperature
    top_p: float = 1.0             # nucleus: keep the smallest set of tokens with mass >= top_p
    min_p: float = 0.0             # drop tokens with p < min_p * p_max
    mixture_temp: float = 0.5      # temperature of the mixture component choice
    gaussian_temp: float = 0.1     # scale of the Gaussian noise around the chosen component

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        """Self, or ValueError naming the first field outside its documented range
        (`model.protocol.PARAM_RANGES`, the one place every entry point checks against). Run when
        made (`dataclasses.replace` included); callers taking any object call it as a type check."""
        check_params(asdict(self))
        return self


# Each batch row (a completion, or a session of the live server) has its own temperatures and its
# own random stream. Noise is a pure function of (row seed, stream, row counter, index): a
# counter-based generator made of integer hashing, so a row draws the same numbers whatever the
# other rows are, whether the step is cached or not, and inside a CUDA graph (no generator state).
# Categorical draws use the inverse CDF (one uniform per draw) rather than a race over the whole
# vocabulary, so a step needs a few hundred random numbers per row, not 65536.

_M32 = 0xFFFFFFFF
STEP_STREAM, PROMPT_STREAM = 1, 2


def row_seed(seed: int, row: int = 0) -> int:
    """A 63-bit seed for batch row `row` of a generation seeded with `seed` (splitmix64), so rows
    of one call draw independent streams and a call's rows do not depend on the batch size."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(row) + 1) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (z ^ (z >> 31)) >> 1


def _mix32(x: Tensor) -> Tensor:
    """The `lowbias32` integer hash (C. Wellons) on int64 tensors holding 32-bit values. Both
    multipliers are < 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


# On CUDA the uniforms come from one Triton kernel (`model.sampling_kernels`), equal bit for bit;
# False: the torch version everywhere (benchmarks compare the two).
NOISE_KERNEL = True


def counter_uniform(seed: Tensor, counter: Tensor, stream: int, n: int) -> Tensor:
    """(B,) int64 row seeds and counters -> (B, n) float32 uniforms in (0, 1), with 24 bits each."""
    if NOISE_KERNEL and seed.is_cuda:
        from . import sampling_kernels  # Triton, imported where a CUDA step draws
        return sampling_kernels.counter_uniform(seed, counter, stream, n)
    key = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ stream))
    key = _mix32(key ^ (counter & _M32))
    idx = _mix32(torch.arange(n, device=seed.device, dtype=torch.int64) + 0x9E3779B9)
    x = _mix32(key[:, None] ^ idx)
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def box_muller(u: Tensor) -> Tensor:
    """(..., 2n) uniforms -> (..., n) N(0, 1) draws."""
    n = u.shape[-1] // 2
    return torch.sqrt(-2 * torch.log(u[..., :n])) * torch.cos((2 * math.pi) * u[..., n:])


def counter_normal(seed: Tensor, counter: Tensor, stream: int, n: int) -> Tensor:
    """(B, n) draws of N(0, 1)."""
    return box_muller(counter_uniform(seed, counter, stream, 2 * n))


@dataclass
class StepNoise:
    """The random draws of one generation step, for B rows and C channels.

    token, mixture: (B, C) uniforms for the token and mixture-component draws; gaussian: (B, C, Z)
    N(0, 1) around the chosen component; posterior: (B, Z) N(0, 1) for drawing a user latent
    from the codec posterior (live engine).
    """
    token: Tensor
    mixture: Tensor
    gaussian: Tensor
    posterior: Tensor

    @staticmethod
    def draw(seed: Tensor, counter: Tensor, channels: int, latent_dim: int) -> "StepNoise":
        """Row r's draws depend on (seed[r], counter[r]) only."""
        B, C, Z = seed.shape[0], channels, latent_dim
        u = counter_uniform(seed, counter, STEP_STREAM, 2 * C + 2 * C * Z + 2 * Z)
        token, mixture, gauss, post = u.split([C, C, 2 * C * Z, 2 * Z], dim=-1)
        return StepNoise(token, mixture, box_muller(gauss.reshape(B, C, 2 * Z)), box_muller(post))


@dataclass
class RowParams:
    """SamplingParams as (B,) float32 tensors, one value per row, updated in place."""
    token_temp: Tensor
    top_p: Tensor
    min_p: Tensor
    mixture_temp: Tensor
    gaussian_temp: Tensor

    FIELDS = ("token_temp", "top_p", "min_p", "mixture_temp", "gaussian_temp")

    @staticmethod
    def make(batch_size: int, device=None, params: SamplingParams = SamplingParams()) -> "RowParams":
        return RowParams(*(torch.full((batch_size,), float(getattr(params, f)), device=device)
                           for f in RowParams.FIELDS))

    def set(self, row, params: SamplingParams) -> None:
        """Set the parameters of `row` (an int or a slice); no host synchronisation."""
        params.validate()
        for f in self.FIELDS:
            getattr(self, f)[row] = float(getattr(params, f))


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One categorical draw per row of (..., K) non-negative weights (not normalised) with one
    uniform u (...) each: the first index whose cumulative weight exceeds u * total."""
    cdf = torch.cumsum(probs, dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True)
    return idx.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def sample_tokens(logits: Tensor, u: Tensor, params: RowParams, top_p: bool = True) -> Tensor:
    """(B, C, V) logits and (B, C) uniforms -> (B, C) int64 tokens, each row with its own
    temperature (<= 0: argmax), top-p (keep the smallest set of tokens with mass >= top_p) and
    min-p (drop tokens with p < min_p * p_max). `top_p=False` skips the sort that top-p needs, for batches where no row uses it.

    The draw walks the CDF in vocabulary order (sorting only finds the top-p threshold), so
    logits that differ by rounding give the same token unless u falls on a boundary."""
    temp = params.token_temp[:, None, None]
    probs = torch.softmax(logits.float() / temp.clamp_min(1e-6), dim=-1)
    keep = probs >= params.min_p[:, None, None] * probs.amax(dim=-1, keepdim=True)
    if top_p:
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        p = params.top_p[:, None, None]
        n_keep = (before < p * (before[..., -1:] + sorted_p[..., -1:])).sum(dim=-1, keepdim=True).clamp_(min=1)
        keep &= (probs >= torch.gather(sorted_p, -1, n_keep - 1)) | (p >= 1)
    drawn = inverse_cdf(probs * keep, u)
    return torch.where(params.token_temp[:, None] > 0, drawn, torch.argmax(logits, dim=-1))


def sample_latents(locs: Tensor, scales: Tensor, logits: Tensor, u: Tensor, normal: Tensor,
                   params: RowParams) -> Tensor:
    """Mixtures (B, C, K, Z), (B, C, K, Z), (B, C, K), uniforms (B, C) and N(0, 1) noise
    (B, C, Z) -> latents (B, C, Z) float32: a component from softmax(logits / mixture_temp)
    (<= 0: the likeliest), then loc + gaussian_temp * scale * N(0, 1)."""
    temp = params.mixture_temp[:, None, None]
    probs = torch.softmax(logits.float() / temp.clamp_min(1e-6), dim=-1)
    k = torch.where(temp[..., 0] > 0, inverse_cdf(probs, u), torch.argmax(logits, dim=-1))
    idx = k[..., None, None].expand(*k.shape, 1, locs.shape[-1])
    loc = torch.gather(locs, -2, idx).squeeze(-2).float()
    scale = torch.gather(scales, -2, idx).squeeze(-2).float()
    return loc + params.gaussian_temp[:, None, None] * scale * normal
