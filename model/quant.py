"""Weight-only quantization of the quantizer, LM and resynthesizer (the codec stays in float).

Two modes, chosen per model by `quantize_model(model, mode)` or at load time
(`load_hertz_dev(..., quantize=mode)`):

- `"int8"`: every `nn.Linear` of the quantizer, the LM and the resynthesizer becomes an
  `Int8Linear`: int8 weights with one scale per output channel (symmetric, [-127, 127]).
- `"int4"`: every `nn.Linear` of the LM and the resynthesizer becomes an `Int4Linear`: 4-bit
  weights in groups of `group_size` (default 128) input features, each group with its own scale
  and zero point (asymmetric, as tinygemm expects). Layers the int4 kernel cannot take (in_features
  not a multiple of 128 and of the group size, or out_features not a multiple of 8: the 32-wide
  latent input projections, for instance) fall back to int8, and so does the whole quantizer, whose
  output is rounded to discrete FSQ codes, where a 4-bit error would flip codes for almost no memory
  saved (its weights are 0.6% of the model).

Kernels: on CUDA with bf16/fp16 activations both layers call the Triton kernels of
`model.quant_kernels` (weights read once and dequantized in registers: a GEMV for one row, a
tensor-core tile product for more), registered as custom ops so they sit inside the compiled block
and its CUDA graphs. Elsewhere (the CPU, float32) they dequantize and call `F.linear`. Measured
alternatives (../shared/notes/h200-linear-kernels.md and benchmarks/quant_kernels.py, eight LM
layers at batch 1 on the H200): int8 with the dequantisation fused by `torch.compile` (gpt-fast)
reads at ~73% of the bandwidth alone but was no faster than bf16 inside the compiled block and
fell to 0.4x bf16 at 8 rows; `aten._weight_int8pack_mm` has no real CUDA kernel (13 ms);
tinygemm's `aten._weight_int4pack_mm` reaches ~38% of the bandwidth at one row. These kernels,
every Linear of a hertz_dev step at one row (benchmarks/quant_kernels.py, H200): int8 2.76-2.89
TB/s, 1.55-1.60x bf16; int4 1.04 TB/s. Tried and measured slower on the H200 (session 4,
benchmarks/results/h200_session4.txt), so not kept: GEMVs that read the weights as int32 words
and make floats without the int-to-float instruction (an integer field OR-ed into the mantissa of
1.0; int8 3.45 ms for all layers against 3.27 for the plain GEMV, int4 4.99 against 4.34: the
conversion is not what bounds them), and an int4 tile product over the high and low nibbles
separately, without the interleave (11.2 ms against 7.7).

Layout: the state dict holds the same tensors the kernels read (`qweight` int8 (N, K), or uint8
(N, K/2) with two 4-bit values a byte, high nibble first; scales in the model's dtype), on every
device, so a model quantized on one device loads on another.

Each quantized layer keeps `in_features`, `out_features` and `bias` as `nn.Linear` has them and
takes the same call; `.weight` is the dequantized weight, computed on each access, for code that
inspects a layer (its dtype, device, shape); the forward never uses it.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm implements
INNER_K_TILES = 8                 # tinygemm's packing, whose shapes the format keeps: in_features a multiple of 16 * 8
_CHUNK = 1 << 20                  # weights are quantized this many elements at a time (bounded scratch)


def _compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype or torch.get_default_dtype()


# --- the quantization formulas -------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> qweight int8 (N, K), scale float32 (N,) with w ~= qweight * scale[:, None].
    Per output channel, symmetric: scale = max|w_row| / 127."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(N, K) float -> qweight uint8 (N, K/2) (two 4-bit values q in [0, 15] a byte, the even
    column in the high nibble), scales_and_zeros float32 (K/group_size, N, 2), with
    w ~= (q - 8) * scale + zero in each group (tinygemm's convention): scale = (max - min) / 15,
    zero = min + 8 * scale."""
    N, K = w.shape
    wg = w.float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.uint8).view(N, K)
    zero = lo + 8 * scale
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
    return pack_nibbles(q), sz


