"""Audio datasets shared by the codec and transformer trainers.

A dataset is a folder of audio files (any depth, hidden entries left out; `SUPPORTED_EXTENSIONS`), or
a jsonl manifest of them (`model/manifest.py`). `scan_audio_folder` lists them with their lengths,
cached in `<root>/.hertz_index.json`; `AudioCropDataset` cuts fixed-length crops from them: random
ones for training, fixed ones for validation.
"""
from __future__ import annotations

import atexit
import json
import mmap
import multiprocessing.util  # noqa: F401 (its exit handler registered before this module's)
import os
import signal
import stat
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from config import OneLine
from model.audio import (OTHER_AUDIO_EXTENSIONS, SUPPORTED_EXTENSIONS, AudioError, audio_info, broken_link, cut_short,
                         load_audio, scan_samples, sniffed_audio, two_speakers)
from model.checkpoint import listed
from model.files import being_replaced, change_stamp, json_value, same_file_key
from model.files import replace_atomically
from model.manifest import is_manifest, read_manifest

INDEX_FILENAME = ".hertz_index.json"
INDEX_VERSION = 5  # 2: float files are read whole once, for non-finite or huge samples; 3: a header
# without the length (a FLAC written to a pipe) is an error, not 2**63 - 1 frames; 4: a VBR MP3 without
# a Xing/Info header has the length of its frames, not libsndfile's estimate (a fraction of it); 5: a
# chained Ogg file has the length of all its streams, not its first's


class SkippedAudioWarning(OneLine, UserWarning):
    """Audio files were left out of a dataset: unreadable (one warning each) or too short to use
    (one warning naming the first few and counting them)."""


@dataclass(frozen=True)
class AudioFileInfo:
    path: str            # absolute
    frames: int          # at the file's own sample rate
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


class AudioFileList(list):
    """The usable files of a folder (or manifest), sorted by path; `skipped` names those that could
    not be read, `short` those too short to use (empty; for the transformer, under 2 latents),
    `linked` those reached again through a link (a file listed already, left out)."""

    def __init__(self, files, root: str, skipped: list[str], source: Optional[str] = None,
                 short: Optional[list[str]] = None, linked: Optional[list[str]] = None):
        super().__init__(files)
        self.root = root
        self.source = source or root  # the folder, or the manifest that listed the files
        self.skipped = skipped  # paths relative to root
        self.short = short or []  # paths relative to root
        self.linked = linked or []  # paths relative to root

    def left_out(self, unreadable: Optional[int] = None, later: Optional[dict[str, int]] = None) -> str:
        """"; 2 unreadable files skipped, 3 too short to use (named above)" for a log line, or ""
        when nothing was left out; `unreadable` counts the unreadable files instead of `skipped`
        (files that failed later, when encoded), and `later` the files left out then for other
        reasons ({"encoded to non-finite latents": 1})."""
        unreadable = len(self.skipped) if unreadable is None else unreadable
        parts = ([f"{unreadable} unreadable files skipped"] if unreadable else []) \
            + [f"{n} files {why}" for why, n in (later or {}).items() if n] \
            + ([f"{len(self.short)} too short to use"] if self.short else []) \
            + ([f"{len(self.linked)} listed already under another path"] if self.linked else [])
        return f"; {', '.join(parts)} (named above)" if parts else ""


def shared_with_training(val: AudioFileList, train: AudioFileList, val_data_path: str) -> Optional[str]:
    """A trainer's note (without its "note: ") naming the files of the validation set `val` (read
    from `val_data_path`, as the user wrote it) that are files of the training set `train` too, or
    None when they share none. The same file counts under any path (`model.files.same_file_key`:
    a symlink, a folder reached through a link, `..` in a manifest, a hard link). Validating on training files measures memorised data."""
    in_train = {same_file_key(f.path) for f in train}
    shared = [os.path.relpath(f.path, val.root) for f in val if same_file_key(f.path) in in_train]
    if not shared:
        return None
    return (f"val_data_path={val_data_path} shares {len(shared)} of its {len(val)} files with train_data_path "
            f"({listed(shared)}): its loss, which picks best.pt, measures how well the model fits its training "
            "data, not how it generalises")


