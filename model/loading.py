"""Public loading API: official variants or our own checkpoints, built on `meta` and filled
with memory-mapped weights (`assign=True`), so even the 8.5B model loads without a float32 copy.

    codec = load_codec("official")                       # or a path to one of our codecs
    hertz = load_hertz_dev("duplex", device="cuda")      # "mono", "mono-pure-audio", or a path
    hertz = load_hertz_dev("duplex", device="cuda", quantize="int8")   # or "int4" (model/quant.py)
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from config import DEVICE
from config.codec_config import CodecConfig
from config.codec_config import hertz_dev as CODEC_HERTZ_DEV
from config.transformer_config import DTYPE_NAMES, TransformerConfig
from config.transformer_config import hertz_dev as TRANSFORMER_HERTZ_DEV

from . import hub, lora
from .checkpoint import (CheckpointError, atomic_write, beyond, check_unreplaced, config_from, file_version, listed,
                         read_metadata, read_weights, reloaded_if_replaced, substate, tensor_specs, write_weights)
from .codec import Codec
from .lm import LatentLM
from .quant import (MODES, apply_plan, bad_scales, overflowing_scales, pack_int4, quantization_of, quantization_plan,
                    quantize_state, zero_underflowed_rows)
from .quantizer import LatentQuantizer
from .resynth import Resynthesizer


class HertzDev(nn.Module):
    """The latent quantizer, LM and resynthesizer of one variant, and optionally the codec."""

    def __init__(self, cfg: TransformerConfig, codec_cfg: Optional[CodecConfig] = None):
        super().__init__()
        self.config = cfg
        self.quantizer = LatentQuantizer(cfg)
        self.lm = LatentLM(cfg)
        self.resynth = Resynthesizer(cfg)
        self.codec = Codec(codec_cfg) if codec_cfg is not None else None

    def init_weights(self) -> None:
        self.lm.init_weights()
        self.resynth.init_weights()


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# The dtypes the loaders take by name (`dtype="bfloat16"`, complete.py's --dtype); float64 also as a torch dtype.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
assert tuple(DTYPES) == DTYPE_NAMES, "a dtype named in config/transformer_config.py without its torch dtype here"


def resolve_dtype(dtype, device, flag: str = "dtype=") -> torch.dtype:
    """The loaders' `dtype`: None or "auto" (`default_dtype(device)`), a name of DTYPES, or one of
    those torch dtypes or torch.float64; ValueError naming the value otherwise, before any weights
    load."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (*DTYPES.values(), torch.float64):
        return dtype
    raise ValueError(f"{flag} {dtype!r}: expected auto, {', '.join(DTYPES)} (or torch.float64)")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The device a script's `--device` (the notebook's `flag="DEVICE ="`) names: `auto` (cuda
    when a GPU is visible, else cpu), or cpu, cuda, cuda:N or mps when this machine has it;
    ValueError naming the value otherwise, so scripts refuse it before any weights load. A
    `torch.device` is taken as its name."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (isinstance(name, str) and re.fullmatch(DEVICE["pattern"][0], name)):
        raise ValueError(f"{flag} {name!r}: expected auto, {DEVICE['pattern'][1]}")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise ValueError(f"{flag} {name}: " + (f"only {visible} GPU(s) visible" if visible else
                                               f"no GPU is visible; use {flag} cpu"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS (Apple GPUs) is not available here; use {flag} cpu")
    return device


def init_buffers(module: nn.Module) -> nn.Module:
    """Rebuild derived, non-persistent buffers (left on `meta` by a meta build)."""
    for m in module.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    return module


def check_tensors(module: nn.Module, state: dict, what: str) -> None:
    """CheckpointError naming `what` if the tensors of `state` (loaded, or `tensor_specs`' meta
    tensors read from a header) are not those of `module` (built on `meta` is enough): names,
    shapes, and dtypes (float weights of any float dtype are cast when loaded; the integer buffers
    of quantized layers must be their own dtype: `assign=True` keeps a buffer's, so int32 or signed
    nibbles loaded silently)."""
    expected = module.state_dict()  # names, shapes and dtypes (a meta build holds no data)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}, not {tuple(expected[k].shape)}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    dtypes = [f"{k} {str(state[k].dtype)[6:]}, not {'a float' if want.is_floating_point() else str(want.dtype)[6:]}"
              for k, want in expected.items() if k in state and (
                  state[k].is_floating_point() != want.is_floating_point()
                  or (not want.is_floating_point() and state[k].dtype != want.dtype))]
    problems = [f"{label} {len(names)} tensors ({listed(names)})" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shapes of", shapes),
                 ("wrong dtypes of", dtypes)) if names]
    if problems:
        raise CheckpointError(f"{what} does not match the model built from its config: {'; '.join(problems)}")


