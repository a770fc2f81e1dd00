"""jsonl manifests as training data (model/manifest.py): the same files and latents as a folder,
bad lines as one error naming the manifest and the line, `model_channel` swapping the speakers
of stereo files, and both trainers run on manifests (their `main`s in the test process)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from model import Codec, build, save_codec
from model.data import AudioCropDataset, scan_audio_folder
from model.latents import prepare_latents
from model.manifest import ManifestError, read_manifest

from test_latents import rows

REPO = Path(__file__).resolve().parents[1]
SR = 16000
pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(seconds, seed):
    """Two different speakers (noise-modulated tones), one per channel: (N, 2) as soundfile writes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    a = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) * (rng.random(t.size) > 0.3)
    b = 0.2 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 0.5 * t) > 0)
    return np.stack([a, b], axis=1).astype(np.float32)


def write_corpus(root: Path, files: int = 3, seconds: float = 9.0) -> list[str]:
    """Stereo dialogues in two subfolders (one FLAC at 24 kHz), a mono monologue, and the
    manifest `root/train.jsonl` listing them with paths relative to `root`."""
    paths = []
    for i in range(files):
        rel = f"{'a' if i % 2 else 'b'}/dialogue_{i}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, conversation(seconds, i), SR)
        paths.append(rel)
    (root / "c").mkdir(exist_ok=True)
    stereo = conversation(seconds, 7)
    sf.write(root / "c/call.flac", np.stack([np.interp(np.arange(int(seconds * 24000)) / 24000,
                                                       np.arange(len(stereo)) / SR, stereo[:, k]) for k in (0, 1)], 1),
             24000)
    sf.write(root / "c/solo.wav", conversation(seconds, 9)[:, 0], SR)
    paths += ["c/call.flac", "c/solo.wav"]
    with open(root / "train.jsonl", "w") as f:
        for rel in paths:
            f.write(json.dumps({"path": rel, "duration": seconds}) + "\n")
    return paths


@pytest.fixture(scope="module")
def codec_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_codec(tmp_path_factory.mktemp("codec") / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return build(Codec, CODEC_PRESETS["tiny"]).eval()


def test_manifest_lists_the_same_files_as_the_folder(tmp_path):
    paths = write_corpus(tmp_path / "corpus")
    listed = scan_audio_folder(str(tmp_path / "corpus" / "train.jsonl"))
    folder = scan_audio_folder(str(tmp_path / "corpus"))
    assert [f.path for f in listed] == [f.path for f in folder] == sorted(str(tmp_path / "corpus" / p) for p in paths)
    assert [(f.frames, f.sample_rate, f.channels) for f in listed] == [(f.frames, f.sample_rate, f.channels)
                                                                        for f in folder]
    assert listed.root == folder.root and listed.source.endswith("train.jsonl")
    # the codec trainer's crops: stereo files mixed down to mono, as from a folder
    crops = AudioCropDataset(str(tmp_path / "corpus" / "train.jsonl"), 1.0, SR, train=False)
    first = crops[0]["audio"]
    assert first.shape == (1, SR)
    assert torch.allclose(first[0], torch.from_numpy(conversation(9.0, 1)[:SR].mean(1)), atol=1e-4)  # a/dialogue_1
    # an absolute path is allowed; a manifest may list a subset, in any order
    sub = tmp_path / "elsewhere" / "some.jsonl"
    sub.parent.mkdir()
    sub.write_text(json.dumps({"path": str(tmp_path / "corpus/c/solo.wav")}) + "\n\n"
                   + json.dumps({"path": "../corpus/a/dialogue_1.wav", "duration": 9}) + "\n")
    assert [Path(f.path).name for f in scan_audio_folder(str(sub))] == ["dialogue_1.wav", "solo.wav"]


@pytest.mark.parametrize("line, message", [
    ('{"path": "a/dialogue_1.wav", "duration": 9.0', "line 2: not JSON"),
    ('{"duration": 9.0}', 'line 2: expected an object with a "path" string'),
    ('["a/dialogue_1.wav"]', 'line 2: expected an object with a "path" string'),
    ('{"path": "a/gone.wav"}', "line 2: no such file: {root}/a/gone.wav"),
    ('{"path": "a"}', "line 2: {root}/a is a folder, not a file"),  # was "no such file: .../a"
    ('{"path": "a/dialogue_1.wav", "duration": "long"}', 'line 2: "duration" must be a number'),
    ('{"path": "b/dialogue_0.wav"}', "line 2: b/dialogue_0.wav is listed twice (lines 1 and 2)"),
    ("[" * 100_000 + "]" * 100_000, "line 2: not JSON (JSON nested too deep)"),  # was a RecursionError traceback
], ids=["json", "no-path", "not-object", "missing-file", "folder", "duration", "twice", "nested-too-deep"])
def test_bad_lines_name_the_manifest_and_the_line(tmp_path, line, message):
    write_corpus(tmp_path)
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"path": "b/dialogue_0.wav"}) + "\n" + line + "\n"
                        + json.dumps({"path": "c/solo.wav"}) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(manifest)
    assert str(e.value).startswith(f"manifest {manifest} line 2: ") and message.format(root=tmp_path) in str(e.value)
    with pytest.raises(ManifestError):  # the datasets read manifests through the same function
        scan_audio_folder(str(manifest))


