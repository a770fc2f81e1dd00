"""Our checkpoint format: one `.safetensors` file that rebuilds its model without guessing.

The tensors are the modules' state dicts (for a transformer checkpoint, prefixed `quantizer.`,
`lm.` and `resynth.`), and the safetensors header metadata holds the format tag, the kind of
model (`codec` or `transformer`) and the full config as JSON (`dataclasses.asdict`). Every write
goes to a temporary file in the same folder, is fsynced, then renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

FORMAT = "hertz-dev/1"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename the temporary file to `path` (same folder, fsynced),
    so `path` is either the old complete file or the new complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], kind: str, config,
                 extra: Optional[dict] = None, quantization: Optional[dict] = None) -> Path:
    """Write `state` and the config that built it (a dataclass) to one safetensors file;
    `quantization` records which layers hold quantized weights (`model.quant.quantization_of`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "config_class": type(config).__name__,
            "config": json.dumps(dataclasses.asdict(config)), "extra": json.dumps(extra or {})}
    if quantization is not None:
        meta["quantization"] = json.dumps(quantization)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of one of our checkpoints: kind, config (dict), extra (dict) and quantization
    (dict, or None for float weights)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hertz-dev checkpoint written by this repository "
                         f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    return {"kind": meta["kind"], "config_class": meta.get("config_class"),
            "config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}")),
            "quantization": json.loads(meta["quantization"]) if "quantization" in meta else None}


def read_weights(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of one of our checkpoints."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    return load_file(str(path), device=device), meta


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
