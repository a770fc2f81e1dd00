"""KV caches in float8 (`kv_dtype="fp8"`, model/transformer.py) on a tiny random model, CPU:
cached forwards with an fp8 cache stay close to the float cache's, fp8 entries are stored without
a scale (so each row's entries depend on that row alone: batched live rows still equal the rows
alone), and the cache takes half the bytes of a bf16 one."""
import dataclasses

import pytest
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS
from model import Codec, HertzDev, SamplingParams, build, plex_codes
from model.decode import DecodeState
from model.generator import Generator
from model.live import LiveEngine
from model.transformer import FP8_MAX, KVCache, kv_dtype_of

from reference import rel_err

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: each cached entry is off by up to 2^-4 relative, and the errors of
# the ~W entries an output mixes average out; measured 0.8-3% on these tiny models.
FP8_TOL = 0.05


def model(duplex):
    torch.manual_seed(0)
    return build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=duplex)).eval()


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def cached(m, x, plex, dtype):
    """The LM's and the resynthesizer's outputs step by step (after a 4-frame LM prefill) through
    caches in `dtype`, and the caches."""
    B, T = x.shape[:2]
    lc, rc = m.lm.make_cache(B, max_len=32, dtype=dtype), m.resynth.make_cache(B, max_len=32, dtype=dtype)
    lm = [m.lm(x[:, :4], lc, torch.arange(4).expand(B, 4))]
    lm += [m.lm(x[:, t:t + 1], lc, torch.full((B, 1), t)) for t in range(4, T)]
    sl = (lambda a, b: tuple(p[:, a:b] for p in plex)) if isinstance(plex, tuple) else (lambda a, b: plex[:, a:b])
    rs = [m.resynth(x[:, t:t + 1], sl(t, t + 1), rc, torch.full((B, 1), t)) for t in range(T)]
    cat = lambda steps: [torch.cat(p, dim=1) for p in zip(*map(flat, steps))]  # noqa: E731
    return cat(lm) + cat(rs), lc, rc


@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
@torch.no_grad()
def test_fp8_cache_forward_close_to_float_cache(duplex, one_thread):
    m = model(duplex)
    x = torch.randn(2, 16, 32 * m.config.channels)
    plex = plex_codes(m.quantizer, x, duplex)
    want, _, _ = cached(m, x, plex, torch.float32)
    got, lc, rc = cached(m, x, plex, FP8)
    assert lc.k.dtype == lc.v.dtype == rc.lower.k.dtype == rc.upper.v.dtype == FP8
    # entries well inside e4m3's range: no scale is needed (the module docstring's claim)
    assert max(c.float().abs().max() for c in (lc.k, lc.v, rc.lower.k, rc.lower.v, rc.upper.k, rc.upper.v)) < 32
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert all(0 < e <= FP8_TOL for e in errs), errs


def test_fp8_writes_saturate_instead_of_overflowing():
    c = KVCache(1, 1, 1, 4, 2, dtype=FP8)
    big = torch.tensor([[[[1e4, -1e4]]]])  # (B, T, kv_heads, D)
    k, v = c.layer(0).update(torch.zeros(1, 1, dtype=torch.long), big, big)
    assert k[0, 0, 0].float().tolist() == [FP8_MAX, -FP8_MAX] == v[0, 0, 0].float().tolist()


def test_fp8_cache_takes_half_the_bytes_of_bf16():
    m = model(True).to(torch.bfloat16)
    bf16, fp8 = DecodeState.make(m, 3, 32), DecodeState.make(m, 3, 32, kv_dtype="fp8")
    assert bf16.lm.k.dtype == torch.bfloat16 and fp8.lm.k.dtype == FP8
    assert fp8.kv_bytes * 2 == bf16.kv_bytes > 0
    assert fp8.lm.k.shape == bf16.lm.k.shape and fp8.rs.upper.v.shape == bf16.rs.upper.v.shape
    assert fp8.kv_bytes == sum(t.numel() for t in (fp8.lm.k, fp8.lm.v, fp8.rs.lower.k, fp8.rs.lower.v,
                                                      fp8.rs.upper.k, fp8.rs.upper.v))