def check_parts(state: dict, parts: tuple[str, ...], what: str) -> None:
    """CheckpointError naming `what` for tensors of a checkpoint under none of the `parts`' prefixes
    (`lm.`, ...): each part is then checked strictly (`check_tensors`), and a stray tensor beside
    them (another tool's, another model's) would otherwise be ignored unsaid."""
    if stray := [k for k in state if k.split(".", 1)[0] not in parts]:
        raise CheckpointError(f"{what} does not match the model built from its config: unexpected {len(stray)} "
                              f"tensors ({listed(stray)})")


def check_cast(state: dict, dtype: torch.dtype, what: str) -> None:
    """CheckpointError naming `what` and the tensors of `state` whose finite values `dtype` cannot
    hold (`beyond`): the cast would make them inf, and the model would generate noise (a float32
    scale of 1e5, say, loaded in float16)."""
    if bad := beyond(state, dtype):
        raise CheckpointError(f"{what}: {len(bad)} tensors hold values beyond what {str(dtype)[6:]} holds "
                              f"({listed(bad)}); cast, they would be inf and the model would generate noise: load it "
                              "in bfloat16 or float32 (dtype=, --dtype)")


def check_dequantized(module: nn.Module, state: dict, dtype: torch.dtype, what: str) -> None:
    """CheckpointError naming `what` and the scale tensors of the quantized layers of `module` whose
    weights `dtype` cannot hold (`overflowing_scales`: an int8 scale of 1e3 is a float16, its weights of
    127e3 are not): dequantized, they would be inf and the model would generate noise."""
    quantization = quantization_of(module)
    if quantization and (bad := overflowing_scales(state, quantization["layers"], dtype)):
        hint = ("load it in bfloat16 or float32 (dtype=, --dtype)" if dtype == torch.float16 else
                "no quantization makes such scales: re-export it from the float model")
        raise CheckpointError(f"{what}: {len(bad)} tensors hold scales whose dequantized weights are beyond what "
                              f"{str(dtype)[6:]} holds ({listed(bad)}); they would be inf and the model would generate "
                              f"noise: {hint}")


def _fill(module: nn.Module, state: dict, device, dtype, what: str) -> nn.Module:
    check_tensors(module, state, what)
    check_cast(state, dtype, what)  # before the move below casts them
    check_dequantized(module, state, dtype, what)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a tensor of a dtype the parameter cannot take
        raise CheckpointError(f"{what} does not match the model built from its config: "
                              f"{' '.join(str(e).split())}") from None
    # Let go of the loaded tensors: each one the move below replaces is then freed as it goes,
    # not at the end.
    state.clear()
    init_buffers(module)
    return pack_int4(zero_underflowed_rows(module.to(device=device, dtype=dtype))).eval().requires_grad_(False)


def build(cls, cfg, device="cpu", dtype=torch.float32, init: bool = True) -> nn.Module:
    """A freshly initialised module built directly on `device` in `dtype` (no float32 detour:
    the full-size model fits where its bf16 weights fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = cls(cfg)
            if init and hasattr(module, "init_weights"):
                module.init_weights()
    finally:
        torch.set_default_dtype(previous)
    return module


def _existing(source, choices: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{str(source)!r} is neither {choices} nor an existing checkpoint file")
    return path


def _meta(cls, *args):
    with torch.device("meta"):
        return cls(*args)


def _built(cls, cfg, source) -> nn.Module:
    """`_meta(cls, cfg)` for the config of the header of `source`: a CheckpointError naming the file
    where it builds no model (sizes whose tensors no memory could hold: an edited header), rather
    than torch's RuntimeError from deep inside a layer."""
    try:
        return _meta(cls, cfg)
    except (RuntimeError, ValueError, AssertionError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{source}: its config does not build a {cls.__name__} ({' '.join(str(e).split())}): "
                              "its header was edited or damaged; re-export it") from None


