"""The reference generator: no caches, full LM and resynthesizer forwards over all frames at every
step, with the engines' counter-based draws. The cached engines must equal it draw for draw."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from model.decode import frame_tokens
from model.generator import ParamsLike, as_params, row_seeds
from model.sampling import RowParams, SamplingParams, StepNoise, sample_latents, sample_tokens


@torch.no_grad()
def generate_uncached(model, prompt: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                      seed: Union[int, Sequence[int]] = 0, prompt_tokens: Optional[Tensor] = None,
                      first_counter: int = 0) -> Tensor:
    """Reference generation without caches: every step runs the full LM and resynthesizer
    forwards over all frames so far (the original's `use_cache=False`), with the same draws as
    `Generator.generate` -> (B, T + steps, C*Z).

    The resynthesizer injects at each past position the token it was generated with -- what a
    cached generation holds in its cache; at prompt positions, `prompt_tokens` (B, T-1, C), by
    default the quantizer's code of the next prompt frame. (The original's uncached mode
    re-quantizes generated latents instead, so there its cached and uncached modes differ
    slightly; its default is the cached one.) `first_counter`: the step count of the first
    step's draws (to follow a generation from its middle)."""
    B, T, _ = prompt.shape
    cfg = model.config
    C, duplex = cfg.channels, cfg.duplex
    seeds = row_seeds(seed, B)
    device = prompt.device
    rp = RowParams.make(B, device)
    for r, p in enumerate(as_params(params, B)):
        rp.set(r, p)
    seed_t = torch.tensor(seeds, device=device)
    frames = prompt
    toks = frame_tokens(model, prompt[:, 1:]) if prompt_tokens is None else prompt_tokens.to(device).long()
    for s in range(steps):
        noise = StepNoise.draw(seed_t, torch.full((B,), first_counter + s, device=device), C, cfg.latent_dim)
        logits = model.lm(frames)
        logits = torch.stack([l[:, -1] for l in logits], dim=1) if duplex else logits[:, -1:]
        tokens = sample_tokens(logits, noise.token, rp)  # (B, C)
        toks = torch.cat([toks, tokens[:, None]], dim=1)
        codes = model.quantizer.indices_to_codes(toks)  # (B, t, C, qdim)
        plex = tuple(codes[:, :, c] for c in range(C)) if duplex else codes[:, :, 0]
        mixtures = model.resynth(frames, plex)
        mixtures = mixtures if duplex else (mixtures,)
        locs, scales, mix_logits = (torch.stack([m[i][:, -1] for m in mixtures], dim=1) for i in range(3))
        nxt = sample_latents(locs, scales, mix_logits, noise.mixture, noise.gaussian, rp).to(frames.dtype)
        frames = torch.cat([frames, nxt.view(B, 1, -1)], dim=1)
    return frames
