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

Kernels (../shared/notes/h200-linear-kernels.md, H200, eight LM-sized layers, batch 1): int8
computes `F.linear(x, w.to(x.dtype)) * scale`, which `torch.compile` fuses into one read of the
int8 weights when the whole step is one compiled region (0.527 ms against 0.897 ms in bf16;
`aten._weight_int8pack_mm` has no real CUDA kernel: 13.2 ms); int4 on CUDA calls tinygemm,
`aten._weight_int4pack_mm` (0.512 ms). On the CPU, int4 dequantizes in the forward (for tests).
Measured here on four hertz_dev LM layers and both heads, one cached step replayed from a CUDA
graph (B=1): bf16 0.92 ms eager, 0.73 ms compiled; int4 0.74 eager, 0.50-0.52 compiled; int8 3.9
eager (the cast makes a bf16 copy of each weight), 0.80-1.03 compiled with inductor's
`coordinate_descent_tuning` and 9.2 without it: in the model, this int8 kernel is no faster than
bf16 (it halves the memory only). At B=8: bf16 1.0-1.1, int4 1.2, int8 24 ms compiled.

Layout: the state dict always holds the device-independent form (`qweight` int8 (N, K), or uint8
(N, K/2) with two 4-bit values a byte, high nibble first; float scales), so a model quantized on
one device loads on another. On CUDA an `Int4Linear` holds its weights in tinygemm's packed
layout instead (converted when the module is moved there, as the loader does, and read back for
`state_dict()`), so only one copy is ever in memory.

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
INNER_K_TILES = 8                 # tinygemm packing: in_features must be a multiple of 16 * 8
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
        # Under torch.compile the cast fuses into the matmul's read of the int8 weights.
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return (self.qweight.float() * self.scale.float()[:, None]).to(dtype or self.scale.dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """`nn.Linear` with 4-bit weights in groups of `group_size` input features, each group with a
    scale and a zero point: w = (q - 8) * scale + zero. On CUDA the forward is tinygemm
    (`aten._weight_int4pack_mm`, bf16 activations); elsewhere it dequantizes, then `F.linear`."""

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
        self._pack_for_device()

    @property
    def packed(self) -> bool:
        """Whether the weights are in tinygemm's CUDA layout (int32) rather than the portable one."""
        return self.qweight.dtype == torch.int32

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size,
                                                   self.scales_and_zeros.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_nibbles(self._portable_qweight()).view(N, K // g, g).float()
        sz = self.scales_and_zeros.float()
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (N, K/g, 1)
        return ((q - 8) * scale + zero).view(N, K).to(dtype or self.scales_and_zeros.dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")

    # --- the CUDA layout ---------------------------------------------------------------------

    def _pack_for_device(self) -> None:
        if self.qweight.is_cuda and not self.packed:
            self.qweight = torch.ops.aten._convert_weight_to_int4pack(self.qweight.contiguous(), INNER_K_TILES)

    def _portable_qweight(self) -> Tensor:
        """The (N, K/2) uint8 form, read back from tinygemm's layout where needed: multiplying the
        identity by the weights with scale 1 and zero 8 gives q exactly (integers below 16 are
        exact in bf16), without depending on how the layout orders its nibbles."""
        if not self.packed:
            return self.qweight
        N, K, g = self.out_features, self.in_features, self.group_size
        dev = self.qweight.device
        sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=dev).expand(K // g, N, 2).contiguous()
        q = torch.empty(N, K, dtype=torch.uint8, device=dev)
        step = 1024
        for k0 in range(0, K, step):
            n = min(step, K - k0)
            eye = torch.zeros(n, K, dtype=torch.bfloat16, device=dev)
            eye.diagonal(offset=k0).fill_(1)
            q[:, k0:k0 + n] = torch.ops.aten._weight_int4pack_mm(eye, self.qweight, g, sz).t().to(torch.uint8)
        return pack_nibbles(q)

    def _apply(self, fn, recurse=True):
        if self.packed and fn(torch.empty(0, device=self.qweight.device)).device != self.qweight.device:
            self.qweight = self._portable_qweight()  # leaving CUDA: tinygemm's layout means nothing elsewhere
        super()._apply(fn, recurse)
        self._pack_for_device()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "qweight"] = self._portable_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The state dict holds the portable layout. A packed layer loads into a portable one and
        # packs again; a portable one (built on `meta`, filled with `assign=True`) stays so until
        # it is moved (`_apply`), when the loader no longer holds the loaded tensor: packing here
        # would keep both copies of every layer alive until loading ends.
        was_packed = self.packed
        if was_packed:
            self.qweight = (torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                        device=self.qweight.device)
                            if prefix + "qweight" in state_dict else self._portable_qweight())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_packed:
            self._pack_for_device()


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
