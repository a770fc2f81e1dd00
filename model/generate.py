"""Generation: completions from a prompt, and the live duplex engine of the server.

One step turns the latent frame at position p (both channels for duplex) into the frame at p+1:
the LM gives each channel's FSQ token, the resynthesizer (given those tokens' codes, injected at
its middle layer) gives a Gaussian mixture per channel, and a latent is drawn from it. This is
the original's cached `next_latent` (default temperatures `(0.8, (0.5, 0.1))`).

    gen = Generator(model, batch_size=1)                       # completions
    audio = gen.complete(prompt_audio, steps=160, params=SamplingParams(), seed=0)

    live = LiveEngine(model, max_sessions=8)                   # server: one row per session
    live.reset(row, params, seed, prompt=prompt_audio)         # new session in a slot
    model_chunks = live.step(user_chunks)                      # (B, 2000) in -> (B, 2000) out

State is explicit and preallocated (`DecodeState`: KV caches, per-row positions, latent and token
histories, seeds, counters, sampling parameters; `StreamCodecState`: the live codec's streams),
so a step has static shapes: on CUDA it is captured once per attention window (the cache prefix
attention reads: 128, 256, ... slots) as a CUDA graph and replayed with no host synchronisation.
Randomness is counter-based (`model.sampling.StepNoise`): a row's draws depend on its seed and
step count only, so a session gives the same output alone or batched with others, and the
cached step equals `generate_uncached` draw for draw.

Positions: slot t of the caches holds frame t. After prefill of a prompt of T frames, slots
0..T-2 are filled and frame T-1 is the pending input of the first step. The resynthesizer slot t
was computed with the code of frame t+1 injected: for prompt frames the quantizer's code of the
actual next frame (as the original's prefill), for generated frames the sampled token. Those
tokens are kept (`DecodeState.toks`), so a context slide recomputes exactly the same caches.

Context: when a row's position reaches `max_len`, its last `keep` frames (and their tokens) are
prefilled again at slots 0..keep-1 and generation continues ("slide"; the row's RoPE positions
restart, as for any prompt). Completions and live sessions can therefore run indefinitely; each
slide costs one prefill of `keep` frames for that row.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .codec import Codec, CodecStream
from .resynth import ResynthCache
from .stream_codec import StreamCodec
from .sampling import (PROMPT_STREAM, RowParams, SamplingParams, StepNoise, counter_normal, sample_latents,
                       sample_tokens)
from .transformer import Block, KVCache, Positions, apply_rotary

ParamsLike = Union[SamplingParams, Sequence[SamplingParams]]


# --- seeds ---------------------------------------------------------------------------------------

def row_seed(seed: int, row: int = 0) -> int:
    """A 63-bit seed for batch row `row` of a generation seeded with `seed` (splitmix64), so rows
    of one call draw independent streams and a call's rows do not depend on the batch size."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(row) + 1) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (z ^ (z >> 31)) >> 1


# --- state ---------------------------------------------------------------------------------------

def _cache_view(cache: KVCache, rows: slice) -> KVCache:
    """The same cache memory restricted to some batch rows (writes land in `cache`)."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:, rows], cache.v[:, rows]
    return view


@dataclass
class DecodeState:
    """Everything a generation step reads and writes, preallocated for `batch_size` rows.

    lm, rs: KV caches; pos (B,): slot of each row's pending input frame; hist (B, L, C*Z): the
    frames at slots 0..pos-1; toks (B, L, C): the token injected into the resynthesizer at each
    slot (the code of the following frame); seed, counter (B,): each row's random stream and step
    count; params: per-row sampling parameters; active (B,): rows that advance in a step (the
    others are left exactly as they are, apart from a scratch write to their KV slot `pos`, which
    is masked and rewritten before it is ever read). host_pos mirrors pos on the host, so the
    engines choose attention windows and slides without reading the device.
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
    def make(model, batch_size: int, max_len: Optional[int] = None) -> "DecodeState":
        cfg = model.config
        p = model.lm.input.weight
        device, dtype = p.device, p.dtype
        max_len = max_len or cfg.seq_len
        C, Z = cfg.channels, cfg.latent_dim

        def z(*shape, dt=torch.int64):
            return torch.zeros(shape, device=device, dtype=dt)
        return DecodeState(
            lm=model.lm.make_cache(batch_size, max_len), rs=model.resynth.make_cache(batch_size, max_len),
            pos=z(batch_size), hist=z(batch_size, max_len, C * Z, dt=dtype), toks=z(batch_size, max_len, C),
            seed=z(batch_size), counter=z(batch_size), params=RowParams.make(batch_size, device),
            active=torch.ones(batch_size, device=device, dtype=torch.bool),
            rows=torch.arange(batch_size, device=device), host_pos=np.zeros(batch_size, dtype=np.int64))

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def max_len(self) -> int:
        return self.hist.shape[1]

    def row(self, r: int) -> "DecodeState":
        """A one-row state whose tensors are views of row `r` (writes land here), always active."""
        B, one = self.batch_size, slice(r, r + 1)
        return DecodeState(
            lm=_cache_view(self.lm, one),
            # The resynthesizer's upper half holds one stream per channel, stacked on the batch
            # axis (channel-major): row r's streams are r, r + B, ...
            rs=ResynthCache(_cache_view(self.rs.lower, one), _cache_view(self.rs.upper, slice(r, None, B))),
            pos=self.pos[one], hist=self.hist[one], toks=self.toks[one], seed=self.seed[one],
            counter=self.counter[one], params=RowParams(*(getattr(self.params, f)[one] for f in RowParams.FIELDS)),
            active=torch.ones(1, device=self.pos.device, dtype=torch.bool), rows=self.rows[:1],
            host_pos=self.host_pos[one])

    def reset(self, r: int, seed: int, params: SamplingParams = SamplingParams()) -> None:
        """Start row `r` afresh: position 0, step counter 0, a new seed and parameters."""
        self.pos[r] = 0
        self.counter[r] = 0
        self.seed[r] = int(seed)
        self.params.set(r, params)
        self.host_pos[r] = 0