def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) uint8 values in [0, 15] -> (N, K/2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


def quantized_tensors(w: Tensor, spec: str, device=None) -> dict[str, Tensor]:
    """The state-dict tensors (`qweight`, `scale` or `scales_and_zeros`) of float weight w (N, K)
    quantized as `spec` ("int8" or "int4/<group size>"), computed on `device` (default: w's).
    w may be a memory-mapped CPU tensor and device a GPU: it is read, moved and quantized a few
    rows at a time into the preallocated outputs, so the float scratch stays small whatever the
    layer's size."""
    device = device or w.device
    kind, group = parse_spec(spec)
    N, K = w.shape
    step = max(1, _CHUNK // K)
    rows = ((r, w[r:r + step].to(device=device, dtype=torch.float32)) for r in range(0, N, step))
    if kind == "int8":
        q = torch.empty(N, K, dtype=torch.int8, device=device)
        scale = torch.empty(N, dtype=torch.float32, device=device)
        for r, chunk in rows:
            q[r:r + step], scale[r:r + step] = quantize_int8(chunk)
        return {"qweight": q, "scale": scale}
    q = torch.empty(N, K // 2, dtype=torch.uint8, device=device)
    sz = torch.empty(K // group, N, 2, dtype=torch.float32, device=device)
    for r, chunk in rows:
        q[r:r + step], sz[:, r:r + step] = quantize_int4(chunk, group)
    return {"qweight": q, "scales_and_zeros": sz}


def dequantize_int8(qweight: Tensor, scale: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The (N, K) float weights of `quantize_int8`'s output, in `dtype` (default: the scale's)."""
    return (qweight.float() * scale.float()[:, None]).to(dtype or scale.dtype)


def dequantize_int4(qweight: Tensor, scales_and_zeros: Tensor, group_size: int,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """The (N, K) float weights of `quantize_int4`'s output, in `dtype` (default: the scales')."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    q = unpack_nibbles(qweight).view(N, K // group_size, group_size).float()
    sz = scales_and_zeros.float()
    scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (N, K/g, 1)
    return ((q - 8) * scale + zero).view(N, K).to(dtype or scales_and_zeros.dtype)


def parse_spec(spec: str) -> tuple[str, int]:
    """"int8" -> ("int8", 0); "int4/128" -> ("int4", 128)."""
    kind, _, group = spec.partition("/")
    if kind == "int8" and not group:
        return kind, 0
    if kind == "int4" and group.isdigit() and int(group) in GROUP_SIZES:
        return kind, int(group)
    raise ValueError(f"unknown layer quantization {spec!r} (expected 'int8' or 'int4/<{'|'.join(map(str, GROUP_SIZES))}>)")


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether tinygemm takes a layer of this shape with this group size."""
    return (group_size in GROUP_SIZES and in_features % max(group_size, 16 * INNER_K_TILES) == 0
            and out_features % 8 == 0)


# --- the layers ----------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and one scale per output channel (weight-only: activations
    stay in their float dtype). y = (x @ qweight.T) * scale + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = _compute_dtype(dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if _triton_ok(x):
            return _on_kernel(self, x, _kernels().int8_linear, self.qweight, self.scale)
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """`nn.Linear` with 4-bit weights in groups of `group_size` input features, each group with a
    scale and a zero point: w = (q - 8) * scale + zero (tinygemm's convention). On CUDA the
    forward is `model.quant_kernels.int4_linear`; elsewhere it dequantizes, then `F.linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype=None):
        super().__init__()
        if not int4_fits(in_features, out_features, group_size):
            raise ValueError(f"int4 needs in_features a multiple of max(group size, 128) and out_features a "
                             f"multiple of 8; got {in_features} -> {out_features}, group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        dtype = _compute_dtype(dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if _triton_ok(x):
            return _on_kernel(self, x, _kernels().int4_linear, self.qweight, self.scales_and_zeros, self.group_size)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return dequantize_int4(self.qweight, self.scales_and_zeros, self.group_size, dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def _triton_ok(x: Tensor) -> bool:
    """Whether the Triton kernels take these activations (CUDA, half precision)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _on_kernel(layer: nn.Module, x: Tensor, op, *weights) -> Tensor:
    """`layer`'s forward through a `model.quant_kernels` op, which takes rows (M, K)."""
    y = op(x.reshape(-1, layer.in_features).contiguous(), *weights).view(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def _kernels():
    from . import quant_kernels  # Triton: imported only where CUDA is used
    return quant_kernels


QUANTIZED = (Int8Linear, Int4Linear)


def make_layer(spec: str, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> nn.Module:
    """An empty quantized layer of this shape (filled by `load_state_dict`)."""
    kind, group = parse_spec(spec)
    if kind == "int8":
        return Int8Linear(in_features, out_features, bias, device, dtype)
    return Int4Linear(in_features, out_features, bias, group, device, dtype)


def spec_of(layer: nn.Module) -> str:
    return "int8" if isinstance(layer, Int8Linear) else f"int4/{layer.group_size}"


# --- whole models --------------------------------------------------------------------------------

def quantization_plan(module: nn.Module, mode: str, group_size: int = 128) -> dict[str, str]:
    """Which `nn.Linear` of `module` becomes what: {module path: "int8" | "int4/<group size>"}.
    int8 mode: every Linear. int4 mode: int4 where the kernel takes the shape (`int4_fits`),
    int8 otherwise and everywhere inside a `LatentQuantizer`. Linears of a `Codec` stay float."""
    from .codec import Codec
    from .quantizer import LatentQuantizer

    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, not {mode!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
    skip, int8_only = set(), set()
    for m in module.modules():
        if isinstance(m, Codec):
            skip.update(map(id, m.modules()))
        elif isinstance(m, LatentQuantizer):
            int8_only.update(map(id, m.modules()))
    plan = {}
    for name, m in module.named_modules():
        if type(m) is not nn.Linear or id(m) in skip:
            continue
        int4 = mode == "int4" and id(m) not in int8_only and int4_fits(m.in_features, m.out_features, group_size)
        plan[name] = f"int4/{group_size}" if int4 else "int8"
    return plan


def _set(module: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, layer)


def apply_plan(module: nn.Module, plan: Mapping[str, str], quantize: bool = True) -> nn.Module:
    """Replace each `nn.Linear` named in `plan` by its quantized layer, in place. With `quantize`
    (and weights not on `meta`) the layer's weights are quantized; otherwise the layer is left
    empty, to be filled by `load_state_dict` (a model built on `meta` for loading)."""
    for path, spec in plan.items():
        lin = module.get_submodule(path)
        if type(lin) is not nn.Linear:
            raise ValueError(f"{path} is a {type(lin).__name__}, not an nn.Linear to quantize as {spec}")
        w = lin.weight
        layer = make_layer(spec, lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype)
        if quantize and not w.is_meta:
            with torch.no_grad():
                state = {k: v.to(w.dtype) if v.is_floating_point() else v
                         for k, v in quantized_tensors(w.detach(), spec).items()}
                if lin.bias is not None:
                    state["bias"] = lin.bias.detach().clone()
            layer.load_state_dict(state, strict=True)
        _set(module, path, layer)
    return module


def quantize_model(module: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Quantize `module` (a `HertzDev`, or any part of one) in place, weight-only, as
    `quantization_plan` says, and return it."""
    return apply_plan(module, quantization_plan(module, mode, group_size))


def quantization_of(module: nn.Module) -> Optional[dict]:
    """What a checkpoint records: {"mode": "int8" | "int4", "layers": {path: spec}}, or None for a
    float module."""
    layers = {name: spec_of(m) for name, m in module.named_modules() if isinstance(m, QUANTIZED)}
    if not layers:
        return None
    return {"mode": "int4" if any(s.startswith("int4") for s in layers.values()) else "int8", "layers": layers}


def quantize_state(state: Mapping[str, Tensor], plan: Mapping[str, str], device) -> dict[str, Tensor]:
    """A float state dict as the state dict of the same module quantized by `plan`: each planned
    layer's `weight` is read (from a memory-mapped file, say), quantized on `device` a few rows at
    a time and dropped, one layer after another, so no full float copy exists anywhere.
    Other entries are passed through as they are."""
    out = {}
    for key in list(state.keys()):
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and layer in plan:
            out.update({f"{layer}.{k}": v for k, v in quantized_tensors(state[key], plan[layer], device).items()})
        else:
            out[key] = state[key]
    return out


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights held by each part of a `HertzDev` (`quantizer`, `lm`, `resynth`,
    `codec` where present; parameters and persistent buffers, as stored in memory) and `total`."""
    def nbytes(m: nn.Module) -> int:
        n = sum(p.numel() * p.element_size() for p in m.parameters())
        for mod in m.modules():
            n += sum(b.numel() * b.element_size() for name, b in mod.named_buffers(recurse=False)
                     if name not in mod._non_persistent_buffers_set)
        return n
    parts = {name: nbytes(getattr(model, name)) for name in ("quantizer", "lm", "resynth", "codec")
             if getattr(model, name, None) is not None}
    return {**parts, "total": sum(parts.values())}