# libsndfile's MP3 decoder (mpg123) seeks by reading the frames from the start of the file to the one
# asked for, at every open (a Xing table of contents unused, no index kept between reads): a crop
# streamed from an MP3 costs time in proportion to where it lies, 0.5 ms at the start of a 20-minute
# file and 46 ms at its end on a 2-core VM (171 ms for 2 hours elsewhere). Other formats seek in
# constant time (FLAC, WAV) or by bisection (Ogg Vorbis and Opus). MP3s this long or longer are named.
SLOW_SEEK_SECONDS = 300.0


def slow_seek_note(datasets: list[Optional[AudioCropDataset]], preload_cap_gb: float) -> Optional[str]:
    """A trainer's note (without its "note: ") on the MP3 files at least SLOW_SEEK_SECONDS long that
    the `datasets` stream (not preloaded), or None: how many, the longest, one crop's cost at its
    middle (a streamed crop's average, offsets being uniform) against its start, timed here, and
    what to do: FLAC or WAV, or a `preload_max_gb` that decodes the corpus once where it fits under
    `preload_cap_gb` (`model.training.preload_limit_gb`'s cap)."""
    streamed = [ds for ds in datasets if ds is not None and not ds.preloaded]
    files = {f.path: f for ds in streamed for f in ds.files
             if f.path.lower().endswith(".mp3") and f.duration >= SLOW_SEEK_SECONDS}
    if not files:
        return None
    longest, ds = max(files.values(), key=lambda f: f.duration), streamed[0]

    def crop_ms(at: float) -> float:  # one crop `at` (a fraction) into the longest file, as the dataset reads it
        begun = time.perf_counter()
        try:
            load_audio(longest.path, ds.sample_rate, channels=ds._load_channels,
                       start=int(at * longest.duration * ds.sample_rate), num_samples=ds.segment)
        except AudioError:  # (named when a crop reads it)
            pass
        return (time.perf_counter() - begun) * 1e3

    first, middle = crop_ms(0.0), crop_ms(0.5)
    need = max(ds.lengths.sum() * (1 if ds.channels == "mono" else 2) * 4 / 1e9 for ds in streamed)  # float32
    preload = (f"or preload_max_gb={need:.3g} (the corpus decoded) to decode them once" if need <= preload_cap_gb else
               f"(decoded, the corpus would take {need:.3g} GB, more than preload_max_gb can take here: "
               f"{preload_cap_gb:.3g} GB)")
    return (f"{len(files)} MP3 files of {SLOW_SEEK_SECONDS / 60:g} minutes or more are streamed (the longest "
            f"{longest.path}, {longest.duration / 60:.1f} min): an MP3 is seeked by reading it from its start, so a "
            f"crop costs more the later it lies (one from the middle of that file took {middle:.0f} ms here, one from "
            f"its start {first:.0f} ms), and data loading can leave the GPU waiting; convert them to FLAC or WAV, "
            f"which seek in constant time, {preload}")


def skip_short(files: list[str], why: str, source: str) -> None:
    """Name the files left out as too short (`why`: "empty (0 samples)"), or for another reason
    shared by all, the first few and a count, in one SkippedAudioWarning."""
    if files:
        warnings.warn(f"skipping {len(files)} audio files in {source} {why}: {listed(files)}",
                      SkippedAudioWarning, stacklevel=2)  # one place: repeated scans say it once


def _formats() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def folder_problem(path: str) -> Optional[str]:
    """Why a data path that is not a manifest is no folder to scan ("does not exist; expected ...",
    "is a file, not a folder; expected ...": an audio file, or a manifest not named .jsonl; "is half
    replaced": `model.files.REPLACING` in it or above it), or None."""
    if os.path.isdir(path):
        try:
            os.scandir(path).close()
        except OSError as e:  # (os.walk would say nothing: "no audio files")
            return f"cannot be listed: {e.strerror or e}"
        if mark := being_replaced(path):  # part old files, part new: not a corpus to train on
            return (f"is half replaced ({mark} marks a swap that was stopped midway); run what made it again "
                    "to finish it (for a demo corpus, `python data/demo/prepare.py` with its --out)")
        return None
    what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    return (f"{what}; expected a folder of {_formats()} files, or a .jsonl manifest listing them "
            "(for a demo corpus run `python data/demo/prepare.py`)")


