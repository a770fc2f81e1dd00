"""Audio I/O and datasets on real files written with soundfile (no mocks of what is tested)."""
import copy
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import model.audio
from model.audio import SUPPORTED_EXTENSIONS, AudioError, load_audio, save_audio
from model.data import (INDEX_FILENAME, AudioCropDataset, SkippedAudioWarning, infinite_batches,
                        make_loader, scan_audio_folder)
from stale_index import changed_after_the_scan

SR = 16000
WRITE_ARGS = {".wav": {}, ".flac": {}, ".ogg": {"subtype": "VORBIS"}, ".opus": {"format": "OGG", "subtype": "OPUS"},
              ".mp3": {"subtype": "MPEG_LAYER_III"}, ".aif": {"format": "AIFF"}, ".aiff": {},
              ".aifc": {"format": "AIFF", "subtype": "ULAW"}, ".caf": {}, ".au": {}, ".w64": {}, ".rf64": {"format": "RF64"},
              ".oga": {"format": "OGG", "subtype": "VORBIS"}, ".sph": {"format": "NIST"}, ".nist": {"format": "NIST"},
              ".wave": {"format": "WAV"}, ".bwf": {"format": "WAV"}, ".snd": {"format": "AU"}}


def tone(seconds, rate=SR, freq=440.0, amplitude=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)  # (T,)


def write(path, audio, rate=SR, **kwargs):
    """audio (C, T) or (T,) -> file; returns the path as a string."""
    audio = np.asarray(audio, dtype=np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(str(path), audio.T if audio.ndim == 2 else audio, rate, **kwargs)
    return str(path)


def skipped_names(record):
    return [str(w.message) for w in record if issubclass(w.category, SkippedAudioWarning)]


# --- model/audio.py ----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_reads_every_supported_format(tmp_path, ext):
    x = tone(1.0)
    try:
        path = write(tmp_path / f"tone{ext}", x, **WRITE_ARGS[ext])
    except Exception as e:  # an old libsndfile without an MP3 encoder
        pytest.skip(f"this libsndfile cannot write {ext}: {e}")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.shape[0] == 1
    assert abs(y.shape[1] - len(x)) <= 1200  # lossy codecs may pad a frame
    n = min(y.shape[1], len(x))
    assert np.corrcoef(x[:n], y[0, :n])[0, 1] > 0.99
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedAudioWarning)  # not named as a format left out either
        assert [(os.path.basename(f.path), f.frames) for f in scan_audio_folder(tmp_path)] == [(f"tone{ext}", y.shape[1])]


def test_uppercase_extension_and_nested_folders_are_scanned(tmp_path):
    write(tmp_path / "a" / "b" / "LOUD.WAV", tone(0.5))
    write(tmp_path / "c.Flac", tone(0.5))
    (tmp_path / "notes.txt").write_text("not audio")
    files = scan_audio_folder(tmp_path)
    found = [os.path.relpath(f.path, tmp_path) for f in files]
    assert found == [os.path.join("a", "b", "LOUD.WAV"), "c.Flac"]


def test_opus_files_by_their_own_extension_are_scanned_and_read(tmp_path):
    """Ogg Opus files named .opus (Multilingual LibriSpeech ships its audio so) were not listed: a
    corpus of them was "no audio files", and among other files they were left out unsaid."""
    try:
        write(tmp_path / "talk" / "a.opus", tone(1.0, rate=48000, freq=300.0), 48000, format="OGG", subtype="OPUS")
    except Exception as e:  # an old libsndfile without Opus
        pytest.skip(f"this libsndfile cannot write Opus: {e}")
    write(tmp_path / "b.wav", tone(0.5))
    files = scan_audio_folder(tmp_path)
    assert [os.path.relpath(f.path, tmp_path) for f in files] == ["b.wav", os.path.join("talk", "a.opus")]
    dataset = AudioCropDataset(tmp_path / "talk", segment_seconds=0.5, train=False)
    crop = dataset[0]
    assert crop["mask"].sum() == 8000 and crop["audio"].abs().max() > 0.3  # the tone, at 16 kHz


def test_audio_named_by_another_extension_of_its_container_is_read_and_other_files_named(tmp_path):
    """A Broadcast WAV (.bwf: a field recorder's), a WAV named .wave and an AU named .snd, which
    soundfile reads, were left out of a folder scan without a word, and so was a WAV without an
    extension. Now the first three are read, and audio files left out for their name (a WAV without
    an extension, or with a backup's) are named in one warning; hidden files are not, nor text and
    other files beside the audio: a LibriSpeech-like folder (transcripts, README, LICENSE) has no note,
    where each of its runs had one naming them."""
    write(tmp_path / "a.wav", tone(0.5))
    write(tmp_path / "field.bwf", tone(0.5), format="WAV")
    write(tmp_path / "take.wave", tone(0.5), format="WAV")
    write(tmp_path / "old.snd", tone(0.5), format="AU")
    write(tmp_path / "talk" / "noext", tone(0.5), format="WAV")
    write(tmp_path / "a.wav.bak", tone(0.5), format="WAV")
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "LICENSE").write_text("not audio either")
    (tmp_path / ".DS_Store").write_bytes(b"hidden")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(tmp_path)
    assert [(os.path.basename(f.path), f.frames) for f in files] == [
        ("a.wav", 8000), ("field.bwf", 8000), ("old.snd", 8000), ("take.wave", 8000)]
    assert skipped_names(record) == [
        f"leaving out 2 audio files in {tmp_path} whose names end in none of the audio extensions it reads "
        f"({', '.join(SUPPORTED_EXTENSIONS)}): a.wav.bak, {os.path.join('talk', 'noext')}; each is read once named "
        "with its format's extension"]
    libri = tmp_path / "LibriSpeech" / "dev-clean"
    for name in ("19-198-0001.flac", "19-198-0002.flac"):
        write(libri / "19" / "198" / name, tone(0.5))
    (libri / "19" / "198" / "19-198.trans.txt").write_text("19-198-0001 A LINE\n19-198-0002 ANOTHER\n")
    (libri / "README.TXT").write_text("LibriSpeech")
    (libri / "LICENSE").write_text("CC BY 4.0")
    (libri / "SPEAKERS.TXT").write_text("19 | F | dev-clean")
    (libri / "metadata.csv").write_text("19-198-0001|a line\n")  # (LJSpeech's)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert len(scan_audio_folder(libri)) == 2
    assert skipped_names(record) == []


def test_audio_files_of_other_formats_are_named_as_left_out(tmp_path):
    """Phone recordings (.m4a, AAC, which soundfile cannot read) in a corpus folder beside WAVs
    were left out without a word: the run trained on part of the corpus. They are named in one
    warning, and a folder of them alone says so in its error."""
    write(tmp_path / "a.wav", tone(0.5))
    for name in ("memo.m4a", os.path.join("calls", "b.AAC"), "notes.txt", ".hidden.m4a"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"not read")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["a.wav"] and files.skipped == []
    assert skipped_names(record)[0] == (
        f"skipping 2 audio files in {tmp_path} of other formats (only {', '.join(SUPPORTED_EXTENSIONS)} are read; "
        f"convert them, e.g. `ffmpeg -i IN OUT.flac`): {os.path.join('calls', 'b.AAC')}, memo.m4a")
    assert len(skipped_names(record)) == 1  # notes.txt is not audio: not named
    os.remove(tmp_path / "a.wav")
    with pytest.warns(SkippedAudioWarning), pytest.raises(FileNotFoundError) as e:
        scan_audio_folder(tmp_path)
    assert f"audio folder {tmp_path} has no audio files it reads (2 of other formats left out, named above)" \
        in str(e.value)


def test_hidden_files_and_folders_below_the_corpus_folder_are_left_out(tmp_path):
    """A corpus folder that is a git checkout, a notebook folder or a cache holds `.git/`,
    `.ipynb_checkpoints/`, `.cache/`: their audio (stale copies, checkpoints of a notebook's
    outputs) was trained on. Only entries below the named folder are filtered: a corpus that
    itself lives under a hidden folder is scanned as usual."""
    root = tmp_path / ".cache" / "corpus"  # the named folder may sit under a hidden one
    write(root / "a.wav", tone(0.5))
    write(root / "talks" / "b.wav", tone(0.5))
    for hidden in (".git/objects/x.wav", ".ipynb_checkpoints/a-checkpoint.wav", "talks/.cache/c.wav",
                   ".trash/d.flac", "talks/.e.wav"):
        write(root / hidden, tone(0.5))
    files = scan_audio_folder(root)
    assert [os.path.relpath(f.path, root) for f in files] == ["a.wav", os.path.join("talks", "b.wav")]
    assert files.skipped == []
    hidden_root = tmp_path / ".corpus"  # named by the user: used even though it is hidden
    write(hidden_root / "f.wav", tone(0.5))
    assert [os.path.basename(f.path) for f in scan_audio_folder(hidden_root)] == ["f.wav"]


@pytest.mark.parametrize("rate", [44100, 22050])
def test_resampling_to_16k_gives_the_right_length_and_pitch(tmp_path, rate):
    path = write(tmp_path / "x.wav", tone(1.5, rate=rate, freq=1000.0), rate)
    y = load_audio(path, sample_rate=SR)[0]
    assert len(y) == int(1.5 * SR)
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) * SR / len(y) == pytest.approx(1000.0, abs=2.0)


def test_cropped_read_equals_the_slice_of_a_full_read(tmp_path):
    rng = np.random.default_rng(0)
    path = write(tmp_path / "noise.wav", rng.uniform(-0.5, 0.5, 44100 * 2).astype(np.float32), 44100)
    full = load_audio(path)
    crop = load_audio(path, start=5000, num_samples=4000)
    assert crop.shape == (1, 4000)
    # read from a sample-aligned frame with a margin, a crop has no resampler edge effects
    np.testing.assert_allclose(crop, full[:, 5000:9000], atol=1e-5)
    tail = load_audio(path, start=full.shape[1] - 100, num_samples=4000)
    assert tail.shape == (1, 100)  # the end of the file: fewer samples, the caller pads


@pytest.mark.parametrize("rate", [44100, 352800, 768000])
def test_a_crop_of_a_high_rate_file_equals_the_slice_of_a_full_read(tmp_path, rate):
    """Resampling a crop read 1024 file frames either side of it, shorter than soxr's filter from
    352.8 kHz down (DXD and DSD-converted masters): crop edges 1e-4 to 9e-4 off a whole read."""
    rng = np.random.default_rng(0)
    t = np.arange(int(0.5 * rate)) / rate
    path = write(tmp_path / "hi.wav", (0.3 * np.sin(2 * np.pi * 330 * t) + 0.01 * rng.standard_normal(t.size)), rate)
    full = load_audio(path)
    for start in (777, 5000):
        np.testing.assert_allclose(load_audio(path, start=start, num_samples=2000), full[:, start:start + 2000],
                                   atol=1e-5, err_msg=str(start))


