"""The README's main job, `python demo.py`, runs end to end in a scratch copy of the repository:
demo corpus -> tiny codec -> tiny transformer -> a stereo completion WAV; and again after any
earlier demo run, with other step counts."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--minutes", "0.5", "--seconds", "2"]  # 0.7 minutes: 3 training files, 2 validation


def scratch_copy(folder: Path) -> Path:
    """The files the demo needs, copied without any corpus, checkpoint or output."""
    for name in ("config", "model", "data/demo", "demo.py", "train_codec.py", "train_transformer.py", "complete.py"):
        src, dst = REPO / name, folder / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", "val", "manifest.json", "__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return folder


def demo(folder: Path, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "demo.py", *SMALL, *map(str, args)], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished" in done.stdout
    return done


@pytest.mark.slow
def test_demo_end_to_end_then_other_step_counts(tmp_path):
    """The demo runs end to end (codec and transformer checkpoints, a stereo completion). Then
    more codec steps change the codec: the transformer starts over (old run moved aside, with a
    note) instead of failing to resume; then the first command's codec steps (the codec is past
    them: nothing changes) with more transformer steps resume what is there. (The first command
    again unchanged, a demo run more, proves nothing the last run does not: demo.py runs the same
    steps, and a trainer asked for steps it has made says so and changes nothing,
    test_train_codec's and test_train_transformer's test_the_same_command_after_the_run_finished_*.)"""
    folder = scratch_copy(tmp_path)
    first = ["--codec-steps", 2, "--transformer-steps", 2]
    done = demo(folder, *first)
    assert "val mel distance" in done.stdout
    audio, sr = sf.read(folder / "outputs/demo/completion.wav")
    assert sr == 16000 and audio.ndim == 2 and audio.shape[1] == 2 and len(audio) >= 2 * 16000
    assert (folder / "checkpoints/codec/best.safetensors").is_file()
    assert (folder / "checkpoints/transformer/best.safetensors").is_file()
    done = demo(folder, "--codec-steps", 4, "--transformer-steps", 2)
    assert "note: the codec changed since checkpoints/transformer was trained" in done.stdout
    assert len(list((folder / "checkpoints/transformer").glob("old-*"))) == 1
    done = demo(folder, "--codec-steps", 2, "--transformer-steps", 3)  # the codec is past 2 steps: it resumes
    assert "note: the codec changed" not in done.stdout and "(step 2)" in done.stdout + done.stderr
    assert len(list((folder / "checkpoints/transformer").glob("old-*"))) == 1
    assert sf.info(folder / "outputs/demo/completion.wav").channels == 2


@pytest.mark.parametrize("args, message", [
    (["--minutes", "nan"], "--minutes and --seconds must be finite numbers > 0"),
    (["--seconds", "inf"], "--minutes and --seconds must be finite numbers > 0"),
    (["--codec-steps", "0"], "--codec-steps and --transformer-steps must be >= 1"),
    # found after training, then at the start naming --num, a flag demo.py does not have
    (["--seconds", "1e9"], "--seconds 1e+09 needs at least 1.28e+05 GB (KV caches"),
], ids=["minutes", "seconds", "steps", "seconds-past-memory"])
def test_bad_arguments_stop_before_the_first_step(tmp_path, args, message):
    folder = scratch_copy(tmp_path)
    done = subprocess.run([sys.executable, "demo.py", *args], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"error: {message}")
    assert done.stdout == "" and not (folder / "data/demo/train").exists()


def test_a_failing_step_says_how_to_start_over(tmp_path):
    """The step's own message, then one `error:` line naming the step and what to do (it was
    'demo: step failed ...' and a second line, without the prefix the other errors have)."""
    folder = scratch_copy(tmp_path)
    (folder / "train_codec.py").write_text("import sys\nsys.exit('error: broken on purpose')\n")
    (folder / "data/demo/prepare.py").write_text("")  # the corpus step succeeds at once
    done = subprocess.run([sys.executable, "demo.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: broken on purpose",
        "error: step train_codec.py failed (exit code 1; its messages are above): fix what it says and run the same "
        "command to go on, or start the demo over: python demo.py --fresh"]
    (folder / "train_codec.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")  # out of memory
    done = subprocess.run([sys.executable, "demo.py"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: step train_codec.py failed (killed by signal SIGKILL;")


@pytest.mark.parametrize("out, message", [
    (".", "--out: cannot write '{cwd}': it names a folder; name an audio file (out.wav, for example)"),
    ("out.xyz", "--out: cannot write {cwd}/out.xyz: soundfile writes no .xyz files (.wav, .flac or .ogg, for example)"),
], ids=["a-folder", "no-such-format"])
def test_an_out_that_complete_py_would_refuse_stops_the_demo_before_the_first_step(tmp_path, out, message):
    """An --out complete.py cannot write was found only at the last step, after the corpus and both
    trainings; and a relative one was taken from the repository, where the steps run, not from
    where demo.py was run."""
    folder, cwd = scratch_copy(tmp_path / "repo"), tmp_path / "elsewhere"
    cwd.mkdir()
    done = subprocess.run([sys.executable, folder / "demo.py", "--out", out], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == "error: " + message.format(cwd=cwd)
    assert done.stdout == "" and not (folder / "data/demo/train").exists()


def test_an_out_starting_with_a_tilde_is_in_the_home_folder(tmp_path):
    """`demo.py --out '~/take.wav'` (a `~` the shell left: zsh, quotes, --out=~/...) was a folder
    named `~` where demo.py was run; README says a leading `~` is the home folder. An output the
    demo refuses shows which path it took, before the first step."""
    folder, home = scratch_copy(tmp_path / "repo"), tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, folder / "demo.py", "--out", "~/take.xyz"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        f"error: --out: cannot write {home}/take.xyz: soundfile writes no .xyz files (.wav, .flac or .ogg, for example)")


@pytest.mark.parametrize("out, train_elsewhere", [
    ("data/demo/train/mono/mine.wav", False), ("data/demo/val/dialogue/dialogue_00000.wav", False),
    ("linked/mine.wav", False), ("data/demo/train/mono/mine.wav", True)],
    ids=["into-the-corpus", "the-prompt", "through-a-link", "into-a-corpus-folder-linked-elsewhere"])
def test_an_out_in_the_demo_s_own_corpus_is_refused_before_the_first_step(tmp_path, out, train_elsewhere):
    """`--out data/demo/train/mono/mine.wav` wrote the completion into the corpus, where every later
    demo run (--fresh too) stopped at its first step (a file prepare.py did not write); the prompt
    file itself was refused only after the corpus and both trainings. Now both, by any path, are
    one line before the first step, also where a folder of the corpus is a link elsewhere
    (data/demo/train on another disk). (The steps are stand-ins that would write the file.)"""
    folder = scratch_copy(tmp_path / "repo")
    (folder / "data/demo/val/dialogue").mkdir(parents=True)
    if train_elsewhere:  # data/demo/train a link to a folder on another disk
        (tmp_path / "elsewhere/mono").mkdir(parents=True)
        (folder / "data/demo/train").symlink_to(tmp_path / "elsewhere")
    else:
        (folder / "data/demo/train/mono").mkdir(parents=True)
    (folder / "data/demo/val/dialogue/dialogue_00000.wav").write_bytes(b"the prompt")
    (folder / "linked").symlink_to(folder / "data/demo/train/mono")
    (folder / "data/demo/prepare.py").write_text("")
    (folder / "train_codec.py").write_text("")
    (folder / "train_transformer.py").write_text("")
    (folder / "complete.py").write_text("import sys\nopen(sys.argv[2], 'w').write('completion')\n")
    done = subprocess.run([sys.executable, "demo.py", "--out", out], cwd=folder, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: --out {out}: it is in the demo's corpus folder ({folder / 'data/demo'}), which every demo run reads "
        "as its training and validation audio; write the completion elsewhere")
    assert not (folder / "data/demo/train/mono/mine.wav").exists()
    assert (folder / "data/demo/val/dialogue/dialogue_00000.wav").read_bytes() == b"the prompt"


def test_a_relative_out_is_taken_from_where_demo_py_is_run(tmp_path):
    """`python path/to/demo.py --out talk.wav` writes ./talk.wav, not path/to/talk.wav (the steps run
    in the repository). The steps are stand-ins here: the last one writes the file it is given."""
    folder, cwd = scratch_copy(tmp_path / "repo"), tmp_path / "elsewhere"
    cwd.mkdir()
    (folder / "data/demo/prepare.py").write_text(
        "import os\nos.makedirs('data/demo/val/dialogue', exist_ok=True)\n"
        "open('data/demo/val/dialogue/dialogue_00000.wav', 'wb').close()\n")
    (folder / "train_codec.py").write_text("")
    (folder / "train_transformer.py").write_text("")
    (folder / "complete.py").write_text("import sys\nopen(sys.argv[2], 'w').write('completion')\n")
    done = subprocess.run([sys.executable, folder / "demo.py", "--out", "talk.wav"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (cwd / "talk.wav").read_text() == "completion" and not (folder / "talk.wav").exists()
    assert "completion  talk.wav" in done.stdout



def signalled_demo(folder, send, timeout: float) -> tuple[subprocess.Popen, str]:
    """`python demo.py` in `folder` (its first step a stand-in printing 'started'), `send(demo)` once
    the step has started, then waited for; the demo and its stderr. Killed with its group if it
    outlives the wait."""
    demo = subprocess.Popen([sys.executable, "demo.py"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert demo.stdout.readline() == "\n" and demo.stdout.readline().startswith("$ data/demo/prepare.py")
        assert demo.stdout.readline() == "started\n"
        send(demo)
        _, err = demo.communicate(timeout=timeout)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    return demo, err

def test_ctrl_c_lets_the_running_step_stop_on_its_own_and_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during a step: demo.py printed a
    KeyboardInterrupt traceback, and subprocess.run killed the step 0.25 s later, in the middle of
    whatever it does on its own Ctrl-C (a save). Now the step ends by itself (here a stand-in taking
    a second to), and demo.py says in one line how to go on, exit status 130."""
    folder = scratch_copy(tmp_path)
    (folder / "data/demo/prepare.py").write_text(
        "import time\ntry:\n    print('started', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        "    time.sleep(1)\n    open('stopped', 'w').write('on its own')\n    raise SystemExit(130)\n")
    demo, err = signalled_demo(folder, lambda demo: os.killpg(demo.pid, signal.SIGINT), timeout=60)
    assert (folder / "stopped").read_text() == "on its own"
    assert demo.returncode == 130 and err == "interrupted: run the same command again to go on from where it stopped\n"


def test_sigterm_to_demo_alone_stops_the_running_step_too_and_is_one_line(tmp_path):
    """A SIGTERM to demo.py alone (`kill PID`, systemd's KillMode=process) ended it at once, silently,
    and left the running step training on its own, holding its run folder (the same command then
    said `another run is training in it now`). Now, as after a Ctrl-C, the step is sent the signal
    (here a stand-in that saves on SIGTERM, as the trainers do, and is gone once demo.py has
    ended), and demo.py says in one line how to go on, exit status 143."""
    folder = scratch_copy(tmp_path)
    (folder / "data/demo/prepare.py").write_text(
        "import os, signal, sys, time\nopen('pid', 'w').write(str(os.getpid()))\n"
        "def saved(signum, frame):\n    open('stopped', 'w').write('on its own')\n    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, saved)\nprint('started', flush=True)\ntime.sleep(60)\n")
    try:  # to demo.py only (the step is signalled after demo.STEP_GRACE, 10 s)
        demo, err = signalled_demo(folder, lambda demo: demo.send_signal(signal.SIGTERM), timeout=30)
    finally:
        step = int((folder / "pid").read_text())
        alive = subprocess.run(["ps", "-o", "stat=", "-p", str(step)], capture_output=True, text=True).stdout.strip()
        if alive:
            os.kill(step, signal.SIGKILL)  # the old demo.py's orphan
    assert (folder / "stopped").read_text() == "on its own" and not alive
    assert demo.returncode == 143 and err == "interrupted (SIGTERM): run the same command again to go on from where it stopped\n"
