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

Kernels: on CUDA int8 layers call the Triton kernels of `model.quant_kernels` (weights read once
and dequantized in registers: a GEMV for one row, a tensor-core tile product for more, the faster
of the two per weight shape timed at first use), registered as custom ops so they sit inside the
compiled block and its CUDA graphs. int4 layers on CUDA with bf16 scales are packed into
tinygemm's tile layout (`Int4Linear.pack`, done by `load_hertz_dev` and `quantize_model`) and run
`aten._weight_int4pack_mm` up to TINYGEMM_MAX_ROWS rows; unpacked ones, larger batches and
gradients use the Triton int4 kernels. Elsewhere (the CPU, float32) the layers dequantize and call
`F.linear`.

Measured on the H200 (benchmarks/quant_kernels.py; every Linear of a hertz_dev step once, one CUDA
graph; benchmarks/results/h200_session6.txt): bf16 cuBLAS 4.76 ms (3.54 TB/s); int8 3.01 ms (2.80
TB/s, 1.58x); int4 tinygemm 2.67 ms at one row, 2.83 at two, 5.89 at eight, 37.7 at 64 (the Triton
int4 kernels: 4.36, 7.47, 7.45, 11.6 ms). Per shape, a layer costs a fixed ~4-5 us beyond its
bytes (the 4096x4096 projection: 13.4 us bf16, 8.8 int8, 6.9 int4, against 4 us for its int8
bytes), which is why int4 gains little over int8 per step. The int8 GEMV makes its floats from the
integers' bits rather than with the int-to-float instruction (`model.quant_kernels.BITS`): the int8
pass 3.00 -> 2.76 ms (3.05 TB/s; benchmarks/results/h200_session14.txt). Tried and measured slower,
so not kept: the dequantisation fused by `torch.compile` (gpt-fast; no faster than bf16 inside the
compiled block, 0.4x at 8 rows); `aten._weight_int8pack_mm` (no real CUDA kernel, 13 ms); GEMVs
that read the weights as int32 words and make floats from their bits (int8 3.45 ms against 3.27,
int4 4.99 against 4.34; session 4); floats from the bits in the tile products and in the int4
GEMV, byte by byte (the int8 tile product 3.06 -> 3.74 ms, the int4 GEMV 4.61 -> 4.92; session
14); an int4 GEMV keeping per-lane sums (no faster; session 14); an int4 GEMV on int32 words making
each weight's float from its bits as 1 + q/16 (one shift and one bitwise op, the scale applied per
word: 4.30 ms a pass against 4.36 at one row, 15.5 against 7.5 at eight; session 16); an int4 tile
product over the high and low nibbles separately (11.2 ms against 7.7); a split-K int8 GEMV (the
last of a row block's programs adding the partial sums: 3.47 ms against 3.01, slower for every
shape; session 6).