def _mp3(path, audio, rate):
    try:
        return write(path, audio, rate, subtype="MPEG_LAYER_III")
    except Exception as e:  # an old libsndfile without an MP3 encoder
        pytest.skip(f"this libsndfile cannot write MP3: {e}")


def test_an_mp3_is_read_alike_whole_in_crops_and_mixed_down(tmp_path):
    """soundfile seeks after every read (to where it already is), and in an MP3 a seek restarts
    mpg123's decoder: the ~0.3 s after it were not the file's (off by up to 0.36, full scale 1).
    A stereo MP3 mixed to mono as read block by block (2**18 frames) had such a gap every 6 s, and
    every crop of an MP3 began with one: what a corpus of podcasts trained on."""
    rate = 44100
    t = np.arange(9 * rate) / rate  # 396,900 frames: more than one block of the mix-down
    gate = (t % 3 < 2)  # pauses of digital silence
    # (tones and silence: frames that lean on the bit reservoir, what a restarted decoder lacks; with
    # broadband noise throughout, no gap showed)
    x = np.stack([0.3 * np.sin(2 * np.pi * (200 + 100 * np.sin(t)) * t) * gate,
                  0.2 * np.sin(2 * np.pi * 330 * t) * gate]).astype(np.float32)
    path = _mp3(tmp_path / "talk.mp3", x, rate)
    both = load_audio(path, rate, channels=None)
    assert both.shape[0] == 2 and abs(both.shape[1] - x.shape[1]) <= 1152
    for c in range(2):  # the recording itself (encoder delay removed by its LAME tag), not gaps
        n = min(both.shape[1], x.shape[1])
        assert np.abs(both[c, :n] - x[c, :n]).max() < 0.1, c
    np.testing.assert_allclose(load_audio(path, rate), both.mean(axis=0, keepdims=True), atol=1e-6)
    for start in (5, 100_000, 262_144 - 3000, 300_001):
        for sample_rate, whole in ((rate, both), (SR, load_audio(path, SR, channels=None))):
            s = start * sample_rate // rate
            crop = load_audio(path, sample_rate, channels=None, start=s, num_samples=12_000)
            np.testing.assert_allclose(crop, whole[:, s:s + 12_000], atol=1e-5, err_msg=f"{sample_rate} {s}")


def _first_frame_bytes(mp3: bytes) -> int:
    """The length of the MPEG layer III frame at the start of `mp3` (ISO 11172-3, 13818-3)."""
    mpeg1 = (mp3[1] >> 3) & 3 == 3
    kbits = ((0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320) if mpeg1 else
             (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160))[mp3[2] >> 4]
    rates = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}[(mp3[1] >> 3) & 3]
    rate = rates[(mp3[2] >> 2) & 3]
    return (144 if mpeg1 else 72) * kbits * 1000 // rate + ((mp3[2] >> 1) & 1)


@pytest.mark.parametrize("rate, channels", [(SR, 1), (44100, 2)])
def test_a_vbr_mp3_without_a_length_header_is_read_whole(tmp_path, rate, channels):
    """libsndfile takes a VBR MP3's length from its Xing/Info header; without one (some encoders
    and stream rippers write none) it estimates it from the first frame's bitrate and stops there:
    20 s read as 5 s, silently, by the scan, the trainers and the prompts alike. (The stereo file
    is joint stereo: its frames' mode bits vary, its stream does not.)"""
    rng = np.random.default_rng(1)
    t = np.arange(20 * rate) / rate
    x = (0.3 * np.sin(2 * np.pi * (200 + 100 * np.sin(t)) * t) * (t % 4 < 2)
         + 0.05 * rng.standard_normal(t.size) * (t % 4 >= 2)).astype(np.float32)  # tone, then noise: a VBR stream
    x = np.stack([x, 0.5 * np.roll(x, 100)][:channels])
    with_header = Path(_mp3(tmp_path / "with_header.mp3", x, rate)).read_bytes()
    assert with_header[:2] in (b"\xff\xfb", b"\xff\xf3") and b"Xing" in with_header[:64]  # its first frame: the header
    audio = with_header[_first_frame_bytes(with_header):]
    tag = b"ID3\x04\x00\x00" + bytes((0, 0, 0, 20)) + bytes(20)  # an ID3v2 tag of 20 bytes before the audio
    reference = load_audio(tmp_path / "with_header.mp3", rate, channels=None)  # the same frames, from the intact file
    for name, data in (("bare.mp3", audio), ("tagged.mp3", tag + audio)):
        path = tmp_path / name
        path.write_bytes(data)
        with sf.SoundFile(str(path)) as f:
            assert f.frames < x.shape[1] // 2  # what libsndfile estimates: the case at hand
        frames, file_rate, file_channels = model.audio.audio_info(str(path))
        y = load_audio(path, rate, channels=None)
        assert (file_rate, file_channels) == (rate, channels) and y.shape == (channels, frames), name
        assert frames >= x.shape[1], name
        delay = next(d for d in range(3000) if np.abs(y[:, d:d + 2000] - reference[:, :2000]).max() < 1e-6)
        np.testing.assert_allclose(y[:, delay:delay + reference.shape[1]], reference, atol=1e-6)
        start = int(rate * 15.6)  # past the estimated end
        crop = load_audio(path, rate, channels=None, start=start, num_samples=8000)
        np.testing.assert_allclose(crop, y[:, start:start + 8000], atol=1e-6)
        assert load_audio(path).shape[1] >= 20 * SR - 1  # mono at 16 kHz, as the trainers read it


def test_an_mp3_is_read_to_its_last_frame_after_padding_and_as_far_as_its_header_counts(tmp_path, monkeypatch):
    """The frames of a VBR MP3 without a Xing header were counted only where its first frame came
    right after its ID3 tags: 64 bytes of padding between them, and 20 s read as libsndfile's 4.8 s
    estimate; it is read to its last frame. A file whose first frame is a Xing/Info header (after
    padding too) is left to libsndfile, its first few KB read, where every MP3 was walked frame by
    frame (~0.1 s a crop of a 20-minute file): its header is believed, so two MP3s joined end to end
    (`cat a.mp3 b.mp3`) read as far as the first's header counts, as libsndfile reads them."""
    rate = 44100
    t = np.arange(20 * rate) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (t % 2 < 1)
         + 0.02 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)  # tone and noise: VBR
    with_header = Path(_mp3(tmp_path / "with_header.mp3", x, rate)).read_bytes()
    audio = with_header[_first_frame_bytes(with_header):]  # its frames, without the Xing frame
    tag = b"ID3\x03\x00\x00" + bytes((0, 0, 0, 20)) + bytes(20)
    padded, joined = tmp_path / "padded.mp3", tmp_path / "joined.mp3"
    padded.write_bytes(tag + bytes(64) + audio)
    joined.write_bytes(tag + bytes(64) + with_header + tag + with_header)  # (a tag between them, as taggers leave one)
    reference = load_audio(tmp_path / "with_header.mp3", rate)  # (1, T): its encoder delay trimmed (LAME tag)
    y = load_audio(padded, rate)
    assert model.audio.audio_info(str(padded))[0] == y.shape[1] >= x.size
    delay = next(d for d in range(3000) if np.abs(y[:, d:d + 2000] - reference[:, :2000]).max() < 1e-6)
    np.testing.assert_allclose(y[:, delay:delay + reference.shape[1]], reference, atol=1e-6)
    walked = []
    monkeypatch.setattr(model.audio, "_mp3_stream", lambda *a: walked.append(a) or None)
    y = load_audio(joined, rate)
    assert model.audio.audio_info(str(joined))[0] == y.shape[1] == reference.shape[1] and not walked
    np.testing.assert_allclose(y, reference, atol=1e-6)


@pytest.mark.parametrize("stray", ["xing-cut", "header"])
def test_stray_bytes_after_a_header_less_mp3_are_no_frame(tmp_path, stray):
    """The frames of an MP3 without a Xing header are counted; a few stray bytes after its last
    frame that begin as a frame (the start of another file's Xing frame, cut inside its tag: an
    'mmap index out of range' error; a frame header and a few bytes) were counted as one more frame,
    which the file does not hold. A frame that runs past the end of the file ends the stream: the
    file reads as without them."""
    rate = 44100
    t = np.arange(10 * rate) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (t % 2 < 1)
         + 0.02 * np.random.default_rng(2).standard_normal(t.size)).astype(np.float32)  # tone and noise: VBR
    with_header = Path(_mp3(tmp_path / "with_header.mp3", x, rate)).read_bytes()
    first = _first_frame_bytes(with_header)
    audio = with_header[first:]  # its frames, without the Xing frame
    tail = with_header[:with_header.index(b"Xing") + 6] if stray == "xing-cut" else audio[:4] + bytes(10)
    (tmp_path / "bare.mp3").write_bytes(audio)
    (tmp_path / "stray.mp3").write_bytes(audio + tail)
    reference = load_audio(tmp_path / "bare.mp3", rate)
    assert reference.shape[1] >= x.size
    assert model.audio.audio_info(str(tmp_path / "stray.mp3"))[0] == reference.shape[1]
    np.testing.assert_allclose(load_audio(tmp_path / "stray.mp3", rate), reference, atol=1e-6)


def _ogg(path, audio, rate, subtype="VORBIS"):
    try:
        return write(path, audio, rate, format="OGG", subtype=subtype)
    except Exception as e:  # an old libsndfile without Opus
        pytest.skip(f"this libsndfile cannot write Ogg {subtype}: {e}")


