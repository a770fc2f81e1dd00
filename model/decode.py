"""Decoding state and one generation step, shared by the completion `Generator` and the live
`LiveEngine`; prefill of a prompt and context slides.

One step turns the latent frame at position p (both channels for duplex) into the frame at p+1:
the LM gives each channel's FSQ token, the resynthesizer (given those tokens' codes, injected at
its middle layer) gives a Gaussian mixture per channel, and a latent is drawn from it. This is
the original's cached `next_latent` (default temperatures `(0.8, (0.5, 0.1))`). The step calls
the modules' own forwards (`LatentLM.forward`, `Resynthesizer.forward`) with the state's caches,
the rows' positions and an attention window.

State is explicit and preallocated (`DecodeState`: KV caches, per-row positions, latent and token
histories, seeds, counters, sampling parameters), so a step has static shapes for a given window
and can be captured as a CUDA graph (`model.cuda_graphs`). Randomness is counter-based
(`model.sampling.StepNoise`): a row's draws depend on its seed and step count only, so a row gives
the same output alone or batched with others, and the cached step equals an uncached generation
(full forwards every step) draw for draw.

Positions: slot t of the caches holds frame t. After prefill of a prompt of T frames, slots
0..T-2 are filled and frame T-1 is the pending input of the first step. The resynthesizer slot t
was computed with the code of frame t+1 injected: for prompt frames the quantizer's code of the
actual next frame (as the original's prefill), for generated frames the sampled token. Those
tokens are kept (`DecodeState.toks`), so a context slide recomputes exactly the same caches.

Context: when a row's position reaches `max_len`, its last `keep` frames (and their tokens) are
prefilled again at slots 0..keep-1 and generation continues ("slide"; the row's RoPE positions
restart, as for any prompt). Generations can therefore run indefinitely; each slide costs one
prefill of `keep` frames for that row.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .cuda_graphs import StepGraphs, attention_windows, use_graphs
from .resynth import ResynthCache
from .sampling import RowParams, SamplingParams, StepNoise, sample_latents, sample_tokens
from .transformer import KVCache, kv_dtype_of, row_index, run_block


@dataclass
class DecodeState:
    """Everything a generation step reads and writes, preallocated for `batch_size` rows.

    lm, rs: KV caches; pos (B,): slot of each row's pending input frame; hist (B, L, C*Z): the
    frames at slots 0..pos-1; toks (B, L, C): the token injected into the resynthesizer at each
    slot (the code of the following frame); seed, counter (B,): each row's random stream and step
    count; params: per-row sampling parameters; active (B,): rows that advance in a step (the
    others are left exactly as they are, apart from a scratch write to their KV slot `pos`, which
    is masked and rewritten before it is ever read); rows (B,): 0..B-1. host_pos mirrors pos on
    the host, so the engines choose attention windows and slides without reading the device.
    """
    lm: KVCache
    rs: ResynthCache
    pos: Tensor
    hist: Tensor
    toks: Tensor
    seed: Tensor
    counter: Tensor
    params: RowParams
    active: Tensor
    rows: Tensor
    host_pos: np.ndarray = field(repr=False)

    @staticmethod
    def make(model, batch_size: int, max_len: Optional[int] = None,
             kv_dtype: Union[str, torch.dtype, None] = None) -> "DecodeState":
        """A zeroed state for `batch_size` rows of `max_len` frames (default: the model's seq_len),
        on the device and in the dtype of the model's weights, the KV caches in `kv_dtype` (None or
        "auto": the weights' dtype; "fp8": float8 e4m3, `model.transformer`); every row active."""
        cfg = model.config
        p = model.lm.input.weight
        device, dtype = p.device, p.dtype
        kv = kv_dtype_of(kv_dtype)
        max_len = max_len or cfg.seq_len
        C, Z = cfg.channels, cfg.latent_dim

        def z(*shape, dt=torch.int64):
            return torch.zeros(shape, device=device, dtype=dt)
        return DecodeState(
            lm=model.lm.make_cache(batch_size, max_len, dtype=kv), rs=model.resynth.make_cache(batch_size, max_len, dtype=kv),
            pos=z(batch_size), hist=z(batch_size, max_len, C * Z, dt=dtype), toks=z(batch_size, max_len, C),
            seed=z(batch_size), counter=z(batch_size), params=RowParams.make(batch_size, device),
            active=torch.ones(batch_size, device=device, dtype=torch.bool),
            rows=row_index(batch_size, device), host_pos=np.zeros(batch_size, dtype=np.int64))

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def max_len(self) -> int:
        return self.hist.shape[1]

    @property
    def kv_bytes(self) -> int:
        """Bytes of the LM and resynthesizer KV caches (the bulk of a state)."""
        return self.lm.nbytes + self.rs.nbytes

    def row(self, r: int) -> "DecodeState":
        """A one-row state whose tensors are views of row `r` (writes land here), always active."""
        one = slice(r, r + 1)
        return DecodeState(
            lm=self.lm.select(one), rs=self.rs.row(r),
            pos=self.pos[one], hist=self.hist[one], toks=self.toks[one], seed=self.seed[one],
            counter=self.counter[one], params=RowParams(*(getattr(self.params, f)[one] for f in RowParams.FIELDS)),
            active=torch.ones(1, device=self.pos.device, dtype=torch.bool), rows=self.rows[:1],
            host_pos=self.host_pos[one])

    def reset(self, r: int, seed: int, params: SamplingParams = SamplingParams()) -> None:
        """Start row `r` afresh: position 0, step counter 0, a new seed and parameters, and its KV
        caches, frames and tokens zeroed, so that what the row computes does not depend on what it
        held before, even non-finite values (slots beyond a row's position are masked, but a masked
        NaN still poisons attention: 0 * NaN). Device writes only, no host sync."""
        self.params.set(r, params)  # checked there before anything is written
        rs = self.rs.row(r)
        for cache in (self.lm.select(slice(r, r + 1)), rs.lower, rs.upper):
            cache.k.zero_()
            cache.v.zero_()
        self.hist[r].zero_()
        self.toks[r].zero_()
        self.pos[r] = 0
        self.counter[r] = 0
        self.seed[r] = int(seed)
        self.host_pos[r] = 0


# --- the functions a step is made of -------------------------------------------------------------

def codec_encode(codec, audio: Tensor, state) -> tuple[Tensor, Tensor]:
    """A streaming codec's encode (`StreamCodec`, or any object with its interface):
    (B, N) -> mu, logvar (B, N/2000, Z)."""
    return codec.encode(audio, state)


def codec_decode(codec, latents: Tensor, state) -> Tensor:
    """A streaming codec's decode: (B, T, Z) -> (B, 2000 T)."""
    return codec.decode(latents, state)


COMPILABLE = ("block", "codec")


@dataclass(frozen=True)
class Kernels:
    """The functions a step is made of: eager, or compiled with torch.compile (`Kernels.make`).
    `block` runs one transformer block (`run_block`'s signature), passed to the module forwards."""
    block: Callable = run_block
    encode: Callable = codec_encode
    decode: Callable = codec_decode

    @staticmethod
    def make(compile: Union[bool, Sequence[str]] = False) -> "Kernels":
        """compile: False, True (all of COMPILABLE), or some of "block" (the transformer block:
        norms, rotary, cache write and residuals fused around the matrix products; quantized
        layers stay calls of their own kernels, `model.quant_kernels`) and "codec" (the streaming
        encoder and decoder)."""
        if isinstance(compile, str):  # one part by its name (its letters were taken for parts)
            compile = (compile,)
        parts = set(COMPILABLE if compile is True else (compile or ()))
        if parts - set(COMPILABLE):
            raise ValueError(f"unknown parts to compile {sorted(parts - set(COMPILABLE))}; choose from {COMPILABLE}")
        k = Kernels()
        if not parts:
            return k  # eager: torch._dynamo is not imported (~2 s of CPU at the start of complete.py, the server)
        c = partial(torch.compile, dynamic=True)
        # The block is compiled again for each attention window (the rotary tables' size), model
        # (LM, resynthesizer; float or quantized) and batch: more than Dynamo's default 8 entries
        # in a process that runs several (a benchmark, a server with several engines).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if "block" in parts:
            k = replace(k, block=c(run_block))
        if "codec" in parts:
            k = replace(k, encode=c(codec_encode), decode=c(codec_decode))
        return k


EAGER = Kernels()


class Engine:
    """What the engines (`Generator`, `LiveEngine`) are built on: the `DecodeState` of their
    `batch_size` rows (`max_len` latents of context, default the model's; KV caches of
    `kv_dtype`), the `keep` latents a row keeps when it slides (default 3/4 of the context), the
    step's `Kernels` (`compile`: as `Kernels.make`, or "auto": the transformer block on CUDA) and
    its `StepGraphs` (one CUDA graph per attention window; `cuda_graphs` default: on CUDA).
    `batch_name`: what the engine calls `batch_size`, for its error."""

    def __init__(self, model, batch_size: int, max_len: Optional[int], keep: Optional[int],
                 kv_dtype: Union[str, torch.dtype, None], compile: Union[bool, str, Sequence[str]],
                 cuda_graphs: Optional[bool], batch_name: str = "batch_size"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"{batch_name} must be an integer >= 1, got {batch_size!r}")
        seq_len = model.config.seq_len  # (0 was taken for the default, 2.5 and -1 were torch errors at the first step)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer))
                                    or not 2 <= max_len <= seq_len):
            raise ValueError(f"max_len must be None (the model's context, {seq_len} latents) or an integer in "
                             f"[2, {seq_len}], got {max_len!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, np.integer))):
            raise ValueError(f"keep must be None (3/4 of the context) or an integer, got {keep!r}")
        self.model = model
        self.state = DecodeState.make(model, batch_size, max_len, kv_dtype)
        L, device = self.state.max_len, self.state.pos.device
        self.keep = max(1, 3 * L // 4) if keep is None else int(keep)
        if not 0 < self.keep < L:
            raise ValueError(f"keep must be in [1, {L - 1}], got {self.keep}")
        if compile == "auto":  # about 15 s at start for 15% faster steps
            compile = ("block",) if device.type == "cuda" else False
        self.kernels = Kernels.make(compile)
        self.graphs = StepGraphs(attention_windows(L), self.state.active, use_graphs(cuda_graphs, device))


def draw_noise(model, state: DecodeState) -> StepNoise:
    """The random draws of every row's next step (from its seed and counter)."""
    return StepNoise.draw(state.seed, state.counter, model.config.channels, model.config.latent_dim)


def step_logits(model, x: Tensor, pos: Tensor, state: DecodeState, window: int, block: Callable = run_block) -> Tensor:
    """x (B, 1, C*Z) at slots pos (B, 1) -> logits (B, C, V) over each channel's next token,
    written into the LM cache (`LatentLM.forward` over the first `window` slots)."""
    out = model.lm(x, state.lm, pos, window, block=block)
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out


def step_mixture(model, x: Tensor, tokens: Tensor, pos: Tensor, state: DecodeState, window: int,
                 block: Callable = run_block) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, 1, C*Z) at slots pos (B, 1), with the next frame's tokens (B, C) -> the mixture over
    the next frame: locs, scales (B, C, K, Z), logits (B, C, K) (`Resynthesizer.forward` with
    the tokens' codes injected, over the first `window` slots)."""
    codes = model.quantizer.indices_to_codes(tokens).to(x.dtype)  # (B, C, qdim)
    if model.config.duplex:
        mixtures = model.resynth(x, (codes[:, 0:1], codes[:, 1:2]), state.rs, pos, window, block=block)
        return tuple(torch.cat(parts, dim=1) for parts in zip(*mixtures))
    return model.resynth(x, codes, state.rs, pos, window, block=block)


def decode_step(model, state: DecodeState, x: Tensor, window: int, noise: Optional[StepNoise] = None,
                kernels: Kernels = EAGER, top_p: bool = True) -> tuple[Tensor, Tensor]:
    """One generation step for every row: the input frames x (B, 1, C*Z) at `state.pos` ->
    (next frames (B, C*Z) in the model dtype, tokens (B, C)). Active rows record x and the tokens
    in their histories and advance pos and counter. Attention covers slots < `window`, which must
    exceed every active row's position; `top_p=False` when no active row uses top-p (it skips a
    sort of the vocabulary). No host synchronisation: CUDA-graph safe."""
    noise = noise if noise is not None else draw_noise(model, state)
    B = x.shape[0]
    pos = state.pos.clamp(max=window - 1)  # inactive rows may sit anywhere; keep their scratch writes in range
    logits = step_logits(model, x, pos[:, None], state, window, kernels.block)
    tokens = sample_tokens(logits, noise.token, state.params, top_p)
    mixture = step_mixture(model, x, tokens, pos[:, None], state, window, kernels.block)
    nxt = sample_latents(*mixture, noise.mixture, noise.gaussian, state.params).to(x.dtype).view(B, -1)
    a = state.active
    slot = (state.rows, pos)
    state.hist[slot] = torch.where(a[:, None], x[:, 0], state.hist[slot])
    state.toks[slot] = torch.where(a[:, None], tokens, state.toks[slot])
    state.pos.add_(a)
    state.counter.add_(a)
    return nxt, tokens


# --- prefill and slides --------------------------------------------------------------------------

def frame_tokens(model, frames: Tensor) -> Tensor:
    """(..., T, C*Z) frames -> (..., T, C) int64 FSQ indices, channel by channel."""
    C = model.config.channels
    return torch.stack([model.quantizer(x)[1] for x in frames.chunk(C, dim=-1)], dim=-1).long()


@torch.no_grad()
def prefill(model, state: DecodeState, frames: Tensor, tokens: Tensor) -> None:
    """Write frames (T, C*Z) into slots 0..T-1 of a one-row state (`DecodeState.row`): the LM and
    resynthesizer caches (slot t injects tokens[t], the code of the frame after it) and the
    histories; the row's position becomes T."""
    assert state.batch_size == 1, "prefill takes a one-row view: state.row(r)"
    T = frames.shape[0]
    if T > state.max_len:
        raise ValueError(f"{T} frames do not fit in a context of {state.max_len}")
    if T > 0:
        x = frames[None].to(state.hist.dtype)
        ip = torch.arange(T, device=x.device)[None]
        model.lm.hidden(x, state.lm, ip)
        codes = model.quantizer.indices_to_codes(tokens[None].to(x.device))  # (1, T, C, qdim)
        plex = tuple(codes[:, :, c] for c in range(codes.shape[2])) if model.config.duplex else codes[:, :, 0]
        model.resynth(x, plex, state.rs, ip)
        state.hist[0, :T] = x[0]
        state.toks[0, :T] = tokens.to(x.device)
    state.pos.fill_(T)
    state.host_pos[:] = T


def prompt_prefill(model, state: DecodeState, frames: Tensor) -> Tensor:
    """Prefill a one-row state with a prompt of frames (T >= 1, C*Z) but its last frame, which is
    returned (1, 1, C*Z): the pending input of the first step."""
    if frames.shape[0] < 1:
        raise ValueError("a prompt needs at least one latent frame")
    prefill(model, state, frames[:-1], frame_tokens(model, frames[1:]))
    return frames[-1:][None]


def slide(model, state: DecodeState, keep: int) -> None:
    """Re-prefill a one-row state with its last `keep` frames and tokens at slots 0..keep-1."""
    p = int(state.host_pos[0])
    keep = min(keep, p)
    frames, tokens = state.hist[0, p - keep:p].clone(), state.toks[0, p - keep:p].clone()
    prefill(model, state, frames, tokens)
