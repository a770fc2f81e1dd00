"""Encoded corpora: what mono and duplex store, the cache key that rules out stale latents, and
the crops and sample order the trainer reads."""
import dataclasses
import itertools
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from config import fields_marked
from config.codec_config import PRESETS as CODEC_PRESETS
from config.codec_config import CodecConfig
from model import Codec, build
from model.audio import load_audio, save_audio
from model.checkpoint import CheckpointError
from model.data import SkippedAudioWarning
from model.latents import (LatentCrops, LatentsError, StepSampler, codec_fingerprint, prepare_latents,
                           sample_posterior)
from stale_index import changed_after_the_scan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return build(Codec, CODEC_PRESETS["tiny"]).eval()


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    save_audio(str(tmp_path / "audio" / "talk.wav"), 0.1 * rng.standard_normal((2, 10_500)).astype(np.float32), 16000)
    save_audio(str(tmp_path / "audio" / "solo.wav"), 0.1 * rng.standard_normal((1, 6_000)).astype(np.float32), 16000)
    return tmp_path


def rows(folder, name):
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["name"] == name)
    data = np.fromfile(folder / entry["shard"], dtype=np.float32).reshape(-1, 2, manifest["latent_dim"])
    return torch.from_numpy(data[entry["offset"]:entry["offset"] + entry["length"]])


def encoded(codec, audio):
    """(C, N) -> mu, logvar (N / 2000, C*32): the whole-signal encoding, channels side by side."""
    with torch.no_grad():
        mu, logvar = codec.encode(torch.as_tensor(audio)[:, None])
    return torch.cat(list(mu), -1), torch.cat(list(logvar), -1)


def test_duplex_keeps_speakers_apart_and_pairs_a_mono_file_with_silence(codec, folder):
    from model.audio import load_audio
    out = prepare_latents(str(folder / "audio"), codec, "stereo", str(folder / "latents"), log=lambda m: None)
    talk, solo = load_audio(str(folder / "audio/talk.wav"), 16000, None), load_audio(str(folder / "audio/solo.wav"))
    got = rows(out, "talk.wav")  # the last partial latent (500 samples) is dropped
    mu, logvar = encoded(codec, talk[:, :10_000])
    assert got.shape == (5, 2, 64) and torch.allclose(got[:, 0], mu, atol=1e-5) and torch.allclose(got[:, 1], logvar, atol=1e-5)
    mu, _ = encoded(codec, np.concatenate([solo, np.zeros_like(solo)]))
    assert torch.allclose(rows(out, "solo.wav")[:, 0], mu, atol=1e-5)
    mono = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    mu, _ = encoded(codec, talk[:, :10_000].mean(0, keepdims=True))
    assert mono != out and torch.allclose(rows(mono, "talk.wav")[:, 0], mu, atol=1e-5)


def test_a_stereo_file_of_one_signal_on_both_channels_is_one_speaker_and_said(codec, folder):
    """A mono recording saved as stereo (both channels the same, here after an MP3-like rounding
    on one) was encoded as two speakers saying the same thing, which teaches a duplex model to
    echo the user; it is now one speaker, as a one-channel file (mono_to_stereo), and named in a
    note. A real conversation, and a file whose channels differ by more, keep both speakers."""
    rng = np.random.default_rng(1)
    voice = (0.1 * rng.standard_normal(6_000)).astype(np.float32)
    save_audio(str(folder / "audio" / "dual.wav"), np.stack([voice, voice + 2e-5]), 16000, subtype="FLOAT")
    save_audio(str(folder / "audio" / "near.wav"), np.stack([voice, voice + 1e-3 * rng.standard_normal(6_000)]),
               16000, subtype="FLOAT")
    lines = []
    for mono, other in (("silence", np.zeros_like(voice)), ("duplicate", voice)):
        out = prepare_latents(str(folder / "audio"), codec, "stereo", str(folder / f"latents-{mono}"),
                              mono_to_stereo=mono, log=lines.append)
        mu, logvar = encoded(codec, np.stack([voice, other]))
        assert torch.allclose(rows(out, "dual.wav")[:, 0], mu, atol=1e-4), mono
        assert torch.allclose(rows(out, "dual.wav")[:, 1], logvar, atol=1e-4), mono
        near = load_audio(str(folder / "audio/near.wav"), 16000, None)
        mu, _ = encoded(codec, near)
        assert torch.allclose(rows(out, "near.wav")[:, 0], mu, atol=1e-5)  # both of its speakers kept
    notes = [line for line in lines if line.startswith("note: 1 stereo file holds one signal")]
    assert len(notes) == 2 and all(n.endswith(": dual.wav") for n in notes), lines
    assert "mono_to_stereo=silence" in notes[0] and "mono_to_stereo=duplicate" in notes[1]


