"""Files written atomically: each writer fills a temporary file beside its target and renames it
over the target when complete (`model.checkpoint.atomic_write`, `model.audio.save_audio`, the
dataset index, the client's recordings), locked until then so that the next writer can tell the
temporaries of killed writers (`drop_dead_temporaries`); and partial files that processes take over from each
other under a lock (`open_locked`: a download's temporary, a latents shard being encoded). Imports
only the standard library: the client uses it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def json_value(text: str | bytes, unique_keys: bool = False):
    """`json.loads(text)`, with arrays or objects nested too deep for the parser's recursion (a few
    thousand levels: a damaged or hostile file) a ValueError like any other text that is not JSON,
    where `json.loads` raises RecursionError, which the readers catching ValueError let through as
    a traceback. `unique_keys`: a key given twice in one object is a ValueError too (json.loads
    keeps the last value, silently: a line written by hand that names two files reads as one)."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys_object if unique_keys else None)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def unique_keys_object(pairs: list) -> dict:
    """A JSON object's (key, value) pairs as a dict (`json.loads`' object_pairs_hook); ValueError
    naming a key given twice (json.loads would keep the last one silently)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {ascii(twice)[:40]} given twice in one object")
    return value


def change_stamp(st: os.stat_result) -> list[int]:
    """What a cache keys a file's content by, from its `stat`: size, mtime, and the inode's change
    time and number. Size and mtime alone keep a file rewritten with the same size and its mtime put
    back (`cp -p`, `touch -r`); the change time moves with every write and every utime (it cannot be
    set back), the number with a file replaced. (The latents corpora, the audio length index and
    the record of verified official files key by it.)"""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def same_file_key(path: str) -> tuple | str:
    """What makes two paths one file: its device and inode (under a symlink, a folder reached
    through a link, a hard link), or, for a path that cannot be read, its resolved path."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, or a name the OS refuses
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that `folder` (or, while it is missing, the nearest folder
    above it) takes: `PC_NAME_MAX`, 255 where the OS does not say."""
    folder = os.path.abspath(os.fspath(folder))
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (AttributeError: Windows, which has no pathconf)
        return 255


def temporary_prefix(folder: str | os.PathLike, prefix: str, suffix: str) -> str:
    """The prefix `temporary_beside` names its files with: `prefix`, or when `PREFIX<8 hex>SUFFIX`
    would be longer than the folder takes (a target's own name near the limit: `.NAME.` adds 2
    bytes, the hex and `.tmp` 12), its head and 8 hex digits of its hash, so that every name that
    the folder takes has a temporary of its own, and `drop_dead_temporaries` finds it."""
    limit = name_max(folder) - 8 - len(os.fsencode(suffix))
    if len(os.fsencode(prefix)) <= limit:
        return prefix
    digest = hashlib.sha256(os.fsencode(prefix)).hexdigest()[:8]
    head = prefix
    while len(os.fsencode(head)) > limit - 9:  # (a character at a time: a name's UTF-8 stays whole)
        head = head[:-1]
    return f"{head}{digest}."


@contextmanager
def temporary_beside(folder: str | os.PathLike, prefix: str, suffix: str,
                     write: Callable[[str], None]) -> Iterator[str]:
    """Create a new file `folder/PREFIX<8 hex>SUFFIX`, call `write(path)` on it and yield its path,
    for the caller to rename into place within the `with` block; the file is removed if it is still
    there when the block ends (anything failed; the error is raised as it is). A prefix too long for
    the folder's names is shortened (`temporary_prefix`).

    The file is under an exclusive `flock` from its creation to the end of the block, so that
    `drop_dead_temporaries` removes it only once its writer is gone (a SIGKILL between the write
    and the rename left it for good). On a file system without locks it is written unlocked.

    The file has the mode a plain `open()` gives (0o666 less the umask), not the 0600 of
    `tempfile.mkstemp` or of writers that make their own file (safetensors): renamed into place,
    a checkpoint, a latents shard or a WAV that a lab mate on a shared machine cannot read is of
    no use to them."""
    try:
        import fcntl  # (Unix; imported here, so that this module imports everywhere)
    except ImportError:  # (Windows, where the client runs: written unlocked)
        fcntl = None
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    prefix = temporary_prefix(folder, prefix, suffix)
    for _ in range(100):
        path = os.path.join(os.fspath(folder), f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(path, flags, 0o666)  # the kernel applies the umask, as open() does
        except FileExistsError:  # another writer drew the same name: draw again
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a sweeper found it before it was locked and is removing it
            os.close(fd)
            continue
        except OSError:
            pass  # a file system without locks
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:  # removed by a sweeper before it was locked
            pass
        os.close(fd)
    else:
        raise FileExistsError(f"no free temporary name {prefix}XXXXXXXX{suffix} in {folder}")
    try:
        mode = os.fstat(fd).st_mode & 0o7777
        write(path)
        st = os.stat(path)
        if not os.path.samestat(os.fstat(fd), st):  # the writer replaced the file with its own: lock that
            os.close(fd)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)
        yield path
    finally:
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not renamed into place
                os.remove(path)
        except OSError:
            pass
        os.close(fd)


def try_writing_in(folder: str | os.PathLike) -> None:
    """Make `folder` if missing, then create and remove a temporary file in it: the OSError that a
    writer there would meet later (a read-only folder or file system, another user's folder), raised
    now. (`os.access` answers for the permission bits alone: root passes it on a read-only mount.)"""
    os.makedirs(folder, exist_ok=True)
    with temporary_beside(folder, ".write-check.", ".tmp", lambda tmp: None):
        pass


def drop_dead_temporaries(folder: str | os.PathLike, prefix: str = ".", suffix: str = ".tmp") -> list[str]:
    """Remove the `temporary_beside` files `folder/PREFIX...<8 hex>SUFFIX` whose writer is gone
    (killed between its write and its rename): each is locked by its writer until renamed, so one
    that can be locked has none. One a live writer holds is left to it, and so is every file on a
    file system without locks. Returns the names removed, for the caller's one log line."""
    removed = []
    try:
        import fcntl  # noqa: F401 (open_locked's: without it, as on Windows, no temporary is known dead)
        names = sorted(os.listdir(folder))
    except (ImportError, OSError):  # no folder (yet), or one that cannot be read
        return removed
    prefix = temporary_prefix(folder, prefix, suffix)  # (as `temporary_beside` named them)
    pattern = re.compile(rf"{re.escape(prefix)}(?:.*\.)?[0-9a-f]{{8}}{re.escape(suffix)}", re.DOTALL)
    for name in names:
        if not pattern.fullmatch(name) or not name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            held = open_locked(path)
        except OSError:  # (BlockingIOError: its writer is alive; or a file system without locks)
            continue
        if held is not None:  # (None: renamed into place as this one looked)
            with held:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
            removed.append(name)
    return removed


def os_reason(e: OSError, path: Optional[Path] = None) -> str:
    """`No space left on device`, `Read-only file system`, ...: what the OS said, without the path;
    for a `path` under a regular file, which file is in the way."""
    if path is not None and isinstance(e, (FileExistsError, NotADirectoryError)):
        above = next((p for p in path.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            return f"{above} is a file, not a folder"
    return e.strerror or str(e) or type(e).__name__


def is_device(path: str | os.PathLike) -> bool:
    """Whether `path` is a device or a pipe (`/dev/null`, a FIFO, or a link to one): what the atomic
    writers (`replace_atomically`, `model.checkpoint.atomic_write`) write into, never rename a file
    over, which would replace the device itself by a regular file (as root, /dev/null for every
    process of the machine)."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """`write(tmp)` on a `temporary_beside` file `.NAME.<8 hex>SUFFIX` and rename it over `path`,
    so `path` is the old complete file or the new complete one; nothing is left behind on failure,
    and the temporaries of `path` that killed writers left are removed first.
    A `path` that is a device or a pipe (`is_device`) is written into with `write(path)`."""
    if is_device(path):
        return write(os.fspath(path))
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    drop_dead_temporaries(folder, f".{name}.", suffix)
    with temporary_beside(folder, f".{name}.", suffix, write) as tmp:
        os.replace(tmp, path)


def open_locked(path: str | os.PathLike, waiting: Optional[Callable[[], None]] = None, buffering: int = -1,
                locks_optional: bool = False, create: bool = True):
    """`path` opened for reading and writing (made if missing, with the mode `temp_beside` gives)
    under an exclusive `flock` held until the file is closed: how processes share one partial file,
    each taking over what the last one left. While another process holds it: BlockingIOError, or
    with `waiting`, `waiting()` is called once and the lock waited for. None when the file was
    renamed or removed as it was locked (its holder finished with it): look again. On a file system
    without locks: that OSError, or with `locks_optional`, the file unlocked. `create=False`: a
    missing file is a FileNotFoundError (one another process finished with and removed), not made
    anew, empty."""
    import fcntl  # (Unix; imported here, so that this module imports everywhere)
    flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
    file = open(os.open(path, flags, 0o666), "r+b", buffering=buffering)
    try:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is None:
                raise
            waiting()
            fcntl.flock(file, fcntl.LOCK_EX)
        except OSError:
            if not locks_optional:
                raise
        try:
            same = os.path.samestat(os.fstat(file.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            file.close()
            return None
    except BaseException:
        file.close()
        raise
    return file


def physical_memory() -> int:
    """Bytes of physical memory of this machine (what no allocation can exceed)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


REPLACING = ".replacing"  # a folder holding this file has its files being swapped for others (a data recipe)


def being_replaced(path: str | os.PathLike) -> Optional[str]:
    """The `REPLACING` mark in `path` or in a folder above it, or None. A recipe that swaps a set of
    files by renames (`data/demo/prepare.py`) puts it down before the first rename and removes it
    after the last: while it is there, the folder holds part of each set, and a reader refuses it."""
    path = os.path.abspath(os.fspath(path))
    while True:
        if os.path.isfile(mark := os.path.join(path, REPLACING)):
            return mark
        if (parent := os.path.dirname(path)) == path:
            return None
        path = parent