def _list_audio_files(root: str) -> tuple[list[str], list[str], list[str]]:
    """Relative paths of every supported file under `root`, sorted so the order never depends on
    the file system, of the audio files of other formats (`OTHER_AUDIO_EXTENSIONS`), left out, and
    of the audio files named with none of these extensions (`sniffed_audio`), left out.
    Symlinked folders are followed, each real folder once. Hidden entries below `root` (`.git/`,
    `.ipynb_checkpoints/`, `.cache/`, our index) are left out; `root` itself may lie under a hidden
    folder."""
    found, others, rest, seen, unlisted = [], [], [], set(), []
    # a folder that cannot be listed (its permissions) is named, not left out unsaid with its files
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=unlisted.append):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or a folder reachable twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: os.walk skips them
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(SUPPORTED_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
            elif name.lower().endswith(OTHER_AUDIO_EXTENSIONS):
                others.append(os.path.relpath(os.path.join(folder, name), root))
            elif sniffed_audio(os.path.join(folder, name)):
                rest.append(os.path.relpath(os.path.join(folder, name), root))
    if unlisted:
        names = sorted(f"{os.path.relpath(e.filename, root)} ({e.strerror or e})" for e in unlisted)
        warnings.warn(f"skipping {len(names)} folders in {root} that cannot be listed, with whatever audio files "
                      f"they hold: {listed(names)}", SkippedAudioWarning, stacklevel=3)
    return sorted(found), sorted(others), sorted(rest)


def _read_index(index_path: str) -> dict:
    try:
        with open(index_path) as f:
            index = json_value(f.read())
        if index.get("version") == INDEX_VERSION and isinstance(index.get("files"), dict):
            return index["files"]
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or a broken one: rebuild it
    return {}


def _write_index(index_path: str, entries: dict) -> None:
    """Write the cache atomically; a read-only dataset folder just goes without one."""
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({"version": INDEX_VERSION, "files": entries}, f, indent=0, sort_keys=True)

    try:
        replace_atomically(index_path, dump)
    except OSError:
        pass


def _whole(entry) -> bool:
    """Whether an index entry is one the scan wrote: the file's length, rate and channels (ints), or
    why it cannot be read (a string); an entry edited or damaged otherwise is measured anew."""
    if not isinstance(entry, dict):
        return False
    if "error" in entry:
        return isinstance(entry["error"], str)
    return all(type(entry.get(k)) is int and entry[k] >= least for k, least in (("frames", 0), ("sample_rate", 1),
                                                                                 ("channels", 1)))


def _stamp(st: os.stat_result) -> dict:
    """What a file's index entry is keyed by (`model.files.change_stamp`, named)."""
    return dict(zip(("size", "mtime_ns", "ctime_ns", "ino"), change_stamp(st)))


def scan_audio_folder(root: str, use_cache: bool = True) -> AudioFileList:
    """List the audio files under `root` (recursively, sorted) with their lengths.

    Lengths come from the cache `<root>/.hertz_index.json` when a file's size, mtime, inode change
    time and inode number match the cached ones (`_stamp`), so a large dataset starts without
    opening every file; new or changed files are read and the cache is rewritten (skipped if the
    folder is read-only): their headers, and the whole file for float formats (WAV/AIFF FLOAT or
    DOUBLE), whose samples can be NaN, inf or huge (see `model.audio`). Unreadable files are left
    out, each named in one SkippedAudioWarning, and listed in the result's `skipped`; empty ones (0
    samples) too, named together in one SkippedAudioWarning, and listed in its `short`; and so is a
    file reached again under another path (a link to a file of the folder, a hard link: the same
    device and inode), which would be trained on twice as often: the first path in sorted order is
    kept, the others named together and listed in `linked`. Audio files of formats not listed
    (`OTHER_AUDIO_EXTENSIONS`: .m4a, .aac, ...) are named in one SkippedAudioWarning, and audio files
    named with none of the audio extensions (a WAV without one: not hidden, nor text) in another.
    Raises FileNotFoundError, naming the folder and the formats, if it holds no readable audio.

    `root` may also be a jsonl manifest (`model/manifest.py`): then its files are listed instead,
    `root` of the result is the manifest's folder, and the cache is `.hertz_index.<name>.json` there.
    """
    source = root = os.path.abspath(os.fspath(root))
    others, given = [], None  # a folder's audio files of other formats, left out; a manifest's paths
    if is_manifest(source):
        root = os.path.dirname(source)
        # each file by its path relative to the manifest's folder (the index's keys, the order), read by
        # the path the manifest gives: through `..`, the OS takes it after the links before it, relpath
        # by the text (through a linked folder: another file)
        given = {}
        for p in read_manifest(source):
            given[p if os.path.relpath(p, root) in given else os.path.relpath(p, root)] = p
        listing = sorted(given)
        index_path = os.path.join(root, f"{INDEX_FILENAME[:-len('.json')]}.{os.path.basename(source)}.json")
    elif problem := folder_problem(root):
        raise FileNotFoundError(f"audio folder {root} {problem}")
    else:
        (listing, others, rest), index_path = _list_audio_files(root), os.path.join(root, INDEX_FILENAME)
        skip_short(others, f"of other formats (only {_formats()} are read; convert them, e.g. "
                   "`ffmpeg -i IN OUT.flac`)", source)
        if rest:  # (a WAV without its extension, or with a backup's: read by name only)
            warnings.warn(f"leaving out {len(rest)} audio files in {source} whose names end in none of the audio "
                          f"extensions it reads ({_formats()}): {listed(rest)}; each is read once named with its "
                          "format's extension", SkippedAudioWarning, stacklevel=2)
    cached = _read_index(index_path) if use_cache else {}
    entries, files, skipped, empty, linked, first = {}, [], [], [], [], {}
    for rel in listing:
        path = given[rel] if given is not None else os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError as e:  # a symbolic link to no file (moved away, or a loop of links)
            what = f"it is {link}" if (link := broken_link(path)) else str(e)
            entry = {"size": -1, "mtime_ns": -1, "error": f"cannot read audio file {path}: {what}"}
        else:
            entry, stamp = cached.get(rel), _stamp(st)
            if not stat.S_ISREG(st.st_mode):  # a named pipe: opening it would wait for a writer forever
                entry = {"size": -1, "mtime_ns": -1,
                         "error": f"cannot read audio file {path}: not a regular file (a named pipe or a device)"}
            elif not _whole(entry) or any(entry.get(k) != v for k, v in stamp.items()):  # (an older index lacks
                entry = dict(stamp)                                         # the inode's keys: measured anew)
                try:
                    entry["frames"], entry["sample_rate"], entry["channels"] = audio_info(path)
                    scan_samples(path)
                except AudioError as e:
                    entry["error"] = str(e)  # cached too, so a bad file is not reopened every run
        entries[rel] = entry
        if "error" in entry:
            skipped.append(rel)
            # the error names the file: "cannot read audio file PATH: reason"
            warnings.warn(f"skipping unreadable audio: {entry['error']}", SkippedAudioWarning, stacklevel=2)
        elif entry["frames"] == 0:  # an empty file holds nothing to crop
            empty.append(rel)
        elif (kept := first.setdefault((st.st_dev, st.st_ino), rel)) != rel:  # a link to a file listed already
            linked.append((rel, kept))
        else:
            files.append(AudioFileInfo(path, entry["frames"], entry["sample_rate"], entry["channels"]))
    if use_cache and entries != cached:
        _write_index(index_path, entries)
    skip_short(empty, "empty (0 samples)", source)
    skip_short([f"{rel} (= {kept})" for rel, kept in linked], "that are files listed already, under another path "
               "(links)", source)
    if not files:
        bad = [f"{len(skipped)} unreadable"] * bool(skipped) + [f"{len(empty)} empty"] * bool(empty)
        what = f"no readable audio ({' and '.join(bad)} files skipped)" if bad else "no audio files" + \
            (f" it reads ({len(others)} of other formats left out, named above)" if others else "")
        where = f"manifest {source}" if source != root else f"audio folder {root}"
        raise FileNotFoundError(f"{where} has {what}; expected {_formats()} files "
                                "(for a demo corpus run `python data/demo/prepare.py`)")
    return AudioFileList(files, root, skipped, source, empty, [rel for rel, _ in linked])


def _said_record(n: int) -> mmap.mmap:
    """A byte per file, 0 until it is named: anonymous shared memory, which forked processes share
    (no file, no descriptor, no lock)."""
    return mmap.mmap(-1, max(n, 1))


class AudioCropDataset(Dataset):
    """Fixed-length crops of a folder of audio, as `{"audio": (C, N) float32, "mask": (N,) float32,
    "file": int}`, `file` indexing `files` (so a trainer can name the files of a bad batch).

    train=True: item i of epoch e is a random crop, reproducible from (seed, e, i) whatever the
        worker that reads it: a file drawn with probability proportional to its duration, then a
        uniform offset. `len` is the number of crops that cover the corpus about once. Index it
        with `(e, i)` (what `infinite_batches` does, so one set of DataLoader workers serves every
        epoch), or with `i` after `set_epoch(e)`.
    train=False: a fixed list of crops, the same every epoch: consecutive non-overlapping segments
        from the start of each file, at most `val_crops_per_file` per file (spread evenly over
        longer files) and `max_val_crops` in all (spread evenly over the files).

    Crops are never stretched or looped: a file shorter than the crop is zero-padded at the end and
    `mask` is 1 on real samples and 0 on padding, so a loss can leave the padding out (e.g.
    `(err * mask).sum() / mask.sum()`), while every batch keeps one shape.

    channels="mono" averages a file's channels. channels="stereo" (two speakers, one per channel,
    for the duplex model) keeps the first two channels; a one-channel file becomes a monologue,
    the speaker on channel 0 and silence on channel 1 (mono_to_stereo="silence"), or the same
    signal on both (mono_to_stereo="duplicate").

    Only the needed frames are decoded, and resampled with soxr when the file's rate differs;
    or, when the decoded corpus takes at most `preload_max_gb` GB (float32), every file is decoded
    once here and crops are cut from memory (`preloaded`; DataLoader workers share it, forked).
    A preloaded file is resampled whole, so its crops may differ from streamed ones by the
    resampler's edge effects (under 1e-6 on a test tone); at the target rate they are the same samples.
    A file that fails to read is named once (per run: its forked workers share the record; a copy
    pickled, as a spawned worker's is, keeps one of its own) in a SkippedAudioWarning; in training
    another crop is drawn instead, in validation the crop comes back all padding (mask all 0) so
    the validation set keeps its size.
    """

    def __init__(self, root: str, segment_seconds: float, sample_rate: int = 16000, train: bool = True,
                 channels: str = "mono", seed: int = 0, mono_to_stereo: str = "silence",
                 val_crops_per_file: int = 4, max_val_crops: Optional[int] = 512, preload_max_gb: float = 0.0):
        if channels not in ("mono", "stereo"):
            raise ValueError(f"channels must be 'mono' or 'stereo', got {channels!r}")
        if mono_to_stereo not in ("silence", "duplicate"):
            raise ValueError(f"mono_to_stereo must be 'silence' or 'duplicate', got {mono_to_stereo!r}")
        self.files = scan_audio_folder(root)
        self.root = self.files.root
        self.sample_rate = sample_rate
        self.segment = int(round(segment_seconds * sample_rate))  # N, samples per crop
        if self.segment <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
        self.train, self.channels, self.seed, self.mono_to_stereo = train, channels, seed, mono_to_stereo
        # load_audio's channels: the mix, or (two speakers) at most the first two, which `two_speakers` pairs
        self._load_channels = "mono" if channels == "mono" else "speakers"
        self.epoch = 0
        self._bad: set[int] = set()  # files that failed to read in this process
        # files named in a warning, by any process of this dataset (its workers, forked anew at each
        # evaluation): one warning a file, where each worker and each evaluation named it again
        self._said = _said_record(len(self.files))
        # lengths in output samples, which is what crops are measured in
        self.lengths = np.array([f.frames * sample_rate // f.sample_rate for f in self.files], dtype=np.int64)
        self.total_seconds = float(self.lengths.sum()) / sample_rate
        if not self.lengths.any():  # files of a frame or two at 44.1 kHz: not one sample at 16 kHz to crop
            raise FileNotFoundError(f"{self.files.source} holds no audio at {sample_rate} Hz: its {len(self.files)} "
                                    f"files are each shorter than one sample at that rate")
        if train:
            self._cumulative = np.cumsum(self.lengths)
            self._drawable = set(np.flatnonzero(self.lengths).tolist())  # the files a training crop can come from
            self._num_items = max(1, int(self.lengths.sum() // self.segment))
        else:
            self.crops = self._validation_crops(val_crops_per_file, max_val_crops)
        out_channels = 1 if channels == "mono" else 2
        self.preloaded = bool(0 < self.lengths.sum() * out_channels * 4 <= preload_max_gb * 1e9)
        self._audio: list[Optional[np.ndarray]] = [self._decode(i) for i in range(len(self.files))] \
            if self.preloaded else []

    def _decode(self, i: int) -> Optional[np.ndarray]:
        """File i whole, (C, T) float32 as crops hold it; None (and named) if it cannot be read."""
        try:
            audio = load_audio(self.files[i].path, self.sample_rate,
                               channels=self._load_channels)
        except AudioError as e:
            self._skip(i, e)
            return None
        return two_speakers(audio, self.mono_to_stereo) if self.channels == "stereo" else audio

    def _validation_crops(self, per_file: int, max_crops: Optional[int]) -> list[tuple[int, int]]:
        crops = []
        for i, length in enumerate(self.lengths):
            if not length:  # a blip of a frame or two at 44.1 kHz: not one sample here, a crop of padding alone
                continue
            n = max(1, int(length // self.segment))  # a short file still gives one padded crop
            picks = np.unique(np.linspace(0, n - 1, min(n, per_file)).round().astype(int))
            crops.extend((i, int(k) * self.segment) for k in picks)
        if max_crops is not None and len(crops) > max_crops:
            picks = np.unique(np.linspace(0, len(crops) - 1, max_crops).round().astype(int))
            crops = [crops[k] for k in picks]
        return crops  # (file index, start sample)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_items if self.train else len(self.crops)

    def _random_crop(self, rng: np.random.Generator) -> tuple[int, int]:
        i = int(np.searchsorted(self._cumulative, rng.integers(self._cumulative[-1]), side="right"))
        start = int(rng.integers(max(int(self.lengths[i]) - self.segment, 0) + 1))
        return i, start

    def _read(self, i: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.preloaded:
            if self._audio[i] is None:
                raise AudioError(f"cannot read audio file {self.files[i].path}: it failed to decode when preloaded")
            audio = self._audio[i][:, start:start + self.segment]  # (C, n), n <= N
        else:
            audio = load_audio(self.files[i].path, self.sample_rate,
                               channels=self._load_channels,
                               start=start, num_samples=self.segment)  # (C, n), n <= N
            if self.channels == "stereo":
                audio = two_speakers(audio, self.mono_to_stereo)
        n, length = audio.shape[1], int(self.lengths[i])
        if n < min(self.segment, length - start) and cut_short(start + n, length, self.sample_rate):
            # the data ends before its header says, by a second and a tenth of the file at least (a
            # truncated file, or one replaced since the scan): most crops would be padding only. A
            # header's estimate a little long (an MP3 without a frame index) only pads the last crops,
            # which the losses leave out.
            raise AudioError(f"cannot read audio file {self.files[i].path}: it ends before its header says "
                             f"({start + n} of {length} samples at {self.sample_rate} Hz: a truncated file?)")
        # numpy, not torch.zeros: numpy's allocations come back from its heap, while each
        # torch.zeros of a crop's size faulted in fresh pages (7 ms a crop on a 2-core VM)
        out = np.zeros((audio.shape[0], self.segment), dtype=np.float32)  # (C, N)
        out[:, :n] = audio
        mask = np.zeros(self.segment, dtype=np.float32)  # (N,)
        mask[:n] = 1.0
        return torch.from_numpy(out), torch.from_numpy(mask)

    def __getstate__(self) -> dict:
        # pickled (deepcopy, a DataLoader's spawned or forkserver workers), a copy cannot share the
        # record, which is inherited by fork only: it keeps one of its own (`__setstate__`)
        return {k: v for k, v in self.__dict__.items() if k != "_said"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._said = _said_record(len(self.files))

    def _skip(self, i: int, error: Exception) -> None:
        self._bad.add(i)
        # no lock (a worker killed holding one would stop every other's warnings): two workers failing
        # on one file at once may each name it
        said, self._said[i] = self._said[i], 1
        if not said:
            warnings.warn(f"skipping unreadable audio: {error}", SkippedAudioWarning)  # names the file

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        if not self.train:
            i, start = self.crops[index]
            try:
                audio, mask = self._read(i, start)
            except AudioError as e:
                # keep the validation set's size and order fixed: an all-padding crop that a
                # masked loss ignores, rather than a crash in the middle of a run
                self._skip(i, e)
                channels = 1 if self.channels == "mono" else 2
                audio, mask = torch.zeros(channels, self.segment), torch.zeros(self.segment)
            return {"audio": audio, "mask": mask, "file": i}
        rng = np.random.default_rng((self.seed, epoch, index))
        # (files too short to hold a sample at this rate are never drawn: with every other file failed,
        # waiting for them to fail too spun for ever)
        while not self._drawable <= self._bad:  # draws of failed files are cheap: no read
            i, start = self._random_crop(rng)
            if i in self._bad:
                continue
            try:
                audio, mask = self._read(i, start)
            except AudioError as e:
                self._skip(i, e)
                continue
            return {"audio": audio, "mask": mask, "file": i}
        raise AudioError(f"could not read a crop from {self.files.source}: {len(self._bad)} of {len(self.files)} "
                         "files failed to read (named above)" + (f"; the other {len(self.files) - len(self._drawable)} "
                         f"are shorter than one sample at {self.sample_rate} Hz" if len(self._drawable) < len(self.files)
                         else ""))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGINT and SIGTERM ignored. Ctrl-C, a scheduler's
    SIGTERM or `kill -- -PGID` reach the whole process group; a worker they ended could be handing
    a batch to the main process, which then failed mid-transfer with a traceback (connection reset)
    instead of stopping at its next step, saved. The main process stops them when it stops; a
    worker whose parent is gone exits by itself (torch's watchdog). A `StopSafeLoader` starts its
    workers with both signals blocked, so one sent before this ran waits, and is dropped here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers outlive a SIGINT or SIGTERM sent to the process group (see
    `worker_ignores_stop_signals`, its default `worker_init_fn`). The workers are started with both
    signals blocked: one that arrived between a worker's start and its `worker_init_fn` ended it
    (each epoch of a loader without persistent workers starts them again). The main process gets
    such a signal as soon as its workers have started. The workers of an iterator still alive when
    the process exits are stopped the way the iterator stops them (`_stop_workers_at_exit`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("worker_init_fn", worker_ignores_stop_signals)
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _ITERATORS.add(iterator)
        _WORKERS.update(getattr(iterator, "_workers", ()))
        return iterator


_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()  # StopSafeLoader iterators with workers
_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # their worker processes (multiprocessing holds them until joined)


@atexit.register  # (after multiprocessing's own exit handler, imported above, so it runs before it)
def _stop_workers_at_exit() -> None:
    """Stop the workers of the StopSafeLoader iterators still alive as the process exits (an error
    raised through a training loop keeps its iterator referenced to the end): multiprocessing's exit
    handler ends daemonic children with SIGTERM, which these ignore, then waits for each, for ever
    (a trainer that had printed its error line hung). Their iterator's own shutdown tells them;
    a worker left running without one (its iterator collected in a reference cycle, whose
    finaliser could not stop it) is killed, since it ignores SIGTERM."""
    for iterator in list(_ITERATORS):
        iterator._shutdown_workers()
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def stop_workers(batches) -> None:
    """Stop the data-loading workers behind `batches` now: a DataLoader's iterator, or a generator
    over one (`infinite_batches`), which is closed. Not left to the garbage collector: an iterator
    collected in a reference cycle (a training `main` whose frame a library's objects keep in one)
    could not stop its workers, and they kept running until the process exited."""
    if hasattr(batches, "close"):
        batches.close()
    shutdown = getattr(batches, "_shutdown_workers", None)  # (not a generator; none without workers)
    if shutdown is not None:
        shutdown()


@contextmanager
def workers_stopped(batches):
    """`with workers_stopped(batches):` the training loop over `batches`; however the block ends
    (done, stopped, an error), their workers stop as it ends (`stop_workers`)."""
    try:
        yield batches
    finally:
        stop_workers(batches)


def make_loader(dataset: Dataset, batch_size: int, shuffle: Optional[bool] = None, num_workers: int = 0,
                distributed: Optional[bool] = None, seed: int = 0,
                drop_last: Optional[bool] = None) -> DataLoader:
    """A DataLoader over `dataset`; shuffle and drop_last default to the dataset's `train` flag.

    distributed=None uses a DistributedSampler whenever torch.distributed is initialised, so each
    rank reads its own share; distributed=True uses one in a single process too (one replica), so
    the order of an epoch depends only on (seed, epoch) and `infinite_batches(skip=...)` can resume
    in the middle of one. Call `set_epoch(loader, epoch)` before each epoch. The loader draws its
    worker seeds from its own generator, never from the global torch RNG, so iterating it does
    not change the random numbers a training step sees (exact resume).
    """
    train = getattr(dataset, "train", True)
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        distributed = initialized
    sampler = None
    if distributed:
        replicas = {} if initialized else {"num_replicas": 1, "rank": 0}
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, **replicas)
        shuffle = False  # the sampler shuffles
    generator = torch.Generator().manual_seed(seed)
    return StopSafeLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
                          num_workers=num_workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Give the dataset's random crops and the distributed sampler's order a new epoch."""
    for obj in (loader.dataset, loader.sampler):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


class EpochBatches(Sampler):
    """Batches of `sampler`'s indices, epoch after epoch forever, each index as `(epoch, i)` when
    the dataset takes those (`AudioCropDataset`), from `start_epoch` less its first `skip` batches.
    Iterated by the DataLoader in the main process, so `sampler.set_epoch` reaches the order of
    every epoch while the workers, which never restart, cut the crops."""

    def __init__(self, loader: DataLoader, start_epoch: int = 0, skip: int = 0):
        self.sampler, self.batch_size, self.drop_last = loader.sampler, loader.batch_size, loader.drop_last
        self.with_epoch = hasattr(loader.dataset, "set_epoch")
        self.start_epoch, self.skip = start_epoch, skip

    def __iter__(self):
        epoch, skip = self.start_epoch, self.skip
        while True:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            for k, batch in enumerate(BatchSampler(self.sampler, self.batch_size, self.drop_last)):
                if k >= skip:  # indices only: a skipped batch reads no audio
                    yield [(epoch, i) for i in batch] if self.with_epoch else batch
            skip, epoch = 0, epoch + 1


def infinite_batches(loader: DataLoader, start_epoch: int = 0, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches forever, epoch after epoch, with `loader`'s dataset, sampler, batch size,
    workers and pinning; for step-based training loops. One iterator over `EpochBatches`: the
    workers start once and keep prefetching across epoch boundaries (a loader restarted every
    epoch stalls the loop while its new workers fork and fill their first batches).

    skip: leave out the first `skip` batches of `start_epoch` without reading them, to resume in
    the middle of an epoch. Needs a loader whose order depends only on the epoch (a
    `DistributedSampler`, see `make_loader(distributed=True)`).
    """
    if skip and not isinstance(loader.sampler, DistributedSampler):
        raise ValueError("infinite_batches(skip=...) needs a loader with a DistributedSampler")
    workers = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    batches = iter(StopSafeLoader(loader.dataset, batch_sampler=EpochBatches(loader, start_epoch, skip),
                                  num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                                  generator=loader.generator, **workers))
    try:
        yield from batches
    finally:  # closed (`stop_workers`): the workers stop now
        stop_workers(batches)
