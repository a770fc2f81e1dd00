"""Losses and metrics of the codec recipe (DAC / HiFi-GAN family), in plain torch.

- `MultiResolutionMelLoss`: L1 between log10 mel spectrograms at several STFT window sizes
  (torch.stft and a Slaney mel filterbank built here; no torchaudio), padding excluded.
- `waveform_l1` and `MultiResolutionSTFTLoss`: optional phase-aware terms (sample L1, complex
  STFT L1), which the mel loss, blind to phase, leaves free.
- `latent_kl`: KL of the Gaussian latent to N(0, I), padding excluded.
- `discriminator_loss`, `generator_adversarial_loss` (LSGAN or hinge) and `feature_matching_loss`
  over the outputs of `model.discriminators.Discriminators`.
- `si_sdr`, `stoi` (pystoi), `pesq_wb` (pesq) and `dnsmos` (speechmos): evaluation metrics on
  unpadded audio; the optional packages are imported when called. `kl_bits_per_second` turns
  `latent_kl` into the latent's information rate.

Audio is (B, 1, N) and `mask` is (B, N): 1 on real samples, 0 on the padding that
`model.data.AudioCropDataset` adds after a short clip. The codec is causal, so padding after the
end never changes the reconstruction of real samples; callers zero both signals on the padding
(`audio * mask`) and the reconstruction losses below also leave padded frames out of their mean.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DiscOutputs = Sequence[tuple[Tensor, Sequence[Tensor]]]  # per discriminator: (logits, feature maps)


# --- mel spectrograms ---------------------------------------------------------------------------

def hz_to_mel(freq: Tensor) -> Tensor:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(freq < min_log_hz, freq / f_sp,
                       min_log_mel + torch.log(freq.clamp_min(min_log_hz) / min_log_hz) / logstep)


def mel_to_hz(mel: Tensor) -> Tensor:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(mel < min_log_mel, mel * f_sp, min_log_hz * torch.exp(logstep * (mel - min_log_mel)))


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 0.0,
                   fmax: Optional[float] = None) -> Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, evenly spaced on the Slaney mel scale and
    area-normalised (librosa `filters.mel` defaults: htk=False, norm="slaney")."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(torch.tensor(fmin, dtype=torch.float64)).item(),
                          hz_to_mel(torch.tensor(fmax, dtype=torch.float64)).item(), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)  # (n_mels + 2,)
    lower = (fft_freqs[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - fft_freqs[None]) / (edges[2:] - edges[1:-1])[:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.float()


def stft(audio: Tensor, window: Tensor, hop: int) -> Tensor:
    """(B, 1, N) -> complex (B, F, T) STFT, centred (frame t is centred on sample t * hop), always
    in float32: bf16 has no FFT and too little precision for log spectra."""
    with torch.autocast(audio.device.type, enabled=False):
        return torch.stft(audio.squeeze(1).float(), n_fft=window.numel(), hop_length=hop, window=window.float(),
                          center=True, pad_mode="reflect", return_complex=True)


def frame_mask(mask: Tensor, hop: int, frames: int) -> Tensor:
    """(B, N) sample mask -> (B, frames) mask of the STFT frames centred on real samples."""
    centres = (torch.arange(frames, device=mask.device) * hop).clamp(max=mask.shape[-1] - 1)
    return mask[:, centres]


class MelSpectrogram(nn.Module):
    """(B, 1, N) audio -> (B, n_mels, N // hop + 1) float32 mel magnitudes (power 1), hop = window / 4."""

    def __init__(self, window: int, n_mels: int, sample_rate: int):
        super().__init__()
        self.hop = window // 4
        self.register_buffer("window", torch.hann_window(window), persistent=False)
        self.register_buffer("filters", mel_filterbank(window, n_mels, sample_rate), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:
        with torch.autocast(audio.device.type, enabled=False):  # float32 even under bf16 autocast
            spec = stft(audio, self.window, self.hop).abs()  # (B, F, T)
            return torch.matmul(self.filters, spec)


def log_distance(x: Tensor, y: Tensor, eps: float) -> Tensor:
    """| log10 max(x, eps) - log10 max(y, eps) | elementwise, for magnitudes x and y: what the mel
    loss and the log-magnitude STFT term average."""
    return (torch.log10(x.clamp_min(eps)) - torch.log10(y.clamp_min(eps))).abs()


class MultiResolutionMelLoss(nn.Module):
    """Multi-resolution mel distance (DAC's `MelSpectrogramLoss` with pow=1, mag_weight=0):

        L_mel(x, y) = sum_r  mean_{b, t real, m} | log10 max(M_r(x), eps) - log10 max(M_r(y), eps) |

    over resolutions r (STFT windows `windows`, `bins` mel bands each, hop = window / 4), where
    the mean runs over the frames t centred on real (unpadded) samples only. With DAC's seven
    windows this is the "mel distance" DAC reports; it is also the validation metric here.
    """

    def __init__(self, windows: Sequence[int], bins: Sequence[int], sample_rate: int, eps: float = 1e-5):
        super().__init__()
        if len(windows) != len(bins):
            raise ValueError(f"mel_windows and mel_bins must have the same length, got {windows} and {bins}")
        self.eps = eps
        self.mels = nn.ModuleList(MelSpectrogram(w, n, sample_rate) for w, n in zip(windows, bins))

    def forward(self, x: Tensor, y: Tensor, mask: Optional[Tensor] = None, per_item: bool = False) -> Tensor:
        """x, y: (B, 1, N); mask: (B, N) or None. A scalar, or (B,) with `per_item=True`."""
        total = 0.0
        for mel in self.mels:
            err = log_distance(mel(x), mel(y), self.eps)
            err = err.mean(dim=1)  # (B, T): mean over mel bands
            m = torch.ones_like(err) if mask is None else frame_mask(mask, mel.hop, err.shape[-1]).to(err.dtype)
            if per_item:
                total = total + (err * m).sum(-1) / m.sum(-1).clamp_min(1)
            else:
                total = total + (err * m).sum() / m.sum().clamp_min(1)
        return total


# --- phase-aware terms (optional) ----------------------------------------------------------------

def waveform_l1(x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean absolute sample error over real samples (EnCodec's time-domain term):

        L_wave(x, y) = sum_{b, n real} |x_bn - y_bn| / #real samples
    """
    err = (x.float() - y.float()).abs().squeeze(1)  # (B, N)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1)


class MultiResolutionSTFTLoss(nn.Module):
    """An STFT term at several windows (hann, hop = window / 4); frames centred on padding are left
    out. `term`:
    - "complex": complex-STFT L1 relative to the reference's magnitude, so that loud and quiet crops
      weigh alike,

          L_stft(x, y) = sum_r  sum_{b, f, t real} |X_r - Y_r| / sum_{b, f, t real} |Y_r|

      |X_r - Y_r| is the modulus of a complex difference, so it penalises phase errors as well as
      magnitude ones (0 only for x = y), unlike the mel loss;
    - "log_magnitude": log-magnitude L1 in every frequency bin (Parallel WaveGAN's log STFT
      magnitude term),

          L_logmag(x, y) = sum_r  mean_{b, f, t real} | log10 max(|X_r|, eps) - log10 max(|Y_r|, eps) |

      blind to phase like the mel loss, but at the STFT's own resolution: at 1024 and 2048 samples
      it resolves a voice's harmonics below 4 kHz, which the mel loss's bands average over.
    """

    def __init__(self, windows: Sequence[int], term: Literal["complex", "log_magnitude"] = "complex",
                 eps: float = 1e-5):
        super().__init__()
        if term not in ("complex", "log_magnitude"):
            raise ValueError(f"term must be 'complex' or 'log_magnitude', got {term!r}")
        self.term, self.eps = term, eps
        self.hops = [w // 4 for w in windows]
        for i, w in enumerate(windows):
            self.register_buffer(f"window{i}", torch.hann_window(w), persistent=False)

    def forward(self, x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x, y: (B, 1, N); mask: (B, N) or None. A scalar."""
        total = 0.0
        with torch.autocast(x.device.type, enabled=False):
            for i, hop in enumerate(self.hops):
                window = getattr(self, f"window{i}")
                sx, sy = stft(x, window, hop), stft(y, window, hop)  # complex (B, F, T)
                m = torch.ones_like(sy.real[:, :1]) if mask is None else \
                    frame_mask(mask, hop, sx.shape[-1])[:, None, :].float()  # (B, 1, T)
                if self.term == "complex":
                    total = total + ((sx - sy).abs() * m).sum() / ((sy.abs() * m).sum() + 1e-5)
                else:
                    err = log_distance(sx.abs(), sy.abs(), self.eps)
                    total = total + (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1)
        return total


# --- latent -------------------------------------------------------------------------------------

def latent_mask(mask: Tensor, hop: int) -> Tensor:
    """(B, N) sample mask -> (B, N / hop) mask of the latents whose first sample is real."""
    return mask[:, ::hop]


def latent_kl(mu: Tensor, logvar: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per latent, averaged over the real latents:

        L_kl = mean_{b, t real} sum_d -0.5 * (1 + logvar - mu^2 - exp(logvar))

    mu, logvar: (B, L, D); mask: (B, L) or None.
    """
    mu, logvar = mu.float(), logvar.float()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)  # (B, L)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def kl_bits_per_second(kl_nats: float, latents_per_second: float) -> float:
    """The latent's information rate in bits per second, from `latent_kl` (nats per latent, i.e.
    summed over the latent's D dimensions, averaged over latents):

        rate = KL / ln 2 * latents_per_second      (latents_per_second = sample_rate / prod(strides))

    KL(q(z|x) || p(z)) bounds the bits a decoder can read from the sampled latent (the "rate" of
    the VAE's rate-distortion view), so this is what a language model of the latents must model.
    """
    return kl_nats / math.log(2) * latents_per_second


# --- adversarial --------------------------------------------------------------------------------

def discriminator_loss(real: DiscOutputs, fake: DiscOutputs, kind: str = "lsgan") -> Tensor:
    """Discriminator objective, summed over the discriminators k:

        lsgan: sum_k mean (1 - D_k(x))^2 + mean D_k(G(z))^2          (HiFi-GAN, DAC)
        hinge: sum_k mean relu(1 - D_k(x)) + mean relu(1 + D_k(G(z)))  (MelGAN, EnCodec)
    """
    loss = 0.0
    for (d_real, _), (d_fake, _) in zip(real, fake):
        d_real, d_fake = d_real.float(), d_fake.float()
        if kind == "lsgan":
            loss = loss + torch.mean((1 - d_real) ** 2) + torch.mean(d_fake ** 2)
        elif kind == "hinge":
            loss = loss + torch.mean(F.relu(1 - d_real)) + torch.mean(F.relu(1 + d_fake))
        else:
            raise ValueError(f"gan_loss must be lsgan or hinge, got {kind!r}")
    return loss


def generator_adversarial_loss(fake: DiscOutputs, kind: str = "lsgan") -> Tensor:
    """Generator objective, summed over the discriminators k:

        lsgan: sum_k mean (1 - D_k(G(z)))^2
        hinge: sum_k mean relu(1 - D_k(G(z)))
    """
    loss = 0.0
    for d_fake, _ in fake:
        d_fake = d_fake.float()
        if kind == "lsgan":
            loss = loss + torch.mean((1 - d_fake) ** 2)
        elif kind == "hinge":
            loss = loss + torch.mean(F.relu(1 - d_fake))
        else:
            raise ValueError(f"gan_loss must be lsgan or hinge, got {kind!r}")
    return loss


def feature_matching_loss(real: DiscOutputs, fake: DiscOutputs, foreach: bool = True, kernel: bool = False) -> Tensor:
    """L1 between the discriminators' feature maps of real and generated audio (HiFi-GAN, DAC):

        L_fm = sum_k sum_l mean | f_k^l(x) - f_k^l(G(z)) |

    The real features are constants (detached); gradients flow into G(z) only. The difference is
    taken in the features' own dtype (bf16 under autocast: no float32 copy of the large maps) and
    the mean accumulates in float32. `foreach` (the default): the sums with torch's multi-tensor
    ops, a few calls per discriminator instead of four per feature map (~100 maps in `small`'s
    recipe); False: the per-map loop, the same loss and gradients. On one H200 the `small` step
    (32 x 6 s, bf16 eager) took 0.321 s instead of 0.352 (91.0 -> 99.6 samples/s,
    `benchmarks/codec_train.py --variants base,loop_fm`, benchmarks/results/h200_session17.txt).
    `kernel` (the trainer's `disc_kernels` on CUDA; on the CPU Triton runs only in its
    interpreter): each pair of maps is one Triton kernel forward and one backward
    (`model.discriminator_kernels.feature_l1`), the difference in float32, no difference map
    written or kept.
    """
    loss = 0.0
    for (_, f_real), (_, f_fake) in zip(real, fake):
        if kernel:
            from .discriminator_kernels import feature_l1  # Triton, imported where a CUDA step uses it
            loss = loss + feature_l1([a.detach() for a in f_real], list(f_fake))
            continue
        if foreach:
            sums = torch._foreach_norm(torch._foreach_sub([a.detach() for a in f_real], list(f_fake)), 1,
                                       dtype=torch.float32)  # sum |a - b| of each map
            loss = loss + torch.stack(torch._foreach_div(sums, [float(a.numel()) for a in f_real])).sum()
            continue
        for a, b in zip(f_real, f_fake):
            loss = loss + torch.mean((a.detach() - b).abs(), dtype=torch.float32)
    return loss


# --- evaluation metrics -------------------------------------------------------------------------

# Mean square (full scale 1) below which a reference is silence to SI-SDR: -100 dBFS, under the
# quantisation noise of 16-bit PCM (-101 dBFS), which a recording's quietest stretch still holds
SILENT_POWER = 1e-10


def silent(reference: np.ndarray) -> bool:
    """Whether a 1-D reference holds nothing a metric can score once its mean is taken away
    (digital silence, a DC offset alone: STOI scored one about 0, PESQ 1.6): `SILENT_POWER`."""
    return len(reference) == 0 or float(np.mean((reference - reference.mean(dtype=np.float64)) ** 2)) < SILENT_POWER


def si_sdr(estimate: Tensor, reference: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB, per item (Le Roux et al. 2019):

        s = <y, x> x / |x|^2,  SI-SDR = 10 log10(|s|^2 / |y - s|^2)

    with y the estimate and x the reference, both made zero-mean over their real samples, and y
    scaled to x's energy first (the score is scale-invariant, `eps` is not: a perfect estimate
    120 dB too quiet scored 0.02 dB), so `eps` bounds the score between about
    +-10 log10(|x|^2 / eps). An estimate that is silent where the reference is not (zero once
    zero-mean) scores that lower bound, the worst any estimate can score against this reference,
    as one that shares nothing with it (the formula's 0/0 scored it 0 dB, above every real codec).
    estimate, reference: (B, 1, N) or (B, N); mask: (B, N). Returns (B,), NaN for an item whose
    reference holds nothing to score against once zero-mean (digital silence, a DC offset alone, a
    single sample: a mean square below `SILENT_POWER`), as `stoi` and `pesq_wb` are: its score would
    be the estimate's own level (silence decoded with -80 dBFS hiss: about -45 dB), not a fidelity.
    """
    y, x = estimate.reshape(estimate.shape[0], -1).double(), reference.reshape(reference.shape[0], -1).double()
    m = torch.ones_like(x) if mask is None else mask.double()
    n = m.sum(-1, keepdim=True).clamp_min(1)
    x = (x - (x * m).sum(-1, keepdim=True) / n) * m
    y = (y - (y * m).sum(-1, keepdim=True) / n) * m
    energy, level = (x * x).sum(-1, keepdim=True), (y * y).sum(-1, keepdim=True)
    y = y * torch.where(level > 0, energy / level, 0.0).sqrt()  # (B, N) at the reference's energy
    s = (y * x).sum(-1, keepdim=True) / (energy + eps) * x
    score = 10 * torch.log10(((s * s).sum(-1) + eps) / (((y - s) ** 2).sum(-1) + eps))
    worst = 10 * torch.log10(eps / (energy.squeeze(-1) + eps))  # y orthogonal to x, or silent
    score = torch.where(level.squeeze(-1) == 0, worst, score)  # (a non-finite estimate stays NaN)
    return torch.where((energy / n).squeeze(-1) >= SILENT_POWER, score, math.nan).float()


def stoi(estimate: np.ndarray, reference: np.ndarray, sample_rate: int) -> float:
    """Short-time objective intelligibility (Taal et al. 2011) of 1-D signals, through pystoi;
    NaN when the reference holds too little non-silent speech to score (pystoi would return 1e-5),
    or is too short for it: pystoi needs N frames of N_FRAME samples at FS Hz, hop N_FRAME / 2
    (0.4 s), and fails inside on one shorter than a frame (a crop of a file of a few ms)."""
    from pystoi import stoi as pystoi_stoi
    from pystoi.stoi import FS, N, N_FRAME

    if silent(reference) or len(reference) * FS <= (N_FRAME + (N - 1) * N_FRAME // 2) * sample_rate:
        return float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(pystoi_stoi(reference, estimate, sample_rate, extended=False))
    return float("nan") if any("Not enough STFT frames" in str(w.message) for w in caught) else score


# Wideband PESQ's lowest score: P.862.2's MOS-LQO mapping 0.999 + 4 / (1 + exp(-1.3669 d + 3.8224))
# of the raw score d tends to it as d falls (white noise against speech scores about 1.02)
PESQ_FLOOR = 0.999


def pesq_wb(estimate: np.ndarray, reference: np.ndarray, sample_rate: int) -> float:
    """Wideband PESQ (ITU-T P.862.2, MOS-LQO from `PESQ_FLOOR` to 4.64) of 1-D 16 kHz signals,
    through the `pesq` package; NaN where PESQ cannot score: a silent or too short (< 1/4 s)
    reference, no speech found in it, or non-finite samples. An estimate that PESQ fails on where
    the reference alone scores (digital silence, levels so low or absurd that pesq finds nothing
    or raises: a silent or diverged codec) scores `PESQ_FLOOR`, not NaN, which a mean would leave
    out: a codec that silenced its hardest crops scored a higher mean."""
    from pesq import PesqError, pesq

    if sample_rate != 16000:
        raise ValueError(f"wideband PESQ needs 16 kHz audio, got {sample_rate} Hz")
    if not (np.isfinite(reference).all() and np.isfinite(estimate).all()) or silent(reference):
        return float("nan")
    reference = reference.astype(np.float32)
    try:
        return float(pesq(sample_rate, reference, estimate.astype(np.float32), "wb"))
    except (PesqError, ValueError):  # pesq's own errors (too short, no utterance detected), and the
        pass                         # ValueError its C code raises on a silent or absurd estimate
    try:  # whose fault: the reference scored against itself tells
        pesq(sample_rate, reference, reference, "wb")
    except (PesqError, ValueError):
        return float("nan")
    return PESQ_FLOOR


DNSMOS_SECONDS = 9.01  # the DNSMOS models' input length


class DNSMOS:
    """Non-intrusive MOS estimate (DNSMOS P.835, Reddy et al. 2022) of one 16 kHz signal, from the
    ONNX models that the `speechmos` wheel ships (it needs onnxruntime and librosa). `__call__`
    returns the overall-quality score OVRL (1 to 5) of a clip, tiled cyclically to the models'
    9.01 s input, as DNSMOS pads short clips, so that each clip is scored once; NaN for silence.
    """

    def __init__(self):
        from speechmos import dnsmos

        folder = os.path.join(os.path.dirname(dnsmos.__file__), "dnsmos_models")
        self.model = dnsmos.DNSMOS(os.path.join(folder, "sig_bak_ovr.onnx"), os.path.join(folder, "model_v8.onnx"))

    def __call__(self, audio: np.ndarray, sample_rate: int) -> float:
        if sample_rate != 16000:
            raise ValueError(f"DNSMOS needs 16 kHz audio, got {sample_rate} Hz")
        if not np.any(audio):
            return float("nan")
        clip = np.resize(np.clip(audio, -1, 1).astype(np.float32), int(DNSMOS_SECONDS * sample_rate))
        return float(self.model(clip, sample_rate, False)["ovrl_mos"])
