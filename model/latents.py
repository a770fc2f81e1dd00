"""Codec latents for the transformer trainer: an audio folder encoded once by a frozen codec into
shards of the posterior (mu, logvar), and training sequences cut from them.

Why precompute rather than encode on the fly: the encoder costs about 1.2 GFLOP per latent and
channel (the official codec; about a third of a 1B-parameter duplex model's training FLOPs, as
small, memory-bound convolutions) and decoding 4-minute crops of compressed audio costs CPU time
every step; an encoded corpus is small (256 bytes per latent and channel) and read at memory speed.
The posterior is stored, not a sample of it, so every read draws a fresh z = mu + sigma * eps, the
augmentation on-the-fly encoding would give.

Stale latents cannot be used: a corpus is stored under a folder named by a key over the audio
listing (paths, sizes, modification times, and the inodes' numbers and change times: a file
rewritten with its size kept and its modification time put back is changed too), the codec
fingerprint (a hash of its architecture and weights), the channel mode (with, for stereo, `mono_to_stereo` and which file channel is the
model's) and the sample rate. Another codec, a changed file or another channel mode is another
key, hence another folder, encoded anew; `prepare_latents` is the only way to get a folder, and it
always computes the key from the codec in hand.

Layout of an encoded folder:
    manifest.json                      format, key inputs, and per file: name, shard, offset, length
    shard_RRRRR.bin                    float32 rows (length, 2, channels * 32): [mu, logvar], the
                                       channels side by side (channel 0 first) as the duplex model reads them
    shard_RRRRR.json                   rank R's files, merged into manifest.json by rank 0
While rank R encodes, its rows go to `shard_RRRRR.bin.partial` and the files done to
`shard_RRRRR.progress.jsonl` (`_PartialShard`), so a run that stops is resumed by the next one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from config import OneLine
from .checkpoint import TEMP_SUFFIX, CheckpointError, atomic_write, listed
from .files import change_stamp, drop_dead_temporaries, json_value, open_locked, os_reason, try_writing_in
from .data import StopSafeLoader
from .codec import Codec
from .parallel import long_barrier

FORMAT = 1
MANIFEST = "manifest.json"
# the largest log-variance whose standard deviation exp(logvar / 2) float32 holds: above it every
# sample z = mu + exp(logvar / 2) * eps is inf (a codec that overflows), and the first step's loss NaN
MAX_LOGVAR = 2 * float(np.log(np.finfo(np.float32).max))


class LatentsError(OneLine, FileNotFoundError):
    """An encoded folder that cannot be used (damaged, or written by another version or codec); the
    message names the folder and what to do. A FileNotFoundError, as a missing folder is, so the
    scripts report it as one `error:` line."""


def read_encoded(folder: str | os.PathLike, fingerprint: Optional[str] = None) -> dict:
    """The manifest of an encoded folder, checked against its shards: it is JSON of this code's
    format (and of the codec `fingerprint`, when given), and every shard it names exists and holds
    every row it lists. Raises LatentsError naming the folder, so a damaged cache (a killed copy,
    a full disk, a deleted shard) is refused when the run starts, not by a crop read mid-training."""
    folder = Path(folder)
    fix = f"delete {folder} and run again to encode it anew"
    try:
        manifest = json_value((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise LatentsError(f"latents folder {folder} was encoded by another version of this code; {fix}")
        files, row_bytes = manifest["files"], 2 * int(manifest["latent_dim"]) * 4
        ends = {}  # shard -> rows its entries need
        for f in files:
            ends[f["shard"]] = max(ends.get(f["shard"], 0), int(f["offset"]) + int(f["length"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LatentsError(f"latents folder {folder} is damaged: its {MANIFEST} cannot be read "
                           f"({type(e).__name__}: {str(e).strip()}); {fix}") from None
    if fingerprint is not None and manifest.get("codec") != fingerprint:
        raise LatentsError(f"latents folder {folder} was encoded by codec {manifest.get('codec')}, not by this "
                           f"run's codec {fingerprint}; {fix}")
    for shard, rows in sorted(ends.items()):
        path = folder / shard
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < rows * row_bytes:
            held = "is missing" if size is None else f"holds {size} bytes"
            raise LatentsError(f"latents folder {folder} is damaged: {shard} {held}, where its {MANIFEST} lists "
                               f"{rows} latents ({rows * row_bytes} bytes); {fix}")
    return manifest


# --- the codec's identity -------------------------------------------------------------------

def codec_fingerprint(codec: torch.nn.Module) -> str:
    """16 hex digits of SHA-256 over the codec's architecture fields and every weight (float32),
    so two codecs share a fingerprint only if they encode identically."""
    from config import fields_marked
    h = hashlib.sha256()
    cfg = dataclasses.asdict(codec.config)
    h.update(json.dumps({k: cfg[k] for k in fields_marked(type(codec.config), "arch")}, sort_keys=True).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- encoding a folder ----------------------------------------------------------------------

class _AudioFiles(Dataset):
    """Whole files as (C, N) float32 at `sample_rate`: mono averages the channels; stereo keeps
    the first two (swapped when the model's speaker is on the file's channel 0), and a
    one-channel file gets silence (or itself) as the second speaker."""

    def __init__(self, paths: list[str], sample_rate: int, channels: str, mono_to_stereo: str, model_channel: int):
        self.paths, self.sample_rate, self.channels = paths, sample_rate, channels
        self.mono_to_stereo, self.model_channel = mono_to_stereo, model_channel

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(i, audio, None, dual mono) or, for a file that cannot be read, (i, None, why, False).
        A stereo file holding one signal on both channels (a mono recording saved as stereo) is
        taken as one channel: as two speakers it would teach the model to echo the user."""
        from .audio import AudioError, load_audio, same_signal, two_speakers
        try:
            # two speakers: the first two channels, cut as read from a file of more (a recorder's 6)
            audio = load_audio(self.paths[i], self.sample_rate, "mono" if self.channels == "mono" else "speakers")
        except AudioError as e:
            return i, None, str(e), False
        dual = False
        if self.channels == "stereo":
            if dual := audio.shape[0] > 1 and same_signal(audio[0], audio[1]):
                audio = audio[:1]  # a monologue, as a one-channel file: mono_to_stereo
            elif self.model_channel == 0 and audio.shape[0] > 1:
                audio = audio[[1, 0]]  # the model's speaker goes to channel 1, where the live engine puts it
            audio = two_speakers(audio, self.mono_to_stereo)
        return i, torch.from_numpy(audio), None, dual


