"""The official hertz-dev weights: names, md5s, download from the Hugging Face Hub, verification.

Files live in `./ckpt` (configurable). What is missing is downloaded from `si-pbc/hertz-dev` through
`huggingface_hub` (its URL scheme, endpoint and session), streamed into a temporary
`.NAME.pt.download` in the same folder, md5-checked, then renamed into place: a file under its final
name is always complete and verified. A process writes the temporary under an exclusive `flock`: a
second one downloading the same file waits for it, then finds the verified file in place (or takes
the partial over if the first died). What a dropped connection, an error or a killed process leaves
in the temporary is kept, and the next attempt (a retry, or a later run) asks for the rest with
`Range: bytes=N-`, hashing the kept bytes first; a sidecar `.NAME.pt.download.json` names the md5
and size the temporary is a prefix of, so a partial of another version of the file is never resumed;
a range answer holding part of the rest (as its Content-Range says) is followed by a request for the
next (one to a request for the whole file, from a server that answers 206 to all, has the size its
Content-Range gives, and is kept and resumed as any), one from another start is downloaded from the
start, and the whole file answered (a 200, of the same size or none given) is read from the start
with its first bytes checked against the kept ones, which it only replaces where they differ (an
answer that stops early loses nothing). A
Content-Length that cannot be right (shorter than the file, or than the range its Content-Range
names) is a failed attempt said before the body is read. The file is asked for uncompressed
(`Accept-Encoding: identity`); one compressed all the same is taken as of unknown size (its lengths
are the compressed ones). A 416 saying the file ends where the partial does has the partial checked
as the whole file. A partial left beside a file found in place and verified (put there by hand) is
removed, and said, unless a live process holds its lock. Interrupted transfers and HTTP 5xx answers
are retried a bounded number of times in a row (an attempt that added bytes starts the count anew);
an attempt fails when the server sends nothing for `HF_HUB_DOWNLOAD_TIMEOUT` seconds (60 unset; another
value is a WeightsError before any file in place is hashed, when one may be downloaded), or when no
connection is made within them (said as such, naming the host), and a Ctrl-C says what is kept for
the next run; an md5 mismatch is downloaded once more from zero, then reported.
What another attempt cannot change is one WeightsError at once: an HTTP 4xx answer, a web page
(text/html) instead of the file (a partial kept is kept), a folder that cannot be written (a file in
its place, read-only, a full disk), and a disk with less room than the rest of the missing files
need, found before the first download starts. Offline (`offline=True`, or `HF_HUB_OFFLINE` or
`TRANSFORMERS_OFFLINE` set to 1, ON, YES or TRUE, as huggingface_hub reads them),
a missing file is an error that names each file, its size and where to put it, and a partial
download of it left there (whether a run online resumes it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .files import change_stamp, drop_dead_temporaries, json_value, open_locked, os_reason, replace_atomically

HF_REPO = "si-pbc/hertz-dev"
DEFAULT_CKPT_DIR = "ckpt"
DOWNLOAD_TIMEOUT = 60.0  # seconds an attempt waits for the server's next bytes; HF_HUB_DOWNLOAD_TIMEOUT sets it


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


def download_timeout() -> float:
    """How long a download waits for the server's next bytes before the attempt fails: the
    `HF_HUB_DOWNLOAD_TIMEOUT` environment variable (huggingface_hub's, whole seconds), else
    DOWNLOAD_TIMEOUT; another value is a WeightsError naming it (huggingface_hub itself fails on
    one that is not a whole number with a traceback when imported: asked before it is)."""
    said = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", "").strip()
    if not said:
        return DOWNLOAD_TIMEOUT
    if not said.isdigit() or int(said) == 0:
        raise WeightsError(f"HF_HUB_DOWNLOAD_TIMEOUT: expected a whole number of seconds > 0, got {said!r}")
    return float(said)


def _timeout(names, folder: Path) -> float:
    """`download_timeout()` when one of these files may be downloaded (one not in `folder` and
    recorded as verified: a file to download, or to hash, which may then be downloaded), so that a
    bad value is said before a 27 GB file in place is hashed for minutes; else DOWNLOAD_TIMEOUT."""
    verified = _Verified(folder)
    if all((folder / f.filename).is_file() and verified.ok(folder / f.filename, f.md5)
           for f in (OFFICIAL_FILES[n] for n in names)):
        return DOWNLOAD_TIMEOUT
    return download_timeout()


def _failure(e: Exception, timeout: float) -> str:
    """What went wrong in an attempt, in words: the client says only "timed out", both for a
    connection never made (a host that does not answer, or a blackholed address) and for a server
    that stopped sending."""
    names = {c.__name__ for c in type(e).__mro__}
    if "ConnectTimeout" in names:  # (the client's: the host it tried is on the request, where a redirect led too)
        try:
            url = e.request.url
            host = url.host if url.port is None else f"{url.host}:{url.port}"
        except (AttributeError, RuntimeError):  # (no request attached)
            host = "the server"
        return f"could not connect to {host} within {timeout:g} s (HF_HUB_DOWNLOAD_TIMEOUT sets how long to wait)"
    if isinstance(e, TimeoutError) or "TimeoutException" in names:
        return f"no data from the server for {timeout:g} s (HF_HUB_DOWNLOAD_TIMEOUT sets how long to wait)"
    return str(e)


def _is_offline(offline: Optional[bool]) -> bool:
    """`offline`, or what the environment says as huggingface_hub reads it (which then blocks every
    request): HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE, one of 1, ON, YES, TRUE in any case."""
    if offline is not None:
        return offline
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in \
        ("1", "ON", "YES", "TRUE")


def _readable(path: Path) -> Path:
    """`path`, or WeightsError if this process cannot read it (its permissions, a dead disk): found
    before any weights load, not as a traceback from deep inside the loading."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {os_reason(e)}") from None
    return path


