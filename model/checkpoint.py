"""Our checkpoint format: one `.safetensors` file that rebuilds its model without guessing.

The tensors are the modules' state dicts (for a transformer checkpoint, prefixed `quantizer.`,
`lm.` and `resynth.`), and the safetensors header metadata holds the format tag, the kind of
model (`codec` or `transformer`), the full config as JSON (`dataclasses.asdict`) and a content
hash: SHA-256 over the other metadata and, in sorted order, each tensor's name, dtype, shape and
bytes. Loading recomputes it (`verify=True`, about 1 GB/s), so changed or damaged bytes are an
error, not a model that quietly generates noise, and so are NaN or inf weights; files written
before the hash load with a warning.

Every write goes to a temporary file `.NAME.XXXXXXXX.tmp` in the same folder, with the mode a
plain `open()` gives (`model.files.temporary_beside`), locked, fsynced, then renamed into place
(a temporary a killed writer left is removed by the next writer of that file); a file
holding NaN or inf weights is never written. Every failure is a CheckpointError whose one-line
message names the file: a full disk or an unwritable folder, a file of another kind (a codec where
a transformer is expected, a training state `.pt`, an official `.pt`), changed bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickletools
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from config import OneLine
from .files import drop_dead_temporaries, is_device, json_value, os_reason, temporary_beside

FORMAT = "hertz-dev/1"
HASH_KEY = "content_sha256"
TEMP_SUFFIX = ".tmp"  # atomic_write's temporaries are `.NAME.<random>.tmp`


class CheckpointError(OneLine, ValueError):
    """A checkpoint that cannot be written, read or trusted; the message is one line naming the file."""


class FileReplaced(CheckpointError):
    """A checkpoint replaced while it was read (another process saved over it: a trainer's
    `latest`/`best`, a copy): what was read may mix the two files' headers and weights."""


def file_version(path: str | os.PathLike) -> tuple[int, ...]:
    """What changes when a file is replaced (an atomic save renames a new file over it) or
    rewritten: its device, inode, size and modification time. Not its change time, which a new
    hard link or one removed also moves (`best.safetensors` is a link of a `latest.safetensors`
    that the next save renames away): the file read is the same."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_unreplaced(path: str | os.PathLike, version: tuple[int, ...], label: Optional[str] = None) -> None:
    """FileReplaced naming `path` if it is no longer the file of `version` (`file_version`)."""
    try:
        now = file_version(path)
    except OSError:
        now = None
    if now != version:
        raise FileReplaced(f"{label or path} was replaced while it loaded (another process saved over it: a "
                           "training run's save?); load it again")


def reloaded_if_replaced(load: Callable) -> Callable:
    """`load` again, up to twice, when a file it read was replaced meanwhile (FileReplaced): a
    trainer saving over `latest.safetensors` every few minutes meets a load about as rarely."""
    import functools

    @functools.wraps(load)
    def loading(*args, **kwargs):
        for attempt in range(3):
            try:
                return load(*args, **kwargs)
            except FileReplaced:
                if attempt == 2:
                    raise
    return loading


@contextmanager
def written_temp(path: str | os.PathLike, write: Callable[[str], None]) -> Iterator[str]:
    """Call `write(tmp)` on a new temporary file beside `path` and fsync it; yields the temporary
    path, for the caller to rename within the block (`model.files.temporary_beside`: locked until
    then, removed if still there at its end). The temporaries of `path` that killed writers left
    are removed first. An OSError (full disk, read-only folder, a path under a file) becomes a
    CheckpointError naming `path`."""
    path = Path(path)

    def write_and_sync(tmp: str) -> None:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    with ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            drop_dead_temporaries(path.parent, f".{path.name}.", TEMP_SUFFIX)
            tmp = stack.enter_context(temporary_beside(path.parent, f".{path.name}.", TEMP_SUFFIX, write_and_sync))
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {os_reason(e, path)}") from None
        yield tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename the temporary file to `path` (same folder, fsynced),
    so `path` is either the old complete file or the new complete one. Raises CheckpointError
    naming `path` when the disk is full or the folder cannot be written. A `path` that is a device
    or a pipe (`model.files.is_device`) is written into, never replaced by a file: through a
    temporary file in the temporary folder, since `write` may rename a file over the path it is
    given (safetensors' `save_file` does)."""
    path = Path(path)
    if is_device(path):
        try:
            with tempfile.TemporaryDirectory() as folder:
                tmp = os.path.join(folder, path.name)
                write(tmp)
                with open(tmp, "rb") as source, open(path, "wb") as device:
                    shutil.copyfileobj(source, device)
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {os_reason(e)}") from None
        return path
    with written_temp(path, write) as tmp:
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {os_reason(e)}") from None
    return path


