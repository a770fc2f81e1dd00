"""LoRA: low-rank adapters on the frozen linear layers of the LM and the resynthesizer, and
adapter files.

An adapted layer computes y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank), A (rank, in)
kaiming-uniform and B (out, rank) zero at the start (as PEFT and moshi-finetune), so a freshly
adapted model computes exactly what its base does. The base's own weights are frozen.

The layer stays the same object, under the same path, with the same parameter names: adapting
swaps its class for a subclass of `LoRALinear` and its own class (as `torch.nn.utils.parametrize`
and FSDP2's `fully_shard` do) and adds two parameters, `<path>.lora_A` and `<path>.lora_B`. So
the base keys of an adapted model are the official keys, one module owns each weight (nothing for
`load_state_dict(assign=True)`, `.to()` or sharding to get out of step), and any layer with
`in_features`, `out_features` and a forward `base(x)` can be adapted: `nn.Linear`, or the int8 and
int4 layers of `model/quant.py` (QLoRA-style).

Precision: A and B are float32 master weights. The forward casts them to the input's dtype
(bfloat16 for a bfloat16 base), as autocast would: the adapter's matmuls run at the base's speed
and no float32 copy of the activations is made, while gradients and optimizer updates accumulate
in float32. (H200, a 4096 -> 12288 layer, 4096 tokens, rank 128, forward + backward: 2.18 ms,
against 1.89 ms for the frozen bf16 layer alone and 3.72 ms with the adapter path in float32.)
Casting the model (`.to(dtype)`) after adapting it casts the adapters too: adapt the model in the
dtype it will train in.

Adapter files are our `.safetensors` format (`model/checkpoint.py`) of kind "adapter": the
adapter tensors (keys relative to the `HertzDev`, e.g. `lm.layers.0.attn.attn.proj_qkv.lora_A`),
the `LoRAConfig`, and the fingerprint of the base they were trained on (`base_fingerprint`).

    cfg = LoRAConfig(rank=128, alpha=256.0, targets="both", parts=("lm",))
    apply_lora(model, **dataclasses.asdict(cfg))           # then train the adapters
    save_adapter("run/latest.adapter.safetensors", model, cfg, base_fingerprint("duplex"), "duplex")
    load_adapter(fresh, "run/latest.adapter.safetensors", base_fingerprint("duplex"))
    merge_lora(fresh)                                       # fold into the float weights
    load_hertz_dev("duplex", adapter="run/latest.adapter.safetensors", merge=True)  # the same, in one call
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from config import OneLine
from . import hub
from .checkpoint import (HASH_KEY, _header, atomic_write, config_from, file_kind, header_json,
                         listed, verify_content, write_weights)

# Layers adapted, by the last component of their path: the attention's fused q/k/v and output
# projections, the SwiGLU's fused gate/up and down projections (model/transformer.py; in every
# transformer block of the LM, `layers.N.*`, and of the resynthesizer, `stack.layers.N.*`).
# "all" adds the output heads (the LM's code heads, the resynthesizer's mixture heads): a new
# voice or style shifts which codes follow which, and the heads are where full fine-tuning moves
# most. The latent input projections (32 inputs) and the plex projections are never adapted.
HEADS = ("output", "fc_loc", "fc_scale", "fc_weight")
TARGETS = {
    "attention": ("proj_qkv", "attn_out"),
    "feedforward": ("gateup_proj", "down_proj"),
    "both": ("proj_qkv", "attn_out", "gateup_proj", "down_proj"),
    "all": ("proj_qkv", "attn_out", "gateup_proj", "down_proj", *HEADS),
}
PARTS = ("lm", "resynth")
KIND = "adapter"
ADAPTER_SUFFIX = ".adapter.safetensors"  # the trainer's exports: latest.adapter.safetensors, best...
# The largest alpha / rank: B starts at zero and Adam moves it about a learning rate a step, so the
# scale multiplies the adapters' steps as a learning rate would (PEFT's and moshi-finetune's scales
# are 1-2, QLoRA's 0.25). 1e300 / 4 is inf in float32: every output NaN at the first step.
MAX_SCALE = 1e4


class AdapterError(OneLine, ValueError):
    """An adapter that does not belong to this base or this model, or cannot be merged."""


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter file records about its adapters."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: Literal["attention", "feedforward", "both", "all"] = "both"
    parts: tuple[str, ...] = PARTS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"lora rank must be a positive integer, not {self.rank!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):  # an infinite scale makes every output NaN
            raise ValueError(f"lora alpha must be positive and finite, not {self.alpha!r}")
        if self.scale > MAX_SCALE:
            raise ValueError(f"lora_alpha / lora_rank = {self.alpha:g} / {self.rank} = {self.scale:g}, the adapters' "
                             f"scale, is above {MAX_SCALE:g}: it multiplies the adapters' steps as a learning rate "
                             "would (1-2 is usual); lower lora_alpha")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), not {self.dropout!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"lora targets must be one of {', '.join(TARGETS)}, not {self.targets!r}")
        if not self.parts or any(p not in PARTS for p in self.parts) or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"lora parts must be some of {', '.join(PARTS)}, not {self.parts!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --- the adapted layer ---------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """The adapted form of a linear layer: `add_lora` turns a layer of class C into an instance
    of a subclass of (LoRALinear, C), whose forward is C's plus the low-rank update.

    lora_A: (rank, in_features) float32; lora_B: (out_features, rank) float32, zero at the start.
    """
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_alpha: float
    lora_dropout: float
    base_class: type  # the layer's class before adapting (what `merge_lora` restores)

    @property
    def lora_rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        # The scale goes on B (out, rank), not on the (..., out) product: one less pass over it.
        delta = F.linear(F.linear(h, self.lora_A.to(h.dtype)), (self.lora_B * self.lora_scale).to(h.dtype))
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}")


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    """One adapted class per base class, so every adapted layer of a model shares it."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {"__module__": __name__, "base_class": cls})
    return _CLASSES[cls]