def test_another_codec_or_a_changed_file_is_encoded_anew(codec, folder):
    kw = dict(channels="mono", out_dir=str(folder / "latents"), log=lambda m: None)
    first = prepare_latents(str(folder / "audio"), codec, **kw)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_latents(str(folder / "audio"), codec, **kw) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-encoded
    other = build(Codec, CODEC_PRESETS["tiny"]).eval()
    other.load_state_dict(codec.state_dict())
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert prepare_latents(str(folder / "audio"), other, **kw) != first
    save_audio(str(folder / "audio" / "solo.wav"), np.zeros((1, 8_000), np.float32), 16000)
    changed = prepare_latents(str(folder / "audio"), codec, **kw)
    assert changed != first and rows(changed, "solo.wav").shape[0] == 4


def test_a_file_rewritten_with_the_same_size_and_modification_time_is_encoded_anew(codec, folder):
    """The key covered sizes and modification times only: a file whose samples changed with both
    kept (a tool that restores mtimes, `touch -r`, a copy with `cp -p` over it) was trained on as its old
    latents. The inode's change time (which no one can set back) and number are in the key now."""
    kw = dict(channels="mono", out_dir=str(folder / "latents"), log=lambda m: None)
    first = prepare_latents(str(folder / "audio"), codec, **kw)
    solo = folder / "audio" / "solo.wav"
    st = solo.stat()
    save_audio(str(solo), 0.5 * np.ones((1, 6_000), np.float32), 16000)  # another signal, the same size
    os.utime(solo, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (solo.stat().st_size, solo.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    changed = prepare_latents(str(folder / "audio"), codec, **kw)
    assert changed != first
    mu, _ = encoded(codec, 0.5 * np.ones((1, 6_000), np.float32))
    assert torch.allclose(rows(changed, "solo.wav")[:, 0], mu, atol=1e-5)
    assert prepare_latents(str(folder / "audio"), codec, **kw) == changed  # and reused from then on


def test_another_run_killed_while_encoding_the_same_folder_leaves_this_ones_latents_whole(codec, folder,
                                                                                          monkeypatch):
    """Two runs sharing latents_dir encode the same corpus into the same folder: the second one's
    shard used to be opened with truncation over the first one's, so the first run, finishing
    after the other was killed, listed rows that had become zeros and trained on them silently."""
    import model.latents as latents
    encode, calls = latents._encode, []
    kw = dict(channels="mono", out_dir=str(folder / "latents"), log=lambda m: None)
    long = 0.1 * np.random.default_rng(1).standard_normal((1, 80_000)).astype(np.float32)
    save_audio(str(folder / "audio" / "long.wav"), long, 16000)  # 40 latents: more than a write buffer

    def encode_while_another_run_starts(*args):
        calls.append(args)
        if len(calls) == 2:  # this run has written long.wav; another starts on the folder and is killed
            with pytest.raises(KeyboardInterrupt):
                prepare_latents(str(folder / "audio"), codec, **kw)
        elif len(calls) == 3:  # the other run, in its first file
            raise KeyboardInterrupt
        return encode(*args)

    monkeypatch.setattr(latents, "_encode", encode_while_another_run_starts)
    out = prepare_latents(str(folder / "audio"), codec, **kw)
    monkeypatch.undo()
    alone = prepare_latents(str(folder / "audio"), codec, **{**kw, "out_dir": str(folder / "alone")})
    assert torch.equal(rows(out, "long.wav"), rows(alone, "long.wav"))  # long.wav's rows were all zeros
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temporary is gone


KILLED_ENCODER = """
import sys, time
import torch
import model.latents as latents
from config.codec_config import PRESETS
from model import Codec, build
latents.COMMIT_SECONDS = 0  # commit after every file, so the kill below finds some committed
encode = latents._encode
def slow(*args):  # a codec slow enough for the test to kill the run mid-corpus
    time.sleep(0.4)
    return encode(*args)
latents._encode = slow
torch.manual_seed(0)
latents.prepare_latents(sys.argv[1], build(Codec, PRESETS["tiny"]).eval(), "mono", sys.argv[2], log=print)
"""


def test_an_encoding_killed_midway_resumes_after_the_files_it_committed(codec, tmp_path):
    """A run killed (SIGKILL, as the OOM killer does) while encoding a corpus lost all its encoding
    (the shard was written beside and renamed in only at the end), and the next run started over.
    Now the files committed stay in the folder and the next run takes them over, cuts what was
    written after the last commit, and ends with the folder an uninterrupted encoding writes."""
    import signal
    import subprocess
    import sys
    import time
    rng = np.random.default_rng(2)
    for k in range(6):
        save_audio(str(tmp_path / "audio" / f"f{k}.wav"), 0.1 * rng.standard_normal((1, 6_000 + 2_000 * k)).astype(
            np.float32), 16000)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", KILLED_ENCODER, str(tmp_path / "audio"), str(tmp_path / "latents")],
                             cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in (tmp_path / "latents").glob("*/shard_00000.progress.jsonl")
                   if len(p.read_bytes().splitlines()) >= 2] and time.monotonic() < deadline:  # header, 1 file
            assert child.poll() is None, "the encoding ended before it was killed"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    folder, = (tmp_path / "latents").iterdir()
    assert not (folder / "manifest.json").exists()
    with open(folder / "shard_00000.bin.partial", "ab") as f:  # killed mid-write: rows not yet committed
        f.write(b"\xff" * 1000)
    with open(folder / "shard_00000.progress.jsonl", "ab") as f:  # and a line cut short
        f.write(b'{"file": 5, "ent')
    logs = []
    out = prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=logs.append)
    resumed = [m for m in logs if m.startswith("resuming")]
    assert len(resumed) == 1 and re.fullmatch(rf"resuming the encoding of {re.escape(str(folder))}: [1-5] of 6 files "
                                              "were done by a run that stopped", resumed[0]), logs
    alone = prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "alone"), log=lambda m: None)
    assert out == folder and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in alone.iterdir())
    for p in alone.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_private_shard_of_a_run_killed_while_encoding_is_removed_by_the_next(codec, tmp_path):
    """A run that found the partial shard held by another encodes into a private temporary
    `.shard_00000.bin.<hex>.tmp`; killed (SIGKILL) there, it left the temporary for good: the next
    run resumed the other's partial and finished the folder, and no run looked at it again. Now it
    is written under a lock held until renamed, and the next run deletes those it can lock (one log
    line); one a live run holds stays."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time
    rng = np.random.default_rng(3)
    for k in range(40):  # (0.4 s each: the first run still encodes when the second has started)
        save_audio(str(tmp_path / "audio" / f"f{k}.wav"), 0.1 * rng.standard_normal((1, 8_000)).astype(np.float32),
                   16000)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def encoder():
        return subprocess.Popen([sys.executable, "-c", KILLED_ENCODER, str(tmp_path / "audio"),
                                 str(tmp_path / "latents")], cwd=repo, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def wait_for(pattern, child):
        deadline = time.monotonic() + 60
        while not list((tmp_path / "latents").glob(pattern)):
            assert child.poll() is None and time.monotonic() < deadline, f"no {pattern} seen"
            time.sleep(0.02)

    first = encoder()  # holds the partial
    try:
        wait_for("*/shard_00000.progress.jsonl", first)
        second = encoder()  # finds the partial held: encodes into a temporary of its own
        try:
            wait_for("*/.shard_00000.bin.*.tmp", second)
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    folder, = (tmp_path / "latents").iterdir()
    orphan, = folder.glob(".shard_00000.bin.*.tmp")
    logs = []
    assert prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=logs.append) == folder
    assert (folder / "manifest.json").is_file() and not orphan.exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert f"removed 1 temporaries of runs killed while encoding {folder} ({orphan.name})" in logs
    live = folder / ".shard_00000.bin.0123abcd.tmp"  # a run writing its own now (its lock held)
    with open(live, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        logs.clear()
        prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=logs.append)
        assert live.exists() and logs == []
    prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=logs.append)
    assert not live.exists() and len(logs) == 1


def test_ctrl_c_while_encoding_keeps_the_files_done(codec, folder, monkeypatch):
    """Ctrl-C (or an error) between two commits: the files encoded since the last one are committed
    on the way out, so the next run takes them over rather than encoding them again."""
    import model.latents as latents
    encode, calls = latents._encode, []

    def interrupted_in_the_second_file(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*args)

    monkeypatch.setattr(latents, "_encode", interrupted_in_the_second_file)
    kw = dict(channels="mono", out_dir=str(folder / "latents"), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(str(folder / "audio"), codec, **kw)
    monkeypatch.undo()
    logs = []
    out = prepare_latents(str(folder / "audio"), codec, **{**kw, "log": logs.append})
    assert logs[1] == f"resuming the encoding of {out}: 1 of 2 files were done by a run that stopped"
    alone = prepare_latents(str(folder / "audio"), codec, **{**kw, "out_dir": str(folder / "alone")})
    assert (out / "shard_00000.bin").read_bytes() == (alone / "shard_00000.bin").read_bytes()


def test_a_sigterm_while_a_trainer_encodes_keeps_the_files_done_and_is_one_line(codec, folder):
    """A SIGTERM (`kill`, a scheduler's) while a trainer encodes, outside its training loop, ended
    the process at once, silently, losing what was encoded since the last commit (up to 5 s),
    where a Ctrl-C there commits it. Now it is handled as Ctrl-C is (here in a real process, by
    run_script, as both trainers run): the files done are committed and the next run takes them
    over; one line says how to go on, exit status 143."""
    import signal
    import subprocess
    import sys
    out_dir = folder / "latents"
    code = (
        "import time, torch\n"
        "from config.codec_config import PRESETS\n"
        "from model import Codec, build\n"
        "import model.latents as latents\n"
        "from model.training import run_script\n"
        "torch.manual_seed(0)\n"
        "codec = build(Codec, PRESETS['tiny']).eval()  # the `codec` fixture's weights\n"
        "encode, calls = latents._encode, []\n"
        "def slow_in_the_second_file(*args):\n"
        "    calls.append(args)\n"
        "    if len(calls) == 2:\n"
        "        print('in the second file', flush=True)\n"
        "        time.sleep(60)\n"
        "    return encode(*args)\n"
        "latents._encode = slow_in_the_second_file\n"
        f"run_script(lambda: latents.prepare_latents({str(folder / 'audio')!r}, codec, 'mono', {str(out_dir)!r}, "
        "log=lambda m: None))\n")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "in the second file\n"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    said = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("encoding:")]
    assert run.returncode == 143 and said == ["interrupted (SIGTERM): run the same command to resume"], err
    logs = []
    out = prepare_latents(str(folder / "audio"), codec, "mono", str(out_dir), log=logs.append)
    assert logs[1] == f"resuming the encoding of {out}: 1 of 2 files were done by a run that stopped"
    alone = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "alone"), log=lambda m: None)
    assert (out / "shard_00000.bin").read_bytes() == (alone / "shard_00000.bin").read_bytes()


def test_a_corpus_too_short_to_predict_anything_is_refused_before_encoding(codec, tmp_path):
    """Files under 2 latents (here 1.5 and 0.5) give crops with no prediction in them: a corpus of
    only those trained on nothing and validated to a loss of 0 (which every checkpoint "improved" on).
    Refused, naming the folder, from the headers before anything is encoded."""
    rng = np.random.default_rng(0)
    for name, n in (("a.wav", 3_000), ("b.wav", 1_000)):
        save_audio(str(tmp_path / "audio" / name), 0.1 * rng.standard_normal((1, n)).astype(np.float32), 16000)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'audio'}: no audio file is at least 2 "
                                                          "latents (0.25 s) long (the longest is 0.188 s)")):
        prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=lambda m: None)
    assert not (tmp_path / "latents").exists()


def test_files_shorter_than_two_latents_are_left_out_and_named(codec, folder):
    """A file of one latent (its crop predicts nothing) was encoded and drawn for crops, one of
    less than a latent dropped, both without a word: now both are left out before encoding, named
    together in one warning and counted in the log line."""
    rng = np.random.default_rng(1)
    for name, n in (("one.wav", 3_000), ("blip.wav", 1_000)):
        save_audio(str(folder / "audio" / name), 0.1 * rng.standard_normal((1, n)).astype(np.float32), 16000)
    logs = []
    with pytest.warns(SkippedAudioWarning) as record:
        out = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=logs.append)
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedAudioWarning)]
    assert messages == [f"skipping 2 audio files in {folder / 'audio'} shorter than 2 latents (0.25 s): "
                        "blip.wav, one.wav"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["solo.wav", "talk.wav"]
    assert logs[-1].endswith("from 2 files; 2 too short to use (named above)")


@pytest.mark.parametrize("argument, value", [("channels", "duplex"), ("mono_to_stereo", "silent"),
                                             ("model_channel", 2)])
def test_a_bad_argument_is_refused_naming_it_before_encoding(codec, folder, argument, value):
    """mono_to_stereo="silent" was found by the first one-channel file, mid-encoding, as two_speakers'
    "mono must be 'silence' or 'duplicate'"; each argument is now checked first, by its name."""
    kw = {"channels": "stereo", "out_dir": str(folder / "latents"), "log": lambda m: None, argument: value}
    with pytest.raises(ValueError, match=f"^{argument} must be "):
        prepare_latents(str(folder / "audio"), codec, **kw)
    assert not (folder / "latents").exists()


def test_fingerprint_covers_exactly_the_architecture_fields(codec):
    """The latent cache is keyed by the fingerprint: every field marked `arch` changes it, no
    other field does (so a run's batch size or paths never invalidate encoded corpora)."""
    cfg, base = codec.config, codec_fingerprint(codec)
    arch = set(fields_marked(CodecConfig, "arch"))

    def other(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value * 2 + 1
        if isinstance(value, tuple):
            return value + (1,)
        return (value or "") + "x"  # a string, or None (init_from)

    try:
        for f in dataclasses.fields(cfg):
            codec.config = dataclasses.replace(cfg, **{f.name: other(getattr(cfg, f.name))})
            assert (codec_fingerprint(codec) != base) == (f.name in arch), f.name
    finally:
        codec.config = cfg
    assert codec_fingerprint(codec) == base


def test_crops_pad_short_files_and_are_reproducible(codec, folder):
    out = prepare_latents(str(folder / "audio"), codec, "stereo", str(folder / "latents"), log=lambda m: None)
    train = LatentCrops(out, seq_len=4, train=True, seed=3)
    assert all(torch.equal(train[i]["posterior"], train[i]["posterior"]) for i in range(5))
    val = LatentCrops(out, seq_len=4, train=False)
    assert val.crops == [(0, 0), (1, 0)]  # solo.wav (3 latents), talk.wav (5 latents: one full crop)
    solo = val[0]
    assert solo["valid"].tolist() == [True, True, True, False] and solo["posterior"][3].abs().sum() == 0
    z = sample_posterior(solo["posterior"][None], torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 64)


def test_crops_read_the_shard_as_stored_and_a_shard_cut_short_since_is_an_error_naming_it(codec, folder):
    """Crops are the shard's rows bit for bit. A shard cut short while a run reads it (rewritten in
    place: `rsync --inplace`, a network file system) was read through a memory map, where a page
    past its new end is a SIGBUS that killed the trainer without a word; now a LatentsError naming
    the folder, the shard and what it holds."""
    out = prepare_latents(str(folder / "audio"), codec, "stereo", str(folder / "latents"), log=lambda m: None)
    val = LatentCrops(out, seq_len=4, train=False)
    for k, name in enumerate(["solo.wav", "talk.wav"]):
        stored = rows(out, name)[:4]
        assert torch.equal(val[k]["posterior"][:len(stored)], stored)
    shard = json.loads((out / "manifest.json").read_text())["files"][1]["shard"]
    os.truncate(out / shard, 100)
    with pytest.raises(LatentsError) as error:
        val[1]
    assert str(error.value).startswith(f"latents folder {out} is damaged: {shard} changed since the run started: it "
                                       "holds 100 bytes, shorter than the ")
    assert isinstance(error.value, FileNotFoundError) and f"delete {out} and run again" in str(error.value)


def test_sampler_resumes_where_it_stopped():
    full = StepSampler(batch_size=3, grad_accum_steps=2, rank=1, world_size=2)
    resumed = StepSampler(batch_size=3, grad_accum_steps=2, rank=1, world_size=2, start_step=2)
    first = list(itertools.islice(iter(full), 3 * 2 * 4))
    assert list(itertools.islice(iter(resumed), 12)) == first[12:]
    other = list(itertools.islice(iter(StepSampler(3, 2, rank=0, world_size=2)), 24))
    assert not set(first) & set(other)  # ranks read disjoint samples


def test_non_finite_audio_is_skipped_and_named(codec, folder):
    import soundfile as sf
    bad = 0.1 * np.ones((6_000, 2), np.float32)
    bad[4_321, 1] = np.nan
    sf.write(str(folder / "audio" / "nan.wav"), bad, 16000, subtype="FLOAT")
    logs = []
    with pytest.warns(SkippedAudioWarning, match="nan.wav: 1 non-finite samples"):
        out = prepare_latents(str(folder / "audio"), codec, "stereo", str(folder / "latents"), log=logs.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["solo.wav", "talk.wav"]
    assert "1 unreadable files skipped" in logs[-1]
    assert np.isfinite(np.fromfile(out / "shard_00000.bin", dtype=np.float32)).all()


def test_non_finite_latents_are_never_cached(codec, folder):
    broken = build(Codec, CODEC_PRESETS["tiny"]).eval()
    broken.load_state_dict(codec.state_dict())
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with warnings.catch_warnings(record=True) as record, pytest.raises(FileNotFoundError, match="2 skipped"):
        warnings.simplefilter("always")
        prepare_latents(str(folder / "audio"), broken, "mono", str(folder / "latents"), log=lambda m: None)
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedAudioWarning)]
    assert len(messages) == 2 and all("non-finite latents" in m for m in messages)
    assert {"solo.wav", "talk.wav"} == {m.split("/")[-1].split(":")[0] for m in messages}
    assert not list((folder / "latents").glob("*/manifest.json"))
    assert all(p.stat().st_size == 0 for p in (folder / "latents").glob("*/shard_*.bin"))


def test_files_skipped_when_encoded_are_counted_for_what_was_wrong(codec, folder):
    """A file decoding shorter than its header says, or encoding to non-finite latents, was counted
    as "unreadable" in the log line; each is now counted for what it is."""
    from model.data import scan_audio_folder
    loud = 50 * np.random.default_rng(3).standard_normal((1, 6_000)).astype(np.float32)  # loud, not broken (< 1e3)
    save_audio(str(folder / "audio" / "loud.wav"), loud, 16000, subtype="FLOAT")
    cut = folder / "audio" / "cut.wav"
    save_audio(str(cut), 0.1 * np.ones((1, 6_000), np.float32), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan_audio_folder(str(folder / "audio"))  # the index now says cut.wav holds 6000 samples
    st = cut.stat()
    save_audio(str(cut), 0.1 * np.ones((2, 3_000), np.float32), 16000)  # 3000 of stereo: the same size
    os.utime(cut, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed_after_the_scan(folder / "audio")  # (replaced after the scan: its index still says 6000)
    touchy = build(Codec, CODEC_PRESETS["tiny"]).eval()  # overflows to inf on loud.wav only
    touchy.load_state_dict(codec.state_dict())
    with torch.no_grad():  # the means' rows only: scaling the whole encoder made every file's log-variance ~1e35,
        magnitudes = touchy.compressor.proj_in.parametrizations.weight.original0  # whose samples overflow too
        magnitudes[:len(magnitudes) // 2].mul_(1e37)
    logs = []
    with pytest.warns(SkippedAudioWarning) as record:
        prepare_latents(str(folder / "audio"), touchy, "mono", str(folder / "latents"), log=logs.append)
    assert [re.sub(r": .*", "", str(w.message)).split("/")[-1] for w in record] == ["cut.wav", "loud.wav"]
    assert logs[-1].endswith("from 2 files; 1 files decoded shorter than their headers say, 1 files encoded to "
                             "non-finite latents (named above)"), logs[-1]


def test_draw_and_indices_name_what_a_step_reads(codec, folder):
    out = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    train = LatentCrops(out, seq_len=2, train=True, seed=1)
    sampler = StepSampler(batch_size=3, grad_accum_steps=2, rank=1, world_size=2)
    stream = list(itertools.islice(iter(sampler), 6 * 3))
    assert sampler.indices(2) == stream[12:18]
    for j in sampler.indices(2):
        assert torch.equal(train[j]["posterior"], train.crop(*train.draw(j))["posterior"])


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "manifest.json").write_text("{not json"), "its manifest.json cannot be read (JSONDecodeError"),
    (lambda out: (out / "manifest.json").write_text("[]"), "its manifest.json cannot be read (AttributeError"),
    (lambda out: os.truncate(out / "shard_00000.bin", 1000), "shard_00000.bin holds 1000 bytes, where its "
                                                                "manifest.json lists 8 latents (2048 bytes)"),
    (lambda out: (out / "shard_00000.bin").unlink(), "shard_00000.bin is missing"),
    (lambda out: (out / "manifest.json").write_text(
        (out / "manifest.json").read_text().replace('"format": 1', '"format": 0')), "another version of this code"),
    (lambda out: (out / "manifest.json").write_text(
        re.sub(r'"codec": "\w+"', '"codec": "0123456789abcdef"', (out / "manifest.json").read_text())),
     "encoded by codec 0123456789abcdef, not by this run's codec"),
], ids=["not-json", "not-an-object", "truncated-shard", "deleted-shard", "old-format", "another-codec"])
def test_a_damaged_encoded_folder_is_refused_naming_it(codec, folder, damage, message):
    """A damaged cache (truncated or deleted shard, a manifest that is not JSON) or one of another
    version or codec: a LatentsError (a FileNotFoundError: one `error:` line) naming the folder and
    the fix, when the folder is opened; it was a JSONDecodeError, a crop's RuntimeError mid-training,
    or numpy's "cannot mmap an empty file" traceback."""
    out = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    damage(out)
    with pytest.raises(LatentsError, match=re.escape(message)) as error:
        prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    assert isinstance(error.value, FileNotFoundError) and f"delete {out} and run again" in str(error.value)
    if "codec" not in message:  # the crops check what they can without the codec
        with pytest.raises(LatentsError, match=re.escape(message)):
            LatentCrops(out, seq_len=4)


def test_a_shard_holding_nan_is_refused_when_a_crop_reads_it(codec, folder):
    """Latents that became NaN on disk (prepare_latents never writes any): every validation loss
    came out NaN, silently (no best checkpoint ever), and a training step stopped on a "non-finite
    loss: lower the learning rate"; the crop now names the damaged folder, the file and the fix."""
    out = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    talk = next(e for e in manifest["files"] if e["name"] == "talk.wav")
    data = np.fromfile(out / talk["shard"], dtype=np.float32).reshape(-1, 2, 32)
    data[talk["offset"] + 3, 1, 7] = np.nan
    data.tofile(out / talk["shard"])
    val = LatentCrops(out, seq_len=4, train=False)
    assert val[0]["posterior"].isfinite().all()  # solo.wav
    with pytest.raises(LatentsError, match=re.escape(f"latents folder {out} is damaged: {talk['shard']} holds "
                                                     f"non-finite values in the latents of talk.wav (0 to 4); delete")):
        val[1]


def test_a_full_disk_while_encoding_is_one_error_naming_the_shard_and_the_next_run_resumes(codec, tmp_path):
    """latents_dir on an 8 KiB tmpfs (a real full disk; needs the right to mount): the encoding
    stopped with an OSError traceback from closing its progress log (its buffered lines could not be
    flushed either) instead of the CheckpointError naming the shard. Once there is room again the
    next call takes over what was committed and ends with what an encoding elsewhere writes."""
    import subprocess
    rng = np.random.default_rng(3)
    for k in range(6):
        save_audio(str(tmp_path / "audio" / f"f{k}.wav"), 0.1 * rng.standard_normal((1, 8_000 + 2_000 * k)).astype(
            np.float32), 16000)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        kw = dict(channels="mono", out_dir=str(disk / "latents"), log=lambda m: None)
        with pytest.raises(CheckpointError, match=r"^cannot write \S+/shard_00000.bin: No space left on device$"):
            prepare_latents(str(tmp_path / "audio"), codec, **kw)
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        out = prepare_latents(str(tmp_path / "audio"), codec, **kw)
        alone = prepare_latents(str(tmp_path / "audio"), codec, **{**kw, "out_dir": str(tmp_path / "alone")})
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in alone.iterdir())
        for p in alone.iterdir():
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_manifest_temporary_of_a_run_killed_before_its_rename_is_removed_by_the_next(codec, folder):
    """A run SIGKILLed between writing the folder's `.manifest.json.<hex>.tmp` (or a shard list's
    `.shard_R.json.<hex>.tmp`) and renaming it left it for good: the next run removed only private
    shard temporaries. It removes every temporary of a run that is gone, in its one log line."""
    from killed_writer import killed_writer
    code = ("import sys, torch\nfrom config.codec_config import PRESETS\nfrom model import Codec, build\n"
            "from model.latents import prepare_latents\ntorch.manual_seed(0)\n"
            f"prepare_latents({str(folder / 'audio')!r}, build(Codec, PRESETS['tiny']).eval(), 'mono', "
            f"{str(folder / 'latents')!r}, log=lambda line: None)\n")
    name = killed_writer(code, "manifest.json")
    out, = (folder / "latents").iterdir()
    assert (out / name).is_file() and not (out / "manifest.json").exists()
    logs = []
    assert prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=logs.append) == out
    assert (out / "manifest.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert f"removed 1 temporaries of runs killed while encoding {out} ({name})" in logs


def test_a_latents_dir_it_cannot_write_in_is_one_error_before_encoding(folder):
    """A latents_dir this process may not write in (read-only, another user's: a shared cache) and a
    corpus not encoded there yet: a PermissionError traceback from making the folder. It is one
    CheckpointError naming the folder, before any encoding; a corpus encoded there is still read. (The
    corpus is first encoded there by this process, with the seed-0 codec the child process builds.)"""
    import subprocess
    import sys
    from unprivileged import unprivileged
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, torch\nfrom config.codec_config import PRESETS\nfrom model import Codec, build\n"
            "from model.checkpoint import CheckpointError\nfrom model.latents import prepare_latents\n"
            "torch.manual_seed(int(sys.argv[1]))\n"
            "try:\n"
            f"    print(prepare_latents({str(folder / 'audio')!r}, build(Codec, PRESETS['tiny']).eval(), 'mono', "
            f"{str(folder / 'latents')!r}, log=lambda line: None))\n"
            "except CheckpointError as e:\n"
            "    print('error:', e)\n")
    latents = folder / "latents"
    latents.mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    encoded = f"{prepare_latents(str(folder / 'audio'), codec, 'mono', str(latents), log=lambda line: None)}\n"
    assert encoded.startswith(str(latents)), encoded
    before = sorted(p.name for p in latents.rglob("*"))
    for path in [latents, *latents.iterdir()]:
        path.chmod(0o555)
    try:
        runs = [subprocess.run(unprivileged() + [sys.executable, "-c", code, seed], cwd=repo, capture_output=True,
                               text=True, timeout=120) for seed in ("0", "1")]  # seed 1: another codec
    finally:
        for path in [latents, *latents.iterdir()]:
            path.chmod(0o755)
    assert runs[0].returncode == 0 and runs[0].stdout == encoded, runs[0].stderr[-2000:]  # read, as before
    assert runs[1].returncode == 0 and "Traceback" not in runs[1].stderr, runs[1].stderr[-2000:]
    assert re.fullmatch(rf"error: cannot write {re.escape(str(latents))}/audio-mono-[0-9a-f]+: Permission denied; "
                        r"encode into a latents_dir this process can write\n", runs[1].stdout), runs[1].stdout
    assert sorted(p.name for p in latents.rglob("*")) == before