def torch_save(obj: Any, path: str) -> None:
    """torch.save through a Python file object: a full disk then raises OSError(ENOSPC), where
    saving to a path name ends in `RuntimeError: [enforce fail at inline_container.cc]`."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer wraps the OSError when it closes the archive
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


# --- what a file holds ------------------------------------------------------------------------

def non_finite(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or inf anywhere in `obj` (nested dicts,
    lists and tuples: a state dict, an optimizer state, a whole training state)."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return [prefix or "<tensor>"]
        return []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [name for k, v in items for name in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]


def beyond(state: dict[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """Names of the float tensors of `state` whose finite values a cast to `dtype` makes inf
    (float32 or bfloat16 weights, scales or zero points above float16's 65504). Only tensors of a
    far wider range than `dtype` are read, two scalars each: a cast to float16 (or float64's to
    float32), not float32's to bfloat16 (ranges within 0.4% of each other; the official float32
    files loaded in bfloat16 are not read once more); NaN and inf already there are
    `verify_content`'s to refuse (verify=False loads them)."""
    if not dtype.is_floating_point:
        return []
    bad = []
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and torch.finfo(t.dtype).max > 2 * torch.finfo(dtype).max:
            ends = torch.stack(torch.aminmax(t))  # (2,): NaN where the tensor holds one
            if bool(torch.isfinite(ends).all()) and not bool(torch.isfinite(ends.to(dtype)).all()):
                bad.append(name)
    return bad


def listed(names: list[str], shown: int = 3) -> str:
    """The first few of `names` and how many more: "a, b, c and 5 more"."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_non_finite(obj: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError naming `path` if `obj` holds NaN or inf weights."""
    bad = non_finite(obj)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} tensors hold NaN or inf ({listed(bad)}); "
                              "the training diverged: lower the learning rate or resume from an earlier checkpoint")


def _pickled_strings(path: Path) -> set[str]:
    """The strings in a torch zip file's pickle, read without unpickling (no code runs)."""
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
        data = z.read(name) if name else b""
    strings = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.add(arg)
    except Exception:  # a truncated pickle: what was read so far is enough to tell kinds apart
        pass
    return strings


