"""What the codec's validation metrics give for known degradations of the validation crops, to read
a codec's PESQ, STOI and SI-SDR against (CPU, about a minute for 49 crops of 6 s):

    python benchmarks/metric_references.py                          # data/demo/val, 6 s crops
    python benchmarks/metric_references.py --val data/demo/val --crops 16 --seconds 6

Each reference is one JSON line with the mean of each metric over the crops (the trainer's own
metric functions, `model/codec_losses.py`, on the trainer's validation crops):
- `identity`: the crop itself;
- `noise_snr{40,30,20,10}`: white noise added at that signal-to-noise ratio over the real samples;
- `pause_noise_{40,30}db`: white noise only in the pauses (the 20 ms frames more than 50 dB below the
  crop's level, digital silence in synthetic voices), at 40 or 30 dB below the crop's level: what
  a codec's noise floor costs where the reference is silent;
- `lowpass_{4,2}khz`: the spectrum above that frequency removed (STFT, 1024-sample window);
- `griffin_lim_{n}`: the crop's STFT magnitude exactly (1024-sample window, hop 256) with its phase
  discarded and rebuilt by n Griffin-Lim iterations: a reconstruction perfect in magnitude at
  that resolution, whose phase is only self-consistent (what a codec that matches spectra, but not
  waveforms, approaches);
- `random_phase`: the same magnitude with a random phase, without iterations.

With `--codec PATH` (one of our codec files, e.g. a run's best.safetensors), what in the codec's
reconstruction (the posterior mean decoded, as the trainer validates) costs each metric, by
replacing one part of it with the reference's (STFTs of 1024 samples):
- `codec`: the reconstruction itself (the trainer's validation figures, up to the crops' padding);
- `codec_lowpass_4khz`: the reconstruction without its spectrum above 4 kHz;
- `codec_below_4khz_ref_above` / `ref_below_4khz_codec_above`: the reconstruction in one band and
  the reference in the other: which band's errors cost the most;
- `codec_magnitude_ref_phase` / `ref_magnitude_codec_phase`: the reconstruction's STFT magnitude
  with the reference's phase, and the other way round: magnitude errors against phase errors;
- `codec_pauses_silent`: the reconstruction with the reference's pauses (as `pause_noise_*`) made
  silent: what its noise floor where the reference is silent costs.
    python benchmarks/metric_references.py --codec checkpoints/codec/best.safetensors --crops 49
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser  # noqa: E402
from config.codec_config import small_fast  # noqa: E402
from model.codec_losses import MultiResolutionMelLoss, pesq_wb, si_sdr, stoi  # noqa: E402
from model.data import AudioCropDataset  # noqa: E402

SR, N_FFT, HOP = 16000, 1024, 256


def _stft(x: torch.Tensor) -> torch.Tensor:
    return torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, dtype=x.dtype), return_complex=True)


def _istft(spec: torch.Tensor, n: int) -> torch.Tensor:
    return torch.istft(spec, N_FFT, HOP, window=torch.hann_window(N_FFT, dtype=torch.float64), length=n)


def griffin_lim(x: torch.Tensor, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """x's STFT magnitude with a phase rebuilt by `iterations` Griffin-Lim steps from a random one."""
    mag = _stft(x).abs()
    phase = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=gen, dtype=torch.float64))
    y = _istft(mag * phase, x.shape[-1])
    for _ in range(iterations):
        y = _istft(mag * torch.exp(1j * torch.angle(_stft(y))), x.shape[-1])
    return y