class _Verified:
    """`<ckpt>/.verified.json`: size, mtime, inode change time and number, and md5 of files already
    checked, so a 27 GB file is hashed once, not at every load. Size and mtime alone let a file
    replaced with the same size and its mtime put back (`cp -p`, `touch -r`) pass unhashed; the
    inode's change time moves with every write and cannot be set back (as `model.latents` keys its
    corpora). A record of the older form matches nothing: the file is hashed once more."""

    def __init__(self, folder: Path):
        self.path = folder / ".verified.json"
        self.data = self._read()
        # a record's temporary whose writer was killed before renaming it (`model.files`): removed
        drop_dead_temporaries(folder, f".{self.path.name}.", ".tmp")

    def _read(self) -> dict:
        try:
            data = json_value(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _key(file: Path, md5: str) -> list:
        return [*change_stamp(file.stat()), md5]

    def ok(self, file: Path, md5: str) -> bool:
        return self.data.get(file.name) == self._key(file, md5)

    def add(self, file: Path, md5: str) -> None:
        """Record `file`, keeping what other processes recorded since this one read the record: the
        read, the merge and the rename under an exclusive lock on the folder (two processes
        recording at once lost one record in a third of tries, a 27 GB file hashed again)."""
        import fcntl
        try:
            folder = os.open(self.path.parent, os.O_RDONLY)  # (the folder's lock: no file left beside the weights)
            try:
                for _ in range(100):  # 5 s at most: a holder stopped (Ctrl-Z) must not hang the others
                    try:
                        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(0.05)
                self.data = {**self._read(), file.name: self._key(file, md5)}
                replace_atomically(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.data, indent=1)))
            finally:
                os.close(folder)
        except OSError:
            pass  # a read-only folder only costs a re-hash next time


def _cannot_write(path: Path, error: OSError, what: str) -> WeightsError:
    """The error for an official file that cannot be written here (a full disk, a read-only
    folder, a file where the folder goes): local, so not retried."""
    return WeightsError(f"cannot write {path}: {os_reason(error, path)}; {what}")


