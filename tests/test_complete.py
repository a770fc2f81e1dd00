"""complete.py end to end in a subprocess, on tiny checkpoints written to a temporary folder; where the
process is not the subject (an error line, an output's contents), its `main` in the test process."""
import dataclasses
import os
import shutil
import re
import subprocess
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS
from model import Codec, HertzDev, build, load_codec, save_codec, save_transformer
from model.audio import AudioError

REPO = Path(__file__).resolve().parents[1]


def make_checkpoints(folder: Path) -> dict:
    """Tiny random codec, duplex and mono transformer checkpoints (ours), and prompt files."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    codec = str(save_codec(folder / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"])))
    paths = {"codec": codec}
    for name, duplex in (("duplex", True), ("mono", False)):
        model = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=duplex))
        paths[name] = str(save_transformer(folder / f"{name}.safetensors", model, codec_source=codec))
    t = np.arange(int(44100 * 1.5)) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(folder / "stereo.flac", stereo, 44100)  # resampled, 1.5 s -> 12 whole frames
    sf.write(folder / "mono.wav", 0.3 * np.sin(2 * np.pi * 200 * np.arange(16000 * 10) / 16000), 16000)
    paths["stereo"], paths["mono_prompt"] = str(folder / "stereo.flac"), str(folder / "mono.wav")
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "complete.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def run_here(capfd, *args):
    """`run` in this process (`complete.main` by `in_process.main_in_process`), as `run` returns it,
    without a process' start (importing torch: seconds a run). For runs whose subject is not the
    process: what it imports before torch (WITHOUT_TORCH), and the end-to-end runs, stay
    subprocesses."""
    import complete
    from in_process import main_in_process
    return main_in_process("complete.py", complete.main, args, capfd)


# complete.py run as its `python complete.py ...` runs it, reporting whether torch was imported by then
WITHOUT_TORCH = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "error: unrecognized arguments: --bogus (complete.py --help lists the flags)"),
    (["--dtype", "bf16"], "error: argument --dtype: invalid choice: 'bf16' (choose from 'auto', 'bfloat16', "
                          "'float16', 'float32') (complete.py --help lists the flags)"),
    (["--quantize", "int3"], "error: argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int4') "
                             "(complete.py --help lists the flags)")])
def test_a_mistyped_flag_is_its_error_line_before_torch_is_imported(tmp_path, flags, message):
    """complete.py imported torch (seconds) before parsing its flags, so a mistyped one waited for it
    before its one error line. The flags are parsed first, with nothing heavy imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(REPO / "complete.py"), str(tmp_path / "p.wav"),
                             str(tmp_path / "o.wav"), *flags], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == message, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stdout == "torch imported: False\n"


