"""Token sampling (temperature, top-p, min-p) and mixture sampling (mixture and Gaussian temps), per
row, with counter-based noise (the engines' API)."""
import math

import pytest
import torch

from model.sampling import RowParams, SamplingParams, StepNoise, counter_uniform, sample_latents, sample_tokens


def rows(n, **values):
    p = RowParams.make(n)
    for k, v in values.items():
        getattr(p, k).copy_(torch.as_tensor(v, dtype=torch.float32))
    return p


def drawable(probs, n=2000, **values):
    """The set of tokens `sample_tokens` draws from `probs` over a fine grid of uniforms."""
    u = ((torch.arange(n) + 0.5) / n).view(n, 1)
    logits = probs.log().expand(n, 1, len(probs))
    return set(sample_tokens(logits, u, rows(n, **{k: [v] * n for k, v in values.items()}))[:, 0].tolist())


def test_temperature_zero_is_greedy():
    logits = torch.randn(4, 2, 100)
    assert torch.equal(sample_tokens(logits, torch.rand(4, 2), rows(4, token_temp=[0.0] * 4)), logits.argmax(-1))


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert drawable(probs, token_temp=1.0, top_p=0.8) == {0, 1}
    assert drawable(probs, token_temp=1.0, top_p=0.81) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    assert drawable(probs, token_temp=1.0, min_p=0.1) == {0, 1, 2}
    assert drawable(probs, token_temp=1.0) == {0, 1, 2, 3}


def test_same_seed_same_tokens():
    logits = torch.randn(3, 2, 32768)
    p = rows(3, top_p=[0.95] * 3, min_p=[0.05] * 3)

    def draw(seed):
        return sample_tokens(logits, StepNoise.draw(torch.full((3,), seed), torch.zeros(3, dtype=torch.long), 2, 32).token, p)
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))


def test_greedy_mixture_sampling_is_the_likeliest_mean():
    B, K, Z = 50, 3, 4
    locs = (torch.arange(K, dtype=torch.float32) * 10 - 10).view(1, 1, K, 1).expand(B, 1, K, Z)
    logits = torch.log(torch.tensor([0.2, 0.7, 0.1])).expand(B, 1, K)
    noise = StepNoise.draw(torch.arange(B), torch.zeros(B, dtype=torch.long), 1, Z)
    x = sample_latents(locs, torch.ones(B, 1, K, Z), logits, noise.mixture, noise.gaussian,
                       rows(B, mixture_temp=[0.0] * B, gaussian_temp=[0.0] * B))
    assert torch.equal(x, torch.zeros(B, 1, Z))


@pytest.mark.parametrize("bad", [{"token_temp": math.nan}, {"gaussian_temp": math.inf}, {"top_p": 0},
                                 {"mixture_temp": -1}, {"min_p": 2}, {"token_temp": "0.5"}])
def test_invalid_params_are_rejected_when_made(bad):
    """A value outside its range is a ValueError naming the field where the SamplingParams is made
    (or `dataclasses.replace`d), not where it is used: it was made, and a NaN temperature reached
    `RowParams.make`'s tensors unchecked."""
    import dataclasses
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SamplingParams(**bad)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        dataclasses.replace(SamplingParams(), **bad)


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


# Seeds and counters over the whole int64 range (negative ones too), and sizes around the kernel's
# block: the kernel's uniforms against the torch version's, bit for bit.
NOISE_CASES = r"""
import json, torch
from model import sampling, sampling_kernels

def noise_cases(device):
    seed = torch.tensor([0, 1, 2 ** 40 + 3, 2 ** 63 - 1, -5, -2 ** 63, 123456789012345], device=device)
    counter = torch.tensor([0, 5, 2 ** 33 + 7, 2 ** 63 - 1, 3, -1, 77], device=device)
    out = []
    for stream, n in [(1, 1), (1, 196), (2, 256), (1, 257), (2, 5000)]:
        ref = sampling.counter_uniform(seed.cpu(), counter.cpu(), stream, n)  # the torch version
        got = sampling_kernels.counter_uniform(seed, counter, stream, n).cpu()
        out.append(dict(n=n, shape=list(got.shape), equal=bool(torch.equal(got, ref))))
    if seed.is_cuda:  # a step's noise as the engines draw it, with the kernel and without, on CUDA
        a = sampling.StepNoise.draw(seed, counter, 2, 32)  # (log and cos round as they do on this device)
        try:
            sampling.NOISE_KERNEL = False
            b = sampling.StepNoise.draw(seed, counter, 2, 32)
        finally:
            sampling.NOISE_KERNEL = True
        out.append(dict(n="step", equal=all(torch.equal(getattr(a, f), getattr(b, f))
                                            for f in ("token", "mixture", "gaussian", "posterior"))))
    return out
"""


def check_noise_cases(cases, cuda=False):
    assert len(cases) == 5 + cuda
    for c in cases:
        assert c["equal"], c
        if c["n"] != "step":
            assert c["shape"] == [7, c["n"]]


def test_noise_kernel_equals_the_torch_noise_bit_for_bit_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernel's interpreter")
    from triton_interpreter import run_cases
    check_noise_cases(run_cases(NOISE_CASES, "noise_cases", "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_kernel_equals_the_torch_noise_bit_for_bit_on_cuda():
    from triton_interpreter import run_cases
    check_noise_cases(run_cases(NOISE_CASES, "noise_cases", "cuda"), cuda=True)


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
