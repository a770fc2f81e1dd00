"""Training objectives of the latent quantizer, the LM and the resynthesizer, and their FLOP count.

A sequence of T latents (B, T, C*32) gives T-1 predictions: position t predicts latent t+1, and
counts only where latent t+1 is real (not padding). The resynthesizer at t is given the FSQ code
of latent t+1 (`plex_codes` with roll 1); the last position, whose code wraps around to latent 0,
is never a prediction.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .resynth import mixture_nll
from .transformer import kv_dtype_of

# What each stage trains (the other components are frozen), and the losses it optimises.
STAGES: dict[str, tuple[str, ...]] = {
    "quantizer": ("quantizer", "resynth"),
    "resynthesizer": ("resynth",),
    "lm": ("lm",),
    "all": ("quantizer", "lm", "resynth"),
}
STAGE_LOSSES: dict[str, tuple[str, ...]] = {
    "quantizer": ("resynth_nll",),
    "resynthesizer": ("resynth_nll",),
    "lm": ("lm_ce",),
    "all": ("lm_ce", "resynth_nll"),
}


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """sum_t m_t * -log softmax(logits_t)[y_t] (float32) and the number of masked positions whose
    top-1 prediction is y_t. logits (B, T, V), targets (B, T) int, mask (B, T) float. A target
    outside [0, V) (the index of a NaN code, when training diverged) gives a NaN loss, for the
    trainer's finite-loss check to report, rather than an IndexError (a device assert on CUDA)."""
    targets = targets.flatten().long()
    inside = (targets >= 0) & (targets < logits.shape[-1])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), torch.where(inside, targets, 0), reduction="none")  # (B*T,)
    ce = torch.where(inside, ce, float("nan"))
    correct = (logits.argmax(dim=-1).flatten() == targets).float() * mask.flatten()
    return (ce * mask.flatten()).sum(), correct.sum()


@functools.cache
def _compiled_cross_entropy() -> Callable:
    # One fused kernel reads the bf16 logits once; eager would first copy all B*T*32768 to float32.
    return torch.compile(masked_cross_entropy)