def test_a_file_decoding_well_short_of_its_header_is_skipped_not_encoded_in_part(codec, folder):
    """An MP3 cut short by an interrupted download, whose Xing header still counts 20 s, decodes to
    what is left (6 s): it was encoded to the latents of that, silently, where the codec trainer's
    loader skips such a file (a second and a tenth of it missing); now it is skipped and named."""
    import soundfile as sf
    from model.audio import audio_info
    t = np.arange(20 * 16000) / 16000
    path = folder / "audio" / "cut.mp3"
    try:
        sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="MPEG_LAYER_III")
    except Exception as e:  # an old libsndfile without an MP3 encoder
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    os.truncate(path, int(path.stat().st_size * 0.3))
    assert audio_info(str(path))[0] >= 20 * 16000 - 2000  # the header's length: the case at hand
    with pytest.warns(SkippedAudioWarning) as record:
        out = prepare_latents(str(folder / "audio"), codec, "mono", str(folder / "latents"), log=lambda m: None)
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedAudioWarning)]
    assert len(messages) == 1 and re.fullmatch(
        rf"skipping {re.escape(str(path))}: it ends before its header says \(\d+ of \d+ samples decoded: a file cut "
        r"short, or replaced since the scan\?\)", messages[0]), messages
    assert sorted(e["name"] for e in json.loads((Path(out) / "manifest.json").read_text())["files"]) == \
        ["solo.wav", "talk.wav"]