def test_kv_dtype_names():
    """Names, and the torch dtypes a cache can hold. int8, bool or float8 e5m2 (unsaturated) made a
    cache that rounded every key and value into its type, and Generator / LiveEngine generated
    from it without an error; now a ValueError naming kv_dtype, before any cache is made."""
    assert kv_dtype_of("auto") is None and kv_dtype_of(None) is None and kv_dtype_of("fp8") == FP8
    assert kv_dtype_of(FP8) == FP8 and kv_dtype_of(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, fp8"):
        kv_dtype_of("int8")
    m = model(False)
    for dtype in (torch.int8, torch.bool, torch.float8_e5m2):
        with pytest.raises(ValueError, match=f"kv_dtype {dtype} is not a dtype a KV cache can hold"):
            Generator(m, batch_size=1, max_len=16, kv_dtype=dtype)


@torch.no_grad()
def test_live_engine_with_fp8_cache_batched_rows_equal_rows_alone(one_thread):
    m = model(True)
    m.codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    g = torch.Generator().manual_seed(1)
    user = torch.randn(6, 2, 2000, generator=g) * 0.1
    params = [SamplingParams(), SamplingParams(token_temp=0.5, mixture_temp=0)]
    batched = LiveEngine(m, max_sessions=2, kv_dtype="fp8")
    assert batched.state.lm.k.dtype == FP8
    for r in range(2):
        batched.reset(r, params[r], seed=10 + r)
    out = torch.stack([batched.step(u) for u in user])
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    for r in range(2):
        alone = LiveEngine(m, max_sessions=1, kv_dtype="fp8")
        alone.reset(0, params[r], seed=10 + r)
        one = torch.stack([alone.step(u[r:r + 1]) for u in user])
        assert (one[:, 0] - out[:, r]).abs().max() <= 1e-5


@torch.no_grad()
def test_generator_with_fp8_cache(one_thread):
    m = model(False)
    prompt = torch.randn(2, 5, 32)
    got = Generator(m, batch_size=2, max_len=32, kv_dtype="fp8").generate(prompt, 6, seed=3)
    assert Generator(m, batch_size=1, max_len=32, kv_dtype="fp8").state.rs.upper.k.dtype == FP8
    assert got.shape == (2, 11, 32) and torch.isfinite(got).all()
    assert torch.equal(got[:, :5], prompt)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_block_with_fp8_cache_and_int8_weights_equals_eager(one_thread):
    """The engines' compiled block (`Kernels.make`, with the coordinate-descent option an int8 model
    turns on) writing and reading an fp8 cache (inductor on the CPU) gives the eager block's output
    and cache contents."""
    from model.decode import Kernels
    from model.quant import quantize_model
    from model.transformer import Block, positions_for

    torch.manual_seed(0)
    block = quantize_model(Block(64, 4, 2), "int8")
    x = torch.randn(2, 3, 64)
    pos = torch.tensor([[0, 1, 2], [4, 5, 6]])
    out = {}
    for name, kernels in (("eager", Kernels()), ("compiled", Kernels.make(("block",)))):
        cache = KVCache(1, 2, 2, 8, 16, dtype=FP8)
        p = positions_for(x, 16, 1e4, cache, pos, window=8)
        out[name] = kernels.block(block, x, p, cache.layer(0, 8)), cache
    (y0, c0), (y1, c1) = out["eager"], out["compiled"]
    assert rel_err(y1, y0) <= 1e-5
    # one fp8 rounding step apart at most where the float values straddle a rounding boundary
    assert (c1.k.float() - c0.k.float()).abs().max() <= 0.125 and c1.k.float().abs().sum() > 0


def test_the_fp8_kernel_probe_is_marked_constant_as_torch_marks_it():
    """model.transformer marks `_fp8_kernels_on` constant for torch.compile itself (torch's decorator
    imports torch._dynamo, seconds at every process start): the mark is the one torch sets."""
    from model import transformer

    def probe():
        return True
    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) and vars(transformer._fp8_kernels_on).items() >= vars(probe).items()
