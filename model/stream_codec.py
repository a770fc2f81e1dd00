"""Codec streaming for generation: `StreamCodec`, the live engine's chunk-at-a-time codec, and
`encode_frames` / `decode_frames`, whole prompts to latent frames and frames back to audio.

`StreamCodec(codec)` computes exactly `Codec.encode_step` / `Codec.decode_step` (same weights,
weight norm folded once), in an inference layout: activations are channel-last (B, L, C), and
every causal convolution is one matrix product over its taps (the taps gathered by `unfold`),
instead of a cuDNN convolution. For the short sequences of a live step (one 2000-sample chunk,
one latent) that is several times fewer kernels and none of cuDNN's layout conversions.

The streaming state (`StreamCodecState`, the left context of each convolution) is preallocated
for a batch; each row advances only where `active` is set, so sessions sharing a batch can be
paused, reset (`reset(rows)`) and warm-started (`row(r)`) independently.
"""
from __future__ import annotations

import copy
import importlib.util
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from config import OneLine
from .codec import CausalConv1d, CausalConvTranspose1d, CausalResUnit, Codec, CodecStream, ResNetBlock, Snake, snake
from .sampling import PROMPT_STREAM, counter_normal

# Codec latents are about unit scale (the codec's KL term keeps them near N(0, 1)); a prompt of
# latents beyond this is a mis-scaled or garbage array, and from about 1e19 the model's float32
# (bf16: the same range) arithmetic overflows to NaN, which the completion then is, silently.
MAX_LATENT_MAGNITUDE = 1e4

# StreamCodec's default on CUDA: the convolutions' taps and states in Triton kernels
# (`model.stream_codec_kernels`); False: torch's operations (benchmarks/inference.py --torch-codec).
KERNELS = True


class PromptLatentsError(OneLine, ValueError):
    """Prompt audio the codec encodes to latents the model cannot take (`encode_frames`): the
    scripts say it as one error line, where any other ValueError of a generation is a bug."""


def _weight(m: nn.Module) -> Tensor:
    """A module's weight as used in its forward (weight norm applied), detached."""
    return m.weight.detach().clone()


def _bias(m: nn.Module) -> Optional[Tensor]:
    """A module's bias (or None), detached."""
    return m.bias.detach().clone() if m.bias is not None else None


class StreamCodecState:
    """Left context of every convolution of a StreamCodec, for `batch_size` streams.

    buffers[i]: (B, pad_i, C_i) channel-last; fresh[i]: (B, 1, 1) for transposed convolutions
    (their first frame is padded by replication); active: (B, 1, 1) rows that advance."""

    def __init__(self, shapes: list[tuple[int, int]], fresh: list[int], batch_size: int, device, dtype,
                 active: Optional[Tensor] = None):
        self.buffers = [torch.zeros(batch_size, p, c, device=device, dtype=dtype) for p, c in shapes]
        self.fresh = {i: torch.ones(batch_size, 1, 1, device=device, dtype=torch.bool) for i in fresh}
        self.active = active if active is not None else torch.ones(batch_size, 1, 1, device=device, dtype=torch.bool)

    @property
    def batch_size(self) -> int:
        return self.active.shape[0]

    def reset(self, rows: Union[None, slice, Tensor] = None) -> None:
        """Restart all streams, or only `rows` (a slice or an index tensor)."""
        rows = slice(None) if rows is None else rows
        for b in self.buffers:
            b[rows] = 0
        for f in self.fresh.values():
            f[rows] = True

    def row(self, r: int) -> "StreamCodecState":
        """Row `r` alone (views: writes land here), always active."""
        view = copy.copy(self)
        view.buffers = [b[r:r + 1] for b in self.buffers]
        view.fresh = {i: f[r:r + 1] for i, f in self.fresh.items()}
        view.active = torch.ones(1, 1, 1, device=self.active.device, dtype=torch.bool)
        return view