class _Partial:
    """A download's temporary `.NAME.pt.download` beside the file, held under an exclusive `flock`
    while it is written (a second process downloading the same file waits for the first, then finds
    the verified file in place, or takes the partial over if the first died), with a sidecar
    `.NAME.pt.download.json` naming the md5 it is a prefix of and the file's size as the server
    gave it. A partial whose sidecar names another md5 (an older OFFICIAL_FILES entry) or none is
    started over; one that matches is resumed: its bytes are hashed again and the rest is asked
    for with `Range: bytes=N-`."""

    def __init__(self, path: Path, md5: str, file):
        self.tmp = _temporary(path)
        self.meta = _sidecar(self.tmp)
        self.md5 = md5
        self.file = file  # (the temporary, opened r+b and locked)
        self.size: Optional[int] = None  # the whole file's, as the server said
        self.got = 0
        self.hash = hashlib.md5()
        # (a whole file sent again over the kept bytes, `replay`: where its next byte goes, and the md5 of what came)
        self.pos, self.again = 0, hashlib.md5()
        self.sent_whole = False  # the last request for the rest was answered with the whole file

    @classmethod
    def lock(cls, path: Path, md5: str, verified: Callable[[], bool],
             log: Callable[[str], None]) -> Optional["_Partial"]:
        """The locked temporary of `path`, its kept prefix hashed, or None once `verified()` (the
        file is in place and verified: another process finished it while this one waited)."""
        tmp, said = _temporary(path), []

        def waiting() -> None:
            if not said:
                log(f"another process is downloading {path.name} into {path.parent}; waiting for it")
                said.append(True)

        while True:
            if verified():
                return None
            # (a file system without locks: go on unlocked, as before)
            file = open_locked(tmp, waiting, buffering=0, locks_optional=True)
            if file is None:  # renamed into place (or removed) while this process waited: look again
                continue
            try:
                part = cls(path, md5, file)
                if verified():
                    part.discard()
                    return None
                part.take_over()
                return part
            except BaseException:
                file.close()
                raise

    def take_over(self) -> None:
        """Keep what an earlier attempt of the same file left (hashing it), or start over."""
        size = _kept_size(self.meta, self.md5)
        kept = os.fstat(self.file.fileno()).st_size
        if size is None or kept > size:
            self.restart()
            return
        self.size = size
        self.file.seek(0)
        while self.got < kept:
            block = self.file.read(min(1 << 22, kept - self.got))
            if not block:
                break
            self.hash.update(block)
            self.got += len(block)
        self.pos = self.got

    def restart(self) -> None:
        """Start over from byte 0 (the sidecar goes first: a sidecar always describes a prefix)."""
        _remove(self.meta)
        self.file.seek(0)
        self.file.truncate()
        self.size, self.got, self.hash, self.pos = None, 0, hashlib.md5(), 0

    def begin(self, size: Optional[int]) -> None:
        """A whole file is coming from byte 0, of `size` bytes if the server said."""
        self.restart()
        if size:
            self.meta.write_text(json.dumps({"md5": self.md5, "size": size}))
            self.size = size

    def replay(self) -> None:
        """The whole file is coming again from byte 0 (a server that answered the Range request with
        a 200): its first bytes are checked against the kept ones instead of replacing them, so an
        answer that stops before their end loses nothing; where they differ, the kept bytes end."""
        self.pos, self.again = 0, hashlib.md5()

    def write(self, pending: bytearray) -> None:
        """Append `pending`, emptying it as it goes (the file is unbuffered: `got` and the hash
        count what reached it, even when a full disk takes part of a block); while a whole file sent
        again is below the kept bytes (`replay`), check it against them instead."""
        while pending and self.pos < self.got:
            n = min(len(pending), self.got - self.pos, 1 << 22)
            self.file.seek(self.pos)
            if self.file.read(n) != pending[:n]:  # (other bytes: what matched so far is the prefix kept)
                self.file.truncate(self.pos)
                self.got, self.hash = self.pos, self.again
                break
            self.again.update(pending[:n])
            self.pos += n
            del pending[:n]
        if not pending:
            return
        self.file.seek(self.got)
        while pending:
            n = self.file.write(pending)
            self.hash.update(pending[:n])
            self.got += n
            del pending[:n]
        self.pos = self.got

    def settle(self) -> None:
        """After an attempt: the file ends where the hash does, and is on disk."""
        self.file.truncate(self.got)
        os.fsync(self.file.fileno())

    def finish(self, path: Path) -> None:
        """Rename the verified temporary into place (still locked: a waiting process then finds it)."""
        os.replace(self.tmp, path)
        _remove(self.meta)

    def discard(self) -> None:
        _remove(self.meta)
        _remove(self.tmp)
        self.close()

    def close(self) -> None:
        """Unlock (and drop the temporary if nothing in it can be resumed: no litter)."""
        if not self.file.closed:
            mine = self.tmp.exists() and os.path.samestat(os.fstat(self.file.fileno()), self.tmp.stat())
            if mine and (self.got == 0 or self.size is None):
                _remove(self.meta)
                _remove(self.tmp)
            self.file.close()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.download")