def test_comment_lines_are_ignored_and_a_bad_line_after_them_keeps_its_number(tmp_path):
    """A `#` line (a header, a file left out for now) was 'line N: not JSON'; list files commonly take
    comments, and no JSON line starts with `#`. Line numbers still count them."""
    write_corpus(tmp_path)
    manifest = tmp_path / "commented.jsonl"
    manifest.write_text("# calls, recorded 2024\n" + json.dumps({"path": "b/dialogue_0.wav"}) + "\n"
                        + '  # {"path": "a/dialogue_1.wav"}  (left out for now)\n' + json.dumps({"path": "c/solo.wav"}) + "\n")
    assert read_manifest(manifest) == [str(tmp_path / "b/dialogue_0.wav"), str(tmp_path / "c/solo.wav")]
    manifest.write_text("# header\n" + json.dumps({"path": "b/dialogue_0.wav"}) + "\n{oops\n")
    with pytest.raises(ManifestError, match=r"line 3: not JSON"):
        read_manifest(manifest)


def test_a_file_listed_under_two_paths_is_listed_twice(tmp_path):
    """A file listed through a linked folder and directly was read, encoded and trained on twice
    (its crops drawn twice as often), silently; refused as a file listed twice is."""
    write_corpus(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "b")
    manifest = tmp_path / "linked.jsonl"
    manifest.write_text('{"path": "b/dialogue_0.wav"}\n{"path": "c/solo.wav"}\n{"path": "link/dialogue_0.wav"}\n')
    with pytest.raises(ManifestError) as e:
        read_manifest(manifest)
    assert str(e.value) == (f"manifest {manifest} line 3: link/dialogue_0.wav is listed twice (lines 1 and 3) (as "
                            f"{tmp_path / 'b/dialogue_0.wav'} there: the same file under another path)")
    os.link(tmp_path / "c/solo.wav", tmp_path / "c/hard.wav")  # a hard link: another path, the same inode
    manifest.write_text('{"path": "c/solo.wav"}\n{"path": "c/hard.wav"}\n')
    with pytest.raises(ManifestError, match=r"line 2: c/hard.wav is listed twice \(lines 1 and 2\)"):
        read_manifest(manifest)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    """A manifest saved in another encoding (here Latin-1): the line named, not a UnicodeDecodeError
    traceback from the middle of the file's reading."""
    write_corpus(tmp_path)
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(json.dumps({"path": "b/dialogue_0.wav"}).encode() + b"\n"
                         + '{"path": "a/dialogue_1.wav", "speaker": "Jos\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ManifestError) as e:
        read_manifest(manifest)
    assert str(e.value) == f"manifest {manifest} line 2: not UTF-8 text (invalid continuation byte at byte 44)"


def test_a_manifest_saved_on_windows_reads_as_it_is(tmp_path):
    """A manifest saved by Notepad or Excel ("UTF-8" there: a byte-order mark, CRLF line ends,
    blank lines) was refused at line 1 as "not JSON (Unexpected UTF-8 BOM ...)"."""
    write_corpus(tmp_path)
    manifest = tmp_path / "windows.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + b'{"path": "b/dialogue_0.wav"}\r\n\r\n{"path": "c/solo.wav"}\r\n')
    assert read_manifest(manifest) == [str(tmp_path / "b" / "dialogue_0.wav"), str(tmp_path / "c" / "solo.wav")]


def test_missing_files_are_counted_and_an_empty_manifest_is_an_error(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"x{i}.wav"}) + "\n" for i in range(3)))
    with pytest.raises(ManifestError, match=r"line 1: no such file: .*x0.wav \(and 2 more missing files\)"):
        read_manifest(manifest)
    manifest.write_text("\n")
    with pytest.raises(ManifestError, match="lists no files"):
        read_manifest(manifest)


