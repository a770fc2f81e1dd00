"""train_codec.py end to end on the demo corpus (tiny preset, CPU): runs, checkpoints and their
exports, exact resume after a SIGKILL, two-process DDP, evaluation, init_from, errors, and the
speed benchmark's CPU smoke run."""
import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import train_codec
from config import ConfigError, fields_marked, from_dict, parse_args
from config.codec_config import CodecConfig
from model import Codec, build, hub, load_codec, save_codec
from model.checkpoint import read_metadata
from model.codec_losses import mel_filterbank
from config.codec_config import PRESETS
from model.training import Checkpoints, ConfigMismatch

from hub_server import HubServer
from in_process import main_in_process, run_in_process
from once import built_once
from reference import PARITY_DIR, codec_config, require
from shared_files import shared_note, val_sharing_training_files
from stale_index import changed_after_the_scan

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("espeakng_loader", reason="the demo corpus needs `pip install espeakng-loader`")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::model.data.SkippedAudioWarning")]  # the corpus' broken.wav


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_rows(path):
    return [r for r in rows(path) if "loss/total" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus (half a minute), plus one corrupt file in the training folder; one for the
    session's processes (`once.built_once`), as `trained` is."""
    def build(out):
        subprocess.run([sys.executable, str(ROOT / "data" / "demo" / "prepare.py"), "--minutes", "0.5", "--seed", "0",
                        "--out", str(out)], check=True, capture_output=True, timeout=120)
        (out / "train" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    return built_once(tmp_path_factory, "codec-corpus", build)


def args(corpus, run_dir, *extra):
    """The trainer's arguments: `extra` key=value replace the defaults' (a key is given once). Two
    crops a step, not the tiny preset's four: what these tests check (resume, schedules, saves,
    errors) is per step, not per crop, and a step costs half as much."""
    values = {"train_data_path": corpus / "train", "val_data_path": corpus / "val", "checkpoint_dir": run_dir,
              "wandb": "disabled", "max_steps": 8, "log_interval": 1, "save_interval": 4, "eval_interval": 4,
              "batch_size": 2,
              **dict(arg.split("=", 1) for arg in extra)}
    return ["--config", "tiny"] + [f"{key}={value}" for key, value in values.items()]


# For runs whose evaluations no assertion reads beyond their steps: one validation crop (a quiet
# one: its STOI and PESQ are NaN), no sample WAVs or mel figure; a third of an 8-step run's time.
# Evaluating draws no random number, so such a run's losses stay those of the `trained` run.
BRIEF_EVAL = ("val_crops=1", "num_audio_samples=0")

# One thread per process: on a shared CPU, OpenMP threads that outnumber the free cores spin and
# can make a step 20x slower; the numbers these tests compare do not depend on it.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(argv, env=None, timeout=300, module=None):
    cmd = [sys.executable] + (["-m", module] if module else []) + argv
    return subprocess.run(cmd, cwd=ROOT, env=env or ONE_THREAD, capture_output=True, text=True, timeout=timeout)


def run_here(argv, capsys):
    """`train_codec.py ARGV` in this process (`in_process.run_in_process`), as `run` returns it. Not
    for its SkippedAudioWarnings (said once per process, and filtered here)."""
    return run_in_process("train_codec.py", train_codec.main, argv, capsys)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One uninterrupted 8-step run, W&B asked for online without being logged in: the run folder
    and the finished process (its output kept beside the run). Made once for the session's
    processes (`once.built_once`: half a minute each); the tests copy the folder to change it."""
    def build(tmp):
        env = {k: v for k, v in ONE_THREAD.items() if not k.startswith("WANDB_")}
        env.update(HOME=str(tmp), WANDB_DIR=str(tmp))  # no ~/.netrc: not logged in
        result = run(["train_codec.py"] + args(corpus, tmp / "run", "wandb=online"), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        (tmp / "result.json").write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))
    tmp = built_once(tmp_path_factory, "codec-e2e", build)
    return tmp / "run", subprocess.CompletedProcess(*json.loads((tmp / "result.json").read_text()))


def test_a_few_steps_end_to_end(trained):
    run_dir, result = trained
    assert "not logged in, logging offline" in result.stdout
    assert list((run_dir / "wandb").glob("offline-run-*"))
    # the corrupt file is skipped, named and counted; the run goes on
    assert "broken.wav" in result.stderr and "1 unreadable files skipped" in result.stdout
    # as one `warning:` line: Python's format added "PATH/model/data.py:316: SkippedAudioWarning:" and a
    # line of the trainer's source under it, two lines a file
    [warned] = [line for line in result.stderr.replace("\r", "\n").splitlines() if "broken.wav" in line]
    assert warned.startswith("warning: skipping unreadable audio: ") and "SkippedAudioWarning" not in result.stderr
    assert "scan_audio_folder(" not in result.stderr
    for name in ("step_00000004.pt", "step_00000008.pt", "latest.pt", "best.pt", "latest.safetensors",
                 "best.safetensors", "loss_curves.png", "samples/mels.png", "samples/0_input.wav",
                 "samples/0_recon.wav"):
        assert (run_dir / name).is_file(), name
    train, val = train_rows(run_dir / "metrics.jsonl"), [r for r in rows(run_dir / "metrics.jsonl") if "val/stoi" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("loss/mel", "loss/kl", "loss/adv", "loss/feature", "loss/total", "loss/disc", "lr", "lr_disc",
                "grad_norm/generator", "grad_norm/discriminators", "perf/samples_per_s", "rate/kl_bits_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    # the KL rate is the logged KL (nats per latent) in bits, at 8 latents a second
    assert all(r["rate/kl_bits_per_s"] == pytest.approx(r["loss/kl"] / np.log(2) * 8) for r in train)
    assert [r["step"] for r in val] == [0, 4, 8]
    for key in ("val/mel_distance", "val/si_sdr", "val/stoi", "val/pesq", "val/kl_bits_per_s"):
        assert all(np.isfinite(r[key]) for r in val), key
    assert all(1.0 <= r["val/pesq"] <= 4.65 and r["val/kl_bits_per_s"] > 0 for r in val)
    assert "step 0: val mel distance" in result.stdout and "STOI" in result.stdout and "PESQ" in result.stdout
    # the exports load with the public API and hold the trained generator
    state = torch.load(run_dir / "latest.pt", weights_only=False)
    assert state["step"] == 8 and state["config"]["encode_channels"] == 4 and len(state["rng_state"]) == 1
    codec = load_codec(run_dir / "latest.safetensors")
    for k, v in codec.state_dict().items():
        assert torch.equal(v, state["generator"][k]), k
    best_step = json.loads((run_dir / "checkpoints.json").read_text())["best_step"]
    assert torch.load(run_dir / "best.pt", weights_only=False)["step"] == best_step
    load_codec(run_dir / "best.safetensors")


def test_killed_run_resumes_at_the_same_step_lr_and_data(corpus, trained, tmp_path, capsys):
    """SIGKILL after the step-4 checkpoint, restart: steps 5-8 repeat the uninterrupted run exactly
    (same LR, same crops, same noise)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train_codec.py"] + args(corpus, run_dir, *BRIEF_EVAL)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "step_00000004.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    done = len(rows(run_dir / "metrics.jsonl"))
    # what a kill inside a save can leave besides: a temporary, and an export behind its .pt
    (run_dir / ".latest.safetensors.killed00.tmp").write_bytes(b"partial")
    save_codec(run_dir / "latest.safetensors", build(Codec, PRESETS["tiny"]), {"step": 0})
    result = run_here(cmd[2:], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(step 4)" in result.stdout
    assert "note: removed .latest.safetensors.killed00.tmp, left by an interrupted save" in result.stdout
    assert "note: rebuilt latest.safetensors from latest.pt (step 4; it held step 0)" in result.stdout
    assert read_metadata(run_dir / "latest.safetensors")["extra"]["step"] == 8 and load_codec(run_dir / "latest.safetensors")
    assert not list(run_dir.glob(".*.tmp"))
    resumed = [r for r in rows(run_dir / "metrics.jsonl")[done:] if "loss/total" in r]
    reference = {r["step"]: r for r in train_rows(trained[0] / "metrics.jsonl")}
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for r in resumed:
        assert r["lr"] == reference[r["step"]]["lr"]
        assert r["loss/total"] == pytest.approx(reference[r["step"]]["loss/total"], rel=1e-5)
        assert r["loss/disc"] == pytest.approx(reference[r["step"]]["loss/disc"], rel=1e-5)


def test_two_process_ddp_with_gradient_accumulation(corpus, tmp_path):
    result = run(["--nproc_per_node", "2", "train_codec.py"] +
                 args(corpus, tmp_path / "run", "device=cpu", "max_steps=4", "eval_interval=100",
                      "grad_accum_steps=2", "batch_size=2", *BRIEF_EVAL),
                 module="torch.distributed.run")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng_state"]) == 2
    assert [r["step"] for r in train_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]  # rank 0 only
    assert "8 crops of 1.0 s per step on 2 x cpu" in result.stdout  # 2 per micro-batch x 2 x 2 ranks


def test_max_minutes_under_torchrun_stops_every_rank_at_the_same_step_saved(corpus, tmp_path):
    """Under torchrun the deadline is rank 0's clock, agreed on in the signals' per-step CPU
    all-reduce (one step later): both ranks stop at step 1, and the run is saved there."""
    result = run(["--nproc_per_node", "2", "train_codec.py"] +
                 args(corpus, tmp_path / "run", "device=cpu", "max_steps=1000", "max_minutes=1e-9",
                      "log_interval=1000", "batch_size=2", *BRIEF_EVAL),
                 module="torch.distributed.run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reached at step 1: run the same command to resume" in result.stdout, result.stdout[-2000:]
    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=False)
    assert state["step"] == 1 and state["world_size"] == 2


def test_more_workers_than_cores_is_one_note_without_torch_s_warning_after_it(corpus, tmp_path):
    """num_workers above the cores: the trainer's one-line note was followed by torch's own
    three-line UserWarning of it at every new iterator (the validation's, the training's, each
    evaluation's). The trainer's process itself: the note once, torch's warning not at all."""
    workers = len(os.sched_getaffinity(0)) + 1
    result = run(["train_codec.py"] + args(corpus, tmp_path / "run", "max_steps=1",
                                           f"num_workers={workers}", *BRIEF_EVAL))
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).replace("\r", "\n")
    assert output.count(f"note: num_workers={workers} is more than the") == 1
    assert "worker processes in total" not in output and "UserWarning" not in output, result.stderr[-3000:]


def test_total_loss_falls_on_one_fixed_batch(corpus, tmp_path, capsys):
    """Overfit one 1 s clip (batch of one, always the same crop) for 30 steps. The discriminators
    stay off (disc_start_step past max_steps, which the run notes): the mel + KL total must fall,
    while an adversarial game need not."""
    audio, sr = sf.read(corpus / "train" / "mono" / "mono_00001.wav", dtype="float32")
    energy = [np.sum(audio[i:i + sr] ** 2) for i in range(0, len(audio) - sr, sr // 10)]
    start = int(np.argmax(energy)) * (sr // 10)
    (tmp_path / "one").mkdir()
    sf.write(tmp_path / "one" / "clip.wav", audio[start:start + sr], sr)
    one = tmp_path / "one"
    train_codec.main(["--config", "tiny", f"train_data_path={one}", f"val_data_path={one}", "batch_size=1",
                      f"checkpoint_dir={tmp_path / 'run'}", "wandb=disabled", "max_steps=30", "warmup_steps=2",
                      "learning_rate=3e-3", "disc_start_step=1000", "log_interval=5", "eval_interval=1000",
                      "preload_max_gb=1e6"])
    out = capsys.readouterr().out
    assert "note: disc_start_step=1000 >= max_steps=30: the discriminators never start" in out
    # a preload larger than the machine's memory is lowered to half of it, said once; the clip still fits
    assert re.search(r"note: preload_max_gb=1e\+06 is more than half the [\d.]+ GB of memory available here", out)
    assert re.search(r"train: 1 files, .*, 1 crops, decoded into memory", out)
    train = train_rows(tmp_path / "run" / "metrics.jsonl")
    assert train[-1]["loss/total"] < 0.8 * train[0]["loss/total"]
    assert train[-1]["loss/mel"] < 0.8 * train[0]["loss/mel"]


def test_a_val_folder_holding_training_files_is_a_note(corpus, tmp_path, capsys):
    """A val folder holding training files (a symlink, a hard link) was not checked at all: its
    mel distance (which picks best.pt), STOI and PESQ measured memorised audio, silently. Now the
    note train_transformer.py prints (`model.data.shared_with_training`), found by resolved path
    and by device and inode."""
    train, val = val_sharing_training_files(corpus, tmp_path)
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={train}", f"val_data_path={val}",
                           "max_steps=1", "save_interval=1", "eval_interval=1", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if "shares" in line] == [shared_note(val)]


def test_discriminators_that_never_start_are_a_note():
    """disc_start_step at or past max_steps with adversarial weights > 0 was accepted silently: the
    whole run trained without the terms its weights asked for. A short trial of a recipe with a
    mel-only start may mean it, so it is a note naming the fields; none when the terms are off."""
    tiny = PRESETS["tiny"]  # max_steps 20
    assert train_codec.recipe_notes(dataclasses.replace(tiny, disc_start_step=19)) == []
    assert train_codec.recipe_notes(dataclasses.replace(tiny, disc_start_step=20)) == [
        "disc_start_step=20 >= max_steps=20: the discriminators never start, so no adversarial or feature-matching "
        "term is trained (adv_weight=1, feature_weight=2); lower disc_start_step unless this is meant (adv_weight=0 "
        "feature_weight=0 says so)"]
    assert train_codec.recipe_notes(dataclasses.replace(tiny, disc_start_step=20, adv_weight=0.0,
                                                        feature_weight=0.0)) == []


def test_mel_bands_that_hold_no_frequency_bin_are_a_note():
    """Too many mel bands for a window left some of them empty (no FFT bin inside the triangle):
    a constant in the mel loss, trained without a word (librosa warns). A note names the window,
    the count and the bins; the presets' pairs have none."""
    tiny = PRESETS["tiny"]
    for preset in PRESETS.values():
        assert not [n for n in train_codec.recipe_notes(preset) if n.startswith("mel_bins")]
    notes = train_codec.recipe_notes(dataclasses.replace(tiny, mel_windows=(64, 512), mel_bins=(10, 1000)))
    empty = int((mel_filterbank(512, 1000, 16000).sum(-1) == 0).sum())
    assert empty > 0 and notes == [
        f"mel_bins: {empty} of the 1000 mel bands of the 512-sample window hold no frequency bin (it has 257); they "
        "add a constant to the mel loss and nothing else: give that window fewer bands"]


def test_phase_aware_terms_are_logged_and_weighted_into_the_total(corpus, tmp_path):
    """wave_weight, stft_weight and logmag_weight add their terms to the logs and to the total with
    their weights; at weight 0 (the default) they are neither computed nor logged."""
    common = ["--config", "tiny", f"train_data_path={corpus / 'train'}", f"val_data_path={corpus / 'val'}",
              "wandb=disabled", "max_steps=3", "log_interval=1", "eval_interval=1000", "disc_start_step=1000",
              *BRIEF_EVAL]
    train_codec.main(common + [f"checkpoint_dir={tmp_path / 'on'}", "wave_weight=2.0", "stft_weight=0.5",
                               "logmag_weight=0.25", "logmag_windows=(256,1024)"])
    train_codec.main(common + [f"checkpoint_dir={tmp_path / 'off'}"])
    on, off = train_rows(tmp_path / "on" / "metrics.jsonl"), train_rows(tmp_path / "off" / "metrics.jsonl")
    cfg = PRESETS["tiny"]
    for r in on:
        assert r["loss/wave"] > 0 and r["loss/stft"] > 0 and r["loss/logmag"] > 0
        assert r["loss/total"] == pytest.approx(cfg.mel_weight * r["loss/mel"] + cfg.kl_weight * r["loss/kl"]
                                                + 2.0 * r["loss/wave"] + 0.5 * r["loss/stft"]
                                                + 0.25 * r["loss/logmag"], rel=1e-5)
        assert r["perf/step_s_max"] >= r["perf/step_s_p50"] > 0
    assert all("loss/wave" not in r and "loss/stft" not in r and "loss/logmag" not in r for r in off)


def test_adversarial_terms_at_weight_0_are_not_computed_and_their_discriminators_idle(corpus, tmp_path):
    """A term at weight 0 is neither computed nor logged; with both the adversarial and the
    feature-matching weights 0 the discriminators neither judge nor learn (they were run and
    trained every step for nothing)."""
    common = ["--config", "tiny", f"train_data_path={corpus / 'train'}", f"val_data_path={corpus / 'val'}",
              "wandb=disabled", "max_steps=2", "log_interval=1", "eval_interval=1000", "disc_start_step=0",
              *BRIEF_EVAL]
    train_codec.main(common + [f"checkpoint_dir={tmp_path / 'fm'}", "adv_weight=0"])
    train_codec.main(common + [f"checkpoint_dir={tmp_path / 'none'}", "adv_weight=0", "feature_weight=0"])
    fm, none = train_rows(tmp_path / "fm" / "metrics.jsonl"), train_rows(tmp_path / "none" / "metrics.jsonl")
    assert fm and all("loss/adv" not in r and r["loss/feature"] > 0 and "loss/disc" in r for r in fm)
    assert none and all(not any(k.startswith(("loss/adv", "loss/feature", "loss/disc", "grad_norm/disc")) for k in r)
                        for r in none)
    untrained = torch.load(tmp_path / "none" / "latest.pt", weights_only=False)
    assert not untrained["opt_d"]["state"]  # no discriminator step taken: AdamW holds no moments


def test_a_training_step_walks_no_module_tree(corpus, tmp_path):
    """The step clips the gradients of parameter lists made once: it clipped `module.parameters()`,
    which walked every module of the generator and the discriminators again each step (the
    weight-normed convolutions nest three deep: ~17,500 of small_fast's ~41,000 Python calls a
    step, on a step the host bounds on a GPU). Counted per step: the calls into
    `Module.named_modules` made while the trainer's loop is at that step (a few are left: the
    codec's first-parameter look-up in encode and decode)."""
    named_modules, main = torch.nn.Module.named_modules.__code__, train_codec.main.__code__
    walks = collections.Counter()  # step -> calls into named_modules

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is named_modules:
            loop = frame.f_back
            while loop is not None and loop.f_code is not main:
                loop = loop.f_back
            if loop is not None:
                walks[loop.f_locals.get("step")] += 1

    sys.setprofile(profile)
    try:
        train_codec.main(["--config", "tiny", f"train_data_path={corpus / 'train'}", f"val_data_path={corpus / 'val'}",
                          f"checkpoint_dir={tmp_path / 'run'}", "wandb=disabled", "max_steps=3", "disc_start_step=0",
                          "log_interval=1", "eval_interval=1000", "save_interval=1000", "val_crops=1"])
    finally:
        sys.setprofile(None)
    assert train_rows(tmp_path / "run" / "metrics.jsonl")[-1]["grad_norm/discriminators"] > 0
    assert 0 < walks[1] < 100 and 0 < walks[2] < 100, walks  # steps 1 and 2: neither evaluates nor saves


def test_max_minutes_stops_cleanly_and_the_next_segment_resumes(corpus, tmp_path):
    run_dir = tmp_path / "run"
    segment = args(corpus, run_dir, "max_steps=1000", "max_minutes=0.001", "eval_interval=1000", "num_audio_samples=0")
    first = train_codec.main(segment)
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert 0 < stopped < 1000 and np.isfinite(list(first.values())).all()
    last_val = [r for r in rows(run_dir / "metrics.jsonl") if "val/stoi" in r][-1]
    assert last_val["step"] == stopped  # evaluated, then saved, at the step it stopped
    train_codec.main(segment)
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] > stopped
    assert train_rows(run_dir / "metrics.jsonl")[-1]["step"] > stopped


def test_max_minutes_stops_the_run_even_where_log_interval_reaches_past_its_last_step(corpus, tmp_path, capsys):
    """The deadline was asked on log steps only: with log_interval=6 of 6 steps it was never asked,
    and a run under a scheduler's time limit trained on past it without a word. Asked at every step,
    a deadline passed during the setup stops the run after its first step, evaluated and saved."""
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, "max_steps=6", "log_interval=6", "max_minutes=0.001", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_minutes=0.001 reached at step 1: run the same command to resume" in result.stdout
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 1
    assert [r["step"] for r in rows(run_dir / "metrics.jsonl") if "val/stoi" in r] == [0, 1]


def test_stop_step_ends_early_on_the_full_schedule_and_the_next_run_continues(corpus, trained, tmp_path, capsys):
    """stop_step=3 of max_steps=8: the run evaluates and saves at step 3 and stops, its learning
    rates those of the 8-step schedule; run again without it, steps 4-8 repeat the uninterrupted
    8-step run exactly (same LR, crops and noise), as runs of a recipe compared at equal steps."""
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, "stop_step=3", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training from step 0 to 3:" in result.stdout
    assert "stop_step=3 reached; the schedule runs to max_steps=8: run again with a later stop_step (or 0) to continue" \
        in result.stdout
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 3
    assert [r["step"] for r in rows(run_dir / "metrics.jsonl") if "val/stoi" in r] == [0, 3]
    reference = {r["step"]: r for r in train_rows(trained[0] / "metrics.jsonl")}
    assert reference[3]["lr"] > reference[8]["lr"]  # mid-schedule: not the end of a 3-step one
    done = len(rows(run_dir / "metrics.jsonl"))
    result = run_here(args(corpus, run_dir, *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training from step 3 to 8:" in result.stdout
    steps = train_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert r["lr"] == reference[r["step"]]["lr"]
        assert r["loss/total"] == pytest.approx(reference[r["step"]]["loss/total"], rel=1e-5)
    assert [r["step"] for r in rows(run_dir / "metrics.jsonl")[done:] if "val/stoi" in r] == [4, 8]


def test_a_stop_step_past_max_steps_is_a_note_and_the_run_ends_at_max_steps(corpus, tmp_path, capsys):
    """stop_step=50 of max_steps=2 was taken without a word (`last_step` is the smaller: it is never
    reached); a note says so before the data loads, and the run trains its 2 steps."""
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, "max_steps=2", "stop_step=50", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    note = ("note: stop_step=50 is past max_steps=2: the run ends at max_steps; raise max_steps to train longer (the "
            "cosine decay is then stretched to it)")
    assert note in result.stdout.splitlines()
    assert result.stdout.index(note) < result.stdout.index("training from step 0 to 2:")
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 2


def test_a_weight_average_is_what_validation_and_the_exports_use_and_it_resumes_exactly(corpus, trained, tmp_path,
                                                                                          capsys):
    """ema_decay: validation scores the moving average (val_raw/ the training weights beside it),
    the .safetensors exports and eval_only hold it, the .pt states hold both; the training itself is
    the run without it (the same losses), and a run stopped and continued keeps the same average."""
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, "ema_decay=0.5", "val_raw=true", "val_crops=4", "num_audio_samples=0"),
                      capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(training weights: val_raw mel distance" in result.stdout
    reference = {r["step"]: r for r in train_rows(trained[0] / "metrics.jsonl")}
    for r in train_rows(run_dir / "metrics.jsonl"):  # averaging changes no training step
        assert r["loss/total"] == pytest.approx(reference[r["step"]]["loss/total"], rel=1e-5)
    evaluations = {r["step"]: r for r in rows(run_dir / "metrics.jsonl") if "val/mel_distance" in r}
    assert sorted(evaluations) == [0, 4, 8]
    assert evaluations[0]["val/mel_distance"] == evaluations[0]["val_raw/mel_distance"]  # nothing averaged yet
    assert evaluations[8]["val/mel_distance"] != evaluations[8]["val_raw/mel_distance"]
    state = torch.load(run_dir / "latest.pt", weights_only=False)
    params = dict(Codec(from_dict(CodecConfig, state["config"])).named_parameters())
    assert set(state["ema"]) == set(params) and any(not torch.equal(state["ema"][k], state["generator"][k])
                                                    for k in params)
    exported = load_codec(run_dir / "latest.safetensors").state_dict()
    assert all(torch.equal(exported[k], state["ema"][k]) for k in params)
    # the training weights score what val_raw logged, the average what val logged, and eval_only
    # of the state scores the average, as of its export
    common = ["--config", "tiny", f"val_data_path={corpus / 'val'}", "eval_only=true", "val_crops=4"]
    of_state = train_codec.main(common + [f"init_from={run_dir / 'latest.pt'}"])
    of_export = train_codec.main(common + [f"init_from={run_dir / 'latest.safetensors'}"])
    assert of_state == pytest.approx(of_export)
    assert of_state["val/mel_distance"] == pytest.approx(evaluations[8]["val/mel_distance"], rel=1e-5)
    trained_weights = build(Codec, from_dict(CodecConfig, state["config"]))
    trained_weights.load_state_dict(state["generator"])
    save_codec(tmp_path / "raw.safetensors", trained_weights)
    raw = train_codec.main(common + [f"init_from={tmp_path / 'raw.safetensors'}"])
    assert raw["val/mel_distance"] == pytest.approx(evaluations[8]["val_raw/mel_distance"], rel=1e-5)
    capsys.readouterr()
    # eval_only val_raw=true of the state: both rows of the table (no ema_decay needed: the state keeps one)
    both = train_codec.main(common + [f"init_from={run_dir / 'latest.pt'}", "val_raw=true"])
    table = capsys.readouterr().out
    assert "latest.pt (weight average) |" in table and "latest.pt (training weights) |" in table
    assert both["val/mel_distance"] == pytest.approx(of_state["val/mel_distance"])
    assert both["val_raw/mel_distance"] == pytest.approx(raw["val/mel_distance"], rel=1e-5)
    train_codec.main(common + [f"init_from={tmp_path / 'raw.safetensors'}", "val_raw=true"])
    assert "val_raw=true: " + str(tmp_path / "raw.safetensors") + " holds one set of weights" in capsys.readouterr().out
    # stopped at step 3 and continued: the same average at step 8
    stopped = tmp_path / "stopped"
    for extra in (("stop_step=3",), ()):
        result = run_here(args(corpus, stopped, "ema_decay=0.5", *extra, *BRIEF_EVAL), capsys)
        assert result.returncode == 0, result.stderr[-3000:]
    continued = torch.load(stopped / "latest.pt", weights_only=False)["ema"]
    assert all(torch.equal(continued[k], state["ema"][k]) for k in params)
    # a run resumed from a state without an average starts one from its weights, and says so
    plain = tmp_path / "plain"
    shutil.copytree(trained[0], plain, ignore=shutil.ignore_patterns("wandb"))
    result = run_here(args(corpus, plain, "ema_decay=0.5", "max_steps=9", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latest.pt holds no weight average: ema_decay=0.5 starts one from its weights" in result.stdout
    assert "ema" in torch.load(plain / "latest.pt", weights_only=False)


def files_of(run_dir):
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}


def test_the_same_command_after_the_run_finished_says_so_and_changes_nothing(corpus, trained, tmp_path, capsys):
    """Run again once finished (latest.pt at max_steps): it read the data, built the models,
    evaluated step 8 once more (a second row in metrics.jsonl), redrew the curves and said "done
    at step 8". Now one line says the run is finished and how to train further, before the data
    is read, and no file of the run changes."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    before = files_of(run_dir)
    assert train_codec.main(args(corpus, run_dir)) == {}
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [
        f"the run in {run_dir} is already finished at step 8 (max_steps=8); nothing to train. To train further, "
        "raise max_steps (e.g. max_steps=16: the cosine decay is then stretched to it, so the learning rate rises "
        "again); to start afresh, resume=false"]
    assert files_of(run_dir) == before


def test_float16_scales_the_loss_and_resumes_its_scale(corpus, trained, tmp_path, capsys):
    """dtype=float16 trains with a dynamic loss scale (model.training.loss_scaler): on the CPU
    (float32 arithmetic; the scale a power of two) every loss and learning rate of an 8-step run
    stopped at 3 and continued equals the float32 run's, and the checkpoint carries the scale and
    its count of clean steps across the resume."""
    run_dir = tmp_path / "run"
    for extra in (("stop_step=3",), ()):
        result = run_here(args(corpus, run_dir, "dtype=float16", *BRIEF_EVAL, *extra), capsys)
        assert result.returncode == 0, result.stderr[-3000:]
    reference = {r["step"]: r for r in train_rows(trained[0] / "metrics.jsonl")}
    steps = train_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert r["lr"] == reference[r["step"]]["lr"]
        assert r["loss/total"] == pytest.approx(reference[r["step"]]["loss/total"], rel=1e-5)
    scaler = torch.load(run_dir / "latest.pt", weights_only=False)["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 8
    assert torch.load(trained[0] / "latest.pt", weights_only=False)["scaler"] == {}  # float32: none


def test_float16_whose_gradient_norm_overflows_stops_with_an_error(corpus, tmp_path, capsys):
    """dtype=float16 with mel_weight=1e30: finite gradients whose norm overflows float32. Every step
    was skipped as a float16 overflow (the scale never lowered, the scaler having found the
    gradients finite) and the run ended "done", exit 0, with its first weights saved; now it stops
    at step 0 as float32 does, with one error line and nothing saved."""
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, "dtype=float16", "mel_weight=1e30", *BRIEF_EVAL), capsys)
    assert result.returncode == 1
    assert error_line(result.stderr).startswith("error: non-finite gradient norm (inf) at step 0 on a batch from ")
    assert not list(run_dir.glob("*.pt"))


def test_empty_train_folder_is_a_clear_error(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={tmp_path / 'empty'}"), capsys)
    assert result.returncode != 0
    assert f"error: audio folder {tmp_path / 'empty'} has no audio files" in result.stderr
    assert ".wav, .flac, .ogg, .opus, .oga, .mp3" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, message", [
    # rounds to 0 samples, a multiple of every hop: a ValueError traceback from the dataset
    (["segment_seconds=0.00001"], "segment_seconds=1e-05 gives 0 samples, not a positive multiple"),
    (["val_segment_seconds=0.00001"], "val_segment_seconds=1e-05 gives 0 samples"),
    # an AssertionError when the codec was built, after the data
    (["strides=(2,2,4,5,5)"], "strides=(2, 2, 4, 5, 5) and channel_ratios=(1, 2, 4, 4, 4, 4) need one item"),
    # a ValueError when the loss was built, after the data; with both empty, a TypeError at step 0
    (["mel_windows=(32,64)"], "mel_windows=(32, 64) and mel_bins=(5, 10, 20, 40, 80, 160, 320): give one"),
    (["mel_windows=()", "mel_bins=()"], "mel_windows=() and mel_bins=(): give one number"),
    # tracebacks in the first step (no discriminator's verdict to back-propagate, an empty feature map list)
    (["mpd_periods=()", "mrd_windows=()"], "mpd_periods=() and mrd_windows=(): no discriminator left"),
    (["mpd_channels=()"], "mpd_channels=(): the period discriminators need"),
    (["stft_weight=1.0", "stft_windows=()"], "stft_weight > 0 with stft_windows=()"),
    (["logmag_weight=1.0", "logmag_windows=()"], "logmag_weight > 0 with logmag_windows=()"),
    # trained silently: nothing learnt (only weight decay), or a rate rising from 1e-5 to min_lr
    (["mel_weight=0.0", "kl_weight=0.0", "adv_weight=0.0", "feature_weight=0.0"],
     "mel_weight, kl_weight, adv_weight, feature_weight, wave_weight, stft_weight, logmag_weight are all 0"),
    (["learning_rate=1e-5"], "min_lr=0.0001 is above learning_rate=1e-05: the cosine decay would raise the rate"),
    # AdamW's decay factor 1 - rate * weight_decay at or below 0: the weights zeroed or flipped each step
    (["weight_decay=2000.0"], "learning_rate=0.001 with weight_decay=2000: AdamW multiplies the weights by "
                              "1 - learning_rate * weight_decay = -1 each step"),
    (["learning_rate=1e-4", "min_lr=0", "weight_decay=2000.0"], "disc_learning_rate=0.001 with weight_decay=2000"),
    # reflection padding longer than the crop: a traceback in the first step, after the data and an evaluation
    (["mel_windows=(32,32000)", "mel_bins=(5,80)"], "mel_windows=(32, 32000): 32000 is too long for the "
                                                    "16000-sample crops of segment_seconds=1.0; it must be under 32000"),
    (["val_segment_seconds=0.125", "mel_windows=(32,4096)", "mel_bins=(5,80)"],
     "mel_windows=(32, 4096): 4096 is too long for the 2000-sample crops of val_segment_seconds=0.125; it must be "
     "under 4000"),
    (["stft_weight=1.0", "stft_windows=(32768,)"], "stft_windows=(32768,): 32768 is too long"),
    (["logmag_weight=1.0", "logmag_windows=(1024,32768)"], "logmag_windows=(1024, 32768): 32768 is too long"),
    (["mrd_windows=(32768,)"], "mrd_windows=(32768,): 32768 is too long for the 16000-sample crops"),
    (["mpd_periods=(2,40000)"], "mpd_periods=(2, 40000): 40000 is too long"),
    # the crops are mono: a shape traceback in the first step
    (["input_channels=2"], "input_channels=2 and output_channels=1: this trainer reads mono crops"),
    (["output_channels=2"], "input_channels=1 and output_channels=2: this trainer reads mono crops"),
    # the training weights scored twice under two names
    (["val_raw=true"], "val_raw=true scores the training weights beside their moving average, which ema_decay=0"),
], ids=["segment-0-samples", "val-segment-0-samples", "strides-ratios", "mel-lengths", "mel-empty", "no-disc",
        "mpd-channels-empty", "stft-windows-empty", "logmag-windows-empty", "all-weights-0", "min-lr-above-lr", "decay-flips-weights",
        "decay-flips-disc-weights", "mel-window-crop",
        "mel-window-val-crop", "stft-window-crop", "logmag-window-crop", "mrd-window-crop", "mpd-period-crop",
        "stereo-input", "stereo-output", "val-raw-without-average"])
def test_contradicting_settings_are_config_errors(corpus, tmp_path, overrides, message):
    """Settings each valid alone that cannot train together: check_config names them (before any
    audio is read or a model is built)."""
    cfg = parse_args(args(corpus, tmp_path / "run", *overrides), PRESETS)
    with pytest.raises(ConfigError) as e:
        train_codec.check_config(cfg)
    assert message in str(e.value)
    train_codec.check_config(parse_args(args(corpus, tmp_path / "run"), PRESETS))  # the run without them passes


def test_a_run_folder_inside_the_data_is_refused_since_its_samples_would_join_the_corpus(corpus, tmp_path):
    """The trainer writes input/reconstruction WAVs into checkpoint_dir/samples: inside a data folder
    they would be trained and validated on by the next run. Refused by check_config, unless no
    samples are written (num_audio_samples=0) or the folder is hidden (scans skip it)."""
    inside = corpus / "val" / "run"
    cfg = parse_args(args(corpus, inside), PRESETS)
    with pytest.raises(ConfigError) as e:
        train_codec.check_config(cfg)
    assert f"checkpoint_dir={str(inside)!r} lies inside val_data_path=" in str(e.value)
    train_codec.check_config(parse_args(args(corpus, inside, "num_audio_samples=0"), PRESETS))
    train_codec.check_config(parse_args(args(corpus, corpus / "train" / ".runs" / "a"), PRESETS))
    assert not inside.exists()


def test_a_manifest_relative_to_another_folder_is_one_error_line_before_the_data(corpus, tmp_path, capsys):
    """A training manifest whose paths are relative to the corpus folder, not to its own: one line
    naming the manifest, its line and the folder paths are read from, before the validation audio
    is decoded (it came after, from the training set's scan)."""
    manifest = tmp_path / "lists" / "train.jsonl"
    manifest.parent.mkdir()
    files = sorted((corpus / "train").rglob("*.wav"))[:3]
    manifest.write_text("".join(json.dumps({"path": str(f.relative_to(corpus / "train"))}) + "\n" for f in files))
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={manifest}"), capsys)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_line(result.stderr).startswith(f"error: train_data_path: manifest {manifest} line 1: no such file")
    assert "val:" not in result.stdout + result.stderr  # the validation audio was not read
    assert not (tmp_path / "run").exists()


def test_a_manifest_of_too_few_crops_is_named_not_its_folder(corpus, tmp_path, capsys):
    """Fewer crops than a batch from a manifest: the error named the folder the manifest lies in
    (which may hold many manifests), not the manifest."""
    manifest = tmp_path / "lists" / "train.jsonl"
    manifest.parent.mkdir()
    first = next(f for f in sorted((corpus / "train").rglob("*.wav")) if f.name != "broken.wav")
    manifest.write_text(json.dumps({"path": str(first)}) + "\n")
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={manifest}", "batch_size=64", *BRIEF_EVAL), capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_line(result.stderr).startswith(f"error: {manifest} gives ") and \
        "training crops of" in error_line(result.stderr) and "fewer than batch_size=64" in error_line(result.stderr)


def unreadable_since_the_scan(src, folder):
    """A copy of the audio folder `src` whose files the scan's index still lists (same size) but
    whose bytes are garbage now, as a file damaged or replaced after the scan is."""
    from model.data import scan_audio_folder
    shutil.copytree(src, folder)
    scan_audio_folder(folder)
    for path in folder.rglob("*.wav"):
        path.write_bytes(b"\0" * path.stat().st_size)
    changed_after_the_scan(folder)
    return folder


def test_a_file_unreadable_since_the_scan_is_named_once_a_run(corpus, tmp_path):
    """A validation file (and a training file) that fails when read, with data-loading workers: each
    evaluation's workers (forked anew) named it again, once an evaluation, and each training worker
    once. Now once a run; each evaluation's line still counts the crops left out."""
    from model.data import scan_audio_folder

    def one_unreadable(src, folder):  # the first file garbage now, as the scan's index still lists it
        shutil.copytree(src, folder)
        first = scan_audio_folder(folder)[0].path
        Path(first).write_bytes(b"\0" * Path(first).stat().st_size)
        changed_after_the_scan(folder)
        return Path(first)

    bad_val, bad_train = one_unreadable(corpus / "val", tmp_path / "val"), one_unreadable(corpus / "train",
                                                                                          tmp_path / "train")
    result = run(["train_codec.py"] + args(corpus, tmp_path / "run", f"val_data_path={tmp_path / 'val'}",
                                           f"train_data_path={tmp_path / 'train'}", "num_workers=2", "preload_max_gb=0",
                                           "max_steps=4", "eval_interval=2", "val_crops=2", "num_audio_samples=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert len(re.findall(rf"cannot read audio file {re.escape(str(bad_val))}", out)) == 1, out[-3000:]
    assert len(re.findall(rf"cannot read audio file {re.escape(str(bad_train))}", out)) <= 1, out[-3000:]
    assert len(re.findall(r"^step [024]: val .*\(on 1 of 2 crops: 1 unreadable, named above", out, re.M)) == 3, out[-3000:]


def test_a_folder_whose_every_file_fails_when_read_is_one_error_line(corpus, tmp_path, capsys):
    """Every training file failing at read time: one line naming the folder, also when the
    DataLoader's workers read (torch raises it again with the worker's traceback as its message); it
    was a RuntimeError traceback. Every validation file failing: one line at the step-0
    evaluation, before any training, and no checkpoint; it was a run with NaN metrics and no best.pt."""
    train, val = unreadable_since_the_scan(corpus / "train", tmp_path / "train"), \
        unreadable_since_the_scan(corpus / "val", tmp_path / "val")
    result = run(["train_codec.py"] + args(corpus, tmp_path / "run", f"train_data_path={train}", "num_workers=2",
                                           "preload_max_gb=0", *BRIEF_EVAL))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    n = len(list(train.rglob("*.wav"))) - 1  # broken.wav was skipped at the scan
    assert error_line(result.stderr) == (f"error: could not read a crop from {train}: {n} of {n} files failed "
                                         "to read (named above)")
    result = run_here(args(corpus, tmp_path / "run2", f"val_data_path={val}"), capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    n = len(list(val.rglob("*.wav")))
    assert error_line(result.stderr) == (f"error: no audio to evaluate on in {val}: its {n} files failed to read "
                                         "(named above); set val_data_path to a folder of readable audio; stopped before any step")
    assert "step 0: val" not in result.stdout and not list((tmp_path / "run2").glob("*.pt"))


def test_an_init_from_that_is_not_a_training_state_is_one_error_line(corpus, tmp_path, capsys):
    """A damaged or foreign .pt as init_from (a transformer's state with eval_only=true too): the
    file named, no unpickler traceback, before any audio is decoded (it came after the validation
    and training sets had been decoded into memory)."""
    from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": {}, "optimizer": {}, "step": 2, "config": dataclasses.asdict(TRANSFORMER_PRESETS["tiny"])},
               tmp_path / "transformer.pt")
    for name, extra, message in (
            ("garbage.pt", (), "is not a training state written by the trainers (it cannot be read"),
            ("list.pt", (), "is not a training state written by the trainers (no step in it"),
            ("transformer.pt", ("eval_only=true",), ": not a codec training state written by train_codec.py")):
        path = tmp_path / name
        result = run_here(args(corpus, tmp_path / "run", f"init_from={path}", *extra), capsys)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        line = error_line(result.stderr)
        assert line.startswith(f"error: {path}") or line.startswith(f"error: init_from={path}"), line
        assert message in line, line
        assert "val:" not in result.stdout + result.stderr  # the data was not read


def test_a_transformer_run_folder_is_one_error_line_before_the_data(corpus, tmp_path, capsys):
    """checkpoint_dir naming a run of train_transformer.py (its latest.pt holds `model`, not
    `generator`): one line naming the file, before any audio is decoded; it was a KeyError
    traceback after the corpus had been decoded into memory."""
    from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
    run_dir = tmp_path / "transformer-run"
    run_dir.mkdir()
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "step": 2, "codec": "0" * 16, "codec_source": "x",
                "config": dataclasses.asdict(TRANSFORMER_PRESETS["tiny"])}, run_dir / "latest.pt")
    for extra in ((), ("eval_only=true",)):
        result = run_here(args(corpus, run_dir, *extra), capsys)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert error_line(result.stderr) == (f"error: {run_dir / 'latest.pt'} is not a training state of "
                                             "train_codec.py (it holds no 'generator': another trainer's run?); "
                                             "use another checkpoint_dir, or resume=false to start fresh")
        assert "val:" not in result.stdout + result.stderr  # the data was not read
        # (.run.lock: a training run holds the folder from its start, Checkpoints.hold)
        assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock", "latest.pt"]


def test_a_checkpoint_name_taken_by_a_folder_is_one_error_line_before_the_data(corpus, tmp_path, capsys):
    """A folder named latest.pt (or best.safetensors, checkpoints.json: what a save renames files onto)
    in checkpoint_dir: one line naming it, before any audio is decoded. The run trained until its
    first save, then said "cannot write step_00000004.pt: Is a directory", and eval_only evaluated
    a step file as if latest.pt were missing. resume=false moves the folder's contents aside: it runs."""
    run_dir = tmp_path / "run"
    (run_dir / "latest.pt").mkdir(parents=True)
    (run_dir / "best.safetensors").mkdir()
    for extra in ((), ("eval_only=true",)):
        result = run_here(args(corpus, run_dir, *extra), capsys)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert error_line(result.stderr) == (f"error: checkpoint_dir={str(run_dir)!r} holds latest.pt, "
                                             "best.safetensors, which a run writes its checkpoints to, as something "
                                             "other than a file (a folder?): move it away, or pass another "
                                             "checkpoint_dir")
        assert "val:" not in result.stdout + result.stderr  # the data was not read
        assert not list(run_dir.glob("step_*.pt"))


def lock_descriptors(run_dir):
    """How many descriptors this process has open on `run_dir`'s `.run.lock`."""
    lock, count = str(run_dir / ".run.lock"), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == lock
        except OSError:  # (the listing's own descriptor, closed since)
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_main_called_again_in_one_process_leaves_no_descriptor_of_the_run_lock(corpus, tmp_path, capsys):
    """The run lock's descriptor stayed open until the process exited: each `main` of a notebook (or
    the tests' in-process runs) left one more. `main` releases its hold when it returns or raises; one
    descriptor per folder serves every holder of the process, counted, so an older `Checkpoints` of the
    folder still holding it (kept alive by a traceback) keeps it locked, and closes it when released."""
    run_dir = tmp_path / "run"
    short = ("max_steps=2", "save_interval=1", "eval_interval=1", *BRIEF_EVAL)  # a step a run
    for extra in (("stop_step=1",), (), ("latent_dim=16",)):  # trains, resumes, then raises: a contradicting config
        result = run_here(args(corpus, run_dir, *short, *extra), capsys)
        assert result.returncode == (1 if extra == ("latent_dim=16",) else 0), result.stderr[-2000:]
        assert lock_descriptors(run_dir) == 0
    assert "latent_dim: the checkpoint has 32, this run has 16" in result.stderr
    older = Checkpoints(run_dir)
    older.hold()
    try:
        for _ in range(2):
            assert run_here(args(corpus, run_dir, *short), capsys).returncode == 0  # finished: nothing to train
            assert lock_descriptors(run_dir) == 1
        other = run(["train_codec.py"] + args(corpus, run_dir, *short, "max_steps=4"))  # still held by `older`
        assert other.returncode == 1, other.stderr[-2000:]
        assert error_line(other.stderr) == (f"error: checkpoint_dir={str(run_dir)!r}: another run is training in "
                                            "it now (it holds .run.lock); wait for it to end, or use another "
                                            "checkpoint_dir")
    finally:
        older.release()
    assert lock_descriptors(run_dir) == 0


def test_a_latest_pt_holding_nan_is_one_error_line_before_the_data(corpus, trained, tmp_path, capsys):
    """A latest.pt whose weights hold NaN (the trainers never write one: made by hand, or damaged):
    refused when loaded, naming the file and a tensor, before any audio is read; it resumed, and
    the first step stopped with "non-finite loss ... check the data", blaming the batch's files."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    state = torch.load(run_dir / "latest.pt", weights_only=False)
    name = next(iter(state["generator"]))
    state["generator"][name].view(-1)[0] = float("nan")
    (run_dir / "latest.pt").unlink()  # a hard link to step_00000008.pt
    torch.save(state, run_dir / "latest.pt")
    for extra in ((), ("eval_only=true",)):
        result = run_here(args(corpus, run_dir, "max_steps=12", *extra), capsys)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert error_line(result.stderr) == (
            f"error: {run_dir / 'latest.pt'} holds NaN or inf in 1 tensors (generator.{name}), which the trainers "
            "never save: it was damaged or made by other means; put an earlier step_*.pt in its place, or start "
            "afresh (resume=false)")
        assert "val:" not in result.stdout + result.stderr  # the data was not read


def test_eval_only_prints_the_metrics_of_a_checkpoint(corpus, trained, capsys):
    run_dir = trained[0]
    common = ["--config", "tiny", f"val_data_path={corpus / 'val'}", "eval_only=true"]
    best = train_codec.main(common + [f"checkpoint_dir={run_dir}", f"init_from={run_dir / 'best.safetensors'}"])
    table = capsys.readouterr().out
    assert "| mel distance | SI-SDR (dB) | STOI | PESQ | KL (bits/s) |" in table and "best.safetensors" in table
    assert "DNSMOS" not in table and "val/dnsmos" not in best  # an opt-in column
    # the same numbers as the evaluation logged when best.pt was saved
    best_step = json.loads((run_dir / "checkpoints.json").read_text())["best_step"]
    logged = next(r for r in rows(run_dir / "metrics.jsonl") if r["step"] == best_step and "val/stoi" in r)
    for key in ("val/mel_distance", "val/si_sdr", "val/stoi", "val/pesq", "val/kl_bits_per_s"):
        assert best[key] == pytest.approx(logged[key], rel=1e-5), key
    # a training state (.pt) as init_from, and the latest checkpoint of a run folder by default
    assert train_codec.main(common + [f"init_from={run_dir / 'best.pt'}"]) == pytest.approx(best)
    latest = train_codec.main(common + [f"checkpoint_dir={run_dir}"])
    assert "latest.pt" in capsys.readouterr().out and np.isfinite(list(latest.values())).all()


def test_a_validation_file_of_a_few_milliseconds_is_left_out_of_stoi(corpus, trained, tmp_path, capsys):
    """A click of 300 samples (19 ms) in the validation folder gave a crop shorter than one of
    pystoi's frames, which failed inside pystoi (AxisError) and ended every evaluation, and so the
    run at its step 0, with a traceback. Its crop is scored by the mel distance and SI-SDR, not
    by STOI or PESQ, as the README says of a crop a metric cannot score."""
    val = tmp_path / "val"
    shutil.copytree(corpus / "val", val)
    click = np.random.default_rng(0).uniform(-0.5, 0.5, 300).astype(np.float32)
    sf.write(val / "click.wav", click, 16000)
    common = ["--config", "tiny", "eval_only=true", f"init_from={trained[0] / 'best.safetensors'}"]
    with_click = train_codec.main(common + [f"val_data_path={val}"])
    assert all(np.isfinite(v) for v in with_click.values()), with_click
    (val / "click.wav").unlink()
    without = train_codec.main(common + [f"val_data_path={val}"])
    assert with_click["val/stoi"] == pytest.approx(without["val/stoi"])  # the same crops scored
    assert with_click["val/mel_distance"] != pytest.approx(without["val/mel_distance"])  # the click's crop counted
    capsys.readouterr()


def test_silent_validation_files_are_left_out_of_si_sdr(corpus, trained, tmp_path, capsys):
    """A validation file of digital silence (a recording's pause) or of a DC offset alone gave crops
    whose SI-SDR is the reconstruction's own level, not a fidelity, and the mean took them in
    (-55.3 dB became -58.0 with one silent file), where STOI and PESQ leave them out, as the README
    says of a crop a metric cannot score. They are left out of SI-SDR too."""
    val = tmp_path / "val"
    shutil.copytree(corpus / "val", val)
    common = ["--config", "tiny", "eval_only=true", f"init_from={trained[0] / 'best.safetensors'}"]
    without = train_codec.main(common + [f"val_data_path={val}"])
    sf.write(val / "pause.wav", np.zeros(32000, np.float32), 16000)
    sf.write(val / "dc.wav", np.full(32000, 0.25, np.float32), 16000)
    with_silence = train_codec.main(common + [f"val_data_path={val}"])
    assert with_silence["val/si_sdr"] == pytest.approx(without["val/si_sdr"])  # the same crops scored
    assert with_silence["val/stoi"] == pytest.approx(without["val/stoi"])
    assert with_silence["val/mel_distance"] != pytest.approx(without["val/mel_distance"])  # the silence counted there
    capsys.readouterr()


def strict_rows(path):
    """metrics.jsonl's rows read as strict JSON: a bare NaN, Infinity or -Infinity fails the test."""
    def refuse(token):
        pytest.fail(f"{path} holds {token}, which strict JSON parsers refuse")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def test_a_codec_whose_reconstructions_overflow_is_an_error_in_eval_only_and_a_note_in_training(
        corpus, trained, tmp_path, capsys):
    """A codec whose decoder overflows (finite gains x1e30: it loads, its hash holds) made
    reconstructions of inf and NaN: eval_only printed a row of `nan` with no word of why, a
    training run's evaluation the same, and metrics.jsonl held bare NaN. Now eval_only is one
    error line naming the codec file, the evaluation's line says so, and metrics.jsonl writes null."""
    codec = load_codec(trained[0] / "best.safetensors")
    with torch.no_grad():
        for block in list(codec.decoder.res_stack)[:3]:
            for name, p in block.named_parameters():
                if name.endswith("original0"):
                    p.mul_(1e30)
    huge = tmp_path / "huge.safetensors"
    save_codec(huge, codec)
    result = run_here(["--config", "tiny", f"val_data_path={corpus / 'val'}", "eval_only=true", f"init_from={huge}",
                       f"checkpoint_dir={tmp_path / 'eval'}"], capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(rf"error: the reconstructions of (\d+) of \1 validation crops hold NaN or inf: the weights of "
                        rf"{re.escape(str(huge))} overflow in float32 \(values too large for it, or a damaged file\): "
                        "re-export them", error_line(result.stderr)), result.stderr[-2000:]
    assert "| nan |" not in result.stdout
    # training from it: the evaluation at step 0 says so, then the first step's loss stops the run
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, f"init_from={huge}", "max_steps=1", "eval_interval=1", *BRIEF_EVAL), capsys)
    assert result.returncode == 1 and error_line(result.stderr).startswith("error: non-finite loss"), result.stderr[-2000:]
    assert re.search(r"step 0: val mel distance nan .*\(the reconstructions of 1 of 1 crops hold NaN or inf", result.stdout)
    row = strict_rows(run_dir / "metrics.jsonl")[0]
    assert row["step"] == 0 and row["val/mel_distance"] is None and np.isfinite(row["val/kl_bits_per_s"])


def test_a_silent_validation_folder_is_a_note_and_its_metrics_null_in_metrics_jsonl(corpus, trained, tmp_path, capsys):
    """A validation folder of silence has no crop that SI-SDR, STOI or PESQ can score: each
    evaluation printed NaN for them with no note, and metrics.jsonl held bare NaN, which strict
    JSON parsers refuse. Now the evaluation's line names them, metrics.jsonl writes null, and the
    loss curves are drawn from it."""
    val = tmp_path / "val"
    val.mkdir()
    for i in range(2):
        sf.write(val / f"pause_{i}.wav", np.zeros(32000, np.float32), 16000)
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, f"val_data_path={val}", "max_steps=1", "eval_interval=1"), capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = re.findall(r"step \d: val mel distance .*", result.stdout)
    assert len(lines) == 2 and all(line.endswith("(SI-SDR, STOI, PESQ: no crop to score, each too short or silent)")
                                   for line in lines), lines
    evaluations = [r for r in strict_rows(run_dir / "metrics.jsonl") if "val/mel_distance" in r]
    assert len(evaluations) == 2 and all(r["val/si_sdr"] is None and r["val/pesq"] is None and
                                         np.isfinite(r["val/mel_distance"]) for r in evaluations)
    assert (run_dir / "loss_curves.png").is_file()
    result = run_here(["--config", "tiny", f"val_data_path={val}", "eval_only=true",
                       f"init_from={trained[0] / 'best.safetensors'}", f"checkpoint_dir={tmp_path / 'eval'}"], capsys)
    assert result.returncode == 0 and \
        "note: SI-SDR, STOI, PESQ had no crop to score (each too short or silent), so NaN" in result.stdout


def test_a_click_first_in_the_validation_folder_is_not_drawn_as_a_sample(corpus, tmp_path, capsys):
    """The evaluation's audio samples are the first crops with sound in them: a validation file of
    a few milliseconds sorted first (here 300 samples) was one, and the mel figure's STFT of it
    failed (padding of 512 samples each side of 300), ending the run at step 0 with a traceback.
    The samples are crops of a quarter second at least; the click is still evaluated."""
    val = tmp_path / "val"
    shutil.copytree(corpus / "val", val)
    sf.write(val / "0_click.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 300).astype(np.float32), 16000)
    run_dir = tmp_path / "run"
    result = run_here(args(corpus, run_dir, f"val_data_path={val}", "max_steps=1", "eval_interval=1",
                           "save_interval=1"), capsys)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == ["0_input.wav", "0_recon.wav", "1_input.wav", "1_recon.wav", "mels.png"]
    assert all(sf.info(run_dir / "samples" / name).frames >= 4000 for name in samples if name.endswith(".wav"))


def test_a_folder_of_files_shorter_than_one_sample_at_16k_is_one_error_line(corpus, tmp_path, capsys):
    """Files of one frame at 44.1 kHz are not empty (so the scan keeps them) but hold no sample at
    16 kHz: with batch_size=1 such a training folder passed the crop count, and drawing a crop
    failed inside numpy (`high <= 0`) with a traceback."""
    folder = tmp_path / "blips"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        sf.write(folder / name, np.full(1, 0.1, np.float32), 44100)
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={folder}", "batch_size=1", "max_steps=1"),
                      capsys)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (f"error: {folder} holds no audio at 16000 Hz: its 2 files are each "
                                              "shorter than one sample at that rate")


def test_eval_only_with_the_dnsmos_column(corpus, trained, capsys):
    for package in ("speechmos", "onnxruntime", "librosa"):
        pytest.importorskip(package)
    metrics = train_codec.main(["--config", "tiny", f"val_data_path={corpus / 'val'}", "eval_only=true",
                                f"init_from={trained[0] / 'best.safetensors'}", "val_mos=true", "val_crops=3"])
    table = capsys.readouterr().out
    assert "| PESQ | KL (bits/s) | DNSMOS |" in table
    assert 1.0 <= metrics["val/dnsmos"] <= 5.0
    assert f"{metrics['val/dnsmos']:.3f} |" in table


def test_resume_checks_the_config_and_resume_false_starts_afresh(corpus, trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    with pytest.raises(ConfigMismatch, match="encode_channels: the checkpoint has 4, this run has 8"):
        train_codec.main(args(corpus, run_dir, "encode_channels=8"))
    with pytest.raises(ConfigMismatch, match="batch_size"):
        train_codec.main(args(corpus, run_dir, "batch_size=3"))
    train_codec.main(args(corpus, run_dir, "resume=false", "max_steps=1", "eval_interval=100"))
    old = list(run_dir.glob("old-*"))
    assert len(old) == 1 and (old[0] / "step_00000008.pt").is_file()  # moved aside, not deleted
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 1
    assert not (run_dir / "step_00000008.pt").exists()


def test_init_from_official_weights_served_by_a_hub(corpus, tmp_path, monkeypatch, capsys):
    """init_from=official downloads the official codec file through the Hub client and starts
    from it: a file in the official layout (the parity codec) served on loopback, with its md5
    registered, and the parity architecture given as key=value overrides."""
    fixture = require(PARITY_DIR / "codec_state_dict.pt")
    arch = codec_config()
    overrides = [f"{k}={getattr(arch, k)!r}" for k in fields_marked(CodecConfig, "arch")]
    common = ["--config", "tiny", *overrides, f"train_data_path={corpus / 'train'}",
              f"val_data_path={corpus / 'val'}", "wandb=disabled", "init_from=official"]
    with HubServer() as server:
        data = server.add(f"{hub.CODEC}.pt", fixture)
        monkeypatch.setitem(hub.OFFICIAL_FILES, hub.CODEC,
                            hub.OfficialFile(hub.CODEC, hashlib.md5(data).hexdigest(), len(data), "codec"))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.chdir(tmp_path)  # official files go to ./ckpt
        # learning rate 0: one step leaves the official weights as they are, and exports them
        train_codec.main(common + [f"checkpoint_dir={tmp_path / 'run'}", "max_steps=1", "learning_rate=0.0",
                                  "min_lr=0.0", "disc_learning_rate=0.0", "eval_interval=100"])
        metrics = train_codec.main(common + ["eval_only=true"])
        downloads = [r for r in server.requests if r.endswith(".pt")]  # huggingface_hub may ask other things
        assert len(downloads) == 1, server.requests  # downloaded once, then verified in ./ckpt
    assert "weights from the official codec" in capsys.readouterr().out
    official = torch.load(fixture, weights_only=True)
    ours = load_codec(tmp_path / "run" / "latest.safetensors").state_dict()
    assert ours.keys() == official.keys()
    for k, v in official.items():
        assert torch.equal(ours[k], v), k
    assert np.isfinite(list(metrics.values())).all()


def test_init_from_official_offline_without_the_file_says_so_before_the_data(corpus, tmp_path, monkeypatch,
                                                                                capsys):
    """init_from=official offline (HF_HUB_OFFLINE=1, which model.hub reads when asked) with the file
    missing: the hub's message naming the file, before any audio is decoded, and no advice to change
    the architecture (it said "use --config hertz_dev" to a run that had it, after the data had been
    decoded). The trainer's main in this process (`run_here`)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the official files would be in ./ckpt
    result = run_here(["--config", "hertz_dev", "device=cpu", "eval_only=true", "init_from=official",
                       f"val_data_path={corpus / 'val'}", f"checkpoint_dir={tmp_path / 'run'}", "wandb=disabled"],
                      capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: init_from=official: offline mode and these official hertz-dev files are missing:" in result.stderr
    assert hub.OFFICIAL_FILES[hub.CODEC].filename in result.stderr
    assert "--config hertz_dev" not in result.stderr
    assert "val:" not in result.stdout + result.stderr  # the data was not read


def test_benchmark_cpu_smoke_run_needs_no_audio_packages():
    """benchmarks/codec_train.py on the GPU machine has torch and numpy but no soundfile, soxr,
    wandb or pystoi: block them and run it."""
    code = ("import sys, runpy\n"
            "for m in ('soundfile', 'soxr', 'wandb', 'pystoi', 'matplotlib', 'espeakng_loader'): sys.modules[m] = None\n"
            "sys.argv = ['codec_train.py', '--device', 'cpu', '--presets', 'tiny', '--batch', '2', '--seconds', '1',"
            " '--steps', '2', '--warmup', '1', '--modes', 'fp32-eager']\n"
            "runpy.run_path('benchmarks/codec_train.py', run_name='__main__')\n")
    result = run(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["preset"] == "tiny" and line["mode"] == "fp32-eager" and line["samples_per_s"] > 0


def codec_benchmark(argv, capsys):
    """`benchmarks/codec_train.py ARGV` in this process (`in_process.main_in_process`), as `run`
    returns it: the subject is what it prints, not its process (the CPU smoke run's test above keeps
    one, for what it imports). Its variants seed torch's generator: forked, so this process' random
    state is left as it was."""
    from benchmarks import codec_train
    with torch.random.fork_rng():
        return main_in_process("benchmarks/codec_train.py", codec_train.main, argv, capsys)


def test_benchmark_profiles_each_phase_and_measures_each_variant(capsys):
    """--profile prints, after each variant's timed line, the step's time per record_function
    phase and the top ops; --variants measures each variant in turn. `alternating` (the step
    before: generator step with frozen discriminators, then a discriminator step) starts from the
    same weights and data as `base` (one discriminator pass feeding both losses), so the losses
    agree: the two orders compute the same verdicts; so do `joint_disc` (real and reconstruction
    judged in one pass, `Discriminators.judge`) and `loop_fm` (the feature matching as a loop over
    the maps instead of the trainer's multi-tensor sums)."""
    result = codec_benchmark(["--device", "cpu", "--presets", "tiny", "--batch", "2", "--seconds", "0.5", "--steps", "1",
                              "--warmup", "1", "--modes", "fp32-eager", "--profile", "--variants",
                              "base,alternating,joint_disc,loop_fm"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    timed = {r["variant"]: r for r in lines if "profile" not in r}
    profiled = {r["variant"]: r for r in lines if "profile" in r}
    assert list(timed) == list(profiled) == ["base", "alternating", "joint_disc", "loop_fm"]
    common = {"gen_forward", "mel_loss", "kl", "disc_on_fake", "disc_on_real", "adv_fm_loss", "gen_backward",
              "gen_clip_opt", "disc_loss", "disc_backward", "disc_clip_opt"}
    common |= {"mpd_forward", "mrd_forward"}  # inside disc_on_* (and disc_forward)
    assert set(profiled["base"]["phases_ms"]) == common
    assert set(profiled["alternating"]["phases_ms"]) == common | {"disc_forward"}
    assert set(profiled["joint_disc"]["phases_ms"]) == common - {"disc_on_fake", "disc_on_real"} | {"disc_on_both"}
    assert set(profiled["loop_fm"]["phases_ms"]) == common
    for variant, p in profiled.items():
        assert timed[variant]["samples_per_s"] > 0 and p["profile"] == "cpu" and "error" not in p
        assert all(ms > 0 for ms in p["phases_ms"].values()), p["phases_ms"]
        # the phases cover the step: their sum is the total, and within the step's wall time
        assert p["total_device_ms"] == pytest.approx(sum(p["phases_ms"].values()), abs=0.1)
        assert p["total_device_ms"] <= 1000 * p["step_s"] * 1.05
        names = [name for name, ms, calls in p["top_kernels"]]
        assert 0 < len(names) <= 20 and any("convolution" in n for n in names), names
        assert all(ms > 0 and calls > 0 for _, ms, calls in p["top_kernels"])
    # after warm-up and timed steps of updates, both still agree: the same training trajectory
    assert timed["alternating"]["loss"] == pytest.approx(timed["base"]["loss"], rel=1e-3)
    assert timed["alternating"]["loss_disc"] == pytest.approx(timed["base"]["loss_disc"], rel=1e-3)
    for variant in ("joint_disc", "loop_fm"):
        assert timed[variant]["loss"] == pytest.approx(timed["base"]["loss"], rel=1e-4)
        assert timed[variant]["loss_disc"] == pytest.approx(timed["base"]["loss_disc"], rel=1e-4)


def test_benchmark_data_mode_reads_the_trainers_loader(corpus):
    """--data: the training loader alone over several epochs (the corpus decoded into memory),
    one JSON line with its throughput and batch waits."""
    result = run(["benchmarks/codec_train.py", "--data", str(corpus / "train"), "--presets", "tiny",
                  "--workers", "2", "--batches", "12"])
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["mode"] == "data" and line["preloaded"] and line["batches"] == 12
    assert line["batches_per_epoch"] < 12  # it crossed epoch boundaries
    assert line["samples_per_s"] > 0 and 0 < line["wait_ms_p50"] <= line["wait_ms_p99"] <= line["wait_ms_max"]


def noise_folder(folder: Path, files: int = 3, seconds: float = 2.0) -> Path:
    """`files` WAVs of quiet noise at 16 kHz: a corpus for what reads a folder, made in a moment."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        sf.write(folder / f"noise_{i}.wav", (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return folder


def test_benchmark_path_flags_take_a_leading_tilde_as_the_home_folder(tmp_path, monkeypatch, capsys):
    """benchmarks/codec_train.py --data and metric_references.py --val and --codec took a `~` that the
    shell left (zsh, quotes, --flag=~) as a folder named `~`, where README says it is the home folder."""
    from benchmarks import metric_references
    home = tmp_path / "home"
    noise_folder(home / "corpus")
    save_codec(home / "codec.safetensors", build(Codec, PRESETS["tiny"]))
    monkeypatch.setenv("HOME", str(home))
    result = codec_benchmark(["--data", "~/corpus", "--presets", "tiny", "--workers", "0", "--batches", "2"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["batches"] == 2
    result = main_in_process("benchmarks/metric_references.py", metric_references.main,
                             ["--val", "~/corpus", "--codec=~/codec.safetensors", "--crops", "1", "--iterations",
                              "--seconds", "1"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads(result.stdout.splitlines()[0])
    assert first["val"] == str(home / "corpus") and first["codec"] == str(home / "codec.safetensors")


@pytest.mark.parametrize("case", ["val-empty", "val-a-file", "codec-not-a-codec", "data-missing"])
def test_benchmark_path_mistakes_are_one_error_line(tmp_path, capsys, case):
    """metric_references.py --val naming an empty folder or a file, --codec naming a file that is no
    codec checkpoint, and codec_train.py --data naming no folder were each a traceback."""
    from benchmarks import metric_references
    corpus, empty = noise_folder(tmp_path / "corpus", files=1), tmp_path / "empty"
    empty.mkdir()
    wav = corpus / "noise_0.wav"
    argv, message = {
        "val-empty": (["--val", str(empty)], f"error: --val: audio folder {empty} has no audio files; expected "),
        "val-a-file": (["--val", str(wav)], f"error: --val: audio folder {wav} is a file, not a folder; "),
        "codec-not-a-codec": (["--val", str(corpus), "--codec", str(wav)],
                              f"error: --codec: {wav}: expected a codec checkpoint (.safetensors)"),
        "data-missing": (["--data", str(tmp_path / "nosuch"), "--presets", "tiny"],
                         f"error: --data: audio folder {tmp_path / 'nosuch'} does not exist; "),
    }[case]
    if case == "data-missing":
        result = codec_benchmark(argv, capsys)
    else:
        result = main_in_process("benchmarks/metric_references.py", metric_references.main, argv, capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert result.stdout == ""


def error_line(stderr):
    """The one `error:` line of a failed run, on a line of its own (progress bars redraw with \\r)."""
    errors = [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def finite_everywhere(run_dir):
    """Every tensor of every checkpoint in `run_dir` is finite (and the exports pass their hash)."""
    from model.checkpoint import non_finite, read_weights
    files = sorted(Path(run_dir).glob("*.pt")) + sorted(Path(run_dir).glob("*.safetensors"))
    for path in files:
        state = torch.load(path, weights_only=False) if path.suffix == ".pt" else read_weights(path)[0]
        assert non_finite(state) == [], path
    return [p.name for p in files]


def test_non_finite_audio_is_skipped_and_a_non_finite_loss_stops_with_an_error(corpus, tmp_path):
    """A NaN float WAV is named once and counted, never trained on; a diverging run (learning
    rate 1e30) stops at the step whose loss is not finite, naming it and the batch's files, with
    no checkpoint holding NaN or inf."""
    data = tmp_path / "train"
    shutil.copytree(corpus / "train", data)
    audio, rate = sf.read(str(next(p for p in sorted(data.rglob("*.wav")) if p.name != "broken.wav")), dtype="float32")
    audio[len(audio) // 2] = np.nan
    sf.write(str(data / "nan.wav"), audio, rate, subtype="FLOAT")
    # the rate alone diverges (with weight decay, check_schedule refuses it before training)
    argv = ["train_codec.py"] + args(corpus, tmp_path / "run", f"train_data_path={data}", "learning_rate=1e30",
                                     "weight_decay=0.0", "save_interval=1", "eval_interval=1", "max_steps=6",
                                     *BRIEF_EVAL)
    result = run(argv)
    assert result.returncode != 0
    last = error_line(result.stderr)
    assert re.fullmatch(r"error: non-finite (loss|gradient norm) \(\S+\) at step [1-5] on a batch from \S+\.wav.*", last), \
        result.stderr[-3000:]
    assert "nan.wav" not in last and "Traceback" not in result.stderr
    out = result.stdout + result.stderr
    assert len(re.findall(r"nan.wav: \d non-finite samples", out)) == 1 and "2 unreadable files skipped" in out
    assert "latest.pt" in finite_everywhere(tmp_path / "run")


def test_a_divergence_names_the_step_to_resume_from(corpus, tmp_path, capsys):
    """A divergence (learning_rate=1e3) that saved each step: its last save holds finite weights
    that were diverging, and the run resumed from it (the rate put back) failed at its first step
    with the same advice ("lower the learning rate") and "the checkpoints hold the last finite
    weights", never naming the earlier step file to resume from. Now that error says the resumed
    state is at fault and names the earlier step_*.pt with the command putting it in place of
    latest.pt, which resumes. A fresh run diverging before its first save no longer says the
    checkpoints hold anything."""
    def fails(run_dir, *extra):
        result = run_here(args(corpus, run_dir, "eval_interval=100", *BRIEF_EVAL, *extra), capsys)
        assert result.returncode == 1
        return error_line(result.stderr)

    diverge = ("learning_rate=1e3", "weight_decay=0.0", "min_lr=0.0")
    fresh = tmp_path / "fresh"
    last = fails(fresh, *diverge)
    assert re.fullmatch(r"error: non-finite \S+ \(\S+\) at step \d+ on a batch from .*; its update was skipped and "
                        r"training stopped: lower the learning rate, or check the data", last), last
    assert not list(fresh.glob("*.pt"))

    run_dir = tmp_path / "run"
    assert run_here(args(corpus, run_dir, "stop_step=2", "save_interval=1", *BRIEF_EVAL), capsys).returncode == 0
    step = int(re.search(r"at step (\d+)", fails(run_dir, *diverge, "save_interval=1"))[1])
    assert step > 2 and (run_dir / f"step_{step:08d}.pt").is_file()  # saved finite, but diverging
    last = fails(run_dir)  # resumed with the rate put back: the same step fails again
    kept = [f"step_{s:08d}.pt" for s in range(step - 1, max(0, step - 3), -1)]  # (the last 3 kept)
    assert last.startswith("error: non-finite ") and f" at step {step} on a batch from " in last
    assert last.endswith(f"training stopped: it is the first step resumed from latest.pt (step {step}), before any "
                         "update: that state is at fault (finite weights, diverging when saved), unless this run's "
                         "settings changed, and resumed again it fails the same way; resume from an earlier step with "
                         f"a lower learning rate (kept: {', '.join(kept)}; for {kept[0]}: ln -f {run_dir / kept[0]} "
                         f"{run_dir / 'latest.pt'}), or start afresh (resume=false); or check the data: a resumed "
                         f"run reads the same batches, this one again at step {step}"), last
    os.link(run_dir / kept[0], run_dir / "latest.tmp")  # ln -f
    os.replace(run_dir / "latest.tmp", run_dir / "latest.pt")
    result = run_here(args(corpus, run_dir, f"stop_step={step}", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training from step {step - 1} to {step}" in result.stdout + result.stderr


def test_a_full_disk_is_one_error_line(corpus, tmp_path, capsys):
    """checkpoint_dir on a 640 KiB tmpfs (a real full disk; needs the right to mount): the first
    checkpoint does not fit, and the run ends with one line naming the file and the reason (the
    trainer's main in this process, `run_here`)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = run_here(args(corpus, disk / "run", "num_audio_samples=1", "save_interval=1"), capsys)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.fullmatch(r"error: cannot write \S+/run/\S+: No space left on device", error_line(result.stderr))
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_compile_codec_computes_what_the_eager_codec_computes():
    """`compile_codec` (the codec trainer's torch.compile, with the Inductor setting that torch 2.11
    needs for the codec's graphs): a codec block's output and gradients equal the eager ones."""
    from model.codec import ResNetBlock, compile_codec
    torch.manual_seed(0)
    block = ResNetBlock(4, 8, 2, mode="encoder")
    x = torch.randn(2, 4, 64, requires_grad=True)
    inputs = [x] + list(block.parameters())
    want = block(x)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    got = compile_codec(block)(x)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def metric_references(argv, capsys):
    """`benchmarks/metric_references.py ARGV` in this process (`in_process.main_in_process`), as
    `run` returns it: the subject is what it prints, not its process."""
    from benchmarks import metric_references
    return main_in_process("benchmarks/metric_references.py", metric_references.main, argv, capsys)


def test_metric_references_rank_known_degradations(corpus, capsys):
    """benchmarks/metric_references.py scores known degradations of real validation crops with the
    trainer's metric functions: the crop itself gets PESQ's and STOI's maxima, more noise scores
    lower on every metric, and a phase rebuilt by Griffin-Lim iterations scores far above a random
    phase of the same magnitudes in PESQ, though neither matches the waveform (SI-SDR < 0)."""
    result = metric_references(["--val", corpus / "val", "--crops", "3", "--seconds", "2", "--iterations", "32"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["bench"] == "metric_references" and lines[0]["crops"] == 3
    ref = {line["reference"]: line for line in lines[1:]}
    assert ref["identity"]["pesq"] == pytest.approx(4.64, abs=0.01) and ref["identity"]["stoi"] == pytest.approx(1.0)
    assert ref["identity"]["mel_distance"] == 0.0
    for metric in ("pesq", "stoi", "si_sdr"):
        assert ref["identity"][metric] > ref["noise_snr30"][metric] > ref["noise_snr20"][metric] > ref["noise_snr10"][metric]
    assert ref["noise_snr30"]["si_sdr"] == pytest.approx(30, abs=0.5)
    assert ref["griffin_lim_32"]["pesq"] > ref["random_phase"]["pesq"] + 0.5
    assert ref["griffin_lim_32"]["si_sdr"] < 0 and ref["random_phase"]["si_sdr"] < 0
    assert ref["lowpass_2khz"]["pesq"] < ref["lowpass_4khz"]["pesq"] < ref["identity"]["pesq"]


def test_metric_references_of_a_codec_isolate_what_costs_each_metric(corpus, trained, capsys):
    """With --codec, the codec's reconstructions are scored as the trainer scores them, and with
    one part of them replaced by the reference's: the reference's phase under the codec's
    magnitudes, the reference's band above 4 kHz, its silence in the pauses. Each replacement moves
    the reconstruction towards the reference, so the mel distance can only fall; with the
    reference's phase the waveform matches far better (SI-SDR)."""
    run_dir, _ = trained
    result = metric_references(["--val", corpus / "val", "--crops", "3", "--seconds", "2", "--iterations", "--codec",
                                run_dir / "latest.safetensors"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ref = {line["reference"]: line for line in lines[1:]}
    codec = ref["codec"]
    assert codec["mel_distance"] > 0.5 and codec["si_sdr"] < 10  # an 8-step codec: far from its input
    for mixed in ("codec_below_4khz_ref_above", "codec_magnitude_ref_phase", "codec_pauses_silent"):
        assert ref[mixed]["mel_distance"] <= codec["mel_distance"] + 0.05, mixed
    assert ref["codec_magnitude_ref_phase"]["si_sdr"] > codec["si_sdr"] + 3
    assert ref["ref_magnitude_codec_phase"]["mel_distance"] < codec["mel_distance"]
    missing = metric_references(["--val", corpus / "val", "--codec", "no/such.safetensors"], capsys)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: --codec: no file at no/such.safetensors"


def test_the_data_loading_workers_stop_when_main_returns_even_with_its_frame_kept(corpus, tmp_path):
    """train_codec.main called in a process that goes on (a notebook) left its data-loading workers
    running whenever its frame outlived it (matplotlib's layout code kept it in a reference cycle):
    collected in the cycle, the iterator could not stop them, and they kept running until the
    process exited, where they held the exit for ever. The loop now stops them as it ends
    (`model.data.workers_stopped`). tests/kept_frame.py keeps main's frame on purpose."""
    result = run(["tests/kept_frame.py", "train_codec"] + args(corpus, tmp_path / "run", "num_workers=1",
                                                               "max_steps=1", "eval_interval=1", *BRIEF_EVAL),
                 timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"workers_running": []}


def test_metric_references_names_a_missing_folder(capsys):
    result = metric_references(["--val", "no/such/folder"], capsys)
    assert result.returncode != 0 and error_line(result.stderr) == (
        "error: no validation data at no/such/folder (make it with: python data/demo/prepare.py)")


def test_the_run_s_figures_are_drawn_once_each_with_no_label_cut_off_or_overlapping(tmp_path, monkeypatch):
    """model.plots (the loss curves at the end of a run, the mel figure at each evaluation):
    tight_layout left a placeholder layout engine on the figure, for which savefig drew the whole
    figure once more before drawing it to the file (a fifth of plot_metrics' time); then its own
    measuring of every label was a third of what remained, so the panels now have fixed margins.
    Each PNG is one draw, at the figure's size, and every panel with its title, tick labels and
    axis labels lies inside the figure, clear of every other panel (wide tick labels, a title
    above all, several rows)."""
    import functools
    from matplotlib.figure import Figure
    from PIL import Image
    from model.plots import plot_metrics, save_mel_figure
    draws = []
    draw = Figure.draw

    @functools.wraps(draw)
    def counted(self, renderer):
        draws.append(self)
        return draw(self, renderer)
    monkeypatch.setattr(Figure, "draw", counted)

    def laid_out(fig):
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        inside = fig.bbox
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1
                   for b in boxes), "a panel's labels are cut off"
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "panels overlap"
        if fig._suptitle is not None:
            title = fig._suptitle.get_window_extent(renderer)
            assert title.y1 <= inside.y1 and not any(title.overlaps(b) for b in boxes)

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss/mel": 1 / s, "lr": 1e-3, "val/stoi": 0.5}) + "\n"
                               for s in range(1, 5)))
    assert plot_metrics(metrics, tmp_path / "curves.png") == str(tmp_path / "curves.png")
    assert len(draws) == 1
    laid_out(draws[0])
    noise = 0.1 * np.random.default_rng(0).standard_normal(8000)
    assert save_mel_figure(tmp_path / "mels.png", [(noise, noise)], 16000) == str(tmp_path / "mels.png")
    assert len(draws) == 2 and draws[0] is not draws[1]
    laid_out(draws[1])
    assert Image.open(tmp_path / "curves.png").size == (1500, 320)  # 3 panels of 5 x 3.2 in, 100 dpi
    assert Image.open(tmp_path / "mels.png").size == (1000, 220)
    # three rows of panels with wide tick labels (small learning rates, large negative values), a title
    rows = [{"step": s * 1000, "loss/mel": 12345.6 / s, "loss/adv": 0.001 * s, "lr": 3e-6 * s, "lr_disc": 1e-5,
             **{f"val/m{k}": -123456.789 * k + s for k in range(6)}} for s in range(1, 40)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(metrics, tmp_path / "many.png", title="a run's title")
    laid_out(draws[2])
    # a run with a weight average and val_raw: each metric's panel holds both curves
    metrics.write_text("".join(json.dumps({"step": s, "val/pesq": 1.1 + s, "val_raw/pesq": 1.0 + s}) + "\n"
                               for s in range(1, 5)))
    plot_metrics(metrics, tmp_path / "raw.png")
    [panel] = draws[3].axes
    assert panel.get_title() == "val/pesq" and [line.get_label() for line in panel.lines] == ["val/pesq",
                                                                                              "val_raw/pesq"]
    save_mel_figure(tmp_path / "mels3.png", [(noise, noise)] * 3, 16000)
    laid_out(draws[3])


def test_a_checkpoint_dir_it_cannot_write_in_is_one_error_line_before_the_data(corpus, tmp_path):
    """A checkpoint_dir this process may not write in (read-only, another user's) whose `.run.lock`
    it can still open (left writable by an earlier run): the run trained every step to the first
    save, then stopped with 'cannot write step_*.pt', its steps lost. The folder is tried with a
    temporary file when the run takes its lock: one error line, before the data is read. (As root,
    which writes anywhere, the trainer runs without the capabilities that let it.)"""
    from unprivileged import unprivileged
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".run.lock").touch()
    run_dir.chmod(0o555)
    try:
        result = subprocess.run(unprivileged() + [sys.executable, "train_codec.py", *args(corpus, run_dir)], cwd=ROOT,
                                env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    finally:
        run_dir.chmod(0o755)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert error_line(result.stderr) == (f"error: cannot write in {run_dir}: Permission denied; the checkpoints could "
                                         "not be saved (choose a checkpoint_dir this process can write)")
    assert "val:" not in result.stdout + result.stderr and "training from" not in result.stdout + result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]


def test_a_latest_pt_cut_short_is_one_error_line_saying_what_to_do(corpus, trained, tmp_path, capsys):
    """A latest.pt cut short (an interrupted copy of the run folder): the error named the file with
    torch's five sentences about the zip archive and said nothing of what to do. It keeps the first,
    says what the file may be and what to do (as for one holding NaN), before the data is read."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    whole = (run_dir / "latest.pt").read_bytes()
    (run_dir / "latest.pt").unlink()  # (a hard link of the last step: that one stays whole)
    (run_dir / "latest.pt").write_bytes(whole[:len(whole) // 2])
    result = run_here(args(corpus, run_dir, "max_steps=12"), capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_line(result.stderr) == (
        f"error: {run_dir / 'latest.pt'} is not a training state written by the trainers (it cannot be read: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory): damaged, cut short or "
        "another kind of file; put an earlier step_*.pt in its place, or start afresh (resume=false)")
    assert "val:" not in result.stdout + result.stderr


def test_a_checkpoint_dir_with_a_newline_is_written_out_on_the_lines_that_name_it(corpus, tmp_path, capsys):
    """A checkpoint_dir whose name holds a newline (or an escape sequence) was printed raw in the
    lines that name it, `training from ... run folder ...`, `done at step N: ...` and, run again,
    `the run in ... is already finished`: each broke in two (or could drive the terminal). Each is
    one line now, the name written as the errors write it (`printable`: `\\n`)."""
    run_dir = tmp_path / "new\nline"
    result = run_here(args(corpus, run_dir, "max_steps=1", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = str(run_dir).replace("\n", "\\n")
    out = result.stdout + result.stderr
    assert f"run folder {shown}\n" in out and f"done at step 1: {shown}/latest.safetensors, curves in {shown}/" in out
    result = run_here(args(corpus, run_dir, "max_steps=1", *BRIEF_EVAL), capsys)
    assert f"the run in {shown} is already finished at step 1" in result.stdout + result.stderr
    assert (run_dir / "latest.safetensors").is_file()


def test_samples_it_may_not_write_are_one_warning_naming_the_file_not_a_temporary(corpus, tmp_path):
    """A run folder's samples/ this process may not write in (made read-only, another user's): the
    warning said `[Errno 13] Permission denied: '.../samples/.0_input.wav.1a2b3c4d.wav'`, a temporary
    file's name the user never sees. It names the file meant and the reason; the run goes on and
    saves. (As root the trainer runs without the capabilities that let it write anywhere.)"""
    from unprivileged import unprivileged
    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples").chmod(0o555)
    try:
        result = subprocess.run(unprivileged() + [sys.executable, "train_codec.py",
                                                  *args(corpus, run_dir, "max_steps=1", "val_crops=4",
                                                        "num_audio_samples=1")],
                                cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    finally:
        (run_dir / "samples").chmod(0o755)
    assert result.returncode == 0 and (run_dir / "latest.pt").is_file(), result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: cannot write the samples")]
    assert warned and all(line == f"warning: cannot write the samples in {run_dir / 'samples'}: cannot write audio "
                          f"file {run_dir / 'samples' / '0_input.wav'}: Permission denied; training goes on"
                          for line in warned), result.stderr[-3000:]


def test_an_evaluation_missing_crops_of_a_file_gone_mid_run_says_so_and_never_takes_best_pt(corpus, tmp_path):
    """A validation file that became unreadable mid-run (removed, cut short, its permissions
    changed: here removed) gave all-padding crops that every metric leaves out: the evaluations
    after it scored the other crops only, under the run's validation key, and best.pt was ranked
    on them as on the whole set (leaving out a hard file looks like progress). Such an evaluation
    now says `on N of M crops` and is not ranked against best.pt's value, measured on all of them.
    The weights do not change (learning rates 0): every evaluation scores the same model."""
    val = tmp_path / "val"
    shutil.copytree(corpus / "val", val)
    sf.write(val / "noise.wav", 0.9 * np.random.default_rng(0).uniform(-1, 1, 32000), 16000)  # hard to reconstruct
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train_codec.py"] + args(corpus, run_dir, f"val_data_path={val}", "preload_max_gb=0",
                                                    "max_steps=4", "eval_interval=2", "save_interval=2", "val_crops=4",
                                                    "num_audio_samples=0", "learning_rate=0", "min_lr=0",
                                                    "disc_learning_rate=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (
                (run_dir / "checkpoints.json").is_file() and '"latest_step": 2' in (run_dir / "checkpoints.json").read_text()):
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # (the next evaluation, at step 4, comes after the file is gone)
        (val / "noise.wav").unlink()
        proc.send_signal(signal.SIGCONT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    lines = {int(m[1]): m[0] for m in re.finditer(r"^step (\d+): val mel distance .*$", out, re.M)}
    assert sorted(lines) == [0, 2, 4] and "crops" not in lines[0] + lines[2], out[-3000:]
    assert lines[4].endswith(" (on 3 of 4 crops: 1 unreadable, named above; not ranked for best.pt, which was measured "
                             "on other crops)")
    assert f"cannot read audio file {val / 'noise.wav'}" in out
    evaluations = {r["step"]: r["val/mel_distance"] for r in rows(run_dir / "metrics.jsonl") if "val/mel_distance" in r}
    assert evaluations[4] < evaluations[2] == evaluations[0]  # the partial figure looks better: it is left out
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["best_step"] == 2 and info["best_metric"] == pytest.approx(evaluations[2]) and info["latest_step"] == 4
    assert torch.load(run_dir / "best.pt", weights_only=False)["step"] == 2


def test_a_damaged_best_pt_is_one_error_line_before_the_data(corpus, trained, tmp_path, capsys):
    """A best.pt cut short (an interrupted copy) while latest.pt is whole: the run read and decoded
    the data, built the models, and only then found it (tidying the folder at the start of the loop).
    The folder is tidied before the data now: the error names best.pt and nothing is decoded."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    whole = (run_dir / "best.pt").read_bytes()
    (run_dir / "best.pt").unlink()  # (a hard link of a step: that one stays whole)
    (run_dir / "best.pt").write_bytes(whole[:len(whole) // 2])
    result = run_here(args(corpus, run_dir, "max_steps=12"), capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error_line(result.stderr).startswith(f"error: {run_dir / 'best.pt'} is not a training state written by "
                                                "the trainers (it cannot be read: ")
    assert "val:" not in result.stdout + result.stderr
    # starting afresh moves the folder aside, damaged best.pt and all, and trains
    result = run_here(args(corpus, run_dir, "max_steps=2", "resume=false", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "best.pt").is_file() and len(list(run_dir.glob("old-*"))) == 1


def test_a_damaged_training_state_as_init_from_is_not_told_to_resume_afresh(corpus, trained, tmp_path, capsys):
    """init_from naming a training state cut short: the error's advice was the resumed run's (put an
    earlier step in its place, or resume=false), which does nothing for a file named in init_from."""
    whole = (trained[0] / "latest.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[:len(whole) // 2])
    result = run_here(args(corpus, tmp_path / "run", f"init_from={cut}"), capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert line.startswith(f"error: {cut} is not a training state written by the trainers (it cannot be read: ")
    assert "resume=false" not in line and "init_from" in line, line


def test_samples_that_cannot_be_written_are_said_and_the_run_goes_on(corpus, tmp_path, capsys):
    """A file named `samples` in the run folder (or a full disk) failed the listening samples at an
    evaluation: a FileExistsError traceback, and the steps since the last save were lost. The samples
    are only for listening: one warning line, and the run trains and saves to its end."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "samples").write_text("not a folder")
    r = run_here(args(corpus, run_dir, "max_steps=6", "save_interval=100", "eval_interval=3", "val_crops=1",
                      "num_audio_samples=1"), capsys)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: cannot write the samples in ")]
    assert warned and warned[0].startswith(f"warning: cannot write the samples in {run_dir / 'samples'}: ") and \
        warned[0].endswith("; training goes on"), r.stderr[-2000:]
    assert (run_dir / "samples").read_text() == "not a folder"
    assert json.loads((run_dir / "checkpoints.json").read_text())["latest_step"] == 6  # saved at its end


def test_loss_curves_that_cannot_be_written_are_said_and_leave_nothing_half_written(corpus, tmp_path, capsys):
    """The curves at a run's end were drawn straight into loss_curves.png: a full disk was 40 lines
    of tracebacks (exit 1, after the run was saved), and a kill while drawing left a truncated PNG
    that a finished run never redraws (kill-and-resume hunt, session 37). The PNG is now written
    through a temporary renamed into place, and a failure is one warning line."""
    run_dir = tmp_path / "run"
    (run_dir / "loss_curves.png").mkdir(parents=True)  # (what a rename over it cannot replace)
    (run_dir / "loss_curves.png" / "keep").write_text("x")
    r = run_here(args(corpus, run_dir, "max_steps=2", "save_interval=100", "eval_interval=100", "val_crops=1",
                      "num_audio_samples=0"), capsys)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: cannot write the loss curves in ")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: cannot write the loss curves in {run_dir}: ") and \
        warned[0].endswith("; the run is saved"), r.stderr[-2000:]
    assert "done at step 2" in r.stdout + r.stderr and not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    (run_dir / "loss_curves.png" / "keep").unlink()
    (run_dir / "loss_curves.png").rmdir()
    r = run_here(args(corpus, run_dir, "max_steps=4", "save_interval=100", "eval_interval=100", "val_crops=1",
                      "num_audio_samples=0"), capsys)
    assert r.returncode == 0 and (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # a run stopped after its last save, before its curves (a SIGTERM then): the same command draws them
    (run_dir / "loss_curves.png").unlink()
    r = run_here(args(corpus, run_dir, "max_steps=4", "save_interval=100", "eval_interval=100", "val_crops=1",
                      "num_audio_samples=0"), capsys)
    assert r.returncode == 0 and "already finished at step 4" in r.stdout + r.stderr
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sigterm_while_waiting_for_the_other_processes_ends_the_process_at_once(corpus, tmp_path):
    """A SIGTERM to a rank waiting in torch.distributed's rendezvous for a process not there (yet):
    a handler of Python's set for the whole script held the signal until the native wait ended (30
    minutes; a fresh-eyes hunt of session 37's SIGTERM change), and a second SIGTERM too. SIGTERM
    keeps its own action there, and ends the process at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    rank0 = subprocess.Popen([sys.executable, "train_codec.py"] + args(corpus, tmp_path / "run", "device=cpu"),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # (imported, and waiting for rank 1)
        assert rank0.poll() is None, rank0.communicate()
        rank0.send_signal(signal.SIGTERM)
        rank0.wait(timeout=15)
    finally:
        if rank0.poll() is None:
            rank0.kill()
            rank0.wait()
    assert rank0.returncode == -signal.SIGTERM


def test_a_validation_folder_gone_mid_run_stops_it_saved_with_one_error_line(corpus, tmp_path):
    """Every validation file removed mid-run (a folder deleted, a disk unmounted): the evaluation
    raised AudioError and the run died, the steps since its last save lost. Now the step is saved
    (unranked: best.pt keeps its value) and the run stops with one error line naming the folder,
    as the transformer trainer's does."""
    val = tmp_path / "val"
    shutil.copytree(corpus / "val", val)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train_codec.py"] + args(corpus, run_dir, f"val_data_path={val}", "preload_max_gb=0",
                                                    "max_steps=100", "eval_interval=2", "save_interval=100",
                                                    "val_crops=2", "num_audio_samples=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (
                (run_dir / "checkpoints.json").is_file() and '"latest_step": 2' in (run_dir / "checkpoints.json").read_text()):
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # (the next evaluation, at step 4, comes after the files are gone)
        files = len(list(val.rglob("*.wav")))
        for path in val.rglob("*.wav"):
            path.unlink()
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert error_line(err) == (f"error: no audio to evaluate on in {val}: its {files} files failed to read (named "
                               "above); set val_data_path to a folder of readable audio; stopped at step 4, which "
                               "latest.pt holds")
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 4
    assert max(r["step"] for r in train_rows(run_dir / "metrics.jsonl")) == 4  # every step trained is saved
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["latest_step"] == 4 and info["best_step"] == 2  # step 4 was not evaluated: never best.pt
    assert "step 4: val" not in out


def test_a_data_loading_worker_killed_under_torchrun_stops_every_rank_at_one_step_saved(corpus, tmp_path):
    """A data-loading worker of rank 1 killed mid-run (the out-of-memory killer's SIGKILL) under
    torchrun: its rank raised, unsaved, and rank 0 stopped with it in a collective, two error lines,
    the steps since the last save lost (one process stopped saved). Now every rank learns of it as
    the step's batches are read, all stop at that step, saved, and rank 0 alone names the worker."""
    run_dir = tmp_path / "run"
    from torchrun import error_lines, launch
    launcher = launch("train_codec.py", args(corpus, run_dir, "device=cpu", "max_steps=100_000",
                                             "eval_interval=100_000", "num_workers=1", *BRIEF_EVAL))
    try:
        deadline = time.time() + 120
        while launcher.poll() is None and time.time() < deadline and not (
                (run_dir / "checkpoints.json").is_file() and '"latest_step": 4' in (run_dir / "checkpoints.json").read_text()):
            time.sleep(0.05)
        ranks = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        rank1 = next(pid for pid in ranks if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        victim = int(Path(f"/proc/{rank1}/task/{rank1}/children").read_text().split()[0])  # its loader's worker
        os.kill(victim, signal.SIGKILL)
        out = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 1, out[-3000:]
    errors = error_lines(out)
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert len(errors) == 1 and errors[0].startswith(f"error: a data-loading worker (pid {victim}) was killed by "
                                                     "signal Killed (most often the out-of-memory killer"), out[-3000:]
    assert errors[0].endswith(f"; stopped at step {stopped}, which latest.pt holds: run the same command to resume")
    assert stopped >= 4 and max(r["step"] for r in train_rows(run_dir / "metrics.jsonl")) == stopped  # all saved
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out


def test_a_corpus_of_files_shorter_than_the_crop_is_a_note_of_the_padding(corpus, tmp_path, capsys):
    """Files of 0.25 s and crops of 1 s: three quarters of each training step's audio is padding the
    losses leave out, and the data line said only how many crops there were (the transformer
    trainer says so of its seq_len). Now a note says how much and what to change; the demo corpus,
    whose files are longer than the crop, gets none."""
    import numpy as np
    import soundfile as sf
    short = tmp_path / "short"
    short.mkdir()
    t = np.arange(4000) / 16000
    for i in range(40):
        sf.write(short / f"{i:02d}.wav", 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t), 16000)
    result = run_here(args(corpus, tmp_path / "run", f"train_data_path={short}", "max_steps=1", *BRIEF_EVAL), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"note: about 75% of each training crop is padding: most of {short}'s audio is in files shorter than "
            "segment_seconds=1, and the losses leave the padding out; a shorter segment_seconds trains on the same "
            "audio for less") in result.stdout + result.stderr
    result = run_here(args(corpus, tmp_path / "run2", "max_steps=1", *BRIEF_EVAL), capsys)
    assert result.returncode == 0 and "is padding" not in result.stdout + result.stderr


def test_long_mp3s_streamed_are_one_note_with_their_cost_and_the_fix(tmp_path, capsys):
    """A crop streamed from an MP3 costs time in proportion to where it lies (libsndfile's decoder
    reads the frames from the start at each seek: 171 ms a crop in a 2-hour file), so data loading
    starved the GPU without a word. A corpus that streams long MP3s is one note at the start: how
    many, the longest, a crop's cost from its middle against its start, and what to do (FLAC or
    WAV, or a preload_max_gb that decodes them once); a preloaded corpus, or FLAC, says nothing."""
    sr, minutes = 16000, 6
    t = np.arange(sr * 60 * minutes) / sr
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(t))).astype(np.float32)
    (tmp_path / "mp3").mkdir()
    (tmp_path / "flac").mkdir()
    try:
        sf.write(tmp_path / "mp3" / "talk.mp3", audio, sr, format="MP3", subtype="MPEG_LAYER_III")
    except Exception as e:  # an old libsndfile without an MP3 encoder
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    sf.write(tmp_path / "mp3" / "short.mp3", audio[:sr * 10], sr, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(tmp_path / "flac" / "talk.flac", audio, sr)

    def notes(folder, preload):
        result = run_here(["--config", "tiny", f"train_data_path={tmp_path / folder}",
                           f"val_data_path={tmp_path / folder}", "batch_size=2", "max_steps=1", "val_crops=2",
                           "eval_interval=1000", "wandb=disabled", "num_workers=0", f"preload_max_gb={preload}",
                           f"checkpoint_dir={tmp_path / 'runs' / f'{folder}{preload}'}"], capsys)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if "MP3" in line]

    said = notes("mp3", 0)
    assert len(said) == 1, said  # once, for the validation and the training set both
    assert re.fullmatch(
        rf"note: 1 MP3 files of 5 minutes or more are streamed \(the longest {re.escape(str(tmp_path / 'mp3' / 'talk.mp3'))}"
        r", 6\.0 min\): an MP3 is seeked by reading it from its start, so a crop costs more the later it lies \(one from "
        r"the middle of that file took \d+ ms here, one from its start \d+ ms\), and data loading can leave the GPU "
        r"waiting; convert them to FLAC or WAV, which seek in constant time, or preload_max_gb=0\.0\d+ \(the corpus "
        r"decoded\) to decode them once", said[0])
    assert notes("mp3", 1) == []  # decoded into memory once: its crops cost no seek
    assert notes("flac", 0) == []