@pytest.mark.parametrize("second", ["VORBIS", "OPUS"])
def test_a_chained_ogg_is_read_whole_in_crops_and_mixed_down(tmp_path, second):
    """An Ogg file of streams one after another (a stream recorder's, at each change of track or
    encoder; `cat a.ogg b.ogg`) was read as its first stream only, by the scan, the trainers and the
    prompts: 3 s of 6.5, silently. (The second link of another codec: Opus after Vorbis.)"""
    rate = 48000
    a = np.stack([tone(3.0, rate, 200.0, 0.3), tone(3.0, rate, 250.0, 0.2)])
    b = np.stack([tone(3.5, rate, 300.0, 0.3), tone(3.5, rate, 350.0, 0.2)])
    first, then = _ogg(tmp_path / "a" / "a.ogg", a, rate), _ogg(tmp_path / "b" / "b.ogg", b, rate, second)
    parts = [load_audio(p, rate, channels=None) for p in (first, then)]
    path = tmp_path / "corpus" / "radio.ogg"
    os.makedirs(path.parent)
    path.write_bytes(Path(first).read_bytes() + Path(then).read_bytes())
    with sf.SoundFile(str(path)) as f:
        assert f.frames == parts[0].shape[1]  # what libsndfile counts: the case at hand
    assert [link[:2] for link in model.audio.ogg_links(str(path))] == \
        [(0, os.path.getsize(first)), (os.path.getsize(first), path.stat().st_size)]
    assert [link[:2] for link in model.audio.ogg_links(first)] == [(0, os.path.getsize(first))]
    frames = parts[0].shape[1] + parts[1].shape[1]
    assert model.audio.audio_info(str(path)) == (frames, rate, 2)
    both = load_audio(path, rate, channels=None)
    np.testing.assert_array_equal(both, np.concatenate(parts, axis=1))  # each link as read alone, joined
    np.testing.assert_allclose(load_audio(path, rate), both.mean(axis=0, keepdims=True), atol=1e-6)
    whole = load_audio(path)  # mono at 16 kHz, as the trainers read it
    assert whole.shape[1] == frames // 3
    for start in (0, 40_000, parts[0].shape[1] // 3 - 1000, 60_000):  # within a link and across the join
        np.testing.assert_allclose(load_audio(path, start=start, num_samples=5000), whole[:, start:start + 5000],
                                   atol=1e-5, err_msg=str(start))
        s = start * 3
        np.testing.assert_array_equal(load_audio(path, rate, channels=None, start=s, num_samples=15_000),
                                      both[:, s:s + 15_000], err_msg=str(s))
    assert load_audio(path, rate, channels=None, start=frames - 100).shape == (2, 100)
    files = scan_audio_folder(path.parent)
    assert [(os.path.basename(f.path), f.frames, f.sample_rate) for f in files] == [("radio.ogg", frames, rate)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model.audio, "_READ_BLOCK", 10_000)  # the mix-down block by block, across the join
        np.testing.assert_allclose(load_audio(path, rate), both.mean(axis=0, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("rate, channels", [(SR, 1), (44100, 2)])
def test_a_vorbis_crop_in_its_last_page_is_the_files(tmp_path, rate, channels):
    """libsndfile's seek to a frame inside a Vorbis stream's last page (up to ~1.5 s of audio) gave
    samples that were not the file's (off by up to 0.3): every crop that began there."""
    rng = np.random.default_rng(2)
    t = np.arange(int(6.3 * rate)) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t)) * t) + 0.02 * rng.standard_normal(t.size),
                  0.2 * np.sin(2 * np.pi * 330 * t)][:channels]).astype(np.float32)
    path = _ogg(tmp_path / "talk.ogg", x, rate)
    whole = load_audio(path, rate, channels=None)
    link, = model.audio.ogg_links(path)
    assert 0 < link.vorbis_tail < whole.shape[1] - 1000
    with sf.SoundFile(path) as f:  # the case at hand
        f.seek(whole.shape[1] - 1000)
        assert np.abs(f.read(1000, dtype="float32", always_2d=True).T - whole[:, -1000:]).max() > 1e-3
    for start in (link.vorbis_tail - 5, link.vorbis_tail, link.vorbis_tail + 1, whole.shape[1] - 1000):
        np.testing.assert_array_equal(load_audio(path, rate, channels=None, start=start, num_samples=700),
                                      whole[:, start:start + 700], err_msg=str(start))
    mono = load_audio(path)
    np.testing.assert_allclose(load_audio(path, start=mono.shape[1] - 500, num_samples=400), mono[:, -500:-100],
                               atol=1e-5)