def _sidecar(tmp: Path) -> Path:
    return tmp.with_name(f"{tmp.name}.json")


def _kept_size(meta: Path, md5: str) -> Optional[int]:
    """The whole file's size a partial download of the file of `md5` is a prefix of, or None when
    its sidecar is missing, unreadable or names another md5 (another version of the file)."""
    try:
        said = json_value(meta.read_text())
        return int(said["size"]) if said.get("md5") == md5 and int(said["size"]) > 0 else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _kept_bytes(path: Path, md5: str) -> int:
    """Bytes a partial download of `path` (of `md5`) already holds, to be resumed."""
    tmp = _temporary(path)
    try:
        return tmp.stat().st_size if _kept_size(_sidecar(tmp), md5) is not None else 0
    except OSError:
        return 0


def _content_range(r) -> Optional[tuple[int, int, int]]:
    """(first byte, last byte, whole size) of a 206 answer's `Content-Range: bytes FIRST-LAST/SIZE`,
    or None when it has none or one that is not a range of the file."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", "").strip())
    first, last, size = (int(g) for g in m.groups()) if m else (0, -1, 0)
    return (first, last, size) if first <= last < size else None


def _download_once(url: str, dest: Path, part: _Partial, expected_size: Optional[int], progress: bool,
                   log: Callable[[str], None], timeout: float) -> str:
    """Stream `url` into the locked temporary `part` (resuming at what it holds when the server
    answers the range asked for, else from byte 0); return the whole file's md5. Raises
    WeightsError for what another attempt cannot change (an HTTP 4xx answer, a web page, a file that
    cannot be written) and IOError or the client's error for a transfer that may succeed when tried again
    (an HTTP 5xx, a dropped connection, a short read); the bytes received are kept either way."""
    from huggingface_hub.utils import build_hf_headers, get_session

    session = get_session()
    while True:
        if part.got and part.size is None:  # (the server gave no size: a range answer cannot be checked)
            part.restart()
        start = part.got
        if start and start == part.size:  # all there already (a run killed before the rename)
            return part.hash.hexdigest()
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # (the file's own bytes: sizes and ranges are of those)
        if start:
            headers["Range"] = f"bytes={start}-"
            log(f"resuming {dest.name} at {_human(start)} of {_human(part.size)}")
        with session.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as r:
            piece = _content_range(r)
            # (compressed all the same, by a proxy say: the client hands over the file's bytes, but the lengths and
            # ranges the answer gives are of the compressed ones, which a file on disk cannot be resumed from)
            encoded = r.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")
            if start and r.status_code == 416 and r.headers.get("content-range", "").strip() == f"bytes */{start}":
                # (the partial holds the whole file already: a server that announced more than it had, say)
                log(f"{url} has no bytes of {dest.name} past the {_human(start)} downloaded; checking them")
                return part.hash.hexdigest()
            if start and (r.status_code == 416 or r.status_code == 206 and (encoded or piece is None
                                                                              or piece[0] != start
                                                                              or piece[2] != part.size)):
                log(f"{url} did not answer the range asked for ({r.status_code} "
                    f"{r.headers.get('content-range', '')}); downloading {dest.name} from the start")
                part.restart()  # (the file there changed, or a server that does ranges its own way)
                continue
            # (the Hub redirects to its file store: say which answered, without the query, a signature)
            where = url if str(r.url) == url else f"{url} (redirected to {str(r.url).split('?')[0]})"
            if r.status_code >= 400:  # (the client's own error spans two lines, with a link)
                answer = f"HTTP {r.status_code} {r.reason_phrase}"
                if r.status_code < 500 and r.status_code not in (408, 429):
                    raise WeightsError(f"{where} answered {answer}; check HF_ENDPOINT and the access token (HF_TOKEN), "
                                       f"or download {dest.name} from https://huggingface.co/{HF_REPO} into "
                                       f"{dest.parent}/")
                raise IOError(answer)
            if r.status_code not in (200, 206):  # (a redirect without a Location, a 204: no file in it)
                raise IOError(f"the server answered HTTP {r.status_code} {r.reason_phrase}, not the file")
            declared = r.headers.get("content-length") if not encoded else None
            kind = r.headers.get("content-type", "")
            if kind.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
                # (a captive portal, a proxy's sign-in, a mirror's page: not the file, and a partial kept is not
                # started over for it; the Hub serves the files as octet-streams)
                size = f", {_human(int(declared))}" if declared and declared.isdigit() else ""
                raise WeightsError(f"{where} answered a web page ({kind}{size}), not {dest.name}: check HF_ENDPOINT "
                                   "and the network (a proxy or a captive portal asking to sign in?), or download "
                                   f"{dest.name} from https://huggingface.co/{HF_REPO} into {dest.parent}/")
            part.sent_whole = bool(start) and r.status_code != 206
            if declared is not None:  # (a length that cannot be the file's: said now, not as an md5 mismatch after it)
                if r.status_code == 206 and piece and int(declared) != piece[1] - piece[0] + 1:
                    raise IOError(f"the server announced a Content-Length of {declared} bytes for bytes {piece[0]}-"
                                  f"{piece[1]} of {dest.name} (its Content-Range), which are {piece[1] - piece[0] + 1}")
                if r.status_code != 206 and expected_size and int(declared) < expected_size:
                    raise IOError(f"the server announced a Content-Length of {declared} bytes for {dest.name}, which "
                                  f"has at least {expected_size}")
            try:
                if r.status_code != 206 and start and (declared is None or int(declared) == part.size):
                    # (a server that ignores Range, or did this once: the kept bytes are not thrown away for it; one
                    # that gives no length, or a compressed one, is checked against them too)
                    log(f"{url} answered the request for the rest of {dest.name} with the whole file; reading it "
                        f"from the start, keeping the {_human(start)} downloaded where they match")
                    part.replay()
                elif r.status_code != 206:  # the whole file
                    if start:
                        log(f"{url} answered the request for the rest of {dest.name} with a file of another size "
                            f"({declared} bytes, not {part.size}); downloading it from the start")
                    part.begin(int(declared) if declared else None)
                elif not start:  # (a range answer to a request for the whole file: its Content-Range gives the size)
                    whole = piece[2] if piece and piece[0] == 0 and not encoded else None
                    part.begin(whole or (int(declared) if declared else None))
                _receive(r, dest, part, part.size or expected_size, progress)
            except OSError as e:
                if e.filename is None and e.errno is None:  # the transfer's (a dropped connection), not the disk's
                    raise
                if e.errno != errno.ENOSPC:
                    raise _cannot_write(dest, e, "choose a folder this process can write (ckpt_dir)") from None
                kept = f" (the {_human(part.got)} downloaded are kept for the next run to resume)" if part.got else ""
                raise _cannot_write(dest, e, f"{dest.name} needs about {_human(part.size or expected_size or part.got)}"
                                             f": free space there or choose another folder (ckpt_dir){kept}") from None
            if declared is not None and int(declared) != part.got - (start if r.status_code == 206 else 0):
                raise IOError(f"transfer of {dest.name} ended after {part.got} of {part.size or declared} bytes")
            if r.status_code != 206 and part.size and part.got < part.size:  # (no length given: it ended early)
                raise IOError(f"the answer ended before the {part.size} bytes of {dest.name}, with no length given")
            if r.status_code == 206 and part.size and part.got < part.size:
                if part.got == start:  # (nothing came: asking again at once would go on for ever)
                    raise IOError(f"{url} answered the request for the rest of {dest.name} with no bytes")
                continue  # (a range answer that holds part of the rest, as its Content-Range says: ask for the next)
        return part.hash.hexdigest()


def _receive(r, dest: Path, part: _Partial, total: Optional[int], progress: bool) -> None:
    """The body of answer `r` appended to `part`, with a progress bar from where it starts."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=part.got, unit="B", unit_scale=True, desc=dest.name, leave=False)
    pending = bytearray()  # (the client's own chunking would lose what it holds when the connection drops)
    try:
        for block in r.iter_bytes():
            pending += block
            if len(pending) >= 1 << 20:
                part.write(pending)
                if bar:
                    bar.update(part.got - bar.n)
        part.write(pending)
    except BaseException:
        try:
            part.write(pending)  # what arrived before the connection dropped is kept
        except OSError:
            pass
        raise
    finally:
        part.settle()
        if bar:
            bar.close()