@pytest.mark.parametrize("prompt, out, flags, message", [
    ("p.wav", "o.wav", ["--seconds", "0"], "--seconds must be a finite number > 0, got 0.0"),
    ("p.wav", "o.wav", ["--seconds", "-2"], "--seconds must be a finite number > 0, got -2.0"),
    ("p.wav", "o.wav", ["--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    ("p.wav", "o.wav", ["--num", "0"], "--num must be an integer >= 1, got 0"),
    ("p.wav", "o.wav", ["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    ("p.wav", "o.wav", ["--token-temp", "inf"], "token_temp must be in [0, 5], got inf"),
    ("p.wav", "o.wav", ["--seed", "-1"], "--seed: seed must be an int in [0, 2**63), got -1"),
    ("missing.wav", "o.wav", [], "no such file: {tmp}/missing.wav"),
    # links leading to no file were "no such file" too, of a name that is there
    ("loop.wav", "o.wav", [], "{tmp}/loop.wav is a symbolic link in a loop of links (it leads to no file)"),
    ("dangling.wav", "o.wav", [], "{tmp}/dangling.wav is a symbolic link to gone.wav, which does not exist"),
    ("p.wav", "p.wav/o.wav", [], "cannot write {tmp}/p.wav/o.wav: {tmp}/p.wav is a file, not a folder"),
    # a folder that is a link to nothing (a disk not mounted): was "cannot make the folder ... (File exists)"
    ("p.wav", "unmounted/o.wav", [], "cannot write {tmp}/unmounted/o.wav: {tmp}/unmounted is a symbolic link to "
                                     "disk/outputs, which does not exist"),
    ("p.wav", "p.wav", [], "cannot write {tmp}/p.wav: it is the prompt, which the output would replace; "
                             "name another file"),
    ("p.wav", "o.wav", ["--variant", "nope"], "--variant 'nope' is neither one of duplex, mono, mono-pure-audio "
                                              "nor a file"),
    # a newline in the name made the error two lines
    ("miss\ning.wav", "o.wav", [], "no such file: {tmp}/miss\\ning.wav"),
    # bytes of another encoding in the name: soundfile refused it once the completion was made
    ("p.wav", "o\udce9.wav", [], "cannot write {tmp}/o\\udce9.wav: its name is not valid utf-8 (soundfile cannot "
                                 "open it); name it in utf-8"),
], ids=["seconds-0", "seconds-negative", "seconds-nan", "num-0", "top-p", "token-temp", "seed", "missing-prompt",
        "prompt-link-loop", "prompt-dangling-link", "out-under-a-file", "out-in-a-dangling-link", "out-is-the-prompt", "variant",
        "prompt-name-with-a-newline", "out-name-not-utf8"])
def test_a_wrong_value_or_path_is_its_error_line_before_torch_is_imported(tmp_path, prompt, out, flags, message):
    """The values of the flags (the sampling parameters, --seconds, --num, --seed), the prompt's path
    and the output's were checked after importing torch (about 4 s). Each is one error line, exit
    status 2, with torch not imported and no file written."""
    sf.write(tmp_path / "p.wav", np.zeros(16000), 16000)
    (tmp_path / "loop.wav").symlink_to("loop2.wav")
    (tmp_path / "loop2.wav").symlink_to("loop.wav")
    (tmp_path / "dangling.wav").symlink_to("gone.wav")
    (tmp_path / "unmounted").symlink_to("disk/outputs")
    before = sorted(tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(REPO / "complete.py"), str(tmp_path / prompt),
                             str(tmp_path / out), "--offline", "--ckpt-dir", str(tmp_path / "ckpt"), *flags],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"error: {message.format(tmp=tmp_path)}"], result.stderr[-2000:]
    assert result.stdout == "torch imported: False\n"
    assert sorted(tmp_path.iterdir()) == before


def corrupted_copy(path, folder: Path) -> Path:
    """A copy of the checkpoint at `path` with one bit of one weight flipped: reading its weights
    is an error (its content hash), so an error about something else shows it came first."""
    data = bytearray(Path(path).read_bytes())
    data[-100] ^= 0x01
    (folder / Path(path).name).write_bytes(bytes(data))
    return folder / Path(path).name


def codec_of_hop(folder: Path, strides: tuple) -> str:
    torch.manual_seed(0)
    cfg = dataclasses.replace(CODEC_PRESETS["tiny"], strides=strides)
    return str(save_codec(folder / f"codec-{np.prod(strides)}.safetensors", build(Codec, cfg)))


@pytest.mark.slow
def test_duplex_completion_writes_stereo(ckpts, tmp_path):
    out = tmp_path / "duplex.wav"
    r = run(ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 1, "--seed", 3, "--top-p", 0.9)
    assert r.returncode == 0, r.stderr
    info = sf.info(out)
    assert info.channels == 2 and info.samplerate == 16000 and info.frames == 2000 * (12 + 8)
    assert "latent/s" in r.stderr  # the progress bar
    again = tmp_path / "again.wav"
    r = run(ckpts["stereo"], again, "--variant", ckpts["duplex"], "--seconds", 1, "--seed", 3, "--top-p", 0.9)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(sf.read(out)[0], sf.read(again)[0])  # same seed, same file


@pytest.mark.slow
def test_mono_completion_trims_a_long_prompt_and_writes_one_file_per_completion(ckpts, tmp_path):
    out = tmp_path / "mono.wav"
    r = run(ckpts["mono_prompt"], out, "--variant", ckpts["mono"], "--seconds", 0.5, "--num", 2,
            "--continuation-only", "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "context" in r.stderr and "keeping its last 8.0 s" in r.stderr  # 10 s prompt, 64-latent context
    for i in range(2):
        info = sf.info(tmp_path / f"mono-{i}.wav")
        assert info.channels == 1 and info.frames == 2000 * 4


def test_bad_inputs_are_clear_errors(ckpts, tmp_path, capsys):
    import complete

    assert complete.main([str(tmp_path / "missing.wav"), str(tmp_path / "o.wav"), "--variant", ckpts["mono"]]) == 2
    assert "error" in capsys.readouterr().err
    missing_ckpt = str(tmp_path / "nope.safetensors")
    assert complete.main([ckpts["stereo"], str(tmp_path / "o.wav"), "--variant", missing_ckpt]) == 2
    assert "neither" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "cut.pt")  # a .pt cut short: it was a zipfile.BadZipFile traceback
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:200])
    assert complete.main([ckpts["stereo"], str(tmp_path / "o.wav"), "--variant", str(tmp_path / "cut.pt")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'cut.pt'}: expected a transformer checkpoint (.safetensors), "
                                       "found a PyTorch file cut short or damaged (an incomplete copy or download?)\n")
    with pytest.raises(SystemExit) as e:
        complete.main([ckpts["stereo"], str(tmp_path / "o.wav"), "--top-p", "0"])
    assert e.value.code == 2 and "top_p" in capsys.readouterr().err



def test_an_error_after_the_output_s_check_leaves_no_folder_it_made(ckpts, tmp_path, capsys):
    """The output's folder is made when the output is checked, before torch is imported; an error
    found after it (here a --device that is none) left that folder, empty, behind. A run that ends
    without writing takes away the folders it made; one that writes keeps them."""
    import complete

    out = tmp_path / "new" / "sub" / "o.wav"
    assert complete.main([ckpts["stereo"], str(out), "--variant", ckpts["duplex"], "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device 'tpu'")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "new").mkdir()  # a folder that was there stays, even empty
    assert complete.main([ckpts["stereo"], str(out), "--variant", ckpts["duplex"], "--device", "tpu"]) == 2
    assert [p.name for p in tmp_path.rglob("*")] == ["new"]
    assert complete.main([ckpts["stereo"], str(out), "--variant", ckpts["duplex"], "--seconds", "0.25",
                          "--device", "cpu"]) == 0
    assert sf.info(out).frames > 0


def test_a_prompt_the_codec_encodes_to_non_finite_latents_is_one_error_line_and_no_file(ckpts, tmp_path, capsys):
    """A float WAV peaking at 500 (finite, within what a prompt may hold) through the tiny untrained
    codec: its posterior's exp(logvar / 2) overflows to inf latents, and complete.py wrote a
    completion of NaN audio without a word. Now one error line naming the codec's latents, and no file."""
    import complete

    sf.write(tmp_path / "loud.wav", 500 * np.sin(np.arange(16000) / 3.0), 16000, subtype="FLOAT")
    out = tmp_path / "o.wav"
    assert complete.main([str(tmp_path / "loud.wav"), str(out), "--variant", ckpts["mono"], "--seconds", "0.25"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: the codec encodes this prompt audio to NaN or infinite latents (codec latents "
                              "are about unit scale, at most 10000)"), err
    assert not out.exists()


def test_a_pt_state_dict_names_the_flag_that_loads_the_official_weights_by_name(ckpts, tmp_path, capsys):
    """An official-style .pt given as --variant or --codec: the hint named the Python API
    (load_hertz_dev('duplex' | ...), load_codec('official')) to a user of the command line; it
    names the flag's value that loads them (--variant duplex | mono | ..., --codec official)."""
    import complete
    torch.save(build(Codec, CODEC_PRESETS["tiny"]).state_dict(), tmp_path / "official_layout.pt")
    pt, out = str(tmp_path / "official_layout.pt"), str(tmp_path / "out.wav")
    assert complete.main([ckpts["stereo"], out, "--variant", pt]) == 2
    assert capsys.readouterr().err == (f"error: {pt}: expected a transformer checkpoint (.safetensors), found a PyTorch "
                                       "state dict; official weights load by name: --variant duplex | mono | "
                                       "mono-pure-audio (init_from=official, load_hertz_dev('duplex'))\n")
    assert complete.main([ckpts["stereo"], out, "--variant", ckpts["mono"], "--codec", pt]) == 2
    assert capsys.readouterr().err == (f"error: {pt}: expected a codec checkpoint (.safetensors), found a PyTorch state "
                                       "dict; the official codec loads by name: --codec official "
                                       "(codec_checkpoint=official, load_codec('official'))\n")
    assert not os.path.exists(out)

def test_a_checkpoint_whose_codec_is_unknown_or_whose_weights_are_nan_is_one_error(ckpts, tmp_path, capsys):
    """A checkpoint recording a codec moved since, one recording none (saved without codec_source),
    one holding NaN weights under a matching hash: one `error:` line naming the file, before any
    weights load (NaN: when they are read), and no output. They were a FileNotFoundError traceback
    after the transformer's weights loaded, an AttributeError traceback after loading, and a
    completion written from NaN weights."""
    import complete
    from safetensors.torch import load_file, save_file
    from model.checkpoint import _header, content_hash
    from model.loading import write_transformer
    model = build(HertzDev, PRESETS["tiny"])
    shutil.copy(ckpts["codec"], tmp_path / "gone.safetensors")
    moved = save_transformer(tmp_path / "moved.safetensors", model, codec_source=str(tmp_path / "gone.safetensors"))
    os.remove(tmp_path / "gone.safetensors")
    no_codec = save_transformer(tmp_path / "no-codec.safetensors", model)  # built here: "auto" is no codec
    number = tmp_path / "number.safetensors"  # a header edited, or written by another tool: a TypeError traceback
    write_transformer(number, model, codec_source=7)  # the unchecked writer (save_transformer refuses a number)
    state, meta = load_file(ckpts["duplex"]), _header(Path(ckpts["duplex"]))
    state["lm.input.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata={**meta, "content_sha256": content_hash(state, meta)})
    out = tmp_path / "out.wav"
    for variant, message in ((moved, f"error: {moved} records its codec as {tmp_path / 'gone.safetensors'}, which "
                                     "is not there (moved or deleted): pass its new path as codec= (--codec)"),
                             (no_codec, f"error: --variant {no_codec} records no codec"),
                             (number, f"error: {number}: the 'codec' field of its header's extra is 7, not the path"),
                             (tmp_path / "nan.safetensors", f"error: {tmp_path / 'nan.safetensors'}: 1 tensors hold "
                                                            "NaN or inf (lm.input.weight)")):
        assert complete.main([ckpts["stereo"], str(out), "--variant", str(variant), "--device", "cpu"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), lines
        assert not out.exists()


@pytest.mark.parametrize("field, value", [("latent_dim", 16), ("sample_rate", 24000)])
def test_a_codec_of_another_latent_size_or_rate_is_one_error_before_any_weights(ckpts, tmp_path, capsys, field, value):
    """--codec of 16-dim latents for a model of 32 was a shape-error traceback mid-generation;
    one of 24 kHz audio for a 16 kHz model wrote a completion at the wrong speed. Both are one
    `error:` naming the codec and both sizes, found from the headers: the model's weights here
    are corrupt (one bit), which reading them would report."""
    import complete
    torch.manual_seed(0)
    codec = save_codec(tmp_path / f"{field}.safetensors",
                       build(Codec, dataclasses.replace(CODEC_PRESETS["tiny"], **{field: value})))
    model = corrupted_copy(ckpts["mono"], tmp_path)
    out = tmp_path / "out.wav"
    assert complete.main([ckpts["stereo"], str(out), "--variant", str(model), "--codec", str(codec),
                          "--device", "cpu"]) == 2
    z, rate = (16, 16000) if field == "latent_dim" else (32, 24000)
    assert capsys.readouterr().err == (f"error: the codec {codec} makes {z}-dim latents of {rate} Hz audio, but {model} "
                                       "takes 32-dim latents of 16000 Hz audio: pass the codec it was trained with as "
                                       "codec= (--codec)\n")
    assert not out.exists()


def test_the_prompt_is_checked_in_latents_of_the_codec_s_hop(ckpts, tmp_path, capfd):
    """A codec of ours of another hop than the official 2000 samples: the check before the weights
    load took 2000, so a prompt of 1500 samples was refused for a codec of 1000 (one whole latent),
    and one of 3000 passed for a codec of 4000, to fail once the weights had loaded. Both now go by
    the codec's hop, read from its header."""
    rng = np.random.default_rng(0)
    for n in (1500, 3000):
        sf.write(tmp_path / f"{n}.wav", rng.uniform(-0.3, 0.3, n), 16000)
    out = tmp_path / "out.wav"
    r = run_here(capfd, tmp_path / "1500.wav", out, "--variant", ckpts["mono"], "--codec",
                 codec_of_hop(tmp_path, (2, 2, 2, 5, 5, 5)), "--seconds", 0.125, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sf.info(out).frames == 1000 * (1 + 2)  # the prompt's latent and two more (1000 samples each)
    out.unlink()
    model = corrupted_copy(ckpts["mono"], tmp_path)
    r = run_here(capfd, tmp_path / "3000.wav", out, "--variant", model, "--codec",
                 codec_of_hop(tmp_path, (2, 2, 4, 5, 5, 10)), "--device", "cpu")
    assert r.returncode == 2 and r.stderr == (f"error: {tmp_path / '3000.wav'} holds 3000 samples at 16000 Hz: a "
                                              "prompt needs at least 4000 samples at 16000 Hz (0.250 s, one latent)\n"
                                              ), r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("prompt, flags, message", [
    ("missing.wav", [], "error: no such file: {prompt}"),
    ("folder.wav", [], "error: {prompt} is a folder, not a file"),  # it said "no such file"
    ("nan.wav", [], "non-finite samples"),
    ("noise.wav", [], "cannot read audio file"),
    ("short.wav", [], "{prompt} holds 1000 samples at 16000 Hz: a prompt needs at least 2000 samples at 16000 Hz"),
    # 1999 samples read "0.125 s long: a prompt needs at least 0.125 s"
    ("short1999.wav", [], "{prompt} holds 1999 samples at 16000 Hz: a prompt needs at least 2000 samples"),
    # a WAV under 16 KiB whose header sizes were never filled in read "0.000 s long"
    ("unfilled.wav", [], "cannot read audio file {prompt}: its header gives a length of 0 but the file holds 14444 "
                         "bytes (a recording whose header was never filled in: its writer killed?)"),
    # one whose data size says half of what follows it (a writer updating it now and then, killed): read as half
    ("understated.wav", [], "cannot read audio file {prompt}: its header gives 0.5 s, but about 0.5 s more of audio "
                            "follow its data"),
    # A broken header's rate: resampled to 16 kHz, 0.4 MB at 1 Hz was 13 GB (a MemoryError).
    ("1hz.wav", [], "cannot read audio file {prompt}: a sample rate of 1 Hz, below 4000 Hz"),
    # and one far above any recording's: 2000 samples at 2.1 GHz were refused as 0.000 s long, blaming the length
    ("2ghz.wav", [], "cannot read audio file {prompt}: a sample rate of 2147483647 Hz, above 768000 Hz (a broken header?)"),
    ("ok.wav", ["--token-temp", "1e6"], "token_temp must be in [0, 5]"),
    ("ok.wav", ["--gaussian-temp", "inf"], "gaussian_temp must be in [0, 5]"),
    ("ok.wav", ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("ok.wav", ["--min-p", "1"], "min_p must be in [0, 1)"),
    ("ok.wav", ["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'"),
    ("ok.wav", ["--kv-dtype", "fp4"], "argument --kv-dtype: invalid choice: 'fp4'"),
    ("ok.wav", ["--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
    ("ok.wav", ["--seed", "-1"], "--seed: seed must be an int in [0, 2**63), got -1"),  # was seed 2**64 - 1's draws
    # 1.3e5 GB of audio, 3e5 GB of KV caches (the official duplex model, float32 on the CPU): they
    # were taken, and failed to allocate once the weights had loaded
    ("ok.wav", ["--seconds", "1e9"], "--seconds 1e+09 needs at least "),
    ("ok.wav", ["--num", "100000"], "--num 100000 x --seconds 10 need at least "),
    ("ok.wav", ["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
    ("ok.wav", ["--device", "cuda:99"], "--device cuda:99: "),
], ids=["missing", "folder", "nan", "not-audio", "short", "short-by-one", "unfilled-header", "understated-header",
        "rate-1hz", "rate-2ghz", "token-temp", "gaussian-temp", "top-p", "min-p",
        "quantize", "kv-dtype", "seconds", "seed", "seconds-memory", "num-memory", "device", "device-absent"])
def test_prompt_and_arguments_are_checked_before_any_weights(tmp_path, prompt, flags, message, capfd):
    """The official duplex variant, offline, with an empty weights folder: loading the weights
    would fail, so each error shows that the check came first; no output file is written."""
    sr = 16000
    t = np.arange(sr) / sr
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * t), sr)
    sf.write(tmp_path / "nan.wav", np.where(t < 0.5, 0.1, np.nan).astype(np.float32), sr, subtype="FLOAT")
    (tmp_path / "noise.wav").write_bytes(b"not a wav file at all" * 10)
    sf.write(tmp_path / "short.wav", t[:1000], sr)  # less than one latent (2000 samples)
    sf.write(tmp_path / "short1999.wav", t[:1999], sr)
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, sr, 2 * sr, 2, 16)
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    riff = lambda size, said, data: b"RIFF" + struct.pack("<I", size) + b"WAVE" + fmt + b"data" + struct.pack("<I", said) + data
    (tmp_path / "unfilled.wav").write_bytes(riff(0, 0, pcm[:14400]))  # 0.45 s
    (tmp_path / "understated.wav").write_bytes(riff(36 + len(pcm) // 2, len(pcm) // 2, pcm))
    sf.write(tmp_path / "1hz.wav", np.full(2000, 0.1), 1)
    sf.write(tmp_path / "2ghz.wav", np.full(2000, 0.1), 2 ** 31 - 1)
    (tmp_path / "folder.wav").mkdir()  # 2000 s once resampled: long enough
    out = tmp_path / "out.wav"
    r = run_here(capfd, tmp_path / prompt, out, "--variant", "duplex", "--offline", "--ckpt-dir", tmp_path / "ckpt",
                 *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message.format(prompt=tmp_path / prompt) in errors[0], r.stderr
    assert "System error" not in r.stderr and "loaded" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*out*"))


def test_a_prompt_named_with_control_characters_is_one_inert_error_line(tmp_path, capfd):
    """The error names the file with its newline and escape sequence written out (`\\n`,
    `\\x1b`): one line, and nothing sent to the terminal as a control sequence."""
    name = "take\n1\x1b[2J.wav"
    (tmp_path / name).write_bytes(b"not a wav file at all" * 10)
    r = run_here(capfd, tmp_path / name, tmp_path / "out.wav", "--variant", "duplex", "--offline", "--ckpt-dir",
                 tmp_path / "ckpt")
    assert r.returncode == 2 and "\x1b" not in r.stderr, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"error: cannot read audio file {tmp_path}/take\\n1\\x1b[2J.wav: "), line


def test_each_of_several_outputs_is_checked_and_their_folder_once(tmp_path):
    """--num N checked each output path in full: soundfile's format table and a file written and
    removed in the folder, N times (--num 100000: 35 s before the error about its memory). The
    format and folder are checked once now, what is at each path still for every one: a pipe at
    the third output is refused before any weights."""
    sr = 16000
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr), sr)
    os.mkfifo(tmp_path / "out-2.wav")
    r = run(tmp_path / "ok.wav", tmp_path / "out.wav", "--num", "3", "--variant", "duplex", "--offline", "--ckpt-dir",
            tmp_path / "ckpt")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'out-2.wav'}: it is a pipe, and a WAV is written with seeks (its header "
        "last); name a file"), r.stderr
    from model.audio import AudioError, check_outputs
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b-1.wav").mkdir()
    with pytest.raises(AudioError, match=re.escape(f"cannot write {tmp_path / 'sub' / 'b-1.wav'}: it is a folder")):
        check_outputs([str(tmp_path / "a-0.wav"), str(tmp_path / "sub" / "b-0.wav"), str(tmp_path / "sub" / "b-1.wav")])
    with pytest.raises(AudioError, match=r"soundfile writes no \.xyz files"):  # another extension: checked
        check_outputs([str(tmp_path / "a-0.wav"), str(tmp_path / "a-1.xyz")])


def test_an_out_that_is_the_prompt_or_a_pipe_is_refused_before_any_weights(tmp_path, capsys):
    """`complete.py take.wav take.wav` replaced the prompt with its completion (by a link, or as
    one of --num's files, too), and a named pipe as --out was found only after generating: the
    write waited for a reader, and soundfile cannot write a WAV into a pipe. Each is one `error:`
    line before the weights load (none are there: offline, an empty folder)."""
    import complete
    sr = 16000
    prompt = tmp_path / "take-1.wav"
    sf.write(prompt, 0.3 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr), sr)
    before = prompt.read_bytes()
    (tmp_path / "link.wav").symlink_to(prompt)
    os.mkfifo(tmp_path / "pipe.wav")
    cases = {(str(prompt),): f"cannot write {prompt}: it is the prompt, which the output would replace",
             (str(tmp_path / "link.wav"),): f"cannot write {tmp_path / 'link.wav'}: it is the prompt",
             (str(tmp_path / "take.wav"), "--num", "2"): f"cannot write {prompt}: it is the prompt",
             (str(tmp_path / "pipe.wav"),): f"cannot write {tmp_path / 'pipe.wav'}: it is a pipe"}
    for (out, *flags), message in cases.items():
        assert complete.main([str(prompt), out, "--variant", "duplex", "--offline", "--ckpt-dir",
                              str(tmp_path / "ckpt"), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert prompt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.wav", "pipe.wav", "take-1.wav"]


@pytest.mark.parametrize("rate, channels", [(16000, 1), (44100, 2), (22050, 1)])
def test_a_long_prompt_is_read_only_for_the_context_it_keeps(tmp_path, rate, channels):
    """A prompt longer than the context keeps its last `max_frames` frames, the same samples as
    reading the whole file and cutting it, but only that tail is decoded: a float WAV whose first
    half is NaN (as a file that would take GB to read whole is, in its unread part) loads and
    passes the scripts' check. It was read whole, twice (check_prompt, then load_prompt), so the
    NaN head was refused."""
    from model.audio import check_prompt, load_audio, load_prompt
    rng = np.random.default_rng(0)
    n = int(rate * 20.3)  # 162 whole latents at 16 kHz, cut at the end to whole frames
    audio = rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    full = load_audio(path, channels="mono" if channels == 1 else None)  # the old read: all, then cut
    full = full[:, :full.shape[1] // 2000 * 2000][:, -64 * 2000:]
    with pytest.warns(UserWarning, match="keeping its last 8.0 s"):
        tail = load_prompt(path, channels, max_frames=64)
    assert tail.shape == (channels, 64 * 2000)
    np.testing.assert_allclose(tail, full, atol=1e-5 if rate != 16000 else 0)
    audio[:n // 2] = np.nan  # the first 10 s, outside the last 8 s kept
    sf.write(path, audio, rate, subtype="FLOAT")
    check_prompt(str(path), max_frames=64)
    with pytest.warns(UserWarning, match="keeping its last 8.0 s"):
        tail = load_prompt(path, channels, max_frames=64)
    np.testing.assert_allclose(tail, full, atol=1e-5 if rate != 16000 else 0)
    with pytest.raises(AudioError, match="non-finite samples"):  # what is kept is still checked
        check_prompt(str(path), max_frames=120)


def test_long_completions_are_not_refused():
    """The memory check refuses what cannot fit, not length: past the context a row slides, so an
    hour of a tiny model (or of the official one, on a GPU) is taken."""
    from model.generator import completion_problem
    assert completion_problem(3600.0, 3, PRESETS["tiny"]) is None
    assert completion_problem(1e-9, 1, PRESETS["tiny"]) is None  # rounded up to one latent
    assert "--seconds 1e+300 needs at least" in completion_problem(1e300, 1, PRESETS["tiny"])


def test_the_memory_check_counts_the_prompt_each_completion_holds(tmp_path):
    """Each completion holds the prompt (as the codec reconstructs it) before its continuation; the
    check counted one prompt latent, so --num completions of a long prompt passed it and ran out of
    memory after the weights loaded. check_prompt gives the frames used, and they are counted."""
    from model.audio import check_prompt
    from model.files import physical_memory
    from model.generator import completion_problem
    cfg = PRESETS["tiny"]
    sf.write(tmp_path / "long.wav", 0.3 * np.sin(np.arange(16000 * 30) / 10), 16000)
    frames = check_prompt(str(tmp_path / "long.wav"), max_frames=cfg.seq_len)
    assert frames == cfg.seq_len  # the part of a 30 s prompt a context of seq_len latents keeps
    num = physical_memory() // (cfg.channels * 2000 * 4 * (8 + frames)) + 1  # 8: one second's latents
    assert completion_problem(1.0, num, cfg) is None  # without the prompt it fits
    problem = completion_problem(1.0, num, cfg, prompt_frames=frames)
    assert problem.startswith(f"--num {num} x --seconds 1 need at least") and "more than this machine's memory" in problem


def test_the_memory_check_counts_a_cgroup_s_limit(tmp_path, memory_cgroup_of_2gb):
    """complete.py in a container limited below the machine (docker --memory, Slurm's --mem)
    checked the machine's memory, and the out-of-memory killer ended what it passed. In a real 2 GB
    memory cgroup, 10 s of the official model (its KV caches alone 2.95 GB) is refused before any
    weights, naming the cgroup's limit; outside it the same command passes the check (and fails
    on the weights, absent from the folder)."""
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000), 16000)
    args = [REPO / "complete.py", tmp_path / "ok.wav", tmp_path / "out.wav", "--variant", "duplex", "--offline",
            "--ckpt-dir", tmp_path / "ckpt", "--seconds", "10", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    outside, inside = (subprocess.run([*prefix, sys.executable, *map(str, args)], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=300)
                       for prefix in ([], memory_cgroup_of_2gb))
    if "need" in outside.stderr:
        pytest.skip(f"this machine's memory does not hold it either: {outside.stderr}")
    assert outside.returncode != 0 and "ckpt" in outside.stderr, outside.stderr  # the weights, after the check
    assert inside.returncode == 2 and inside.stderr.startswith("error: --seconds 10 needs at least 2.9"), inside.stderr
    assert "more than the memory limit of this process' cgroup (2.0 GB)" in inside.stderr
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize("out, message", [
    ("out.mp4", "cannot write {out}: soundfile writes no .mp4 files"),
    ("ok.wav/out.wav", "cannot write {out}: {tmp}/ok.wav is a file, not a folder"),
    ("", "cannot write {out!r}: it names a folder"),
    ("", "cannot write '': no file name given"),
], ids=["format", "folder-is-a-file", "folder", "empty"])
def test_an_output_that_cannot_be_written_is_an_error_before_any_weights(tmp_path, out, message):
    """As above: the output path is checked before the weights (which are missing) would load,
    not after the completion was generated."""
    sr = 16000
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr), sr)
    out = "" if "''" in message else str(tmp_path / out)  # "folder": the output names tmp_path itself
    r = run(tmp_path / "ok.wav", out, "--variant", "duplex", "--offline", "--ckpt-dir", tmp_path / "ckpt")
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert message.format(out=out, tmp=tmp_path) in errors[0], r.stderr


def test_several_outputs_named_by_a_folder_are_refused_as_one_is(tmp_path):
    """--num 2 with the output a folder (outputs, outputs/): one output so named is refused, but two
    were written beside it as outputs-0.wav and outputs-1.wav, or in it as -0.wav and -1.wav (names
    that read as options); now the same error as for one, before any weights."""
    sr = 16000
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr), sr)
    (tmp_path / "outputs").mkdir()
    for out in (str(tmp_path / "outputs"), str(tmp_path / "outputs") + os.sep, str(tmp_path / "new") + os.sep):
        r = run(tmp_path / "ok.wav", out, "--num", 2, "--variant", "duplex", "--offline", "--ckpt-dir", tmp_path / "ckpt")
        errors = [line for line in r.stderr.splitlines() if "error: " in line]
        assert r.returncode == 2 and errors == [f"error: cannot write {out!r}: it names a folder; name an audio file "
                                                "(out.wav, for example)"], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.wav", "outputs"] and not any((tmp_path / "outputs").iterdir())


@pytest.mark.parametrize("ext, subtype", [(".ogg", "VORBIS"), (".mp3", "MPEG_LAYER_III")])
def test_an_ogg_or_mp3_output_is_written_in_its_own_encoding(ckpts, tmp_path, ext, subtype, capfd):
    """Until session 18 these passed the output check and failed after the completion was
    generated ("Invalid combination of format, subtype"), losing it: 16-bit PCM fits no OGG/MP3."""
    if ext[1:].upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile writes no {ext}")
    out = tmp_path / f"out{ext}"
    r = run_here(capfd, ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 0.25, "--device", "cpu")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    info = sf.info(out)
    assert info.subtype == subtype and info.channels == 2 and info.samplerate == 16000


def test_the_wrote_line_names_the_output_inertly(ckpts, tmp_path, capfd):
    """"wrote PATH" printed a name's newline and escape sequence raw (two lines, and the terminal
    recoloured), where every error and warning line writes them out (`\\n`, `\\x1b`)."""
    out = tmp_path / "take\n2\x1b[31m.wav"
    r = run_here(capfd, ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 0.25, "--device", "cpu")
    assert r.returncode == 0 and "\x1b" not in r.stderr, r.stderr[-2000:]
    assert f"\nwrote {tmp_path}/take\\n2\\x1b[31m.wav (2 channels, " in r.stderr, r.stderr[-2000:]
    assert sf.info(out).channels == 2


@pytest.mark.slow
def test_quantized_completion_with_fp8_cache(ckpts, tmp_path, capfd):
    """--quantize int8 with --kv-dtype fp8 end to end; int4 on a checkpoint saved int8 is refused
    in one line (a quantized checkpoint is not requantized); that checkpoint without --quantize runs,
    its line 'loaded ...' naming its weights' quantization."""
    out = tmp_path / "q.wav"
    r = run_here(capfd, ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 0.5, "--quantize", "int8",
                 "--kv-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    assert "(int8 weights)" in r.stderr
    audio, sr = sf.read(out)
    assert audio.shape == (2000 * (12 + 4), 2) and np.isfinite(audio).all() and np.abs(audio[12 * 2000:]).max() > 0

    from model import load_hertz_dev, save_transformer
    saved = save_transformer(tmp_path / "int8.safetensors", load_hertz_dev(ckpts["duplex"], codec=None, quantize="int8"),
                             codec_source=ckpts["codec"])
    r = run_here(capfd, ckpts["stereo"], out, "--variant", saved, "--quantize", "int4")
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert "holds int8 weights" in errors[0]
    # saved quantized, loaded without --quantize: int8 weights, and said so (it said nothing: float, by the look)
    r = run_here(capfd, ckpts["stereo"], out, "--variant", saved, "--seconds", 0.5)
    assert r.returncode == 0 and f"loaded {saved} (duplex) on cpu in torch.float32 (int8 weights) in " in r.stderr, r.stderr


def make_adapter(base: str, path: Path, seed: int = 0) -> str:
    """A LoRA adapter file for the checkpoint `base`, with B drawn nonzero (as if trained), so that
    it changes what the model computes."""
    from model import load_hertz_dev
    from model.lora import LoRAConfig, apply_lora, base_fingerprint, lora_state_dict, save_adapter

    torch.manual_seed(seed)
    model = load_hertz_dev(base, codec=None)
    cfg = LoRAConfig(rank=2, alpha=4.0, targets="both")
    apply_lora(model, **dataclasses.asdict(cfg))
    with torch.no_grad():
        for key, value in lora_state_dict(model).items():
            if key.endswith("lora_B"):
                value.normal_(std=0.5)
    return str(save_adapter(path, model, cfg, base_fingerprint(base), base))


@pytest.mark.slow
def test_adapter_changes_the_completion_and_a_wrong_base_is_refused(ckpts, tmp_path, capfd):
    adapter = make_adapter(ckpts["duplex"], tmp_path / "duplex.adapter.safetensors")
    common = ["--variant", ckpts["duplex"], "--seconds", 1, "--seed", 3, "--continuation-only",
              "--device", "cpu", "--dtype", "float32"]
    plain, adapted = tmp_path / "plain.wav", tmp_path / "adapted.wav"
    r = run_here(capfd, ckpts["stereo"], plain, *common)
    assert r.returncode == 0, r.stderr
    r = run_here(capfd, ckpts["stereo"], adapted, *common, "--adapter", adapter)
    assert r.returncode == 0, r.stderr
    assert f"with adapter {adapter}" in r.stderr
    a, b = sf.read(plain)[0], sf.read(adapted)[0]
    assert a.shape == b.shape == (2000 * 8, 2) and not np.allclose(a, b, atol=1e-3)
    # an adapter of the duplex checkpoint on the mono one: the one-line error of model/lora.py
    out = tmp_path / "wrong.wav"
    r = run_here(capfd, ckpts["mono_prompt"], out, "--variant", ckpts["mono"], "--seconds", 0.5, "--adapter", adapter)
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: adapter {adapter} belongs to another base")
    assert ckpts["duplex"] in errors[0] and ckpts["mono"] in errors[0] and "loaded" not in r.stderr
    assert not out.exists()


def test_adapter_is_checked_before_any_weights(ckpts, tmp_path, capfd):
    """The official duplex variant, offline, with an empty weights folder: a missing adapter file,
    a folder (naming the adapter files in it) and one trained on another base are errors before
    loading would fail."""
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000), 16000)
    adapter = make_adapter(ckpts["duplex"], tmp_path / "ours.adapter.safetensors")
    for given, message in ((tmp_path / "missing.adapter.safetensors",
                            f"error: no such file: {tmp_path / 'missing.adapter.safetensors'}"),
                           (tmp_path, f"error: {tmp_path} is a folder, not an adapter file: pass one of its adapter "
                                      f"files, {adapter}"),  # a run's folder: was "{tmp_path} is a folder, not a file"
                           (adapter, f"error: adapter {adapter} belongs to another base")):
        r = run_here(capfd, tmp_path / "ok.wav", tmp_path / "out.wav", "--variant", "duplex", "--offline",
                     "--ckpt-dir", tmp_path / "ckpt", "--adapter", given)
        errors = [line for line in r.stderr.splitlines() if "error: " in line]
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
        assert errors[0].startswith(message) and "loaded" not in r.stderr
        assert not (tmp_path / "out.wav").exists() and not (tmp_path / "ckpt").exists()


def test_a_corrupted_checkpoint_is_one_error_line_unless_not_verified(ckpts, tmp_path, capfd):
    """Changed tensor bytes: the content hash no longer matches, one `error:` line naming the
    file and no output; --no-verify loads it anyway and completes."""
    corrupted = tmp_path / "duplex.safetensors"
    data = bytearray(Path(ckpts["duplex"]).read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    corrupted.write_bytes(bytes(data))
    out = tmp_path / "out.wav"
    r = run_here(capfd, ckpts["stereo"], out, "--variant", corrupted, "--seconds", 0.25)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert str(corrupted) in lines[0] and "corrupted" in lines[0] and not out.exists()
    r = run_here(capfd, ckpts["stereo"], out, "--variant", corrupted, "--seconds", 0.25, "--no-verify")
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]


@pytest.mark.parametrize("state", ["missing", "corrupt"])
def test_official_weights_missing_offline_or_corrupt_are_an_error_not_a_traceback(ckpts, tmp_path, state, capfd):
    """The official weights not in --ckpt-dir with --offline (or there but with the wrong md5):
    an `error:` naming the files (missing: each with its size and md5, and where to put them;
    corrupt: the file and both md5s), exit code 2, no traceback and no output. Until session 17
    this was hub's WeightsError as a traceback."""
    from model.hub import CODEC, OFFICIAL_FILES, QUANTIZER, VARIANTS
    folder = tmp_path / "official"
    folder.mkdir()
    names = [QUANTIZER, *VARIANTS["duplex"][:2]]
    if state == "corrupt":  # all four (a missing codec is named with the others: load_hertz_dev asks for all at once)
        for name in names + [CODEC]:
            (folder / OFFICIAL_FILES[name].filename).write_bytes(b"not the weights")
    out = tmp_path / "out.wav"
    r = run_here(capfd, ckpts["stereo"], out, "--offline", "--ckpt-dir", folder, "--seconds", 0.25)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists(), r.stderr[-2000:]
    assert r.stderr.startswith("error: "), r.stderr[-2000:]
    if state == "missing":
        assert "offline mode and these official hertz-dev files are missing" in r.stderr
        assert all(OFFICIAL_FILES[n].filename in r.stderr and OFFICIAL_FILES[n].md5 in r.stderr for n in names)
        assert str(folder.resolve()) in r.stderr
    else:
        assert "is corrupt" in r.stderr and OFFICIAL_FILES[QUANTIZER].md5 in r.stderr


def test_an_output_name_at_the_length_limit_is_written_and_one_past_it_refused_first(ckpts, tmp_path, capfd):
    """The atomic write's temporary `.NAME.XXXXXXXX.wav` is 11 bytes longer than NAME: an output
    name of the last 11 bytes below the folder's limit (legal), or past it, passed the output check
    and was refused after the completion was generated (File name too long). Now the temporary's
    name is shortened to fit (and a dead one of that name is found), and a name past the limit is
    one error line before anything loads."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("x" * (limit - 4) + ".wav")
    r = run_here(capfd, ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 0.25, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sf.info(out).channels == 2 and sorted(os.listdir(tmp_path)) == [out.name]
    from model.files import temporary_prefix
    dead = tmp_path / (temporary_prefix(tmp_path, f".{out.name}.", ".wav") + "0123abcd.wav")
    dead.write_bytes(b"a killed writer's")  # (unlocked: its writer is gone)
    r = run_here(capfd, ckpts["stereo"], out, "--variant", ckpts["duplex"], "--seconds", 0.25, "--device", "cpu")
    assert r.returncode == 0 and sorted(os.listdir(tmp_path)) == [out.name], r.stderr[-2000:]
    long = tmp_path / ("é" * (limit // 2 - 1) + ".wav")  # (bytes, not characters, count)
    r = run_here(capfd, ckpts["stereo"], long, "--variant", ckpts["duplex"], "--seconds", 0.25, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: cannot write {long}: its name is {len(os.fsencode(long.name))} bytes, longer than the {limit} its "
        "folder takes; give it a shorter name"), r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == [out.name]


def test_paths_given_as_flag_equals_tilde_are_under_the_home_folder(ckpts, tmp_path, monkeypatch, capfd):
    """`--ckpt-dir=~/ckpt` (and the other paths so given) reach the script with their `~`, which the
    shell expands only at a word's start: the official weights were looked for, and online
    downloaded, in a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    r = run_here(capfd, ckpts["stereo"], "~/out.wav", "--offline", "--ckpt-dir=~/ckpt", "--seconds", 0.25)
    assert r.returncode == 2 and "offline mode and these official hertz-dev files are missing" in r.stderr, r.stderr
    assert f"put them in {tmp_path / 'home' / 'ckpt'}/" in r.stderr
    shutil.copy(ckpts["duplex"], tmp_path / "home" / "duplex.safetensors")  # --variant, a path
    r = run_here(capfd, ckpts["stereo"], "~/out.wav", "--variant=~/duplex.safetensors", "--seconds", 0.25)
    assert r.returncode == 0 and (tmp_path / "home" / "out.wav").is_file(), r.stderr[-2000:]


def test_a_disk_that_fills_while_generating_is_one_error_line(ckpts, tmp_path, capfd):
    """The output's folder is checked writable before any weights load, but the disk may fill while
    the model generates: that was a traceback ending 'cannot write audio file OUT: System error.'
    (libsndfile drops the errno). Now one `error:` line saying the device is full, and no file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run_here(capfd, ckpts["stereo"], disk / "out.wav", "--variant", ckpts["duplex"], "--seconds", 3)
    finally:
        listing = sorted(p.name for p in disk.iterdir())
        subprocess.run(["umount", str(disk)], check=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith(
        f"error: cannot write audio file {disk / 'out.wav'}: no space left on the device ("), r.stderr[-2000:]
    assert listing == []


def test_an_output_beyond_the_file_size_limit_is_one_error_line_naming_the_limit(ckpts, tmp_path):
    """Under a file size limit (`ulimit -f`, a batch system's; a quota says as little) the output
    was 'cannot write audio file OUT: System error.' (libsndfile drops the errno) with free space
    to spare. The cause is now asked of a plain write, and named: `File too large (the file size
    limit, ulimit -f, is N bytes)`; no file is left."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40960, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "complete.py"), str(ckpts["stereo"]), str(tmp_path / "out.wav"),
                        "--variant", str(ckpts["duplex"]), "--seconds", "3"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, preexec_fn=limited)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1] == (
        f"error: cannot write audio file {tmp_path / 'out.wav'}: File too large (the file size limit, `ulimit -f`, is "
        "40960 bytes)"), r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,status,by", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_while_generating_is_one_line(ckpts, tmp_path, name, status, by):
    """Ctrl-C in complete.py printed a ~60-line KeyboardInterrupt traceback (also under demo.py's
    last step), and SIGTERM ended it without a word (status -15); nothing is half-written (outputs
    are written atomically): one line, status 130 or 143."""
    import signal
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "complete.py"), ckpts["stereo"], str(tmp_path / "out.wav"),
                             "--variant", ckpts["duplex"], "--seconds", "200"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    while "%|" not in seen and proc.poll() is None:  # the progress bar: generating
        seen += proc.stderr.read(1)
    proc.send_signal(signal.Signals[name])
    err = seen + proc.communicate(timeout=120)[1]
    assert proc.returncode == status and "Traceback" not in err, (proc.returncode, err[-3000:])
    # (on a line of its own under the progress bar, cut where the signal came; the bar is drawn once more as it closes)
    assert f"interrupted ({by}): no completion written after the last one named\n" in err, err[-500:]
    assert not (tmp_path / "out.wav").exists()


def test_weights_that_overflow_are_one_error_line_and_no_file(ckpts, tmp_path, capsys):
    """A checkpoint whose weights load (finite, hash consistent) but overflow in the model (a layer's
    weights 1e30, as an edited or badly trained file holds): its completion was NaN, written as a
    WAV of full-scale noise with exit 0. Now one error line naming the weights, and no file; and
    save_audio refuses NaN audio rather than clip it to full scale."""
    import complete
    from test_checkpoint import rewritten
    from model.audio import save_audio
    key = "resynth.stack.layers.0.attn.attn.attn_out.weight"
    huge = rewritten(ckpts["mono"], tmp_path / "huge.safetensors",
                     state=lambda s: {**s, key: torch.full_like(s[key], 1e30)})
    out = tmp_path / "o.wav"
    assert complete.main([ckpts["mono_prompt"], str(out), "--variant", str(huge), "--seconds", "0.25",
                          "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: the completion holds NaN or inf: the weights of {huge} overflow in float32 (values too "
                       "large for it, or a damaged file): re-export them; no file written"), err
    assert not out.exists()
    with pytest.raises(AudioError, match=f"^{re.escape(f'cannot write audio file {out}: the audio holds NaN or inf (1 ')}"):
        save_audio(out, np.array([0.1, float("nan"), 0.2], np.float32), 16000)
    assert not out.exists()


def overflowing_codec(codec: str, out: Path) -> Path:
    """`codec` saved as `out` with its decoder's first gains x1e30: finite weights, a valid hash,
    audio NaN or inf from any latents."""
    codec = load_codec(codec)
    with torch.no_grad():
        for block in list(codec.decoder.res_stack)[:3]:
            for name, p in block.named_parameters():
                if name.endswith("original0"):
                    p.mul_(1e30)
    return save_codec(out, codec)


def test_a_codec_that_overflows_is_named_not_the_transformer(ckpts, tmp_path, capsys):
    """A codec whose decoder overflows (its gains x1e30: finite, saved with a valid hash) given as
    --codec: the transformer's latents were finite, the audio NaN, and the error blamed the
    transformer's weights. The latents are checked before decoding, and the codec file is named."""
    import complete
    huge = overflowing_codec(ckpts["codec"], tmp_path / "huge_codec.safetensors")
    out = tmp_path / "o.wav"
    assert complete.main([ckpts["mono_prompt"], str(out), "--variant", ckpts["mono"], "--codec", str(huge),
                          "--seconds", "0.25", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: the completion holds NaN or inf: the codec {huge} decodes the finite latents of "
                       f"{ckpts['mono']} to NaN or inf: its weights overflow in float32 (values too large for it, or a "
                       "damaged file): re-export them; no file written"), err
    assert not out.exists()


@pytest.mark.parametrize("key, value, message", [
    ("lm_heads", 3, "its config is not a valid TransformerConfig: lm_dim=64 and lm_heads=3: the heads split lm_dim"),
    ("lm_dim", 1 << 30, "its config does not build a HertzDev (Storage size calculation overflowed"),
])
def test_a_header_config_that_builds_no_model_is_one_error_line(ckpts, tmp_path, capsys, key, value, message):
    """A checkpoint whose header config (hash consistent) has heads that do not divide the width,
    or sizes no memory holds: an AssertionError or RuntimeError traceback from inside a layer; now
    one error line naming the file, and no output."""
    import complete
    from test_checkpoint import config_set, rewritten
    bad = rewritten(ckpts["mono"], tmp_path / "bad.safetensors", config_set(key, value))
    out = tmp_path / "o.wav"
    assert complete.main([ckpts["mono_prompt"], str(out), "--variant", str(bad), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: {message}"), lines
    assert not out.exists()


# complete.py run as `python complete.py ...` runs it, with the 2nd soundfile.write failing as a full disk's would
SECOND_WRITE_FAILS = """
import errno, runpy, sys
import soundfile
calls, write = [], soundfile.write
def failing(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 2:
        raise OSError(errno.EIO, "Input/output error")
    return write(*args, **kwargs)
soundfile.write = failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_write_failing_midway_through_several_outputs_leaves_every_earlier_file_as_it_was(ckpts, tmp_path):
    """`--num N` wrote OUT-0.wav ... one after another: a failure (a full disk) or a kill midway left
    the first files of this run beside the rest of an earlier one's. All are now written to
    temporaries first and renamed over their paths only once all are written: the 2nd write failing
    is one error line naming that file, exit code 2, the earlier run's three files byte-identical,
    and no temporary left."""
    old = {}
    for i in range(3):
        sf.write(tmp_path / f"out-{i}.wav", np.full(800, 0.1 * (i + 1)), 16000)
        old[f"out-{i}.wav"] = (tmp_path / f"out-{i}.wav").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", SECOND_WRITE_FAILS, str(REPO / "complete.py"), ckpts["stereo"],
                        str(tmp_path / "out.wav"), "--variant", ckpts["duplex"], "--seconds", "0.25", "--num", "3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and errors == [
        f"error: cannot write audio file {tmp_path / 'out-1.wav'}: Input/output error"], r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # (no temporary .out-K.wav.XXXXXXXX.wav)