def test_manifest_and_folder_give_the_same_latents_and_model_channel_swaps_speakers(codec, tmp_path):
    write_corpus(tmp_path / "corpus", files=2, seconds=1.5)
    quiet = dict(log=lambda m: None)
    by_folder = prepare_latents(str(tmp_path / "corpus"), codec, "stereo", str(tmp_path / "latents-folder"), **quiet)
    by_manifest = prepare_latents(str(tmp_path / "corpus/train.jsonl"), codec, "stereo",
                                  str(tmp_path / "latents-manifest"), **quiet)
    swapped = prepare_latents(str(tmp_path / "corpus/train.jsonl"), codec, "stereo",
                              str(tmp_path / "latents-manifest"), model_channel=0, **quiet)
    assert swapped != by_manifest and swapped.parent == by_manifest.parent  # another cache key, another folder
    assert json.loads((swapped / "manifest.json").read_text())["model_channel"] == 0
    names = [e["name"] for e in json.loads((by_folder / "manifest.json").read_text())["files"]]
    assert names == [e["name"] for e in json.loads((by_manifest / "manifest.json").read_text())["files"]]
    assert names == ["a/dialogue_1.wav", "b/dialogue_0.wav", "c/call.flac", "c/solo.wav"]
    for name in names:
        plain = rows(by_folder, name)  # (L, 2, 64): [mu, logvar], channel 0's 32 dims first
        assert torch.equal(rows(by_manifest, name), plain)
        swap = rows(swapped, name)
        if name == "c/solo.wav":  # one channel: mono_to_stereo decides, the swap does not apply
            assert torch.equal(swap, plain)
        else:
            assert not torch.allclose(plain[..., :32], plain[..., 32:], atol=1e-3)  # two distinct speakers
            assert torch.allclose(swap[..., :32], plain[..., 32:], atol=1e-5)
            assert torch.allclose(swap[..., 32:], plain[..., :32], atol=1e-5)


def run(script, capsys, *args):
    """`python SCRIPT ARGS` by the trainer's `main` in this process (`in_process.run_in_process`), as
    `subprocess.run` returns it: what is tested is the training on a manifest and its error line, not
    the process, whose start (importing torch, the optimizers' Dynamo) took seconds a run."""
    import importlib

    from in_process import run_in_process
    return run_in_process(script, importlib.import_module(Path(script).stem).main, args, capsys)