# --- one step ------------------------------------------------------------------------------------

def block_step(blk: Block, x: Tensor, pos: Positions, kc: Tensor, vc: Tensor, rows: Tensor) -> Tensor:
    """`Block.forward` for one new position per row, writing the cache by indexing (an in-place
    `index_put_` that torch.compile keeps in place). x (B, 1, D); kc, vc (B, Hkv, W, hd): a
    layer's cache over the attention window; pos: the rows' positions with `cache_len=W`."""
    a = blk.attn.attn
    B, hd = x.shape[0], a.head_dim
    q, k, v = a.proj_qkv(blk.attn.attn_norm(x)).split([a.n_heads * hd, a.kv_heads * hd, a.kv_heads * hd], dim=-1)
    # q and k rotated together: one rotary pass instead of two (fewer kernels when not compiled).
    qk = torch.cat([a.norm_q(q).view(B, a.n_heads, 1, hd), a.norm_k(k).view(B, a.kv_heads, 1, hd)], dim=1)
    q, k = apply_rotary(qk, pos.cos, pos.sin).split([a.n_heads, a.kv_heads], dim=1)  # (B, H|Hkv, 1, hd)
    p = pos.input_pos[:, 0]
    kc[rows, :, p] = k[:, :, 0].to(kc.dtype)
    vc[rows, :, p] = v.view(B, a.kv_heads, hd).to(vc.dtype)
    y = F.scaled_dot_product_attention(q, kc.to(q.dtype), vc.to(q.dtype), attn_mask=pos.mask,
                                       enable_gqa=a.kv_heads != a.n_heads)
    x = x + a.attn_out(y.transpose(1, 2).reshape(B, 1, -1))
    return blk.ffnn(x)


def _step_positions(head_dim: int, theta: float, pos: Tensor, window: int, dtype) -> Positions:
    """Positions of one new frame per row, with the mask as an additive bias in `dtype` (made
    once per step instead of once per layer inside attention)."""
    P = Positions.make(head_dim, theta, pos[:, None], window)
    bias = torch.zeros(P.mask.shape, device=pos.device, dtype=dtype).masked_fill_(~P.mask, float("-inf"))
    return Positions(P.cos, P.sin, P.input_pos, bias)


def lm_logits(lm, x: Tensor, pos: Tensor, cache: KVCache, window: int, rows: Tensor, block=block_step) -> Tensor:
    """x (B, 1, C*Z) at positions pos (B,) -> logits (B, C, V) over each channel's next token."""
    h = lm.embed(x)
    P = _step_positions(lm.head_dim, lm.config.theta, pos, window, h.dtype)
    for i, blk in enumerate(lm.layers):
        h = block(blk, h, P, cache.k[i, :, :, :window], cache.v[i, :, :, :window], rows)
    out = lm.heads(h)
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out