class _Conv:
    """Causal convolution (kernel k, dilation d, stride s) as (B*L', C_in*k) @ (C_in*k, C_out).
    `kernels`: its taps and state in `model.stream_codec_kernels`' two passes (CUDA), else torch's."""

    def __init__(self, m: CausalConv1d, slot: int, kernels: bool = False):
        conv = m.conv
        w = _weight(conv)  # (C_out, C_in, k)
        self.cout, self.cin, self.k = w.shape
        self.w = w.reshape(self.cout, self.cin * self.k).t().contiguous()  # rows ordered (c, j)
        self.b = _bias(conv)
        self.d, self.s, self.pad, self.slot = conv.dilation[0], conv.stride[0], m.pad_length, slot
        self.kernels = kernels

    def taps(self, x: Tensor, st: StreamCodecState, act=None) -> Tensor:
        """The (B*L', C_in*k) taps of [state; act(x)], the state moved on (torch's operations)."""
        buf = st.buffers[self.slot]
        full = torch.cat([buf, act(x) if act is not None else x], dim=1)  # (B, pad + L, C_in)
        torch.where(st.active, full[:, full.shape[1] - self.pad:], buf, out=buf)
        taps = full.unfold(1, (self.k - 1) * self.d + 1, self.s)[..., ::self.d]  # (B, L', C_in, k)
        return taps.reshape(-1, self.cin * self.k)

    def product(self, cols: Tensor) -> Tensor:
        return torch.addmm(self.b, cols, self.w) if self.b is not None else cols @ self.w

    def on_kernels(self) -> bool:
        """Whether this call runs the kernels: compiled (compile="codec"), Inductor fuses torch's."""
        return self.kernels and not torch.compiler.is_compiling()

    def fused(self, x: Tensor, st: StreamCodecState, act=(None, None), act2=(None, None)) -> Tensor:
        """The (B*L', C_out) product of the taps of [state; act(x)] (`x` contiguous), the state moved
        on, and `act2` applied to the product, through the kernels; `act`, `act2`: (kind, alpha) as
        `_activation` gives them."""
        from . import stream_codec_kernels as K  # Triton, imported where a CUDA codec uses it
        buf = st.buffers[self.slot]
        y = self.product(K.taps(x, buf, self.k, self.d, self.s, *act))
        K.advance(x, buf, st.active, *act, h=y if act2[0] else None, act2=act2[0], alpha2=act2[1])
        return y

    def __call__(self, x: Tensor, st: StreamCodecState) -> Tensor:
        B = x.shape[0]
        y = self.fused(x.contiguous(), st) if self.on_kernels() else self.product(self.taps(x, st))
        return y.view(B, -1, self.cout)


class _Deconv:
    """Causal transposed convolution (kernel 2s, stride s): output frame t (s samples) is
    W[..., :s]^T x[t] + W[..., s:]^T x[t-1], one matrix product over (x[t], x[t-1]) pairs."""

    def __init__(self, m: CausalConvTranspose1d, slot: int):
        w = _weight(m.deconv)  # (C_in, C_out, 2s)
        self.cin, self.cout, k = w.shape
        self.s = m.stride
        assert k == 2 * self.s and m.pad_length == 1, "only kernel = 2 * stride is supported"
        w = torch.cat([w[:, :, :self.s], w[:, :, self.s:]], dim=0)  # (2 C_in, C_out, s)
        self.w = w.permute(0, 2, 1).reshape(2 * self.cin, self.s * self.cout).contiguous()
        bias = m.deconv.bias
        self.b = bias.detach().repeat(self.s) if bias is not None else None
        self.slot = slot

    def __call__(self, x: Tensor, st: StreamCodecState) -> Tensor:
        B, L, _ = x.shape
        buf, fresh = st.buffers[self.slot], st.fresh[self.slot]
        buf.copy_(torch.where(fresh & st.active, x[:, :1], buf))
        fresh.logical_and_(~st.active)
        full = torch.cat([buf, x], dim=1)  # (B, 1 + L, C_in)
        torch.where(st.active, full[:, -1:], buf, out=buf)
        pairs = torch.cat([full[:, 1:], full[:, :-1]], dim=-1).reshape(B * L, 2 * self.cin)
        y = torch.addmm(self.b, pairs, self.w) if self.b is not None else pairs @ self.w
        return y.view(B, L * self.s, self.cout)


def _activation(m: nn.Module) -> tuple[str, Optional[Tensor]]:
    """The residual unit's activation `m` (`model.codec.make_activation`): ("elu", None) or
    ("snake", its frequencies (C,))."""
    if isinstance(m, Snake):
        return "snake", m.alpha.detach().clone()  # (C,): broadcast over the last dimension
    assert isinstance(m, nn.ELU), m
    return "elu", None


def _activate(x: Tensor, act: tuple[str, Optional[Tensor]]) -> Tensor:
    """`_activation`'s activation on channel-last (B, L, C), with torch's operations."""
    kind, alpha = act
    return snake(x, alpha) if kind == "snake" else F.elu(x)