def quantize_channels(quantizer, latents: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """(B, T, C*32) -> projected codes (C*B, T, qdim) and indices (C*B, T), the channels stacked
    on the batch axis (channel 0 first): one quantizer call, as DDP wants one forward per step."""
    return quantizer(torch.cat(latents.chunk(channels, dim=-1), dim=0))


def compute_losses(quantizer, lm, resynth, latents: Tensor, valid: Tensor, duplex: bool,
                   losses: tuple[str, ...], train_quantizer: bool = False, checkpoint: bool = False,
                   compiled: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The named losses of one batch and detached statistics.

    latents (B, T, C*32) posterior samples; valid (B, T) bool, False on padding.
    losses: any of
      lm_ce       -sum_{c,t} m_t log p_LM,c(y_{c,t+1} | x_{<=t}) / (C sum_t m_t): cross-entropy of
                  each channel's head on the quantizer index y of the next latent (nats);
      resynth_nll -sum_{c,t} m_t log p_mix,c(x_{c,t+1} | x_{<=t}, q(x_{c,t+1})) / (C sum_t m_t): NLL
                  of the next latent under the mixture, given its code (nats per 32-dim latent).
    train_quantizer: gradients reach the quantizer through the codes fed to the resynthesizer
    (FSQ's straight-through rounding); LM targets are indices, so never carry gradients.
    Returns (losses, stats): stats has `count` (predicted positions), `lm_correct` and
    `indices` (C*B, T) for accuracy and code utilisation.
    """
    C = 2 if duplex else 1
    # mask[:, t]: position t predicts a real latent t+1; the last position predicts nothing.
    # Targets are shifted with torch.roll (full-length tensors, no sliced copies of the logits).
    mask = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1).float()  # (B, T)
    count = mask.sum()
    denominator = C * count.clamp_min(1)
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_quantizer and "resynth_nll" in losses):
        codes, indices = quantize_channels(quantizer, latents, C)  # (C*B, T, qdim), (C*B, T)
    out, stats = {}, {"count": count, "indices": indices.detach()}
    if "lm_ce" in losses:
        logits = lm(latents, checkpoint=checkpoint)  # (B, T, V), duplex a pair
        ce = _compiled_cross_entropy() if compiled else masked_cross_entropy
        total, correct = 0.0, 0.0
        for head, target in zip(logits if duplex else (logits,), indices.chunk(C, dim=0)):
            s, c = ce(head, torch.roll(target, -1, dims=1), mask)
            total, correct = total + s, correct + c
        out["lm_ce"] = total / denominator
        stats["lm_correct"] = correct.detach()
    if "resynth_nll" in losses:
        # the code of latent t+1 at position t, wrapping at the end (what `plex_codes` computes)
        plex = [torch.roll(c, -1, dims=1) for c in codes.chunk(C, dim=0)]
        mixtures = resynth(latents, tuple(plex) if duplex else plex[0], checkpoint=checkpoint)
        total = 0.0
        for mixture, target in zip(mixtures if duplex else (mixtures,), latents.chunk(C, dim=-1)):
            nll = mixture_nll(torch.roll(target, -1, dims=1), mixture)  # (B, T)
            total = total + (nll * mask).sum()
        out["resynth_nll"] = total / denominator
    return out, stats


def through_cache(module, kv_dtype) -> Callable:
    """`module` (a LatentLM or a Resynthesizer) called as `compute_losses` calls it, but each forward
    writes its keys and values into a fresh KV cache in `kv_dtype` and attends over the cache, as
    generation does: the losses then include the cache's rounding (a float8 cache, say)."""
    def forward(latents: Tensor, *plex, checkpoint: bool = False):
        B, T = latents.shape[:2]
        cache = module.make_cache(B, T, dtype=kv_dtype_of(kv_dtype))
        return module(latents, *plex, cache=cache, input_pos=torch.arange(T, device=latents.device)[None].expand(B, T))
    return forward


# --- FLOPs ------------------------------------------------------------------------------------

def _block_params(dim: int, heads: int, kv_heads: Optional[int], ff_dim: Optional[int]) -> int:
    from .transformer import default_ff_dim
    hd, kv, ff = dim // heads, kv_heads or heads, ff_dim or default_ff_dim(dim)
    return dim * hd * (heads + 2 * kv) + dim * dim + 3 * dim * ff  # qkv, out, gate+up, down


def forward_flops(cfg, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per latent (one time step, all channels) of each component:
    2 * (matmul weights used per latent, counting each duplex stream that uses them) plus
    attention 4 * d * T per layer and stream (QK^T and AV over T keys), halved when `causal`
    (flash attention skips the masked half). Norms, rotary and softmax are left out."""
    C = cfg.channels
    lm = cfg.lm_layers * _block_params(cfg.lm_dim, cfg.lm_heads, cfg.lm_kv_heads, cfg.lm_ff_dim) \
        + C * (cfg.latent_dim * cfg.lm_dim + cfg.lm_dim * cfg.vocab_size)
    lower = cfg.resynth_layers // 2
    upper = cfg.resynth_layers - lower
    block = _block_params(cfg.resynth_dim, cfg.resynth_heads, cfg.resynth_kv_heads, cfg.resynth_ff_dim)
    k = cfg.num_components
    rs = (lower + C * upper) * block + C * (cfg.latent_dim * cfg.resynth_dim + cfg.quantizer_dim * cfg.resynth_dim
                                            + cfg.resynth_dim * (2 * k * cfg.latent_dim + k))
    q, f, n = cfg.quantizer_dim, cfg.quantizer_ff_dim, len(cfg.fsq_levels)
    quant = C * (cfg.latent_dim * q + 3 * q * f + 2 * q * n)
    attn = 4 * seq_len * (0.5 if causal else 1.0)
    return {"quantizer": 2.0 * quant,
            "lm": 2.0 * lm + attn * cfg.lm_dim * cfg.lm_layers,
            "resynth": 2.0 * rs + attn * cfg.resynth_dim * (lower + C * upper)}


def train_flops_per_latent(cfg, stage: str, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs of one training step per latent: 3x forward (forward, and backward for
    activations and weights) for trained components, 1x for components only run forward (the
    frozen quantizer). Activation recomputation is not counted (MFU, not hardware FLOPs)."""
    fwd = forward_flops(cfg, seq_len, causal)
    trained = STAGES[stage]
    used = {"quantizer"} | ({"lm"} if "lm_ce" in STAGE_LOSSES[stage] else set()) | \
        ({"resynth"} if "resynth_nll" in STAGE_LOSSES[stage] else set())
    return sum(fwd[c] * (3 if c in trained else 1) for c in used)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device (`override_tflops` if > 0), or None if unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