def check_offline(names, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None) -> None:
    """WeightsError naming every one of these official files that is not in `ckpt_dir` when offline
    (what `official_files` would refuse), from the file names alone: a script asks it before slow work.
    Online, a bad HF_HUB_DOWNLOAD_TIMEOUT where a file may be downloaded, which `official_files`
    would refuse too (`_timeout`)."""
    if not _is_offline(offline):
        _timeout(names, Path(ckpt_dir).expanduser())
        return
    folder = Path(ckpt_dir).expanduser()
    missing = [f for f in (OFFICIAL_FILES[n] for n in names) if not (folder / f.filename).is_file()]
    if missing:
        lines = [f"  {f.filename}  ({f.component}, about {_human(f.size)}, md5 {f.md5})" + _partial_note(folder, f)
                 for f in missing]
        raise WeightsError(
            "offline mode and these official hertz-dev files are missing:\n" + "\n".join(lines) +
            f"\nDownload them from https://huggingface.co/{HF_REPO} and put them in "
            f"{folder.resolve()}/ (or run once without offline mode / HF_HUB_OFFLINE).")


def _partial_note(folder: Path, f: OfficialFile) -> str:
    """For the offline error: the partial download of `f` an earlier run left in `folder` (a dropped
    connection, a killed process), named, and whether a run online resumes it or starts over
    (`_Partial.take_over`); "" when there is none."""
    tmp = _temporary(folder.resolve() / f.filename)
    try:
        kept = tmp.stat().st_size
    except OSError:
        return ""
    if kept == 0:
        return ""
    size = _kept_size(_sidecar(tmp), f.md5)
    if size is None or kept > size:
        return (f"\n    a partial download of it, {tmp} ({_human(kept)}), cannot be resumed (its {_sidecar(tmp).name} "
                "is missing or names another version of the file): a run without offline mode downloads it from the "
                "start")
    if kept == size:
        return (f"\n    its whole download, {tmp} ({_human(kept)}), is not verified yet: a run without offline mode "
                "checks its md5 and puts it in place")
    return (f"\n    a partial download of it, {tmp} ({_human(kept)} of {_human(size)}), is kept: a run without "
            "offline mode resumes it from there")


