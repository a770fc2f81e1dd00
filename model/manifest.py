"""jsonl manifests: a list of audio files as people already have it for conversation data.

One JSON object per line, `{"path": "dialogues/a.wav", "duration": 24.5}` (the layout
moshi-finetune reads): `path` relative to the manifest's folder (an absolute path is allowed),
`duration` in seconds, optional. Blank lines, comment lines (starting with `#`, which no JSON
line does), Windows line ends and a UTF-8 byte-order mark are ignored; any other key is ignored too, so a manifest written for another trainer reads as it is.

`duration` is only checked to be a number >= 0: the lengths the datasets use always come from the
files' headers, which are read anyway (and cached), so a stale or rounded duration cannot
desynchronise crops from the audio.

A listed file that does not exist is an error, not a skip: a manifest names its files on purpose,
so a missing one means a wrong base folder (paths written relative to another directory) or a stale
manifest, and training on whatever subset happens to exist would hide that. A file that exists but
cannot be decoded is the folder scan's business: skipped and named (`model/data.py`).
"""
from __future__ import annotations

import math
import os

from config import OneLine
from .audio import file_problem
from .files import json_value, same_file_key

MANIFEST_SUFFIX = ".jsonl"


class ManifestError(OneLine, FileNotFoundError):
    """A manifest that cannot be used; the message names the manifest and the line. A subclass of
    FileNotFoundError, as a missing folder is, so scripts report it as one `error:` line."""


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether a data path names a jsonl manifest rather than a folder."""
    return os.fspath(path).lower().endswith(MANIFEST_SUFFIX)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int of hundreds of digits
        return False


def _encodable(path: str) -> bool:
    try:
        os.fsencode(path)
        return True
    except UnicodeError:  # a lone surrogate (JSON's "\ud800")
        return False


def read_manifest(path: str | os.PathLike) -> list[str]:
    """The absolute paths of the audio files a manifest lists, in its order.

    Raises ManifestError naming the manifest and the line number for a line that is not a JSON
    object, lacks a string `path`, has a `duration` that is not a number >= 0, lists a file twice
    (under the same path or another one: a linked folder, a link, a hard link), or names a file that does not exist or
    a folder (the first such line, and how many more there are)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} does not exist; expected a .jsonl file with one "
                            '{"path": ..., "duration": ...} per line')
    base = os.path.dirname(path)
    files, lines, missing = [], {}, []
    with open(path, "rb") as f:  # decoded line by line: a line that is not UTF-8 is named like any bad line
        for number, raw in enumerate(f, start=1):
            where = f"manifest {path} line {number}"
            if number == 1:  # a byte-order mark, as Notepad and Excel write UTF-8: not part of the JSON
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip() or line.lstrip().startswith("#"):  # a blank line, a comment
                continue
            try:
                entry = json_value(line, unique_keys=True)
            except ValueError as e:
                raise ManifestError(f"{where}: not JSON ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise ManifestError(f'{where}: expected an object with a "path" string, got {line.strip()[:80]}')
            duration = entry.get("duration")
            if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                         or not _finite(duration) or duration < 0):
                raise ManifestError(f'{where}: "duration" must be a number of seconds >= 0, got {repr(duration)[:40]}')
            if "\x00" in entry["path"] or not _encodable(entry["path"]):  # (os calls raise on either)
                raise ManifestError(f"{where}: the path {entry['path'][:80]!r} cannot name a file (a NUL character, "
                                    "or text that is not Unicode)")
            file = os.path.join(base, entry["path"])  # an absolute path stays as it is
            # ("a/./b", "a//b" tidied; but not "..", which the OS takes after the links before it, and
            # normpath by the text: a manifest reached through a linked folder named another file)
            file = file if ".." in file.split(os.sep) else os.path.normpath(file)
            # the same file through a linked folder, or a hard link, is listed twice too
            real = same_file_key(file)
            if real in lines:
                first, path_there = lines[real]
                other = "" if path_there == file else f" (as {path_there} there: the same file under another path)"
                raise ManifestError(f"{where}: {entry['path']} is listed twice (lines {first} and {number}){other}")
            lines[real] = number, file
            if problem := file_problem(file):  # missing, or a folder where a file belongs
                missing.append((number, problem))
            files.append(file)
    if missing:
        number, problem = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise ManifestError(f"manifest {path} line {number}: {problem}{more}; paths are relative "
                            f"to the manifest's folder {base}")
    if not files:
        raise ManifestError(f"manifest {path} lists no files")
    return files