def lowpass(x: torch.Tensor, hz: float) -> torch.Tensor:
    spec = _stft(x)
    spec[..., int(hz / (SR / 2) * (N_FFT // 2)) + 1:, :] = 0
    return _istft(spec, x.shape[-1])


def noisy(x: torch.Tensor, snr_db: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x + noise * (x.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() / 10 ** (snr_db / 20))


def pauses(x: torch.Tensor, frame: int = 320) -> torch.Tensor:
    """x's samples in its pauses: its 20 ms frames more than 50 dB below its level (a bool mask)."""
    frames = x[: x.shape[-1] // frame * frame].view(-1, frame).pow(2).mean(-1)
    quiet = (frames < x.pow(2).mean() * 10 ** (-50 / 10)).repeat_interleave(frame)
    return torch.cat([quiet, quiet.new_zeros(x.shape[-1] - quiet.shape[-1])])


def pause_noise(x: torch.Tensor, below_db: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64) * (x.pow(2).mean().sqrt() * 10 ** (-below_db / 20))
    return x + noise * pauses(x)


def band_mix(low: torch.Tensor, high: torch.Tensor, hz: float) -> torch.Tensor:
    """`low`'s spectrum up to `hz` and `high`'s above it."""
    a, b = _stft(low), _stft(high)
    a[..., int(hz / (SR / 2) * (N_FFT // 2)) + 1:, :] = b[..., int(hz / (SR / 2) * (N_FFT // 2)) + 1:, :]
    return _istft(a, low.shape[-1])


def magnitude_phase(magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """`magnitude`'s STFT magnitude with `phase`'s STFT phase."""
    return _istft(_stft(magnitude).abs() * torch.exp(1j * torch.angle(_stft(phase))), magnitude.shape[-1])


def pauses_silent(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y` made silent in `x`'s pauses."""
    return y * ~pauses(x)


def reconstructions(codec, data: AudioCropDataset) -> list[torch.Tensor]:
    """The codec's posterior-mean reconstruction of each crop with audio (float64, its length)."""
    codec.eval()
    out = []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            n = int(item["mask"].sum())
            if n:
                mu, _ = codec.encode(item["audio"][None])
                out.append(codec.decode(mu)[0, 0, :n].double())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=os.path.expanduser, default="data/demo/val", help="validation folder or manifest (as val_data_path)")
    ap.add_argument("--crops", type=int, default=64, help="at most this many crops (as val_crops)")
    ap.add_argument("--seconds", type=float, default=6.0, help="crop length (as val_segment_seconds)")
    ap.add_argument("--iterations", type=int, nargs="*", default=[32, 256], help="Griffin-Lim iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", type=os.path.expanduser, help="also score what in this codec's reconstructions costs each metric")
    args = ap.parse_args(argv)
    if not os.path.exists(args.val):
        sys.exit(f"error: no validation data at {args.val} (make it with: python data/demo/prepare.py)")
    if args.codec and not os.path.isfile(args.codec):
        sys.exit(f"error: --codec: no file at {args.codec}")
    codec = None
    if args.codec:  # (a file of another kind: one line, before the crops are read)
        from model.loading import LOAD_ERRORS, load_codec
        try:
            codec = load_codec(args.codec)
        except LOAD_ERRORS as e:
            sys.exit(f"error: --codec: {e}")
    try:
        data = AudioCropDataset(args.val, args.seconds, SR, train=False, max_val_crops=args.crops, preload_max_gb=4.0)
    except FileNotFoundError as e:  # the scan's: a file, or a folder without audio it reads
        sys.exit(f"error: --val: {e}")
    crops = []
    for i in range(len(data)):
        item = data[i]
        n = int(item["mask"].sum())
        if n:
            crops.append(item["audio"][0, :n].double())
    gen = torch.Generator().manual_seed(args.seed)
    refs = {"identity": lambda x: x.clone(),
            **{f"noise_snr{s}": (lambda s: lambda x: noisy(x, s, gen))(s) for s in (40, 30, 20, 10)},
            **{f"pause_noise_{d}db": (lambda d: lambda x: pause_noise(x, d, gen))(d) for d in (40, 30)},
            **{f"lowpass_{k}khz": (lambda k: lambda x: lowpass(x, k * 1000))(k) for k in (4, 2)},
            "random_phase": lambda x: griffin_lim(x, 0, gen),
            **{f"griffin_lim_{n}": (lambda n: lambda x: griffin_lim(x, n, gen))(n) for n in args.iterations}}
    if args.codec:
        decoded = dict(zip(map(id, crops), reconstructions(codec, data)))  # crop -> its reconstruction
        refs.update({"codec": lambda x: decoded[id(x)],
                     "codec_lowpass_4khz": lambda x: lowpass(decoded[id(x)], 4000),
                     "codec_below_4khz_ref_above": lambda x: band_mix(decoded[id(x)], x, 4000),
                     "ref_below_4khz_codec_above": lambda x: band_mix(x, decoded[id(x)], 4000),
                     "codec_magnitude_ref_phase": lambda x: magnitude_phase(decoded[id(x)], x),
                     "ref_magnitude_codec_phase": lambda x: magnitude_phase(x, decoded[id(x)]),
                     "codec_pauses_silent": lambda x: pauses_silent(decoded[id(x)], x)})
    mel = MultiResolutionMelLoss(small_fast.mel_windows, small_fast.mel_bins, SR)
    print(json.dumps({"bench": "metric_references", "val": args.val, "crops": len(crops), "seconds": args.seconds,
                      "codec": args.codec}))
    for name, make in refs.items():
        scores = {"mel_distance": [], "si_sdr": [], "stoi": [], "pesq": []}
        for x in crops:
            y = make(x).float()
            xf = x.float()
            scores["mel_distance"].append(mel(y[None, None], xf[None, None]).item())
            scores["si_sdr"].append(si_sdr(y[None], xf[None]).item())
            scores["stoi"].append(stoi(y.numpy(), xf.numpy(), SR))
            scores["pesq"].append(pesq_wb(y.numpy(), xf.numpy(), SR))
        print(json.dumps({"reference": name, **{k: round(float(np.nanmean(v)), 4) for k, v in scores.items()}}),
              flush=True)


if __name__ == "__main__":
    main()
