"""Every Triton kernel of the model compiled for the H100 / H200 (sm_90) on this machine, with no GPU:
Triton's own compiler down to a cubin (the ptxas it ships). The interpreter tests check the kernels'
values; this catches what only the compiler sees, such as an integer argument equal to 1, which the
launcher hands the kernel as a constant (a constant int has no `.to`: the noise kernel's first
version failed so on the H200 in session 15, its interpreter test passing). Each kernel is compiled
twice: its integer arguments as runtime ints, and all of them as that constant 1."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) compiles the kernels")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def kernels() -> dict:
    """name -> (kernel, pointer types, float arguments, constexprs), at the hertz_dev shapes."""
    from model import attention_kernels as ak, discriminator_kernels as dk, quant_kernels as qk, sampling_kernels as sk
    bf16 = "*bf16"
    prologue = dict(qkv_ptr=bf16, wq_ptr=bf16, wk_ptr=bf16, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                    q_ptr=bf16, k_ptr="*fp8e4nv", v_ptr="*fp8e4nv")
    shapes = dict(H=32, HKV=8, BH=32, BHKV=8, D=128, FP8=True)
    gemv = dict(x_ptr=bf16, w_ptr="*i8", s_ptr=bf16, y_ptr=bf16)
    fused = dict(gemv, nw_ptr=bf16, r_ptr=bf16)
    plain = dict(NORM=False, SWIGLU=False, RESIDUAL=False, PDL=False, KP=1, BLOCK_N=8, BLOCK_K=512)
    int4 = dict(x_ptr=bf16, w_ptr="*u8", sz_ptr=bf16, y_ptr=bf16)
    return {
        "decode_attention_partial": (ak._partial, dict(q_ptr=bf16, k_ptr="*fp8e4nv", v_ptr="*fp8e4nv",
                                                       bias_ptr="*fp32", o_ptr="*fp32", ml_ptr="*fp32"),
                                     {"scale"}, dict(CHUNK=256, BLOCK_S=64, D=128)),
        "decode_attention_combine": (ak._combine, dict(o_ptr="*fp32", ml_ptr="*fp32", y_ptr=bf16), set(),
                                     dict(BLOCK_SPLIT=8, D=128)),
        "decode_prologue": (ak._prologue, prologue, {"eps"}, dict(shapes, SPLIT=False)),
        "decode_prologue_split": (ak._prologue, prologue, {"eps"}, dict(shapes, SPLIT=True)),
        "int8_gemv_bits": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True)),
        "int8_gemv_instruction": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=False)),
        "int8_gemv_norm_swiglu": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True, NORM=True, SWIGLU=True, KP=4096)),
        "int8_gemv_residual": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True, RESIDUAL=True)),
        "int8_gemv_norm": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True, NORM=True, KP=4096)),
        "int8_gemv_pdl": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True, NORM=True, PDL=True, KP=4096)),
        "int8_gemv_pdl_plain": (qk._int8_gemv.fn, fused, {"eps"}, dict(plain, BITS=True, PDL=True)),
        "int8_dot": (qk._int8_dot.fn, gemv, set(), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
        "int4_gemv": (qk._int4_gemv.fn, int4, set(), dict(GROUP=128, BLOCK_N=16, GROUPS=2)),
        "int4_dot": (qk._int4_dot.fn, int4, set(), dict(GROUP=128, BLOCK_M=16, BLOCK_N=64)),
        "noise_uniform": (sk._uniform, dict(seed_ptr="*i64", counter_ptr="*i64", u_ptr="*fp32"), set(),
                          dict(BLOCK=256)),
        "bias_leaky_forward": (dk._forward, dict(y_ptr=bf16, b_ptr="*fp32", out_ptr=bf16), {"slope"},
                               dict(BLOCK_M=64, BLOCK_C=128)),
        "bias_leaky_backward": (dk._backward, dict(g_ptr=bf16, out_ptr=bf16, gy_ptr=bf16, partial_ptr="*fp32"),
                                {"slope"}, dict(BLOCK_M=256, BLOCK_C=32)),
        "feature_l1_forward": (dk._l1_forward, dict(a_ptr=bf16, b_ptr=bf16, partial_ptr="*fp32"), {"inv_n"},
                               dict(BLOCK=dk.L1_BLOCK)),
        "feature_l1_backward": (dk._l1_backward, dict(a_ptr=bf16, b_ptr=bf16, g_ptr="*fp32", gb_ptr=bf16),
                                {"inv_n"}, dict(BLOCK=dk.L1_BLOCK)),
    }


def source(fn, pointers: dict, floats: set, constexprs: dict, ones: bool = False) -> ASTSource:
    """`fn` with these pointer types, float32 `floats`, the other scalars int32 (`ones`: all the
    constant 1, the launcher's specialisation of an int argument equal to 1)."""
    signature, constants = {}, dict(constexprs)
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in pointers:
            signature[p.name] = pointers[p.name]
        elif p.name in floats:
            signature[p.name] = "fp32"
        elif ones:
            signature[p.name], constants[p.name] = "constexpr", 1
        else:
            signature[p.name] = "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constants)


@pytest.mark.parametrize("ints", ["runtime", "ones"])
@pytest.mark.parametrize("name", list(kernels()))
def test_kernel_compiles_for_sm90(name, ints):
    fn, pointers, floats, constexprs = kernels()[name]
    assert set(constexprs) <= {p.name for p in fn.params if p.is_constexpr}, "a constexpr that is not the kernel's"
    compiled = triton.compile(source(fn, pointers, floats, constexprs, ints == "ones"), target=SM90)
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0)])
def test_float8_kernels_are_used_exactly_where_triton_compiles_them(capability):
    """`model.transformer.fp8_kernels_supported` (which GPUs run the prologue and decode-attention
    kernels over a float8 cache; the others take the torch paths) agrees with the compiler: the
    float8 prologue and attention compile for a capability exactly when it says so, while their
    bf16 / fp16 versions compile on all of these."""
    from model.transformer import fp8_kernels_supported
    target = GPUTarget("cuda", 10 * capability[0] + capability[1], 32)
    for name in ("decode_attention_partial", "decode_prologue"):
        fn, pointers, floats, constexprs = kernels()[name]
        for fp8 in (True, False):
            half = "*bf16" if capability >= (8, 0) else "*fp16"
            types = {k: (v if fp8 else half) if v == "*fp8e4nv" else v.replace("*bf16", half)
                     for k, v in pointers.items()}
            constants = dict(constexprs, **({"FP8": fp8} if "FP8" in constexprs else {}))
            try:
                triton.compile(source(fn, types, floats, constants), target=target)
                compiled = True
            except Exception as e:  # Triton: "type fp8e4nv not supported in this architecture"
                assert "fp8e4nv" in str(e), e
                compiled = False
            assert compiled == (fp8_kernels_supported(capability) or not fp8), (name, capability, fp8)
