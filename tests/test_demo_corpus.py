"""data/demo/prepare.py, run as a script: deterministic, idempotent, the right kinds of files,
validation voices held out of training, Flite and Festival voices where installed."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from model.data import AudioCropDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "data", "demo", "prepare.py")
pytest.importorskip("espeakng_loader", reason="the demo corpus needs `pip install espeakng-loader`")


def prepare(out, seed=0, minutes=0.5, *extra, env=None):
    result = subprocess.run([sys.executable, PREPARE, "--minutes", str(minutes), "--seed", str(seed),
                             "--out", str(out), *extra], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def digests(folder):
    """{relative path: sha256} of every file of a corpus."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "seed0"
    prepare(out)
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(demo_corpus, tmp_path):
    prepare(tmp_path / "again")
    prepare(tmp_path / "seed1", seed=1)
    first = digests(demo_corpus)
    assert first == digests(tmp_path / "again")
    other = digests(tmp_path / "seed1")
    assert first.keys() & other.keys()
    assert all(first[k] != other[k] for k in first.keys() & other.keys() if k.endswith(".wav"))


def test_rerun_is_skipped_and_force_rebuilds(demo_corpus, tmp_path):
    out = tmp_path / "c"
    prepare(out)
    before = digests(out)
    assert "already" in prepare(out)
    prepare(out, 1, 0.5, "--force")  # another seed, fewer or more files: no stale ones remain
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {k for k in digests(out) if k.endswith(".wav")} == listed
    assert digests(out) != before


