"""Audio file I/O: soundfile for reading and writing, soxr for resampling.

Arrays are float32 in [-1, 1] and channel-first, `(C, T)`, the layout the models take.

What counts as audio: every sample finite and at most `MAX_SAMPLE_MAGNITUDE` in magnitude. Float
files may go a little past full scale (1.0: inter-sample peaks, mastering without a limiter), but
NaN, inf or a value 60 dB above full scale is a broken or mis-scaled file, not a sound; reading one
raises AudioError naming the file, so datasets skip it and prompts are refused. So does a sample rate
below `MIN_SAMPLE_RATE` or above `MAX_SAMPLE_RATE`: a broken header (resampled to 16 kHz, a small
file at 1 Hz would need gigabytes, one at 2 GHz would be a few samples), not a recording.
"""
from __future__ import annotations

import errno
import functools
import io
import math
import os
import re
import stat
import sys
import warnings
from contextlib import ExitStack, contextmanager
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from config import OneLine, printable, stop_signals_held
from .files import (NAME_UNITS, drop_dead_temporaries, is_device, name_length, name_max, os_reason,
                    replace_atomically, temporary_beside, try_writing_in)

# .opus: Ogg Opus by its own extension (RFC 7845), as Multilingual LibriSpeech ships its audio; .oga: Ogg
# audio's own (RFC 5334); then the other containers libsndfile reads: AIFF (and AIFF-C: a Mac's, a DAW's),
# Apple's CAF, Sun's AU, Sony's W64 and the EBU's RF64 (WAVs past 4 GB: long field recordings), and NIST
# SPHERE (.sph, .nist: the LDC's telephone corpora, Switchboard, Fisher; libsndfile reads its PCM, not
# its `shorten`-compressed files, which the scan then names as unreadable); and the other names of those
# containers: .wave (WAV), .bwf (Broadcast WAV: a field recorder's), .snd (AU)
SUPPORTED_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".oga", ".mp3",
                        ".aif", ".aiff", ".aifc", ".caf", ".au", ".w64", ".rf64", ".sph", ".nist",
                        ".wave", ".bwf", ".snd")
# Extensions that name a container's codec too: (soundfile's format, subtype) a file written gets
CODEC_EXTENSIONS = {".opus": ("OGG", "OPUS")}
# Audio of other formats, which a corpus folder does not list (AAC: soundfile cannot read it): the
# scan names them, so that a folder of phone recordings (.m4a) beside WAVs is not half used unsaid
OTHER_AUDIO_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".webm", ".mka", ".amr", ".3gp", ".wv", ".ape", ".spx",
                          ".mp2", ".ac3", ".dts", ".ra", ".shn")
# Text and metadata a corpus holds beside its audio (LibriSpeech's .trans.txt, LJSpeech's metadata.csv,
# alignments, Kaldi lists, manifests): a scan does not open them to see whether they are audio
TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".md", ".lab", ".textgrid", ".yaml", ".yml", ".xml",
                   ".pdf", ".lst", ".scp", ".rttm", ".ctm", ".stm", ".srt", ".vtt", ".html", ".log")
CHANNEL_MODES = (None, "mono", "stereo", "speakers")

# File frames read on each side of a crop so the resampler's filter sees real signal at the
# crop edges instead of a step from zero (which would ring into the first/last milliseconds): 1024,
# or _RESAMPLE_MARGIN_OUT output samples' worth where that is more. Downsampling, soxr's filter spans
# a number of output samples, so of file frames as many times more as the rates differ: 1024 fell
# short of it from 352.8 kHz (crop edges 1e-4 to 9e-4 off a whole read at 768 kHz; 256 output
# samples made them ~2e-7, as at 48 kHz).
_RESAMPLE_MARGIN = 1024
_RESAMPLE_MARGIN_OUT = 256

MAX_SAMPLE_MAGNITUDE = 1000.0  # 60 dB above full scale; see the module docstring
MIN_SAMPLE_RATE = 4000  # Hz; lower holds no speech band: a broken header (see the module docstring)
# Hz; above the highest rate audio is recorded at (768 kHz DXD): a broken header, whose file would
# become a few samples at 16 kHz and be skipped or refused as too short, blamed on its length
MAX_SAMPLE_RATE = 768_000
# libsndfile's frame count (SF_COUNT_MAX) of a file whose header does not say its length: a FLAC
# written to a pipe (ffmpeg's `-f flac -`), whose STREAMINFO total was never filled in
UNKNOWN_FRAMES = 2 ** 63 - 1
# Subtypes whose samples are stored as floats; integer PCM (and FLAC) cannot leave [-1, 1].
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


class AudioError(OneLine, RuntimeError):
    """A file that cannot be read or written as audio; the message names the file."""


