"""Weight-only int8 / int4 quantization (model/quant.py): the formulas' error bound, quantized
forwards close to the float ones, cached == full forward, save/load round trip in our format,
quantizing while loading official-layout files == quantizing after loading. CPU, tiny sizes;
the CUDA kernels (Triton, in CUDA graphs and under torch.compile) are checked where CUDA exists."""
import copy
import dataclasses
import hashlib
import re

import pytest
import torch

from config.transformer_config import PRESETS
from model import HertzDev, build, hub, load_hertz_dev, plex_codes, save_transformer
from model.checkpoint import read_metadata
from model.hub import OfficialFile
from model.quant import (Int4Linear, Int8Linear, quantization_of, quantization_plan, quantize_int4, quantize_int8,
                         quantize_model, unpack_nibbles, weight_bytes)

from reference import rel_err
from triton_interpreter import interpreter_and_cuda

# Relative error of the outputs against the float model at this size (random weights): int8 is
# about 1.5%, int4 (group 128) about 20%; the bounds leave a margin of about 2x.
TOL = {"int8": 0.03, "int4": 0.4}
CACHE_TOL = 1e-5

# `tiny` at width 128, so the LM and resynthesizer layers have the in_features int4 needs.
CFG = dataclasses.replace(PRESETS["tiny"], lm_dim=128, resynth_dim=128, resynth_ff_dim=256,
                          quantizer_dim=128, quantizer_ff_dim=256)