def official_file(name: str, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
                  endpoint: Optional[str] = None, retries: int = 3, progress: bool = True,
                  log: Callable[[str], None] = print, backoff: float = 1.0) -> Path:
    """Path of a verified official file, downloading it if missing (see module docstring)."""
    return official_files([name], ckpt_dir, offline, endpoint, retries, progress, log, backoff)[name]


def official_files(names, ckpt_dir: str | os.PathLike = DEFAULT_CKPT_DIR, offline: Optional[bool] = None,
                   endpoint: Optional[str] = None, retries: int = 3, progress: bool = True,
                   log: Callable[[str], None] = print, backoff: float = 1.0) -> dict[str, Path]:
    """Verified local paths of several official files; downloads what is missing unless offline.
    Offline, every missing file is named in one error. `~` in `ckpt_dir` is the home folder (as the shell
    leaves it in `--ckpt-dir=~/x`)."""
    folder = Path(ckpt_dir).expanduser()
    files = [OFFICIAL_FILES[n] for n in dict.fromkeys(names)]
    if _is_offline(offline):
        check_offline(names, ckpt_dir, True)
        timeout = DOWNLOAD_TIMEOUT
    else:
        timeout = _timeout(names, folder)  # (what check_offline asks online: asked once here)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(folder / files[0].filename, e, "choose another folder for the official weights "
                                                         "(ckpt_dir)") from None
    verified = _Verified(folder)
    out, missing = {}, []
    for f in files:
        path = folder / f.filename
        if path.is_file():
            _readable(path)
            if verified.ok(path, f.md5):
                out[f.name] = _drop_stale_partial(path, log)
                continue
            digest = file_digest(path)
            if digest == f.md5:
                verified.add(path, f.md5)
                out[f.name] = _drop_stale_partial(path, log)
                continue
            if _is_offline(offline):
                raise WeightsError(f"{path} is corrupt: md5 {digest}, expected {f.md5}. Delete it and "
                                   f"download it again from https://huggingface.co/{HF_REPO}.")
            log(f"{path} has md5 {digest}, expected {f.md5}: downloading it again")
        elif path.is_dir():  # (found now: the rename into place would fail after the whole download)
            raise WeightsError(f"cannot write {path}: a folder is in its place; move it away or choose another "
                               "folder for the official weights (ckpt_dir)")
        missing.append(f)
    # Room for all of them, found now, not after hours of downloading the first (the temporaries go beside the files).
    free, kept = shutil.disk_usage(folder).free, sum(_kept_bytes(folder / f.filename, f.md5) for f in missing)
    need = sum(f.size for f in missing) - kept
    if missing and free < need:
        more = f" more ({_human(kept)} already downloaded)" if kept else ""
        raise WeightsError(f"{folder} has {_human(free)} free and "
                           f"{', '.join(f'{f.filename} ({f.component})' for f in missing)} need"
                           f"{'s' if len(missing) == 1 else ''} about {_human(need)}{more}: free space there or choose "
                           "another folder (ckpt_dir)")
    for f in missing:
        out[f.name] = _fetch(f, folder / f.filename, endpoint, retries, progress, log, backoff, timeout)
    return {f.name: out[f.name] for f in files}


