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


# What a file system counts a name's length in (`name_length`): NTFS, UTF-16 code units; Linux's
# and macOS's, UTF-8 bytes
NAME_UNITS = "UTF-16 code units" if os.name == "nt" else "bytes"


def name_length(name: str, units: str = NAME_UNITS) -> int:
    """A file name's length as its file system counts it against `name_max`: in `NAME_UNITS`, where
    100 CJK characters are 300 bytes but 100 UTF-16 units (Windows takes them, where the client runs)."""
    if units == "UTF-16 code units":
        return len(name.encode("utf-16-le", "surrogatepass")) // 2
    return len(os.fsencode(name))


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in `NAME_UNITS`, that `folder` (or, while it is missing, the nearest
    folder above it) takes: `PC_NAME_MAX`, 255 where the OS does not say (NTFS's limit)."""
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
    limit = name_max(folder) - 8 - name_length(suffix)
    if name_length(prefix) <= limit:
        return prefix
    digest = hashlib.sha256(os.fsencode(prefix)).hexdigest()[:8]
    head = prefix
    # (a character at a time: a name's UTF-8 stays whole; on a file system of names too short for even
    # the hash, none left, and creating the file says so)
    while head and name_length(head) > limit - 9:
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
    """Bytes of memory this process may hold (what no allocation can exceed): this machine's
    physical memory, or a memory cgroup's lower limit (`memory_limit`)."""
    return memory_limit()[0]


def memory_limit() -> tuple[int, str]:
    """(bytes, what they are) of memory this process may hold: this machine's physical memory, or
    the lowest limit of a memory cgroup over it (a container's `--memory`, a Slurm job's `--mem`, a
    Kubernetes limit), whose excess the kernel's out-of-memory killer ends."""
    if limits := [limit for _, limit, _ in cgroup_memory()]:
        return min(limits), "the memory limit of this process' cgroup"
    return _machine_memory(), "this machine's memory"


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_memory() -> list[tuple[str, int, int]]:
    """(folder, limit, bytes it can still take) of each memory cgroup holding this process (its own
    and those above it, each limiting the processes below it; cgroup v2's `memory.max`, v1's
    `memory.limit_in_bytes`) that sets a limit below this machine's memory (v1's "no limit" is a
    number near 2**63, v2's is "max"). What it can still take is the limit less its usage,
    but for the page cache it would drop first (inactive files), as the kernel's MemAvailable counts
    it. Linux only: [] elsewhere, and a file missing or unreadable is a cgroup that sets none."""
    found, host = [], _machine_memory()
    for folder, top, files in _memory_cgroup_folders():
        while True:
            if (limit := _cgroup_number(os.path.join(folder, files[0]))) is not None and limit < host:
                usage = _cgroup_number(os.path.join(folder, files[1])) or 0
                inactive = 0
                try:
                    with open(os.path.join(folder, "memory.stat")) as f:
                        for line in f:
                            key, _, value = line.partition(" ")
                            if key == files[2]:
                                inactive = int(value)
                except (OSError, ValueError):
                    pass
                found.append((folder, limit, min(limit, max(0, limit - usage + inactive))))
            if folder == top:
                break
            folder = os.path.dirname(folder)
    return found


def _memory_cgroup_folders() -> list[tuple[str, str, tuple[str, str, str]]]:
    """(this process' memory cgroup's folder, its mount's folder, the files of its limit, usage and
    inactive page cache) for cgroup v2 and v1, from /proc/self/cgroup and /proc/self/mountinfo."""
    try:
        with open("/proc/self/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return []
    folders = []
    for fields in mounts:
        if "-" not in fields or len(fields) < 5:
            continue
        tail = fields[fields.index("-") + 1:]
        root, mountpoint = (re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s) for s in fields[3:5])
        if tail[:1] == ["cgroup2"]:
            files, paths = ("memory.max", "memory.current", "inactive_file"), [p for h, c, p in groups if h == "0"]
        elif tail[:1] == ["cgroup"] and len(tail) > 2 and "memory" in tail[2].split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            paths = [p for h, c, p in groups if "memory" in c.split(",")]
        else:
            continue
        for path in paths:
            # the cgroup's path from the hierarchy's root; the mount shows the hierarchy from `root` down
            # (a container's own cgroup): a cgroup outside it is seen as the mount's top
            inside = os.path.relpath(path, root) if (path + "/").startswith(root.rstrip("/") + "/") else "."
            folder = os.path.normpath(os.path.join(mountpoint, inside))
            folders.append((folder if os.path.isdir(folder) else mountpoint, mountpoint, files))
    return folders


def _cgroup_number(path: str) -> Optional[int]:
    """The number in a cgroup's file, or None: missing, unreadable, or "max" (no limit)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


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