# --- codec ----------------------------------------------------------------------------------

@reloaded_if_replaced
def load_codec(source: Union[str, os.PathLike] = "official", device="cpu", dtype: Optional[torch.dtype] = None,
               ckpt_dir: Union[str, os.PathLike] = hub.DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
               endpoint: Optional[str] = None, config: Optional[CodecConfig] = None, verify: bool = True) -> Codec:
    """The codec from `"official"` (downloaded to `ckpt_dir` if missing) or one of our
    checkpoints (a `.safetensors` written by `save_codec` or train_codec.py; any other file, a
    training state `.pt` included, is a CheckpointError naming what it is and what to load
    instead). `verify=False` skips the content-hash check. `config` replaces the official
    architecture, for files in the official layout at another size (tests). `device`: "auto",
    cpu, cuda, cuda:N or mps (a string or torch.device, one this machine has); `dtype`: "auto"
    (None), a name of DTYPES or a float torch.dtype (`resolve_dtype`): a ValueError naming either
    before any weights load."""
    device = resolve_device(device, "device=")
    dtype = resolve_dtype(dtype, device)
    if str(source) == "official":
        path = hub.official_file(hub.CODEC, ckpt_dir, offline, endpoint)
        cfg = config or CODEC_HERTZ_DEV
        return _fill(_meta(Codec, cfg), hub.load_state_dict(path), device, dtype, str(path))
    path = _existing(source, '"official"')
    version = file_version(path)  # its header and tensors come from one file, or it is loaded again
    cfg = config_from(CodecConfig, read_metadata(path, kind="codec")["config"], source)
    codec, specs = _built(Codec, cfg, source), tensor_specs(path)
    if substate(specs, "codec"):  # (our files' layout: every tensor under codec.)
        check_parts(specs, ("codec",), str(source))
    check_tensors(codec, substate(specs, "codec") or specs, str(source))  # from the header, before reading and hashing
    state, _ = read_weights(path, kind="codec", verify=verify)
    check_unreplaced(path, version, str(source))
    return _fill(codec, substate(state, "codec") or state, device, dtype, str(source))


def write_codec(path: Union[str, os.PathLike], codec: Codec, extra: Optional[dict] = None,
                label: Optional[str] = None) -> None:
    """The codec and its config as one of our checkpoints, written to `path` directly."""
    write_weights(path, {f"codec.{k}": v for k, v in codec.state_dict().items()}, "codec", codec.config, extra, label)