def resynth_mixture(model, x: Tensor, tokens: Tensor, pos: Tensor, cache: ResynthCache, window: int, rows: Tensor,
                    block=block_step) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, 1, C*Z) at positions pos (B,), with the next frame's tokens (B, C) -> the mixture over
    the next frame: locs, scales (B, C, K, Z), logits (B, C, K). `Resynthesizer.forward` for one
    position, with `next_tokens` injected."""
    rs = model.resynth
    B, C = x.shape[0], rs.channels
    if rs.duplex:
        x1, x2 = x.chunk(2, dim=-1)
        h = rs.io.input_projection(x1) + rs.io2.input_projection(x2)
    else:
        h = rs.io.input_projection(x)
    P = _step_positions(rs.head_dim, rs.config.theta, pos, window, h.dtype)
    layers = rs.stack.layers
    for i in range(rs.plex_layer):
        h = block(layers[i], h, P, cache.lower.k[i, :, :, :window], cache.lower.v[i, :, :, :window], rows)
    codes = model.quantizer.indices_to_codes(tokens).to(h.dtype)  # (B, C, qdim)
    if rs.duplex:
        # The two channels' upper streams, stacked on the batch axis as in `Resynthesizer.forward`.
        h = torch.cat([h + rs.plex_projection(codes[:, 0:1]), h + rs.plex_projection2(codes[:, 1:2])], dim=0)
        P, rows = P.repeat(2), torch.cat([rows, rows + B])
    else:
        h = h + rs.plex_projection(codes)
    for j, i in enumerate(range(rs.plex_layer, len(layers))):
        h = block(layers[i], h, P, cache.upper.k[j, :, :, :window], cache.upper.v[j, :, :, :window], rows)
    locs, scales, logits = rs.io.output(rs.out_norm(h))  # (C*B, 1, K, Z), (C*B, 1, K)
    K, Z = locs.shape[-2:]
    return (locs.view(C, B, K, Z).transpose(0, 1), scales.view(C, B, K, Z).transpose(0, 1),
            logits.view(C, B, K).transpose(0, 1))


def codec_encode(codec, audio: Tensor, state) -> tuple[Tensor, Tensor]:
    """A streaming codec's encode (StreamCodec or ConvStreamCodec): (B, N) -> mu, logvar."""
    return codec.encode(audio, state)


def codec_decode(codec, latents: Tensor, state) -> Tensor:
    """A streaming codec's decode: (B, T, Z) -> (B, 2000 T)."""
    return codec.decode(latents, state)


COMPILABLE = ("block", "codec")


@dataclass(frozen=True)
class Kernels:
    """The functions a step is made of: eager, or compiled with torch.compile (`Kernels.make`)."""
    block: Callable = block_step
    encode: Callable = codec_encode
    decode: Callable = codec_decode

    @staticmethod
    def make(compile: Union[bool, Sequence[str]] = False) -> "Kernels":
        """compile: False, True (all of COMPILABLE), or some of "block" (the transformer block:
        norms, rotary, cache write and residuals fused around the matrix products) and "codec"
        (the streaming encoder and decoder)."""
        parts = set(COMPILABLE if compile is True else (compile or ()))
        if parts - set(COMPILABLE):
            raise ValueError(f"unknown parts to compile {sorted(parts - set(COMPILABLE))}; choose from {COMPILABLE}")
        c = partial(torch.compile, dynamic=True)
        k = Kernels()
        if "block" in parts:
            k = replace(k, block=c(block_step))
        if "codec" in parts:
            k = replace(k, encode=c(codec_encode), decode=c(codec_decode))
        return k


EAGER = Kernels()


def draw_noise(model, state: DecodeState) -> StepNoise:
    return StepNoise.draw(state.seed, state.counter, model.config.channels, model.config.latent_dim)


def decode_step(model, state: DecodeState, x: Tensor, window: int, noise: Optional[StepNoise] = None,
                kernels: Kernels = EAGER, top_p: bool = True) -> tuple[Tensor, Tensor]:
    """One generation step for every row: the input frames x (B, 1, C*Z) at `state.pos` ->
    (next frames (B, C*Z) in the model dtype, tokens (B, C)). Active rows record x and the tokens
    in their histories and advance pos and counter. Attention covers slots < `window`, which must
    exceed every active row's position; `top_p=False` when no active row uses top-p (it skips a
    sort of the vocabulary). No host synchronisation: CUDA-graph safe."""
    noise = noise if noise is not None else draw_noise(model, state)
    B, blk = x.shape[0], kernels.block
    pos = state.pos.clamp(max=window - 1)  # inactive rows may sit anywhere; keep their scratch writes in range
    logits = lm_logits(model.lm, x, pos, state.lm, window, state.rows, blk)
    tokens = sample_tokens(logits, noise.token, state.params, top_p)
    mixture = resynth_mixture(model, x, tokens, pos, state.rs, window, state.rows, blk)
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


# --- CUDA graphs ---------------------------------------------------------------------------------

def attention_windows(max_len: int, smallest: int = 128) -> list[int]:
    """Cache lengths a step may attend over: powers of two from `smallest`, and max_len."""
    windows, w = [], smallest
    while w < max_len:
        windows.append(w)
        w *= 2
    return windows + [max_len]


class StepKey(NamedTuple):
    """What a step's graph is specialised for: the attention window, and whether top-p is on."""
    window: int
    top_p: bool