def add_lora(layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
    """Adapt `layer` in place (see the module docstring): freeze its own parameters, add
    `lora_A` (kaiming-uniform) and `lora_B` (zeros) in float32 on its device; returns the layer."""
    if isinstance(layer, LoRALinear):
        raise AdapterError(f"this {type(layer).__name__} already has an adapter")
    if not (isinstance(getattr(layer, "in_features", None), int) and isinstance(getattr(layer, "out_features", None), int)):
        raise AdapterError(f"a {type(layer).__name__} has no in_features/out_features: only linear layers take an adapter")
    weights = next(itertools.chain(layer.parameters(), layer.buffers()), None)  # quantized layers hold buffers
    device = weights.device if weights is not None else None
    layer.requires_grad_(False)
    layer.__class__ = _lora_class(type(layer))
    layer.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, device=device, dtype=torch.float32))
    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, device=device, dtype=torch.float32))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
    layer.lora_alpha = float(alpha)
    layer.lora_dropout = float(dropout)
    return layer


# --- whole models --------------------------------------------------------------------------------

def lora_targets(model: nn.Module, targets: str, parts=PARTS) -> list[str]:
    """Paths (relative to `model`, a `HertzDev`) of the layers `targets` names in `parts`."""
    names = TARGETS[targets]
    return [f"{part}.{path}" for part in parts for path, m in getattr(model, part).named_modules()
            if path.rpartition(".")[2] in names and hasattr(m, "in_features")]  # `lm.output` holds `lm.output.output`


def adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """{path: layer} of the adapted layers of `model`."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets: str = "both", rank: int = 128, alpha: float = 256.0,
               dropout: float = 0.0, parts=PARTS) -> list[str]:
    """Freeze every parameter of `model` (a `HertzDev`) and adapt the layers of `parts` ("lm",
    "resynth") that `targets` names: "attention" (`*.attn.attn.proj_qkv`, `*.attn.attn.attn_out`),
    "feedforward" (`*.ffnn.ffnn.gateup_proj`, `*.ffnn.ffnn.down_proj`), "both", or "all" (both
    and the output heads, `HEADS`). Returns the
    adapted paths; afterwards the trainable parameters of `model` are exactly the adapters."""
    cfg = LoRAConfig(rank, alpha, dropout, targets, tuple(parts))
    paths = lora_targets(model, cfg.targets, cfg.parts)
    if not paths:
        raise AdapterError(f"no {targets} layers found in {', '.join(parts)}")
    if adapted(model):
        raise AdapterError("the model already has adapters: apply them to a model without")
    model.requires_grad_(False)
    for path in paths:
        add_lora(model.get_submodule(path), cfg.rank, cfg.alpha, cfg.dropout)
    return paths


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of `model` only: {`<path>.lora_A`: ..., `<path>.lora_B`: ...}."""
    out = {}
    for path, m in adapted(model).items():
        out[f"{path}.lora_A"] = m.lora_A.detach()
        out[f"{path}.lora_B"] = m.lora_B.detach()
    return out


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its layer's float weight, W += B @ A * alpha / rank (computed in
    float32, stored in W's dtype), and turn the layers back into their own class; returns the
    merged paths. A quantized base (int8/int4 layers) is refused, before anything is changed:
    rounding the sum to the base's grid would lose most of the adapter; load the base unquantized
    to merge, or keep the adapter unmerged. So is a sum that W's dtype cannot hold (NaN or inf: an
    adapter of huge values, or float16 weights), naming the layer."""
    layers = adapted(model)
    for path, m in layers.items():
        w = dict(m.named_parameters(recurse=False)).get("weight")
        if w is None or not w.is_floating_point():
            raise AdapterError(f"cannot merge the adapter of {path} into a {m.base_class.__name__} (quantized "
                               "weights): load the base without quantization to merge, or keep the adapter unmerged")

    def merged(m: nn.Module) -> Tensor:
        w = m.weight
        return (w.float() + (m.lora_B.float() @ m.lora_A.float()).to(w.device) * m.lora_scale).to(w.dtype)

    with torch.no_grad():
        # every sum checked before the first layer changes (each computed twice: a merge is done once, when loading)
        for path, m in layers.items():
            if not bool(torch.isfinite(merged(m)).all()):
                raise AdapterError(f"merging the adapter into {path} makes weights NaN or inf in "
                                   f"{str(m.weight.dtype)[6:]} (its values are beyond what that dtype holds): load the "
                                   "base in float32, or keep the adapter unmerged")
        for path, m in layers.items():
            w = m.weight
            sum_ = merged(m)
            cls = m.base_class
            del m.lora_A, m.lora_B, m.lora_alpha, m.lora_dropout
            m.__class__ = cls
            # A new tensor rather than writing in place: the weight may map an official file.
            m.weight = nn.Parameter(sum_, requires_grad=w.requires_grad)
    return list(layers)


# --- fingerprints of bases -----------------------------------------------------------------------

def base_fingerprint(source: Union[str, os.PathLike]) -> str:
    """What identifies a base model: for an official variant, the md5s of its quantizer, LM and
    resynthesizer files (from the table in model/hub.py; nothing is read), "official:NAME=MD5,...";
    for one of our checkpoints, the content hash its metadata holds, "content-sha256:HEX", or, for
    a file without one, the SHA-256 of its bytes, "file-sha256:HEX"."""
    if str(source) in hub.VARIANTS:
        lm, resynth, _ = hub.VARIANTS[str(source)]
        return "official:" + ",".join(f"{n}={hub.OFFICIAL_FILES[n].md5}" for n in (hub.QUANTIZER, lm, resynth))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{str(source)!r} is neither an official variant ({', '.join(hub.VARIANTS)}) "
                                "nor an existing checkpoint file")
    stored = _header(path).get(HASH_KEY)
    if stored:
        return f"content-sha256:{stored}"
    return f"file-sha256:{hub.file_digest(path, 'sha256')}"


# --- adapter files -------------------------------------------------------------------------------

def save_adapter(path: Union[str, os.PathLike], model: nn.Module, config: LoRAConfig, base_fingerprint: str,
                 base_source: Optional[str] = None) -> Path:
    """Write the adapters of `model` (made by `apply_lora` with `config`), `config` and the
    fingerprint of their base (`base_source`, e.g. "duplex" or a path, is recorded for messages)
    to one `.safetensors` file, atomically."""
    layers = adapted(model)
    expected = lora_targets(model, config.targets, config.parts)
    wrong = [p for p, m in layers.items() if m.lora_rank != config.rank or m.lora_alpha != config.alpha]
    if sorted(layers) != sorted(expected) or wrong:
        raise AdapterError(f"the model's adapters ({len(layers)} layers) are not those of {config}")
    return atomic_write(path, lambda tmp: write_adapter(tmp, lora_state_dict(model), config, base_fingerprint,
                                                        base_source, label=str(path)))


def write_adapter(path: Union[str, os.PathLike], state: dict[str, Tensor], config: LoRAConfig, base_fingerprint: str,
                  base_source: Optional[str] = None, extra: Optional[dict] = None, label: Optional[str] = None) -> None:
    """Adapter tensors `state` (as `lora_state_dict` returns them), in float32, with `config`, the
    base's fingerprint and `extra` (e.g. the training step), written to `path` directly (the
    trainer's checkpoints write to a temporary file and rename it). Raises CheckpointError, writing
    nothing, if a tensor holds NaN or inf."""
    write_weights(path, {k: v.float() for k, v in state.items()}, KIND, config,
                  {**(extra or {}), "base_fingerprint": base_fingerprint, "base_source": base_source}, label)


def read_adapter(path: Union[str, os.PathLike]) -> tuple[LoRAConfig, dict]:
    """(config, extra) of an adapter file, from its header (no tensors are read); extra holds
    `base_fingerprint` and `base_source`."""
    path = Path(path)
    if path.is_dir():  # a run's folder, say: name the adapter files it holds
        found = sorted(str(p) for p in path.glob(f"*{ADAPTER_SUFFIX}"))
        raise AdapterError(f"{path} is a folder, not an adapter file: " + (
            f"pass one of its adapter files, {listed(found)}" if found else
            f"it holds no *{ADAPTER_SUFFIX} file (a LoRA run exports best{ADAPTER_SUFFIX} in its checkpoint_dir)"))
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    found = file_kind(path)
    if found != KIND:  # a model, a training state, a file cut short, a foreign file: say which
        beside = path.with_suffix(ADAPTER_SUFFIX)
        hint = (f"; the adapter exported beside it is {beside}" if found.endswith("training state") and beside.is_file()
                else "")
        found += " checkpoint" if found in ("codec", "transformer") else ""
        raise AdapterError(f"{path} is not an adapter file: it is {'an' if found[0] in 'aeiou' else 'a'} {found}{hint}")
    meta = _header(path)
    config = config_from(LoRAConfig, header_json(path, meta, "config"), path, strict=True)
    return config, header_json(path, meta, "extra", {})


def check_adapter(path: Union[str, os.PathLike], expected_fingerprint: str, source: Optional[str] = None) -> LoRAConfig:
    """The config of the adapter at `path`, after checking it was trained on the base whose
    fingerprint is `expected_fingerprint` (`source` names that base in the error)."""
    cfg, extra = read_adapter(path)
    found = extra.get("base_fingerprint")
    if found != expected_fingerprint:
        raise AdapterError(
            f"adapter {path} belongs to another base: it was trained on {extra.get('base_source') or 'a base'} "
            f"({found}), this model is {source or 'a base'} ({expected_fingerprint}); load it on the base it was "
            "trained on (load_hertz_dev(BASE, quantize=..., adapter=...) quantizes that base as it loads, for an "
            "adapter trained on the float base)")
    return cfg


def check_fit(model: nn.Module, path: Union[str, os.PathLike], cfg: LoRAConfig, tensors: dict[str, Tensor],
              source: Optional[str] = None) -> None:
    """AdapterError naming the adapter at `path` (config `cfg`, its `tensors`: loaded, or the meta
    tensors `checkpoint.tensor_specs` reads from its header) if they are not those `cfg` puts on
    `model` (a `HertzDev` without adapters; a `meta` build is enough, so loaders check before the
    base's weights load): layers missing or not in the model, a rank or size that differs, or a
    dtype that is not a float (copied into the float32 adapters, integers and booleans loaded silently)."""
    expected = {}
    for p in lora_targets(model, cfg.targets, cfg.parts):
        m = model.get_submodule(p)
        expected[f"{p}.lora_A"], expected[f"{p}.lora_B"] = (cfg.rank, m.in_features), (m.out_features, cfg.rank)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]}, not {expected[k]}" for k in sorted(set(expected) & set(shapes)) if shapes[k] != expected[k]]
    dtypes = [f"{k} {str(v.dtype)[6:]}" for k, v in sorted(tensors.items()) if not v.is_floating_point()]
    problems = [f"{label} {len(names)} tensors ({listed(names)})" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shapes of", wrong),
                 ("not float", dtypes)) if names]
    if problems:
        raise AdapterError(f"adapter {path} does not fit {source or 'this model'}: its header says rank {cfg.rank}, "
                           f"targets {cfg.targets} of {'+'.join(cfg.parts)}, and its tensors are not those: "
                           f"{'; '.join(problems)}")


def read_adapter_tensors(path: Union[str, os.PathLike], verify: bool = True) -> dict[str, Tensor]:
    """The tensors of the adapter file at `path`, with `verify` checked against its content hash
    and for NaN or inf (`verify_content`: a CheckpointError naming the file)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if verify:
        verify_content(path, state, _header(Path(path)).get(HASH_KEY))
    return state


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], expected_fingerprint: str,
                 source: Optional[str] = None, verify: bool = True,
                 state: Optional[dict[str, Tensor]] = None) -> LoRAConfig:
    """Adapt `model` (a `HertzDev` without adapters) as the file at `path` says and fill the
    adapters from it, after checking its base fingerprint (see `check_adapter`) and, with `verify`,
    its content hash and that no weight is NaN or inf (`read_adapter_tensors`); returns its config.
    `state`: its tensors, already read (and verified) so, by a loader that checks them first."""
    cfg = check_adapter(path, expected_fingerprint, source)
    if state is None:
        state = read_adapter_tensors(path, verify)
    check_fit(model, path, cfg, state, source)
    apply_lora(model, **dataclasses.asdict(cfg))
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            v.copy_(state[k])
    return cfg