@pytest.mark.parametrize("rate", [SR, 24000])
def test_an_opus_crop_is_the_files(tmp_path, rate):
    """libsndfile's Opus decoder after a seek needs up to ~1 s to give the file's samples again where
    the encoder ran its speech modes (low-rate mono): crops began off by up to 0.04 (full scale 1)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(7.3 * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t)) * t) * (t % 2 < 1.4)  # a tone in pauses of faint noise
         + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    path = _ogg(tmp_path / "talk.opus", x, rate, "OPUS")
    whole = load_audio(path, rate)
    starts = rng.integers(rate, whole.shape[1] - 1000, 60)
    off = []
    for start in starts:  # the case at hand: a plain seek in the file freshly opened, as a crop is read
        with sf.SoundFile(path) as f:
            f.seek(start)
            off.append(np.abs(f.read(600, dtype="float32") - whole[0, start:start + 600]).max())
    assert max(off) > 1e-3
    for start in starts:
        np.testing.assert_array_equal(load_audio(path, rate, start=start, num_samples=600),
                                      whole[:, start:start + 600], err_msg=str(start))


def test_a_chained_ogg_of_two_sample_rates_is_refused_by_name(tmp_path):
    """One signal cannot be at two rates: such a file is skipped and named, not read in part."""
    first = _ogg(tmp_path / "parts" / "a.ogg", tone(1.0, 16000), 16000)
    then = _ogg(tmp_path / "parts" / "b.ogg", tone(1.0, 44100), 44100)
    path = tmp_path / "corpus" / "mixed.ogg"
    os.makedirs(path.parent)
    path.write_bytes(Path(first).read_bytes() + Path(then).read_bytes())
    with pytest.raises(AudioError) as e:
        load_audio(path)
    assert str(e.value) == (f"cannot read audio file {path}: its 2 chained Ogg streams differ in sample rate or "
                            "channels (16000 Hz x 1, 44100 Hz x 1); convert it to one stream, e.g. "
                            "`ffmpeg -i IN OUT.flac`")
    write(tmp_path / "corpus" / "ok.wav", tone(1.0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(path.parent)
    assert [os.path.basename(f.path) for f in files] == ["ok.wav"]
    assert any("mixed.ogg" in message and "chained Ogg streams" in message for message in skipped_names(record))


@pytest.mark.parametrize("subtype", ["GSM610", "G721_32", "NMS_ADPCM_32"])
def test_wavs_of_encodings_libsndfile_cannot_seek_in_are_read_whole_and_cropped(tmp_path, subtype):
    """Telephony WAVs (GSM 6.10, G.721, NMS ADPCM: call-centre and voicemail recordings) cannot
    be seeked in by libsndfile, not even to frame 0: every read of one failed ("Seek attempted on
    unseekable file type") and the file was skipped by the trainers and refused as a prompt."""
    x = tone(2.0, rate=8000, freq=300.0, amplitude=0.3)
    path = write(tmp_path / "call.wav", x, 8000, subtype=subtype)
    full = load_audio(path, sample_rate=8000)
    n = min(full.shape[1], len(x))
    assert n >= len(x) - 400 and np.corrcoef(x[:n], full[0, :n])[0, 1] > 0.95  # the call, decoded
    crop = load_audio(path, sample_rate=8000, start=5000, num_samples=3000)  # the frames before it read and dropped
    np.testing.assert_array_equal(crop, full[:, 5000:8000])
    resampled = load_audio(path, start=10000, num_samples=4000)  # at 16 kHz: from a frame that is not 0
    np.testing.assert_allclose(resampled, load_audio(path)[:, 10000:14000], atol=1e-5)
    dataset = AudioCropDataset(tmp_path, segment_seconds=0.5, train=True)
    assert len(dataset.files) == 1 and dataset.files.skipped == []
    assert dataset[0]["mask"].sum() == 8000


def test_a_flac_whose_header_lacks_its_length_is_skipped_naming_why(tmp_path, capfd):
    """A FLAC written to a pipe (`ffmpeg ... -f flac - > x.flac`) has no total in its STREAMINFO;
    soundfile counts 2**63 - 1 frames in it, and seeks in it fail. The scan took that length: a
    training epoch of 10**14 crops, whose sampler could not be allocated (a traceback), and every
    crop drawn from it. It is skipped, naming why, as a prompt is refused."""
    corpus = tmp_path / "corpus"
    write(corpus / "a.wav", tone(1.0))
    flac = bytearray(Path(write(corpus / "piped.flac", tone(1.0, rate=44100), 44100)).read_bytes())
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # the first metadata block is STREAMINFO, at byte 8
    flac[8 + 13] &= 0xF0  # its 36-bit total of samples: 0, "unknown"
    flac[8 + 14:8 + 18] = bytes(4)
    (corpus / "piped.flac").write_bytes(flac)
    why = (f"cannot read audio file {corpus / 'piped.flac'}: its header does not say how long it is (a FLAC "
           "written to a pipe?)")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = AudioCropDataset(corpus, segment_seconds=0.5, train=True)
    assert [os.path.basename(f.path) for f in dataset.files] == ["a.wav"] and dataset.files.skipped == ["piped.flac"]
    assert any(why in message for message in skipped_names(record)), skipped_names(record)
    assert len(dataset) == 2 and dataset[0]["mask"].sum() == 8000
    with pytest.raises(AudioError, match=re.escape(why)):
        load_audio(corpus / "piped.flac")  # the client's --input-wav
    with pytest.raises(AudioError, match=re.escape(why)):
        model.audio.check_prompt(str(corpus / "piped.flac"))  # complete.py's prompt, the server's --prompt-path


def test_a_multichannel_file_is_mixed_down_as_it_is_read_not_held_whole(tmp_path):
    """A 6-channel 48 kHz recording was read whole at its own width before being mixed to mono:
    an hour of it is 4.1 GB of float32 (the latent encoding, the codec's preload and the client
    read files whole), six times its mix. It is mixed down block by block as read: the same
    samples, the peak memory of the mix, and a NaN anywhere still refuses it, counted in full."""
    import tracemalloc
    import soxr
    rng = np.random.default_rng(0)
    seconds, rate = 30, 48000
    x = (0.3 * rng.standard_normal((seconds * rate, 6))).clip(-1, 1).astype(np.float32)  # (T, 6)
    path = write(tmp_path / "recorder.wav", x.T, rate, subtype="FLOAT")
    tracemalloc.start()
    try:
        mono = load_audio(path, channels="mono")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = x.nbytes  # 34.6 MB, read at once before (and its magnitudes, checked: 69 MB at the peak)
    assert peak < whole, f"peak {peak / 1e6:.1f} MB for a file of {whole / 1e6:.1f} MB of samples"
    expected = soxr.resample(x.mean(axis=1), rate, SR, quality="HQ")
    np.testing.assert_allclose(mono[0], expected, atol=1e-5)
    stereo = load_audio(path, channels="stereo", start=SR * 10, num_samples=SR)
    np.testing.assert_allclose(stereo, load_audio(path, channels=None)[:2, SR * 10:SR * 11], atol=1e-5)
    x[5, 2] = x[rate * 20, 4] = np.nan  # in two blocks of the read
    write(tmp_path / "recorder.wav", x.T, rate, subtype="FLOAT")
    with pytest.raises(AudioError, match="2 non-finite samples"):
        load_audio(path, channels="mono")


def test_a_flac_cut_short_is_named_as_such_when_skipped(tmp_path):
    """A FLAC cut short (an interrupted copy or download) failed with libsndfile's own words,
    "Error : flac decoder lost sync." or "Internal psf_fseek() failed.", which name no cause a
    user would recognise; the reason now says what the file probably is."""
    x = np.random.default_rng(0).uniform(-0.5, 0.5, SR * 6).astype(np.float32)
    data = Path(write(tmp_path / "corpus" / "talk.flac", x)).read_bytes()
    (tmp_path / "corpus" / "talk.flac").write_bytes(data[:len(data) // 3])
    write(tmp_path / "corpus" / "ok.wav", tone(1.0))
    with pytest.raises(AudioError, match=re.escape("(a file cut short, or damaged?)")):
        load_audio(tmp_path / "corpus" / "talk.flac")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = AudioCropDataset(tmp_path / "corpus", segment_seconds=0.5, train=False, preload_max_gb=1.0)
        [dataset[i] for i in range(len(dataset))]
    (skipped,) = [m for m in skipped_names(record) if "talk.flac" in m]
    assert skipped.endswith("(a file cut short, or damaged?)"), skipped


def test_a_file_named_mp3_that_is_not_one_is_named_so(tmp_path):
    """A web page saved as episode.mp3 (a failed download) or random bytes under that name were
    skipped, and refused as a prompt or --input-wav, as libsndfile's "File does not exist or is
    not a regular file (possibly a pipe?)", of a file that is there. (mpg123 may write notes of its
    own to stderr around that line, "Note: Illegal Audio-MPEG-Header ...": they are let be.)"""
    corpus = tmp_path / "corpus"
    write(corpus / "ok.wav", tone(1.0))
    (corpus / "episode.mp3").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    (corpus / "noise.mp3").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    for name in ("episode.mp3", "noise.mp3"):
        why = (f"cannot read audio file {corpus / name}: format not recognised: it is not MP3 audio, as its extension "
               "says (a web page, or a file of another format, saved under that name?)")
        with pytest.raises(AudioError, match=re.escape(why)):
            load_audio(corpus / name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(corpus, use_cache=False)
    assert sorted(files.skipped) == ["episode.mp3", "noise.mp3"] and len(skipped_names(record)) == 2


def test_an_mp3_cut_short_inside_its_id3_tag_is_named_so(tmp_path):
    """An MP3 whose ID3 tag holds 300 KB of cover art, cut at 150 KB (an interrupted download),
    was refused as "not MP3 audio, as its extension says (a web page ...?)": it is said to end
    inside its tags, cut short."""
    talk = Path(_mp3(tmp_path / "talk.mp3", tone(2.0), SR)).read_bytes()
    size = 300_000
    tag = b"ID3\x03\x00\x00" + bytes((size >> 21 & 127, size >> 14 & 127, size >> 7 & 127, size & 127))
    art = tag + b"APIC" + (size - 10).to_bytes(4, "big") + bytes(2) + np.random.default_rng(3).integers(
        0, 256, size - 10, dtype=np.uint8).tobytes()  # a frame of cover art filling the tag
    (tmp_path / "whole.mp3").write_bytes(art + talk)
    (tmp_path / "cut.mp3").write_bytes((art + talk)[:150_000])
    assert load_audio(tmp_path / "whole.mp3").shape[1] >= 2 * SR
    why = (f"cannot read audio file {tmp_path / 'cut.mp3'}: it ends inside its ID3 tags (150000 bytes of the 300010 "
           "they give, before any audio: a file cut short, by an interrupted copy or download?)")
    with pytest.raises(AudioError, match=re.escape(why)):
        load_audio(tmp_path / "cut.mp3")
    with pytest.raises(AudioError, match=re.escape(why)):
        model.audio.audio_info(str(tmp_path / "cut.mp3"))


def test_what_others_write_to_stderr_while_an_mp3_is_read_reaches_it(tmp_path, capfd, monkeypatch):
    """While an MP3 was opened or read, fd 2 was a temporary file, to keep mpg123's notes out of
    the one line a bad file is refused with: lines that anyone else wrote then (another thread, a
    child process) beginning "Note: " or "Warning: " were dropped, the rest delayed, and a child
    started meanwhile kept the file as its stderr. fd 2 is left alone."""
    path = _mp3(tmp_path / "talk.mp3", tone(2.0), SR)
    opened = model.audio._open_audio

    def open_and_say(*args):  # what another thread writes while the file is opened
        os.write(2, b"Warning: another thread's line\n")
        return opened(*args)

    monkeypatch.setattr(model.audio, "_open_audio", open_and_say)
    capfd.readouterr()
    load_audio(path)
    model.audio.audio_info(str(path))
    assert capfd.readouterr().err.count("Warning: another thread's line\n") == 2


def test_a_file_of_0_bytes_is_named_as_empty(tmp_path):
    """A .wav of 0 bytes (a download that failed, a `touch`) was skipped, and refused as a prompt or
    --input-wav, as "Format not recognised.": it is said to be empty."""
    write(tmp_path / "a.wav", tone(0.5))
    (tmp_path / "failed_download.wav").write_bytes(b"")
    why = f"cannot read audio file {tmp_path / 'failed_download.wav'}: it is empty (0 bytes)"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(tmp_path, use_cache=False)
    assert files.skipped == ["failed_download.wav"] and skipped_names(record) == [f"skipping unreadable audio: {why}"]
    with pytest.raises(AudioError, match=re.escape(why)):
        load_audio(tmp_path / "failed_download.wav")


def test_two_speakers_of_a_multichannel_file_are_cut_as_read_not_held_whole(tmp_path):
    """For a duplex model (two speakers, the first two channels) a 6-channel recorder's file was
    read whole at its width, by the latent encoding and by a preloaded stereo dataset: its first
    two channels are now cut block by block as read (`load_audio(channels="stereo")`)."""
    import tracemalloc
    from model.latents import _AudioFiles
    rate = 48000
    x = (0.3 * np.random.default_rng(0).standard_normal((30 * rate, 6))).clip(-1, 1).astype(np.float32)  # (T, 6)
    path = write(tmp_path / "corpus" / "recorder.wav", x.T, rate)  # 16-bit: the scan reads its header only
    expected = load_audio(path, channels=None)[:2]  # (2, T) at 16 kHz
    whole = x.nbytes  # 34.6 MB, read at once before (and its magnitudes, checked: 69 MB at the peak)
    for read in (lambda: _AudioFiles([path], SR, "stereo", "silence", 1)[0][1].numpy(),
                 lambda: AudioCropDataset(tmp_path / "corpus", 30.0, train=False, channels="stereo",
                                          preload_max_gb=1.0)._audio[0]):
        tracemalloc.start()
        try:
            audio = read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_allclose(audio, expected, atol=1e-6)
        assert peak < whole, f"peak {peak / 1e6:.1f} MB for a file of {whole / 1e6:.1f} MB of samples"


def test_channels_mono_averages_and_stereo_keeps_speakers_apart(tmp_path):
    left, right = tone(0.5, freq=300.0), tone(0.5, freq=700.0, amplitude=0.3)
    path = write(tmp_path / "st.wav", np.stack([left, right]), subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path, channels="mono")[0], (left + right) / 2, atol=1e-6)
    stereo = load_audio(path, channels="stereo")
    np.testing.assert_allclose(stereo, np.stack([left, right]), atol=1e-6)
    assert load_audio(path, channels=None).shape == (2, len(left))
    quad = write(tmp_path / "quad.wav", np.stack([left, right, left, right]), subtype="FLOAT")
    assert load_audio(quad, channels="stereo").shape == (2, len(left))  # the first two channels
    mono = write(tmp_path / "mono.wav", left)
    with pytest.raises(AudioError, match="mono.wav"):
        load_audio(mono, channels="stereo")


def test_load_error_names_the_file(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(AudioError, match="garbage.wav"):
        load_audio(bad)
    with pytest.raises(AudioError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")


def broken_float_files(folder):
    """Float WAVs no recording holds (a NaN, an inf, a 1e30) beside a good one that goes past full
    scale as float files may; returns {name: the reason load_audio must give}."""
    x = tone(1.0)
    for name, index, value in (("nan.wav", 9000, np.nan), ("inf.wav", 100, -np.inf), ("huge.wav", 15000, 1e30)):
        bad = x.copy()
        bad[index] = value
        write(folder / name, bad, subtype="FLOAT")
    write(folder / "loud.wav", 1.5 * x, subtype="FLOAT")
    return {"nan.wav": "1 non-finite samples", "inf.wav": "1 non-finite samples", "huge.wav": "samples of magnitude up to 1e+30"}


def test_a_file_name_that_is_not_utf8_is_named_for_what_is_wrong(tmp_path):
    """A file named in another encoding (Latin-1, from an old archive) was skipped with soundfile's
    "'utf-8' codec can't encode character '\\udce9' ...: surrogates not allowed"; now the reason says so."""
    write(tmp_path / "good.wav", tone(0.5))
    try:
        os.rename(tmp_path / "good.wav", os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav"))
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    write(tmp_path / "good.wav", tone(0.5))
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["good.wav"]
    assert skipped_names(record) == [f"skipping unreadable audio: cannot read audio file {tmp_path}/caf\\udce9.wav: its "
                                     "file name is not valid utf-8 (byte 0xe9), which soundfile cannot open; rename "
                                     "the file"]


def test_a_file_name_with_control_characters_is_named_on_one_line_escaped(tmp_path):
    """A name holding a newline and a terminal escape sequence (any byte but / and NUL may be in
    one) was printed raw: the warning took two lines and the sequence cleared the user's screen.
    The name is shown as Python writes it in a string, so the line stays one and inert."""
    write(tmp_path / "good.wav", tone(0.5))
    (tmp_path / "take\n1\x1b[2J.wav").write_bytes(os.urandom(3000))
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["good.wav"]
    [message] = skipped_names(record)
    assert message.startswith(f"skipping unreadable audio: cannot read audio file {tmp_path}/take\\n1\\x1b[2J.wav: ")
    assert message.isprintable(), message
    with pytest.raises(AudioError) as e:
        load_audio(str(tmp_path / "take\n1\x1b[2J.wav"))
    assert str(e.value).isprintable() and "take\\n1\\x1b[2J.wav" in str(e.value)


def test_non_finite_or_huge_samples_make_a_file_unreadable(tmp_path):
    broken = broken_float_files(tmp_path)
    for name, reason in broken.items():
        with pytest.raises(AudioError, match=re.escape(f"{name}: {reason}")):
            load_audio(tmp_path / name)
        with pytest.raises(AudioError, match=name):  # every prompt reader goes through load_prompt
            model.audio.load_prompt(tmp_path / name, channels=2)
    assert np.abs(load_audio(tmp_path / "loud.wav")).max() == pytest.approx(0.75, abs=1e-3)  # 1.5 x 0.5
    # a crop is checked when read: the one holding the NaN fails, one before it reads fine
    assert np.isfinite(load_audio(tmp_path / "nan.wav", start=0, num_samples=8000)).all()
    with pytest.raises(AudioError, match="nan.wav"):
        load_audio(tmp_path / "nan.wav", start=8000, num_samples=2000)
    with pytest.raises(AudioError, match="nan.wav"):  # resampling reads it too
        load_audio(tmp_path / "nan.wav", sample_rate=24000)


def test_scan_skips_names_and_counts_non_finite_files_and_no_batch_holds_them(tmp_path):
    broken = broken_float_files(tmp_path)
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["loud.wav"]
    assert files.skipped == sorted(broken)
    messages = skipped_names(record)
    for name, reason in broken.items():
        assert sum(name in m and reason in m for m in messages) == 1
    with pytest.warns(SkippedAudioWarning) as record:  # cached: named again without reading
        assert len(scan_audio_folder(tmp_path).skipped) == 3
    assert len(skipped_names(record)) == 3
    with pytest.warns(SkippedAudioWarning):
        ds = AudioCropDataset(tmp_path, segment_seconds=0.25, seed=0)
    batch = next(iter(make_loader(ds, batch_size=len(ds))))
    assert torch.isfinite(batch["audio"]).all() and batch["audio"].abs().max() > 0.7
    assert batch["file"].tolist() == [0] * len(ds)  # `file` names the source of every crop


@pytest.mark.parametrize("subtype,atol", [("PCM_16", 1e-4), ("FLOAT", 0.0)])
def test_save_audio_roundtrip_atomic(tmp_path, subtype, atol):
    x = np.stack([tone(0.3), -tone(0.3)])  # (2, T)
    path = tmp_path / "out" / "x.wav"
    save_audio(path, x, SR, subtype=subtype)
    save_audio(tmp_path / "out" / "one.wav", torch.from_numpy(x[0]), SR)  # (T,) and a tensor
    np.testing.assert_allclose(load_audio(path, channels=None), x, atol=atol)
    assert load_audio(tmp_path / "out" / "one.wav").shape == (1, x.shape[1])
    assert sorted(os.listdir(tmp_path / "out")) == ["one.wav", "x.wav"]  # no temporary files left
    save_audio(path, np.full((1, 100), 3.0), SR)  # PCM clips rather than wrapping around
    assert load_audio(path).min() > 0.99


def test_an_opus_file_is_written_as_opus_and_read_back(tmp_path):
    """.opus is read (a corpus, a prompt) and was refused as an output ("soundfile writes no .opus
    files"), though soundfile writes Ogg Opus: complete.py's, the notebook's and the client's
    outputs named .opus are now Ogg Opus files."""
    from model.audio import check_output
    x = tone(1.0)[None]
    path = tmp_path / "x.opus"
    check_output(str(path))  # not refused before the work
    save_audio(path, x, SR)
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate) == ("OGG", "OPUS", SR)
    y = load_audio(path)
    assert abs(y.shape[1] - x.shape[1]) <= SR // 50  # a lossy codec: the same length within 20 ms
    n = min(x.shape[1], y.shape[1])
    assert np.corrcoef(x[0, :n], y[0, :n])[0, 1] > 0.9


# --- model/data.py: scanning -------------------------------------------------------------------


def test_corrupt_files_are_skipped_named_once_and_counted(tmp_path):
    write(tmp_path / "good.wav", tone(1.0))
    (tmp_path / "garbage.wav").write_bytes(os.urandom(3000))
    whole = open(write(tmp_path / "full.wav", tone(1.0)), "rb").read()
    os.remove(tmp_path / "full.wav")
    (tmp_path / "truncated.wav").write_bytes(whole[:30])  # cut inside the header
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["good.wav"]
    assert files.skipped == ["garbage.wav", "truncated.wav"]
    messages = skipped_names(record)
    for name in ("garbage.wav", "truncated.wav"):
        assert sum(name in m for m in messages) == 1
    # the second scan answers from the cache, but still names and counts the bad files
    with pytest.warns(SkippedAudioWarning) as record:
        assert len(scan_audio_folder(tmp_path).skipped) == 2
    assert len(skipped_names(record)) == 2


def test_empty_files_are_named_together_and_counted(tmp_path):
    """Files of 0 samples were dropped from a corpus without a word, where unreadable ones are
    named: now one warning names the first few and counts them, and the log line counts them."""
    write(tmp_path / "good.wav", tone(0.5))
    for i in range(5):
        write(tmp_path / f"empty{i}.wav", np.zeros(0, np.float32))
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["good.wav"]
    assert files.short == [f"empty{i}.wav" for i in range(5)] and files.skipped == []
    assert skipped_names(record) == [f"skipping 5 audio files in {tmp_path} empty (0 samples): "
                                     "empty0.wav, empty1.wav, empty2.wav and 2 more"]
    assert files.left_out() == "; 5 too short to use (named above)"
    os.remove(tmp_path / "good.wav")
    with pytest.warns(SkippedAudioWarning), pytest.raises(FileNotFoundError, match=r"\(5 empty files skipped\)"):
        scan_audio_folder(tmp_path)


def test_an_ogg_of_0_samples_reads_as_empty_not_a_numpy_error(tmp_path):
    """An Ogg Vorbis file of 0 samples (a recorder stopped at once) or one cut right after its
    headers was refused, as --input-wav, with numpy's "need at least one array to concatenate":
    it reads as 0 samples, as an empty WAV does (named then as holding no audio)."""
    write(tmp_path / "empty.ogg", np.zeros(0, np.float32), 48000, subtype="VORBIS")
    write(tmp_path / "full.ogg", tone(1.0, 48000), 48000, subtype="VORBIS")
    data = (tmp_path / "full.ogg").read_bytes()
    pages = [m.start() for m in re.finditer(b"OggS", data)]
    (tmp_path / "headers_only.ogg").write_bytes(data[:pages[2]])  # the identification and setup pages
    for name in ("empty.ogg", "headers_only.ogg"):
        assert model.audio.audio_info(str(tmp_path / name)) == (0, 48000, 1), name
        assert load_audio(tmp_path / name).shape == (1, 0), name
        assert load_audio(tmp_path / name, 48000, channels=None, start=100, num_samples=10).shape == (1, 0), name


def test_a_file_reached_again_through_a_link_is_listed_once_and_named(tmp_path):
    """A link to a file of the corpus (a symlink, a hard link) was listed as another file: its
    audio was encoded and drawn twice as often, without a word. Now the first path in sorted order
    is kept, the others named together and counted in the log line."""
    write(tmp_path / "b.wav", tone(0.5))
    write(tmp_path / "c.wav", tone(0.5, freq=220))
    (tmp_path / "a.wav").symlink_to("b.wav")
    os.link(tmp_path / "b.wav", tmp_path / "d.wav")
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["a.wav", "c.wav"] and files.linked == ["b.wav", "d.wav"]
    assert skipped_names(record) == [f"skipping 2 audio files in {tmp_path} that are files listed already, under "
                                     "another path (links): b.wav (= a.wav), d.wav (= a.wav)"]
    assert files.left_out() == "; 2 listed already under another path (named above)"
    with pytest.warns(SkippedAudioWarning, match="b.wav"):  # the cached scan too
        assert len(AudioCropDataset(str(tmp_path), 0.1, train=False).files) == 2


def test_a_named_pipe_in_a_corpus_is_skipped_and_named_not_waited_on(tmp_path):
    """A FIFO named like audio (a leftover of a streaming tool) in a corpus folder: the scan opened
    it and waited for a writer forever, so training never started and said nothing. Now it is
    skipped and named like an unreadable file; a manifest listing one names its line."""
    import threading

    from model.manifest import ManifestError
    write(tmp_path / "good.wav", tone(0.5))
    os.mkfifo(tmp_path / "pipe.wav")
    result = {}
    with warnings.catch_warnings(record=True) as record:  # catches the scanning thread's warnings too
        warnings.simplefilter("always")
        scan = threading.Thread(target=lambda: result.update(files=scan_audio_folder(tmp_path)), daemon=True)
        scan.start()
        scan.join(timeout=20)
        if scan.is_alive():  # release the reader blocked in open(), then fail
            os.close(os.open(tmp_path / "pipe.wav", os.O_WRONLY | os.O_NONBLOCK))
            scan.join()
            pytest.fail("the scan waited on a named pipe")
    assert [os.path.basename(f.path) for f in result["files"]] == ["good.wav"]
    assert result["files"].skipped == ["pipe.wav"]
    assert skipped_names(record) == [f"skipping unreadable audio: cannot read audio file {tmp_path / 'pipe.wav'}: "
                                     "not a regular file (a named pipe or a device)"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "good.wav"}\n{"path": "pipe.wav"}\n')
    with pytest.raises(ManifestError, match=re.escape(f"line 2: {tmp_path / 'pipe.wav'} is not a regular file")):
        scan_audio_folder(manifest)


def test_a_link_to_no_file_in_a_corpus_is_named_as_such(tmp_path):
    """A symbolic link to a file moved away, and one in a loop of links, in a corpus folder: skipped
    and named with the OS's "[Errno 2] No such file or directory" for a name that is there (the
    prompt and manifest checks already said what the link is). Now the skip says it too."""
    write(tmp_path / "good.wav", tone(0.5))
    (tmp_path / "moved.wav").symlink_to(tmp_path / "elsewhere" / "moved.wav")
    (tmp_path / "loop_a.wav").symlink_to("loop_b.wav")
    (tmp_path / "loop_b.wav").symlink_to("loop_a.wav")
    with pytest.warns(SkippedAudioWarning) as record:
        files = scan_audio_folder(tmp_path)
    assert [os.path.basename(f.path) for f in files] == ["good.wav"]
    loop = "a symbolic link in a loop of links (it leads to no file)"
    assert sorted(skipped_names(record)) == [
        f"skipping unreadable audio: cannot read audio file {tmp_path / name}: it is {what}"
        for name, what in (("loop_a.wav", loop), ("loop_b.wav", loop),
                           ("moved.wav", f"a symbolic link to {tmp_path / 'elsewhere' / 'moved.wav'}, which does not "
                                         "exist"))]


def test_missing_and_empty_folders_name_the_path_and_formats(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as e:
        scan_audio_folder(missing)
    assert all(ext in str(e.value) for ext in SUPPORTED_EXTENSIONS)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here")
    with pytest.raises(FileNotFoundError, match="empty") as e:
        AudioCropDataset(empty, segment_seconds=1.0)
    assert all(ext in str(e.value) for ext in SUPPORTED_EXTENSIONS)
    (empty / "bad.wav").write_bytes(b"RIFF....garbage")
    with pytest.warns(SkippedAudioWarning), pytest.raises(FileNotFoundError, match="1 unreadable"):
        scan_audio_folder(empty)


@pytest.mark.parametrize("name", ["one.wav", "list.txt"])
def test_a_data_path_naming_a_file_says_so(tmp_path, name):
    """train_data_path=one.wav (or a manifest not named .jsonl) was reported as a folder that
    "does not exist", though it does: now it says it is a file, and what is expected."""
    path = write(tmp_path / "one.wav", tone(0.5)) if name == "one.wav" else tmp_path / name
    if name == "list.txt":
        path.write_text('{"path": "one.wav"}\n')
    with pytest.raises(FileNotFoundError) as e:
        scan_audio_folder(path)
    assert str(e.value).startswith(f"audio folder {path} is a file, not a folder; expected a folder of .wav")
    assert "or a .jsonl manifest listing them" in str(e.value)  # the trainers' config check: test_train_transformer


def test_index_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    for i in range(3):
        write(tmp_path / f"{i}.wav", tone(0.5 + i))
    calls = []
    real_open = model.audio._open_audio  # counted: model.audio reads each header through it
    monkeypatch.setattr(model.audio, "_open_audio", lambda path: calls.append(path) or real_open(path))

    first = scan_audio_folder(tmp_path)
    assert len(calls) == 3 and os.path.exists(tmp_path / INDEX_FILENAME)
    calls.clear()
    assert scan_audio_folder(tmp_path) == first
    assert calls == []  # every length came from the cache
    write(tmp_path / "1.wav", tone(4.0))  # changed: size and mtime differ
    files = scan_audio_folder(tmp_path)
    assert [os.path.basename(p) for p in calls] == ["1.wav"]
    assert files[1].frames == 4 * SR
    cache = json.loads((tmp_path / INDEX_FILENAME).read_text())["files"]
    assert cache["1.wav"]["frames"] == 4 * SR


def test_an_index_nested_too_deep_is_measured_anew(tmp_path):
    """A damaged `.hertz_index.json` is rebuilt; one of arrays nested past the JSON parser's
    recursion was a RecursionError traceback out of every scan of the folder."""
    write(tmp_path / "a.wav", tone(1.0))
    (tmp_path / INDEX_FILENAME).write_text("[" * 100_000 + "]" * 100_000)
    files = scan_audio_folder(tmp_path)
    assert [(os.path.basename(f.path), f.frames) for f in files] == [("a.wav", SR)]
    assert "a.wav" in json.loads((tmp_path / INDEX_FILENAME).read_text())["files"]


def test_a_file_rewritten_with_its_size_and_mtime_put_back_is_measured_again(tmp_path):
    """The index was keyed by size and mtime only: a file rewritten with the same size and its mtime
    put back (`cp -p`, `touch -r`) kept its old length, and its crops were cut past its end. The inode's
    change time (which no one can set back) and number are in the key now, and an index written by
    the old key (no such entries) is measured anew."""
    write(tmp_path / "f.wav", tone(2.0))
    assert [f.frames for f in scan_audio_folder(tmp_path)] == [2 * SR]
    st = os.stat(tmp_path / "f.wav")
    write(tmp_path / "f.wav", np.stack([tone(1.0, freq=220.0)] * 2))  # 1 s of stereo: the same size
    os.utime(tmp_path / "f.wav", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.path.getsize(tmp_path / "f.wav"), os.stat(tmp_path / "f.wav").st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    files = scan_audio_folder(tmp_path)
    assert [(f.frames, f.channels) for f in files] == [(SR, 2)]
    index = json.loads((tmp_path / INDEX_FILENAME).read_text())
    # an index of the old key: size and mtime right, the length of the file before
    index["files"]["f.wav"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "frames": 2 * SR,
                               "sample_rate": SR, "channels": 1}
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index))
    assert scan_audio_folder(tmp_path) == files
    assert json.loads((tmp_path / INDEX_FILENAME).read_text())["files"]["f.wav"]["frames"] == SR


def test_scan_works_when_the_cache_cannot_be_written(tmp_path):
    write(tmp_path / "a.wav", tone(0.5))
    (tmp_path / INDEX_FILENAME).mkdir()  # in the way of the cache file, even for root
    assert len(scan_audio_folder(tmp_path)) == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


# --- model/data.py: crops ----------------------------------------------------------------------


def test_short_clip_is_padded_and_masked(tmp_path):
    x = tone(0.5)
    write(tmp_path / "short.wav", x)
    for train in (True, False):
        item = AudioCropDataset(tmp_path, segment_seconds=1.0, train=train)[0]
        assert item["audio"].shape == (1, SR) and item["mask"].shape == (SR,)
        assert item["audio"].dtype == torch.float32 and item["mask"].dtype == torch.float32
        np.testing.assert_allclose(item["audio"][0, :8000].numpy(), x, atol=1e-4)
        assert torch.all(item["audio"][:, 8000:] == 0)
        assert torch.all(item["mask"][:8000] == 1) and torch.all(item["mask"][8000:] == 0)


def test_validation_crops_are_consecutive_and_fixed(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, int(3.5 * SR)).astype(np.float32)
    write(tmp_path / "a.wav", x, subtype="FLOAT")
    write(tmp_path / "b.wav", tone(0.25), subtype="FLOAT")
    ds = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False)
    assert ds.crops == [(0, 0), (0, SR), (0, 2 * SR), (1, 0)]  # a's last half second is left out
    for k in range(3):
        np.testing.assert_array_equal(ds[k]["audio"][0].numpy(), x[k * SR:(k + 1) * SR])
    again = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False)
    again.set_epoch(7)
    for k in range(len(ds)):
        assert torch.equal(ds[k]["audio"], again[k]["audio"]) and torch.equal(ds[k]["mask"], again[k]["mask"])
    capped = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False, val_crops_per_file=2)
    assert capped.crops == [(0, 0), (0, 2 * SR), (1, 0)]  # spread over the file
    # a file of one frame at 44.1 kHz holds no sample at 16 kHz: no crop (it was one of padding alone,
    # counted in the trainer's "val: N crops" and evaluated for nothing)
    write(tmp_path / "c.wav", np.full(1, 0.1, np.float32), rate=44100)
    with_blip = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False)
    assert [os.path.basename(with_blip.files[i].path) for i, _ in with_blip.crops] == ["a.wav"] * 3 + ["b.wav"]


def test_train_crops_are_reproducible_and_weighted_by_duration(tmp_path):
    write(tmp_path / "long.wav", tone(9.0, freq=300.0))
    write(tmp_path / "short.wav", tone(1.0, freq=2000.0))
    ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=3)
    assert len(ds) == 20  # ten seconds of audio in half-second crops
    items = [ds[i]["audio"] for i in range(len(ds))]
    same = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=3)
    assert all(torch.equal(a, same[i]["audio"]) for i, a in enumerate(items))
    other_seed = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=4)
    assert not all(torch.equal(a, other_seed[i]["audio"]) for i, a in enumerate(items))
    same.set_epoch(1)
    assert not all(torch.equal(a, same[i]["audio"]) for i, a in enumerate(items))
    # file choice follows duration: the 9 s file gives ~90% of crops (crossings counted at 1000 Hz)
    draws = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=0)
    long_file = 0
    for epoch in range(10):
        draws.set_epoch(epoch)
        long_file += sum(np.abs(np.diff(np.sign(draws[i]["audio"][0].numpy()))).sum() < 1000 * 2
                         for i in range(len(draws)))
    assert 0.8 < long_file / 200 < 0.97


