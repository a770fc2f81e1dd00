"""The codec recipe's losses, metrics and discriminators on small tensors, and the perceptual
metrics on real speech from the demo corpus."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from config.codec_config import PRESETS
from model.codec_losses import (DNSMOS, MelSpectrogram, MultiResolutionMelLoss, MultiResolutionSTFTLoss,
                                discriminator_loss, feature_matching_loss, generator_adversarial_loss, hz_to_mel,
                                kl_bits_per_second, latent_kl, mel_filterbank, mel_to_hz, pesq_wb, si_sdr, stoi,
                                waveform_l1)
from model.discriminators import Discriminators, PeriodDiscriminator, STFTDiscriminator

SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A few seconds of real (synthetic) speech: the first validation monologue of a demo corpus."""
    pytest.importorskip("espeakng_loader", reason="the demo corpus needs `pip install espeakng-loader`")
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "demo", "prepare.py"), "--minutes", "0.3",
                    "--out", str(out), "--engines", "espeak"], check=True, capture_output=True, timeout=120)
    audio, rate = sf.read(str(sorted(out.glob("val/mono/*.wav"))[0]), dtype="float32")
    assert rate == SR and len(audio) > 2 * SR
    return audio


def noisy(audio, snr_db, seed=0):
    noise = np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32)
    return audio + noise * np.sqrt(np.mean(audio ** 2) / 10 ** (snr_db / 10))


def tone(freq, n=SR, batch=1):
    t = torch.arange(n) / SR
    return (0.3 * torch.sin(2 * math.pi * freq * t)).expand(batch, 1, n).clone()  # (B, 1, N)


