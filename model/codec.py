"""The hertz-dev codec: a causal convolutional VAE, 16 kHz audio <-> 8 latents/s of 32 dims.

Module and parameter names follow the original (`WaveCodec`, `ResNetStack`, `GaussianZ`) so the
official `inference_apatosaurus_95000.pt` loads with `strict=True`.

Every convolution is causal, so the codec streams: `CodecStream` holds the left context of each
causal convolution, preallocated for a batch, and `encode_step` / `decode_step` process one chunk
(a multiple of 2000 samples, or of one latent) at a time with the same output as the whole-signal
`encode` / `decode`.

Activations are (B, C, L). For training on CUDA, `Codec.use_channels_last` runs the whole-signal
passes on (B, C, 1, L) tensors stored channels-last, each convolution as the 2-D convolution of the
same weights (`conv_any`): the layout cuDNN computes in, so it does not convert NCHW <-> NHWC
around every call. Same values up to rounding, same parameters; streaming stays (B, C, L).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class CodecStream:
    """Left context of every causal convolution of one codec half, for a batch of streams.

    Buffers are allocated once and updated in place, so a step can be captured in a CUDA graph.
    `reset(rows)` restarts some streams (a new session in a batched server) without touching
    the others.
    """

    def __init__(self, stack: "ResNetStack", batch_size: int, device, dtype):
        self.batch_size = batch_size
        self.buffers: dict[int, Tensor] = {}
        # Transposed convolutions pad their first frame by replication, so they need to know
        # which rows have not seen a frame yet.
        self.fresh: dict[int, Tensor] = {}
        for m in stack.modules():
            if isinstance(m, (CausalConv1d, CausalConvTranspose1d)):
                cin = m.in_channels
                self.buffers[id(m)] = torch.zeros(batch_size, cin, m.pad_length, device=device, dtype=dtype)
                if isinstance(m, CausalConvTranspose1d):
                    self.fresh[id(m)] = torch.ones(batch_size, 1, 1, device=device, dtype=torch.bool)

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Restart all streams, or only the rows given (a bool mask or index tensor)."""
        for key, buf in self.buffers.items():
            if rows is None:
                buf.zero_()
            else:
                buf[rows] = 0
        for flag in self.fresh.values():
            if rows is None:
                flag.fill_(True)
            else:
                flag[rows] = True

    def push(self, module: nn.Module, x: Tensor) -> Tensor:
        """Return `x` with the stored left context prepended, and store the new context."""
        buf = self.buffers[id(module)]
        if id(module) in self.fresh:
            fresh = self.fresh[id(module)]
            buf.copy_(torch.where(fresh, x[..., :1].expand_as(buf), buf))
            fresh.fill_(False)
        full = torch.cat([buf, x], dim=-1)
        buf.copy_(full[..., full.shape[-1] - buf.shape[-1]:])
        return full


CHANNELS_LAST = torch.channels_last


def conv_any(conv: nn.Module, x: Tensor, padding: int = 0) -> Tensor:
    """An `nn.Conv1d` or `nn.ConvTranspose1d` (no padding of its own) applied to (B, C, L), or to
    (B, C, 1, L) channels-last (the training layout, `Codec.use_channels_last`) as the 2-D
    convolution of the same weights, whose output is made channels-last too (cuDNN returns the
    contiguous layout for a one-channel input). `padding` along L (4-D only; for a transposed conv,
    the outputs it trims from each end)."""
    if x.dim() == 3:
        return conv(x)
    w = conv.weight.unsqueeze(2)
    (stride,), (dilation,) = conv.stride, conv.dilation
    if isinstance(conv, nn.ConvTranspose1d):
        y = F.conv_transpose2d(x, w, conv.bias, (1, stride), (0, padding), 0, conv.groups, (1, dilation))
    else:
        y = F.conv2d(x, w, conv.bias, (1, stride), (0, padding), (1, dilation), conv.groups)
    return y.contiguous(memory_format=CHANNELS_LAST)


