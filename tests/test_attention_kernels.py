"""The decode step's attention kernel (`model.attention_kernels.decode_attention`): on the CPU in
Triton's interpreter against SDPA (every shape the engines give it: several chunks of a window,
grouped-query heads, a mask per row or broadcast, cache views with the strides of a `KVCache`,
rows that may see one slot only); on CUDA the tiny model's decode steps over a float8 cache with
the kernel against the same steps with SDPA, eager and compiled."""
import dataclasses

import pytest
import torch

from triton_interpreter import interpreted

triton = pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernel's interpreter")

# The interpreter must be switched on before Triton is imported: a process of its own.
INTERPRETED = r"""
import json, torch
import torch.nn.functional as F
from model import attention_kernels as ak
torch.manual_seed(0)
out = []
F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
# B, H, Hkv, W, D, query dtype, cache dtype, per-row mask, TARGET_PROGRAMS (small: many chunks a
# window); the last case's cache is float8, the case the engines use the kernel for
for B, H, Hkv, W, D, dt, kv_dt, per_row, target in [
        (1, 4, 4, 600, 16, F32, F32, False, 512), (3, 8, 2, 300, 32, F32, F32, True, 64),
        (2, 4, 1, 129, 16, F32, F32, True, 8), (2, 4, 4, 64, 16, BF16, BF16, True, 512),
        (2, 2, 2, 40, 64, F32, F32, True, 1), (3, 4, 2, 200, 32, BF16, FP8, True, 256)]:
    ak.TARGET_PROGRAMS = target
    L = W + 37  # a cache longer than the window, one row more than the batch: strided views
    k = torch.randn(B + 1, Hkv, L, D).to(kv_dt)[:B, :, :W]
    v = torch.randn(B + 1, Hkv, L, D).to(kv_dt)[:B, :, :W]
    q = torch.randn(B, H, 1, D, dtype=dt)
    rows = B if per_row else 1
    pos = torch.randint(0, W, (rows,))
    pos[0] = 0  # a row that sees its first slot only
    bias = torch.zeros(rows, 1, 1, W, dtype=dt).masked_fill_(~(torch.arange(W) <= pos[:, None])[:, None, None],
                                                              float("-inf"))
    y = ak.decode_attention(q, k, v, bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(),
                                         enable_gqa=Hkv != H)
    out.append(dict(case=[B, H, Hkv, W, D, str(dt), per_row], kv=str(k.dtype), chunks=-(-W // ak.chunk_length(B * H, W)),
                    shape=list(y.shape), dtype=str(y.dtype), max_abs=float((y.float() - ref).abs().max()),
                    finite=bool(y.isfinite().all())))
print(json.dumps(out))
"""


def test_decode_attention_equals_sdpa_in_the_triton_interpreter():
    cases = interpreted(INTERPRETED)
    assert len(cases) == 6 and cases[-1]["kv"] == "torch.float8_e4m3fn"
    assert max(c["chunks"] for c in cases) >= 8  # the combine of many chunks is exercised
    for c in cases:
        B, H, Hkv, W, D, dt, _ = c["case"]
        assert c["shape"] == [B, H, 1, D] and c["dtype"] == dt and c["finite"], c
        assert c["max_abs"] < (2e-2 if "bfloat16" in dt else 2e-6), c


def test_chunks_aim_at_the_target_number_of_programs():
    from model.attention_kernels import BLOCK_S, TARGET_PROGRAMS, chunk_length
    for rows_heads in (1, 16, 32, 256, 2048):
        for window in (1, 31, 128, 256, 2048, 8192):
            c = chunk_length(rows_heads, window)
            assert c >= BLOCK_S and c & (c - 1) == 0
            chunks = -(-window // c)
            assert chunks * rows_heads <= max(TARGET_PROGRAMS, rows_heads)  # never more programs than aimed at
            assert c == BLOCK_S or 2 * chunks * rows_heads > TARGET_PROGRAMS // 2  # nor far fewer than it allows


def flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in flat(o)]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_duplex_on_cuda(dtype):
    """The tiny duplex model on CUDA in `dtype`, 40 latents of 3 rows and their plex codes."""
    from config.transformer_config import PRESETS
    from model import HertzDev, build, plex_codes
    torch.manual_seed(0)
    m = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=True)).eval().to("cuda", dtype)
    x = torch.randn(3, 40, 64, device="cuda", dtype=dtype)
    return m, x, plex_codes(m.quantizer, x, True)