def test_layout_lengths_and_manifest(demo_corpus):
    manifest = json.loads((demo_corpus / "manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    for split in ("train", "val"):
        for kind in ("mono", "dialogue"):
            assert any(p.startswith(f"{split}/{kind}/") for p in paths), (split, kind)
    total = sum(f["seconds"] for f in manifest["files"])
    assert 20 < total < 90  # half a minute asked; each part gets at least one file
    assert len({v["speaker"] + v["language"] for f in manifest["files"] for v in f["voices"]}) > 3


def voices_of(manifest, split):
    return {f'{v["engine"]}:{v["speaker"]}' for f in manifest["files"] if f["path"].startswith(split + "/")
            for v in f["voices"]}


def test_validation_voices_are_held_out_of_training(tmp_path):
    out = tmp_path / "c"
    prepare(out, 0, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = manifest["settings"]["voices"]
    assert listed["val"] and listed["train"] and not set(listed["val"]) & set(listed["train"])
    train, val = voices_of(manifest, "train"), voices_of(manifest, "val")
    assert len(val) >= 2 and len(train) > len(val)
    assert val <= set(listed["val"]) and train <= set(listed["train"])
    assert not train & val  # the speakers validation is scored on were never trained on
    # dialogues in val still have two different held-out speakers
    for f in manifest["files"]:
        if "/dialogue/" in f["path"]:
            assert f["voices"][0]["speaker"] != f["voices"][1]["speaker"] or \
                f["voices"][0]["engine"] != f["voices"][1]["engine"]


@pytest.mark.skipif(not (shutil.which("flite") or shutil.which("festival")),
                    reason="neither flite nor festival is installed (apt-get install flite festival)")
def test_installed_synthesizers_are_used_and_can_be_left_out(tmp_path):
    prepare(tmp_path / "all", 0, 3)
    prepare(tmp_path / "espeak", 0, 3, "--engines", "espeak")
    everything = json.loads((tmp_path / "all" / "manifest.json").read_text())
    engines = {v["engine"] for f in everything["files"] for v in f["voices"]}
    assert engines == {"espeak"} | {e for e in ("flite", "festival") if shutil.which(e)}
    only = json.loads((tmp_path / "espeak" / "manifest.json").read_text())
    assert {v["engine"] for f in only["files"] for v in f["voices"]} == {"espeak"}
    assert all(v.startswith("espeak:") for split in ("train", "val") for v in only["settings"]["voices"][split])
    # another set of voices is another corpus: rerunning with all engines rebuilds it
    assert "already" not in prepare(tmp_path / "espeak", 0, 3)


def test_mono_files_are_mono_16k_speech(demo_corpus):
    files = sorted(demo_corpus.glob("*/mono/*.wav"))
    assert files
    for path in files:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, _ = sf.read(str(path), dtype="float32")
        assert 0.1 < np.abs(audio).max() <= 1.0
        assert info.duration > 1.0


def frame_activity(audio, rate=16000, frame=0.05):
    """(T, C) -> (frames, C) bool: is the channel speaking in each 50 ms frame."""
    n = int(rate * frame)
    frames = audio[: len(audio) // n * n].reshape(-1, n, audio.shape[1])
    return np.sqrt((frames ** 2).mean(axis=1)) > 0.01


def test_dialogues_have_two_speakers_taking_turns(demo_corpus):
    files = sorted(demo_corpus.glob("*/dialogue/*.wav"))
    assert files
    for path in files:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, 2)
        assert rate == 16000 and audio.shape[1] == 2
        active = frame_activity(audio)
        assert active[:, 0].any() and active[:, 1].any()
        # each speaker talks while the other is silent: the channels are not copies of each other
        assert (active[:, 0] & ~active[:, 1]).sum() > 10
        assert (active[:, 1] & ~active[:, 0]).sum() > 10


def test_corpus_loads_as_a_stereo_dataset(demo_corpus):
    ds = AudioCropDataset(demo_corpus / "train", segment_seconds=2.0, channels="stereo", seed=0)
    item = ds[0]
    assert item["audio"].shape == (2, 32000) and item["mask"].shape == (32000,)
    val = AudioCropDataset(demo_corpus / "val", segment_seconds=2.0, train=False)
    assert len(val) > 0 and val[0]["audio"].shape == (1, 32000)


def test_without_flite_or_festival_it_is_the_espeak_only_corpus(tmp_path):
    """No synthesizer program on PATH (as on a machine without them): the corpus still builds,
    byte for byte the one `--engines espeak` makes where they are installed."""
    (tmp_path / "bin").mkdir()
    prepare(tmp_path / "bare", env={**os.environ, "PATH": str(tmp_path / "bin")})
    prepare(tmp_path / "espeak", 0, 0.5, "--engines", "espeak")
    assert digests(tmp_path / "bare") == digests(tmp_path / "espeak")
    manifest = json.loads((tmp_path / "bare" / "manifest.json").read_text())
    assert {v["engine"] for f in manifest["files"] for v in f["voices"]} == {"espeak"}


@pytest.mark.parametrize("args, message", [
    (["--minutes", "nan"], "--minutes must be a finite number > 0 and --val-fraction between 0 and 1"),
    (["--minutes", "1", "--val-fraction", "1"], "--minutes must be a finite number > 0 and --val-fraction between"),
    (["--minutes", "1", "--out", "FILE"], "--out FILE is a file, not a folder"),
    (["--minutes", "1", "--out", "FILE/sub"], "--out FILE/sub: cannot make the folder (Not a directory)"),
    (["--minutes", "1", "--out", ""], "--out needs a folder"),
    # a link to nothing (a disk not mounted): was "cannot make the folder (File exists)"
    (["--minutes", "1", "--out", "LINK"], "--out LINK: LINK is a symbolic link to disk/corpus, which does not exist"),
    (["--minutes", "1", "--out", "LINK/sub"], "--out LINK/sub: LINK is a symbolic link to disk/corpus, which does not"),
    (["--minutes", "1", "--seed", "-1", "--out", "sub"], "--seed must be an integer >= 0, got -1"),
    # taken, and an engine named twice was probed and set up twice (a typo for another one?)
    (["--minutes", "1", "--engines", "espeak,espeak", "--out", "sub"],
     "--engines espeak,espeak: espeak is named twice; name each engine once"),
    # a file system of no size (/proc): it was "more than the 0 GB free", not why the folder cannot be made
    (["--minutes", "1", "--out", "/proc/demo_corpus"], "--out /proc/demo_corpus: cannot make the folder ("),
], ids=["minutes-nan", "val-fraction", "out-is-a-file", "out-under-a-file", "out-empty", "out-dangling-link",
        "out-under-a-dangling-link", "seed", "engine-twice", "out-on-a-file-system-of-no-size"])
def test_bad_arguments_are_one_error_line_and_nothing_is_written(tmp_path, args, message):
    (tmp_path / "file").write_text("taken")
    (tmp_path / "unmounted").symlink_to("disk/corpus")
    names = {"FILE": str(tmp_path / "file"), "LINK": str(tmp_path / "unmounted")}
    for name, path in names.items():  # "--out ''" wrote into the current folder
        args, message = [a.replace(name, path) for a in args], message.replace(name, path)
    result = subprocess.run([sys.executable, PREPARE, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: " + message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "unmounted"]


def test_without_espeak_ng_it_is_one_error_line(tmp_path):
    """The espeakng-loader wheel missing (a stand-in module that fails to import, first on the
    path): one `error:` line saying what to install; it was the same line without `error:`."""
    (tmp_path / "espeakng_loader.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.1", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: the demo corpus needs eSpeak NG: pip install espeakng-loader"]


def test_a_huge_length_is_refused_before_any_synthesis(tmp_path):
    """--minutes 1e12 (3.5 billion GB of WAV files): one line comparing it with the free disk; it
    was taken, and synthesis ran until the disk was full."""
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "1e12", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: --minutes 1e+12 makes about 3.46e+09 GB "
                                                     "of WAV files, more than the ")
    assert not (tmp_path / "out").exists()


def test_an_engine_asked_for_but_not_installed_is_named_with_those_installed(tmp_path):
    """--engines espeak,flite where flite is not on PATH: one line naming it and what is installed;
    it was left out silently, and the corpus made with eSpeak NG alone."""
    (tmp_path / "bin").mkdir()
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.1", "--engines", "espeak,flite",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("error: --engines espeak,flite: flite is not installed "
                                              "here (installed: espeak): install or leave out (data/demo/README.md)")
    assert not (tmp_path / "out").exists()


def test_an_out_starting_with_a_tilde_is_in_the_home_folder(tmp_path):
    """`--out '~/corpus'` (a `~` the shell left: zsh, quotes, --out=~/...) made a folder named `~`
    where the script was run; README says a leading `~` is the home folder. Shown by one that is a
    file there, refused before anything is synthesized."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "corpus").write_text("not a folder")
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.1", "--out", "~/corpus", "--engines", "nosuch"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HOME": str(home)})
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == f"error: --out {home}/corpus is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("name, content, message", [
    ("manifest.json", '{"files": ["mine.wav"]}', "manifest.json is not a demo corpus's manifest"),
    ("train/mono/speech.wav", "my own recording", "train/mono/speech.wav was not written by this script"),
], ids=["another-manifest", "other-audio"])
def test_an_out_folder_holding_what_this_script_did_not_write_is_left_as_it_was(tmp_path, name, content, message):
    """--out holding another corpus' manifest.json (it was deleted) or other files under train/
    (they were mixed into the corpus): one line naming the file, and nothing is changed."""
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(content)
    before = digests(out)
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.1", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"error: --out {out}: {out / name} "
                                              f"{message.split(' ', 1)[1]}; choose an empty folder, or one holding "
                                              "a demo corpus")
    assert digests(out) == before


def visible(folder):
    """`digests` of what the data loaders read: hidden files left out."""
    return {k: v for k, v in digests(folder).items() if not any(p.startswith(".") for p in k.split(os.sep))}


def test_a_killed_rebuild_leaves_the_previous_corpus_whole_and_the_rerun_finds_it(demo_corpus, tmp_path):
    """A --force rebuild killed midway: the previous corpus is still there, byte for byte, with
    nothing of the new one mixed in where the loaders look, and a rerun of the previous settings
    finds it complete and removes the killed run's files. Before, the old corpus was deleted first
    and the killed run's files lay in train/ and val/ without a manifest, where training read them
    as a corpus."""
    out = tmp_path / "c"
    shutil.copytree(demo_corpus, out)
    run = subprocess.Popen([sys.executable, PREPARE, "--minutes", "5", "--seed", "1", "--force", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until it has written some of the new corpus
            if list(out.rglob(".*.partial")) or not (out / "manifest.json").exists():
                break
            time.sleep(0.05)
        time.sleep(0.3)
        assert run.poll() is None, "the run ended before it was killed"
    finally:
        run.kill()
        run.wait()
    assert visible(out) == visible(demo_corpus)
    assert "already" in prepare(out)
    assert digests(out) == digests(demo_corpus)


def test_ctrl_c_stops_cleanly_leaving_the_previous_corpus_whole(demo_corpus, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it, synthesizers included) during a
    --force rebuild: one line saying so, exit status 130, the previous corpus byte for byte and
    none of the new run's files left. It was a KeyboardInterrupt traceback."""
    out = tmp_path / "c"
    shutil.copytree(demo_corpus, out)
    run = subprocess.Popen([sys.executable, PREPARE, "--minutes", "5", "--seed", "1", "--force", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(600):  # until it has written some of the new corpus
            if list(out.rglob(".*.partial")):
                break
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before it was interrupted"
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1] == f"interrupted: the corpus in {out} is left as it was"
    assert digests(out) == digests(demo_corpus)


BROKEN = {  # a synthesizer on PATH that is installed but fails: it lists its voices, then exits 1
    "flite": '#!/bin/sh\nif [ "$1" = "-lv" ]; then echo "Voices available: kal awb rms slt"; exit 0; fi\n'
             'echo "flite: cannot open the audio device" >&2; exit 1\n',
    "festival": "#!/bin/sh\nexit 1\n",  # its voices are looked for on disk, like the real one's
}


@pytest.mark.parametrize("engine", ["flite", "festival"])
def test_an_installed_synthesizer_that_fails_is_found_before_any_synthesis(tmp_path, engine):
    """A flite that exits 1, a festival that exits at once (put first on PATH): left out with a
    note when the engines are not named (the corpus is made by those that work), one error line
    naming it when --engines asks for it. Before, both stopped midway with a traceback."""
    if engine == "festival" and not any(glob.glob(f"/usr/share/festival/voices/*/{v}")
                                        for v in ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")):
        pytest.skip("no Festival voices installed to be found")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / engine).write_text(BROKEN[engine])
    (tmp_path / "bin" / engine).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    note = prepare(tmp_path / "default", 0, 0.3, env=env)
    assert f"note: {engine} is left out, it fails here: {engine}" in note
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert engine not in {v["engine"] for f in manifest["files"] for v in f["voices"]}
    assert not any(v.startswith(engine) for split in ("train", "val") for v in manifest["settings"]["voices"][split])
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.3", "--engines", f"espeak,{engine}",
                             "--out", str(tmp_path / "named")], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: --engines espeak,{engine}: {engine} ")
    assert last.endswith(": repair it or leave it out")
    assert not (tmp_path / "named").exists()


@pytest.mark.skipif(not shutil.which("festival") or not glob.glob("/usr/share/festival/voices/*/kal_diphone")
                    or not glob.glob("/usr/share/festival/voices/*/ked_diphone"),
                    reason="needs Festival with kal_diphone and ked_diphone (data/demo/README.md)")
def test_a_festival_voice_that_fails_is_left_out_and_named_never_spoken_by_another(tmp_path):
    """The real festival with its ked_diphone voice broken (its voice function raises an error):
    festival went on with the voice before, so kal_diphone's speech was written as ked_diphone's
    (only the first voice was tried). Each voice is tried now: ked_diphone is left out with a note
    naming it and festival's error, kal_diphone still speaks, and no file is labelled ked_diphone."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "broken.scm").write_text('(define (voice_ked_diphone) (error "ked_diphone is broken here"))\n')
    (tmp_path / "bin" / "festival").write_text(f'#!/bin/sh\nexec {shutil.which("festival")} {tmp_path / "broken.scm"} "$@"\n')
    (tmp_path / "bin" / "festival").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    note = prepare(tmp_path / "c", 0, 0.5, "--engines", "espeak,festival", env=env)
    assert "note: festival:ked_diphone is left out, it fails here: festival failed on 'Hello.' with voice " \
           "ked_diphone: SIOD ERROR: ked_diphone is broken here" in note
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert "festival:kal_diphone" in manifest["settings"]["voices"]["train"]
    assert not any("ked_diphone" in v for split in ("train", "val") for v in manifest["settings"]["voices"][split])
    assert not any(v["speaker"] == "ked_diphone" for f in manifest["files"] for v in f["voices"])


@pytest.mark.skipif(not shutil.which("flite"), reason="flite is not installed (apt-get install flite)")
def test_a_synthesizer_failing_midway_is_one_error_line_and_the_corpus_is_left_as_it_was(demo_corpus, tmp_path):
    """A flite that speaks "Hello." (the check before synthesis) and fails on anything else: one
    `error:` line naming it, and the corpus already in --out is untouched."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "flite").write_text(f'#!/bin/sh\ncase "$*" in *"-t Hello. "*|-lv) exec {shutil.which("flite")} '
                                            '"$@";; esac\necho "flite: out of memory" >&2; exit 1\n')
    (tmp_path / "bin" / "flite").chmod(0o755)
    out = tmp_path / "c"
    shutil.copytree(demo_corpus, out)
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "3", "--seed", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: flite failed (exit status 1) on ") and "flite: out of memory" in last
    assert last.endswith(f"; the corpus in {out} is left as it was")
    assert visible(out) == visible(demo_corpus)


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie not yet reaped by init counts), within 5 s."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not shutil.which("stdbuf") or not glob.glob("/usr/share/festival/voices/*/kal_diphone"),
                    reason="needs Festival's kal_diphone voice and stdbuf")
def test_a_synthesizer_that_hangs_is_stopped_after_the_timeout(demo_corpus, tmp_path):
    """A festival that never answers (a wrapper whose child hangs): it was waited for for ever. Past
    --timeout it is stopped, child included, and left out with a note. A flite that speaks "Hello."
    (the check before synthesis) and hangs on anything else: one `error:` line naming the timeout,
    the corpus already in --out untouched, its child stopped."""
    hang = f'sleep 1000 & echo $! >> {tmp_path / "pids"}; wait\n'
    (tmp_path / "festival").mkdir()
    (tmp_path / "festival" / "festival").write_text("#!/bin/sh\n" + hang)
    (tmp_path / "festival" / "festival").chmod(0o755)
    began = time.monotonic()
    note = prepare(tmp_path / "c", 0, 0.2, "--timeout", "0.5",
                   env={**os.environ, "PATH": f"{tmp_path / 'festival'}{os.pathsep}{os.environ['PATH']}"})
    assert "note: festival is left out, it fails here: festival did not finish within 0.5 s on 'Hello.' with " \
           "voice kal_diphone (--timeout)" in note
    assert time.monotonic() - began < 60
    if shutil.which("flite"):
        (tmp_path / "flite").mkdir()
        (tmp_path / "flite" / "flite").write_text(f'#!/bin/sh\ncase "$*" in *"-t Hello. "*|-lv) exec '
                                                  f'{shutil.which("flite")} "$@";; esac\n{hang}')
        (tmp_path / "flite" / "flite").chmod(0o755)
        out = tmp_path / "old"
        shutil.copytree(demo_corpus, out)
        result = subprocess.run([sys.executable, PREPARE, "--minutes", "3", "--seed", "1", "--timeout", "0.5",
                                 "--engines", "espeak,flite", "--out", str(out)], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "PATH": f"{tmp_path / 'flite'}{os.pathsep}{os.environ['PATH']}"})
        assert result.returncode == 1 and "Traceback" not in result.stderr
        last = result.stderr.splitlines()[-1]
        assert last.startswith("error: flite did not finish within 0.5 s on ") and "(--timeout)" in last
        assert last.endswith(f"; the corpus in {out} is left as it was")
        assert visible(out) == visible(demo_corpus)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) >= 3 and all(gone(p) for p in pids)  # festival's voices, flite's sentence


def test_a_disk_filling_up_is_one_error_line_naming_the_file_and_the_corpus_is_left_as_it_was(demo_corpus, tmp_path):
    """Writes failing midway (a file size limit, as a full disk: the kernel refuses the write): it
    was `error: System error.` (soundfile's words), and the new run's files were left on the full
    disk. Now one line names the file and the reason, the previous corpus is whole, and no file
    of the failed run is left."""
    import resource
    out = tmp_path / "c"
    shutil.copytree(demo_corpus, out)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # noqa: E731
    result = subprocess.run([sys.executable, PREPARE, "--minutes", "0.5", "--seed", "1", "--force", "--engines",
                             "espeak", "--out", str(out)], capture_output=True, text=True, timeout=120,
                            preexec_fn=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}{os.sep}") and ".wav.partial (File too large); " in last
    assert last.endswith(f"; the corpus in {out} is left as it was")
    assert digests(out) == digests(demo_corpus)


def test_a_second_run_on_the_same_folder_waits_for_the_first_and_finds_its_corpus(tmp_path):
    """Two runs on one --out at once (two demos started together): the second waits for the first
    (a note says so), then finds the corpus complete; both succeed and the corpus is whole. Before,
    the second removed the first's unfinished files as a killed run's: one of them failed with a
    traceback and the folder was left without a manifest."""
    out = tmp_path / "c"
    first = subprocess.Popen([sys.executable, PREPARE, "--minutes", "4", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until it is synthesising
            if list(out.rglob(".*.partial")):
                break
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before the second started"
        second = prepare(out, 0, 4)
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "waiting for another prepare.py writing a corpus in" in second and "already" in second
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k for k in visible(out) if k.endswith(".wav")} == {f["path"] for f in manifest["files"]}
    assert not list(out.rglob(".*.partial"))


def test_a_synthesizer_that_writes_no_samples_is_left_out_as_a_failing_one(tmp_path):
    """A flite that writes a valid WAV of no samples: a ValueError traceback (the level of an empty
    array) where one that writes garbage is left out with a note; now the same note."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "flite").write_text(
        '#!/bin/sh\nif [ "$1" = "-lv" ]; then echo "Voices available: kal awb rms slt"; exit 0; fi\n'
        'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then '
        f'{sys.executable} -c "import sys, numpy, soundfile; soundfile.write(sys.argv[1], numpy.zeros(0), 16000)" "$2"; '
        'fi; shift; done\n')
    (tmp_path / "bin" / "flite").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    note = prepare(tmp_path / "default", 0, 0.3, env=env)
    assert "note: flite is left out, it fails here: flite.wav: the synthesizer wrote no samples" in note


@pytest.mark.parametrize("damage", ["a variant missing", "the library missing"])
def test_a_broken_espeak_install_is_one_error_line(tmp_path, damage):
    """An espeakng-loader whose data lack a variant the corpus uses, or whose library is gone (another
    build of the package): a RuntimeError or OSError traceback, where eSpeak NG not installed at
    all is one line. Now one `error:` line naming what is wrong, and no corpus."""
    import espeakng_loader
    data = tmp_path / "data"
    shutil.copytree(espeakng_loader.get_data_path(), data)
    library = espeakng_loader.get_library_path()
    if damage == "a variant missing":
        os.remove(data / "voices" / "!v" / "croak")
    else:
        library = str(tmp_path / "nope.so")
    (tmp_path / "mod" / "espeakng_loader").mkdir(parents=True)
    (tmp_path / "mod" / "espeakng_loader" / "__init__.py").write_text(
        f"def get_library_path(): return {library!r}\ndef get_data_path(): return {str(data)!r}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mod")}
    r = subprocess.run([sys.executable, PREPARE, "--minutes", "0.1", "--out", str(tmp_path / "corpus")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: eSpeak NG cannot be used here: "), r.stderr[-500:]
    assert ("croak" if damage == "a variant missing" else "nope.so") in r.stderr
    assert not (tmp_path / "corpus").exists()


STOP_AT = '''"""Injected by test_a_run_stopped_in_its_swap_...: count os.replace and os.remove on files under
STOP_DIR (the swap's renames and deletions), log them to STOP_LOG, and at the STOP_AT-th send
this process STOP_SIGNAL, before the call runs."""
import os, signal
_count, _pid = [0], os.getpid()

def _wrap(orig):
    def call(*args, **kwargs):
        path = str(args[-1] if orig is _replace else args[0])
        if os.getpid() == _pid and path.startswith(os.environ["STOP_DIR"] + os.sep):
            _count[0] += 1
            if os.environ.get("STOP_LOG"):
                with open(os.environ["STOP_LOG"], "a") as f:
                    f.write(path + "\\n")
            if _count[0] == int(os.environ.get("STOP_AT", "0")):
                os.kill(_pid, getattr(signal, os.environ["STOP_SIGNAL"]))
        return orig(*args, **kwargs)
    return call

_replace = os.replace
os.replace, os.remove = _wrap(os.replace), _wrap(os.remove)
'''


def test_a_run_stopped_in_its_swap_leaves_no_half_corpus_and_the_next_run_finishes_it(demo_corpus, tmp_path):
    """A rebuild stopped at each point of its swap (the renames that put the new corpus in place of
    the old), by an injected SIGKILL at the N-th rename or deletion: the trainers either see one
    corpus whole or refuse the folder (its `.replacing` mark), and the next run finishes the swap,
    the new corpus byte for byte, without synthesising it again. SIGTERM and Ctrl-C there wait for
    the swap to end. Before, the old corpus was deleted, then the new one's files renamed in: killed
    midway, train/ held part of the new corpus without a manifest, trained on as a corpus, and the
    next run deleted the rest although it was complete; SIGTERM killed it midway too."""
    from model.data import folder_problem
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(STOP_AT)
    new = ["--minutes", "1", "--seed", "1", "--engines", "espeak"]

    def rebuild(out, **env):
        env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}", "STOP_DIR": str(out), **env}
        return subprocess.run([sys.executable, PREPARE, *new, "--out", str(out)], capture_output=True, text=True,
                              timeout=120, env=env)

    logged = tmp_path / "logged"
    shutil.copytree(demo_corpus, logged)
    assert rebuild(logged, STOP_LOG=str(tmp_path / "log")).returncode == 0  # the swap's steps, and the new corpus
    steps, whole = len((tmp_path / "log").read_text().splitlines()), digests(logged)
    old, new_visible = visible(demo_corpus), visible(logged)
    assert steps >= 5 and old != new_visible
    for at, stop in ((1, "SIGKILL"), (2, "SIGKILL"), (steps // 2, "SIGKILL"), (steps - 1, "SIGKILL"),
                     (steps, "SIGKILL"), (steps // 2, "SIGTERM"), (steps // 2, "SIGINT")):
        out = tmp_path / f"{stop}{at}"
        shutil.copytree(demo_corpus, out)
        result = rebuild(out, STOP_AT=str(at), STOP_SIGNAL=stop)
        if stop == "SIGKILL":
            assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
            refused = [folder_problem(str(out / p)) for p in ("train", "val", "train/mono", "val/dialogue")]
            assert all(refused) or visible(out) in (old, new_visible), f"stopped at {at}: half a corpus, not refused"
            finished = prepare(out, 1, 1, "--engines", "espeak")
            assert "already" in finished and "synthesizers" not in finished, finished
        else:  # held until the swap was done, then acted on
            assert result.returncode == (130 if stop == "SIGINT" else -signal.SIGTERM), result.stderr[-2000:]
        assert digests(out) == whole, f"{stop} at {at} of {steps}"
        assert not any(folder_problem(str(out / p)) for p in ("train", "val"))