def broken_link(path: str) -> Optional[str]:
    """What a symbolic link at `path` that leads to no file is ("a symbolic link to X, which does
    not exist", or one in a loop of links), or None: "no such file" of a name that is there misled."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link in a loop of links (it leads to no file)"
    else:
        return None
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


def broken_link_above(folder: str) -> Optional[str]:
    """`folder`, or the nearest place above it that is there, when that is a symbolic link leading
    to no folder (a disk not mounted?): "P is a symbolic link to T, which does not exist"; else
    None. (os.makedirs says only "File exists", or "No such file or directory", of it.)"""
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return f"{path} is {link}" if (link := broken_link(path)) else None


def _reason(e: Optional[Exception], path: Optional[str] = None) -> str:
    """Why reading (or writing) failed; for a `path` that is missing, a folder, a named pipe or a
    device, or a link to no file, that (libsndfile says "System error." or "Format not recognised.")."""
    if path is not None and not os.path.isfile(path):
        if os.path.isdir(path):
            return "it is a folder"
        if os.path.exists(path):
            return "it is not a regular file (a named pipe or a device)"
        return f"it is {link}" if (link := broken_link(path)) else "no such file"
    if isinstance(e, UnicodeEncodeError):  # soundfile encodes names strictly: bytes that are not UTF-8 fail
        byte = os.fsencode(e.object[e.start:e.end])[:1].hex()
        return f"its file name is not valid {e.encoding} (byte 0x{byte}), which soundfile cannot open; rename the file"
    if path is not None and not os.access(path, os.R_OK):  # libsndfile says "System error."
        return "permission denied (this user cannot read it)"
    if path is not None and _size(path) == 0:  # a download that failed, a `touch`: libsndfile says
        return "it is empty (0 bytes)"            # "Format not recognised."
    message = str(e).strip() or repr(e)  # libsndfile errors sometimes carry an empty message
    if path is not None and "File does not exist or is not a regular file" in message:
        # what libsndfile says of a file that mpg123 finds no MP3 in (a web page saved as episode.mp3,
        # a renamed .m4a): the file is there, and regular (checked above); or an MP3 cut short inside
        # its ID3 tags (an interrupted download of one with cover art: its audio follows them)
        try:
            with open(path, "rb") as f:
                tags, size = _id3_end(f), os.fstat(f.fileno()).st_size
        except OSError:
            tags = size = 0
        if tags > size:
            return (f"it ends inside its ID3 tags ({size} bytes of the {tags} they give, before any audio: a file "
                    "cut short, by an interrupted copy or download?)")
        ext = os.path.splitext(path)[1][1:].upper() or "audio"
        return (f"format not recognised: it is not {ext} audio, as its extension says (a web page, or a file of "
                "another format, saved under that name?)")
    if path is not None and any(words in message for words in _DAMAGED):
        message += " (a file cut short, or damaged?)"
    return message


def _size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# What libsndfile says of a file whose data end early or are corrupt (a FLAC, an Ogg or an MP3 cut
# short by an interrupted copy or download): its own words name no cause a user would recognise.
_DAMAGED = ("lost sync", "psf_fseek() failed", "file is malformed")


def _check_rate(rate: int, path: str, frames: int = 0) -> None:
    """AudioError for a sample rate no recording has, or a header that does not give the length
    (soundfile cannot read such a file: it counts it as 2**63 - 1 frames, and seeks fail in it)."""
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"cannot read audio file {path}: a sample rate of {rate} Hz, below {MIN_SAMPLE_RATE} Hz "
                         "(a broken header?)")
    if rate > MAX_SAMPLE_RATE:
        raise AudioError(f"cannot read audio file {path}: a sample rate of {rate} Hz, above {MAX_SAMPLE_RATE} Hz "
                         "(a broken header?)")
    if frames >= UNKNOWN_FRAMES:
        raise AudioError(f"cannot read audio file {path}: its header does not say how long it is (a FLAC written "
                         "to a pipe?); write it again as a file, e.g. `ffmpeg -i IN -c:a flac OUT.flac`")


# --- MP3s whose length libsndfile does not know ----------------------------------------------------
# libsndfile takes an MP3's length from its Xing/Info (LAME) or VBRI header or, without one, estimates
# it from the file's size and its first frame's bitrate, and it stops reading there: a variable-bitrate
# MP3 written without that header (some encoders and stream rippers do) reads as a fraction of itself,
# silently (a 20 s file as 5 s). Such a file's frames are counted as mpg123 finds them (its first frame
# may follow its ID3 tags after padding or junk), and it is opened as those frames behind a Xing header
# made to count them, in memory (the file is untouched), which gives libsndfile the length its frames
# hold. A file whose first frame is such a header (most: LAME writes an Info frame even at a constant
# bitrate) is left to libsndfile, its first few KB read: its header is believed, so MP3s joined end to
# end (`cat a.mp3 b.mp3`), whose first header counts the first file's frames, read as the first.

_MP3_BITRATES = {1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),   # MPEG-1, kbit/s
                 2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}       # MPEG-2 and 2.5
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
# Bytes searched for the next frame where one does not follow (junk or padding after the ID3 tags, a
# damaged stretch): mpg123 searches as far; past it, the stream is taken to have ended.
_MP3_RESYNC = 1 << 16


def _mp3_frame(data: bytes, pos: int) -> Optional[tuple[int, int, int]]:
    """(frame length in bytes, samples per frame, side information length) of the MPEG audio layer
    III frame header at `pos`, or None if there is none there."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    version, layer = (data[pos + 1] >> 3) & 3, (data[pos + 1] >> 1) & 3
    bitrate_index, rate_index = data[pos + 2] >> 4, (data[pos + 2] >> 2) & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:  # reserved, not layer III, free
        return None
    mpeg1, mono = version == 3, data[pos + 3] >> 6 == 3
    rate = _MP3_RATES[version][rate_index]
    bitrate = _MP3_BITRATES[1 if mpeg1 else 2][bitrate_index] * 1000
    length = (144 if mpeg1 else 72) * bitrate // rate + ((data[pos + 2] >> 1) & 1)
    return length, 1152 if mpeg1 else 576, (17 if mono else 32) if mpeg1 else (9 if mono else 17)


def _mp3_same_stream(data: bytes, pos: int, ref: bytes) -> bool:
    """Whether the frame header at `pos` has the version, layer, sample rate and mono-ness of `ref`'s
    (its bitrate, padding, CRC and joint-stereo mode bits vary within a stream)."""
    return data[pos + 1] | 1 == ref[1] | 1 and (data[pos + 2] ^ ref[2]) & 0x0C == 0 and \
        (data[pos + 3] >> 6 == 3) == (ref[3] >> 6 == 3)


def _mp3_sync(data: bytes, pos: int, ref: Optional[bytes]) -> Optional[int]:
    """The first frame at or after `pos` (within `_MP3_RESYNC` bytes) whose next frame, of the same
    stream, follows it (or the data end, which it does not run past), as mpg123 resyncs: a lone 0xFFE
    bit pattern in junk is no frame. Of the stream of `ref` (a frame header), when given; None where
    there is none."""
    end = min(pos + _MP3_RESYNC, len(data))
    while (pos := data.find(b"\xff", pos, end)) != -1:
        if (frame := _mp3_frame(data, pos)) is not None and (ref is None or _mp3_same_stream(data, pos, ref)):
            after = pos + frame[0]
            if after == len(data) or _mp3_frame(data, after) is not None and \
                    _mp3_same_stream(data, after, data[pos:pos + 4]):
                return pos
        pos += 1
    return None


def _mp3_counted(data: bytes, pos: int, frame: tuple[int, int, int]) -> Optional[int]:
    """The frame count of the Xing/Info or VBRI header that the frame at `pos` is (0 where it gives
    none, or the data end inside it), or None for a frame of audio."""
    at = pos + 4 + (0 if data[pos + 1] & 1 else 2) + frame[2]  # past the header, its CRC and side information
    if (tag := data[at:at + 12])[:4] in (b"Xing", b"Info"):
        return int.from_bytes(tag[8:], "big") if len(tag) == 12 and tag[7] & 1 else 0
    if data[pos + 36:pos + 40] == b"VBRI":
        return int.from_bytes(count, "big") if len(count := data[pos + 50:pos + 54]) == 4 else 0
    return None