def test_loader_workers_give_the_same_batches(tmp_path):
    for i in range(4):
        write(tmp_path / f"{i}.wav", tone(2.0, freq=200.0 * (i + 1)))
    ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=1)
    batches = [list(make_loader(ds, batch_size=4, num_workers=n, seed=5)) for n in (0, 2)]
    assert len(batches[0]) == 4 and batches[0][0]["audio"].shape == (4, 1, SR // 2)
    assert batches[0][0]["mask"].shape == (4, SR // 2)
    for a, b in zip(*batches):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["mask"], b["mask"])


def test_resuming_in_the_middle_of_an_epoch_gives_the_same_batches(tmp_path):
    """make_loader(distributed=True) in one process: the order of an epoch depends only on
    (seed, epoch), so infinite_batches(skip=k) continues exactly where a run stopped, without
    touching the global RNG."""
    for i in range(3):
        write(tmp_path / f"{i}.wav", tone(1.0 + i, freq=200.0 * (i + 1)))
    ds = AudioCropDataset(tmp_path, segment_seconds=0.25, seed=2)  # 24 crops: 6 batches an epoch
    loader = make_loader(ds, batch_size=4, distributed=True, seed=3)
    assert len(loader) == 6
    rng = torch.get_rng_state()
    stream = infinite_batches(loader)
    straight = [next(stream)["audio"] for _ in range(15)]
    assert torch.equal(torch.get_rng_state(), rng)
    for start in (0, 4, 6, 9):
        epoch, skip = divmod(start, len(loader))
        resumed = infinite_batches(loader, start_epoch=epoch, skip=skip)
        for want in straight[start:]:
            assert torch.equal(next(resumed)["audio"], want)


def test_stereo_mode_keeps_speakers_apart_and_mono_is_a_monologue(tmp_path):
    a, b = tone(1.0, freq=300.0), tone(1.0, freq=900.0)
    write(tmp_path / "dialogue.wav", np.stack([a, b]), subtype="FLOAT")
    write(tmp_path / "single.wav", a, subtype="FLOAT")
    ds = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False, channels="stereo")
    dialogue, single = ds[0]["audio"], ds[1]["audio"]
    assert dialogue.shape == single.shape == (2, SR)
    np.testing.assert_allclose(dialogue.numpy(), np.stack([a, b]), atol=1e-6)
    np.testing.assert_allclose(single[0].numpy(), a, atol=1e-6)
    assert torch.all(single[1] == 0)  # the other speaker is silent
    dup = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False, channels="stereo",
                           mono_to_stereo="duplicate")[1]["audio"]
    assert torch.equal(dup[0], dup[1])
    mono = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False, channels="mono")[0]["audio"]
    np.testing.assert_allclose(mono[0].numpy(), (a + b) / 2, atol=1e-6)