@torch.no_grad()
def _encode(codec, audio: torch.Tensor, chunk: int) -> np.ndarray:
    """(C, N) audio, N a multiple of the hop -> (N / hop, 2, C * 32) float32 [mu, logvar], encoded
    chunk by chunk through the codec's streaming state (identical to one whole-signal pass)."""
    C = audio.shape[0]
    stream, _ = codec.init_stream(C)
    p = next(codec.parameters())
    mus, logvars = [], []
    for start in range(0, audio.shape[-1], chunk):
        x = audio[:, None, start:start + chunk].to(p.device, p.dtype)  # (C, 1, n)
        mu, logvar = codec.encode_step(x, stream)  # (C, n / hop, 32)
        mus.append(mu)
        logvars.append(logvar)
    mu, logvar = torch.cat(mus, 1), torch.cat(logvars, 1)
    L = mu.shape[1]
    # (C, L, 32) -> (L, C * 32): channel 0's dims first, as the duplex model splits them
    rows = torch.stack([mu.permute(1, 0, 2).reshape(L, -1), logvar.permute(1, 0, 2).reshape(L, -1)], dim=1)
    return rows.float().cpu().numpy()


# why a file was skipped when encoded -> how the log line counts it
SKIPPED = {"unreadable": "unreadable", "shorter than its header": "decoded shorter than their headers say",
           "non-finite latents": "encoded to non-finite latents"}
COMMIT_SECONDS = 5.0  # how often encoding progress is made durable: a run that stops loses at most this much