def file_kind(path: str | os.PathLike) -> str:
    """What a file holds, read from its header only: "codec" or "transformer" (our safetensors),
    "codec training state" / "transformer training state" (a trainer's .pt), "PyTorch state dict"
    (a .pt such as the official files), or a description of another file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:  # its permissions, a dead disk: said as what it is, not as a traceback
        raise CheckpointError(f"cannot read {path}: {os_reason(e)}") from None
    if not head:
        return "empty file"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            strings = _pickled_strings(path)
        except zipfile.BadZipFile:  # its index, at the end of the file, is missing
            return "PyTorch file cut short or damaged (an incomplete copy or download?)"
        if {"generator", "opt_g"} <= strings:
            return "codec training state"
        if {"model", "optimizer", "codec_source"} <= strings:
            return "transformer training state"
        return "PyTorch state dict"
    try:
        meta = _header(path)
    except CheckpointError as e:
        # b"\x80" begins torch.save's legacy pickle format, and also a safetensors header of 128 + 256 k bytes
        return _damaged(path, head, e.__cause__ or e) or ("PyTorch state dict" if head[:1] == b"\x80"
                                                          else "file that is neither safetensors nor PyTorch")
    return meta.get("kind", "?") if meta.get("format") == FORMAT else "safetensors file not written by hertz-dev"


def _damaged(path: Path, head: bytes, refusal: Exception) -> Optional[str]:
    """For a file with a safetensors header that the safetensors library refused (`refusal`), what
    is wrong with it: it ends before what its header describes (an interrupted copy or download:
    inside its header, the 8 bytes of its length included, or its data), or after it (bytes
    appended), its header is blank or not JSON (damaged), or the library's own reason; None for a
    file without such a header."""
    length, size = int.from_bytes(head, "little"), path.stat().st_size
    if len(head) < 8 or length > 100 << 20:  # safetensors' own bound on a header
        return None
    with open(path, "rb") as f:
        f.seek(8)
        text = f.read(length)
    if len(text) < length and (not text or text.startswith(b"{")):  # a plausible length, and its text missing
        return (f"safetensors file cut short: {size} bytes, shorter than the {8 + length} of its header (an "
                "incomplete copy or download?)")
    if not text.strip(b" \0"):  # the whole header zeroed or blanked
        return "damaged safetensors file (its header is blank)"
    if not text.startswith(b"{"):
        return None
    try:
        header = json_value(text)
    except ValueError:  # JSON damaged in place: bytes zeroed or changed, or a length that cuts or overruns it
        return "damaged safetensors file (its header is not valid JSON)"
    try:
        end = 8 + length + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    except (TypeError, KeyError, IndexError, AttributeError):  # not a safetensors header after all
        return None
    if end > size:
        return (f"safetensors file cut short: {size} bytes of the {end} its header describes (an incomplete copy "
                "or download?)")
    if end < size:
        return (f"damaged safetensors file: {size} bytes, {size - end} more than the {end} its header describes "
                "(bytes appended to it?)")
    return f"damaged safetensors file ({' '.join(str(refusal).split()) or type(refusal).__name__})"


def _header(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError: "header too large", "invalid header", ...
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({e})") from e


def _wrong_file(path: Path, expected: str, found: str) -> CheckpointError:
    want = f"a {expected} checkpoint (.safetensors)" if expected else "a .safetensors checkpoint"
    hint = ""
    if found.endswith("training state"):
        from .lora import ADAPTER_SUFFIX  # a LoRA run exports its adapters, not the model
        export, adapter = path.with_suffix(".safetensors"), path.with_suffix(ADAPTER_SUFFIX)
        # a LoRA run's state records its base (model.finetune.base_of); its export is the adapters
        lora = found.startswith("transformer") and "base_fingerprint" in _pickled_strings(path)
        rerun = "is not beside it: rerun the trainer (it rebuilds the export at resume)"
        if lora or (adapter.is_file() and not export.is_file()):
            hint = (f"; it is a LoRA run's: pass {adapter} beside it as adapter= (--adapter, ADAPTER) on the base it "
                    "was trained on" if adapter.is_file() else f"; it is a LoRA run's, and its export {adapter.name} {rerun}")
        else:
            hint = (f"; load {export} beside it (its weights, exported for loading)" if export.is_file() else
                    f"; its export {export.name} {rerun}")
    elif found == "PyTorch state dict":  # as the official files are: they load by name, in each place's spelling
        from .hub import VARIANTS
        codec = "the official codec loads by name: --codec official (codec_checkpoint=official, load_codec('official'))"
        model = (f"official weights load by name: --variant {' | '.join(VARIANTS)} (init_from=official, "
                 "load_hertz_dev('duplex'))")
        hint = "; " + {"codec": codec, "transformer": model}.get(expected, f"{model}; {codec}")
    elif found == "adapter":  # a LoRA adapter (model/lora.py): it goes on top of the base it was trained on
        base = header_json(path, _header(path), "extra", {}).get("base_source")
        hint = (f"; load the base it was trained on ({base or 'its header names none'}) and pass the adapter as "
                "adapter= (--adapter, ADAPTER)")
    return CheckpointError(f"{path}: expected {want}, found {'an' if found[0] in 'aeiou' else 'a'} {found}{hint}")


def read_metadata(path: str | os.PathLike, kind: Optional[str] = None) -> dict:
    """The header of one of our checkpoints: kind, config (dict), extra (dict), the stored
    content hash (None for files written before hashes) and the quantization (dict, or None for
    float weights). `kind` ("codec" or "transformer"):
    a file of another kind, a .pt or a foreign file is a CheckpointError naming both kinds."""
    path = Path(path)
    found = file_kind(path)
    if found not in ("codec", "transformer") or (kind is not None and found != kind):
        if found.startswith("safetensors file not written"):
            meta = _header(path)
            raise CheckpointError(f"{path} is not a hertz-dev checkpoint written by this repository "
                                  f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        raise _wrong_file(path, kind or "", found)
    meta = _header(path)
    return {"kind": meta["kind"], "config_class": meta.get("config_class"),
            "config": header_json(path, meta, "config"), "extra": header_json(path, meta, "extra", {}),
            "hash": meta.get(HASH_KEY), "quantization": _quantization(path, meta)}


def _quantization(path: Path, meta: dict) -> Optional[dict]:
    """The quantization the header `meta` of `path` records (None: float weights), checked: a known
    mode with a dict of layers, the mode being that of its layers (`model.quant.mode_of`: what
    quantize= and init_from are checked against). A CheckpointError naming the file otherwise."""
    from .quant import MODES, mode_of

    recorded = header_json(path, meta, "quantization", None)
    if recorded is None:
        return None
    if recorded.get("mode") not in MODES or not isinstance(recorded.get("layers"), dict):
        raise CheckpointError(f"{path}: its header records an unknown quantization {recorded.get('mode')!r} "
                              f"(expected one of {', '.join(MODES)} with its layers); re-export it")
    if meta.get("kind") == "transformer" and (stray := [p for p in recorded["layers"]
                                                         if str(p).split(".", 1)[0] not in ("quantizer", "lm", "resynth")]):
        raise CheckpointError(f"{path}: its header records quantized layers outside the quantizer, LM and "
                              f"resynthesizer ({listed(stray)}); re-export it")
    if recorded["mode"] != (layers := mode_of(recorded["layers"])):
        raise CheckpointError(f"{path}: its header records {recorded['mode']} quantization, but "
                              + (f"its layers are {layers}" if layers else "no quantized layer") + "; re-export it")
    return recorded


_REQUIRED = object()


def header_json(path: str | os.PathLike, meta: dict, key: str, default: Any = _REQUIRED) -> Any:
    """The JSON object (a dict) stored under `key` in the header `meta` of `path`, or `default`
    where the key is absent and not required; a CheckpointError naming the file and the field if
    it is missing, not JSON or not an object (a file edited or written by another tool)."""
    if key not in meta:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: its header has no {key!r} field; re-export or re-download it")
        return default
    try:
        value = json_value(meta[key])
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {key!r} field of its header is not a JSON object; "
                              "re-export or re-download it")
    return value


def config_from(cls, data: dict, path: str | os.PathLike, strict: bool = False):
    """The `cls` config a checkpoint's header records (`config.from_dict`); a CheckpointError naming
    the file and the field where it does not make one (a wrong type, a value out of range, a
    required field missing)."""
    from config import from_dict
    try:
        return from_dict(cls, data, strict=strict)
    except (TypeError, ValueError) as e:  # ConfigError (a ValueError), or a required field missing
        raise CheckpointError(f"{path}: its config is not a valid {cls.__name__}: {e}") from None


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over `metadata` (without the hash itself) and each tensor's name, dtype, shape and
    bytes, in sorted order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# --- writing and reading weights ----------------------------------------------------------------

def write_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], kind: str, config,
                  extra: Optional[dict] = None, label: Optional[str] = None,
                  quantization: Optional[dict] = None) -> None:
    """Write `state`, the config that built it (a dataclass) and its content hash to `path`
    directly (callers make it atomic: `atomic_write`, `model.training.Checkpoints`). NaN or inf
    weights are refused with a CheckpointError naming `label` (default: `path`). `quantization` records which layers hold
    quantized weights (`model.quant.quantization_of`), so the file loads quantized."""
    from safetensors.torch import save_file

    refuse_non_finite(state, label or path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "kind": kind, "config_class": type(config).__name__,
            "config": json.dumps(dataclasses.asdict(config)), "extra": json.dumps(extra or {})}
    if quantization is not None:
        meta["quantization"] = json.dumps(quantization)
    meta[HASH_KEY] = content_hash(tensors, meta)
    try:
        save_file(tensors, str(path), metadata=meta)
    except Exception as e:  # safetensors reports I/O errors as SafetensorError("... (os error 28)")
        code = re.search(r"os error (\d+)", str(e))
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from None
        raise


def read_weights(path: str | os.PathLike, device: str = "cpu", kind: Optional[str] = None,
                 verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of one of our checkpoints, of `kind` if given (see `read_metadata`).

    verify: recompute the content hash and raise CheckpointError if the bytes changed or a weight is
    NaN or inf (`verify_content`); a file without a hash (written before hashes) loads with a
    warning. verify=False skips all three. A file replaced while it is read (another process saved
    over it) is a FileReplaced error, not a mix of two files nor a false "corrupted".
    """
    from safetensors.torch import load_file

    version = file_version(path)  # (the header and the tensors are read in three opens of the path)
    try:
        meta = read_metadata(path, kind)
        state = load_file(str(path), device=device)
        if verify:
            verify_content(path, state, meta["hash"])
    except CheckpointError:
        check_unreplaced(path, version)  # a mix of two files, not a damaged one
        raise
    check_unreplaced(path, version)
    return state, meta