class StepGraphs:
    """Runs a step `fn(key)` (which reads and writes only preallocated tensors) eagerly, or, when
    `enabled`, as one CUDA graph per StepKey, captured on first use (or by `capture`).

    Capture warms up by running `fn` twice with every row of `active` cleared, so that no state
    advances; the caller's mask is restored afterwards. The step function is passed at each
    call rather than stored, so an engine and its graphs form no reference cycle and free their
    memory as soon as the engine is dropped.
    """

    def __init__(self, windows: Sequence[int], active: Tensor, enabled: bool):
        self.windows, self.active, self.enabled = list(windows), active, enabled
        self.graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if enabled else None

    def key(self, length: int, top_p: bool) -> StepKey:
        """The key of a step over `length` slots: the smallest window holding them."""
        for w in self.windows:
            if w >= length:
                return StepKey(w, bool(top_p))
        raise ValueError(f"{length} slots exceed the context of {self.windows[-1]}")

    def all_keys(self) -> list[StepKey]:
        return [StepKey(w, t) for w in self.windows for t in (False, True)]

    def dry_run(self, fn: Callable[[StepKey], None], key: StepKey, times: int = 2) -> None:
        """Run `fn` with every row cleared from `active` (nothing advances), then restore it."""
        saved = self.active.clone()
        self.active.zero_()
        try:
            for _ in range(times):
                fn(key)
        finally:
            self.active.copy_(saved)

    def capture(self, fn: Callable[[StepKey], None], keys: Optional[Sequence[StepKey]] = None) -> None:
        if not self.enabled:
            return
        for key in keys or self.all_keys():
            if key in self.graphs:
                continue
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.dry_run(fn, key)  # warm-up: compilation, autotuning, cuBLAS plans
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn(key)  # recorded, not run
            self.graphs[key] = graph

    def run(self, fn: Callable[[StepKey], None], key: StepKey) -> None:
        if not self.enabled:
            fn(key)
            return
        if key not in self.graphs:
            self.capture(fn, [key])
        self.graphs[key].replay()


def _use_graphs(flag: Optional[bool], device: torch.device) -> bool:
    if flag and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    return device.type == "cuda" if flag is None else flag


# --- codec ---------------------------------------------------------------------------------------