Layout: the state dict holds device-independent tensors (`qweight` int8 (N, K), or uint8 (N, K/2)
with two 4-bit values a byte, high nibble first; scales in the model's dtype; a packed int4
layer's state-dict hook unpacks), so a model quantized on one device loads on another.

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

from config.transformer_config import QUANTIZE_MODES as MODES  # "int8", "int4": the names every parser offers
GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm implements
INNER_K_TILES = 8                 # tinygemm's packing, whose shapes the format keeps: in_features a multiple of 16 * 8
TINYGEMM_MAX_ROWS = 16            # a packed int4 layer runs tinygemm up to this many rows, unpacks beyond
_CHUNK = 1 << 20                  # weights are quantized this many elements at a time (bounded scratch)


def _compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype or torch.get_default_dtype()


# --- the quantization formulas -------------------------------------------------------------------

def quantize_int8(w: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(N, K) float -> qweight int8 (N, K), scale (N,) in `dtype` (the model's, as the layer stores
    it) with w ~= qweight * scale[:, None]. Per output channel, symmetric: scale = max|w_row| / 127,
    and the weights are rounded against the scale as stored: a scale that rounds to 0 in float16
    (a row whose weights are all below 7.6e-6) makes a row of zeros, not one of +-127 against a
    zero scale, which no file could hold (`bad_scales`)."""
    w = w.float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(dtype)
    s = scale.float()[:, None]
    return torch.where(s > 0, w / s, 0).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(N, K) float -> qweight uint8 (N, K/2) (two 4-bit values q in [0, 15] a byte, the even
    column in the high nibble), scales_and_zeros (K/group_size, N, 2) in `dtype` (the model's), with
    w ~= (q - 8) * scale + zero in each group (tinygemm's convention): scale = (max - min) / 15,
    zero = min + 8 * scale, and q rounded against the scale and zero as stored (their rounding to
    `dtype` is then part of what q makes up for, not an offset added to every weight)."""
    N, K = w.shape
    wg = w.float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype).float()  # > 0 in every float dtype (float16: 6e-8)
    zero = (lo + 8 * scale).to(dtype).float()
    q = ((wg - zero) / scale + 8).round().clamp(0, 15).to(torch.uint8).view(N, K)
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()  # (K/g, N, 2)
    return pack_nibbles(q), sz


def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) uint8 values in [0, 15] -> (N, K/2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


def quantized_tensors(w: Tensor, spec: str, device=None, dtype: Optional[torch.dtype] = None,
                      name: str = "weight") -> dict[str, Tensor]:
    """The state-dict tensors (`qweight`, `scale` or `scales_and_zeros`) of float weight w (N, K)
    quantized as `spec` ("int8" or "int4/<group size>"), computed on `device` (default: w's), the
    scales in `dtype` (default: w's; the model's, which the weights are rounded against).
    w may be a memory-mapped CPU tensor and device a GPU: it is read, moved and quantized a few
    rows at a time into the preallocated outputs, so the float scratch stays small whatever the
    layer's size. A ValueError naming the layer (`name`) when a scale or zero point is NaN or inf
    (weights holding NaN or inf, or beyond what `dtype` holds): the layer would output NaN."""
    device, dtype = device or w.device, dtype or w.dtype
    kind, group = parse_spec(spec)
    N, K = w.shape
    step = max(1, _CHUNK // K)
    rows = ((r, w[r:r + step].to(device=device, dtype=torch.float32)) for r in range(0, N, step))
    if kind == "int8":
        q = torch.empty(N, K, dtype=torch.int8, device=device)
        scale = torch.empty(N, dtype=dtype, device=device)
        for r, chunk in rows:
            q[r:r + step], scale[r:r + step] = quantize_int8(chunk, dtype)
        out = {"qweight": q, "scale": scale}
    else:
        q = torch.empty(N, K // 2, dtype=torch.uint8, device=device)
        sz = torch.empty(K // group, N, 2, dtype=dtype, device=device)
        for r, chunk in rows:
            q[r:r + step], sz[:, r:r + step] = quantize_int4(chunk, group, dtype)
        out = {"qweight": q, "scales_and_zeros": sz}
    scales = out.get("scale", out.get("scales_and_zeros"))
    if not bool(torch.isfinite(scales).all()):  # one host sync per layer, while quantizing
        cause = ("its weights hold NaN or inf" if not bool(torch.isfinite(w).all())
                 else f"its weights are beyond what {dtype} scales hold")
        what = "scales" if kind == "int8" else "scales or zero points"
        raise ValueError(f"{name}: quantized as {spec}, its {what} would be NaN or inf ({cause}): "
                         "quantize a model of finite weights")
    return out


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
    kind, _, group = spec.partition("/") if isinstance(spec, str) else (None, "", "")
    if kind == "int8" and not group:
        return kind, 0
    if kind == "int4" and group.isdigit() and int(group) in GROUP_SIZES:
        return kind, int(group)
    raise ValueError(f"unknown layer quantization {spec!r} (expected 'int8' or 'int4/<{'|'.join(map(str, GROUP_SIZES))}>)")


# --- tinygemm's tile layout (CUDA) ---------------------------------------------------------------
# `torch.ops.aten._convert_weight_to_int4pack` turns our (N, K/2) nibbles into int32 words
# (N/8, K/128, 32, 4): one tile of 8 rows x 128 columns a (row tile, column tile), its 1024 nibbles
# permuted for the tensor-core fragments. The permutation within a tile is found once by packing
# probe tiles whose nibbles spell their own positions, which gives the exact inverse without
# restating tinygemm's layout here.

_TILE = (8, 16 * INNER_K_TILES)
_TILE_ORDER: dict[str, Tensor] = {}


def _nibbles(words: Tensor) -> Tensor:
    """int32 words (R, C, 32, 4) -> uint8 (R, C, 1024): each tile's nibbles, byte by byte, low first."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape[:2], -1)
    return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)


def _tile_order(device) -> Tensor:
    """For each nibble of a packed tile (`_nibbles` order), its position in the row-major tile."""
    if "order" not in _TILE_ORDER:
        n, k = _TILE
        pos = torch.arange(n * k, device="cuda")
        src = torch.zeros(n * k, dtype=torch.long, device="cuda")
        for digit in range(3):  # 1024 positions: three 4-bit digits, one probe each
            probe = ((pos >> 4 * digit) & 15).to(torch.uint8).view(n, k)
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(probe), INNER_K_TILES)
            src |= _nibbles(packed).flatten().long() << 4 * digit
        if not torch.equal(src.sort().values, pos):
            raise RuntimeError("tinygemm's int4 layout is not a permutation within 8 x 128 tiles in this "
                               "PyTorch build; int4 layers cannot be packed")
        _TILE_ORDER["order"] = src
    key = str(device)
    if key not in _TILE_ORDER:
        _TILE_ORDER[key] = _TILE_ORDER["order"].to(device)
    return _TILE_ORDER[key]


def to_tinygemm(qweight: Tensor) -> Tensor:
    """Our (N, K/2) uint8 nibbles (on CUDA) -> tinygemm's int32 words, the same bytes."""
    packed = torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), INNER_K_TILES)
    _tile_order(qweight.device)  # checks the layout once, before any layer is packed
    return packed


def from_tinygemm(packed: Tensor) -> Tensor:
    """Inverse of `to_tinygemm`, on the packed tensor's device (any, once a layer was packed)."""
    R, C = packed.shape[:2]
    (n, k), nib = _TILE, _nibbles(packed)
    tiles = torch.empty_like(nib)
    tiles[..., _tile_order(packed.device)] = nib
    return pack_nibbles(tiles.view(R, C, n, k).transpose(1, 2).reshape(R * n, C * k))


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
        if x.dtype == torch.float16:  # x @ q reaches 127 / scale times the output: past float16's range
            y = F.linear(x, self.dequantize(x.dtype))
        else:
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
    scale and a zero point: w = (q - 8) * scale + zero (tinygemm's convention).

    Forward: after `pack()` (CUDA, bf16 scales; `pack_int4` packs a whole model, as
    `load_hertz_dev` and `quantize_model` do on CUDA) the weights sit in tinygemm's tile layout
    and up to TINYGEMM_MAX_ROWS rows run `aten._weight_int4pack_mm` (tinygemm: 1.6x our GEMV at
    one row, 2.6x our tile product at two, benchmarks/results/h200_session6.txt); more rows (a
    prefill), and activations that need a gradient, unpack the layer's weights for that call and
    take the unpacked path. Unpacked on CUDA: `model.quant_kernels.int4_linear`; elsewhere:
    dequantize, then `F.linear`. The state dict always holds the portable (N, K/2) nibbles."""

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
        self.register_state_dict_post_hook(_portable_qweight)

    @property
    def packed(self) -> bool:
        """Whether the weights are in tinygemm's layout (`pack`)."""
        return self.qweight.dim() == 4

    def pack(self) -> None:
        """Put the weights in tinygemm's layout where its kernel runs (CUDA, bf16 scales), in place
        (same bytes); elsewhere nothing changes."""
        if not self.packed and self.qweight.is_cuda and self.scales_and_zeros.dtype == torch.bfloat16:
            self.qweight = to_tinygemm(self.qweight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"  # portable nibbles into a packed layer: packed as they load
        if self.packed and key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = to_tinygemm(state_dict[key].to(self.qweight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        qweight = self.qweight
        if self.packed:
            if (x.dtype == torch.bfloat16 and x.numel() <= TINYGEMM_MAX_ROWS * self.in_features
                    and not (x.requires_grad and torch.is_grad_enabled())):
                return _on_kernel(self, x, torch.ops.aten._weight_int4pack_mm, qweight, self.group_size,
                                  self.scales_and_zeros)
            qweight = from_tinygemm(qweight)  # the portable layout, for the paths below
        if _triton_ok(x):
            return _on_kernel(self, x, _kernels().int4_linear, qweight, self.scales_and_zeros, self.group_size)
        w = dequantize_int4(qweight, self.scales_and_zeros, self.group_size, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        qweight = from_tinygemm(self.qweight) if self.packed else self.qweight
        return dequantize_int4(qweight, self.scales_and_zeros, self.group_size, dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def _portable_qweight(module: Int4Linear, state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: a packed layer's weights as the portable nibbles."""
    if module.packed:
        state[prefix + "qweight"] = from_tinygemm(state[prefix + "qweight"])


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


# A decode step's products with what surrounds them in a block (`block_linear`): True, one GEMV
# each on CUDA for an int8 layer and one row, the LayerNorm before, SwiGLU's gating and the
# residual add after inside it (four kernels fewer a block: 160 a duplex hertz_dev step, counted
# from the blocks, not measured). Measured
# once, on an H100 (session 42, benchmarks/results/h100_session42.txt): int8 live step 5.36 ms p50
# against 5.49, 650 kernels a step against 794. Off until its two CUDA tests have run on a GPU
# (tests/test_quant.py -k fused; no GPU ran them yet): `benchmarks/inference.py --fused-linears`.
FUSED_LINEARS = False


def block_linear(layer: nn.Module, x: Tensor, norm: Optional[nn.Module] = None, swiglu: bool = False,
                 residual: Optional[Tensor] = None) -> Tensor:
    """residual + f(layer(norm(x))), how the transformer blocks apply their products: `norm` a
    LayerNorm module (its `weight`, no bias, and `eps`) or None; f SwiGLU, up * silu(gate) over
    the two halves of the output, when `swiglu`; `residual` None or a tensor of the result's shape.
    With FUSED_LINEARS, one row through a bias-free `Int8Linear` on CUDA, with a bias-free norm, a
    residual of x's dtype and nothing that needs a gradient (a decode step), is one Triton GEMV
    (`model.quant_kernels.int8_block_linear`), each intermediate rounded where the operations
    round it; everything else (float and int4 layers, LoRA, training, the CPU) runs the operations
    one after another, exactly as before."""
    if (FUSED_LINEARS and type(layer) is Int8Linear and layer.bias is None and _triton_ok(x)
            and x.numel() == layer.in_features and getattr(norm, "bias", None) is None
            and (residual is None or residual.dtype == x.dtype)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                     (x, residual, getattr(norm, "weight", None))))):
        out = layer.out_features // 2 if swiglu else layer.out_features
        y = _kernels().int8_block_linear(
            x.reshape(1, -1).contiguous(), layer.qweight, layer.scale, None if norm is None else norm.weight,
            0.0 if norm is None else float(norm.eps), swiglu,
            None if residual is None else residual.reshape(1, out).contiguous())
        return y.view(*x.shape[:-1], out)
    y = layer(x if norm is None else norm(x))
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = up * F.silu(gate)
    return y if residual is None else residual + y


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
    int8 otherwise and everywhere inside a `LatentQuantizer`. Linears of a `Codec` stay float.

    Layers already quantized as this plan would quantize them are left as they are (absent from the
    plan); a ValueError names a layer quantized otherwise (another mode or group size: it would stay
    so, requantizing is not supported) and a float layer carrying LoRA adapters (it would stay
    float: quantize the base first, then adapt it, as `load_hertz_dev(quantize=, adapter=)` does)."""
    from .checkpoint import listed
    from .codec import Codec
    from .lora import LoRALinear
    from .quantizer import LatentQuantizer

    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, not {mode!r}")
    if type(group_size) is not int or group_size not in GROUP_SIZES:  # 128.0 == 128 would pass, then fail later
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size!r}")
    if type(module) is nn.Linear or isinstance(module, QUANTIZED):
        raise ValueError(f"a bare {type(module).__name__} cannot be quantized in place (it would have to replace "
                         "itself): quantize the module that holds it")
    skip, int8_only = set(), set()
    for m in module.modules():
        if isinstance(m, Codec):
            skip.update(map(id, m.modules()))
        elif isinstance(m, LatentQuantizer):
            int8_only.update(map(id, m.modules()))
    plan, other, adapted = {}, [], []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.Linear, *QUANTIZED)) or id(m) in skip:
            continue
        int4 = mode == "int4" and id(m) not in int8_only and int4_fits(m.in_features, m.out_features, group_size)
        spec = f"int4/{group_size}" if int4 else "int8"
        if isinstance(m, QUANTIZED):
            if spec_of(m) != spec:
                other.append(f"{name} ({spec_of(m)}, not {spec})")
        elif isinstance(m, LoRALinear):
            adapted.append(name)
        elif type(m) is nn.Linear:
            plan[name] = spec
    if other:
        raise ValueError(f"cannot quantize as {mode}" + (f" in groups of {group_size}" if mode == "int4" else "")
                         + f": {len(other)} layers are already quantized otherwise ({listed(other)}); requantizing "
                         "quantized weights is not supported: quantize the float model")
    if adapted:
        raise ValueError(f"cannot quantize {len(adapted)} layers that carry LoRA adapters ({listed(adapted)}): they "
                         "would stay float; quantize the base before adapting it (load_hertz_dev(..., quantize=, "
                         "adapter=))")
    return plan


def _set(module: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, layer)


def apply_plan(module: nn.Module, plan: Mapping[str, str], quantize: bool = True) -> nn.Module:
    """Replace each `nn.Linear` named in `plan` by its quantized layer, in place. With `quantize`
    (and weights not on `meta`) the layer's weights are quantized; otherwise the layer is left
    empty, to be filled by `load_state_dict` (a model built on `meta` for loading). A ValueError
    naming the layers when one is not an `nn.Linear`, or (`quantize`) holds NaN or inf: nothing
    is changed then."""
    layers = {path: module.get_submodule(path) if path else None for path in plan}
    if wrong := [f"{p or '(the module itself)'} ({type(m).__name__})" for p, m in layers.items() if type(m) is not nn.Linear]:
        raise ValueError(f"{len(wrong)} layers of the plan are not nn.Linear layers to quantize: {', '.join(wrong[:4])}")
    if quantize and (bad := [p for p, m in layers.items() if not m.weight.is_meta and not bool(torch.isfinite(m.weight).all())]):
        raise ValueError(f"{len(bad)} layers hold NaN or inf weights ({', '.join(bad[:4])}"
                         + (", ..." if len(bad) > 4 else "") + "): quantize a model of finite weights; nothing was changed")
    for path, spec in plan.items():
        lin = layers[path]
        w = lin.weight
        layer = make_layer(spec, lin.in_features, lin.out_features, lin.bias is not None, w.device, w.dtype)
        if quantize and not w.is_meta:
            with torch.no_grad():
                state = quantized_tensors(w.detach(), spec, name=path)  # the scales in the weights' dtype
                if lin.bias is not None:
                    state["bias"] = lin.bias.detach().clone()
            layer.load_state_dict(state, strict=True)
        _set(module, path, layer)
    return module


def quantize_model(module: nn.Module, mode: str, group_size: int = 128, pack: bool = True) -> nn.Module:
    """Quantize `module` (a `HertzDev`, or any part of one) in place, weight-only, as
    `quantization_plan` says, and return it; `pack`: int4 layers in tinygemm's layout on CUDA
    (`pack_int4`: for decode steps; a LoRA base, whose layers need a backward, and a model run on
    whole sequences, more rows than tinygemm takes, stay unpacked)."""
    apply_plan(module, quantization_plan(module, mode, group_size))
    return pack_int4(module) if pack else module


def pack_int4(module: nn.Module) -> nn.Module:
    """Every `Int4Linear` of `module` into tinygemm's layout where it runs (`Int4Linear.pack`),
    one layer at a time; returns `module`."""
    for m in module.modules():
        if isinstance(m, Int4Linear):
            m.pack()
    return module


def zero_underflowed_rows(module: nn.Module) -> nn.Module:
    """Each `Int8Linear` row of `module` whose scale is 0 made a row of zeros (what `quantize_int8`
    makes of it): a scale quantized in float32 rounds to 0 when the model is cast to float16 for a
    row of weights below ~1e-5, and +-127 against a zero scale is what no file may hold
    (`bad_scales`). Returns `module`."""
    for m in module.modules():
        if isinstance(m, Int8Linear) and not m.qweight.is_meta:
            m.qweight.masked_fill_((m.scale == 0)[:, None], 0)
    return module


def quantization_of(module: nn.Module) -> Optional[dict]:
    """What a checkpoint records: {"mode": "int8" | "int4", "layers": {path: spec}}, or None for a
    float module."""
    layers = {name: spec_of(m) for name, m in module.named_modules() if isinstance(m, QUANTIZED)}
    return {"mode": mode_of(layers), "layers": layers} if layers else None


def mode_of(layers: Mapping[str, str]) -> Optional[str]:
    """The mode a checkpoint records for its quantized `layers` ({path: spec}): "int4" if any is
    int4, "int8" if all are int8, None for none."""
    if not layers:
        return None
    return "int4" if any(str(s).startswith("int4") for s in layers.values()) else "int8"


def quantize_state(state: Mapping[str, Tensor], plan: Mapping[str, str], device,
                   dtype: Optional[torch.dtype] = None, prefix: str = "") -> dict[str, Tensor]:
    """A float state dict as the state dict of the same module quantized by `plan`: each planned
    layer's `weight` is read (from a memory-mapped file, say), quantized on `device` a few rows at
    a time and dropped, one layer after another, so no full float copy exists anywhere. The scales
    are in `dtype` (the model's; default: each weight's), which the weights are rounded against.
    Other entries are passed through as they are. A layer whose scales would be NaN or inf is a
    ValueError naming it (`prefix` + its path: "lm." for the LM's state)."""
    out = {}
    for key in list(state.keys()):
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and layer in plan:
            out.update({f"{layer}.{k}": v
                        for k, v in quantized_tensors(state[key], plan[layer], device, dtype, prefix + layer).items()})
        else:
            out[key] = state[key]
    return out


def bad_scales(state: Mapping[str, Tensor], layers: Mapping[str, str]) -> list[str]:
    """The layers of `layers` ({path: spec}, a checkpoint's recorded quantization) whose scales in
    `state` no quantization makes: int8, a negative scale, or a zero one on a row of nonzero integers
    (a row of zero weights quantizes to zeros, whose scale may round to 0 in float16); int4, a scale
    that is not positive. Tensors missing are `check_tensors`' to name, NaN `verify_content`'s."""
    bad = []
    for path, spec in layers.items():
        if spec == "int8":
            scale, q = state.get(f"{path}.scale"), state.get(f"{path}.qweight")
            if scale is not None and q is not None and scale.shape == q.shape[:1] and (
                    bool((scale < 0).any()) or bool((q[scale == 0] != 0).any())):  # reads the zero-scale rows only
                bad.append(path)
        elif (sz := state.get(f"{path}.scales_and_zeros")) is not None and not bool((sz[..., 0] > 0).all()):
            bad.append(path)
    return bad


def overflowing_scales(state: Mapping[str, Tensor], layers: Mapping[str, str], dtype: torch.dtype) -> list[str]:
    """The scale tensors (`<path>.scale`, `<path>.scales_and_zeros`) of the quantized `layers`
    ({path: spec}) in `state` whose weights are beyond what `dtype` holds, the scales cast to it as
    the model holds them: int8, 127 * scale (a scale of 1e3 in float16, 3e37 in bfloat16 or float32,
    3.4e38 in float32 cast to bfloat16); int4, (q - 8) * scale + zero at q = 0 and 15. Finite in the
    file, these weights are inf in the model and its outputs NaN. Only the scales are read; NaN and
    inf already in the file are `verify_content`'s."""
    def ends(t: Tensor) -> Tensor:  # the largest |weight| the layer's scales make, in float64
        t = t.double()
        if t.dim() == 1:  # int8's (N,) scales
            return 127 * t.abs().amax()[None]
        scale, zero = t[..., 0], t[..., 1]  # int4's (K/g, N, 2)
        return torch.stack([(zero - 8 * scale).abs().amax(), (zero + 7 * scale).abs().amax()])

    bad = []
    for path, spec in layers.items():
        name = f"{path}.scale" if spec == "int8" else f"{path}.scales_and_zeros"
        t = state.get(name)
        if t is None or not t.is_floating_point() or not t.numel():
            continue  # check_tensors' to name
        if bool(torch.isfinite(ends(t)).all()) and not bool(torch.isfinite(ends(t.to(dtype)).to(dtype)).all()):
            bad.append(name)
    return bad


def parameter_count(module: nn.Module) -> int:
    """The parameters of `module`, each quantized linear layer's counted as the `nn.Linear` it
    replaces (in_features * out_features, plus its bias): they hold their weights as buffers, so a
    count of `parameters()` alone left them out (a quantized model's came to its norms alone)."""
    n = sum(p.numel() for p in module.parameters())
    for layer in module.modules():
        if isinstance(layer, (Int8Linear, Int4Linear)):
            n += layer.in_features * layer.out_features + (layer.bias.numel() if layer.bias is not None else 0)
    return n


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