def _check_save(path, module, cls, what: str) -> None:
    """save_codec's and save_transformer's arguments: TypeError naming the one of the wrong type
    (a HertzDev given to save_codec was written as a codec file that no loader could read)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (the file to write), got {type(path).__name__}")
    if not isinstance(module, cls):
        hint = {("Codec", "HertzDev"): ": its codec is model.codec",
                ("HertzDev", "Codec"): ": a codec is saved with save_codec"}.get((cls.__name__, type(module).__name__), "")
        raise TypeError(f"{what} must be a {cls.__name__}, got {type(module).__name__}{hint}")


def save_codec(path: Union[str, os.PathLike], codec: Codec, extra: Optional[dict] = None) -> Path:
    """`write_codec`, atomically; TypeError naming `path` or `codec` if one is of the wrong type."""
    _check_save(path, codec, Codec, "codec")
    return atomic_write(path, lambda tmp: write_codec(tmp, codec, extra, label=str(path)))


# --- quantizer, LM, resynthesizer ------------------------------------------------------------

def official_transformer_config(variant: str) -> TransformerConfig:
    if variant not in hub.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(hub.VARIANTS)}")
    return dataclasses.replace(TRANSFORMER_HERTZ_DEV, duplex=hub.VARIANTS[variant][2])


def transformer_config_of(source: Union[str, os.PathLike]) -> TransformerConfig:
    """The config `load_hertz_dev(source)` builds, known before any weights load: an official
    variant's, or the one the header of our checkpoint at `source` records (CheckpointError naming
    the file where it holds none, or one that builds no model: `config_from`, `_built`)."""
    if str(source) in hub.VARIANTS:
        return official_transformer_config(str(source))
    cfg = config_from(TransformerConfig, read_metadata(source, kind="transformer")["config"], source)
    _built(HertzDev, cfg, source)  # (a meta build: milliseconds) the memory checks build it too
    return cfg


# What `load_codec` / `load_hertz_dev` raise for a file the user must fix (the scripts print it as
# one `error:`): an unusable checkpoint, an adapter of another base, official weights missing
# offline, corrupt or not downloadable.
LOAD_ERRORS = (CheckpointError, lora.AdapterError, hub.WeightsError)


def recorded_codec(path, meta: dict) -> Optional[str]:
    """The codec the transformer checkpoint at `path` (header `meta`) records: "official" (also
    for files that record none), a path, or None (saved without codec_source); a CheckpointError
    naming the file and the field where it is anything else (a number, a list: an edited header)."""
    value = meta["extra"].get("codec", "official")
    if value is not None and not (isinstance(value, str) and value):
        raise CheckpointError(f"{path}: the 'codec' field of its header's extra is {value!r}, not the "
                              "path of a codec or 'official'; pass --codec (codec=) or re-export it")
    return value


def recorded_codec_path(codec_source: Union[str, os.PathLike]) -> str:
    """What a model file (or a training state) records as its codec: "official", or the codec file's
    absolute path, so the file finds it when loaded from another working folder."""
    return "official" if str(codec_source) == "official" else os.path.abspath(codec_source)


def resolved_codec(source: Union[str, os.PathLike], codec: Optional[Union[str, os.PathLike]] = "auto",
                   adapter: Optional[Union[str, os.PathLike]] = None) -> tuple[Optional[str], Optional[str], str]:
    """The codec `load_hertz_dev(source, codec=codec, adapter=adapter)` decodes with, from the
    headers alone: (its source: "official", a path or None; the fingerprint of the codec whose latents
    the weights learnt, where a file records it (`codec="auto"` only); the file that records them).
    With "auto", an adapter that records the codec its fine-tuning encoded the data with decides (its
    weights learnt that codec's latents), else the model: the official codec for official variants,
    the one our checkpoint records otherwise."""
    if codec != "auto":
        return codec, None, str(source)
    if adapter is not None:
        _, extra = lora.read_adapter(adapter)
        if "codec" in extra:
            return recorded_codec(adapter, {"extra": extra}), extra.get("codec_fingerprint"), str(adapter)
    if str(source) in hub.VARIANTS:
        return "official", None, str(source)
    meta = read_metadata(source, kind="transformer")
    return recorded_codec(source, meta), meta["extra"].get("codec_fingerprint"), str(source)


def codec_config_of(source: Union[str, os.PathLike], codec: Optional[Union[str, os.PathLike]] = "auto",
                    config: Optional[TransformerConfig] = None,
                    adapter: Optional[Union[str, os.PathLike]] = None) -> Optional[CodecConfig]:
    """The config of the codec `load_hertz_dev(source, codec=codec)` loads, known before any weights
    load (its hop, for the scripts' prompt checks): the official codec's, the one the header of ours
    records, or None where it loads none (codec=None, or "auto" on one of our checkpoints saved
    without codec_source). The CheckpointErrors `load_hertz_dev` raises for it: a recorded codec that
    is gone, a file of another kind, a codec of another sample rate or latent size than the model's
    (`config`: default `transformer_config_of(source)`); with `adapter`, as `resolved_codec`."""
    codec_source, _, owner = resolved_codec(source, codec, adapter)
    return _codec_config(owner, codec, codec_source, config or transformer_config_of(source))


def _codec_config(source, codec, codec_source, cfg: TransformerConfig,
                  official: CodecConfig = CODEC_HERTZ_DEV) -> Optional[CodecConfig]:
    """`codec_config_of` for the `codec_source` that `codec` resolves to ("official": `official`)."""
    if codec_source is None:
        return None
    if str(codec_source) != "official":
        try:
            _existing(codec_source, '"official"')
        except FileNotFoundError:
            if codec != "auto":
                raise
            raise CheckpointError(f"{source} records its codec as {codec_source}, which is not there (moved or "
                                  "deleted): pass its new path as codec= (--codec), or 'official'") from None
    return codec_config_fitting(codec_source, cfg, str(source), "pass the codec it was trained with as codec= (--codec)",
                                official)


def check_codec_fingerprint(codec: Codec, trained_with: str, model: str, codec_source: str) -> None:
    """CheckpointError when `codec` (float32, as read from `codec_source`) is not the codec whose
    latents the transformer `model` was trained on (`trained_with`, the fingerprint its header records)."""
    from .latents import codec_fingerprint
    if (found := codec_fingerprint(codec)) != trained_with:
        raise CheckpointError(f"{model} was trained on the latents of codec {trained_with}, and the codec it records, "
                              f"{codec_source}, is now another ({found}: trained further or replaced since); its "
                              "latents would decode to noise: pass the codec it was trained with as codec= (--codec), "
                              "or this one as codec=PATH to use it anyway")


def codec_config_fitting(codec_source: Union[str, os.PathLike], cfg: TransformerConfig, model: str, fix: str,
                         official: CodecConfig = CODEC_HERTZ_DEV) -> CodecConfig:
    """The config of the codec `codec_source` ("official": `official`; else the path of one of ours,
    from its header alone), checked against the transformer config `cfg` of `model` (its name in the
    error): a CheckpointError ending in `fix` when its latents are of another size or its audio of
    another sample rate. What loading a model with a codec (`codec_config_of`) and training one on
    a codec's latents (train_transformer.py) both check, in the same words."""
    if str(codec_source) == "official":
        codec_cfg = official
    else:
        codec_cfg = config_from(CodecConfig, read_metadata(codec_source, kind="codec")["config"], codec_source)
    # audio of another rate would be made (or encoded) at the wrong speed, latents of another size a shape error
    if (codec_cfg.sample_rate, codec_cfg.latent_dim) != (cfg.sample_rate, cfg.latent_dim):
        raise CheckpointError(
            f"the codec {codec_source} makes {codec_cfg.latent_dim}-dim latents of {codec_cfg.sample_rate} Hz audio, "
            f"but {model} takes {cfg.latent_dim}-dim latents of {cfg.sample_rate} Hz audio: {fix}")
    return codec_cfg


def no_codec_problem(flag: str, path, meta: dict, codec: str, codec_flag: str = "--codec") -> Optional[str]:
    """The scripts' error (`complete.py`, the server, the notebook) for one of our checkpoints at
    `path` (header `meta`) that records no codec, loaded with `--codec auto` (`codec_flag`):
    `load_hertz_dev` would build a model without one, which cannot make audio. None when there is a
    codec to load; a CheckpointError when the recorded codec is not a path (`recorded_codec`)."""
    if codec == "auto" and recorded_codec(path, meta) is None:
        return (f"{flag} {path} records no codec (saved without codec_source): pass {codec_flag} official or the "
                "path of the codec it was trained with")
    return None


@reloaded_if_replaced
def load_hertz_dev(source: Union[str, os.PathLike] = "duplex", device="cpu", dtype: Optional[torch.dtype] = None,
                   ckpt_dir: Union[str, os.PathLike] = hub.DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
                   codec: Optional[Union[str, os.PathLike]] = "auto", endpoint: Optional[str] = None,
                   config: Optional[TransformerConfig] = None, codec_config: Optional[CodecConfig] = None,
                   verify: bool = True, adapter: Optional[Union[str, os.PathLike]] = None,
                   merge: bool = False, quantize: Optional[str] = None) -> HertzDev:
    """Quantizer + LM + resynthesizer (+ codec) from an official variant (`duplex`, `mono`,
    `mono-pure-audio`; missing files are downloaded to `ckpt_dir`) or one of our transformer
    checkpoints (`.safetensors`; another file, a training state `.pt` included, is a
    CheckpointError naming what it is and what to load instead). `codec`: "auto" (the codec the
    adapter records, where it records one; else the official codec for official variants, the codec
    recorded in our checkpoint otherwise: `resolved_codec`), "official", a path, or None for no
    codec. `verify=False` skips the content-hash and NaN/inf checks of our files and of the adapter.
    The header's mistakes (its config, quantization, a recorded codec that is gone, or that is no
    longer the codec whose fingerprint it records: trained further or replaced since) and a codec of
    another sample rate or latent size than the model's (`codec_config_of`) are CheckpointErrors
    raised before any weights load.

    `adapter`: a LoRA adapter file (`model/lora.py`) to apply; one trained on another base, or whose
    tensors are not those its header's rank and targets put on the base's config, is an error,
    raised before any weights load. `merge=True` folds it into the weights.

    `quantize`: "int8" or "int4" quantizes the weights while loading (`model.quant`; the codec
    stays float): each Linear's float weight is read from the memory-mapped file and quantized on
    `device` a few rows at a time, one layer after another, so neither the device nor the host
    ever holds a float copy of the model. A checkpoint saved quantized (`save_transformer`) loads
    quantized without it. `device` and `dtype` as for `load_codec`, checked first."""
    device = resolve_device(device, "device=")
    dtype = resolve_dtype(dtype, device)
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or None), not {quantize!r}")
    if merge and quantize is not None:
        raise ValueError("merge=True folds the adapter into float weights: load without quantize=")
    if merge and adapter is None:
        raise ValueError("merge=True needs an adapter= file to merge")
    # the files whose headers are read first and tensors last: each must stay the one file (a training run saving
    # over one meanwhile mixed two, a model with another file's codec among them), or the load starts again
    versions = {label: (path, file_version(path)) for label, path in (("", source), ("adapter ", adapter))
                if path is not None and str(path) not in hub.VARIANTS and os.path.isfile(path)}
    if adapter is not None:
        fingerprint = lora.base_fingerprint(source)
        adapter_cfg = lora.check_adapter(adapter, fingerprint, str(source))
        # its tensors read and verified now (a file ~100x smaller than its base): a damaged adapter is found
        # before the base's weights are read and hashed (for an official variant, downloaded), not after
        adapter_state = lora.read_adapter_tensors(adapter, verify)
    if str(source) not in hub.VARIANTS:  # the header's mistakes, before any weights load
        path = _existing(source, "an official variant (" + ", ".join(hub.VARIANTS) + ")")
        meta = read_metadata(path, kind="transformer")
        cfg = config_from(TransformerConfig, meta["config"], source)
        recorded = meta["quantization"]  # a known mode, that of its layers (read_metadata)
        if recorded and quantize not in (None, recorded["mode"]):
            raise CheckpointError(f"{source} holds {recorded['mode']} weights: load it without quantize= (--quantize) "
                                  f"(requantizing quantized weights is not supported)")
        if recorded and merge:  # merge_lora refuses quantized layers: found now, not after the weights load
            raise ValueError(f"merge=True folds the adapter into float weights, and {source} holds {recorded['mode']} "
                             "weights: keep the adapter unmerged, or merge it on the float checkpoint")
    else:
        cfg = official_transformer_config(str(source))
        if config is not None:
            cfg = dataclasses.replace(config, duplex=cfg.duplex)
    codec_source, trained_with, owner = resolved_codec(source, codec, adapter)  # the adapter's, where it records one
    model = _built(HertzDev, cfg, source)  # filled below; without adapters until load_adapter
    if adapter is not None:  # its header against the base's config: the tensors it would put on which layers
        lora.check_fit(model, adapter, adapter_cfg, tensor_specs(adapter), str(source))
    _codec_config(owner, codec, codec_source, cfg, codec_config or CODEC_HERTZ_DEV)  # its header against cfg
    # a codec of ours (codec=PATH, or the one recorded) is read and verified before the transformer's weights: a
    # damaged one is found now, not after them
    codec_file = None
    if codec_source is not None and str(codec_source) != "official":
        if trained_with:
            # the codec an export (or adapter) of ours records, as trained with: the file at that path may have been
            # trained on (or replaced) since, and a model decoding another codec's latents makes noise without a word
            codec_file = load_codec(codec_source, "cpu", torch.float32, verify=verify)  # as it was fingerprinted
            check_codec_fingerprint(codec_file, trained_with, owner, str(codec_source))
            check_cast(codec_file.state_dict(), dtype, str(codec_source))
            codec_file = codec_file.to(device, dtype)
        else:
            codec_file = load_codec(codec_source, device, dtype, ckpt_dir, offline, endpoint, codec_config, verify)
    if str(source) in hub.VARIANTS:
        lm_name, resynth_name, _ = hub.VARIANTS[str(source)]
        # the official codec too, in the same call: the room all the missing files need is found
        # before the first of them downloads (load_codec below then finds it in place, verified)
        official_codec = [hub.CODEC] if codec_source is not None and str(codec_source) == "official" else []
        paths = hub.official_files([hub.QUANTIZER, lm_name, resynth_name] + official_codec, ckpt_dir, offline, endpoint)
        for part, name in (("quantizer", hub.QUANTIZER), ("lm", lm_name), ("resynth", resynth_name)):
            state = _quantized(getattr(model, part), hub.load_state_dict(paths[name]), quantize, device, dtype, part)
            _fill(getattr(model, part), state, device, dtype, str(paths[name]))
    else:
        if recorded:
            try:
                for part in ("quantizer", "lm", "resynth"):
                    apply_plan(getattr(model, part), substate(recorded["layers"], part), quantize=False)
            except (ValueError, AttributeError) as e:  # an unknown layer, spec or shape
                raise CheckpointError(f"{source}: the quantization its header records does not fit its "
                                      f"model: {e}") from None
        specs = tensor_specs(path)  # the tensors against the model from the header, before reading and hashing them
        check_parts(specs, ("quantizer", "lm", "resynth"), str(source))
        for part in ("quantizer", "lm", "resynth"):
            check_tensors(getattr(model, part), substate(specs, part), f"{source} ({part})")
        state, meta = read_weights(path, kind="transformer", verify=verify)
        if verify and recorded and (bad := bad_scales(state, recorded["layers"])):
            raise CheckpointError(f"{source}: {len(bad)} quantized layers hold scales no quantization makes (negative, "
                                  f"or zero for weights that are not: {listed(bad)}); a model with them generates "
                                  "noise: re-export it from the float model (verify=False / --no-verify loads it anyway)")
        for part in ("quantizer", "lm", "resynth"):
            module, sub = getattr(model, part), substate(state, part)
            # a file quantized in part (quantize_model on the LM alone, say): quantize= quantizes the rest
            sub = _quantized(module, sub, quantize, device, dtype, part, _group_size(recorded, part))
            _fill(module, sub, device, dtype, f"{source} ({part})")
    if codec_file is not None:
        model.codec = codec_file
    elif codec_source is not None:  # the official codec (verified as it downloaded)
        model.codec = load_codec(codec_source, device, dtype, ckpt_dir, offline, endpoint, codec_config, verify)
    if adapter is not None:
        lora.load_adapter(model, adapter, fingerprint, str(source), verify, adapter_state)
        if merge:
            lora.merge_lora(model)
        else:  # held in the compute dtype: the forward would otherwise cast them at every step
            check_cast(lora.lora_state_dict(model), dtype, f"adapter {adapter}")
            for m in lora.adapted(model).values():
                m.lora_A.data, m.lora_B.data = m.lora_A.data.to(dtype), m.lora_B.data.to(dtype)
    for label, (path, version) in versions.items():
        check_unreplaced(path, version, f"{label}{path}")
    # which codec this is, for save_transformer(codec_source="auto") (a quantized copy decodes with it too)
    model.codec_source = None if codec_source is None else recorded_codec_path(codec_source)
    model.codec_fingerprint = trained_with if codec_file is not None and trained_with else None
    return model.eval().requires_grad_(False)


def write_transformer(path: Union[str, os.PathLike], model: HertzDev, codec_source: Optional[str] = None,
                      extra: Optional[dict] = None, label: Optional[str] = None) -> None:
    """Quantizer, LM and resynthesizer (not the codec: `codec_source` records which one produced
    the latents it was trained on) with their config, written to `path` directly."""
    state = {}
    for part in ("quantizer", "lm", "resynth"):
        state.update({f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()})
    quantization = quantization_of(model)
    if quantization and (bad := bad_scales(state, quantization["layers"])):  # no loader would take them
        raise ValueError(f"{len(bad)} quantized layers hold scales no quantization makes (negative, or zero for "
                         f"weights that are not: {listed(bad)}), as a cast to float16 leaves a scale below its range: "
                         "model.quant.zero_underflowed_rows(model) makes those rows zeros; nothing was written")
    write_weights(path, state, "transformer", model.config, {**(extra or {}), "codec": codec_source}, label,
                  quantization)


def _group_size(recorded: Optional[dict], part: str) -> int:
    """The int4 group size of a checkpoint's recorded quantization, for the float layers quantize=
    quantizes beside it: the part's own int4 layers', else any int4 layer's, else 128."""
    layers = (recorded or {}).get("layers", {})
    specs = [s for p, s in layers.items() if p.startswith(part + ".")] + list(layers.values())
    return next((int(s.split("/")[1]) for s in specs if str(s).startswith("int4/")), 128)


def _quantized(module: nn.Module, state: dict, quantize: Optional[str], device, dtype, part: str,
               group_size: int = 128) -> dict:
    """With `quantize`, turn the meta-built `module` (the model's `part`)'s float Linears into empty
    quantized layers and return `state` with their weights quantized on `device` (layer by layer),
    the scales in the model's `dtype`; else `state`. Layers already quantized (a checkpoint that
    records them) stay as they are."""
    if quantize is None:
        return state
    plan = quantization_plan(module, quantize, group_size)
    apply_plan(module, plan, quantize=False)
    return quantize_state(state, plan, device, dtype, f"{part}.")


def save_transformer(path: Union[str, os.PathLike], model: HertzDev, codec_source: Optional[str] = "auto",
                     extra: Optional[dict] = None) -> Path:
    """`write_transformer`, atomically (a quantized model records which layers are quantized how,
    so it loads quantized). `codec_source`: the codec `load_hertz_dev` will decode with: "auto" (the
    codec `model` was loaded with, and its fingerprint where its file recorded one; None for a model
    built otherwise), "official", the path of one of ours (recorded absolute), or None. A TypeError
    naming the argument of the wrong type, a FileNotFoundError or CheckpointError for a codec path
    that is not one of our codecs, a ValueError for a model with unmerged LoRA adapters (merge them
    first); nothing is written then."""
    _check_save(path, model, HertzDev, "model")
    if isinstance(codec_source, str) and codec_source == "auto":
        codec_source = getattr(model, "codec_source", None)
        if codec_source is not None and getattr(model, "codec_fingerprint", None) is not None:
            extra = {"codec_fingerprint": model.codec_fingerprint, **(extra or {})}
    elif codec_source is not None and not isinstance(codec_source, (str, os.PathLike)):
        raise TypeError(f"codec_source must be the path of the codec (or 'official', 'auto') or None, got "
                        f"{type(codec_source).__name__}" + (": save it with save_codec and pass that path"
                                                            if isinstance(codec_source, Codec) else ""))
    if codec_source is not None and str(codec_source) != "official":  # found now, not when the model is loaded
        read_metadata(_existing(codec_source, '"official", "auto"'), kind="codec")
    codec_source = None if codec_source is None else recorded_codec_path(codec_source)
    if layers := lora.adapted(model):  # their lora_A/lora_B would be written as weights no loader takes
        raise ValueError(f"model holds LoRA adapters on {len(layers)} layers ({listed(list(layers))}): " + (
            "a quantized base cannot take them merged: save the adapters alone with lora.save_adapter (or merge them "
            "into the float base: load_hertz_dev(FLOAT_BASE, adapter=, merge=True))" if quantization_of(model) else
            "merge them first (lora.merge_lora(model), or load_hertz_dev(..., adapter=, merge=True)) for an ordinary "
            "checkpoint, or save the adapters alone with lora.save_adapter"))
    return atomic_write(path, lambda tmp: write_transformer(tmp, model, codec_source, extra, label=str(path)))