def inference_codec(codec: Codec) -> Codec:
    """A copy of the codec with its weight norm folded into plain weights (the same function,
    fewer kernels per step). The given codec is left as it is (a deep copy of a parametrized
    module cannot be unparametrized safely: the copies share their generated classes)."""
    from .loading import build

    p = next(codec.parameters())
    folded = build(Codec, dataclasses.replace(codec.config, weight_norm=False), p.device, p.dtype, init=False)
    state = {k: v for k, v in codec.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        for name, m in codec.named_modules():
            if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                state[f"{name}.weight"] = m.weight.detach().clone()
    folded.load_state_dict(state, strict=True)
    return folded.eval().requires_grad_(False)


class GatedStream(CodecStream):
    """A CodecStream whose rows advance only where `active` (B, 1, 1) is set: the streaming
    state of inactive rows is left untouched (`CodecStream.push`, with a row mask)."""

    def __init__(self, stack, batch_size: int, device, dtype, active: Optional[Tensor] = None):
        super().__init__(stack, batch_size, device, dtype)
        self.active = active if active is not None else torch.ones(batch_size, 1, 1, dtype=torch.bool, device=device)

    def push(self, module, x: Tensor) -> Tensor:
        buf = self.buffers[id(module)]
        if id(module) in self.fresh:
            fresh = self.fresh[id(module)]
            buf.copy_(torch.where(fresh & self.active, x[..., :1].expand_as(buf), buf))
            fresh.logical_and_(~self.active)
        full = torch.cat([buf, x], dim=-1)
        torch.where(self.active, full[..., full.shape[-1] - buf.shape[-1]:], buf, out=buf)
        return full

    def row(self, r: int) -> "GatedStream":
        """Row `r` alone (views: writes land here), always active."""
        view = copy.copy(self)
        view.batch_size = 1
        view.buffers = {k: b[r:r + 1] for k, b in self.buffers.items()}
        view.fresh = {k: f[r:r + 1] for k, f in self.fresh.items()}
        view.active = torch.ones(1, 1, 1, dtype=torch.bool, device=self.active.device)
        return view


class ConvStreamCodec:
    """The streaming interface of `StreamCodec` over the module codec itself (cuDNN convolutions,
    `CodecStream` state with row gating): the reference for StreamCodec, and its alternative."""

    def __init__(self, codec: Codec):
        self.codec = inference_codec(codec)
        self.hop_length = codec.hop_length
        p = next(self.codec.parameters())
        self.device, self.dtype = p.device, p.dtype

    def init_state(self, batch_size: int, active: Optional[Tensor] = None) -> tuple[GatedStream, GatedStream]:
        return tuple(GatedStream(half, batch_size, self.device, self.dtype, active)
                     for half in (self.codec.encoder, self.codec.decoder))

    def encode(self, audio: Tensor, state: GatedStream) -> tuple[Tensor, Tensor]:
        return self.codec.encode(audio[:, None].to(self.dtype), state)

    def decode(self, latents: Tensor, state: GatedStream) -> Tensor:
        return self.codec.decode(latents.to(self.dtype), state)[:, 0]


def encode_frames(codec: Codec, audio: Tensor, mode: str = "sample", seed: Optional[Tensor] = None,
                  stream: Optional[CodecStream] = None) -> Tensor:
    """(B, C, N) audio (N a multiple of 2000) -> (B, N/2000, C*Z) frames, channel by channel.
    mode "sample": a draw from the codec posterior, as the original tokenizer (noise from the
    rows' `seed` (B,), counter-based); "mean": its mean. `stream` (encoders of B*C streams, for a
    batch of one channel) continues a streaming encoder."""
    B, C, N = audio.shape
    mu, logvar = codec.encode(audio.reshape(B * C, 1, N).to(next(codec.parameters()).dtype), stream)  # (B*C, T, Z)
    T, Z = mu.shape[1:]
    if mode == "sample":
        seed = seed if seed is not None else torch.zeros(B, dtype=torch.int64, device=mu.device)
        eps = counter_normal(seed, torch.zeros_like(seed), PROMPT_STREAM, C * T * Z).view(B * C, T, Z)
        mu = mu + eps.to(mu.dtype) * torch.exp(0.5 * logvar)
    elif mode != "mean":
        raise ValueError(f"encode mode must be 'sample' or 'mean', got {mode!r}")
    return mu.view(B, C, T, Z).transpose(1, 2).reshape(B, T, C * Z)


def decode_frames(codec: Codec, frames: Tensor, channels: int, chunk: int = 64) -> Tensor:
    """(B, T, C*Z) frames -> (B, C, 2000 T) float32 audio, decoded `chunk` latents at a time
    through a streaming decoder (the same output as one pass, with bounded memory)."""
    B, T, _ = frames.shape
    z = frames.view(B, T, channels, -1).transpose(1, 2).reshape(B * channels, T, -1)
    z = z.to(next(codec.parameters()).dtype)
    _, stream = codec.init_stream(B * channels)
    audio = torch.cat([codec.decode_step(z[:, i:i + chunk], stream) for i in range(0, T, chunk)], dim=-1)
    return audio.view(B, channels, -1).float()


# --- completions ---------------------------------------------------------------------------------

def _as_params(params: ParamsLike, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameter sets for {n} rows")
    return params


class Generator:
    """Completions of B prompts at once (mono or duplex), reusable across calls.

    On CUDA, a step (LM -> token -> resynthesizer -> latent, for all rows) is a CUDA graph per
    attention window, captured on first use; `compile=True` also compiles the transformer block
    with torch.compile (slower start, faster steps).
    """

    def __init__(self, model, batch_size: int = 1, max_len: Optional[int] = None, keep: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, compile: Union[bool, Sequence[str]] = False):
        self.model = model
        self.state = DecodeState.make(model, batch_size, max_len)
        L = self.state.max_len
        self.keep = keep or max(1, 3 * L // 4)
        if not 0 < self.keep < L:
            raise ValueError(f"keep must be in [1, {L - 1}], got {self.keep}")
        self.codec = model.codec
        self.x = torch.zeros(batch_size, 1, model.config.channels * model.config.latent_dim,
                             device=self.state.pos.device, dtype=self.state.hist.dtype)
        self.kernels = Kernels.make(compile)
        self.graphs = StepGraphs(attention_windows(L), self.state.active,
                                 _use_graphs(cuda_graphs, self.state.pos.device))

    def _step(self, key: StepKey) -> None:
        nxt, _ = decode_step(self.model, self.state, self.x, key.window, kernels=self.kernels, top_p=key.top_p)
        self.x.copy_(torch.where(self.state.active[:, None, None], nxt[:, None], self.x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                 seed: Union[int, Sequence[int]] = 0, progress: bool = False) -> Tensor:
        """prompt (B, T, C*Z) latent frames (T >= 1) -> (B, T + steps, C*Z): the prompt, then
        `steps` generated frames. `seed`: one int (row r draws with `row_seed(seed, r)`) or one
        seed per row. Beyond the context the rows slide (see the module docstring)."""
        st, B = self.state, self.state.batch_size
        if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != self.x.shape[2]:
            raise ValueError(f"prompt must be ({B}, T, {self.x.shape[2]}), got {tuple(prompt.shape)}")
        T = prompt.shape[1]
        if not 1 <= T <= st.max_len:
            raise ValueError(f"a prompt of {T} latents does not fit the context of {st.max_len}: trim it")
        seeds = [row_seed(seed, r) for r in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        prompt = prompt.to(device=self.x.device, dtype=self.x.dtype)
        params = _as_params(params, B)
        top_p = any(p.top_p < 1 for p in params)
        for r, p in enumerate(params):
            st.reset(r, seeds[r], p)
            self.x[r] = prompt_prefill(self.model, st.row(r), prompt[r])[0]
        st.active.fill_(True)
        out = torch.empty(B, T + steps, self.x.shape[2], device=self.x.device, dtype=self.x.dtype)
        out[:, :T] = prompt
        bar = _progress(steps, progress)
        for s in range(steps):
            if st.host_pos[0] >= st.max_len:
                for r in range(B):
                    slide(self.model, st.row(r), self.keep)
            self.graphs.run(self._step, self.graphs.key(int(st.host_pos[0]) + 1, top_p))
            st.host_pos += 1
            out[:, T + s] = self.x[:, 0]
            bar.update(1)
        bar.close()
        return out

    @torch.no_grad()
    def complete(self, audio: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                 seed: Union[int, Sequence[int]] = 0, encode: str = "sample", progress: bool = False) -> Tensor:
        """Prompt audio (B, C, N) at 16 kHz (C = 2 for duplex: [speaker 0, speaker 1]; N is cut
        to whole 2000-sample frames) -> (B, C, 2000 (N // 2000 + steps)) float32: the prompt as
        the codec reconstructs it, then the completion."""
        if self.codec is None:
            raise ValueError("this model has no codec: load it with codec=... or use generate() on latents")
        C, hop = self.model.config.channels, self.codec.hop_length
        if audio.dim() != 3 or audio.shape[1] != C:
            raise ValueError(f"prompt audio must be (B, {C}, N), got {tuple(audio.shape)}")
        B = audio.shape[0]
        seeds = [row_seed(seed, r) for r in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        audio = audio[..., :audio.shape[-1] // hop * hop].to(self.x.device)
        frames = encode_frames(self.codec, audio, encode, torch.tensor(seeds, device=self.x.device))
        latents = self.generate(frames, steps, params, seeds, progress)
        return decode_frames(self.codec, latents, C)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, unit="latent")
    return _NoBar()


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
    seeds = [row_seed(seed, r) for r in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
    device = prompt.device
    rp = RowParams.make(B, device)
    for r, p in enumerate(_as_params(params, B)):
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


# --- live duplex ---------------------------------------------------------------------------------

class LiveEngine:
    """Full-duplex conversation for `max_sessions` sessions at once, one batch row each.

    Channel 0 is the user, channel 1 the model (as the original server). Each `step` takes one
    2000-sample chunk (125 ms at 16 kHz) of user audio per row and returns one chunk of model
    audio per row: stream-encode the user chunk (a posterior draw, or its mean), pair it with the
    model's latent for that frame (predicted by the previous step), one LM + resynthesizer step
    for all rows, stream-decode the model's next latent. On CUDA the whole step is one CUDA graph
    per attention window.

    Rows are slots: `reset(row, ...)` starts a session there (optionally warm-started from a
    two-channel prompt), `release(row)` frees it. `step(..., active=mask)` advances only the
    masked occupied rows; the others are frozen (positions, codec streams, random streams and
    pending latents unchanged), e.g. while a client's audio has not arrived or a prompt is being
    replayed. A row reaching `max_len` slides (module docstring). Not thread-safe: call it from
    one thread (the server's GPU worker).

    Arguments: `max_sessions` rows; `max_len` context in latents (default: the model's, 2048) and
    `keep` latents kept by a slide (default 3/4 of it); `cuda_graphs` (default: on CUDA);
    `compile` ("auto": the transformer block with torch.compile on CUDA; False; or parts of
    COMPILABLE); `encode` "sample" (user latents drawn from the codec posterior, as the original
    tokenizer) or "mean"; `codec` "matmul" (StreamCodec, the fast one) or "conv" (the module codec).
    """

    chunk = 2000

    def __init__(self, model, max_sessions: int = 8, max_len: Optional[int] = None, keep: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, compile: Union[bool, str, Sequence[str]] = "auto",
                 encode: str = "sample", codec: str = "matmul"):
        cfg = model.config
        if not cfg.duplex:
            raise ValueError("the live engine needs a duplex (two-channel) model")
        if model.codec is None:
            raise ValueError("the live engine needs the model's codec")
        if encode not in ("sample", "mean"):
            raise ValueError(f"encode must be 'sample' or 'mean', got {encode!r}")
        self.model, self.encode = model, encode
        self.state = st = DecodeState.make(model, max_sessions, max_len)
        L = st.max_len
        self.keep = keep or max(1, 3 * L // 4)
        if not 0 < self.keep < L:
            raise ValueError(f"keep must be in [1, {L - 1}], got {self.keep}")
        if model.codec.hop_length != self.chunk:
            raise ValueError(f"the codec has {model.codec.hop_length} samples per latent, expected {self.chunk}")
        if codec not in ("matmul", "conv"):
            raise ValueError(f"codec must be 'matmul' (StreamCodec) or 'conv' (cuDNN), got {codec!r}")
        self.codec = StreamCodec(model.codec) if codec == "matmul" else ConvStreamCodec(model.codec)
        B, Z, device, dtype = max_sessions, cfg.latent_dim, st.pos.device, st.hist.dtype
        self.enc, self.dec = self.codec.init_state(B, active=st.active.view(B, 1, 1))
        self.user = torch.zeros(B, self.chunk, device=device, dtype=dtype)   # static input
        self.audio = torch.zeros(B, self.chunk, device=device, dtype=torch.float32)  # static output
        self.m = torch.zeros(B, 1, Z, device=device, dtype=dtype)  # the model's latent of each row's pending frame
        with torch.no_grad():  # the model's first frame in a session without prompt: the latent of silence
            self.silence = model.codec.encode(torch.zeros(1, 1, self.chunk, device=device, dtype=dtype))[0][0]
        self.occupied = np.zeros(B, dtype=bool)
        self._top_p = np.zeros(B, dtype=bool)  # rows using top-p (host mirror: picks the graph)
        pinned = device.type == "cuda"
        self._user_host = torch.zeros(B, self.chunk, pin_memory=pinned)
        self._active_host = torch.zeros(B, dtype=torch.bool, pin_memory=pinned)
        self._audio_host = torch.zeros(B, self.chunk, pin_memory=pinned)
        if compile == "auto":  # the transformer block compiled on CUDA (about 15 s at start, 15% faster steps)
            compile = ("block",) if device.type == "cuda" else False
        self.kernels = Kernels.make(compile)
        self.graphs = StepGraphs(attention_windows(L), st.active, _use_graphs(cuda_graphs, device))
        st.active.zero_()

    @property
    def max_sessions(self) -> int:
        return self.state.batch_size

    @property
    def positions(self) -> np.ndarray:
        """Each row's position (frames in its context), host-side."""
        return self.state.host_pos.copy()

    def warmup(self) -> None:
        """Capture the CUDA graphs of every attention window now rather than on first use."""
        with torch.no_grad():
            self.graphs.capture(self._step)

    def _step(self, key: StepKey) -> None:
        model, st = self.model, self.state
        noise = draw_noise(model, st)
        mu, logvar = self.kernels.encode(self.codec, self.user, self.enc)  # (B, 1, Z)
        u = mu + noise.posterior[:, None].to(mu.dtype) * torch.exp(0.5 * logvar) if self.encode == "sample" else mu
        a = st.active[:, None, None]
        nxt, _ = decode_step(model, st, torch.cat([u, self.m], dim=-1), key.window, noise, self.kernels, key.top_p)
        m = nxt[:, None, self.m.shape[-1]:]
        self.m.copy_(torch.where(a, m, self.m))
        audio = self.kernels.decode(self.codec, m, self.dec).float()  # (B, 2000)
        self.audio.copy_(torch.where(a[:, 0], audio, 0))

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    @torch.no_grad()
    def reset(self, row: int, params: SamplingParams = SamplingParams(), seed: Optional[int] = None,
              prompt: Optional[Tensor] = None, prompt_latents: Optional[Tensor] = None) -> None:
        """Start a session in slot `row`: position 0, fresh codec streams, `params`, and `seed`
        (None: a fresh random one). Other rows are not disturbed.

        Warm start, from `prompt` (2, N) audio at 16 kHz, [user, model] channels, N cut to whole
        2000-sample chunks: the prompt is encoded (priming the row's encoder and decoder streams),
        prefilled, and the model's next frame predicted, so the next `step` continues the
        conversation after it. Or from `prompt_latents` (T, 2 Z), e.g. `encode_frames` of a
        prompt computed once for many sessions: the same, but the user encoder starts fresh.

        Every piece of the row's state is cleared (KV caches, histories, codec streams, pending
        latent, random stream, parameters), so a session's output does not depend on what the
        row held before, even non-finite values. The arguments are checked before the row is
        touched: a ValueError or IndexError leaves it as it was."""
        if not 0 <= row < self.max_sessions:
            raise IndexError(f"row {row} is not a slot of this engine (0..{self.max_sessions - 1})")
        params.validate()
        if prompt is not None and prompt_latents is not None:
            raise ValueError("give prompt audio or prompt latents, not both")
        st, hop, Z = self.state, self.chunk, self.m.shape[-1]
        if prompt is not None:
            if prompt.dim() != 2 or prompt.shape[0] != 2:
                raise ValueError(f"a live prompt is (2, N) audio [user, model], got {tuple(prompt.shape)}")
            prompt = prompt[:, :prompt.shape[1] // hop * hop].to(self.user.device, self.user.dtype)
            if prompt.shape[1] == 0:
                raise ValueError("a live prompt needs at least one 2000-sample chunk")
            if prompt.shape[1] // hop > st.max_len:
                raise ValueError(f"a prompt of {prompt.shape[1] // hop} frames does not fit the context "
                                 f"of {st.max_len}")
            if not bool(torch.isfinite(prompt).all()):
                raise ValueError("a live prompt must hold finite samples")
        if prompt_latents is not None:
            frames = prompt_latents.to(self.user.device, self.user.dtype)
            if frames.dim() != 2 or frames.shape[1] != 2 * Z or not 1 <= frames.shape[0] <= st.max_len:
                raise ValueError(f"prompt latents must be (T, {2 * Z}) with 1 <= T <= {st.max_len}, "
                                 f"got {tuple(frames.shape)}")
            if not bool(torch.isfinite(frames).all()):
                raise ValueError("prompt latents must be finite")
        seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else int(seed)
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        view = st.row(row)
        # Slots beyond a row's position are masked, but a masked NaN still poisons attention
        # (0 * NaN): clear everything the last session of this row may have written.
        for cache in (view.lm, view.rs.lower, view.rs.upper):
            cache.k.zero_()
            cache.v.zero_()
        view.hist.zero_()
        view.toks.zero_()
        st.reset(row, seed, params)
        self._top_p[row] = params.top_p < 1
        self.enc.reset(slice(row, row + 1))
        self.dec.reset(slice(row, row + 1))
        self.user[row] = 0
        self.audio[row] = 0
        self.occupied[row] = True
        if prompt is None and prompt_latents is None:
            self.m[row] = self.silence
            return
        if prompt is not None:
            frames = encode_frames(self.model.codec, prompt[None], self.encode, view.seed)[0]  # (T, 2 Z)
        x = prompt_prefill(self.model, view, frames)
        nxt, _ = decode_step(self.model, view, x, self.graphs.key(frames.shape[0], True).window)
        view.host_pos += 1
        self.m[row] = nxt[:, None, Z:][0]
        # Prime the row's codec streams: the encoder with the user channel, the decoder with the
        # model channel, so the next chunks continue the prompt's signals.
        if prompt is not None:
            self.codec.encode(prompt[:1], self.enc.row(row))
        self.codec.decode(frames[None, :, Z:], self.dec.row(row))

    def release(self, row: int) -> None:
        """Free slot `row`; it is not stepped until the next `reset`."""
        if not 0 <= row < self.max_sessions:
            raise IndexError(f"row {row} is not a slot of this engine (0..{self.max_sessions - 1})")
        self.occupied[row] = False
        self.state.host_pos[row] = 0
        self.state.pos[row] = 0

    def set_params(self, row: int, params: SamplingParams) -> None:
        """Change a session's sampling parameters (effective from the next step); ValueError
        (row unchanged) for values outside their ranges."""
        if not 0 <= row < self.max_sessions:
            raise IndexError(f"row {row} is not a slot of this engine (0..{self.max_sessions - 1})")
        self.state.params.set(row, params.validate())
        self._top_p[row] = params.top_p < 1

    @torch.no_grad()
    def step(self, user_chunks, active=None) -> Tensor:
        """user_chunks (B, 2000) float audio in [-1, 1] (a numpy array or tensor; rows of free or
        inactive slots are ignored) -> (B, 2000) float32 CPU tensor of model audio (zeros for
        rows not stepped). `active` (B,) bool: the occupied rows to advance (default: all).
        Blocks until the step's audio is on the host."""
        st, B = self.state, self.max_sessions
        chunks = torch.as_tensor(user_chunks, dtype=torch.float32)
        if chunks.shape != (B, self.chunk):
            raise ValueError(f"user_chunks must be ({B}, {self.chunk}), got {tuple(chunks.shape)}")
        run = self.occupied.copy() if active is None else (self.occupied & np.asarray(active, dtype=bool))
        # Slide every occupied row at the end of its context, paused ones too: the attention window
        # covers all occupied rows, and a slide is what a paused row's own next step would do first.
        for r in np.flatnonzero(self.occupied & (st.host_pos >= st.max_len)):
            slide(self.model, st.row(int(r)), self.keep)
        self._user_host.copy_(chunks)
        self._active_host.copy_(torch.from_numpy(run))
        self.user.copy_(self._user_host, non_blocking=True)
        st.active.copy_(self._active_host, non_blocking=True)
        occupied_pos = st.host_pos[self.occupied]
        key = self.graphs.key(int(occupied_pos.max(initial=0)) + 1, bool((self._top_p & run).any()))
        self.graphs.run(self._step, key)
        st.host_pos += run
        self._audio_host.copy_(self.audio, non_blocking=True)
        if self._audio_host.is_pinned():
            torch.cuda.current_stream().synchronize()
        return self._audio_host.clone()