def dilated_conv1d_polyphase(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """`conv(x)` for a stride-1 conv of dilation d, computed as an undilated conv of the input's d
    interleaved phases folded into the batch: output t = q d + r reads x[(q + j) d + r], which
    is phase r's sample q + j. Same values up to rounding. x: (B, C, L), or (B, C, 1, L)
    channels-last (`conv_any`).

    For training on CUDA, where cuDNN's dilated convolutions are several times slower than its
    undilated ones (bf16, 512 channels, 32 x 6 s crops on an H200: 26 ms forward and backward at
    dilation 3 or 9 against 3.8 ms at dilation 1; over phases 4.9-5.5 ms).
    """
    d = conv.dilation[0]
    b, c, length = x.shape[0], x.shape[1], x.shape[-1]
    n = length - (conv.kernel_size[0] - 1) * d
    x = F.pad(x, (0, -length % d))
    if x.dim() == 3:
        phases = x.view(b, c, -1, d).permute(0, 3, 1, 2).reshape(b * d, c, -1)   # (B d, C, L / d)
        y = F.conv1d(phases, conv.weight, conv.bias)                             # (B d, Cout, L / d - k + 1)
        y = y.view(b, d, y.shape[1], -1).permute(0, 2, 3, 1).reshape(b, y.shape[1], -1)
        return y[..., :n]
    # channels-last (B, C, 1, L) is stored as (B, L, C): the phases are (B, L / d, d, C) regrouped
    frames = x.permute(0, 2, 3, 1).reshape(b, -1, d, c)                           # (B, L / d, d, C), a view
    phases = frames.transpose(1, 2).reshape(b * d, 1, -1, c).permute(0, 3, 1, 2)  # (B d, C, 1, L / d)
    y = F.conv2d(phases, conv.weight.unsqueeze(2), conv.bias)                    # (B d, Cout, 1, L / d - k + 1)
    cout = y.shape[1]
    y = y.permute(0, 2, 3, 1).reshape(b, d, -1, cout).transpose(1, 2).reshape(b, 1, -1, cout)
    return y.permute(0, 3, 1, 2)[..., :n]


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only: output t sees input up to t.

    `polyphase` (set by `Codec.dilated_convs_polyphase` for training; never for streaming)
    computes a dilated convolution with `dilated_conv1d_polyphase` instead.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, bias=True):
        super().__init__()
        self.in_channels = in_channels
        self.pad_length = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              dilation=dilation, bias=bias)
        self.polyphase = False

    def forward(self, x: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        x = F.pad(x, (self.pad_length, 0)) if stream is None else stream.push(self, x)
        if self.polyphase and stream is None:
            return dilated_conv1d_polyphase(x, self.conv)
        return conv_any(self.conv, x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel 2*stride) that upsamples causally.

    The input is padded on the left by replicating its first frame, and `stride` samples are
    trimmed on each side, so output frame block t depends on input frames t-1 and t only.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias=True):
        super().__init__()
        self.in_channels = in_channels
        self.stride = stride
        self.pad_length = math.ceil(kernel_size / stride) - 1
        self.deconv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride,
                                         padding=0, output_padding=0, bias=bias)
        # Kept only because the official checkpoint stores it; streaming state lives in CodecStream.
        self.register_buffer("pad_buffer", torch.zeros(1, in_channels, self.pad_length))

    def forward(self, x: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        if x.dim() == 4:
            # The training layout: the replication as a concatenation and the trim as the transposed
            # conv's own padding, whose backwards keep the gradients channels-last (those of a
            # replication pad and of a slice are allocated channels-first).
            x = torch.cat([x[..., :1].expand(*x.shape[:-1], self.pad_length), x], dim=-1)
            return conv_any(self.deconv, x, padding=self.stride)
        if stream is None:
            x = F.pad(x, (self.pad_length, 0), mode="replicate")
        else:
            x = stream.push(self, x)
        return self.deconv(x)[:, :, self.stride:-self.stride]


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """x + sin(alpha x)^2 / alpha, `alpha` broadcast over x (one a channel): the periodic activation
    of BigVGAN and DAC, whose units can make a sinusoid's harmonics where ELU's must build them."""
    return x + torch.sin(alpha * x).square() / (alpha + 1e-9)


class Snake(nn.Module):
    """`snake` with a learned frequency per channel (1 at the start), on (B, C, L) and the trainer's
    (B, C, 1, L) layouts (channel dimension 1). On CUDA in the trainer's layout, one Triton kernel
    each way (`model.snake_kernels`; the same values up to rounding, computed in float32) instead of
    torch's six elementwise kernels forward and about twelve backward; under torch.compile, the
    formula, which Inductor fuses itself."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.is_cuda and not torch.compiler.is_compiling():
            from .snake_kernels import snake as fused  # Triton, imported where a CUDA step uses it
            return fused(x, self.alpha)
        return snake(x, self.alpha.view(-1, *([1] * (x.dim() - 2))))


def make_activation(kind: str, channels: int) -> nn.Module:
    """The codec's activation (`CodecConfig.activation`): "elu" (the original's) or "snake"."""
    if kind == "elu":
        return nn.ELU()
    if kind == "snake":
        return Snake(channels)
    raise ValueError(f"activation must be 'elu' or 'snake', got {kind!r}")


class CausalResUnit(nn.Module):
    """x + conv1x1(act(dilated causal conv(act(x)))); act is ELU (the original's, no parameters)
    or Snake (one learned frequency a channel for each of the two, `activation`, `activation2`)."""

    def __init__(self, channels, kernel_size=7, dilation=1, bias=False, activation: str = "elu"):
        super().__init__()
        self.activation = make_activation(activation, channels)
        self.activation2 = self.activation if activation == "elu" else make_activation(activation, channels)
        self.conv1 = CausalConv1d(channels, channels, kernel_size, dilation=dilation, bias=bias)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        y = self.conv1(self.activation(x), stream)
        y = conv_any(self.conv2, self.activation2(y))
        return x + y


class AvgPool(nn.AvgPool1d):
    """`nn.AvgPool1d` that also takes the (B, C, 1, L) training layout."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return super().forward(x)
        return F.avg_pool2d(x, (1, self.kernel_size[0]), (1, self.stride[0]))


class NearestUpsample(nn.Upsample):
    """Nearest `nn.Upsample` along L that also takes the (B, C, 1, L) training layout."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return super().forward(x)
        return F.interpolate(x, scale_factor=(1, self.scale_factor), mode="nearest")


def _run(modules, x: Tensor, stream: Optional[CodecStream]) -> Tensor:
    for m in modules:
        x = m(x, stream) if isinstance(m, (CausalConv1d, CausalConvTranspose1d, CausalResUnit, ResNetBlock)) else m(x)
    return x


class ResNetBlock(nn.Module):
    """Three dilated residual units and a stride change (the original's `ResNetBlock`).

    Encoder: units, then a strided causal conv (or average pooling when the width is unchanged).
    Decoder: a transposed conv (or nearest upsampling when the width is unchanged), then units.
    """

    def __init__(self, in_channels, out_channels, stride, kernel_size=7, dilations=(1, 3, 9),
                 bias=True, mode="encoder", activation: str = "elu"):
        super().__init__()
        res_channels = in_channels if mode == "encoder" else out_channels
        units = [CausalResUnit(res_channels, kernel_size, dilation=d, activation=activation) for d in dilations]
        if in_channels == out_channels:
            resample = (AvgPool(stride, stride) if mode == "encoder"
                        else NearestUpsample(scale_factor=stride, mode="nearest"))
            change = [resample, nn.Identity()] if mode == "encoder" else [resample, nn.Identity()]
        else:
            conv = CausalConv1d if mode == "encoder" else CausalConvTranspose1d
            change = [conv(in_channels, out_channels, 2 * stride, stride=stride, bias=bias)]
        # Order (and so the state-dict indices) as in the original.
        self.res_block = nn.Sequential(*(units + change if mode == "encoder" else change + units))

    def forward(self, x: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        return _run(self.res_block, x, stream)


class ResNetStack(nn.Module):
    """Encoder (waveform -> features at 8 Hz) or decoder (features -> waveform)."""

    def __init__(self, cfg, mode: str):
        super().__init__()
        assert mode in ("encoder", "decoder"), mode
        assert len(cfg.channel_ratios) == len(cfg.strides)
        self.mode = mode
        ratios = (1,) + tuple(cfg.channel_ratios)
        strides = tuple(cfg.strides)
        self.middle_channels = cfg.encode_channels * ratios[-1]
        if mode == "decoder":
            ratios, strides = ratios[::-1], strides[::-1]
        self.multiplier = cfg.decode_channel_multiplier if mode == "decoder" else 1
        width = cfg.encode_channels * self.multiplier
        blocks = [ResNetBlock(cfg.encode_channels * ratios[i] * self.multiplier,
                              cfg.encode_channels * ratios[i + 1] * self.multiplier,
                              stride, kernel_size=cfg.kernel_size, bias=cfg.bias, mode=mode,
                              activation=cfg.activation)
                  for i, stride in enumerate(strides)]
        data_conv = CausalConv1d(cfg.input_channels if mode == "encoder" else width,
                                 cfg.encode_channels if mode == "encoder" else cfg.output_channels,
                                 cfg.kernel_size, bias=False)
        self.res_stack = nn.Sequential(*([data_conv] + blocks if mode == "encoder" else blocks + [data_conv]))
        if self.multiplier != 1:
            self.multiplier_proj = nn.Conv1d(self.middle_channels, self.middle_channels * self.multiplier,
                                             kernel_size=1, bias=cfg.bias)

    def forward(self, x: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        if self.multiplier != 1:
            x = conv_any(self.multiplier_proj, x)
        return _run(self.res_stack, x, stream)


class GaussianZ(nn.Module):
    """Gaussian latent head: features -> (mu, logvar) of 32-dim latents; latents -> features."""

    def __init__(self, dim: int, latent_dim: int, bias: bool = True):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * latent_dim, bias=bias)
        self.proj_out = nn.Linear(latent_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.proj_in(x).chunk(2, dim=-1)
        return mu, logvar


class _WeightNorm(nn.utils.parametrizations._WeightNorm):
    """torch's weight-norm parametrization (w = g v / |v|), but on a `meta` weight (the loaders'
    build, `model.loading._meta`) g is only shaped, not computed: torch.norm on `meta` runs
    Python reference kernels, whose first call imports torch._dynamo (about 2 s of CPU at every
    start of a script that loads a codec), and then costs ~10 ms a layer."""

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        if weight.is_meta:
            shape = [1] * weight.dim()
            shape[self.dim] = weight.shape[self.dim]
            return weight.new_empty(shape), weight
        return super().right_inverse(weight)


def weight_norm(module: nn.Module) -> nn.Module:
    """`nn.utils.parametrizations.weight_norm(module)` (the same parameters, names and values),
    cheap on a `meta` build (`_WeightNorm`)."""
    nn.utils.parametrize.register_parametrization(module, "weight", _WeightNorm(0), unsafe=True)
    return module


class Codec(nn.Module):
    """Causal convolutional VAE. `encode`: (B, 1, N) audio -> mu, logvar (B, N/2000, 32);
    `decode`: (B, L, 32) latents -> (B, 1, 2000 L) audio."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.norm_stddev = cfg.norm_stddev
        self.hop_length = math.prod(cfg.strides)
        self.encoder = ResNetStack(cfg, "encoder")
        self.compressor = GaussianZ(self.encoder.middle_channels, cfg.latent_dim, bias=cfg.bias)
        self.decoder = ResNetStack(cfg, "decoder")
        if cfg.weight_norm:
            for m in list(self.encoder.modules()) + list(self.decoder.modules()):
                if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                    weight_norm(m)
            weight_norm(self.compressor.proj_in)
            weight_norm(self.compressor.proj_out)
        self.channels_last = False  # the whole-signal passes' layout (`use_channels_last`)

    def use_channels_last(self, on: bool = True) -> None:
        """Run the whole-signal passes (`encode`, `decode`, the training `forward`) on (B, C, 1, L)
        channels-last activations: a training speed switch for CUDA (the trainer sets it there),
        the same values up to rounding, the parameters untouched; streaming keeps (B, C, L).

        On (B, C, L), cuDNN converts every input, output and gradient to and from NHWC around each
        convolution. Measured on the H200 (`benchmarks/codec_train.py`, bf16 eager, 32 crops, with
        the discriminators' weights computed once a step as the trainer does): a `small` step
        0.360 s against 0.401 at 6 s crops, 0.152 s against 0.203 at 2 s; `hertz_dev` 0.519 s
        against 0.581."""
        self.channels_last = on

    def dilated_convs_polyphase(self, min_channels: int = 512) -> int:
        """Compute the dilated causal convolutions of at least `min_channels` input channels with
        `dilated_conv1d_polyphase` (a training speed switch for CUDA: the same values up to
        rounding, the parameters untouched; a huge `min_channels` switches it off); returns how
        many convolutions it applies to.

        512 from the H200 (bf16, 32 x 6 s crops, `benchmarks/codec_train.py --convs`): at 512
        channels the phases take 1.1-5.5 ms where cuDNN takes 1.5-26 ms; at 256 they are even;
        at 16-128 channels cuDNN's dilated kernels are 10-70% faster than the phases' reshuffle."""
        count = 0
        for m in self.modules():
            if isinstance(m, CausalConv1d):
                m.polyphase = m.conv.dilation[0] > 1 and m.conv.stride[0] == 1 and m.in_channels >= min_channels
                count += m.polyphase
        return count

    # --- whole signals ---------------------------------------------------------------------------
    def _input(self, x: Tensor, name: str, shape: str, hint: str = "") -> Tensor:
        """`x` in the weights' dtype (any float dtype is taken), or a TypeError or ValueError naming
        `name` (of the expected `shape`): not a tensor, not floating point, on another device.
        Shape, dtype and device only: no host synchronisation."""
        p = next(self.parameters())
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch tensor {shape}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point {shape}, got {x.dtype}{hint}")
        if x.device != p.device:
            raise ValueError(f"{name} is on {x.device}, the codec on {p.device}: move it with .to({str(p.device)!r})")
        return x.to(p.dtype)

    def encode(self, audio: Tensor, stream: Optional[CodecStream] = None) -> tuple[Tensor, Tensor]:
        """(B, 1, N) audio in [-1, 1], N a multiple of 2000 -> mu, logvar, each (B, N/2000, 32).
        Audio of another float dtype is cast to the weights'; another rank or channel count, fewer
        than 2000 samples, integer samples or another device is a ValueError or TypeError."""
        audio = self._input(audio, "audio", "(B, 1, N)", " (int16 PCM: divide by 32768)")
        cin = self.config.input_channels
        if audio.dim() != 3 or audio.shape[1] != cin:
            hint = ": one channel per row (a duplex pair is audio.reshape(B * 2, 1, N))" if cin == 1 else ""
            raise ValueError(f"audio must be (B, {cin}, N), got {tuple(audio.shape)}{hint}")
        if audio.shape[-1] < self.hop_length:
            raise ValueError(f"audio of {audio.shape[-1]} samples is shorter than one latent ({self.hop_length})")
        x = audio / self.norm_stddev
        if self.channels_last and stream is None:
            h = self.encoder(x.unsqueeze(2)).squeeze(2)  # (B, C, L), stored as (B, L, C)
        else:
            h = self.encoder(x, stream)  # (B, C, L)
        return self.compressor(h.transpose(1, 2))

    def decode(self, latents: Tensor, stream: Optional[CodecStream] = None) -> Tensor:
        """(B, L, 32) latents -> (B, 1, 2000 L) audio. Latents of another float dtype are cast to the
        weights'; another shape (L = 0 included), integers or another device is a ValueError or
        TypeError."""
        Z = self.config.latent_dim
        latents = self._input(latents, "latents", f"(B, L, {Z})")
        if latents.dim() != 3 or latents.shape[2] != Z or latents.shape[1] == 0:
            raise ValueError(f"latents must be (B, L, {Z}) with L >= 1, got {tuple(latents.shape)}")
        h = self.compressor.proj_out(latents).transpose(1, 2)  # (B, C, L)
        if self.channels_last and stream is None:
            # squeeze, not [:, :, 0]: the backward of a view keeps the gradient's layout
            return self.decoder(h.unsqueeze(2).contiguous(memory_format=CHANNELS_LAST)).squeeze(2) * self.norm_stddev
        return self.decoder(h, stream) * self.norm_stddev

    @staticmethod
    def sample(mu: Tensor, logvar: Tensor, generator: Optional[torch.Generator] = None,
               eps: Optional[Tensor] = None) -> Tensor:
        """Draw z = mu + sigma * eps from the posterior, as the original tokenizer does. `eps`:
        standard normal draws to use (broadcast to mu; the engines' counter-based noise), else
        drawn here from `generator`."""
        if eps is None:
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + eps.to(mu.dtype) * torch.exp(0.5 * logvar)

    def forward(self, audio: Tensor) -> dict[str, Tensor]:
        """Training pass: encode, sample the posterior, decode."""
        mu, logvar = self.encode(audio)
        z = self.sample(mu, logvar)
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    # --- streaming -------------------------------------------------------------------------------
    def init_stream(self, batch_size: int, device=None, dtype=None) -> tuple[CodecStream, CodecStream]:
        """Preallocated (encoder, decoder) streaming state for `batch_size` streams."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        return (CodecStream(self.encoder, batch_size, device, dtype),
                CodecStream(self.decoder, batch_size, device, dtype))

    def encode_step(self, chunk: Tensor, stream: CodecStream) -> tuple[Tensor, Tensor]:
        """Next (B, 1, 2000 k) samples -> mu, logvar of their k latents."""
        return self.encode(chunk, stream)

    def decode_step(self, latents: Tensor, stream: CodecStream) -> Tensor:
        """Next (B, k, 32) latents -> their (B, 1, 2000 k) samples."""
        return self.decode(latents, stream)


def compile_codec(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of a codec part (generator or discriminators), static shapes, with Inductor's
    coalescing tiling analysis off where torch has it: on torch 2.11 that analysis fails on the
    codec's graphs ("TypeError: CantSplit.__init__() missing 2 required positional arguments",
    an internal exception raised without its arguments; repaired in later versions). Without it
    Inductor chooses its tilings as it did before the analysis existed."""
    import torch._inductor.config as inductor

    has_setting = hasattr(inductor.triton, "coalesce_tiling_analysis")
    return torch.compile(module, dynamic=False,
                         options={"triton.coalesce_tiling_analysis": False} if has_setting else None)