def verify_content(path: str | os.PathLike, state: dict[str, torch.Tensor], stored_hash: Optional[str]) -> None:
    """Check the tensors `state` read from `path` against the content hash of its header
    (`stored_hash`; None, for files written before hashes, is a warning) and refuse NaN or inf
    weights (a file written by another tool, or before writes refused them): CheckpointError
    naming the file."""
    if stored_hash is None:
        warnings.warn(f"{path} has no content hash (written before hashes were added): loading it unchecked; "
                      "re-save it to add one", stacklevel=3)
    elif content_hash(state, _header(Path(path))) != stored_hash:
        raise CheckpointError(f"{path} is corrupted: its content does not match the hash in its header; "
                              "re-export or re-download it (verify=False / --no-verify loads it anyway)")
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or inf ({listed(bad)}); a model with them "
                              "generates noise or silence: re-export it from a good training state")


# The dtypes of a safetensors header (its names) that a hertz-dev checkpoint may hold.
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def tensor_specs(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: an empty `meta` tensor of its shape and dtype} for each tensor of the safetensors file
    at `path`, from its header alone (no data is read): what the loaders check a file's tensors
    against the model with before reading and hashing them. A CheckpointError naming the file and
    tensor for a dtype no hertz-dev model holds (float8, complex, ...)."""
    from safetensors import safe_open

    specs = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            dtype = HEADER_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} is of dtype {piece.get_dtype()}, which no hertz-dev "
                                      "model holds; re-export it")
            specs[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    return specs


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
