"""The official hertz-dev weights: names, md5s, download from the Hugging Face Hub, verification.

Files live in `./ckpt` (configurable). What is missing is downloaded from `si-pbc/hertz-dev`
through `huggingface_hub` (its URL scheme, endpoint and session), streamed into a temporary
file in the same folder, md5-checked, then renamed into place: a file under its final name is
always complete and verified (a temporary left by a killed download is started over). Interrupted
transfers and HTTP 5xx answers are retried a bounded number of times; an md5 mismatch is
downloaded once more, then reported. What another attempt cannot change is one WeightsError at
once: an HTTP 4xx answer, a folder that cannot be written (a file in its place, read-only, a full
disk), and a disk with less room than the file needs, found before the download starts. Offline (`offline=True` or
`HF_HUB_OFFLINE=1`), a missing file is an error that names each file, its size and where to put it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HF_REPO = "si-pbc/hertz-dev"
DEFAULT_CKPT_DIR = "ckpt"


@dataclass(frozen=True)
class OfficialFile:
    name: str          # file stem, as in the original's load_ckpt
    md5: str
    size: int          # bytes of tensor data (the file is a few KB larger)
    component: str

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"


OFFICIAL_FILES = {f.name: f for f in [
    OfficialFile("inference_apatosaurus_95000", "ba876edb97b988e9196e449dd176ca97", 376_336_260, "codec"),
    OfficialFile("inference_volcano_3", "d42bf674022c5f84b051d5d7794f6169", 201_687_060, "quantizer"),
    OfficialFile("inference_caraway_112000", "fcb8368ef8ebf7712f3e31e6856da580", 26_443_546_624, "mono LM"),
    OfficialFile("inference_syrup_110000", "353c48f553f1706824c11f3bb6a049e9", 26_443_546_624, "mono LM (pure audio)"),
    OfficialFile("inference_whip_72000", "5e7cee7316900737d55fc5d44cc7a8f7", 6_519_179_296, "mono resynthesizer"),
    OfficialFile("inference_scion_54000", "cb8bc484423922747b277ebc2933af5d", 26_980_974_592, "duplex LM"),
    OfficialFile("inference_care_50000", "e4ff4fe5c7e9f066410d2a5673b7a935", 6_553_290_784, "duplex resynthesizer"),
]}

CODEC = "inference_apatosaurus_95000"
QUANTIZER = "inference_volcano_3"
# variant -> (LM, resynthesizer, duplex)
VARIANTS = {
    "duplex": ("inference_scion_54000", "inference_care_50000", True),
    "mono": ("inference_caraway_112000", "inference_whip_72000", False),
    "mono-pure-audio": ("inference_syrup_110000", "inference_whip_72000", False),
}


class WeightsError(RuntimeError):
    """An official file could not be found, downloaded or verified."""


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """The hex digest of a file's bytes, read in chunks (`hashlib.file_digest` is Python 3.11's;
    the README promises 3.10)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_offline(offline: Optional[bool]) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


class _Verified:
    """`<ckpt>/.verified.json`: size, mtime and md5 of files already checked, so a 27 GB file is
    hashed once, not at every load."""

    def __init__(self, folder: Path):
        self.path = folder / ".verified.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def ok(self, file: Path, md5: str) -> bool:
        st = file.stat()
        return self.data.get(file.name) == [st.st_size, st.st_mtime_ns, md5]

    def add(self, file: Path, md5: str) -> None:
        st = file.stat()
        self.data[file.name] = [st.st_size, st.st_mtime_ns, md5]
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only folder only costs a re-hash next time


def _cannot_write(path: Path, error: OSError, what: str) -> WeightsError:
    """The error for an official file that cannot be written here (a full disk, a read-only
    folder, a file where the folder goes): local, so not retried."""
    from .checkpoint import os_reason  # (torch: only on this path)
    return WeightsError(f"cannot write {path}: {os_reason(error, path)}; {what}")


