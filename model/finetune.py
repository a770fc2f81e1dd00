"""`finetune=lora` in train_transformer.py: the setup, training states and adapter exports of a
LoRA run (model/lora.py has the adapters themselves).

A LoRA run adapts the `init_from` base (an official variant or one of our checkpoints): loaded in
float32 on the CPU as every init_from is, the LM and resynthesizer are cast to the compute dtype
(bfloat16 on a GPU with dtype=bfloat16, else float32; the small quantizer stays float32, so the
codes the LM learns are those of the official quantizer), quantized if `base_quantize`, then
adapted (`apply_lora`: every base weight frozen, float32 adapters added), before the parts move
to the device and DDP wraps them. The optimizer sees the adapters only.

Training states hold the adapters, the optimizer, the step and the base's fingerprint, not the
base; a resumed run rebuilds the base from init_from, checks the fingerprint and loads the
adapters. Exports are adapter files, `latest.adapter.safetensors` / `best.adapter.safetensors`,
instead of full-model `.safetensors`: the model would repeat the base (17 GB for the official
duplex model) at every save; `load_hertz_dev(base, adapter=..., merge=True)` and
`save_transformer` make one when wanted.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from config import ConfigError, ConfigMismatch, from_dict
from config.transformer_config import TransformerConfig

from .lora import ADAPTER_SUFFIX, LoRAConfig, apply_lora, base_fingerprint, write_adapter  # noqa: F401 (ADAPTER_SUFFIX)
from .objectives import STAGES


# What the adapters of a LoRA training state are made for: the parts they adapt (by `stage`), their
# shapes, scale and layers; evaluating them (eval_only) needs the same values as they were trained with.
ADAPTER_FIELDS = ("stage", "lora_rank", "lora_alpha", "lora_targets")
# What only a LoRA run uses: a full run (finetune=full) ignores them, so resuming one compares none of them.
LORA_ONLY = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.name.startswith("lora_")) + (
    "base_quantize",)


def lora_config(cfg: TransformerConfig) -> LoRAConfig:
    """The adapters of a run: the parts its stage trains (the LM, the resynthesizer or both)."""
    parts = tuple(p for p in ("lm", "resynth") if p in STAGES[cfg.stage])
    return LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, parts)


def check_config(cfg: TransformerConfig, world_size: int) -> None:
    """The finetune/lora/base_quantize mistakes found from the config alone (ConfigError)."""
    if cfg.finetune != "lora":
        if cfg.base_quantize:
            raise ConfigError(f"base_quantize={cfg.base_quantize} quantizes the frozen base of a LoRA run: "
                              "pass finetune=lora too, or drop base_quantize")
        # a forgotten finetune=lora: every weight of the stage trained instead of adapters, silently
        given = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(TransformerConfig)
                 if f.name.startswith("lora_") and getattr(cfg, f.name) != f.default]
        if given:
            raise ConfigError(f"{', '.join(given)} with finetune={cfg.finetune}: LoRA settings, which a full "
                              "fine-tune ignores (it trains every weight of the stage); pass finetune=lora too, "
                              f"or drop {'them' if len(given) > 1 else 'it'}")
        return
    if not cfg.init_from:
        raise ConfigError("finetune=lora adapts a trained base: pass init_from=official (or a variant, or the "
                          "path of one of our .safetensors)")
    if cfg.base_quantize and cfg.eval_quantize not in ("none", cfg.base_quantize):
        raise ConfigError(f"base_quantize={cfg.base_quantize} and eval_quantize={cfg.eval_quantize}: the base is "
                          "quantized once, before its adapters; pass one of them")
    if cfg.stage == "quantizer":
        raise ConfigError("finetune=lora adapts the LM and/or the resynthesizer, the quantizer stays frozen: "
                          "use stage=lm, stage=resynthesizer or stage=all")
    if world_size > 1 and cfg.parallel == "fsdp":
        raise ConfigError("finetune=lora keeps the frozen base whole on every GPU: pass parallel=ddp with torchrun")
    try:
        lora_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def trained_parts(cfg: TransformerConfig) -> tuple[str, ...]:
    """The parts whose weights (full) or adapters (lora) the run trains."""
    if cfg.finetune == "lora":
        return tuple(p for p in STAGES[cfg.stage] if p != "quantizer")
    return STAGES[cfg.stage]


def init_source(cfg: TransformerConfig) -> str:
    """init_from with "official" read as this run's official variant (duplex or mono)."""
    return ("duplex" if cfg.duplex else "mono") if cfg.init_from == "official" else cfg.init_from