def decode_outputs(m, x, plex, kv_dtype, block, stagger, marker):
    """The tiny model's LM and resynthesizer outputs of 32 decode steps of 3 rows after an 8-latent
    prefill (row r at step t - stagger[r]), eager or in `block`, and whether a kernel whose name
    holds `marker` ran."""
    kw = {"block": block} if block else {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lc, rc = m.lm.make_cache(3, max_len=64, dtype=kv_dtype), m.resynth.make_cache(3, max_len=64, dtype=kv_dtype)
        out = [m.lm(x[:, :8], lc, torch.arange(8, device="cuda").expand(3, 8))]
        for t in range(8, 40):
            p = (t - torch.tensor(stagger, device="cuda"))[:, None]
            out.append(m.lm(x[:, t:t + 1], lc, p, 64, **kw))
            out.append(m.resynth(x[:, t:t + 1], tuple(c[:, t:t + 1] for c in plex), rc, p, 64, **kw))
    ran = any(marker in e.name for e in prof.events())
    return torch.cat([t.float().flatten() for o in out for t in flat(o)]), ran


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_decode_steps_over_a_float8_cache_use_the_kernel_and_match_sdpa_on_cuda(dtype):
    from model import transformer
    from model.decode import Kernels
    from model.transformer import FP8
    m, x, plex = tiny_duplex_on_cuda(dtype)
    min_slots = transformer.DECODE_KERNEL_MIN_SLOTS

    def steps(kernel, block=None):
        """Whether the kernel ran (for every window size: these caches are small)."""
        transformer.DECODE_KERNEL, transformer.DECODE_KERNEL_MIN_SLOTS = kernel, 0
        try:
            return decode_outputs(m, x, plex, FP8, block, (0, 0, 0), "decode_attention")
        finally:
            transformer.DECODE_KERNEL, transformer.DECODE_KERNEL_MIN_SLOTS = True, min_slots

    ref, ran = steps(False)
    assert not ran
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for block in (None, Kernels.make(("block",)).block):  # eager, and inside the compiled block
        got, ran = steps(True, block)
        assert ran
        assert float((got - ref).norm() / ref.norm()) < tol


# The fused prologue (`decode_prologue`) against the module's own decode path: one attention layer
# (`GQA`) with random norm weights, a cache longer than the window and one row more than the batch
# (strided views), rows at their own positions or all at one; the attention output and every cache
# slot after the write. Interpreted on the CPU (the op is called directly: the module takes it on
# CUDA only), for float32 and bfloat16 and a float8 cache, grouped-query heads, a head count that
# is not a power of two.
PROLOGUE = r"""
import json, torch
from model import attention_kernels as ak, transformer as tr
from model.transformer import GQA, KVCache, Positions, attend_cache
torch.manual_seed(0)
out = []
F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
for B, H, Hkv, D, dt, kv_dt, per_row in [(1, 4, 4, 16, F32, F32, False), (3, 4, 2, 32, F32, F32, True),
                                         (2, 6, 3, 16, F32, F32, True), (3, 4, 2, 16, BF16, BF16, True),
                                         (3, 4, 4, 16, BF16, FP8, True)]:
    W, L = 24, 40
    gqa = GQA(H * D, H, Hkv).to(dt)
    with torch.no_grad():
        gqa.norm_q.weight.uniform_(0.5, 1.5), gqa.norm_k.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, 1, H * D, dtype=dt)
    p = torch.randint(0, W, (B if per_row else 1, 1))
    pos = Positions.make(D, 10000.0, p, W, dt)
    caches = []
    for _ in range(2):
        c = KVCache(1, B + 1, Hkv, L, D, dtype=kv_dt)
        c.k.copy_(torch.randn(c.k.shape).to(kv_dt)), c.v.copy_(torch.randn(c.v.shape).to(kv_dt))
        caches.append(c)
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    ref_layer, layer = caches[0].select(slice(0, B)).layer(0, W), caches[1].select(slice(0, B)).layer(0, W)
    with torch.no_grad():
        ref = gqa(x, pos, ref_layer)
        q = ak.decode_prologue(gqa.proj_qkv(x), gqa.norm_q.weight, gqa.norm_k.weight, gqa.norm_q.eps, pos.cos,
                               pos.sin, pos.input_pos, layer.k, layer.v, H)
        got = gqa.attn_out(attend_cache(q, layer.k, layer.v, pos.mask, Hkv != H).transpose(1, 2).reshape(B, 1, -1))
    cache_err = max(float((a.float() - b.float()).abs().max()) for a, b in ((caches[0].k, caches[1].k),
                                                                             (caches[0].v, caches[1].v)))
    out.append(dict(case=[B, H, Hkv, D, str(dt), str(kv_dt), per_row], q_shape=list(q.shape),
                    rel=float((got.float() - ref.float()).norm() / ref.float().norm()), cache_err=cache_err))
print(json.dumps(out))
"""


@pytest.mark.parametrize("split", [False, True])
def test_decode_prologue_equals_the_modules_decode_path_in_the_triton_interpreter(split):
    """One program a row (the default), or three (`SPLIT_PROLOGUE`: q, k and v side by side)."""
    script = PROLOGUE.replace("torch.manual_seed(0)\n", f"torch.manual_seed(0)\nak.SPLIT_PROLOGUE = {split}\n", 1)
    assert script != PROLOGUE
    cases = interpreted(script)
    assert len(cases) == 5
    for c in cases:
        B, H, Hkv, D, dt, kv, _ = c["case"]
        assert c["q_shape"] == [B, H, 1, D], c
        f32 = "float32" in dt
        assert c["rel"] < (1e-5 if f32 else 2e-2), c  # the attention output, through the cache
        # every slot equal, the written ones included (float32: to rounding; bf16 / float8: a unit
        # of the last place of the cache's dtype at most)
        assert c["cache_err"] < (1e-5 if f32 else 0.07 if "float8" not in kv else 0.26), c


@cuda
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@torch.no_grad()
def test_decode_steps_with_the_fused_prologue_match_the_unfused_ones_on_cuda(kv_dtype, split):
    """The tiny duplex model's LM and resynthesizer decode steps (bf16) with FUSED_PROLOGUE (one
    program a row, or three with SPLIT_PROLOGUE) against the same steps without it, eager and
    inside the compiled block: the same outputs to bf16 rounding, and the prologue ran."""
    from model import attention_kernels, transformer
    from model.decode import Kernels
    m, x, plex = tiny_duplex_on_cuda(torch.bfloat16)
    dtype = transformer.kv_dtype_of(kv_dtype)

    def steps(fused, block=None):
        default, transformer.FUSED_PROLOGUE = transformer.FUSED_PROLOGUE, fused
        attention_kernels.SPLIT_PROLOGUE = split
        try:  # rows at their own positions
            return decode_outputs(m, x, plex, dtype, block, (0, 3, 7), "decode_prologue")
        finally:
            transformer.FUSED_PROLOGUE, attention_kernels.SPLIT_PROLOGUE = default, False

    ref, ran = steps(False)
    assert not ran
    for block in (None, Kernels.make(("block",)).block):  # eager, and inside the compiled block
        got, ran = steps(True, block)
        assert ran
        assert float((got - ref).norm() / ref.norm()) < 3e-2


@cuda
@torch.no_grad()
def test_decode_steps_over_a_float8_cache_take_the_torch_paths_where_triton_has_no_float8_on_cuda():
    """On a GPU below compute capability 8.9 (A100, RTX 30xx, T4...) Triton cannot compile float8
    loads and stores: decode steps over a float8 cache must then run neither the fused prologue nor
    the decode-attention kernel, and give what those kernels give. Simulated here by reporting this
    GPU as such (`model.transformer._FP8_KERNELS`), eager and inside the compiled block."""
    from model import transformer
    from model.decode import Kernels
    m, x, plex = tiny_duplex_on_cuda(torch.bfloat16)
    index, min_slots = torch.cuda.current_device(), transformer.DECODE_KERNEL_MIN_SLOTS
    transformer.DECODE_KERNEL_MIN_SLOTS = 0
    try:
        want, ran = decode_outputs(m, x, plex, transformer.FP8, None, (0, 3, 7), "decode_")
        assert ran and transformer.fp8_kernels_on(torch.device("cuda", index))  # this GPU: the kernels
        for block in (None, Kernels.make(("block",)).block):
            torch._dynamo.reset()
            transformer._FP8_KERNELS[index] = False
            try:
                got, ran = decode_outputs(m, x, plex, transformer.FP8, block, (0, 3, 7), "decode_")
            finally:
                transformer._FP8_KERNELS.pop(index)
            assert not ran  # neither decode_prologue nor decode_attention
            assert float((got - want).norm() / want.norm()) < 3e-2
    finally:
        transformer.DECODE_KERNEL_MIN_SLOTS = min_slots
        torch._dynamo.reset()