@pytest.mark.slow
def test_train_transformer_on_a_stereo_manifest(codec_file, tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    common = ["--config", "tiny", f"codec_checkpoint={codec_file}", f"latents_dir={tmp_path / 'latents'}",
              f"train_data_path={tmp_path / 'corpus/train.jsonl'}",
              "wandb=disabled", "max_steps=2", "eval_interval=2", "save_interval=2", "log_interval=1",
              "batch_size=2", "val_crops=2", "sample_seconds=0", "seq_len=16"]
    out = run("train_transformer.py", capsys, *common, f"val_data_path={tmp_path / 'corpus/train.jsonl'}",
              f"checkpoint_dir={tmp_path / 'run'}", "model_channel=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "in 5 files" in out.stdout + out.stderr
    assert (tmp_path / "run" / "latest.pt").is_file()
    encoded = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert len(encoded) == 1 and encoded[0].startswith("train.jsonl-stereo-")  # train and val: the same files

    # a bad line: one error line naming the manifest and the line, before any latent is encoded
    bad = tmp_path / "corpus" / "val.jsonl"
    bad.write_text(json.dumps({"path": "c/solo.wav"}) + "\n" + json.dumps({"path": "c/nope.wav"}) + "\n")
    common = [a.replace(str(tmp_path / "latents"), str(tmp_path / "latents2")) for a in common]
    out = run("train_transformer.py", capsys, *common, f"checkpoint_dir={tmp_path / 'run2'}", f"val_data_path={bad}")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert f"val_data_path: manifest {bad} line 2: no such file: {tmp_path}/corpus/c/nope.wav" in errors[0]
    assert not (tmp_path / "latents2").exists() and not (tmp_path / "run2" / "latest.pt").exists()


@pytest.mark.slow
def test_train_codec_on_a_manifest_mixes_stereo_down(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", seconds=3.0)
    manifest = tmp_path / "corpus/train.jsonl"
    out = run("train_codec.py", capsys, "--config", "tiny", f"train_data_path={manifest}", f"val_data_path={manifest}",
              f"checkpoint_dir={tmp_path / 'run'}", "wandb=disabled", "max_steps=2", "eval_interval=2",
              "save_interval=2", "log_interval=1", "val_crops=2", "num_audio_samples=0")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert f"train: 5 files, 0.2 min in {manifest}" in log
    assert (tmp_path / "run" / "latest.pt").is_file()
    bad = tmp_path / "corpus/bad.jsonl"
    bad.write_text("{not json}\n")
    out = run("train_codec.py", capsys, "--config", "tiny", f"train_data_path={bad}", f"val_data_path={manifest}",
              f"checkpoint_dir={tmp_path / 'run2'}", "wandb=disabled", "max_steps=2")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert f"manifest {bad} line 1: not JSON" in errors[0]


def test_a_path_through_dotdot_is_the_file_the_os_opens(tmp_path):
    """A manifest in a linked folder (`~/data` -> `corpus/v2`) naming `../audio/call.wav`: the OS
    opens corpus/audio/call.wav, but the path was tidied by its text (`~/audio/call.wav`): the file
    meant was "no such file", or, with a file there, another file was checked and listed."""
    (tmp_path / "corpus" / "audio").mkdir(parents=True)
    sf.write(tmp_path / "corpus" / "audio" / "call.wav", np.full(3 * 16000, 0.1, dtype=np.float32), 16000)
    (tmp_path / "corpus" / "v2").mkdir()
    (tmp_path / "corpus" / "v2" / "train.jsonl").write_text(json.dumps({"path": "../audio/call.wav"}) + "\n")
    (tmp_path / "home").mkdir()
    os.symlink(tmp_path / "corpus" / "v2", tmp_path / "home" / "data")
    manifest = tmp_path / "home" / "data" / "train.jsonl"
    (tmp_path / "home" / "audio").mkdir()
    sf.write(tmp_path / "home" / "audio" / "call.wav", np.zeros(16000, dtype=np.float32), 16000)  # where the text leads
    files = scan_audio_folder(manifest)
    assert [(os.path.realpath(f.path), f.frames) for f in files] == \
        [(str(tmp_path / "corpus" / "audio" / "call.wav"), 3 * 16000)]
    os.remove(tmp_path / "home" / "audio" / "call.wav")
    assert len(read_manifest(manifest)) == 1


@pytest.mark.parametrize("line, message", [
    ('{"path": "a.wav", "duration": %s}' % ("9" * 400), '"duration" must be a number of seconds >= 0, got 99999'),
    ('{"path": "a\\u0000.wav"}', "the path 'a\\x00.wav' cannot name a file (a NUL character, or text that is not "
                                 "Unicode)"),
    ('{"path": "a\\ud800.wav"}', "the path 'a\\ud800.wav' cannot name a file"),
], ids=["huge-duration", "nul", "lone-surrogate"])
def test_a_line_the_os_cannot_take_is_a_manifest_error(tmp_path, line, message):
    """A duration of 400 digits (math.isfinite: OverflowError), a path with a NUL or a lone
    surrogate (the OS calls: ValueError, UnicodeEncodeError): tracebacks from the trainers."""
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path / "m.jsonl")
    assert str(e.value).startswith(f"manifest {tmp_path / 'm.jsonl'} line 1: {message}"), str(e.value)


def test_a_key_given_twice_in_a_line_is_an_error(tmp_path):
    """A line written by hand naming two files, {"path": "a.wav", "path": "b.wav"}: json.loads kept
    the last, silently (one file listed of the two meant)."""
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "m.jsonl").write_text('{"path": "a.wav", "path": "b.wav"}\n')
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path / "m.jsonl")
    assert str(e.value) == f"manifest {tmp_path / 'm.jsonl'} line 1: not JSON (key 'path' given twice in one object)"