def _download_once(url: str, dest: Path, expected_size: Optional[int], progress: bool) -> str:
    """Stream `url` into a temporary file beside `dest`; return its md5 and leave it as
    `.{dest.name}.download`. Raises WeightsError for what another attempt cannot change (an HTTP
    4xx answer, a file that cannot be written) and IOError or the client's error for a transfer
    that may succeed when tried again (an HTTP 5xx, a dropped connection, a short read)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    tmp = dest.with_name(f".{dest.name}.download")
    h = hashlib.md5()
    got = 0
    session = get_session()
    with session.stream("GET", url, headers=build_hf_headers(), follow_redirects=True, timeout=60) as r:
        if r.status_code >= 400:  # (the client's own error spans two lines, with a link)
            answer = f"HTTP {r.status_code} {r.reason_phrase}"
            if r.status_code < 500 and r.status_code not in (408, 429):
                raise WeightsError(f"{url} answered {answer}; check HF_ENDPOINT and the access token (HF_TOKEN), "
                                   f"or download {dest.name} from https://huggingface.co/{HF_REPO} into {dest.parent}/")
            raise IOError(answer)
        total = int(r.headers.get("content-length") or 0) or expected_size
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
        try:
            with open(tmp, "wb") as f:
                for block in r.iter_bytes(1 << 20):
                    f.write(block)
                    h.update(block)
                    got += len(block)
                    if bar:
                        bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.filename is None and e.errno is None:  # the transfer's (a dropped connection), not the disk's
                raise
            full = e.errno == errno.ENOSPC
            raise _cannot_write(dest, e, f"{dest.name} needs about {_human(total or got)}: free space there or "
                                         "choose another folder (ckpt_dir)" if full else
                                "choose a folder this process can write (ckpt_dir)") from None
        if bar:
            bar.close()
        declared = r.headers.get("content-length")
        if declared is not None and int(declared) != got:
            raise IOError(f"transfer of {dest.name} ended after {got} of {declared} bytes")
    return h.hexdigest()


def check_offline(names, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None) -> None:
    """WeightsError naming every one of these official files that is not in `ckpt_dir` when offline
    (what `official_files` would refuse), from the file names alone: a script asks it before slow work."""
    if not _is_offline(offline):
        return
    folder = Path(ckpt_dir)
    missing = [f for f in (OFFICIAL_FILES[n] for n in names) if not (folder / f.filename).is_file()]
    if missing:
        lines = [f"  {f.filename}  ({f.component}, about {_human(f.size)}, md5 {f.md5})" for f in missing]
        raise WeightsError(
            "offline mode and these official hertz-dev files are missing:\n" + "\n".join(lines) +
            f"\nDownload them from https://huggingface.co/{HF_REPO} and put them in "
            f"{folder.resolve()}/ (or run once without offline mode / HF_HUB_OFFLINE).")


def official_file(name: str, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
                  endpoint: Optional[str] = None, retries: int = 3, progress: bool = True,
                  log: Callable[[str], None] = print, backoff: float = 1.0) -> Path:
    """Path of a verified official file, downloading it if missing (see module docstring)."""
    return official_files([name], ckpt_dir, offline, endpoint, retries, progress, log, backoff)[name]


def official_files(names, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
                   endpoint: Optional[str] = None, retries: int = 3, progress: bool = True,
                   log: Callable[[str], None] = print, backoff: float = 1.0) -> dict[str, Path]:
    """Verified local paths of several official files; downloads what is missing unless offline.
    Offline, every missing file is named in one error."""
    folder = Path(ckpt_dir)
    files = [OFFICIAL_FILES[n] for n in names]
    check_offline(names, ckpt_dir, offline)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(folder / files[0].filename, e, "choose another folder for the official weights "
                                                         "(ckpt_dir)") from None
    verified = _Verified(folder)
    out = {}
    for f in files:
        path = folder / f.filename
        if path.is_file():
            if verified.ok(path, f.md5):
                out[f.name] = path
                continue
            digest = file_digest(path)
            if digest == f.md5:
                verified.add(path, f.md5)
                out[f.name] = path
                continue
            if _is_offline(offline):
                raise WeightsError(f"{path} is corrupt: md5 {digest}, expected {f.md5}. Delete it and "
                                   f"download it again from https://huggingface.co/{HF_REPO}.")
            log(f"{path} has md5 {digest}, expected {f.md5}: downloading it again")
        free = shutil.disk_usage(folder).free
        if free < f.size:  # found now, not after hours of downloading (the temporary goes beside the file)
            raise WeightsError(f"{folder} has {_human(free)} free and {f.filename} ({f.component}) needs about "
                               f"{_human(f.size)}: free space there or choose another folder (ckpt_dir)")
        out[f.name] = _fetch(f, path, endpoint, retries, progress, log, backoff)
        verified.add(out[f.name], f.md5)
    return out


def _fetch(f: OfficialFile, path: Path, endpoint: Optional[str], retries: int, progress: bool,
           log: Callable[[str], None], backoff: float) -> Path:
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(HF_REPO, f.filename, endpoint=endpoint or os.environ.get("HF_ENDPOINT"))
    tmp = path.with_name(f".{path.name}.download")
    md5_failures = 0
    attempt = 0
    while True:
        attempt += 1
        try:
            digest = _download_once(url, path, f.size, progress)
        except WeightsError:  # another attempt would not change it
            _remove(tmp)
            raise
        except Exception as e:  # network errors, HTTP 5xx, short reads
            _remove(tmp)
            if attempt >= retries:
                raise WeightsError(f"could not download {f.filename} from {url} after {attempt} attempts: {e}") from e
            wait = min(2 ** (attempt - 1), 30) * backoff
            log(f"download of {f.filename} failed ({e}); retrying in {wait:.1f}s ({attempt}/{retries})")
            time.sleep(wait)
            continue
        if digest != f.md5:
            _remove(tmp)
            md5_failures += 1
            if md5_failures >= 2:
                raise WeightsError(f"{f.filename} from {url} has md5 {digest} twice, expected {f.md5}; "
                                   "the download source or the file is corrupt")
            log(f"{f.filename}: md5 {digest} does not match {f.md5}; downloading once more")
            continue
        os.replace(tmp, path)
        return path


def _remove(tmp: Path) -> None:
    """Remove a download's temporary if there is one (on a read-only folder, there is none and
    even asking raises)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def load_state_dict(path: Path) -> dict:
    """An official `.pt` file as a state dict, memory-mapped (nothing is read until used)."""
    import torch
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