def float_model(duplex=True):
    torch.manual_seed(0)
    return build(HertzDev, dataclasses.replace(CFG, duplex=duplex)).eval()


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def outputs(m, x, plex):
    """LM logits and resynthesizer mixtures (locs, scales, logits) of both channels, as a list."""
    return flat(m.lm(x)) + flat(m.resynth(x, plex))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_quantized_weights_within_half_a_step(group, dtype):
    """Within half a step of the scales as stored in the model's dtype: the weights are rounded
    against the rounded scale (and zero point), so the rounding of a bfloat16 scale is not added to
    every weight of its row (up to 8 steps x 2^-9 of it, and the zero point's own). A float16 row of
    weights below 7.6e-6, whose int8 scale rounds to 0, is a row of zeros (it was +-127 against a
    zero scale, which no file may hold)."""
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1)  # rows of different magnitudes
    w[1] *= 1e-6
    q, scale = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and scale.dtype == dtype
    s = scale.float()[:, None]
    assert (w - q.float() * s).abs().le(torch.where(s > 0, s / 2, 127 * 6e-8) + 1e-6).all()
    if dtype == torch.float16:
        assert scale[1] == 0 and not q[1].any()
    packed, sz = quantize_int4(w, group, dtype)
    assert packed.shape == (48, 128) and sz.shape == (256 // group, 48, 2) and sz.dtype == dtype
    q4 = unpack_nibbles(packed).float().view(48, -1, group)
    s4, z4 = sz[..., 0].float().t()[..., None], sz[..., 1].float().t()[..., None]
    err = (w.view(48, -1, group) - ((q4 - 8) * s4 + z4)).abs()
    assert err.le(s4 / 2 + 1e-6).all()


def test_plan_int4_falls_back_to_int8_where_the_kernel_does_not_fit():
    m = float_model()
    plan = quantization_plan(m, "int4")
    linears = [n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear]
    assert sorted(plan) == sorted(linears)
    # the quantizer stays int8; 32-wide latent inputs cannot be int4 (in_features % 128 != 0)
    assert all(plan[n] == "int8" for n in plan if n.startswith("quantizer."))
    for n in ("lm.input", "lm.input2", "resynth.io.input_projection", "resynth.io2.input_projection"):
        assert plan[n] == "int8"
    int4 = [n for n in plan if plan[n] == "int4/128"]
    assert "lm.layers.0.attn.attn.proj_qkv" in int4 and "lm.output.output" in int4 and "resynth.plex_projection" in int4
    assert set(quantization_plan(m, "int8").values()) == {"int8"}
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantization_plan(m, "int3")


@torch.no_grad()
def test_quantize_model_refuses_what_it_would_leave_unquantized():
    """Layers it cannot quantize as asked: already quantized otherwise (int8 asked int4, int4 in
    groups of 64 asked 128) and float layers carrying LoRA adapters were skipped without a word
    (the model stayed int8, groups of 64, float under the adapters); now a ValueError naming them.
    Quantized as asked is no change (an int8 checkpoint evaluated with eval_quantize=int8), and so
    is an adapted quantized base (QLoRA)."""
    from model.lora import apply_lora
    int8 = quantize_model(float_model(), "int8")
    with pytest.raises(ValueError, match=r"cannot quantize as int4 in groups of 128: \d+ layers are already "
                                         r"quantized otherwise \(lm\.layers\.0\.attn\.attn\.proj_qkv \(int8, not int4/128\)"):
        quantize_model(int8, "int4")
    with pytest.raises(ValueError, match=r"\(int4/64, not int4/128\)"):
        quantize_model(quantize_model(float_model(), "int4", group_size=64), "int4")
    before = copy.deepcopy(int8.state_dict())
    quantize_model(int8, "int8")
    after = int8.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    adapted = float_model()
    apply_lora(adapted, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"cannot quantize 16 layers that carry LoRA adapters \(lm\.layers\.0\.attn"):
        quantize_model(adapted, "int8")
    apply_lora(int8, rank=4, alpha=8.0)
    assert quantization_of(quantize_model(int8, "int8")) == quantization_of(quantize_model(float_model(), "int8"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantized_forward_close_to_float(mode, one_thread):
    m = float_model()
    x = torch.randn(2, 16, 64)
    plex = plex_codes(m.quantizer, x, True)  # the same codes for both, so the resynthesizer is compared alone
    want = outputs(m, x, plex)
    q = quantize_model(copy.deepcopy(m), mode)
    assert isinstance(q.lm.layers[0].attn.attn.proj_qkv, Int8Linear if mode == "int8" else Int4Linear)
    got = outputs(q, x, plex)
    assert len(got) == len(want) == 8
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= TOL[mode], errs
    assert max(errs) > 0  # the weights did change
    # the quantizer too (int8 in both modes): its projected codes stay close
    assert rel_err(q.quantizer(x[..., :32])[0], m.quantizer(x[..., :32])[0]) <= TOL["int8"] * 3
    sizes, floats = weight_bytes(q), weight_bytes(m)
    # float32 -> int8 is a quarter, int4 an eighth (plus scales, norms, biases and int8 fallbacks)
    assert sizes["lm"] < floats["lm"] * (0.27 if mode == "int8" else 0.16)
    assert sizes["total"] == sizes["quantizer"] + sizes["lm"] + sizes["resynth"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
@torch.no_grad()
def test_cached_equals_full_forward_when_quantized(mode, duplex, one_thread):
    m = quantize_model(float_model(duplex), mode)
    B, T = 2, 12
    x = torch.randn(B, T, 32 * m.config.channels)
    full = flat(m.lm(x))
    cache = m.lm.make_cache(B, max_len=16)
    assert cache.k.dtype == torch.float32  # a quantized layer's `.weight` is its float weight
    steps = [m.lm(x[:, :4], cache, torch.arange(4).expand(B, 4))]
    steps += [m.lm(x[:, t:t + 1], cache, torch.full((B, 1), t)) for t in range(4, T)]
    for got, want in zip([torch.cat(p, 1) for p in zip(*map(flat, steps))], full):
        assert rel_err(got, want) <= CACHE_TOL

    plex = plex_codes(m.quantizer, x, duplex)
    full = flat(m.resynth(x, plex))
    rc = m.resynth.make_cache(B, max_len=16)
    sl = (lambda a, b: tuple(p[:, a:b] for p in plex)) if duplex else (lambda a, b: plex[:, a:b])
    steps = [m.resynth(x[:, t:t + 1], sl(t, t + 1), rc, torch.full((B, 1), t)) for t in range(T)]
    for got, want in zip([torch.cat(p, 1) for p in zip(*map(flat, steps))], full):
        assert rel_err(got, want) <= CACHE_TOL


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantized_save_load_round_trip(mode, tmp_path, one_thread):
    q = quantize_model(float_model(), mode)
    path = save_transformer(tmp_path / "q.safetensors", q)
    recorded = read_metadata(path)["quantization"]
    assert recorded == quantization_of(q) and recorded["mode"] == mode
    floats = save_transformer(tmp_path / "f.safetensors", float_model())
    assert path.stat().st_size < floats.stat().st_size * (0.3 if mode == "int8" else 0.2)

    loaded = load_hertz_dev(path, codec=None)  # no quantize=: the file says how
    assert quantization_of(loaded) == recorded
    x = torch.randn(1, 8, 64)
    plex = plex_codes(q.quantizer, x, True)
    for got, want in zip(outputs(loaded, x, plex), outputs(q, x, plex)):
        assert torch.equal(got, want)
    assert load_hertz_dev(path, codec=None, quantize=mode) is not None
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(ValueError, match=f"holds {mode} weights"):
        load_hertz_dev(path, codec=None, quantize=other)


def retyped(suffix, dtype):
    """A state edit: every tensor whose name ends with `suffix` in `dtype` (bits kept where the size is)."""
    def edit(state):
        for k, v in state.items():
            if k.endswith(suffix):
                state[k] = v.view(dtype) if v.element_size() == dtype.itemsize else v.to(dtype)
        return state
    return edit


@pytest.mark.parametrize("mode, suffix, dtype, message", [
    ("int8", "proj_qkv.qweight", torch.int32, "proj_qkv.qweight int32, not int8"),
    ("int8", "proj_qkv.qweight", torch.float32, "proj_qkv.qweight float32, not int8"),
    ("int8", "proj_qkv.scale", torch.int32, "proj_qkv.scale int32, not a float"),
    ("int4", "proj_qkv.qweight", torch.int8, "proj_qkv.qweight int8, not uint8"),
    ("int4", "proj_qkv.scales_and_zeros", torch.int16, "proj_qkv.scales_and_zeros int16, not a float"),
], ids=["int8-qweight-int32", "int8-qweight-float", "int8-scale-int", "int4-signed-nibbles", "int4-scales-int"])
def test_quantized_tensors_of_the_wrong_dtype_are_refused_from_the_header(mode, suffix, dtype, message, tmp_path,
                                                                          monkeypatch):
    """A quantized file (its hash consistent: another tool wrote it) whose packed weights or scales
    are of another dtype than its layers hold: one CheckpointError naming the file, the part and the
    tensors, found from the header before any weight is read. They loaded silently (`assign=True`
    keeps a buffer's dtype): int32 weights into the int8 kernels, signed nibbles unpacked by an
    arithmetic shift into other weights, integer scales rounded to 0."""
    from test_checkpoint import rewritten
    good = save_transformer(tmp_path / "good.safetensors", quantize_model(float_model(), mode))
    bad = rewritten(good, tmp_path / "bad.safetensors", state=retyped(suffix, dtype))
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError) as e:
        load_hertz_dev(bad, codec=None)
    assert str(e.value).startswith(f"{bad} (lm) does not match the model built from its config: wrong dtypes of 2 "
                                   "tensors (layers.0.") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mode, suffix, edit", [
    ("int8", "proj_qkv.scale", lambda t: t.neg_()),
    ("int8", "proj_qkv.scale", lambda t: t[:3].zero_()),
    ("int4", "proj_qkv.scales_and_zeros", lambda t: t[..., 0].zero_()),
    ("int4", "proj_qkv.scales_and_zeros", lambda t: t[0, :, 0].neg_()),
], ids=["int8-negative", "int8-zero", "int4-zero", "int4-negative"])
def test_quantized_scales_no_quantization_makes_are_refused_unless_not_verified(mode, suffix, edit, tmp_path,
                                                                                 request):
    """Scales that are negative or zero (hash consistent: another tool wrote them) loaded silently
    into a model whose layers' outputs were negated or zero; now a CheckpointError naming the file
    and the layers, which verify=False skips. Rows of zero or tiny weights quantized in float16,
    whose int8 scale rounds to 0, save as zeros and load (a tiny row was refused: its integers were
    not zero)."""
    from test_checkpoint import rewritten

    def edited(state):
        for k in state:
            if k.endswith(suffix):
                edit(state[k])
        return state
    good = save_transformer(tmp_path / "good.safetensors", quantize_model(float_model(), mode))
    bad = rewritten(good, tmp_path / "bad.safetensors", state=edited)
    with pytest.raises(ValueError) as e:
        load_hertz_dev(bad, codec=None)
    assert str(e.value).startswith(f"{bad}: 4 quantized layers hold scales no quantization makes (negative, or zero "
                                   "for weights that are not: lm.layers.0.attn.attn.proj_qkv, ") and "\n" not in str(e.value)
    load_hertz_dev(bad, codec=None, verify=False)
    if request.node.callspec.id != "int8-zero":
        return
    model = float_model().half()
    with torch.no_grad():
        model.lm.layers[0].attn.attn.proj_qkv.weight[0] = 0
        model.lm.layers[0].attn.attn.proj_qkv.weight[1] *= 1e-6  # its scale rounds to 0 in float16 too
    zero_row = save_transformer(tmp_path / "zero-row.safetensors", quantize_model(model, "int8"))
    assert load_hertz_dev(zero_row, codec=None, dtype="float16").lm.layers[0].attn.attn.proj_qkv.scale[:2].eq(0).all()


def official_files(tmp_path, monkeypatch, model):
    """The parts of `model` written as official-layout files (flat float32 state dicts in `.pt`)
    under the names of the duplex variant, registered with their md5s: loadable offline."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    lm, resynth, _ = hub.VARIANTS["duplex"]
    for name, part in ((hub.QUANTIZER, model.quantizer), (lm, model.lm), (resynth, model.resynth)):
        path = folder / f"{name}.pt"
        torch.save(part.state_dict(), path)
        data = path.read_bytes()
        monkeypatch.setitem(hub.OFFICIAL_FILES, name,
                            OfficialFile(name, hashlib.md5(data).hexdigest(), len(data), "test"))
    return folder


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantizing_while_loading_equals_quantizing_after(mode, tmp_path, monkeypatch, one_thread):
    folder = official_files(tmp_path, monkeypatch, float_model())
    kw = dict(ckpt_dir=folder, offline=True, codec=None, config=CFG)
    while_loading = load_hertz_dev("duplex", quantize=mode, **kw)
    after = quantize_model(load_hertz_dev("duplex", **kw), mode)
    assert quantization_of(while_loading) == quantization_of(after) is not None
    a, b = while_loading.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 8, 64)
    plex = plex_codes(after.quantizer, x, True)
    for got, want in zip(outputs(while_loading, x, plex), outputs(after, x, plex)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_quantizing_weights_that_hold_nan_is_an_error_naming_the_layer(mode, tmp_path, monkeypatch):
    """One NaN weight gave its layer NaN scales (int8) or scales and zero points (int4), silently:
    a quantized model that outputs NaN. Now a ValueError naming the layer, from quantize_model and
    from load_hertz_dev(quantize=) of official-layout files (their md5 is all they are checked by)."""
    layer = "lm.layers.0.attn.attn.proj_qkv"  # int4 in groups of 128 at this width
    model = float_model()
    model.get_submodule(layer).weight[5, 7] = float("nan")
    folder = official_files(tmp_path, monkeypatch, model)
    message = (f"{layer}: quantized as {'int8' if mode == 'int8' else 'int4/128'}, its "
               f"{'scales' if mode == 'int8' else 'scales or zero points'} would be NaN or inf (its weights hold NaN "
               "or inf): quantize a model of finite weights")
    with pytest.raises(ValueError, match=re.escape(f"1 layers hold NaN or inf weights ({layer}): quantize a model "
                                                   "of finite weights; nothing was changed")):
        quantize_model(model, mode)
    assert quantization_of(model) is None  # found before any layer was swapped: the float model is intact
    with pytest.raises(ValueError, match=re.escape(message)):
        load_hertz_dev("duplex", quantize=mode, ckpt_dir=folder, offline=True, codec=None, config=CFG)


@torch.no_grad()
def test_quantize_model_arguments_it_cannot_honour_change_nothing():
    """A bare nn.Linear (quantize_model stored its int8 layer under an attribute named '' and
    returned the float layer; the file saved then loaded nowhere) and a group size of 128.0 (it
    passed the check, then failed at the first int4 layer with seven layers already swapped): both
    now a ValueError before anything changes."""
    m = float_model()
    layer = m.lm.layers[0].attn.attn.proj_qkv
    with pytest.raises(ValueError, match="a bare Linear cannot be quantized in place .*quantize the module that holds it"):
        quantize_model(layer, "int8")
    assert dict(layer.named_children()) == {}
    with pytest.raises(ValueError, match=r"int4 group size must be one of \(32, 64, 128, 256\), not 128\.0"):
        quantize_model(m, "int4", group_size=128.0)
    assert quantization_of(m) is None


@torch.no_grad()
def test_a_file_quantized_in_part_is_quantized_whole_when_asked(tmp_path, one_thread):
    """An export of a model whose LM alone was quantized (quantize_model on a part, as documented)
    loaded with quantize="int8" kept the quantizer and resynthesizer float, without a word, while
    complete.py said "int8 weights"; now quantize= quantizes the float layers beside the recorded
    ones, as quantizing the float file would, and without it the file loads as it was saved."""
    m = float_model()
    quantize_model(m.lm, "int8")
    path = save_transformer(tmp_path / "lm-int8.safetensors", m)
    kinds = lambda model: {part: sorted({type(x).__name__ for x in getattr(model, part).modules()
                                         if isinstance(x, (torch.nn.Linear, Int8Linear, Int4Linear))})
                           for part in ("quantizer", "lm", "resynth")}
    assert kinds(load_hertz_dev(path, codec=None)) == {"quantizer": ["Linear"], "lm": ["Int8Linear"],
                                                        "resynth": ["Linear"]}
    whole = load_hertz_dev(path, codec=None, quantize="int8")
    assert set(map(tuple, kinds(whole).values())) == {("Int8Linear",)}
    want = quantize_model(float_model(), "int8")  # the same float weights quantized at once
    got_state, want_state = whole.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys() and all(torch.equal(got_state[k], want_state[k]) for k in want_state)


@torch.no_grad()
def test_int8_layers_in_float16_on_the_cpu_do_not_overflow_and_cast_scales_save(tmp_path, one_thread):
    """Two float16 cases: x @ q before the scale reached 127 / scale times each output, inf past
    ~516 times a row's largest weight (the float16 model gave ~100 where the int8 layer gave inf);
    and a row of tiny weights quantized in float32, loaded in float16, kept +-127 against a scale
    rounded to 0, so its re-export was refused when loaded. Both now as quantize_int8 does in float16."""
    from model.quant import bad_scales
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 8, bias=False)
    x = torch.randn(1, 256) * 30
    q = quantize_model(torch.nn.Sequential(lin), "int8")[0]
    got = q.half()(x.half())
    assert torch.isfinite(got).all() and rel_err(got.float(), x @ q.dequantize(torch.float32).T) < 0.01

    m = float_model()
    m.lm.layers[0].attn.attn.proj_qkv.weight[3] *= 1e-7  # a dead row: its scale underflows in float16
    path = save_transformer(tmp_path / "f32-int8.safetensors", quantize_model(m, "int8"))
    half = load_hertz_dev(path, codec=None, dtype=torch.float16)
    layer = half.lm.layers[0].attn.attn.proj_qkv
    assert layer.scale[3] == 0 and not layer.qweight[3].any()
    again = save_transformer(tmp_path / "f16-int8.safetensors", half)
    assert quantization_of(load_hertz_dev(again, codec=None, dtype=torch.float16)) == quantization_of(half)
    layer.qweight[3] = 5  # as a cast without the mending would leave it: refused when saving, named
    assert bad_scales(half.state_dict(), {"lm.layers.0.attn.attn.proj_qkv": "int8"}) == ["lm.layers.0.attn.attn.proj_qkv"]
    with pytest.raises(ValueError, match=r"1 quantized layers hold scales no quantization makes .*lm\.layers\.0\.attn\."
                                         r"attn\.proj_qkv.*nothing was written"):
        save_transformer(tmp_path / "bad.safetensors", half)
    assert not (tmp_path / "bad.safetensors").exists()


def test_unknown_quantize_mode_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        load_hertz_dev("duplex", ckpt_dir=tmp_path / "nothing-here", offline=True, quantize="fp4")


# Every quantized kernel (model.quant_kernels) at a fixed configuration, on all 256 byte values,
# shapes that leave partial blocks along N and K, one row and three; the int8 GEMV with its floats
# made from the integers' bits (BITS) and by the int-to-float instruction. `kernel_outputs()` runs
# in Triton's interpreter on the CPU (float16 activations: its tl.dot does not take bfloat16) and
# natively on CUDA.
KERNEL_CASES = r"""
import json, torch, triton
from model import quant_kernels as qk

def kernel_outputs(device, dtype, run):
    torch.manual_seed(0)
    out, G = [], 128
    for M, N, K in [(1, 24, 384), (3, 40, 640)]:
        q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        q8.view(-1)[:256] = torch.arange(-128, 128, dtype=torch.int8)  # every byte
        s8 = (torch.rand(N) / 100).to(dtype)
        q4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
        q4.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
        sz = (torch.randn(K // G, N, 2) / 10).to(dtype)
        x = torch.randn(M, K).to(dtype)
        w8 = q8.double() * s8.double()[:, None]
        nib = torch.stack([q4 >> 4, q4 & 15], -1).reshape(N, K).double()
        w4 = ((nib - 8).view(N, K // G, G) * sz[..., 0].double().t()[..., None]
              + sz[..., 1].double().t()[..., None]).reshape(N, K)
        ref8, ref4 = x.double() @ w8.t(), x.double() @ w4.t()
        q8, s8, q4, sz, x = (t.to(device) for t in (q8, s8, q4, sz, x))
        cases = {"int8_dot": (ref8, qk._int8_dot, (triton.cdiv(N, 16), 1), (x, q8, s8), (M, N, K),
                              dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128)),
                 "int4_dot": (ref4, qk._int4_dot, (triton.cdiv(N, 32), 1), (x, q4, sz), (M, N, K),
                              dict(GROUP=G, BLOCK_M=16, BLOCK_N=32))}
        if M == 1:
            for bits in (True, False):
                cases[f"int8_gemv_bits_{bits}"] = (ref8, qk._int8_gemv, (triton.cdiv(N, 16),), (x, q8, s8),
                                                   (N, K, x, x, 0.0), dict(BITS=bits, NORM=False, SWIGLU=False, RESIDUAL=False,
                                                                PDL=False, KP=1, BLOCK_N=16, BLOCK_K=256))
            cases["int4_gemv"] = (ref4, qk._int4_gemv, (triton.cdiv(N, 16),), (x, q4, sz), (N, K),
                                  dict(GROUP=G, BLOCK_N=16, GROUPS=2))
        ys = {}
        for name, (ref, kernel, grid, tensors, sizes, meta) in cases.items():
            y = ys[name] = torch.full((M, N), float("nan"), dtype=dtype, device=device)
            run(kernel, grid, *tensors, y, *sizes, **meta)
            out.append(dict(name=name, rows=M, finite=bool(y.isfinite().all()),
                            err=float((y.double().cpu() - ref).abs().max() / ref.abs().max())))
        if M == 1:
            out.append(dict(name="int8_gemv_bits_equal", equal=bool(torch.equal(ys["int8_gemv_bits_True"],
                                                                                 ys["int8_gemv_bits_False"]))))
    return out
"""


def check_kernel_outputs(cases, dtype_eps):
    assert {c["name"] for c in cases} == {"int8_dot", "int4_dot", "int8_gemv_bits_True", "int8_gemv_bits_False",
                                          "int4_gemv", "int8_gemv_bits_equal"}
    for c in cases:
        if c["name"] == "int8_gemv_bits_equal":
            assert c["equal"]  # the bits give the very floats the instruction gives
        else:
            assert c["finite"] and c["err"] <= dtype_eps, c  # right to the output's rounding


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the same cases run natively (the next test); the "
                    "H200 image's Triton 3.6 interpreter cannot take a runtime int as a loop bound under numpy 2.4 "
                    "(range(0, K, ...) raises TypeError: benchmarks/results/h200_session14.txt, call 3)")
def test_quantized_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernels' interpreter")
    from triton_interpreter import interpreted
    script = KERNEL_CASES + "\nprint(json.dumps(kernel_outputs('cpu', torch.float16, " \
                            "lambda k, grid, *a, **m: k.fn[grid](*a, **m))))\n"
    check_kernel_outputs(interpreted(script), 2e-3)



# The int8 GEMV with a block's operations fused in (`model.quant.block_linear`): against float64
# with the rounding to the activations' dtype where the operations one after another round.
FUSED_CASES = r"""
import json, torch, triton
import torch.nn.functional as F
from model import quant_kernels as qk

def cases(device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    out, N, K = [], 40, 640  # K not a multiple of the block: the masked tail
    for norm, swiglu, residual in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]:
        rows = 2 * N if swiglu else N
        q = torch.randint(-127, 128, (rows, K), dtype=torch.int8)
        s = (torch.rand(rows) / 300).to(dtype)
        x = (torch.randn(1, K) * 3 + 2).to(dtype)  # a mean well away from 0: the norm matters
        g = (torch.rand(K) + 0.5).to(dtype)
        r = torch.randn(1, N).to(dtype)
        def ref(weight):
            rd = lambda t: t.to(dtype).double()
            h = rd(F.layer_norm(x.double(), (K,), weight, None, 1e-5)) if norm else x.double()
            y = rd(h @ (q.double() * s.double()[:, None]).t())
            if swiglu:
                y = rd(y[:, N:] * rd(F.silu(y[:, :N])))
            return rd(y + r.double()) if residual else y
        want, unweighted = ref(g.double()), ref(None)
        y = torch.full((1, N), float("nan"), dtype=dtype, device=device)
        q_, s_, x_, g_, r_ = (t.to(device) for t in (q, s, x, g, r))
        qk._int8_gemv.fn[(triton.cdiv(N, 16),)](x_, q_, s_, y, N, K, g_, r_, 1e-5, BITS=True, NORM=bool(norm),
                                                SWIGLU=bool(swiglu), RESIDUAL=bool(residual), PDL=False, KP=1024,
                                                BLOCK_N=16, BLOCK_K=256)
        got = y.double().cpu()
        scale = want.abs().max()
        out.append(dict(case=[norm, swiglu, residual], finite=bool(got.isfinite().all()),
                        err=float((got - want).abs().max() / scale),
                        err_unweighted=float((got - unweighted).abs().max() / scale)))
    return out
"""


def check_fused(rows):
    assert len(rows) == 7
    for row in rows:
        assert row["finite"] and row["err"] <= 1e-2, row  # to the output's rounding (a few ulps of bf16)
        if row["case"][0]:  # the norm's weight is applied: leaving it out moves the output far more
            assert row["err_unweighted"] > 0.1, row


_in_the_interpreter, test_int8_gemv_with_a_blocks_operations_fused_in_on_cuda = interpreter_and_cuda(
    FUSED_CASES, "cases", check_fused)
# Skipped where CUDA is: the GPU image's interpreter cannot run the GEMV's loop (as above).
test_int8_gemv_with_a_blocks_operations_fused_in_the_triton_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on CUDA the same cases run compiled (the next test); the GPU image's Triton "
    "interpreter cannot take a runtime int as a loop bound under numpy 2.4")(_in_the_interpreter)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@torch.no_grad()
def test_cuda_quantized_kernels_at_fixed_configurations():
    """The interpreter's cases compiled for the GPU, bf16 activations."""
    scope: dict = {}
    exec(KERNEL_CASES, scope)
    cases = scope["kernel_outputs"]("cuda", torch.bfloat16, lambda k, grid, *a, **m: k.fn[grid](*a, **m))
    check_kernel_outputs(cases, 8e-3)


def check_on_cuda(gpu, cpu, rows):
    """The CUDA layer `gpu` against F.linear with the dequantized weights of its CPU twin, to bf16
    rounding: the forward for each number of rows, the activations' gradient, a CUDA-graph
    replay and torch.compile."""
    w = cpu.dequantize(torch.float32).cuda()
    for n in rows:
        x = torch.randn(n, 640, dtype=torch.bfloat16, device="cuda")
        want = torch.nn.functional.linear(x.float(), w, cpu.bias.float().cuda())
        assert rel_err(gpu(x), want) <= 1e-2, n
    with torch.enable_grad():
        x = torch.randn(3, 640, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        gpu(x).square().sum().backward()
        xf = x.detach().float().requires_grad_()
        torch.nn.functional.linear(xf, w, cpu.bias.float().cuda()).square().sum().backward()
        assert rel_err(x.grad, xf.grad) <= 2e-2
    x = torch.randn(2, 1, 640, dtype=torch.bfloat16, device="cuda")
    y, static = gpu(x), x.clone()
    graph = torch.cuda.CUDAGraph()
    gpu(static)
    with torch.cuda.graph(graph):
        out = gpu(static)
    static.copy_(x * 2)
    graph.replay()
    assert rel_err(out, gpu(x * 2)) <= 1e-3
    assert rel_err(torch.compile(gpu, fullgraph=True)(x), y) <= 1e-3


@cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_cuda_triton_kernels_match_the_dequantized_layer_in_graphs_and_compile(mode):
    """On CUDA the quantized layers run the Triton kernels (GEMV for one row, tile products for
    more): for 1, 2, 17 and 300 rows the forward equals F.linear with the dequantized weights to
    bf16 rounding, and so does the activations' gradient (LoRA on a quantized base); the state
    dict is the CPU layer's bit for bit, and it runs inside a CUDA graph and under torch.compile."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(640, 264, bias=True).to(torch.bfloat16)
    cpu = quantize_model(torch.nn.Sequential(lin), mode)[0]
    gpu = copy.deepcopy(cpu).cuda()
    assert all(torch.equal(v.cpu(), cpu.state_dict()[k]) for k, v in gpu.state_dict().items())
    check_on_cuda(gpu, cpu, (1, 2, 17, 300))


@cuda
@torch.no_grad()
def test_cuda_int4_packed_for_tinygemm_keeps_its_bytes_state_dict_and_outputs():
    """`Int4Linear.pack` on CUDA: tinygemm's layout holds the same nibbles (unpacking a packed
    multi-tile weight gives it back bit for bit), the state dict stays the portable one, and the
    forward (tinygemm up to TINYGEMM_MAX_ROWS rows, unpacked kernels beyond and for gradients)
    equals F.linear with the dequantized weights to bf16 rounding, in a CUDA graph and compiled."""
    from model.quant import TINYGEMM_MAX_ROWS, from_tinygemm, to_tinygemm
    torch.manual_seed(0)
    q = torch.randint(0, 256, (24, 384), dtype=torch.uint8, device="cuda")  # 3 x 6 tiles of 8 x 128
    packed = to_tinygemm(q)
    assert packed.dtype == torch.int32 and packed.numel() * 4 == q.numel()
    assert torch.equal(from_tinygemm(packed), q) and torch.equal(from_tinygemm(packed.cpu()), q.cpu())
    lin = torch.nn.Linear(640, 264, bias=True).to(torch.bfloat16)
    cpu = quantize_model(torch.nn.Sequential(lin), "int4")[0]
    gpu = copy.deepcopy(cpu).cuda()
    gpu.pack()
    assert gpu.packed and not cpu.packed and gpu.qweight.dim() == 4
    assert all(torch.equal(v.cpu(), cpu.state_dict()[k]) for k, v in gpu.state_dict().items())
    w = cpu.dequantize(torch.float32).cuda()
    assert torch.equal(gpu.dequantize(torch.float32), w)
    again = copy.deepcopy(gpu)
    again.qweight.zero_()
    again.load_state_dict(cpu.state_dict())  # portable nibbles into a packed layer
    assert again.packed and torch.equal(again.qweight, gpu.qweight)
    check_on_cuda(gpu, cpu, (1, 2, TINYGEMM_MAX_ROWS, TINYGEMM_MAX_ROWS + 1, 300))
    moved = copy.deepcopy(gpu).float().cpu()  # a packed layer moved off CUDA still computes (unpacking)
    x = torch.randn(2, 1, 640)
    assert moved.packed and rel_err(moved(x), torch.nn.functional.linear(x, w.cpu(), cpu.bias.float())) <= 1e-2


@cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_cuda_quantized_model_close_to_float_and_saved_on_gpu_loads_on_cpu(mode, tmp_path):
    m = float_model()
    x = torch.randn(1, 8, 64)
    plex = plex_codes(m.quantizer, x, True)
    ref = outputs(m, x, plex)
    gpu = quantize_model(copy.deepcopy(m).cuda().to(torch.bfloat16), mode)
    got = outputs(gpu, x.cuda().bfloat16(), tuple(p.cuda().bfloat16() for p in plex))
    assert max(rel_err(g.float().cpu(), w) for g, w in zip(got, ref)) <= TOL[mode]
    path = save_transformer(tmp_path / "q.safetensors", gpu)
    cpu = load_hertz_dev(path, codec=None, dtype=torch.float32)
    cpu_out = outputs(cpu, x, plex)
    assert max(rel_err(g, w) for g, w in zip(cpu_out, ref)) <= TOL[mode]
    back = load_hertz_dev(path, codec=None, device="cuda")
    layer = back.lm.layers[0].attn.attn.proj_qkv
    assert isinstance(layer, Int8Linear if mode == "int8" else Int4Linear) and layer.qweight.is_cuda
    again = outputs(back, x.cuda().bfloat16(), tuple(p.cuda().bfloat16() for p in plex))
    for a, b in zip(again, got):
        assert torch.equal(a, b)


def stray_cuda_tensors(model) -> list:
    """Shapes, dtypes and bytes of the live CUDA tensors that are not `model`'s own (a failure's
    message; tensors with no storage, such as the fake tensors of an earlier compilation, skipped)."""
    import gc
    own = {t.data_ptr() for t in model.state_dict().values()}
    found = set()
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda and o.data_ptr() not in own:
                found.add((tuple(o.shape), str(o.dtype), o.untyped_storage().nbytes()))
        except (RuntimeError, NotImplementedError):
            continue
    return sorted(found, key=lambda f: -f[2])[:20]


def requested_bytes() -> int:
    """The bytes the live CUDA tensors asked the caching allocator for (its blocks may be larger)."""
    return sum(block["requested_size"] for segment in torch.cuda.memory._snapshot()["segments"]
               for block in segment["blocks"] if block["state"] == "active_allocated")


@cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_cuda_quantizing_while_loading_peaks_near_the_final_size(mode, tmp_path, monkeypatch):
    """GPU memory while loading official-layout float32 files quantized: the final quantized
    weights plus a few MB of scratch, never a float layer or a second copy of the model. The final
    size is counted in the bytes the live tensors asked for (the allocator's snapshot): the caching
    allocator may hand a tensor a whole freed block (it splits a large block only for a remainder
    over 1 MB), so `memory_allocated` ran up to 1.3 MB over the weights, depending on the blocks
    earlier tests had left (sessions 15 and 17 on the H200; session 17's snapshot showed no live
    block besides the model's but one of 512 bytes)."""
    cfg = dataclasses.replace(CFG, lm_dim=1024, lm_heads=8, lm_layers=8, resynth_dim=1024, resynth_heads=8,
                              resynth_ff_dim=2816)
    torch.manual_seed(0)
    folder = official_files(tmp_path, monkeypatch, build(HertzDev, cfg))
    torch.cuda.empty_cache()
    base, asked = torch.cuda.memory_allocated(), requested_bytes()
    torch.cuda.reset_peak_memory_stats()
    m = load_hertz_dev("duplex", device="cuda", ckpt_dir=folder, offline=True, codec=None, config=cfg, quantize=mode)
    final, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    weights = requested_bytes() - asked
    assert abs(weights - weight_bytes(m)["total"]) <= 2**16, (weights, weight_bytes(m)["total"], stray_cuda_tensors(m))
    assert peak - final <= 32 * 2**20, (peak, final)  # the largest float32 layer alone is 128 MB


@pytest.mark.parametrize("mode, suffix, where", [
    (None, "proj_qkv.weight", (0, 0)),
    ("int8", "proj_qkv.scale", (0,)),
    ("int4", "proj_qkv.scales_and_zeros", (0, 0, 0)),
    ("int4", "proj_qkv.scales_and_zeros", (0, 0, 1)),
], ids=["float-weight", "int8-scale", "int4-scale", "int4-zero-point"])
def test_values_beyond_float16_are_refused_when_loaded_in_float16(mode, suffix, where, tmp_path, one_thread):
    """A file of finite float32 values beyond float16's 65504 (a weight, an int8 scale, an int4
    scale or zero point of 7e4; hash consistent) loaded in float16: the cast made them inf, and
    the model's outputs NaN, without a word. Now a CheckpointError naming the file, the part, the
    tensor and the dtype, and the same file loads in float32."""
    from test_checkpoint import rewritten
    from model.checkpoint import CheckpointError

    def edited(state):
        for k in state:
            if k.endswith(suffix) and k.startswith("lm.layers.0."):
                state[k][where] = 7e4
        return state
    model = float_model() if mode is None else quantize_model(float_model(), mode)
    good = save_transformer(tmp_path / "good.safetensors", model)
    big = rewritten(good, tmp_path / "big.safetensors", state=edited)
    with pytest.raises(CheckpointError) as e:
        load_hertz_dev(big, codec=None, dtype="float16")
    assert str(e.value) == (f"{big} (lm): 1 tensors hold values beyond what float16 holds (layers.0.attn.attn.{suffix})"
                            "; cast, they would be inf and the model would generate noise: load it in bfloat16 or "
                            "float32 (dtype=, --dtype)")
    assert load_hertz_dev(big, codec=None, dtype="float32") is not None
    assert load_hertz_dev(good, codec=None, dtype="float16") is not None


@pytest.mark.parametrize("mode, suffix, where, value, dtype, fits", [
    ("int8", "proj_qkv.scale", (0,), 1e3, "float16", "bfloat16"),
    ("int8", "proj_qkv.scale", (0,), 5e37, "bfloat16", None),
    ("int8", "proj_qkv.scale", (0,), 3.4e38, "bfloat16", None),
    ("int4", "proj_qkv.scales_and_zeros", (0, 0, 0), 1e4, "float16", "float32"),
    ("int4", "proj_qkv.scales_and_zeros", (0, 0, 0), 5e37, "bfloat16", None),
    (None, "proj_qkv.weight", (0, 0), 7e4, "float16", "bfloat16"),
], ids=["int8-float16", "int8-bfloat16", "int8-bfloat16-cast", "int4-float16", "int4-bfloat16", "quantize-float16"])
def test_scales_whose_dequantized_weights_overflow_the_dtype_are_refused(mode, suffix, where, value, dtype, fits,
                                                                         tmp_path, one_thread):
    """Scales (hash consistent) that the dtype holds but whose weights it does not: an int8 scale of
    1e3 in float16 (127 x 1e3), 5e37 in bfloat16, 3.4e38 (a float32 that bfloat16 rounds to inf), an
    int4 scale of 1e4 in float16 (8 x 1e4); or float weights of 7e4 quantized while loading in
    float16 (their scale 551). They loaded, and the model's outputs were NaN, without a word; now a
    CheckpointError naming the file, the part and the tensor, and the file loads where it fits."""
    from test_checkpoint import rewritten
    from model.checkpoint import CheckpointError

    def edited(state):
        for k in state:
            if k.endswith(suffix) and k.startswith("lm.layers.0."):
                state[k][where] = value
        return state
    model = float_model() if mode is None else quantize_model(float_model(), mode)
    good = save_transformer(tmp_path / "good.safetensors", model)
    big = rewritten(good, tmp_path / "big.safetensors", state=edited)
    quantize = "int8" if mode is None else None
    tensor = "proj_qkv.scale" if mode is None else suffix
    hint = ("load it in bfloat16 or float32 (dtype=, --dtype)" if dtype == "float16" else
            "no quantization makes such scales: re-export it from the float model")
    for verify in (True, False):
        with pytest.raises(CheckpointError) as e:
            load_hertz_dev(big, codec=None, dtype=dtype, quantize=quantize, verify=verify)
        assert str(e.value) == (f"{big} (lm): 1 tensors hold scales whose dequantized weights are beyond what {dtype} "
                                f"holds (layers.0.attn.attn.{tensor}); they would be inf and the model would generate "
                                f"noise: {hint}")
    if fits:
        m = load_hertz_dev(big, codec=None, dtype=fits, quantize=quantize)
        x = torch.randn(1, 8, 64, dtype=getattr(torch, fits))
        with torch.no_grad():
            assert all(bool(torch.isfinite(o).all()) for o in outputs(m, x, plex_codes(m.quantizer, x, True)))
    assert load_hertz_dev(good, codec=None, dtype=dtype, quantize=quantize) is not None


@cuda
@torch.no_grad()
def test_cuda_int8_decode_step_with_fused_linears_matches_the_operations(monkeypatch):
    """One decode step of an int8 block (bf16) with its norms, gating and residuals fused into the
    GEMVs (`model.quant.block_linear`) against the operations one after another, eagerly and in the
    compiled block; the fused path really runs (the custom op is called)."""
    from model import quant, quant_kernels
    from model.transformer import Block, KVCache, positions_for, run_block
    torch.manual_seed(0)
    block = Block(256, 4)
    block.init_weights()
    block = quantize_model(block.cuda().to(torch.bfloat16), "int8")
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16) * 2 + 1
    calls = []
    real = quant_kernels.int8_block_linear
    monkeypatch.setattr(quant_kernels, "int8_block_linear", lambda *a: calls.append(a[3:]) or real(*a))

    def step(fused: bool, fn=run_block):
        monkeypatch.setattr(quant, "FUSED_LINEARS", fused)
        cache = KVCache(1, 1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
        pos = positions_for(x, 64, 10000.0, cache, torch.full((1, 1), 5, device="cuda"), 64)
        return fn(block, x, pos, cache.layer(0, 64)), cache.k.clone()

    (want, want_k), (got, got_k) = step(False), step(True)
    assert len(calls) == 4 and [c[2] for c in calls] == [False, False, True, False]  # qkv, out, gate/up, down
    assert rel_err(got.float(), want.float()) <= 1e-2 and rel_err(got_k.float(), want_k.float()) <= 1e-2
    compiled = torch.compile(run_block, dynamic=False)
    assert rel_err(step(True, compiled)[0].float(), want.float()) <= 1e-2


def test_block_linear_fuses_only_a_decode_step_that_needs_no_gradient(monkeypatch):
    """The guard of `block_linear`'s fused path (the GEMV itself needs CUDA: here it is a stand-in
    that records its calls and computes the operations): one row, a bias-free norm, a residual of
    x's dtype, and nothing needing a gradient; otherwise the operations one after another."""
    from model import quant
    from model.transformer import Norm
    torch.manual_seed(0)
    layer = quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False)), "int8")[0]
    fused = []

    class Kernels:
        @staticmethod
        def int8_linear(x, q, s):
            return torch.nn.functional.linear(x, q.float() * s[:, None])

        @staticmethod
        def int8_block_linear(x, q, s, w, eps, swiglu, r):
            fused.append(swiglu)
            y = Kernels.int8_linear(x if w is None else torch.nn.functional.layer_norm(x, (8,), w, None, eps), q, s)
            y = y[:, 8:] * torch.nn.functional.silu(y[:, :8]) if swiglu else y
            return y if r is None else r + y

    monkeypatch.setattr(quant, "_triton_ok", lambda x: True)
    monkeypatch.setattr(quant, "_kernels", lambda: Kernels)
    monkeypatch.setattr(quant, "FUSED_LINEARS", True)
    norm, biased = Norm(8), torch.nn.LayerNorm(8)
    x, r = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    want = r + (lambda y: y[..., 8:] * torch.nn.functional.silu(y[..., :8]))(layer(norm(x)))
    with torch.no_grad():
        assert torch.allclose(quant.block_linear(layer, x, norm, True, r), want, atol=1e-6) and fused == [True]
    cases = {"a norm weight needing its gradient": dict(x=x, norm=norm, residual=r),
             "a residual needing its gradient": dict(x=x, norm=None, residual=r.clone().requires_grad_()),
             "x needing its gradient": dict(x=x.clone().requires_grad_(), norm=None, residual=None)}
    for what, args in cases.items():
        quant.block_linear(layer, args["x"], args["norm"], True, args["residual"])
        assert len(fused) == 1, what
    with torch.no_grad():
        quant.block_linear(layer, x, biased, True, r)                    # a LayerNorm with a bias
        quant.block_linear(layer, x, norm, True, r.double())             # a residual of another dtype
        quant.block_linear(layer, torch.randn(2, 1, 8), norm, True, None)  # two rows
    assert len(fused) == 1
