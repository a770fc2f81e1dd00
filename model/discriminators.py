"""Discriminators of the codec recipe: HiFi-GAN's multi-period discriminator and DAC's
multi-resolution complex-STFT discriminator.

Each discriminator maps (B, 1, N) audio to `(logits, features)`: the last map, and every
intermediate activation for feature matching. `Discriminators` runs them all and returns the list.
`Discriminators.use_channels_last()` runs them on channels-last activations (the trainer on CUDA).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import weight_norm

from .codec_losses import stft

# Frequency bands of the STFT discriminator, as fractions of the Nyquist frequency (DAC).
BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
SLOPE = 0.1  # of every leaky ReLU


def conv2d(conv: nn.Conv2d, x: Tensor, channels_last: bool, bias: bool = True) -> Tensor:
    """`conv(x)` (without its bias if not `bias`); with `channels_last`, the weight is handed to the
    convolution channels-last, which makes the output channels-last even where the input's layout
    is ambiguous (one channel). A clone, not `.contiguous`: a one-channel weight is already
    "contiguous" in both layouts and would keep the strides that read as channels-first."""
    if not channels_last and bias:
        return conv(x)
    weight = conv.weight.clone(memory_format=torch.channels_last) if channels_last else conv.weight
    return F.conv2d(x, weight, conv.bias if bias else None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv2d_leaky(conv: nn.Conv2d, x: Tensor, channels_last: bool, kernels: bool = False) -> Tensor:
    """`leaky_relu(conv(x), SLOPE)`. With `kernels` and `channels_last` (on CUDA, or on the CPU in
    Triton's interpreter), the convolution without the bias, then the bias and the activation in
    one kernel each way (`model.discriminator_kernels.bias_leaky_relu`): the same values up to
    rounding (the bias is added in float32, not in the activations' bf16)."""
    if not (kernels and channels_last and conv.bias is not None):
        return F.leaky_relu(conv2d(conv, x, channels_last), SLOPE)
    from .discriminator_kernels import bias_leaky_relu  # Triton, imported where a CUDA step uses it
    return bias_leaky_relu(conv2d(conv, x, channels_last, bias=False), conv.bias, SLOPE)


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN MPD sub-discriminator: the waveform folded into (N / p, p) columns of samples
    `period` apart, then 2-D convolutions along time only (kernel (5, 1), stride (3, 1))."""

    def __init__(self, period: int, channels: Sequence[int] = (32, 128, 512, 1024, 1024)):
        super().__init__()
        self.period = period
        widths = (1,) + tuple(channels)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(cin, cout, (5, 1), (3 if i < len(channels) - 1 else 1, 1), padding=(2, 0)))
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])))
        self.post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))
        self.channels_last = False
        self.kernels = False  # `Discriminators.use_kernels`

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, n = x.shape
        if n % self.period:
            x = F.pad(x, (0, self.period - n % self.period), mode="reflect")
        x = x.view(b, c, -1, self.period)  # (B, 1, N / p, p)
        features = []
        for conv in self.convs:
            x = conv2d_leaky(conv, x, self.channels_last, self.kernels)
            features.append(x)
        return conv2d(self.post, x, self.channels_last), features


class STFTDiscriminator(nn.Module):
    """DAC MRD sub-discriminator: the complex STFT (real and imaginary parts as two channels,
    (B, 2, T, F)) split into frequency bands, each band through its own 2-D conv stack, the
    bands concatenated along frequency and mapped to one logit map."""

    def __init__(self, window: int, channels: int = 32, bands: Sequence[tuple[float, float]] = BANDS):
        super().__init__()
        self.hop = window // 4
        self.register_buffer("window", torch.hann_window(window), persistent=False)
        bins = window // 2 + 1
        self.bands = [(int(lo * bins), int(hi * bins)) for lo, hi in bands]
        ch = channels

        def stack() -> nn.ModuleList:
            return nn.ModuleList([
                weight_norm(nn.Conv2d(2, ch, (3, 9), (1, 1), padding=(1, 4))),
                weight_norm(nn.Conv2d(ch, ch, (3, 9), (1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(ch, ch, (3, 9), (1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(ch, ch, (3, 9), (1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(ch, ch, (3, 3), (1, 1), padding=(1, 1))),
            ])

        self.band_convs = nn.ModuleList(stack() for _ in self.bands)
        self.post = weight_norm(nn.Conv2d(ch, 1, (3, 3), padding=(1, 1)))
        self.channels_last = False
        self.kernels = False  # `Discriminators.use_kernels`

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.view_as_real(stft(x, self.window, self.hop))  # (B, F, T, 2), float32
        spec = spec.permute(0, 3, 2, 1)  # (B, 2, T, F); autocast casts it for the convs
        features, outs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            h = spec[..., lo:hi]
            if self.channels_last:  # each band copied once, into a channels-last (B, 2, T, f)
                h = h.contiguous(memory_format=torch.channels_last)
            for conv in convs:
                h = conv2d_leaky(conv, h, self.channels_last, self.kernels)
                features.append(h)
            outs.append(h)
        return conv2d(self.post, torch.cat(outs, dim=-1), self.channels_last), features


class Discriminators(nn.Module):
    """All discriminators of a config: one `PeriodDiscriminator` per period in `mpd_periods`, one
    `STFTDiscriminator` per window in `mrd_windows`. (B, 1, N) -> [(logits, features), ...]."""

    def __init__(self, cfg):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, cfg.mpd_channels) for p in cfg.mpd_periods] +
            [STFTDiscriminator(w, cfg.mrd_channels) for w in cfg.mrd_windows])

    def use_channels_last(self, on: bool = True) -> None:
        """Run every convolution on channels-last activations: a training speed switch for CUDA
        (the trainer sets it there), the same values up to rounding, the parameters untouched
        (each weight is handed to cuDNN channels-last). On contiguous activations cuDNN converts
        each bf16 convolution's input, output and gradients to and from NHWC; the period
        discriminators' one-channel input reads as contiguous, and the STFT discriminator's
        bands were strided views, so before this only 68 of `small`'s 108 convolutions were
        handed a channels-last input."""
        for d in self.discriminators:
            d.channels_last = on

    def use_kernels(self, on: bool = True) -> None:
        """With channels-last activations on CUDA, each convolution's bias and the leaky ReLU after
        it as one Triton kernel forward and one backward (`model.discriminator_kernels`) instead of
        cuDNN's separate bias add, the activation and the bias gradient's reduction: the same
        values up to rounding, fewer passes over the activations on the GPU, more work for the
        host (two kernel launches from Python a layer). The trainer sets it from `disc_kernels` on
        CUDA (what it gains or costs: README, Training the codec); Triton runs on the CPU only in
        its interpreter (the tests)."""
        for d in self.discriminators:
            d.kernels = on

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.discriminators]

    def judge(self, real: Tensor, fake: Tensor) -> tuple[list, list]:
        """The verdicts on `real` and on `fake` (both (B, 1, N)) from one forward of the two
        batches together, split back: the same values as `self(real), self(fake)` (no layer mixes
        the items of a batch) with half the convolutions' launches (a CPU count of `small`'s
        discriminator part of a step: 3,470 dispatched ops -> 3,102), each weight-normed weight
        computed once; but the backward through the discriminators into `fake` then also runs
        over the real half. Not yet the trainer's step: `benchmarks/codec_train.py --variants
        base,joint_disc` measures it against the two passes on a GPU (not yet done)."""
        if real.shape != fake.shape:
            raise ValueError(f"judge takes real and fake audio of one shape, got {tuple(real.shape)} and "
                             f"{tuple(fake.shape)}")
        both = [(logits.chunk(2), [f.chunk(2) for f in features])
                for logits, features in self(torch.cat([real, fake]))]
        return tuple([(logits[i], [f[i] for f in features]) for logits, features in both] for i in (0, 1))