class _ResUnit:
    """x + conv1x1(act2(dilated causal conv(act1(x)))). With `kernels`: the taps with act1, the
    product, the state moved on with act2 in one pass, and the 1x1 product adding x itself."""

    def __init__(self, m: CausalResUnit, slot: int, kernels: bool = False):
        self.conv1 = _Conv(m.conv1, slot, kernels)
        self.w2 = _weight(m.conv2)[..., 0].t().contiguous()  # (C, C)
        self.b2 = _bias(m.conv2)
        self.act1, self.act2 = _activation(m.activation), _activation(m.activation2)

    def __call__(self, x: Tensor, st: StreamCodecState) -> Tensor:
        conv = self.conv1
        if conv.on_kernels():
            x = x.contiguous()
            y = torch.addmm(x.view(-1, x.shape[-1]), conv.fused(x, st, self.act1, self.act2), self.w2)
            return (y + self.b2 if self.b2 is not None else y).view(x.shape)
        y = _activate(conv.product(conv.taps(x, st, lambda v: _activate(v, self.act1))), self.act2)
        y = torch.addmm(self.b2, y, self.w2) if self.b2 is not None else y @ self.w2
        return x + y.view(x.shape)


class _Pool:
    """Average pooling by `s` over time, channel-last."""

    def __init__(self, s: int):
        self.s = s

    def __call__(self, x: Tensor, st) -> Tensor:
        B, L, C = x.shape
        return x.view(B, L // self.s, self.s, C).mean(dim=2)


class _Upsample:
    """Nearest upsampling by `s` over time, channel-last."""

    def __init__(self, s: int):
        self.s = s

    def __call__(self, x: Tensor, st) -> Tensor:
        B, L, C = x.shape
        return x[:, :, None].expand(B, L, self.s, C).reshape(B, L * self.s, C)


class _Half:
    """The ops of one codec half (encoder or decoder) in order, and its state layout."""

    def __init__(self, stack, kernels: bool = False):
        self.ops, self.shapes, self.fresh = [], [], []
        self.kernels = kernels
        self.multiplier = None
        if getattr(stack, "multiplier_proj", None) is not None:
            m = stack.multiplier_proj
            self.multiplier = (_weight(m)[..., 0].contiguous(), _bias(m))
        for m in stack.res_stack:
            for sub in (m.res_block if isinstance(m, ResNetBlock) else [m]):
                self._add(sub)

    def _add(self, m: nn.Module) -> None:
        slot = len(self.shapes)
        if isinstance(m, CausalConv1d):
            self.ops.append(_Conv(m, slot, self.kernels))
            self.shapes.append((m.pad_length, m.in_channels))
        elif isinstance(m, CausalResUnit):
            self.ops.append(_ResUnit(m, slot, self.kernels))
            self.shapes.append((m.conv1.pad_length, m.conv1.in_channels))
        elif isinstance(m, CausalConvTranspose1d):
            self.ops.append(_Deconv(m, slot))
            self.shapes.append((1, m.in_channels))
            self.fresh.append(slot)
        elif isinstance(m, nn.AvgPool1d):
            k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
            self.ops.append(_Pool(k))
        elif isinstance(m, nn.Upsample):
            assert m.mode == "nearest"
            self.ops.append(_Upsample(int(m.scale_factor)))
        elif not isinstance(m, nn.Identity):
            raise TypeError(f"StreamCodec does not know {type(m).__name__}")

    def __call__(self, x: Tensor, st: StreamCodecState) -> Tensor:
        if self.multiplier is not None:
            w, b = self.multiplier
            x = F.linear(x, w, b)
        for op in self.ops:
            x = op(x, st)
        return x


class StreamCodec:
    """Streaming encode and decode of a Codec (its weights copied once, in matrix layout).

    encode(audio (B, 2000 k), state) -> mu, logvar (B, k, Z); decode(latents (B, k, Z), state)
    -> (B, 2000 k). Equal to `Codec.encode_step` / `decode_step` up to rounding.

    `kernels`: the convolutions' taps and states in Triton kernels (`model.stream_codec_kernels`:
    half the kernels of a step), by default (`KERNELS`) where the codec is on CUDA and Triton is
    installed; False: torch's operations
    only (the CPU's path, and the benchmarks' comparison); True on the CPU: in Triton's interpreter.
    """

    def __init__(self, codec: Codec, kernels: Optional[bool] = None):
        p = next(codec.parameters())
        self.device, self.dtype = p.device, p.dtype
        if kernels is None:
            kernels = KERNELS and p.is_cuda and importlib.util.find_spec("triton") is not None
        self.kernels = kernels
        with torch.no_grad():
            self.encoder = _Half(codec.encoder, self.kernels)
            self.decoder = _Half(codec.decoder, self.kernels)
            z = codec.compressor
            self.w_in, self.b_in = _weight(z.proj_in), _bias(z.proj_in)
            self.w_out, self.b_out = _weight(z.proj_out), _bias(z.proj_out)
        self.norm_stddev = codec.norm_stddev
        self.hop_length = codec.hop_length

    def init_state(self, batch_size: int, active: Optional[Tensor] = None) -> tuple[StreamCodecState, StreamCodecState]:
        """Preallocated (encoder, decoder) states; `active` (B, 1, 1) bool, shared if given."""
        return tuple(StreamCodecState(h.shapes, h.fresh, batch_size, self.device, self.dtype, active)
                     for h in (self.encoder, self.decoder))

    def encode(self, audio: Tensor, state: StreamCodecState) -> tuple[Tensor, Tensor]:
        """(B, 2000 k) audio -> mu, logvar (B, k, Z); advances the active rows' encoder streams."""
        x = (audio.to(self.dtype) / self.norm_stddev)[..., None]  # (B, N, 1)
        h = self.encoder(x, state)  # (B, N / 2000, C)
        return F.linear(h, self.w_in, self.b_in).chunk(2, dim=-1)

    def decode(self, latents: Tensor, state: StreamCodecState) -> Tensor:
        """(B, k, Z) latents -> (B, 2000 k) audio; advances the active rows' decoder streams."""
        h = F.linear(latents.to(self.dtype), self.w_out, self.b_out)  # (B, T, C)
        return self.decoder(h, state)[..., 0] * self.norm_stddev


def encode_frames(codec: Codec, audio: Tensor, mode: str = "sample", seed: Optional[Tensor] = None,
                  stream: Optional[CodecStream] = None) -> Tensor:
    """(B, C, N) audio (N a multiple of 2000) -> (B, N/2000, C*Z) frames, channel by channel.
    mode "sample": a draw from the codec posterior, as the original tokenizer (noise from the
    rows' `seed` (B,), counter-based); "mean": its mean. `stream` (encoders of B*C streams, for a
    batch of one channel) continues a streaming encoder. A ValueError when the codec makes latents
    the model cannot take of this (finite) audio: NaN, inf or beyond `MAX_LATENT_MAGNITUDE` (an
    untrained or diverged codec; loud audio through one overflows its posterior's exp(logvar / 2)),
    which would be a completion of NaN audio (`PromptLatentsError`). One reduction and one host
    sync per prompt."""
    if mode not in ("sample", "mean"):  # before the encoding
        raise ValueError(f"encode mode must be 'sample' or 'mean', got {mode!r}")
    B, C, N = audio.shape
    mu, logvar = codec.encode(audio.reshape(B * C, 1, N), stream)  # (B*C, T, Z); it casts to its weights' dtype
    T, Z = mu.shape[1:]
    if mode == "sample":
        seed = seed if seed is not None else torch.zeros(B, dtype=torch.int64, device=mu.device)
        eps = counter_normal(seed, torch.zeros_like(seed), PROMPT_STREAM, C * T * Z).view(B * C, T, Z)
        mu = Codec.sample(mu, logvar, eps=eps)
    peak = float(mu.abs().amax())
    if not peak <= MAX_LATENT_MAGNITUDE:  # NaN too
        made = "NaN or infinite latents" if not math.isfinite(peak) else f"latents peaking at {peak:.4g}"
        raise PromptLatentsError(f"the codec encodes this prompt audio to {made} (codec latents are about unit "
                                 f"scale, at most {MAX_LATENT_MAGNITUDE:g}), of which the model would make NaN audio: "
                                 "an untrained or diverged codec? use the codec the model was trained with, or another "
                                 "checkpoint of it")
    return mu.view(B, C, T, Z).transpose(1, 2).reshape(B, T, C * Z)


def decode_frames(codec: Codec, frames: Tensor, channels: int, chunk: int = 64) -> Tensor:
    """(B, T, C*Z) frames -> (B, C, 2000 T) float32 audio, decoded `chunk` latents at a time
    through a streaming decoder (the same output as one pass, with bounded memory: each chunk's
    audio is written into the output as it comes, which is the only audio-sized allocation)."""
    B, T, _ = frames.shape
    z = frames.view(B, T, channels, -1).transpose(1, 2).reshape(B * channels, T, -1)
    z = z.to(next(codec.parameters()).dtype)
    _, stream = codec.init_stream(B * channels)
    audio = torch.empty(B * channels, T * codec.hop_length, device=z.device)
    for i in range(0, T, chunk):
        y = codec.decode_step(z[:, i:i + chunk], stream).reshape(B * channels, -1)
        audio[:, i * codec.hop_length:i * codec.hop_length + y.shape[-1]] = y
    return audio.view(B, channels, -1)