def test_files_failing_at_read_time_are_skipped_and_named_once(tmp_path):
    write(tmp_path / "good.flac", tone(2.0))
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.5, 0.5, 20 * SR).astype(np.float32)
    whole = open(write(tmp_path / "cut.flac", noise), "rb").read()
    (tmp_path / "cut.flac").write_bytes(whole[:len(whole) // 4])  # header intact, data cut short
    ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=0)
    assert len(ds.files) == 2  # the header still reads fine
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    messages = skipped_names(record)
    assert len(messages) == 1 and "cut.flac" in messages[0]
    assert all(torch.all(item["mask"] == 1) for item in items)


def test_a_dataset_with_a_file_unreadable_since_the_scan_is_copied_pickled_and_read_by_spawned_workers(tmp_path, capfd):
    """The record of the files named (one warning a file, shared by forked workers) made
    copy.deepcopy, pickle and DataLoader workers started by spawn (or forkserver) a RuntimeError. A
    copy now keeps a record of its own: it names the file once itself, and its crops are padding."""
    write(tmp_path / "bad.wav", tone(1.0, freq=220.0))
    write(tmp_path / "good.wav", tone(1.0))
    scan_audio_folder(tmp_path)
    (tmp_path / "bad.wav").write_bytes(b"\0" * os.path.getsize(tmp_path / "bad.wav"))
    changed_after_the_scan(tmp_path)
    ds = AudioCropDataset(tmp_path, segment_seconds=0.5, train=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for copied in (ds, copy.deepcopy(ds), pickle.loads(pickle.dumps(ds))):
            masks = [int(copied[i]["mask"].sum()) for _ in range(2) for i in range(len(ds))]  # each crop twice
            assert masks == [0, 0, SR // 2, SR // 2] * 2
    messages = skipped_names(record)
    assert len(messages) == 3 and all("bad.wav" in m for m in messages), messages  # once by each
    capfd.readouterr()
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn"))
    assert [b["mask"].sum(1).tolist() for b in batches] == [[0, 0], [SR // 2, SR // 2]]
    assert capfd.readouterr().err.count("cannot read audio file") == 1


@pytest.mark.parametrize("preload", [0.0, 1.0], ids=["streamed", "preloaded"])
def test_a_file_shorter_than_its_header_is_skipped_not_trained_on_as_padding(tmp_path, preload):
    """A file whose data ends before the length the scan found (a truncated MP3, or a file replaced
    by a shorter one after the scan, so the index is stale): skipped and named; its crops came back
    as padding (mask 0) and were trained on as if they were audio."""
    write(tmp_path / "good.wav", tone(2.0))
    write(tmp_path / "cut.wav", tone(2.0, freq=220.0))
    scan_audio_folder(tmp_path)  # the index now says cut.wav holds 2 s
    st = os.stat(tmp_path / "cut.wav")
    write(tmp_path / "cut.wav", np.stack([tone(1.0, freq=220.0)] * 2))  # 1 s of stereo: the same size
    os.utime(tmp_path / "cut.wav", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed_after_the_scan(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=0, preload_max_gb=preload)
        assert ds.lengths.tolist() == [2 * SR, 2 * SR]  # from the stale index
        items = [ds[i] for i in range(len(ds))]
        val = AudioCropDataset(tmp_path, segment_seconds=1.0, train=False, preload_max_gb=preload)
        val_items = [val[i] for i in range(len(val))]
    messages = skipped_names(record)
    assert messages and all(re.search(r"cut\.wav: it ends before its header says \(\d+ of 32000 samples", m)
                            for m in messages), messages
    assert all(ds.files[item["file"]].path.endswith("good.wav") and torch.all(item["mask"] == 1) for item in items)
    # cut.wav's first second is there; its second crop is all padding, which evaluations leave out
    assert [int(item["mask"].sum()) for item in val_items] == [SR, 0, SR, SR]


@pytest.mark.parametrize("preload", [0, 4], ids=["streamed", "preloaded"])
def test_a_file_a_little_shorter_than_its_header_is_kept(tmp_path, preload):
    """A header's length that is a little long (as an MP3's estimate without a frame index can be):
    here a stale index, the file replaced after the scan by one 0.1 s shorter with the same size (a
    JUNK chunk makes up the bytes). It is kept, not skipped as a truncated file: its last crops are
    partly padding, which the mask leaves out of the losses."""
    write(tmp_path / "f.wav", tone(2.0))
    scan_audio_folder(tmp_path)  # the index now says f.wav holds 2 s
    st = os.stat(tmp_path / "f.wav")
    pcm = (tone(1.9) * 32767).astype("<i2").tobytes()
    junk = st.st_size - 44 - len(pcm) - 8
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SR, 2 * SR, 2, 16)  # PCM, mono, 16 bits
    body = (b"WAVE" + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
            + b"JUNK" + struct.pack("<I", junk) + b"\0" * junk)
    (tmp_path / "f.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    changed_after_the_scan(tmp_path)
    assert os.path.getsize(tmp_path / "f.wav") == st.st_size and sf.info(str(tmp_path / "f.wav")).frames == 1.9 * SR
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=0, preload_max_gb=preload)
        assert ds.lengths.tolist() == [2 * SR]  # from the stale index
        masks = [ds._read(0, start)[1] for start in (0, int(1.5 * SR), int(1.9 * SR))]
    assert not skipped_names(record)
    assert [int(m.sum()) for m in masks] == [SR // 2, int(0.4 * SR), 0]


def test_a_folder_whose_every_file_fails_at_read_time_is_an_audio_error(tmp_path):
    """Every file readable at the scan but not at the read (changed since, or damaged past the
    header): an AudioError (one `error:` line in the trainers) naming the folder, once every file
    has failed; it was a RuntimeError, raised after 100 draws even while readable files remained."""
    for name in ("a.wav", "b.wav"):
        write(tmp_path / name, tone(1.0))
    ds = AudioCropDataset(tmp_path, segment_seconds=0.5, seed=0)
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    with pytest.warns(SkippedAudioWarning), pytest.raises(AudioError, match=re.escape(
            f"could not read a crop from {tmp_path}: 2 of 2 files failed to read (named above)")):
        ds[0]


def test_preloaded_corpus_gives_the_crops_read_from_disk(tmp_path):
    """preload_max_gb: the corpus decoded once into memory gives the same crops (same samples at
    the file's own rate, within the resampler's edge effects otherwise), and an over-size corpus streams."""
    for i in range(3):
        write(tmp_path / f"{i}.wav", tone(1.0 + i, freq=200.0 * (i + 1)))
    sf.write(tmp_path / "stereo_22k.wav", np.stack([tone(1.5, 22050, 300.0), tone(1.5, 22050, 500.0)]).T, 22050,
             subtype="FLOAT")
    for train in (True, False):
        disk = AudioCropDataset(tmp_path, segment_seconds=0.25, train=train, seed=4)
        ram = AudioCropDataset(tmp_path, segment_seconds=0.25, train=train, seed=4, preload_max_gb=1.0)
        assert ram.preloaded and not disk.preloaded
        for k in range(len(disk)):
            a, b = disk[k], ram[k]
            assert a["file"] == b["file"] and torch.equal(a["mask"], b["mask"])
            np.testing.assert_allclose(a["audio"].numpy(), b["audio"].numpy(), atol=1e-4)
            if not disk.files[a["file"]].path.endswith("22k.wav"):
                assert torch.equal(a["audio"], b["audio"])
    assert not AudioCropDataset(tmp_path, segment_seconds=0.25, preload_max_gb=1e-6).preloaded


def test_infinite_batches_keep_their_workers_across_epochs(tmp_path):
    """One iterator over every epoch: batches with two workers equal those read in the main process,
    epoch after epoch, and item (epoch, i) is the crop `set_epoch(epoch)` then `[i]` gives."""
    for i in range(3):
        write(tmp_path / f"{i}.wav", tone(1.0 + i, freq=200.0 * (i + 1)))
    ds = AudioCropDataset(tmp_path, segment_seconds=0.25, seed=2, preload_max_gb=1.0)  # 24 crops
    streams = [infinite_batches(make_loader(ds, batch_size=4, num_workers=n, distributed=True, seed=3))
               for n in (0, 2)]
    for _ in range(14):  # two epochs and a bit
        a, b = next(streams[0]), next(streams[1])
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["file"], b["file"])
    ds.set_epoch(1)
    assert torch.equal(ds[5]["audio"], ds[(1, 5)]["audio"])
    assert not torch.equal(ds[(0, 5)]["audio"], ds[(1, 5)]["audio"])


def test_a_process_exiting_with_its_loader_still_iterating_does_not_wait_for_ever():
    """The workers ignore SIGTERM (below), and multiprocessing's exit handler ends daemonic children
    with a SIGTERM, then waits for each: a trainer whose error kept its loader's iterator alive to the
    end printed its error line and hung (this session's CI rehearsal: test_train_codec.py's
    test_a_folder_whose_every_file_fails_when_read_is_one_error_line, 300 s). The iterators still
    alive at exit stop their workers first (model.data._stop_workers_at_exit)."""
    import subprocess
    import sys
    code = ("import torch\nfrom model.data import make_loader\n"
            "loader = make_loader(torch.utils.data.TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2, "
            "distributed=False)\nbatches = iter(loader)\nnext(batches)\nraise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr


def test_a_worker_whose_iterator_was_collected_in_a_reference_cycle_does_not_hold_the_exit():
    """An iterator collected in a reference cycle could not stop its worker (its finaliser ran on a
    half-torn-down object), so the worker kept running without it, ignoring the SIGTERM of
    multiprocessing's exit handler, which then waited for it for ever. The exit handler now kills
    StopSafeLoader workers left running (model.data._stop_workers_at_exit)."""
    import subprocess
    import sys
    # the iterator's finaliser waits out its two joins of the worker (torch's MP_STATUS_CHECK_INTERVAL,
    # 5 s each: 10 s of this test), then leaves it running: 0.5 s each here, the same outcome
    code = ("import gc, json, multiprocessing, torch\nfrom model.data import make_loader\n"
            "torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL = 0.5\n"
            "class Cycle: pass\n"
            "def leave_in_a_cycle():\n"
            "    loader = make_loader(torch.utils.data.TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=1, "
            "distributed=False)\n"
            "    batches = iter(loader); next(batches)\n"
            "    c = Cycle(); c.c = c; c.batches = batches\n"
            "leave_in_a_cycle(); gc.collect()\n"
            "print(json.dumps(len(multiprocessing.active_children())))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # the orphaned worker, running until the exit handler ended it


@pytest.mark.parametrize("kind", ["make_loader", "infinite_batches"])
def test_data_loading_workers_outlive_a_stop_signal_to_the_process_group(kind):
    """Ctrl-C or a SIGTERM to a trainer's process group reached its DataLoader workers too: one that
    died while handing a batch over made the main process fail mid-transfer with a traceback
    (ConnectionResetError), instead of stopping at its next step, saved (a flaky failure of
    test_train_transformer.py's SIGTERM test). The workers ignore both now: after the signals they
    still serve batches, and the loader stops them when it is done.
    make_loader: the signals are sent the moment its workers have started. One that came before a
    worker's worker_init_fn had run ended it (a CI failure of this test), so they start with both
    signals blocked. infinite_batches (the codec trainer's batches) made a loader of its own, whose
    workers had no worker_init_fn at all."""
    import itertools
    import multiprocessing
    import signal
    import time

    from model.data import infinite_batches, make_loader
    loader = make_loader(torch.utils.data.TensorDataset(torch.arange(64.0)), batch_size=4, shuffle=False,
                         num_workers=2, distributed=kind == "infinite_batches")
    before = set(multiprocessing.active_children())
    if kind == "make_loader":
        batches, got = iter(loader), []  # its workers start here
    else:
        batches = infinite_batches(loader)
        got = [next(batches)[0]]  # the generator starts its loader's workers for its first batch
    workers = [w for w in multiprocessing.active_children() if w not in before]
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        os.kill(w.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    got += [b[0] for b in itertools.islice(batches, 16 - len(got))]
    assert torch.equal(torch.cat(got), torch.arange(64.0))
    del batches  # the loader shuts its workers down
    time.sleep(0.5)
    for w in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(w.pid, 0)


def test_training_crops_stop_when_every_file_with_samples_failed(tmp_path):
    """Every file that holds a sample at 16 kHz failing to read (a FLAC damaged in the middle), the
    others blips (two frames at 44.1 kHz: none at 16 kHz), which are never drawn: the draw waited for
    them to fail too and spun at 100% CPU for ever. Now the error, naming both."""
    path = write(tmp_path / "speech.flac", np.random.default_rng(0).uniform(-0.5, 0.5, 10 * SR).astype(np.float32))
    data = bytearray(Path(path).read_bytes())
    data[8192:] = np.random.default_rng(1).bytes(len(data) - 8192)  # the header still reads, the rest is damaged
    Path(path).write_bytes(bytes(data))
    write(tmp_path / "blip.wav", np.zeros(2), 44100)
    ds = AudioCropDataset(tmp_path, segment_seconds=1.0, preload_max_gb=0)
    assert ds.lengths.tolist() == [0, 10 * SR]
    with pytest.warns(SkippedAudioWarning, match="speech.flac"), pytest.raises(AudioError) as e:
        [ds[i] for i in range(len(ds))]
    assert str(e.value) == (f"could not read a crop from {tmp_path}: 1 of 2 files failed to read (named above); the "
                            "other 1 are shorter than one sample at 16000 Hz")


@pytest.mark.parametrize("edit", [{"frames": None}, {"frames": "32000"}, {"sample_rate": 0}, {"error": 3}],
                         ids=["no-frames", "frames-text", "rate-0", "error-not-text"])
def test_an_index_entry_edited_or_damaged_is_measured_anew(tmp_path, edit):
    """An entry of `.hertz_index.json` whose stamp matches but which lacks `frames` (a KeyError
    traceback), holds it as text (passed on as the length), or a rate of 0: the file is measured again,
    as a broken index is rebuilt."""
    write(tmp_path / "a.wav", tone(2.0))
    scan_audio_folder(tmp_path)
    index = json.loads((tmp_path / INDEX_FILENAME).read_text())
    entry = index["files"]["a.wav"]
    for key, value in edit.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index))
    files = scan_audio_folder(tmp_path)
    assert [(f.frames, f.sample_rate, f.channels) for f in files] == [(2 * SR, SR, 1)] and files.skipped == []
    assert json.loads((tmp_path / INDEX_FILENAME).read_text())["files"]["a.wav"]["frames"] == 2 * SR


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAVEX", "PCM_24"), ("AIFF", "PCM_16"), ("AU", "PCM_16"),
                                          ("W64", "PCM_16"), ("RF64", "PCM_16"), ("WAV", "IMA_ADPCM"), ("NIST", "PCM_16")])
def test_a_file_cut_short_is_skipped_and_named_not_read_as_what_is_left(tmp_path, fmt, subtype):
    """A WAV (AIFF, AU, W64, RF64) cut to a third by an interrupted copy: libsndfile counts the frames
    that are there and says so only in its log ('data : 320000 (should be 106637)'), so it was
    scanned, cropped and trained on as a 3 s file, silently. Now it is skipped and named (a prompt
    refused), as a FLAC cut short is; a file a little short (under a second) is kept."""
    x = tone(10.0, amplitude=0.3)
    data = Path(write(tmp_path / "full" / "talk.wav", x, format=fmt, subtype=subtype)).read_bytes()
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "talk.wav"
    path.write_bytes(data[:len(data) // 3])
    write(tmp_path / "corpus" / "ok.wav", tone(1.0))
    with pytest.raises(AudioError) as e:
        load_audio(path)
    said = "3.4 s of the 10.1" if subtype == "IMA_ADPCM" else "3.3 s of the 10.0"  # (ADPCM: whole blocks)
    assert str(e.value) == (f"cannot read audio file {path}: it ends before its header says ({said} s it gives: a "
                            "file cut short, by an interrupted copy or download?)")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        files = scan_audio_folder(tmp_path / "corpus")
    assert [os.path.basename(f.path) for f in files] == ["ok.wav"] and files.skipped == ["talk.wav"]
    assert skipped_names(record) == [f"skipping unreadable audio: {e.value}"]
    path.write_bytes(data[:len(data) - len(data) // 40])  # a quarter of a second short: kept
    assert 9.6 * SR < load_audio(path).shape[1] < 10 * SR


def test_a_wav_past_4_gib_or_with_a_header_never_filled_in_is_named(tmp_path):
    """A WAV past 4 GiB (its 32-bit sizes wrapped, as tools that do not switch to RF64 write them)
    was read as its first minute, silently; one whose header sizes are 0 (a recorder killed before
    it wrote them) as 'empty (0 samples)', its audio unsaid. Both are named for what they are."""
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 2, 48000, 48000 * 4, 4, 16)
    audio = (1 << 32) + 48000 * 4 * 60  # 6.2 h of 48 kHz stereo, of which the header counts 60 s
    long = tmp_path / "long.wav"
    with open(long, "wb") as f:  # sparse: nothing near 4 GiB is written
        f.write(b"RIFF" + struct.pack("<I", (36 + audio) % (1 << 32)) + b"WAVE" + fmt + b"data"
                + struct.pack("<I", audio % (1 << 32)))
        f.truncate(44 + audio)
    with pytest.raises(AudioError) as e:
        model.audio.audio_info(str(long))
    assert str(e.value) == (f"cannot read audio file {long}: a WAV file of 4.3 GB, past the 4 GiB a WAV header can "
                            "count (its sizes wrapped): read as 60 s; convert it to FLAC, or to RF64 (`ffmpeg -i IN "
                            "-rf64 auto OUT.wav`)")
    long.unlink()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, SR, 2 * SR, 2, 16)
    pcm = (tone(2.0) * 32767).astype("<i2").tobytes()
    never = tmp_path / "never.wav"
    never.write_bytes(b"RIFF" + struct.pack("<I", 0) + b"WAVE" + fmt + b"data" + struct.pack("<I", 0) + pcm)
    with pytest.raises(AudioError, match=re.escape(f"cannot read audio file {never}: its header gives a length of 0 "
                                                   "but the file holds 64044 bytes (a recording whose header was never "
                                                   "filled in: its writer killed?)")):
        load_audio(never)


def test_folders_and_files_this_user_cannot_read_are_named(tmp_path):
    """A subfolder this user cannot list (mode 0o300) and its files were left out unsaid (os.walk
    drops what it cannot list), an unlistable corpus folder was 'no audio files', and a file it
    cannot read was named with libsndfile's 'System error.'. Run without root's capabilities."""
    from unprivileged import unprivileged
    write(tmp_path / "corpus" / "ok" / "a.wav", tone(1.0))
    write(tmp_path / "corpus" / "locked" / "b.wav", tone(1.0))
    write(tmp_path / "corpus" / "c.wav", tone(1.0))
    (tmp_path / "corpus" / "locked").chmod(0o300)
    (tmp_path / "corpus" / "c.wav").chmod(0)
    write(tmp_path / "closed" / "d.wav", tone(1.0))
    (tmp_path / "closed").chmod(0o300)
    code = ("import sys, warnings\nfrom model.data import scan_audio_folder\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    files = scan_audio_folder(sys.argv[1], use_cache=False)\n"
            "print([f.path for f in files]); [print(m.message) for m in w]\n"
            "try:\n    scan_audio_folder(sys.argv[2])\nexcept FileNotFoundError as e:\n    print(e)\n")
    try:
        r = subprocess.run(unprivileged() + [sys.executable, "-c", code, str(tmp_path / "corpus"),
                                             str(tmp_path / "closed")],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "corpus" / "locked").chmod(0o755)
        (tmp_path / "closed").chmod(0o755)
    lines = r.stdout.splitlines()
    assert lines == [
        str([str(tmp_path / "corpus" / "ok" / "a.wav")]),
        f"skipping 1 folders in {tmp_path / 'corpus'} that cannot be listed, with whatever audio files they hold: "
        "locked (Permission denied)",
        f"skipping unreadable audio: cannot read audio file {tmp_path / 'corpus' / 'c.wav'}: permission denied (this "
        "user cannot read it)",
        f"audio folder {tmp_path / 'closed'} cannot be listed: Permission denied"], r.stdout + r.stderr[-2000:]