def mp3_length_header(path: str) -> Optional[tuple[bytes, int]]:
    """For an MP3 without a Xing, Info or VBRI header: (its frames after a Xing frame that counts
    them, the samples those frames hold); None for any other file (one whose first frame is such a
    header, one with no layer III stream near its start). The frames are counted once per version of
    the file (its size, times and inode), not at each crop read from it."""
    st = os.stat(path)
    made = _mp3_xing_frame(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if made is None:
        return None
    xing, spans, samples = made
    parts = [xing]
    with open(path, "rb") as f:
        for start, end in spans:
            f.seek(start)
            parts.append(f.read(end - start))
    return b"".join(parts), samples


def _id3_end(f) -> int:
    """Where the ID3v2 tags at the start of the open binary file `f` end (may be past its end, for a
    file cut short inside them): its first audio byte, or 0 when it has none."""
    start = 0
    f.seek(0)
    while len(tag := f.read(10)) == 10 and tag[:3] == b"ID3":
        start += 10 + ((tag[6] << 21) | (tag[7] << 14) | (tag[8] << 7) | tag[9]) + (10 if tag[5] & 0x10 else 0)
        f.seek(start)
    return start


@functools.lru_cache(maxsize=1024)
def _mp3_xing_frame(path: str, size: int, *version) -> Optional[tuple[bytes, tuple[tuple[int, int], ...], int]]:
    """(the Xing frame, the byte spans of the file that hold the audio frames, the samples they hold)
    of `mp3_length_header`, or None; `size` and `version` (the file's stat) key the cache."""
    if size == 0:
        return None
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # (read where touched)
        if (pos := _mp3_sync(data, _id3_end(f), None)) is None:
            return None
        # its own header counts its frames (the common case, decided on its first KB): libsndfile reads it
        if _mp3_counted(data, pos, _mp3_frame(data, pos)) is not None:
            return None
        return _mp3_stream(data, pos)


def _mp3_stream(data, pos: int) -> tuple[bytes, tuple[tuple[int, int], ...], int]:
    """`_mp3_xing_frame` of the bytes `data` of an MP3 file whose first frame, of audio, is at `pos`:
    its frames walked."""
    head, frames, spans, begun = data[pos:pos + 4], 0, [], pos
    while True:
        if (frame := _mp3_frame(data, pos)) is not None and _mp3_same_stream(data, pos, head) and \
                pos + frame[0] <= len(data):  # (a frame the file ends inside is stray bytes, no frame)
            frames, pos = frames + 1, pos + frame[0]
            continue
        spans.append((begun, min(pos, len(data))))  # the end, or what is no frame of it
        if pos >= len(data) or (pos := _mp3_sync(data, pos, head)) is None:
            break
        begun = pos
    # The Xing frame: the first frame's header without CRC or padding, at the lowest bitrate that holds
    # the side information (zeros), "Xing", its flags (frame count and byte count given) and both counts.
    _, samples_per_frame, side = _mp3_frame(head, 0)
    for index in range(1, 15):
        header = bytes((0xFF, head[1] | 1, (index << 4) | (head[2] & 0x0C), head[3]))
        if (length := _mp3_frame(header, 0)[0]) >= 4 + side + 16:
            break
    spans = tuple((a, b) for a, b in spans if b > a)
    xing = header + bytes(side) + b"Xing" + (3).to_bytes(4, "big") + frames.to_bytes(4, "big") + \
        (length + sum(b - a for a, b in spans)).to_bytes(4, "big")
    return xing + bytes(length - len(xing)), spans, frames * samples_per_frame


# --- Ogg files: chained streams, and seeks into a Vorbis stream's last page ------------------------------
# An Ogg file may hold several streams one after another ("chained": what a stream recorder writes at
# each change of track or encoder settings, or `cat a.ogg b.ogg`). libsndfile reads the first stream
# only and counts the file as that long: the rest was lost silently (3 s of a 6 s file). Such a file is
# read link by link, each link a file of its own to libsndfile (a window on the file's bytes, not a
# copy), joined into one signal.
# And libsndfile's seek to a frame inside a Vorbis stream's last page gives samples that are not the
# stream's (off by up to 0.3, full scale 1; a page holds up to ~1.5 s of audio): every crop that began
# there. A seek there goes to the page's first frame instead, and the frames up to the one asked for
# are read and dropped (a seek to a page's first frame, or to any frame of an earlier page, is exact).

class OggLink(NamedTuple):
    start: int                # its bytes in the file, [start, end)
    end: int
    vorbis_tail: Optional[int]  # the first frame of its Vorbis stream's last page (None: no Vorbis stream)


def ogg_links(path: str) -> tuple[OggLink, ...]:
    """The chained streams ("links") of an Ogg file, in order; one for a file of one stream (or one
    group of streams played together). The pages are walked once per version of the file (its size,
    times and inode), not at each crop read from it."""
    st = os.stat(path)
    return _ogg_links(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@functools.lru_cache(maxsize=1 << 16)
def _ogg_links(path: str, size: int, *version) -> tuple[OggLink, ...]:
    """`ogg_links`; `size` and `version` (the file's stat) key the cache. A link begins at a page that
    begins a stream (BOS) after a page that does not: streams multiplexed together (Vorbis beside a
    Skeleton, Theora) begin on consecutive pages. The walk stops at the first bytes that are no page (a
    file cut short, trailing junk), which then belong to the last link, for libsndfile to judge."""
    links, pos, after_bos = [], 0, False
    vorbis, granules = None, []  # the link's Vorbis stream (its serial number), its pages' granule positions
    with open(path, "rb") as f:
        while len(head := f.read(27)) == 27 and head[:4] == b"OggS":
            table = f.read(head[26])
            if len(table) < head[26]:
                break
            bos, serial, granule = bool(head[5] & 0x02), head[14:18], int.from_bytes(head[6:14], "little", signed=True)
            if bos and not after_bos:  # a new link
                if links:
                    links[-1] = links[-1]._replace(end=pos, vorbis_tail=_last_page_start(granules))
                links.append(OggLink(pos, size, None))
                vorbis, granules = None, []
            if bos and vorbis is None and f.read(7) == b"\x01vorbis":  # the identification header
                vorbis = serial
            if serial == vorbis and granule != -1:  # (-1: no packet ends on the page)
                granules.append(granule)
            after_bos = bos
            pos += 27 + len(table) + sum(table)
            f.seek(pos)
    if links:
        links[-1] = links[-1]._replace(vorbis_tail=_last_page_start(granules))
    return tuple(links)


def _last_page_start(granules: list[int]) -> Optional[int]:
    """The first frame of the last page of a Vorbis stream whose pages end at frames `granules` (the
    header pages' 0 first); None without a Vorbis stream."""
    return granules[-2] if len(granules) >= 2 else (0 if granules else None)


class _Window:
    """Bytes `start` to `end` of the file at `path`, as a read-only file for soundfile's virtual I/O."""

    def __init__(self, path: str, start: int, end: int):
        self._f, self._start, self._length, self._pos = open(path, "rb"), start, end - start, 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        size = self._length - self._pos if size is None or size < 0 else min(size, self._length - self._pos)
        if size <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(size)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()


class _OggFile:
    """An Ogg file's links (`ogg_links`) read as one signal, through the part of `soundfile.SoundFile`'s
    interface that reading here uses, with a seek into a Vorbis stream's last page made exact (see
    above). Links of different sample rates or channel counts are refused (AudioError naming the file):
    one signal cannot be both."""

    def __init__(self, path: str, links: Sequence[OggLink], opened=None):
        import soundfile as sf
        self.links, self._windows, self._tails, self._i = [], [], [link.vorbis_tail for link in links], 0
        try:
            if len(links) == 1:  # the file itself (`opened`: already open, not opened again on every crop)
                self.links.append(opened if opened is not None else sf.SoundFile(path))
            elif opened is not None:
                opened.close()
            for link in links if len(links) > 1 else ():
                self._windows.append(_Window(path, link.start, link.end))
                self.links.append(sf.SoundFile(self._windows[-1]))
            kinds = sorted({(f.samplerate, f.channels) for f in self.links})
            if len(kinds) > 1:
                raise AudioError(f"cannot read audio file {path}: its {len(links)} chained Ogg streams differ in "
                                 f"sample rate or channels ({', '.join(f'{r} Hz x {c}' for r, c in kinds)}); "
                                 "convert it to one stream, e.g. `ffmpeg -i IN OUT.flac`")
        except BaseException:
            self.close()
            raise
        first = self.links[0]
        self.samplerate, self.channels, self.format, self.subtype = \
            first.samplerate, first.channels, first.format, first.subtype
        self._starts = np.cumsum([0] + [f.frames for f in self.links]).tolist()
        self.frames = min(self._starts[-1], UNKNOWN_FRAMES)

    def seekable(self) -> bool:
        return all(f.seekable() for f in self.links)

    def seek(self, frame: int) -> int:
        frame = min(max(frame, 0), self.frames)
        self._i = max(i for i in range(len(self.links)) if self._starts[i] <= frame)
        f, at, tail = self.links[self._i], frame - self._starts[self._i], self._tails[self._i]
        if tail is None or at <= tail:
            f.seek(at)
            return frame
        f.seek(tail)  # inside the last page: from its first frame, the rest read and dropped
        while at > tail and len(part := f.read(min(at - tail, 1 << 16), dtype="float32", always_2d=True)):
            tail += len(part)
        return frame

    def read(self, frames: int = -1, dtype: str = "float64", always_2d: bool = False) -> np.ndarray:
        parts = []
        while frames != 0:
            part = self.links[self._i].read(frames, dtype=dtype, always_2d=True)
            parts.append(part)
            frames = frames - len(part) if frames > 0 else frames
            if frames == 0 or self._i + 1 == len(self.links):
                break
            self._i += 1  # this link is read to its end: the next from its start
            if self.links[self._i].tell():
                self.links[self._i].seek(0)
        # (no part when 0 frames are asked for: a file of 0 samples, or one cut inside its headers)
        out = np.concatenate(parts) if parts else np.zeros((0, self.channels), dtype=dtype)
        return out if always_2d or self.channels > 1 else out[:, 0]

    def close(self) -> None:
        for f in self.links + self._windows:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# An MP3 is read in one read from where it is opened or seeked to, never in blocks: after a seek
# libsndfile's (mpg123's) output is not the file's for up to ~0.3 s (up to 4,800 samples of a 16 kHz
# file off by up to 0.36, full scale 1, where its frames lean on the bit reservoir: tones, pauses), and
# soundfile seeks after every read (to where it already is), so each read after the first began so
# too. A crop is read with _MP3_PREROLL file frames before it in the same read, then dropped: 9,216
# made every crop tried equal to the same span of a whole read, and this is twice that, a few
# milliseconds of decoding a crop.
_MP3_PREROLL = 18432
# An Opus stream's decoder after a seek (libsndfile's, with the 80 ms pre-roll RFC 7845 asks for) needs
# up to ~1 s more to give the file's samples again where the encoder ran its speech (SILK) modes: a
# 16 or 24 kHz mono file's crops began off by up to 0.04 (full scale 1) for up to 0.6-1.0 s (150 crops
# of each kind tried). So a crop of one is read with this many seconds before it, then dropped: a few
# milliseconds of decoding a crop.
_OPUS_PREROLL_S = 2.0


def _preroll(f) -> int:
    """File frames to decode before a crop of the open file `f` and drop (MP3 and Opus, above)."""
    if f.format == "MP3":
        return _MP3_PREROLL
    if "OPUS" in ({link.subtype for link in f.links} if isinstance(f, _OggFile) else {f.subtype}):
        return int(_OPUS_PREROLL_S * f.samplerate)
    return 0


# --- Files whose header does not give the length of the audio they hold --------------------------------
# libsndfile counts the frames a WAV, AIFF, AU, W64, RF64 or NIST file holds where its header says more (a
# file cut short by an interrupted copy or download), and says so only in its log ("data : 320000
# (should be 106637)"): a 60 s file cut to 20 s was read, scanned and trained on as 20 s, silently.
# Where the header says less, it believes the header: a WAV past 4 GiB (its sizes wrapped, as a
# 32-bit field holds no more) was read as its first minutes, and a WAV whose header was never filled
# in (a recorder killed before it wrote the sizes) as empty. Such files are refused, saying which.
_SAID = re.compile(r"^\s*([A-Za-z][\w ]*?)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# the log's line, by format, whose size is the audio's (a WAV's RIFF size also counts chunks after its
# data, whose loss costs no audio); W64 and RF64 check only their RIFF size
_AUDIO_SIZE = {"WAV": "data", "WAVEX": "data", "AIFF": "SSND", "AU": "Data Size", "W64": "riff", "RF64": "Riff size"}


def cut_short(held: int, said: int, rate: int) -> bool:
    """Whether `held` samples at `rate` fall short of the `said` ones by a second and a tenth of them
    at least: a file cut short, in part lost (skipped). Less is let be (an MP3 header's estimate a
    little long): its last crops are padded, and masked. The rule of the scan, the loaders and the
    latents encoder alike."""
    return said - held >= max(rate, said // 10)


def _length_problem(f, path: str) -> Optional[str]:
    """Why the open soundfile `f` of `path` does not hold the audio its header says (see above), or
    None (`cut_short` decides)."""
    st = os.stat(path)
    size = st.st_size
    if f.format == "WAV" and size >= 1 << 32:
        return (f"a WAV file of {size / 1e9:.1f} GB, past the 4 GiB a WAV header can count (its sizes wrapped): "
                f"read as {f.frames / f.samplerate:.0f} s; convert it to FLAC, or to RF64 (`ffmpeg -i IN -rf64 auto "
                "OUT.wav`)")
    # (size said of its data chunk, bytes after it that are no chunk): once per version of the file, not per crop
    data = _wav_data(path, size, st.st_mtime_ns) if f.format in ("WAV", "WAVEX") else None
    if f.frames == 0 and (size >= 16384 and f.format in ("WAV", "WAVEX", "AIFF", "W64", "RF64", "AU", "CAF")
                          or data is not None and data[1] >= 1024):
        return (f"its header gives a length of 0 but the file holds {size} bytes (a recording whose header was "
                "never filled in: its writer killed?)")
    if data is not None and f.frames and data[1] >= max(data[0] // 10, 1 << 13):  # a little trailing junk is let be
        said = f.frames / f.samplerate  # a writer that updates the sizes now and then, killed: the rest unsaid
        return (f"its header gives {said:.1f} s, but about {said * data[1] / data[0]:.1f} s more of audio follow "
                "its data (a recording whose header was last updated before its writer stopped?)")
    if f.format == "NIST":  # (its log says nothing: the header's own sample count, in its text)
        with open(path, "rb") as raw:
            said = re.search(rb"\nsample_count -i (\d+)", raw.read(1024))
        said_frames = int(said.group(1)) if said else 0
    else:
        name = _AUDIO_SIZE.get(f.format)
        worst = max(((int(said), int(held)) for line, said, held in _SAID.findall(f.extra_info)
                     if (name is None or line == name) and int(said) > int(held) > 0 and int(said) != 0xFFFFFFFF),
                    key=lambda s: s[0] - s[1], default=None)  # (0xFFFFFFFF: a size not known when written, as to a pipe)
        said_frames = round(f.frames * worst[0] / worst[1]) if worst is not None and f.frames else 0
    if not cut_short(f.frames, said_frames, f.samplerate):
        return None
    return (f"it ends before its header says ({f.frames / f.samplerate:.1f} s of the {said_frames / f.samplerate:.1f} "
            "s it gives: a file cut short, by an interrupted copy or download?)")


@functools.lru_cache(maxsize=4096)
def _wav_data(path: str, size: int, mtime_ns: int) -> Optional[tuple[int, int]]:
    """(size said, bytes unsaid) of the data chunk of a RIFF WAV file of `size` bytes, from its
    chunk headers: the bytes after that chunk that are not another chunk (an ID of four printable
    ASCII characters and a size that fits the file), audio its header does not count. None: not
    RIFF, no data chunk in its first 64 KiB, or the sizes left for a pipe (0xFFFFFFFF). Cached per
    version of the file (`size`, `mtime_ns`): every crop a loader reads opens its file."""
    import struct
    with open(path, "rb") as raw:
        if (head := raw.read(12))[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos < 1 << 16 and len(chunk := raw.read(8)) == 8:
            cid, n = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                if n == 0xFFFFFFFF:
                    return None
                end = pos + 8 + n + (n & 1)
                raw.seek(end)
                after = raw.read(8)
                rest = max(size - end, 0)
                if len(after) == 8 and all(32 <= b < 127 for b in after[:4]) and \
                        struct.unpack("<I", after[4:])[0] <= rest - 8:
                    rest = 0  # another chunk (LIST, id3, ...): its audio is counted
                return n, rest
            pos += 8 + n + (n & 1)
            raw.seek(pos)
    return None


def _open_audio(path: str):
    """`soundfile.SoundFile(path)` for reading; an MP3 whose length libsndfile underestimates (see
    above) opened with a Xing header made from its frames instead, an Ogg file of chained streams or
    of Vorbis as `_OggFile` (its links joined; a seek into a Vorbis stream's last page made exact)."""
    import soundfile as sf
    f = sf.SoundFile(path)
    try:
        if problem := _length_problem(f, path):
            raise AudioError(f"cannot read audio file {path}: {problem}")
        links = ogg_links(path) if f.format == "OGG" else ()
        made = mp3_length_header(path) if f.format == "MP3" else None
    except BaseException:
        f.close()
        raise
    if len(links) > 1 or any(link.vorbis_tail is not None for link in links):
        return _OggFile(path, links, opened=f)
    if made is None or made[1] <= f.frames:
        return f
    f.close()
    return sf.SoundFile(io.BytesIO(made[0]))  # the stream in memory: an MP3 is a few MB a minute at most


def audio_info(path: str) -> tuple[int, int, int]:
    """Return `(frames, sample_rate, channels)` of a file without decoding it."""
    # soundfile is imported in _open_audio, not at the top: the GPU image's benchmarks import this module without it
    try:
        with _open_audio(str(path)) as info:
            frames, rate, channels = info.frames, info.samplerate, info.channels
    except AudioError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        raise AudioError(f"cannot read audio file {path}: {_reason(e, str(path))}") from e
    if rate <= 0 or channels <= 0 or frames < 0:
        raise AudioError(f"cannot read audio file {path}: bad header "
                         f"(rate={rate}, channels={channels}, frames={frames})")
    _check_rate(rate, path, frames)
    return int(frames), int(rate), int(channels)


def sniffed_audio(path: str) -> bool:
    """Whether a file named with none of the audio extensions is audio all the same (a WAV without its
    extension): soundfile reads its header. One named as text (`TEXT_EXTENSIONS`) is not opened, nor
    one that is no regular file (a named pipe would wait for a writer)."""
    if path.lower().endswith(TEXT_EXTENSIONS):
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        import soundfile as sf
        sf.info(path)
    except Exception:  # (soundfile raises LibsndfileError, RuntimeError or TypeError)
        return False
    return True


def check_samples(audio: np.ndarray, path: str = "<array>") -> None:
    """Raise AudioError naming `path` if any sample is NaN, inf, or beyond MAX_SAMPLE_MAGNITUDE."""
    if (problem := _sample_problem(audio)) is not None:
        _refuse_samples(*problem, path)


def _sample_problem(audio: np.ndarray) -> Optional[tuple[int, float]]:
    """None when every sample is audio; else (how many are non-finite, the peak magnitude)."""
    peak = float(np.abs(audio).max(initial=0.0))  # NaN propagates through max: one pass checks all
    if peak <= MAX_SAMPLE_MAGNITUDE:
        return None
    return int(np.count_nonzero(~np.isfinite(audio))), peak


def _refuse_samples(non_finite: int, peak: float, path: str) -> None:
    if non_finite:
        reason = f"{non_finite} non-finite samples (NaN or inf)"
    else:
        reason = f"samples of magnitude up to {peak:.3g}, beyond {MAX_SAMPLE_MAGNITUDE:g} (full scale is 1)"
    raise AudioError(f"cannot read audio file {path}: {reason}")


def scan_samples(path: str, block: int = 1 << 20) -> None:
    """`check_samples` a whole float file (WAV/AIFF subtype FLOAT or DOUBLE), block by block in
    bounded memory, so a scan catches it before training rather than when a crop hits it. Files
    that store integers (PCM, FLAC) or a lossy code (MP3, Vorbis) are not decoded: nothing to find."""
    import soundfile as sf
    try:
        with sf.SoundFile(str(path)) as f:
            if f.subtype not in FLOAT_SUBTYPES:
                return
            for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                check_samples(data, path)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"cannot read audio file {path}: {_reason(e, str(path))}") from e


def convert_channels(audio: np.ndarray, channels: Optional[str], path: str = "<array>") -> np.ndarray:
    """(C, T) -> (C', T): None keeps C, "mono" averages all channels, "stereo" keeps the first two,
    "speakers" the first two or the one there is (a two-speaker corpus: a file of more channels, a
    recorder's 6, is cut to two; a lone speaker's is the caller's to pair).

    "stereo" on a one-channel signal raises AudioError: whether a lone speaker should be
    duplicated or paired with silence is the caller's decision (see `model.data`).
    """
    if channels is None:
        return audio
    if channels == "mono":
        return audio if audio.shape[0] == 1 else audio.mean(axis=0, keepdims=True, dtype=np.float32)
    if channels == "stereo":
        if audio.shape[0] < 2:
            raise AudioError(f"{path} has {audio.shape[0]} channel, but stereo (two speakers) was "
                             "requested; load it with channels=None or 'mono'")
        return audio[:2]
    if channels == "speakers":
        return audio[:2]
    raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")


SAME_SIGNAL_TOLERANCE = 1e-4  # -80 dBFS: two channels closer than this everywhere hold one signal


def same_signal(a: np.ndarray, b: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether two channels hold one signal that is not silence (a mono recording saved as stereo):
    every sample within SAME_SIGNAL_TOLERANCE (compared in blocks: no whole-file temporary)."""
    if not np.any(a):
        return False
    return all(np.abs(a[i:i + block] - b[i:i + block]).max(initial=0.0) <= SAME_SIGNAL_TOLERANCE
               for i in range(0, len(a), block))


def two_speakers(audio: np.ndarray, mono: str = "silence") -> np.ndarray:
    """(C, T) -> (2, T), one speaker per channel: the first two channels of a multi-channel
    signal; a one-channel signal is speaker 0 with silence as speaker 1 (`mono="silence"`, a
    monologue) or with itself on both (`mono="duplicate"`)."""
    if audio.shape[0] == 1:
        if mono not in ("silence", "duplicate"):
            raise ValueError(f"mono must be 'silence' or 'duplicate', got {mono!r}")
        return np.concatenate([audio, audio if mono == "duplicate" else np.zeros_like(audio)])
    return audio[:2]


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """(C, T) at `from_rate` -> (C, T') at `to_rate` with soxr's high-quality filter."""
    if from_rate == to_rate or audio.shape[-1] == 0:
        return audio
    import soxr
    out = soxr.resample(audio.T, from_rate, to_rate, quality="HQ")  # soxr is time-major: (T, C)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def _skip_frames(f, frames: int, block: int = 1 << 16) -> None:
    """Move the freshly opened soundfile `f` to frame `frames`: a seek, or where libsndfile cannot
    seek in the file's encoding (GSM 6.10, G.721 or NMS ADPCM WAVs: telephony and voicemail
    recordings; even a seek to 0 fails there), reading and dropping the frames before it in blocks."""
    if frames <= 0:
        return
    if f.seekable():
        f.seek(frames)
        return
    while frames > 0:
        read = len(f.read(min(frames, block), dtype="float32", always_2d=True))
        if read == 0:  # the end of the file, before the frame asked for
            return
        frames -= read


_READ_BLOCK = 1 << 18  # frames read at a time from a file of more channels than are kept


def _read_frames(f, frames: int, channels: Optional[str], path: str) -> np.ndarray:
    """`frames` frames of the open soundfile `f` from where it is, as (C', T) float32, every sample
    checked (`check_samples`) and then `channels` applied (`convert_channels`: before resampling,
    fewer channels to filter). A file of more channels than are kept is read in blocks, each
    checked and mixed down (or cut to two) as it comes: an hour of a 6-channel 48 kHz recorder's
    file is 4.1 GB of float32 read whole, where its mono mix is 0.7 GB."""
    keep = {"mono": 1, "stereo": 2, "speakers": 2}.get(channels)
    if keep is None or f.channels <= keep or f.format == "MP3":  # an MP3 in one read: see _MP3_PREROLL
        audio = f.read(frames, dtype="float32", always_2d=True).T  # (C, T)
        check_samples(audio, path)
        return convert_channels(audio, channels, path)
    out = np.empty((keep, frames), dtype=np.float32)  # (C', T)
    got, non_finite, peak = 0, 0, None  # what check_samples finds, over the whole span
    while got < frames:
        block = f.read(min(_READ_BLOCK, frames - got), dtype="float32", always_2d=True).T  # (C, n)
        if block.shape[1] == 0:  # the data end before the header says: the caller sees fewer frames
            break
        if (problem := _sample_problem(block)) is not None:
            non_finite, peak = non_finite + problem[0], max(peak or 0.0, problem[1])
        out[:, got:got + block.shape[1]] = convert_channels(block, channels, path)
        got += block.shape[1]
    if peak is not None:
        _refuse_samples(non_finite, peak, path)
    return out[:, :got]


def load_audio(path: str, sample_rate: int = 16000, channels: Optional[str] = "mono",
               start: int = 0, num_samples: Optional[int] = None) -> np.ndarray:
    """Read an audio file (WAV, FLAC, OGG Vorbis or Opus, MP3, AIFF, ...) as float32 (C, T) at `sample_rate`.

    channels: None keeps the file's own channels; "mono" averages them; "stereo" keeps the first
        two and raises AudioError for a one-channel file; "speakers" keeps at most the first two.
    start, num_samples: the span to read, counted in samples at `sample_rate`; only those frames
        (and, when resampling, 1024 more on each side, or 256 output samples' worth where that is
        more) are decoded, so crops of long files are cheap. Near the end of the file fewer than
        `num_samples` come back; callers pad.
    Raises AudioError naming the file when it cannot be read, or when the span read holds a
    non-finite sample or one beyond MAX_SAMPLE_MAGNITUDE.
    """
    path = str(path)
    if start < 0 or (num_samples is not None and num_samples < 0):
        raise ValueError(f"start and num_samples must be >= 0, got {start}, {num_samples}")
    if not os.path.isfile(path):  # a named pipe, which soundfile's open would wait on for a writer for ever
        raise AudioError(f"cannot read audio file {path}: {_reason(None, path)}")
    try:
        with _open_audio(path) as f:
            rate, total = f.samplerate, f.frames
            _check_rate(rate, path, total)
            if rate == sample_rate:
                lo, offset = min(start, total), 0
                hi = total if num_samples is None else min(start + num_samples, total)
            else:
                # Read from a file frame that falls exactly on an output sample (`block_in` file
                # frames = `block_out` output samples), so a crop is sample-aligned with a full
                # read, and a margin on both sides that the resampler's filter settles in.
                g = math.gcd(rate, sample_rate)
                block_in, block_out = rate // g, sample_rate // g
                margin = max(_RESAMPLE_MARGIN, math.ceil(_RESAMPLE_MARGIN_OUT * rate / sample_rate))  # file frames
                margin_out = math.ceil(margin * sample_rate / rate)
                lo_out = max(start - margin_out, 0) // block_out * block_out
                lo, offset = min(lo_out // block_out * block_in, total), start - lo_out
                hi = total if num_samples is None else \
                    min(math.ceil((start + num_samples) * rate / sample_rate) + margin, total)
            preroll = min(lo, _preroll(f))  # decoded in the same read, dropped
            _skip_frames(f, lo - preroll)
            audio = _read_frames(f, max(hi - lo, 0) + preroll, channels, path)[:, preroll:]  # (C', T)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"cannot read audio file {path}: {_reason(e, path)}") from e
    audio = resample(audio, rate, sample_rate)
    end = None if num_samples is None else offset + num_samples
    audio = audio[:, offset:end]  # drop the margins
    return np.ascontiguousarray(audio, dtype=np.float32)


def save_audio(path: str, audio, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write (C, T) or (T,) audio in [-1, 1] to a WAV (or FLAC, by extension) file, atomically.

    subtype: "PCM_16" (default), "PCM_24" or "FLOAT"; a format that cannot hold it (OGG, MP3) is
    written in its own encoding (Vorbis, MPEG layer III). The data goes to a temporary file in the
    same folder that is then renamed over `path`, so a reader never sees half a file. Audio holding
    NaN or inf is an AudioError naming the file, nothing written (a trainer's samples: a warning).
    """
    path, write = _audio_writer(path, audio, sample_rate, subtype)
    with _write_errors(path, write):
        replace_atomically(path, write.write, suffix=write.ext)


def save_audio_set(paths: Sequence[str], audios: Sequence, sample_rate: int, subtype: str = "PCM_16",
                   ctrl_c: Optional[list] = None) -> None:
    """Write several audio files as one set (complete.py's `--num N` completions), each as
    `save_audio` writes it: all to temporaries beside their paths first, then renamed over them in
    one quick sequence with Ctrl-C and SIGTERM held (`config.stop_signals_held`; a Ctrl-C that came
    is appended to `ctrl_c`). A failure or an interruption while writing removes the temporaries and
    leaves every existing file as it was: never part of this set beside part of an earlier one. The
    temporaries are `replace_atomically`'s (`.NAME.<8 hex>.EXT`): a killed run's are removed by the
    next writer of the same paths (`drop_dead_temporaries`)."""
    writers = [_audio_writer(path, audio, sample_rate, subtype) for path, audio in zip(paths, audios)]
    with ExitStack() as temporaries:  # (on the way out, however it ends: the temporaries not renamed removed)
        staged = []
        for path, write in writers:
            with _write_errors(path, write):
                if is_device(path):  # (/dev/null: written into, never renamed over)
                    write.write(path)
                    continue
                folder, name = os.path.split(os.path.abspath(path))
                drop_dead_temporaries(folder, f".{name}.", write.ext)
                staged.append((temporaries.enter_context(temporary_beside(folder, f".{name}.", write.ext,
                                                                          write.write)), path))
        with stop_signals_held([] if ctrl_c is None else ctrl_c):
            for tmp, path in staged:
                try:
                    os.replace(tmp, path)
                except OSError as e:  # (the folder changed as it was written: the rest are not renamed)
                    raise AudioError(f"cannot write audio file {path}: {os_reason(e)}") from e


class _AudioWrite(NamedTuple):
    """How `save_audio` writes checked audio: `write(file)` writes it in the target's format."""
    audio: np.ndarray
    sample_rate: int
    ext: str
    fmt: str
    subtype: str

    def write(self, file: str) -> None:
        import soundfile as sf
        sf.write(file, self.audio.T, self.sample_rate, subtype=self.subtype, format=self.fmt)


def _audio_writer(path, audio, sample_rate: int, subtype: str) -> tuple[str, _AudioWrite]:
    """(path as a str, its `_AudioWrite`): `save_audio`'s checks of `audio` (its shape; NaN or inf,
    an AudioError naming the file), the format of `path`, the clip of an integer format; the folder
    made."""
    path = str(path)
    if hasattr(audio, "detach"):  # a torch tensor
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise ValueError(f"audio must be (C, T) or (T,), got shape {audio.shape}")
    if not np.isfinite(audio).all():  # the clip below would write NaN as full-scale noise
        raise AudioError(f"cannot write audio file {path}: the audio holds NaN or inf "
                         f"({int((~np.isfinite(audio)).sum())} samples), which it would hold as full-scale noise")
    ext, fmt, subtype = output_format(path, subtype)
    if subtype.startswith("PCM"):
        audio = np.clip(audio, -1.0, 1.0)  # integer formats would wrap around otherwise
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path, _AudioWrite(audio, sample_rate, ext, fmt, subtype)


@contextmanager
def _write_errors(path: str, write: _AudioWrite):
    """A failure of writing `path` (an OSError, libsndfile's error) as the AudioError naming it and
    why (`_write_reason`: a full disk, a file size limit)."""
    try:
        yield
    except Exception as e:
        size = write.audio.size * {"PCM_16": 2, "PCM_24": 3}.get(write.subtype, 4) + 4096  # (a header's margin)
        folder = os.path.dirname(os.path.abspath(path))
        raise AudioError(f"cannot write audio file {path}: {_write_reason(e, folder, size)}") from e


def no_room(folder: str | os.PathLike, nbytes: int) -> Optional[int]:
    """The bytes free on `folder`'s device when they are too few for `nbytes` more (and a margin),
    else None: why a soundfile write failed there, which libsndfile does not say (it drops the errno:
    "System error.", or LibsndfileError(2, ''))."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    return free if free < nbytes + (1 << 16) else None


def _write_reason(e: Exception, folder: str, nbytes: int) -> str:
    """Why writing up to `nbytes` into `folder` failed: libsndfile's "System error." asked of the
    disk (full, or not writable), else of a plain write of as many bytes (`plain_write_error`: a
    file size limit, a disk quota); else what was said. An OSError (the temporary file beside the
    target could not be made: a read-only folder, a full disk) is what the system said, without the
    temporary's name: the error names the file meant."""
    if isinstance(e, OSError):
        reason = os_reason(e)
        if e.errno != errno.ENOSPC:
            return reason
    elif "System error" not in (reason := _reason(e)):
        return reason
    if (free := no_room(folder, nbytes)) is not None:
        return f"no space left on the device ({free} bytes free)"
    if isinstance(e, OSError):
        return reason
    if not os.access(folder, os.W_OK):
        return "permission denied"
    return plain_write_error(folder, nbytes) or reason


def plain_write_error(folder: str | os.PathLike, nbytes: int) -> Optional[str]:
    """What the system says to a plain write of `nbytes` into a temporary file in `folder` (removed
    after), which libsndfile's "System error." leaves out: `File too large (the file size limit,
    ulimit -f, is N bytes)`, `Disk quota exceeded`; None when that write succeeds."""
    import tempfile
    block = bytes(1 << 20)
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            left = nbytes
            while left > 0:
                left -= f.write(block[:min(left, len(block))])
            f.flush()
    except OSError as e:
        why = os_reason(e)
        if e.errno == errno.EFBIG:
            try:
                import resource
                limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            except (ImportError, OSError, ValueError):
                limit = None
            if limit is not None and limit != resource.RLIM_INFINITY:
                why += f" (the file size limit, `ulimit -f`, is {limit} bytes)"
        return why
    return None


def load_prompt(path: str, channels: int, sample_rate: int = 16000, hop: int = 2000,
                max_frames: Optional[int] = None, limit: str = "the model's context") -> np.ndarray:
    """A prompt file for a model of `channels` (1 or 2) channels, as (channels, hop * T) float32.

    Any format `load_audio` reads, resampled to `sample_rate`. One channel: the file's channels
    are averaged. Two channels (speaker 0, speaker 1): a one-channel file is put on both, as the
    original does, and a file with more keeps its first two. The end is cut to whole frames of
    `hop` samples; a prompt longer than `max_frames` frames keeps its last `max_frames` frames,
    with a warning naming what sets them (`limit`), and only those are read from the file (its
    length comes from the header).
    Raises AudioError for unreadable files (non-finite or huge samples in the part kept included)
    and ValueError for a prompt shorter than one frame.
    """
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    file_frames, rate, _ = audio_info(path)
    length = (2 * file_frames * sample_rate + rate) // (2 * rate)  # soxr's output length: rounded half up
    frames = length // hop
    if frames == 0:  # in samples: 1999 of them read "0.125 s long: needs at least 0.125 s"
        held = f"{file_frames} samples at {rate} Hz" + (f", {length} at {sample_rate} Hz" if rate != sample_rate else "")
        raise ValueError(f"{printable(path)} holds {held}: a prompt needs at least {hop} samples at {sample_rate} Hz "
                         f"({hop / sample_rate:.3f} s, one latent)")
    if max_frames is not None and frames > max_frames:
        context = max_frames * hop / sample_rate
        warnings.warn(f"{printable(path)} is {frames * hop / sample_rate:.1f} s long, more than {limit} "
                      f"({context:.1f} s): keeping its last {context:.1f} s", stacklevel=2)
        frames = max_frames
    # Only the span kept is decoded (an hour-long prompt is not read whole for its last minutes).
    audio = load_audio(path, sample_rate, channels="mono" if channels == 1 else None,
                       start=length // hop * hop - frames * hop, num_samples=frames * hop)
    if channels == 2:
        audio = two_speakers(audio, mono="duplicate")
    if audio.shape[1] < frames * hop:  # a header counting more frames than the file holds (a cut-short file)
        raise AudioError(f"cannot read audio file {path}: its header counts {file_frames} frames, but it holds "
                         "fewer (a file cut short?)")
    return audio


def file_problem(path: str) -> Optional[str]:
    """Why `path` is not a file to read ("no such file: PATH", "PATH is a folder, not a file", "PATH
    is not a regular file": a named pipe, whose reading would wait for a writer), or None: the
    scripts' check of the files they are given, before any weights load."""
    if os.path.isfile(path):
        return None
    name = printable(path)  # a newline in a name would make the error two lines
    if os.path.isdir(path):
        return f"{name} is a folder, not a file"
    if os.path.exists(path):
        return f"{name} is not a regular file (a named pipe or a device)"
    if link := broken_link(path):
        return f"{name} is {printable(link)}"
    return f"no such file: {name}"


def check_prompt(path: str, sample_rate: int = 16000, hop: int = 2000, max_frames: Optional[int] = None) -> int:
    """Raise AudioError when a prompt file is missing or a folder (`file_problem`), unreadable as
    audio or shorter than one latent frame (`load_prompt`'s rules: its header, then the samples of
    the last `max_frames` frames, the part a model of that context uses, for non-finite or huge
    values); scripts call it before they load any weights. Returns the frames of it a completion
    starts from (and holds in its output: `completion_problem`'s `prompt_frames`)."""
    if problem := file_problem(path):
        raise AudioError(problem)
    try:
        with warnings.catch_warnings():  # too long for the context: `load_prompt` warns when it is used
            warnings.simplefilter("ignore")
            return load_prompt(path, 1, sample_rate, hop, max_frames).shape[-1] // hop
    except ValueError as e:  # shorter than one frame
        raise AudioError(str(e)) from None


def _subtype_for(fmt: str, subtype: str) -> Optional[str]:
    """`subtype` if the format `fmt` (soundfile's name: "WAV", "OGG") holds it, else the format's
    own (OGG: VORBIS, MP3: MPEG_LAYER_III); None for a format soundfile does not write."""
    import soundfile as sf
    if fmt not in sf.available_formats():
        return None
    return subtype if sf.check_format(fmt, subtype) else sf.default_subtype(fmt)


def output_format(path: str, subtype: str = "PCM_16") -> tuple[str, str, str]:
    """(extension, soundfile format, subtype) an audio file written to `path` gets: the format its
    extension names (a WAV without one: a device such as /dev/null), in `subtype` where the format
    holds it, else in its own encoding (Vorbis, MPEG layer III). An extension naming no format
    soundfile writes keeps `subtype` (sf.write then names the format; `check_output` finds it first)."""
    ext = os.path.splitext(os.path.basename(str(path)))[1].lower() or ".wav"
    if ext in CODEC_EXTENSIONS:  # a container's extension that names its codec too
        return (ext, *CODEC_EXTENSIONS[ext])
    return ext, ext[1:].upper(), _subtype_for(ext[1:].upper(), subtype) or subtype


def _names_no_file(path: str) -> Optional[str]:
    """The error for an output path that names a folder (or nothing), whose name is longer than
    its folder takes, or that soundfile cannot open (`undecodable`), or None."""
    if not os.path.basename(path) or os.path.isdir(path):
        return (f"cannot write {path!r}: {'it names a folder' if path else 'no file name given'}; "
                "name an audio file (out.wav, for example)")
    return name_too_long(path) or undecodable(path, f"cannot write {printable(path)}")


def name_too_long(path: str) -> Optional[str]:
    """The error for an output whose name is longer than its folder takes (the OS's ENAMETOOLONG
    at the write, after the work), or None."""
    length, limit = name_length(os.path.basename(path)), name_max(os.path.dirname(os.path.abspath(path)))
    if length > limit:
        return (f"cannot write {printable(path)}: its name is {length} {NAME_UNITS}, longer than the {limit} its "
                "folder takes; give it a shorter name")
    return None


def undecodable(path: str, what: str) -> Optional[str]:
    """"{what}: ..." when `path` holds bytes that are not valid in the file system's encoding (a
    name made of another encoding's bytes, which Python keeps as surrogates): the OS takes such a
    name, but soundfile encodes names strictly, so the file would fail only when written, after
    the work (a completion generated, a conversation held); None otherwise."""
    encoding = sys.getfilesystemencoding()
    try:
        str(path).encode(encoding)
    except UnicodeEncodeError:
        return f"{what}: its name is not valid {encoding} (soundfile cannot open it); name it in {encoding}"
    return None


def check_output(path: str, keep: Optional[Mapping[str, str]] = None) -> None:
    """Raise AudioError when `save_audio` could not write `path`: no name, a folder, a name longer
    than its folder takes, an extension naming a format soundfile does not write, what
    `check_output_target` refuses (`keep`), or a folder that cannot be made; scripts call it before slow work (the folder is made here)."""
    if problem := _names_no_file(path):
        raise AudioError(problem)
    ext, fmt, _ = output_format(path)
    if _subtype_for(fmt, "PCM_16") is None:
        raise AudioError(f"cannot write {path}: soundfile writes no {ext} files (.wav, .flac or .ogg, for example)")
    check_output_target(path, keep)
    check_output_folder(path)


def check_outputs(paths: Sequence[str], keep: Optional[Mapping[str, str]] = None) -> None:
    """`check_output` for each of `paths` (`completion_paths`: thousands with a large --num), its
    format and folder once for each folder and extension: what is already at each path is checked
    for every one."""
    checked = set()
    for path in paths:
        where = (os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1].lower())
        if where in checked and os.path.basename(path):
            if problem := name_too_long(path):  # (OUT-10.wav is longer than OUT-0.wav)
                raise AudioError(problem)
            check_output_target(path, keep)
        else:
            check_output(path, keep)
            checked.add(where)


def missing_folders(path: str) -> list[str]:
    """The folders above `path` that do not exist yet, deepest first: those `check_output` would
    make, which a caller that then writes nothing takes away (`remove_empty_folders`)."""
    folders, folder = [], os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder) and folder != os.path.dirname(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def remove_empty_folders(folders: Sequence[str]) -> None:
    """Remove `folders` (`missing_folders`: deepest first) up to the first that is not empty, or
    gone: what was written in one since stays."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def completion_paths(out: str, num: int) -> list[str]:
    """The files `num` completions are written to (complete.py, the notebook): `out` itself for
    one; OUT-0.wav, OUT-1.wav, ... for several. An `out` naming a folder is AudioError for several
    as for one (`check_output`): they were written beside it as FOLDER-0.wav, or in it as -0.wav."""
    if num > 1 and (problem := _names_no_file(out)):
        raise AudioError(problem)
    root, ext = os.path.splitext(out)
    return [out] if num == 1 else [f"{root}-{i}{ext or '.wav'}" for i in range(num)]


def check_output_target(path: str, keep: Optional[Mapping[str, str]] = None) -> None:
    """Raise AudioError when `path` is already something an audio file must not be written to: a
    folder, a named pipe (opening it waits for a reader, and soundfile seeks back to write a WAV's
    header), or one of the files of `keep` {what it is: its path}, an input the output would
    replace (by another name or a link too). A device (/dev/null) is written into."""
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise AudioError(f"cannot write {path}: it is a folder")
    if stat.S_ISFIFO(os.stat(path).st_mode):
        raise AudioError(f"cannot write {path}: it is a pipe, and a WAV is written with seeks (its header last); "
                         "name a file")
    for what, other in (keep or {}).items():
        if other and os.path.exists(other) and os.path.samefile(path, other):
            raise AudioError(f"cannot write {path}: it is {what}, which the output would replace; name another file")


def check_output_folder(path: str) -> None:
    """Raise AudioError when the folder `path` goes in cannot be made or written (a file in its
    way, no permission); the folder is made here."""
    make_folder(os.path.dirname(os.path.abspath(path)), f"cannot write {path}")


def make_folder(folder: str, what: str) -> None:
    """Make `folder`, where files will be written, or raise AudioError("{what}: ...") saying why
    it cannot be made or written: a file in its way, a link to nothing, no permission (a file written and removed
    there, `model.files.try_writing_in`)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AudioError(f"{what}: {folder} is a file, not a folder")
    if problem := undecodable(folder, what):  # the files written in it would fail (recordings: each session's)
        raise AudioError(problem)
    if problem := broken_link_above(folder):
        raise AudioError(f"{what}: {problem}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file on the way, a missing or read-only place above it
        raise AudioError(f"{what}: cannot make the folder {folder} ({e.strerror or e})") from None
    try:
        try_writing_in(folder)
    except OSError:
        raise AudioError(f"{what}: the folder {folder} is not writable") from None
