"""Token sampling (temperature, top-p, min-p) and mixture sampling (mixture and Gaussian temps)."""
import math

import pytest
import torch

from model.sampling import SamplingParams, filter_probs, sample_latent, sample_token


def test_temperature_zero_is_greedy():
    logits = torch.randn(4, 100)
    assert torch.equal(sample_token(logits, temperature=0), logits.argmax(-1))


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_probs(probs, top_p=0.8)
    assert torch.equal(kept > 0, torch.tensor([[True, True, False, False]]))
    kept = filter_probs(probs, top_p=0.81)
    assert torch.equal(kept > 0, torch.tensor([[True, True, True, False]]))


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03]])
    assert torch.equal(filter_probs(probs, min_p=0.1) > 0, torch.tensor([[True, True, True, False]]))


def test_samples_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_token(logits, temperature=1.0, top_p=0.8, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.02


def test_same_seed_same_tokens():
    logits = torch.randn(3, 32768)
    a = sample_token(logits, 0.8, 0.95, 0.05, torch.Generator().manual_seed(7))
    b = sample_token(logits, 0.8, 0.95, 0.05, torch.Generator().manual_seed(7))
    c = sample_token(logits, 0.8, 0.95, 0.05, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mixture_sampling():
    B, K, Z = 5000, 3, 4
    locs = torch.arange(K, dtype=torch.float32).view(1, K, 1).expand(B, K, Z) * 10
    scales = torch.ones(B, K, Z)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(B, K)
    g = torch.Generator().manual_seed(0)
    # Gaussian temperature 0: exactly a component's mean; mixture temperature 0: the likeliest.
    x = sample_latent(locs, scales, logits, mixture_temp=0.0, gaussian_temp=0.0)
    assert torch.equal(x, torch.zeros(B, Z))
    x = sample_latent(locs, scales, logits, mixture_temp=1.0, gaussian_temp=0.0, generator=g)
    comp = (x[:, 0] / 10).round().long()
    freq = torch.bincount(comp, minlength=K).float() / B
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    x = sample_latent(locs, scales, logits, mixture_temp=0.0, gaussian_temp=0.5, generator=g)
    assert abs(x.std().item() - 0.5) < 0.03


@pytest.mark.parametrize("bad", [{"token_temp": math.nan}, {"gaussian_temp": math.inf}, {"top_p": 0},
                                 {"mixture_temp": -1}, {"min_p": 2}])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


# --- per-row sampling with explicit counter-based noise (the engines') ------------------------

from model.sampling import RowParams, StepNoise, counter_uniform, sample_latents, sample_tokens  # noqa: E402


def test_counter_noise_is_a_pure_function_of_seed_and_counter():
    seed, counter = torch.tensor([0, 1, 2 ** 40 + 3]), torch.tensor([0, 5, 5])
    u = counter_uniform(seed, counter, 1, 50000)
    assert torch.equal(u, counter_uniform(seed, counter, 1, 50000))
    assert torch.equal(u[1:2], counter_uniform(seed[1:2], counter[1:2], 1, 50000))  # rows do not interact
    assert not torch.equal(u[1], counter_uniform(seed[1:2], counter[1:2] + 1, 1, 50000)[0])
    assert not torch.equal(u[1], counter_uniform(seed[1:2], counter[1:2], 2, 50000)[0])
    assert 0 < u.min() and u.max() < 1
    assert (u.mean(1) - 0.5).abs().max() < 0.01 and (u.var(1) - 1 / 12).abs().max() < 0.002
    hist = torch.stack([torch.histc(r, 20, 0, 1) for r in u])
    assert ((hist - 2500) ** 2 / 2500).sum(1).max() < 60  # chi-square, 19 degrees of freedom
    noise = StepNoise.draw(seed, counter, 2, 32)
    assert noise.token.shape == (3, 2) and noise.gaussian.shape == (3, 2, 32) and noise.posterior.shape == (3, 32)


def rows(n, **values):
    p = RowParams.make(n)
    for k, v in values.items():
        getattr(p, k).copy_(torch.as_tensor(v, dtype=torch.float32))
    return p


def test_row_sampling_follows_each_rows_parameters():
    N = 20000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(N, 1, 4)
    u = counter_uniform(torch.arange(N), torch.zeros(N, dtype=torch.long), 1, 1).view(N, 1)
    for values, expected in [({"token_temp": 1.0}, probs),
                             ({"token_temp": 1.0, "top_p": 0.8}, torch.tensor([0.625, 0.375, 0, 0])),
                             ({"token_temp": 1.0, "min_p": 0.2}, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95),
                             ({"token_temp": 0.0}, torch.tensor([1.0, 0, 0, 0]))]:
        draws = sample_tokens(logits, u, rows(N, **{k: [v] * N for k, v in values.items()}))[:, 0]
        freq = torch.bincount(draws, minlength=4).float() / N
        assert (freq - expected).abs().max() < 0.015, (values, freq)
    # different rows, different parameters, in one call
    mixed = rows(2, token_temp=[0.0, 1.0], top_p=[1.0, 0.5])
    out = sample_tokens(logits[:2], torch.tensor([[0.99], [0.99]]), mixed)
    assert out[:, 0].tolist() == [0, 0]


def test_row_latent_sampling():
    N, K, Z = 6000, 3, 4
    locs = (torch.arange(K, dtype=torch.float32) * 10).view(1, 1, K, 1).expand(N, 1, K, Z)
    scales = torch.ones(N, 1, K, Z)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(N, 1, K)
    noise = StepNoise.draw(torch.arange(N), torch.zeros(N, dtype=torch.long), 1, Z)
    x = sample_latents(locs, scales, logits, noise.mixture, noise.gaussian,
                       rows(N, mixture_temp=[1.0] * N, gaussian_temp=[0.0] * N))
    freq = torch.bincount((x[:, 0, 0] / 10).round().long(), minlength=K).float() / N
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)
    x = sample_latents(locs, scales, logits, noise.mixture, noise.gaussian,
                       rows(N, mixture_temp=[0.0] * N, gaussian_temp=[0.5] * N))
    assert abs(x.std().item() - 0.5) < 0.02 and abs(x.mean().item()) < 0.02


def test_skipping_the_top_p_sort_changes_nothing_when_no_row_uses_it():
    logits = torch.randn(5, 2, 32768) * 3
    u = torch.rand(5, 2)
    p = rows(5, token_temp=[0.8, 1.0, 0.0, 0.5, 1.3], min_p=[0.0, 0.1, 0.0, 0.02, 0.0])
    assert torch.equal(sample_tokens(logits, u, p, top_p=True), sample_tokens(logits, u, p, top_p=False))