class _PartialShard:
    """One rank's shard while it is encoded, kept in its folder so that a run that stops (killed,
    Ctrl-C, out of memory) loses at most `COMMIT_SECONDS` of work: `shard_R.bin.partial` holds the
    rows so far and `shard_R.progress.jsonl` a header line, then one line per file done (its entry,
    or the warning that skipped it), appended only once the rows it lists are on disk (fsynced).
    The next run of the same key takes those lines over (`taken`), cuts the partial after the last
    row they list (a write the stopped run had not committed) and encodes the files after them.
    Both files are used under an exclusive lock on the partial, held until it is renamed into place
    (`finish`), so two runs never write one partial."""

    def __init__(self, path: Path, out, progress: Path, lines, taken: list[dict], world: Optional[int]):
        self.path, self.out, self.progress, self.lines, self.taken = path, out, progress, lines, taken
        self.world = world  # the number of processes of a stopped run whose files this one shares out otherwise
        self.pending: list[bytes] = []
        self.committed = time.monotonic()

    @classmethod
    def open(cls, folder: Path, rank: int, header: dict, row_bytes: int) -> tuple[Optional["_PartialShard"], str]:
        """The partial shard of `rank`, locked, with what a stopped run of the same `header` (format,
        number of processes, files in this rank's share) committed; or (None, why) when another run
        holds it (or this file system has no locks)."""
        path, progress = folder / f"shard_{rank:05d}.bin.partial", folder / f"shard_{rank:05d}.progress.jsonl"
        try:
            out = open_locked(path)  # None: renamed into place by a run that finished it as this one looked
        except BlockingIOError:
            out = None
        except OSError as e:
            return None, f"cannot lock {path} ({os_reason(e)})"
        if out is None:
            return None, "another run is encoding the same files now"
        try:
            return cls._take_over(path, out, progress, header, row_bytes), ""
        except BaseException:
            out.close()
            raise

    @classmethod
    def _take_over(cls, path: Path, out, progress: Path, header: dict, row_bytes: int) -> "_PartialShard":
        try:
            raw = progress.read_bytes()
        except FileNotFoundError:
            raw = b""
        head, _, body = raw.partition(b"\n")
        try:  # the header of the stopped run's log: format, number of processes, files in the share
            stopped = json_value(head) if raw.startswith(head + b"\n") else None
        except ValueError:
            stopped = None
        taken, good, rows = [], 0, 0  # lines taken over, the bytes of the log they fill, the rows they list
        if stopped == header:  # (another layout, or no log: nothing is taken over)
            good = len(head) + 1
            for line in body.splitlines(keepends=True):
                try:  # a line cut short by the stop ends what is taken over
                    item = json_value(line) if line.endswith(b"\n") else None
                    length = int(item["entry"]["length"]) if "entry" in item else 0
                    if item["file"] != len(taken) or "entry" in item and item["entry"]["offset"] != rows:
                        break
                except (ValueError, KeyError, TypeError):
                    break
                taken.append(item)
                rows += length
                good += len(line)
        if not good or os.fstat(out.fileno()).st_size < rows * row_bytes:  # nothing to take over: start anew
            taken, good, rows = [], 0, 0
        world = stopped.get("world") if isinstance(stopped, dict) and stopped.get("world") != header["world"] else None
        out.truncate(rows * row_bytes)
        out.seek(rows * row_bytes)
        lines = open(progress, "r+b" if good else "wb")
        lines.truncate(good)
        lines.seek(good)
        if not good:
            lines.write(json.dumps(header).encode() + b"\n")
        return cls(path, out, progress, lines, taken, world)

    def done(self, item: dict) -> None:
        """Note a file done (its rows already written to `out`); commit every `COMMIT_SECONDS`."""
        self.pending.append(json.dumps(item).encode() + b"\n")
        if time.monotonic() - self.committed >= COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Make the rows written so far durable, then the lines that list them."""
        for f, data in ((self.out, b""), (self.lines, b"".join(self.pending))):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.pending.clear()
        self.committed = time.monotonic()

    def finish(self, shard: Path) -> None:
        """Drop the progress log, then rename the committed partial into place as `shard` (in this
        order: a run that opens the partial's path once it is renamed must find no log there)."""
        self.progress.unlink(missing_ok=True)
        os.replace(self.path, shard)

    @staticmethod
    def drop_stale(folder: Path, world: int) -> None:
        """Delete the partial shards (and logs) of ranks beyond `world` that a stopped run of more
        processes left, and that no run holds now: the folder is complete, none will be resumed."""
        for path in folder.glob("shard_*.bin.partial"):
            if (rank := re.fullmatch(r"shard_(\d+)\.bin\.partial", path.name)) and int(rank[1]) >= world:
                try:
                    held = open_locked(path)
                except OSError:  # another run's, in use
                    continue
                if held is not None:
                    with held:
                        (folder / path.name.replace(".bin.partial", ".progress.jsonl")).unlink(missing_ok=True)
                        path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None and not self.out.closed:  # Ctrl-C, an error: keep what is done
            try:
                self.commit()  # (the rows of every pending line are written: a torn row comes after them)
            except OSError:  # a full disk: what was committed before stays
                pass
        failed = []
        for file in (self.lines, self.out):  # the partial last: closing it releases the lock
            try:
                file.close()  # (closed even when flushing what is buffered fails)
            except OSError as e:
                failed.append(e)
        if failed and kind is None:  # else the error on the way out is the one to raise (a full disk's, named)
            raise failed[0]


def _drop_orphans(folder: Path, log: Callable[[str], None]) -> None:
    """Delete the temporaries of runs killed before they renamed them into place: a private shard
    (`.shard_R.bin.<8 hex>.tmp`: a run that found the partial held by another wrote its shard
    there), a shard's list or the manifest (`.shard_R.json.<8 hex>.tmp`, `.manifest.json.<8 hex>.tmp`).
    Each is locked by its writer until renamed (`model.files.drop_dead_temporaries`); a live run's
    is left to it. One log line says how many."""
    removed = drop_dead_temporaries(folder, ".", TEMP_SUFFIX)
    if removed:
        log(f"removed {len(removed)} temporaries of runs killed while encoding {folder} ({listed(removed)})")


def _corpus_key(root: str, files, fingerprint: str, channels: str, mono_to_stereo: str, sample_rate: int,
                model_channel: int = 1) -> str:
    listing = []
    for f in files:
        listing.append([os.path.relpath(f.path, root), *change_stamp(os.stat(f.path))])
    spec = {"format": FORMAT, "root": root, "files": listing, "codec": fingerprint, "channels": channels,
            "mono_to_stereo": mono_to_stereo if channels == "stereo" else None, "sample_rate": sample_rate}
    if channels == "stereo":
        spec["dual_mono"] = "one channel"  # since 2026-12-06 (it was two speakers): stereo corpora are encoded anew
    if channels == "stereo" and model_channel != 1:
        spec["model_channel"] = model_channel  # only when swapped, so corpora encoded before keep their keys
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


def scan_corpus(root: str, sample_rate: int, hop: int):
    """The audio files of `root` (`model.data.scan_audio_folder`: a folder or a jsonl manifest) at
    least two latents (`2 * hop` samples) long: a crop of one latent predicts nothing (position t
    predicts latent t+1). Shorter files are left out, named together in one SkippedAudioWarning and
    listed in the result's `short`; FileNotFoundError naming `root` when no file is left, as a
    corpus of shorter files would train on nothing, or validate to a loss of 0 that every
    checkpoint would "improve" on. Read from the files' headers (cached), so the trainer checks
    both corpora before encoding either."""
    from .data import AudioFileList, scan_audio_folder, skip_short
    files = scan_audio_folder(root)
    long_enough = [f.frames * sample_rate // f.sample_rate >= 2 * hop for f in files]
    usable = [f for f, ok in zip(files, long_enough) if ok]
    if not usable:
        longest = max(f.frames / f.sample_rate for f in files)
        raise FileNotFoundError(f"{files.source}: no audio file is at least 2 latents ({2 * hop / sample_rate:g} s) "
                                f"long (the longest is {longest:.3f} s): its crops would hold nothing to predict")
    short = [os.path.relpath(f.path, files.root) for f, ok in zip(files, long_enough) if not ok]
    skip_short(short, f"shorter than 2 latents ({2 * hop / sample_rate:g} s)", files.source)
    return AudioFileList(usable, files.root, files.skipped, files.source, files.short + short, files.linked)


def prepare_latents(root: str, codec, channels: str, out_dir: str, sample_rate: int = 16000,
                    mono_to_stereo: str = "silence", fingerprint: Optional[str] = None, num_workers: int = 0,
                    chunk_seconds: float = 60.0, log: Callable[[str], None] = print, model_channel: int = 1) -> Path:
    """The encoded folder of `root` for this codec and channel mode, encoding it first if it does
    not exist yet. Under torchrun every rank encodes its share of the files (one shard each).

    channels: "mono" (files averaged to one channel; 32-dim latents) or "stereo" (two speakers,
    one per channel; 64-dim latents). `root` is a folder or a jsonl manifest (`model/manifest.py`).
    model_channel (stereo): the file channel that holds the speaker the model is to become; it
    goes to channel 1, as in the live engine, so 0 swaps a file's two channels (moshi-finetune's
    layout has the model on the left); one-channel files follow mono_to_stereo. Files shorter than
    two latents (`2 * hop` samples) predict nothing: left out and named (`scan_corpus`, from the
    headers; or when decoded shorter than the header said), and a corpus with none longer is
    refused before encoding; the last partial latent of a file is dropped. Unreadable files
    (non-finite or huge samples included, see `model.audio`) are skipped, and so is a file whose
    latents come out non-finite: never stored, each named in a SkippedAudioWarning and counted in
    the log. A run that stops while encoding (killed, Ctrl-C, out of memory) keeps what it had
    committed (every `COMMIT_SECONDS`) and the next call with the same key resumes after it, with
    the same result as an uninterrupted encoding (`_PartialShard`); the same number of processes
    is needed to take it over.
    """
    from .data import SkippedAudioWarning
    if channels not in ("mono", "stereo"):
        raise ValueError(f"channels must be 'mono' or 'stereo', got {channels!r}")
    if model_channel not in (0, 1):
        raise ValueError(f"model_channel must be 0 or 1, got {model_channel!r}")
    if mono_to_stereo not in ("silence", "duplicate"):  # else found by the first one-channel file, mid-encoding
        raise ValueError(f"mono_to_stereo must be 'silence' or 'duplicate', got {mono_to_stereo!r}")
    hop = codec.hop_length
    files = scan_corpus(root, sample_rate, hop)
    root = files.root
    fingerprint = fingerprint or codec_fingerprint(codec)
    key = _corpus_key(root, files, fingerprint, channels, mono_to_stereo, sample_rate, model_channel)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(files.source.rstrip("/")) or "audio")
    folder = Path(out_dir) / f"{name}-{channels}-{key}"
    if (folder / MANIFEST).is_file():
        read_encoded(folder, fingerprint)  # a damaged folder is refused now, before any encoding
        _drop_orphans(folder, log)
        return folder

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(files), world))
    chunk = max(1, int(chunk_seconds * sample_rate) // hop) * hop
    latent_dim = int(codec.config.latent_dim) * (2 if channels == "stereo" else 1)
    try:  # a latents_dir this process may not write in: found before the encoding, not as a traceback
        try_writing_in(folder)
    except OSError as e:
        raise CheckpointError(f"cannot write {folder}: {os_reason(e, folder)}; encode into a latents_dir this "
                              "process can write") from None
    _drop_orphans(folder, log)
    if rank == 0:
        log(f"encoding {len(files)} files ({files[0].path if len(files) == 1 else root}) with codec {fingerprint} "
            f"({channels}) into {folder}")
    # files skipped when encoded, by what was wrong (the scan's unreadable ones are in files.skipped)
    entries, offset, skipped = [], 0, dict.fromkeys(SKIPPED, 0)
    shard = f"shard_{rank:05d}.bin"
    share = f" (rank {rank}'s share)" if world > 1 else ""
    partial, busy = _PartialShard.open(folder, rank, {"format": FORMAT, "world": world, "files": len(mine)},
                                       2 * latent_dim * 4)
    if partial is None:
        log(f"note: {busy}: this run encodes {folder}{share} into a file of its own, which a run that stops "
            "cannot resume")
    elif partial.world is not None:
        log(f"note: the run that stopped encoding {folder} shared its files out among {partial.world} processes, "
            f"this one among {world}: encoding{share} anew")
    elif partial.taken:
        for item in partial.taken:  # named again, so that "named above" holds for this run's log too
            if "skipped" in item:
                warnings.warn(item["skipped"], SkippedAudioWarning)
                skipped[item.get("as", "unreadable")] += 1
            else:
                entries.append(item["entry"])
                offset += item["entry"]["length"]
        log(f"resuming the encoding of {folder}{share}: {len(partial.taken)} of {len(mine)} files were done by a run "
            "that stopped")
    from tqdm import tqdm
    from .audio import cut_short
    dual_mono: list[str] = []  # stereo files of one signal on both channels, encoded as one speaker

    def encode(out, start: int, done: Callable[[dict], None]) -> None:
        """Encode this rank's files from the `start`-th on, their rows written to `out` and each file's
        entry (or, for a file skipped, the warning naming it) given to `done`."""
        nonlocal offset
        reader = StopSafeLoader(_AudioFiles([files[i].path for i in mine[start:]], sample_rate, channels,
                                            mono_to_stereo, model_channel), batch_size=None, num_workers=num_workers)
        for j, audio, error, dual in tqdm(reader, initial=start, total=len(mine), desc="encoding", disable=rank != 0,
                                          leave=False):
            j += start
            if dual:
                dual_mono.append(os.path.relpath(files[mine[j]].path, root))
            path = files[mine[j]].path
            why = rows = None
            if error is not None:
                why, kind = f"skipping unreadable audio: {error}", "unreadable"
            elif (n := audio.shape[-1] // hop * hop) < 2 * hop:  # its header said longer (scan_corpus: the others)
                why = (f"skipping {path}: {audio.shape[-1]} samples decoded, shorter than 2 latents "
                       f"({2 * hop} samples) though its header says longer")
                kind = "shorter than its header"
            elif cut_short(audio.shape[-1], said := files[mine[j]].frames * sample_rate // files[mine[j]].sample_rate,
                           sample_rate):  # (the loaders' rule: a file cut short, in part lost)
                why = (f"skipping {path}: it ends before its header says ({audio.shape[-1]} of {said} samples "
                       "decoded: a file cut short, or replaced since the scan?)")
                kind = "shorter than its header"
            else:
                rows = _encode(codec, audio[:, :n], chunk)
                if bad := overflowing(rows):  # a diverged codec: latents that would poison training
                    why = (f"skipping {path}: codec {fingerprint} encodes it to non-finite latents "
                           f"({bad} values NaN, inf or a log-variance over {MAX_LOGVAR:.1f}, whose samples overflow)")
                    kind = "non-finite latents"
            if why is not None:
                warnings.warn(why, SkippedAudioWarning)
                skipped[kind] += 1
                done({"file": j, "skipped": why, "as": kind})
                continue
            out.write(rows.tobytes())
            entries.append({"name": os.path.relpath(path, root), "shard": shard, "offset": offset, "length": len(rows)})
            offset += len(rows)
            done({"file": j, "entry": entries[-1]})

    def write_list(tmp: str) -> None:
        Path(tmp).write_text(json.dumps({"files": entries, "skipped": skipped}))

    if partial is None:
        # written beside and renamed into place: another run encoding the same corpus into the same
        # latents_dir at the same time never truncates a shard that this one has listed or maps.
        # Locked until renamed (atomic_write), so that a later run deletes it only once this one is gone.
        def write_shard(tmp: str) -> None:
            with open(tmp, "wb") as out:
                encode(out, 0, lambda item: None)

        atomic_write(folder / shard, write_shard)
        atomic_write(folder / f"shard_{rank:05d}.json", write_list)
    else:
        from .training import sigterm_as_interrupt
        with partial:
            try:
                with sigterm_as_interrupt():  # (a SIGTERM commits what is encoded, as Ctrl-C does)
                    encode(partial.out, len(partial.taken), partial.done)
                partial.commit()
            except OSError as e:  # a full disk
                raise CheckpointError(f"cannot write {folder / shard}: {os_reason(e)}") from None
            atomic_write(folder / f"shard_{rank:05d}.json", write_list)
            partial.finish(folder / shard)  # renamed into place, as above: never written again
    if dual_mono:
        log(f"note: {len(dual_mono)} stereo file{'s hold' if len(dual_mono) > 1 else ' holds'} one signal on both "
            f"channels (a mono recording saved as stereo), each taken as one speaker, a monologue "
            f"(mono_to_stereo={mono_to_stereo}), as two it would teach the model to echo the user: {listed(dual_mono)}")
    long_barrier()
    if rank == 0:
        merged, skipped = [], dict.fromkeys(SKIPPED, 0)
        for r in range(world):
            part = json.loads((folder / f"shard_{r:05d}.json").read_text())
            merged += part["files"]
            for kind, n in part["skipped"].items():
                skipped[kind] += n
        merged.sort(key=lambda e: e["name"])
        if not any(e["length"] >= 2 for e in merged):  # the longer files were unreadable (see scan_corpus)
            raise FileNotFoundError(f"no file in {root} gives latents: none is at least 2 latents ({2 * hop} samples) "
                                    f"long, readable and encoded to finite values "
                                    f"({len(files.skipped) + sum(skipped.values())} skipped, named above)")
        manifest = {"format": FORMAT, "root": root, "codec": fingerprint, "channels": channels,
                    "mono_to_stereo": mono_to_stereo, "model_channel": model_channel, "sample_rate": sample_rate,
                    "hop_length": hop, "latent_dim": latent_dim,
                    "latents": sum(e["length"] for e in merged), "files": merged}
        atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=0)))
        _PartialShard.drop_stale(folder, world)
        log(f"encoded {manifest['latents']} latents ({manifest['latents'] * hop / sample_rate / 3600:.2f} h) "
            f"from {len(merged)} files" + files.left_out(len(files.skipped) + skipped.pop("unreadable"),
                                                          {SKIPPED[k]: n for k, n in skipped.items()}))
    long_barrier()
    return folder