def base_of(cfg: TransformerConfig) -> dict:
    """{"base_source", "base_fingerprint"} of a LoRA run's base (as its training states record
    them): `init_source`, and its `base_fingerprint`."""
    source = init_source(cfg)
    return {"base_source": source, "base_fingerprint": base_fingerprint(source)}


def check_resume(state: dict, base: dict, path) -> None:
    """A LoRA training state resumes only on the base (`base_of`) it was trained on (ConfigMismatch)."""
    if state.get("base_fingerprint") != base["base_fingerprint"]:
        raise ConfigMismatch(f"{path} holds adapters of base {state.get('base_source')} "
                             f"({state.get('base_fingerprint')}), init_from is {base['base_source']} "
                             f"({base['base_fingerprint']}). Use the run's init_from, another checkpoint_dir, "
                             "or resume=false.")


def base_quantization(cfg: TransformerConfig) -> Optional[str]:
    """How a LoRA run's base is quantized before it is adapted: `base_quantize`, or with eval_only
    `eval_quantize` (adapted layers can no longer be quantized: they stayed float, and eval_quantize
    reported the float adapted layers as quantized)."""
    return cfg.base_quantize or (cfg.eval_quantize if cfg.eval_only and cfg.eval_quantize != "none" else None)


def setup(model: nn.Module, cfg: TransformerConfig, compute_dtype: torch.dtype) -> LoRAConfig:
    """Cast the LM and resynthesizer to `compute_dtype`, quantize them (`base_quantization`) and
    adapt the stage's parts, in place and before the model moves to its device; returns the
    adapters' config. Afterwards the trainable parameters of `model` are exactly the float32 adapters."""
    config = lora_config(cfg)
    for part in ("lm", "resynth"):
        getattr(model, part).to(compute_dtype)
    if mode := base_quantization(cfg):
        from .quant import quantize_model
        for part in ("lm", "resynth"):
            quantize_model(getattr(model, part), mode, pack=False)  # the adapters need a backward
    apply_lora(model, **dataclasses.asdict(config))
    return config


def _name(key: str) -> str:
    return key.replace("_orig_mod.", "")  # compile_blocks' wrapper (model/parallel.py)


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(adapters, optimizer state) of a LoRA run, full, on the CPU, keyed by parameter name: the
    training state's "model" and "optimizer" (the frozen base is not in it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    adapters = {_name(k): p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return adapters, get_optimizer_state_dict(model, optimizer, options=options)


def load_state_dicts(model: nn.Module, adapters: dict, optimizer: Optional[torch.optim.Optimizer] = None,
                     optim_state: Optional[dict] = None) -> None:
    """Fill the adapters of `model` (adapted by `setup`) and its optimizer from `state_dicts`'s."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    params = {_name(k): p for k, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(adapters):
        raise ConfigMismatch(f"the training state's adapters ({len(adapters)} tensors) are not this run's "
                             f"({len(params)}): use the run's lora_* settings and stage")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(adapters[k])
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


def export_adapter(saved: dict, path: str) -> None:
    """The adapters of a LoRA training state as an adapter file (model/lora.py) at `path`, with the
    step, stage, codec and validation loss in its extra."""
    cfg = from_dict(TransformerConfig, saved["config"], strict=False)
    extra = {"step": saved["step"], "stage": cfg.stage, "codec_fingerprint": saved["codec"],
             "codec": saved["codec_source"], "val/loss": saved.get("val/loss")}
    write_adapter(path, saved["model"], lora_config(cfg), saved["base_fingerprint"], saved["base_source"], extra,
                  label=path)
