"""Feeding latents one at a time through the preallocated KV cache gives the full-sequence
forward's outputs, for the LM and the resynthesizer, mono and duplex (float32)."""
import dataclasses

import pytest
import torch

from config.transformer_config import PRESETS
from model import HertzDev, build, plex_codes

from reference import rel_err

TOL = 1e-5


def model(duplex, kv_heads=None):
    cfg = dataclasses.replace(PRESETS["tiny"], duplex=duplex, lm_kv_heads=kv_heads, resynth_kv_heads=kv_heads or 4)
    torch.manual_seed(0)
    return build(HertzDev, cfg).eval()


def flat(out):
    """A model output (tensor, mixture tuple, or a pair of them) as a list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def cat_steps(steps):
    return [torch.cat(parts, dim=1) for parts in zip(*[flat(s) for s in steps])]


def time_slice(plex, a, b):
    return tuple(p[:, a:b] for p in plex) if isinstance(plex, tuple) else plex[:, a:b]


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
@torch.no_grad()
def test_lm_step_by_step_equals_full_forward(duplex, kv_heads):
    m = model(duplex, kv_heads)
    B, T = 2, 20
    x = torch.randn(B, T, 32 * m.config.channels)
    full = flat(m.lm(x))
    cache = m.lm.make_cache(B, max_len=32)
    steps = [m.lm(x[:, :4], cache, torch.arange(4).expand(B, 4))]  # a prefill, then one at a time
    steps += [m.lm(x[:, t:t + 1], cache, torch.full((B, 1), t)) for t in range(4, T)]
    for got, want in zip(cat_steps(steps), full):
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
@torch.no_grad()
def test_resynthesizer_step_by_step_equals_full_forward(duplex, kv_heads):
    m = model(duplex, kv_heads)
    B, T = 2, 20
    x = torch.randn(B, T, 32 * m.config.channels)
    plex = plex_codes(m.quantizer, x, duplex)
    full = flat(m.resynth(x, plex))
    cache = m.resynth.make_cache(B, max_len=32)
    steps = [m.resynth(x[:, :1], time_slice(plex, 0, 1), cache, torch.zeros(B, 1, dtype=torch.long))]
    steps += [m.resynth(x[:, t:t + 1], time_slice(plex, t, t + 1), cache, torch.full((B, 1), t)) for t in range(1, T)]
    got = cat_steps(steps)
    assert len(got) == len(full) == (6 if duplex else 3)
    for g, w in zip(got, full):
        assert rel_err(g, w) <= TOL


@torch.no_grad()
def test_rows_at_different_positions_are_independent():
    """Batch rows (server sessions) can sit at different positions of their own streams."""
    m = model(True)
    x = torch.randn(2, 12, 64)
    ref0, ref1 = (m.lm(x[i:i + 1])[0] for i in range(2))
    cache = m.lm.make_cache(2, max_len=16)
    # Row 1 starts 5 steps later than row 0; at each step both rows are fed together.
    m.lm(x[:1, :5], m.lm.make_cache(1, 16), torch.arange(5)[None])  # unrelated cache: no effect
    out0, out1 = [], []
    for step in range(12 + 5):
        t0, t1 = min(step, 11), max(step - 5, 0)
        lat = torch.stack([x[0, t0], x[1, t1]])[:, None]
        logits = m.lm(lat, cache, torch.tensor([[t0], [t1]]))[0]
        if step < 12:
            out0.append(logits[0])
        if step >= 5:
            out1.append(logits[1])
    assert rel_err(torch.cat(out0), ref0[0]) <= TOL
    assert rel_err(torch.cat(out1), ref1[0]) <= TOL


def test_cache_is_preallocated_and_written_in_place():
    m = model(False)
    cache = m.lm.make_cache(1, max_len=16)
    k_ptr = cache.k.data_ptr()
    with torch.no_grad():
        for t in range(16):
            m.lm(torch.randn(1, 1, 32), cache, torch.tensor([[t]]))
    assert cache.k.data_ptr() == k_ptr and cache.k.shape[3] == 16
    assert bool((cache.k[:, :, :, 15] != 0).any())
