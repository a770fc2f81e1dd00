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