def _drop_stale_partial(path: Path, log: Callable[[str], None]) -> Path:
    """`path`, in place and verified: the partial download of it (and its sidecar) that an earlier
    run left beside it is removed, and said, as nothing would ever resume it. Under the partial's
    lock, taken without waiting (`_Partial`): one a live process still holds is its to finish or drop."""
    tmp = _temporary(path)
    meta = _sidecar(tmp)
    try:
        if not (tmp.exists() or meta.exists()):
            return path
        file = open_locked(tmp, buffering=0, locks_optional=True)
    except OSError:  # (BlockingIOError: another process is writing it; or a folder this one cannot write)
        return path
    if file is None:  # renamed or removed as it was locked: its holder finished with it
        return path
    try:
        kept = os.fstat(file.fileno()).st_size
        _remove(meta)
        _remove(tmp)
    finally:
        file.close()
    log(f"removed {tmp.name} ({_human(kept)}) and its sidecar from {path.parent}: a partial download an earlier run "
        f"left, which nothing resumes now that {path.name} is in place and verified")
    return path


def _fetch(f: OfficialFile, path: Path, endpoint: Optional[str], retries: int, progress: bool,
           log: Callable[[str], None], backoff: float, timeout: float) -> Path:
    """Download `f` into `path` through its locked temporary (resumed where an earlier attempt or
    run stopped), verify it and rename it into place; or find it there once another process that
    held the temporary has."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(HF_REPO, f.filename, endpoint=endpoint or os.environ.get("HF_ENDPOINT"))

    def verified() -> bool:  # (read again: another process records what it finished)
        return path.is_file() and _Verified(path.parent).ok(path, f.md5)

    try:
        part = _Partial.lock(path, f.md5, verified, log)
    except OSError as e:
        raise _cannot_write(path, e, "choose a folder this process can write (ckpt_dir)") from None
    if part is None:
        return path
    try:
        md5_failures = 0
        attempt = 0  # failed attempts in a row that added nothing to the temporary
        while True:
            before = part.got
            try:
                digest = _download_once(url, path, part, f.size, progress, log, timeout)
            except WeightsError:  # another attempt would not change it
                raise
            except KeyboardInterrupt:  # (Ctrl-C, waiting on a stalled server say: what came is kept, and said)
                if part.got and part.size:
                    log(f"download of {f.filename} interrupted; the {_human(part.got)} downloaded are kept in "
                        f"{part.tmp} and the next run resumes from there")
                raise
            except Exception as e:  # network errors, HTTP 5xx, short reads
                if type(e).__name__ == "OfflineModeIsEnabled":  # (huggingface_hub's, offline=False asked for)
                    raise WeightsError(f"cannot download {f.filename}: the environment sets offline mode "
                                       "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), which blocks every download; unset "
                                       f"it, or put the file in {path.parent}/") from None
                attempt = 1 if part.got > before else attempt + 1  # (a drop after progress starts the count anew)
                if attempt >= retries:
                    kept = (f"; the {_human(part.got)} downloaded are kept in {part.tmp} and the next run resumes "
                            "from there" if part.got and part.size else "")
                    if kept and part.sent_whole:  # (no promise this server keeps)
                        kept = (f"; the {_human(part.got)} downloaded are kept in {part.tmp}, but the server sent the "
                                "whole file when asked for the rest: the next run asks again, and if it does the same, "
                                "reads the file from its start again (checking the bytes kept, not losing them)")
                    raise WeightsError(f"could not download {f.filename} from {url} after {attempt} attempts: "
                                       f"{_failure(e, timeout)}{kept}") from e
                wait = min(2 ** (attempt - 1), 30) * backoff
                log(f"download of {f.filename} failed ({_failure(e, timeout)}); retrying in {wait:.1f}s "
                    f"({attempt}/{retries})")
                time.sleep(wait)
                continue
            if digest != f.md5:
                part.restart()
                md5_failures += 1
                if md5_failures >= 2:
                    raise WeightsError(f"{f.filename} from {url} has md5 {digest} twice, expected {f.md5}; "
                                       "the download source or the file is corrupt")
                log(f"{f.filename}: md5 {digest} does not match {f.md5}; downloading once more")
                continue
            part.finish(path)
            _Verified(path.parent).add(path, f.md5)  # (before unlocking: a waiting process finds it verified)
            return path
    finally:
        part.close()


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