# --- sequences --------------------------------------------------------------------------------

class LatentCrops(Dataset):
    """Sequences of `seq_len` latents from an encoded folder, as
    `{"posterior": (T, 2, D) float32 [mu, logvar], "valid": (T,) bool}`.

    train=True: item i is a random crop reproducible from (seed, i) alone: a file drawn with
        probability proportional to its length, then a uniform start. Items are indexed by a
        global sample counter (see `StepSampler`), so the data position is the training step.
    train=False: fixed crops, consecutive from the start of each file, at most
        `val_crops_per_file` per file (spread over it) and `max_crops` in all.

    A file shorter than `seq_len` gives a shorter crop, zero-padded at the end with `valid`
    False there: padded positions are left out of every loss (causal attention means they never
    influence a real position either). Sequences are never packed across files. A crop holding
    NaN or inf (a damaged shard: `prepare_latents` never writes one) raises LatentsError naming
    the folder and the file, rather than training to a non-finite loss or validating to NaN.
    """

    def __init__(self, folder: str | os.PathLike, seq_len: int, train: bool = True, seed: int = 0,
                 val_crops_per_file: int = 4, max_crops: Optional[int] = 256):
        self.folder = Path(folder)
        self.manifest = read_encoded(self.folder)
        self.files = self.manifest["files"]
        self.dim = self.manifest["latent_dim"]
        self.seq_len, self.train, self.seed = seq_len, train, seed
        self.lengths = np.array([f["length"] for f in self.files], dtype=np.int64)
        self._shards: Optional[dict[str, object]] = None  # shard -> its open file (`_rows`)
        if train:
            self._cumulative = np.cumsum(self.lengths)
        else:
            crops = []
            for i, length in enumerate(self.lengths):
                n = max(1, int(length // seq_len))
                picks = np.unique(np.linspace(0, n - 1, min(n, val_crops_per_file)).round().astype(int))
                crops.extend((i, int(k) * seq_len) for k in picks)
            if max_crops is not None and len(crops) > max_crops:
                picks = np.unique(np.linspace(0, len(crops) - 1, max_crops).round().astype(int))
                crops = [crops[k] for k in picks]
            self.crops = crops

    def __getstate__(self):  # DataLoader workers started by pickling (spawn) open their own files
        return {**self.__dict__, "_shards": None}

    def _rows(self, f: dict, start: int, n: int) -> np.ndarray:
        """Latents [start, start + n) of the manifest's file entry `f`, (n, 2, D) float32, read with
        one positioned read (workers forked share the descriptor: a pread moves no offset). A shard
        that no longer holds them (cut short, rewritten in place since the run started: a network
        file system, `rsync --inplace`) or cannot be read is a LatentsError naming it; through a
        memory map the read past its new end was a SIGBUS that killed the trainer without a word."""
        shard, path = f["shard"], self.folder / f["shard"]
        rows = np.empty((n, 2, self.dim), dtype=np.float32)
        offset, want, got = (f["offset"] + start) * 2 * self.dim * 4, rows.nbytes, 0  # (float32 rows of (2, D))
        buffer = memoryview(rows).cast("B")
        try:
            if self._shards is None:
                self._shards = {}
            if shard not in self._shards:
                self._shards[shard] = open(path, "rb", buffering=0)
            fd = self._shards[shard].fileno()
            while got < want:
                if hasattr(os, "preadv"):  # into the array itself
                    k = os.preadv(fd, [buffer[got:]], offset + got)
                else:
                    data = os.pread(fd, want - got, offset + got)
                    buffer[got:got + len(data)] = data
                    k = len(data)
                if k == 0:
                    break
                got += k
            size = os.fstat(fd).st_size if got < want else None
        except OSError as e:
            raise LatentsError(f"latents folder {self.folder}: cannot read {shard} ({os_reason(e)}); check the disk, "
                               f"or delete {self.folder} and run again to encode it anew") from None
        if size is not None:
            raise LatentsError(f"latents folder {self.folder} is damaged: {shard} changed since the run started: it "
                               f"holds {size} bytes, shorter than the {offset + want} its {MANIFEST} lists up to the "
                               f"latents of {f['name']}; delete {self.folder} and run again to encode it anew")
        return rows

    def __len__(self) -> int:
        return len(self.crops) if not self.train else int(self.lengths.sum() // self.seq_len) or 1

    def crop(self, file: int, start: int) -> dict[str, torch.Tensor]:
        f = self.files[file]
        n = min(self.seq_len, f["length"] - start)
        rows = self._rows(f, start, n)
        if not np.isfinite(rows).all():  # never written so (prepare_latents): a damaged shard, not a diverged model
            raise LatentsError(f"latents folder {self.folder} is damaged: {f['shard']} holds non-finite values in the "
                               f"latents of {f['name']} ({start} to {start + n}); delete {self.folder} and run "
                               "again to encode it anew")
        if overflowing(rows):  # (a folder encoded before prepare_latents skipped them)
            raise LatentsError(f"latents folder {self.folder}: the latents of {f['name']} ({start} to {start + n}, in "
                               f"{f['shard']}) have a log-variance of {rows[:, 1].max():.3g}, whose samples overflow "
                               f"float32: codec {self.manifest['codec']} overflows on it; use another codec_checkpoint, "
                               f"or delete {self.folder} and run again to encode it anew without such files")
        posterior = torch.zeros(self.seq_len, 2, self.dim)
        posterior[:n] = torch.from_numpy(rows)
        valid = torch.zeros(self.seq_len, dtype=torch.bool)
        valid[:n] = True
        return {"posterior": posterior, "valid": valid}

    def draw(self, index: int) -> tuple[int, int]:
        """(file, start) of item `index`: for train=True the random crop `__getitem__` reads."""
        if not self.train:
            return self.crops[index]
        rng = np.random.default_rng((self.seed, index))
        i = int(np.searchsorted(self._cumulative, rng.integers(self._cumulative[-1]), side="right"))
        start = int(rng.integers(max(int(self.lengths[i]) - self.seq_len, 0) + 1))
        return i, start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.crop(*self.draw(index))


class StepSampler(Sampler[int]):
    """Endless global sample indices of one rank from `start_step` on: micro-batch m of step s on
    rank r reads items ((s * accum + m) * world + r) * batch + [0, batch). Resuming at a step reads
    exactly what an uninterrupted run would have."""

    def __init__(self, batch_size: int, grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.batch, self.accum, self.rank, self.world, self.start = batch_size, grad_accum_steps, rank, world_size, start_step

    def indices(self, step: int) -> list[int]:
        """The items this rank reads at `step`, all micro-batches."""
        return [((step * self.accum + m) * self.world + self.rank) * self.batch + k
                for m in range(self.accum) for k in range(self.batch)]

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            yield from self.indices(step)
            step += 1


def overflowing(rows: np.ndarray) -> int:
    """How many values of the latents `rows` (N, 2, D) [mu, logvar] are NaN or inf, or a
    log-variance above `MAX_LOGVAR`, whose samples overflow float32: a codec's latents that would
    make the transformer's loss NaN at the first step that reads them."""
    return int(np.count_nonzero(~np.isfinite(rows)) + np.count_nonzero(rows[:, 1] > MAX_LOGVAR))


def sample_posterior(posterior: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, T, 2, D) [mu, logvar] -> z = mu + exp(logvar / 2) * eps, (B, T, D): the codec's
    `Codec.sample`, drawn afresh at every read."""
    mu, logvar = posterior.unbind(dim=2)
    return Codec.sample(mu, logvar, generator)