def test_slaney_mel_scale_and_filterbank():
    # librosa's reference points: 1 kHz is mel 15, the scale is linear below it
    assert hz_to_mel(torch.tensor([0.0, 500.0, 1000.0])).tolist() == pytest.approx([0.0, 7.5, 15.0])
    f = torch.tensor([100.0, 999.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f)
    for window, bins in zip(PRESETS["hertz_dev"].mel_windows, PRESETS["hertz_dev"].mel_bins):
        fb = mel_filterbank(window, bins, SR)
        assert fb.shape == (bins, window // 2 + 1) and (fb >= 0).all()
        assert (fb.sum(1) > 0).all()  # no empty band at any of the recipe's resolutions
    # a pure tone lights up the band around its frequency
    mel = MelSpectrogram(1024, 80, SR)
    spec = mel(tone(1000.0))[0].mean(-1)
    centre = mel_to_hz(torch.linspace(0, hz_to_mel(torch.tensor(8000.0)).item(), 82))[1:-1]
    assert abs(centre[spec.argmax()].item() - 1000.0) < 60


@pytest.mark.parametrize("window,bins", list(zip(PRESETS["hertz_dev"].mel_windows, PRESETS["hertz_dev"].mel_bins))
                         + [(400, 80), (512, 64)])
def test_mel_filterbank_matches_librosa(window, bins):
    """Our filterbank against librosa's `filters.mel` with its defaults (htk=False, norm="slaney"),
    which is what the docstring claims, at every resolution of the recipe."""
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(window, bins, SR).double().numpy()
    ref = librosa.filters.mel(sr=SR, n_fft=window, n_mels=bins, fmin=0.0, fmax=SR / 2, htk=False, norm="slaney",
                              dtype=np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7 * ref.max())


def test_mel_loss_is_zero_for_equal_signals_and_ignores_padding():
    loss = MultiResolutionMelLoss((64, 256, 1024), (10, 40, 80), SR)
    x = tone(440.0, batch=2)
    assert loss(x, x).item() == 0.0
    assert loss(x, tone(660.0, batch=2)).item() > 1.0
    # whatever a model outputs on the padding is ignored once both signals are masked
    mask = torch.ones(2, SR)
    mask[:, SR // 2:] = 0
    y = x.clone()
    y[..., SR // 2:] = torch.randn(2, 1, SR // 2)
    assert loss(y * mask[:, None], x * mask[:, None], mask).item() == pytest.approx(0.0, abs=1e-6)
    # padded frames are left out of the mean: half a clip of error weighs as much as a whole one
    z = x + 0.05 * torch.randn_like(x)
    half = loss(z * mask[:, None], x * mask[:, None], mask, per_item=True)
    assert half.shape == (2,)
    assert half.mean().item() == pytest.approx(loss(z[..., :SR // 2], x[..., :SR // 2]).item(), rel=0.1)


def test_phase_aware_terms_see_what_the_mel_loss_cannot():
    """A polarity flip leaves every magnitude spectrum as it was (mel loss 0), while the waveform
    L1 and the complex-STFT loss see it (|X - (-X)| / |X| = 2 at each resolution); both are 0 for
    equal signals and leave the padding out."""
    mel, spec = MultiResolutionMelLoss((64, 256), (10, 40), SR), MultiResolutionSTFTLoss((64, 256, 1024))
    x = tone(440.0, batch=2)
    assert mel(-x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert spec(x, x).item() == 0.0 and waveform_l1(x, x).item() == 0.0
    assert spec(-x, x).item() == pytest.approx(6.0, rel=1e-3)
    assert waveform_l1(-x, x).item() == pytest.approx(2 * x.abs().mean().item(), rel=1e-5)
    mask = torch.ones(2, SR)
    mask[:, SR // 2:] = 0
    y = x.clone()
    y[..., SR // 2:] = torch.randn(2, 1, SR // 2)
    assert waveform_l1(y * mask[:, None], x * mask[:, None], mask).item() == 0.0
    assert spec(y * mask[:, None], x * mask[:, None], mask).item() < 0.02  # only frames straddling the edge


def test_log_magnitude_term_sees_the_harmonics_a_mel_band_averages_and_not_the_phase():
    """The log-magnitude STFT term: 0 for equal signals and blind to phase (a polarity flip), like
    the mel loss; log10(2) in every bin for a signal twice as loud, at each window; and, unlike the
    mel loss, it sees a voice's harmonics moved within one mel band at a large window: a 200 Hz
    pitch against 210 Hz, whose harmonics share the mel bands below 1 kHz (40 bands over 8 kHz at
    256 samples) but not the 2048-sample STFT's 7.8 Hz bins. Padding is left out."""
    logmag = MultiResolutionSTFTLoss((1024, 2048), term="log_magnitude")
    noise = torch.randn(2, 1, SR, generator=torch.Generator().manual_seed(0)) * 0.1
    assert logmag(noise, noise).item() == 0.0
    assert logmag(-noise, noise).item() == pytest.approx(0.0, abs=1e-6)
    assert logmag(2 * noise, noise).item() == pytest.approx(2 * math.log10(2), rel=1e-4)

    def voice(f0):  # harmonics of f0 up to 4 kHz
        t = torch.arange(SR) / SR
        return sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, int(4000 / f0))).reshape(1, 1, SR) * 0.1
    coarse = MultiResolutionMelLoss((256,), (40,), SR)
    a, b = voice(200.0), voice(210.0)
    assert logmag(b, a).item() > 5 * coarse(b, a).item()  # the same bands, other bins
    mask = torch.ones(1, SR)
    mask[:, SR // 2:] = 0
    y = a.clone()
    y[..., SR // 2:] = torch.randn(1, 1, SR // 2)
    assert logmag(y * mask[:, None], a * mask[:, None], mask).item() < 0.05 * logmag(y, a).item()  # only edge frames
    with pytest.raises(ValueError, match="term must be 'complex' or 'log_magnitude'"):
        MultiResolutionSTFTLoss((1024,), term="mel")


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dims and time, averaged over the batch."""
    return torch.mean(-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=(1, 2)))


def test_latent_kl_matches_the_closed_form_kl_and_masks_latents():
    mu, logvar = torch.randn(3, 8, 32), torch.randn(3, 8, 32)
    assert latent_kl(mu, logvar).item() == pytest.approx(kl_divergence(mu, logvar).item() / 8, rel=1e-5)
    assert latent_kl(torch.zeros(2, 4, 32), torch.zeros(2, 4, 32)).item() == 0.0
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    big = torch.zeros(2, 4, 32)
    big[0, 2:] = 100.0  # only on masked latents
    big[1, 1:] = 100.0
    assert latent_kl(big, torch.zeros_like(big), mask).item() == 0.0


def test_kl_bits_per_second_of_a_known_gaussian():
    """KL(N(mu, s^2) || N(0, 1)) = ln(1/s) + (s^2 + mu^2 - 1) / 2 per dimension, by hand."""
    cfg = PRESETS["small"]
    mu, sigma, dims = 1.0, 0.5, cfg.latent_dim
    by_hand = dims * (math.log(1 / sigma) + (sigma ** 2 + mu ** 2 - 1) / 2)  # 26.18 nats per latent
    kl = latent_kl(torch.full((2, 5, dims), mu), torch.full((2, 5, dims), 2 * math.log(sigma)))
    assert kl.item() == pytest.approx(by_hand, rel=1e-6)
    latents_per_second = cfg.sample_rate / math.prod(cfg.strides)
    assert latents_per_second == 8
    assert kl_bits_per_second(kl.item(), latents_per_second) == pytest.approx(by_hand / math.log(2) * 8, rel=1e-6)
    assert kl_bits_per_second(by_hand, 8) == pytest.approx(302.2, abs=0.1)
    assert kl_bits_per_second(0.0, 8) == 0.0  # the prior itself carries no information


def test_adversarial_losses_have_their_stated_values():
    ones, zeros = torch.ones(2, 1, 5), torch.zeros(2, 1, 5)
    real, fake = [(ones, []), (ones, [])], [(zeros, []), (zeros, [])]
    # a perfect discriminator: real -> 1, fake -> 0
    assert discriminator_loss(real, fake, "lsgan").item() == 0.0
    assert generator_adversarial_loss(fake, "lsgan").item() == 2.0  # (1 - 0)^2 per discriminator
    assert discriminator_loss(real, fake, "hinge").item() == 2.0  # relu(1 + 0) per discriminator
    assert generator_adversarial_loss(real, "hinge").item() == 0.0
    with pytest.raises(ValueError, match="lsgan or hinge"):
        discriminator_loss(real, fake, "wasserstein")
    feats = [torch.ones(2, 3), torch.zeros(2, 4)]
    assert feature_matching_loss([(ones, feats)], [(ones, feats)]).item() == 0.0
    shifted = [f + 0.5 for f in feats]
    assert feature_matching_loss([(ones, feats)], [(ones, shifted)]).item() == pytest.approx(1.0)


def test_si_sdr_leaves_out_what_it_cannot_score():
    """SI-SDR of a silent reference (digital silence, a DC offset, one real sample) is the
    estimate's own level, not a fidelity (-45 dB for silence decoded with -80 dBFS hiss), and the
    codec's validation averaged it in, where STOI and PESQ leave such crops out: NaN, as theirs."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, SR)
    x[0] = tone(220.0)[0]
    x[2] = 0.5  # a DC offset only
    x[3, 0, 0] = 0.3  # one real sample (the mask below)
    y = x + 1e-4 * torch.randn(4, 1, SR, generator=g)
    mask = torch.ones(4, SR)
    mask[3, 1:] = 0
    scores = si_sdr(y * mask[:, None], x * mask[:, None], mask)
    assert scores[0] > 60 and scores[1:].isnan().all(), scores
    quiet = 10 ** (-70 / 20) * tone(220.0)  # -80 dBFS, still a signal to score
    assert si_sdr(quiet + 1e-6 * torch.randn(1, 1, SR, generator=g), quiet).item() > 20
    # STOI and PESQ left out digital silence, and scored a DC offset alone (about 0 and 1.6)
    dc = np.full(32000, 0.25)
    assert math.isnan(stoi(dc + 1e-3 * np.random.default_rng(0).standard_normal(32000), dc, SR))
    assert math.isnan(pesq_wb(dc + 1e-3 * np.random.default_rng(0).standard_normal(32000), dc, SR))


def test_si_sdr_and_stoi():
    x = tone(300.0, batch=2) + 0.01 * torch.randn(2, 1, SR)
    noise = torch.randn_like(x)
    noise = noise * x.norm() / noise.norm() / math.sqrt(10)  # 10 dB below the signal
    assert si_sdr(x + noise, x).mean().item() == pytest.approx(10.0, abs=0.5)
    assert si_sdr(3.0 * (x + noise), x).tolist() == pytest.approx(si_sdr(x + noise, x).tolist(), abs=1e-4)
    mask = torch.ones(2, SR)
    mask[:, SR // 2:] = 0
    garbage = x.clone()
    garbage[..., SR // 2:] = torch.randn(2, 1, SR // 2)
    assert (si_sdr(garbage * mask[:, None], x * mask[:, None], mask) > 60).all()  # padding does not count
    rng = np.random.default_rng(0)
    speechy = np.repeat(rng.standard_normal(200), 160) * np.sin(np.linspace(0, 400, 32000))
    assert stoi(speechy, speechy, SR) == pytest.approx(1.0, abs=1e-6)
    assert stoi(rng.standard_normal(32000), speechy, SR) < 0.3
    assert math.isnan(stoi(np.zeros(32000), np.zeros(32000), SR))  # nothing to score
    blip = np.zeros(32000)
    blip[:3000] = speechy[:3000]
    assert math.isnan(stoi(blip, blip, SR))  # too little speech: pystoi would say 1e-5


def test_discriminators_shapes_and_gradients():
    cfg = PRESETS["tiny"]
    d = Discriminators(cfg)
    assert len(d.discriminators) == len(cfg.mpd_periods) + len(cfg.mrd_windows)
    x = tone(200.0, n=8000, batch=2).requires_grad_()
    outputs = d(x)
    for logits, features in outputs:
        assert logits.shape[0] == 2 and len(features) >= 5
    generator_adversarial_loss(outputs).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())
    # HiFi-GAN MPD folds the signal by its period; DAC MRD sees real and imaginary STFT parts
    logits, feats = PeriodDiscriminator(3, (4, 4, 4, 4, 4))(torch.randn(1, 1, 1000))
    assert feats[0].shape[-1] == 3
    logits, feats = STFTDiscriminator(256, channels=4)(torch.randn(1, 1, 4000))
    assert len(feats) == 25 and logits.shape[1] == 1


def narrow_recipe_discriminators(seed: int = 0) -> Discriminators:
    """`small`'s discriminators (its periods and STFT windows, all 108 convolutions), 8x narrower:
    seconds on a CPU."""
    cfg = PRESETS["small"]
    torch.manual_seed(seed)
    d = Discriminators(cfg)
    d.discriminators = torch.nn.ModuleList(
        [PeriodDiscriminator(p, (4, 16, 64, 128, 128)) for p in cfg.mpd_periods] +
        [STFTDiscriminator(w, 4) for w in cfg.mrd_windows])
    return d


def test_judging_real_and_fake_together_equals_two_passes():
    """`Discriminators.judge` (one forward of real audio and the reconstruction together) gives
    the verdicts, features, losses and gradients (into the reconstruction and every parameter) of
    two separate passes, as the trainer's step takes them: the generator's losses into the
    reconstruction only, the discriminators' loss into their parameters only."""
    d = narrow_recipe_discriminators()
    params = list(d.parameters())
    real = tone(220.0, n=6000, batch=3) + 0.05 * torch.randn(3, 1, 6000)
    fake = (0.5 * real + 0.05 * torch.randn(3, 1, 6000)).requires_grad_()

    def step(judge):
        d_real, d_fake = d.judge(real, fake) if judge else (d(real), d(fake))
        gen = generator_adversarial_loss(d_fake) + feature_matching_loss(d_real, d_fake)
        disc = discriminator_loss(d_real, d_fake)
        (into_fake,) = torch.autograd.grad(gen, [fake], retain_graph=True)
        return d_real, d_fake, (gen, disc), [into_fake, *torch.autograd.grad(disc, params)]

    want, got = step(False), step(True)
    for side in (0, 1):  # each discriminator's logits and every feature map, real and fake
        pairs = [(a, b) for (la, fa), (lb, fb) in zip(got[side], want[side]) for a, b in zip([la, *fa], [lb, *fb])]
        assert len(pairs) == len(d.discriminators) + 100
        for a, b in pairs:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in want[3])
    assert len(got[3]) == 1 + len(params) and got[3][0].abs().sum() > 0
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="one shape"):
        d.judge(real, fake[:2])


@pytest.mark.parametrize("autocast", [False, True])
def test_feature_matching_in_multi_tensor_ops_equals_the_loop(autocast):
    """`feature_matching_loss(..., foreach=True)` (torch's multi-tensor ops) gives the loop's loss
    and gradient into the reconstruction, in float32 and with bf16 feature maps (CPU autocast),
    and no gradient into the real features."""
    d = narrow_recipe_discriminators()
    real = tone(220.0, n=6000, batch=2) + 0.05 * torch.randn(2, 1, 6000)
    fake = (0.5 * real + 0.05 * torch.randn(2, 1, 6000)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        d_real, d_fake = d(real), d(fake)
    assert (d_fake[0][1][0].dtype == torch.bfloat16) == autocast
    want = feature_matching_loss(d_real, d_fake)
    got = feature_matching_loss(d_real, d_fake, foreach=True)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    (g_want,) = torch.autograd.grad(want, [fake], retain_graph=True)
    (g_got,) = torch.autograd.grad(got, [fake], retain_graph=True)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-3 if autocast else 1e-5, atol=1e-3 * g_want.abs().max().item())
    real_maps = [f for _, features in d_real for f in features]
    assert all(g is None for g in torch.autograd.grad(got, real_maps, allow_unused=True, retain_graph=True))
    doubled = [(logits, [2 * f for f in features]) for logits, features in d_fake]
    assert feature_matching_loss(d_real, doubled, foreach=True).item() != pytest.approx(got.item(), rel=1e-3)


def test_channels_last_discriminators_give_the_same_verdicts_and_gradients(monkeypatch):
    """The trainer's discriminator layout on CUDA (`Discriminators.use_channels_last`), with the
    recipe's periods and STFT windows (all 108 convolutions of `small`, narrower): the trainer's
    losses on real audio and a reconstruction (weights computed once for both passes, as the
    trainer) and their gradients into the input and every parameter equal those of the contiguous
    layout; every convolution is handed a channels-last input (the period discriminators' first
    convolution sees one channel, ambiguous, and must still put out channels-last), returns a
    channels-last output and gets a channels-last gradient back; the parameters keep their layout."""
    import torch.nn.functional as F
    from torch.nn.utils import parametrize
    d = narrow_recipe_discriminators()
    state = {k: v.clone() for k, v in d.state_dict().items()}
    real = tone(220.0, n=6000, batch=2) + 0.05 * torch.randn(2, 1, 6000)
    fake = (0.5 * real + 0.05 * torch.randn(2, 1, 6000)).requires_grad_()

    def run():
        with parametrize.cached():
            d_real, d_fake = d(real), d(fake)
        gen = generator_adversarial_loss(d_fake) + feature_matching_loss(d_real, d_fake)
        disc = discriminator_loss(d_real, d_fake)
        return (gen, disc), torch.autograd.grad(gen + disc, [fake] + list(d.parameters()))

    want, want_grads = run()
    inputs, outputs, grads, conv2d = [], [], [], F.conv2d

    def recording(x, *args, **kwargs):
        inputs.append(x.is_contiguous(memory_format=torch.channels_last))
        y = conv2d(x, *args, **kwargs)
        outputs.append(y.is_contiguous(memory_format=torch.channels_last) and y.stride()[1] == 1)
        y.register_hook(lambda g: grads.append(g.is_contiguous(memory_format=torch.channels_last)))
        return y

    monkeypatch.setattr(F, "conv2d", recording)
    d.use_channels_last()
    got, got_grads = run()
    n = 2 * 108  # two passes (real, reconstruction)
    assert len(inputs) == n and all(inputs), inputs
    assert len(outputs) == n and all(outputs), outputs
    assert len(grads) == n and all(grads), grads
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in want_grads)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    assert all(torch.equal(d.state_dict()[k], v) for k, v in state.items())
    assert all(p.is_contiguous() for p in d.parameters())


def test_spectra_stay_float32_under_bf16_autocast():
    """On CUDA the recipe runs under bf16 autocast; STFTs, mel projections and the losses must not
    drop to bf16 (checked with CPU autocast, which casts the same matmuls and convolutions)."""
    cfg = PRESETS["tiny"]
    x = tone(300.0, n=8000, batch=2)
    y = x + 0.01 * torch.randn_like(x)
    loss = MultiResolutionMelLoss(cfg.mel_windows, cfg.mel_bins, SR)
    d = Discriminators(cfg)
    want = loss(y, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MelSpectrogram(512, 40, SR)(x).dtype == torch.float32
        got = loss(y, x)
        outputs = d(y)
        kl = latent_kl(torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.randn(2, 4, 32, dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert outputs[0][0].dtype == torch.bfloat16  # the convolutions themselves do run in bf16
    assert kl.dtype == torch.float32


def test_pesq_is_near_its_maximum_on_clean_speech_and_falls_with_noise(speech):
    pytest.importorskip("pesq")
    assert pesq_wb(speech, speech, SR) > 4.5  # wideband PESQ tops out at 4.64
    scores = [pesq_wb(noisy(speech, snr), speech, SR) for snr in (30, 15, 0)]
    assert 4.64 > scores[0] > scores[1] > scores[2] >= 1.0, scores
    assert math.isnan(pesq_wb(speech, np.zeros_like(speech), SR))  # a silent reference
    assert math.isnan(pesq_wb(speech[:1000], speech[:1000], SR))    # too short to score
    with pytest.raises(ValueError, match="16 kHz"):
        pesq_wb(speech, speech, 24000)


def test_a_silent_estimate_of_speech_scores_the_worst_not_nan_or_0_db(speech):
    """A codec that decodes silence where the reference speaks is the worst codec: SI-SDR's 0/0
    scored it 0 dB (above any real codec) and PESQ NaN (left out of the mean), while a perfect
    reconstruction 120 dB too quiet scored 0.02 dB. A silent reference still cannot be scored."""
    pytest.importorskip("pesq")
    x = torch.tensor(speech)[None]  # (1, N)
    silence, dc = torch.zeros_like(x), torch.full_like(x, 0.1)
    noise = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    perfect = si_sdr(x, x).item()
    assert perfect > 90
    assert si_sdr(1e-6 * x, x).item() == pytest.approx(perfect, abs=0.1)  # scale-invariant however quiet
    assert si_sdr(1e-9 * noise, x).item() == pytest.approx(si_sdr(noise, x).item(), abs=0.1)
    assert si_sdr(silence, x).item() == si_sdr(dc, x).item() < si_sdr(noise, x).item() - 20
    assert si_sdr(silence, x).item() == pytest.approx(-perfect, abs=0.1)  # the formula's lower bound
    assert math.isnan(si_sdr(silence, silence).item()) and math.isnan(si_sdr(x * math.inf, x).item())  # not silent
    floor = pesq_wb(np.zeros_like(speech), speech, SR)
    assert floor == pytest.approx(0.999) and floor < pesq_wb(noise[0].numpy(), speech, SR)
    assert pesq_wb(1e-6 * speech, speech, SR) > 4.5
    assert math.isnan(pesq_wb(np.zeros_like(speech), np.zeros_like(speech), SR))
    assert stoi(np.zeros_like(speech), speech, SR) == pytest.approx(0.0, abs=1e-3)


def test_dnsmos_prefers_clean_speech_to_noisy_speech(speech):
    for package in ("speechmos", "onnxruntime", "librosa"):
        pytest.importorskip(package)
    mos = DNSMOS()
    clean, buried = mos(speech, SR), mos(noisy(speech, 0), SR)
    assert 1.0 <= buried < clean <= 5.0, (clean, buried)
    assert math.isnan(mos(np.zeros(SR, np.float32), SR))
