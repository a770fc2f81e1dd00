"""train_transformer.py end to end on a tiny corpus and codec (CPU): every stage, mono and duplex,
exact resume, DDP and FSDP with two gloo processes, init_from=official through the hub, the
exported model in the inference path and the overfit check. (The benchmark's smoke run, full
training beside LoRA: test_finetune.py::test_benchmark_lora_smoke.)"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import fields_marked, parse_args
from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS, TransformerConfig
from model import Codec, Generator, HertzDev, build, load_hertz_dev, save_codec, save_transformer
from model.checkpoint import read_weights, substate
from model.objectives import STAGES, compute_losses

import train_transformer
from hub_server import HubServer
from in_process import run_in_process
from reference import PARITY_DIR, require, transformer_config
from shared_files import shared_note, val_sharing_training_files
from torchrun import error_lines, launch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("quantizer", "lm", "resynth")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # `setup`: conftest.py


def base_args(setup, run_dir, duplex=True, preset="tiny", **overrides):
    args = {"codec_checkpoint": setup["codec"], "train_data_path": setup["root"] / "corpus/train",
            "val_data_path": setup["root"] / "corpus/val", "latents_dir": setup["root"] / "latents",
            "checkpoint_dir": run_dir, "duplex": duplex, "wandb": "disabled", "max_steps": 2, "eval_interval": 2,
            "save_interval": 2, "log_interval": 1, "batch_size": 2, "val_crops": 4, "sample_seconds": 0.5,
            **overrides}
    return ["--config", preset] + [f"{k}={v}" for k, v in args.items()]


def train(args, nproc=1, code=None, env=None, timeout=300):
    """Run the trainer in a subprocess (torchrun for nproc > 1); stdout, and the eval JSON lines."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train_transformer.py"]
    elif code:
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "train_transformer.py"]
    out = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    evals = {row["eval"]: row for row in (json.loads(line) for line in out.stdout.splitlines()
                                          if line.startswith('{"eval"'))}
    return out.stdout + out.stderr, evals


def run_here(args, capsys):
    """`train_transformer.py ARGS` in this process (`in_process.run_in_process`): (exit status,
    stdout, stderr). For runs whose subject is not the process (its signals, environment, ranks:
    `train`, `fails`)."""
    import train_transformer
    r = run_in_process("train_transformer.py", train_transformer.main, args, capsys)
    return r.returncode, r.stdout, r.stderr


def train_here(args, capsys):
    """`train` in this process (`run_here`): its log, and the eval JSON lines."""
    code, out, err = run_here(args, capsys)
    assert code == 0, out[-3000:] + err[-5000:]
    evals = {row["eval"]: row for row in (json.loads(line) for line in out.splitlines() if line.startswith('{"eval"'))}
    return out + err, evals


def fails_here(args, capsys) -> str:
    """`fails` in this process (`run_here`): one `error:` line and no traceback; the log."""
    code, out, err = run_here(args, capsys)
    assert code != 0 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return out + err


def train_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/total"] for row in rows if "train/total" in row}


def logged_past(run_dir, step) -> bool:
    """Whether a running trainer's metrics.jsonl has a training row of `step` or later yet."""
    try:
        return max(train_rows(run_dir), default=0) >= step
    except (OSError, ValueError):  # (not written yet, or its last line half written)
        return False


def run_stage(setup, stage, duplex, capsys):
    """The 2-step run of `stage`, made once per process and kept in `setup`: in this process
    (`train_here`), but for the duplex `all` run, which the resume tests compare theirs with: in a
    process of its own (`train`), as the other test modules' reference runs are."""
    key = (stage, duplex)
    if key not in setup["runs"]:
        run_dir = setup["root"] / f"run-{stage}-{duplex}"
        args = base_args(setup, run_dir, duplex, stage=stage)
        if key == ("all", True):
            log, evals = train(args)
        else:
            with torch.enable_grad():  # (asked for first by a test under no_grad, perhaps)
                log, evals = train_here(args, capsys)
        setup["runs"][key] = (run_dir, log, evals)
    return setup["runs"][key]


def tiny(duplex):
    return dataclasses.replace(PRESETS["tiny"], duplex=duplex)


@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_trains_its_components_and_exports(setup, stage, duplex, capsys):
    run_dir, log, evals = run_stage(setup, stage, duplex, capsys)
    assert sorted(evals) == [0, 2] and all(torch.isfinite(torch.tensor(v)) for v in evals[2].values())
    assert (run_dir / "samples" / "step_00000002.wav").is_file()
    assert {p.name for p in run_dir.glob("*.pt")} >= {"latest.pt", "best.pt", "step_00000002.pt"}
    # trained components moved away from the seeded initial weights; frozen ones did not move at all
    state, meta = read_weights(run_dir / "best.safetensors")
    assert meta["config"]["stage"] == stage and meta["extra"]["codec"] == str(setup["codec"])
    # a stage on a frozen quantizer from random weights (no init_from): said
    assert ("keeps the quantizer frozen, and with no init_from it is a random one" in log) == \
        ("quantizer" not in STAGES[stage])
    torch.manual_seed(PRESETS["tiny"].seed)
    init = build(HertzDev, tiny(duplex))
    for part in PARTS:
        saved, start = substate(state, part), getattr(init, part).state_dict()
        changed = any(not torch.equal(saved[k], v) for k, v in start.items())
        assert changed == (part in STAGES[stage]), (part, stage)


@torch.no_grad()
def test_a_loss_weight_its_stage_does_not_train_on_is_said():
    """lm_loss_weight with stage=quantizer (which trains on resynth_nll only) changed nothing, unsaid."""
    notes = train_transformer.stage_notes(parse_args(["--config", "tiny", "stage=quantizer", "lm_loss_weight=5"],
                                                     PRESETS), None)
    assert notes == ["lm_loss_weight=5 with stage=quantizer, which does not train on lm_ce: it has no effect"]
    assert train_transformer.stage_notes(parse_args(["--config", "tiny", "lm_loss_weight=5"], PRESETS), None) == []
    lm = parse_args(["--config", "tiny", "stage=lm", "resynth_loss_weight=2", "init_from=x.safetensors"], PRESETS)
    assert train_transformer.stage_notes(lm, None) == [
        "resynth_loss_weight=2 with stage=lm, which does not train on resynth_nll: it has no effect"]


@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
def test_exported_model_loads_and_generates(setup, duplex, capsys):
    run_dir, _, _ = run_stage(setup, "all", duplex, capsys)
    hertz = load_hertz_dev(run_dir / "best.safetensors")  # the codec comes from the checkpoint's record
    assert hertz.config.duplex == duplex and hertz.codec is not None
    C, P, n = (2 if duplex else 1), 4, 3
    audio = 0.1 * torch.randn(C, 1, P * 2000)
    mu, _ = hertz.codec.encode(audio)  # (C, P, 32)
    prompt = torch.cat(list(mu), dim=-1)[None]  # (1, P, C*32)
    latents = Generator(hertz, batch_size=1).generate(prompt, n, seed=0)[:, P:]
    assert latents.shape == (1, n, 32 * C) and torch.isfinite(latents).all()
    wave = hertz.codec.decode(latents[..., :32])
    assert wave.shape == (1, 1, n * 2000) and torch.isfinite(wave).all()


@pytest.mark.parametrize("stop", ["max_minutes", "stop_step", "stop_step, float16"])
def test_resume_continues_at_the_same_step_exactly(setup, stop, capsys):
    """Stopped after one step, by max_minutes or by stop_step (the schedule still that of
    max_steps), and run again: the same losses, step for step, and the same final validation as the
    uninterrupted run. With dtype=float16 the loss is scaled (model.training.loss_scaler), which on
    the CPU (float32 arithmetic; the scale a power of two) changes no value, and the scale and its
    growth count are saved and resumed."""
    run_dir, _, evals = run_stage(setup, "all", True, capsys)
    resumed = setup["root"] / f"run-resumed-{stop.replace(', ', '-')}"
    extra = {"dtype": "float16"} if "float16" in stop else {}
    log, first = train_here(base_args(setup, resumed, stage="all", **extra,
                                      **({"max_minutes": 1e-9} if stop == "max_minutes" else {"stop_step": 1})), capsys)
    assert sorted(first) == [0, 1]
    assert ("max_minutes=1e-09 reached at step 1" if stop == "max_minutes" else
            "stop_step=1 reached; the schedule runs to max_steps=2") in log
    log, second = train_here(base_args(setup, resumed, stage="all", **extra), capsys)
    assert f"{resumed / 'latest.pt'} (step 1)" in log and sorted(second) == [2]
    assert train_rows(resumed) == train_rows(run_dir)
    assert second[2] == evals[2]
    scaler = torch.load(resumed / "latest.pt", weights_only=False)["scaler"]
    assert scaler == ({"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 2} if extra else {})  # two clean steps counted across the resume


def test_a_stop_step_past_max_steps_is_a_note_and_the_run_ends_at_max_steps(setup, tmp_path, capsys):
    """stop_step=5 of max_steps=1 was taken without a word (never reached); a note says so before
    the latents, and the run trains its one step."""
    run_dir = tmp_path / "run"
    log, evals = train_here(base_args(setup, run_dir, duplex=False, stage="lm", max_steps=1, stop_step=5, val_crops=1,
                                      sample_seconds=0), capsys)
    note = ("note: stop_step=5 is past max_steps=1: the run ends at max_steps; raise max_steps to train longer (the "
            "cosine decay is then stretched to it)")
    assert note in log.splitlines() and log.index(note) < log.index("training from step 0 to 1")
    assert sorted(evals) == [0, 1] and torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 1


def test_eval_quantize_counts_the_parameters_its_quantized_layers_hold(setup, capsys):
    """eval_only=true eval_quantize=int8|int4 described "(0.00M of 0.00M parameters)": the count read
    parameters() only, and a quantized layer holds its weights as buffers. Now the same counts as
    the float model's evaluation."""
    run_dir, _, _ = run_stage(setup, "lm", False, capsys)
    stage_lines = {}
    for mode in ("none", "int8", "int4"):
        log, evals = train_here(base_args(setup, run_dir, duplex=False, stage="lm", eval_only=True, eval_quantize=mode,
                                          val_crops=1), capsys)
        [line] = [line for line in log.splitlines() if line.startswith("stage lm: evaluating")]
        stage_lines[mode] = line
    counts = re.search(r"\((\d+\.\d\dM) of (\d+\.\d\dM) parameters\)", stage_lines["none"])
    assert counts and float(counts[1][:-1]) > 0, stage_lines
    assert stage_lines["int8"] == stage_lines["int4"] == stage_lines["none"], stage_lines


def test_the_same_command_after_the_run_finished_says_so_and_changes_nothing(setup, tmp_path, capsys):
    """Run again once finished (latest.pt at max_steps): it loaded the codec, checked the latents,
    evaluated step 2 once more (a second row in metrics.jsonl, the sample rewritten) and said
    "done at step 2". Now one line says the run is finished and how to train further, before the
    codec loads, and no file of the run changes."""
    done, _, _ = run_stage(setup, "all", True, capsys)
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    before = {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    log, evals = train_here(base_args(setup, run_dir, stage="all"), capsys)
    assert evals == {} and "encod" not in log
    assert (f"the run in {run_dir} is already finished at step 2 (max_steps=2); nothing to train. To train further, "
            "raise max_steps (e.g. max_steps=4") in log
    assert {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*")
            if p.is_file()} == before


def test_ddp_and_fsdp_agree_and_fsdp_resumes(setup):
    """Two gloo processes with gradient accumulation: DDP, and FSDP2 (with activation
    checkpointing) stopped after one step and resumed from its gathered checkpoint, train alike."""
    common = dict(stage="all", max_steps=3, eval_interval=3, save_interval=3, grad_accum_steps=2)
    ddp_dir, fsdp_dir = setup["root"] / "run-ddp", setup["root"] / "run-fsdp"
    _, ddp = train(base_args(setup, ddp_dir, parallel="ddp", **common), nproc=2)
    log, _ = train(base_args(setup, fsdp_dir, parallel="fsdp", activation_checkpointing=True, max_minutes=1e-9,
                             **common), nproc=2)
    assert "reached at step 1" in log
    log, fsdp = train(base_args(setup, fsdp_dir, parallel="fsdp", activation_checkpointing=True, **common), nproc=2)
    assert "(step 1)" in log and "(fsdp)" in log
    for key, value in ddp[3].items():
        assert fsdp[3][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    a, b = train_rows(ddp_dir), train_rows(fsdp_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3] and all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a)
    assert load_hertz_dev(fsdp_dir / "latest.safetensors", codec=None).config.parallel == "fsdp"


OFFICIAL_FIXTURES = {"inference_volcano_3": "quantizer_state_dict.pt", "inference_scion_54000": "lm_duplex_state_dict.pt",
                     "inference_care_50000": "resynthesizer_duplex_state_dict.pt"}


def test_the_data_loading_workers_stop_when_main_returns_even_with_its_frame_kept(setup, tmp_path):
    """As the codec trainer's test of the same name: train_transformer.main, its frame kept after
    it returns (tests/kept_frame.py), leaves no data-loading worker running. One step is all it
    needs (the worker starts for it), evaluated on one crop without an audio sample."""
    out = subprocess.run([sys.executable, "tests/kept_frame.py", "train_transformer",
                          *base_args(setup, tmp_path / "run", num_workers=1, max_steps=1, eval_interval=1,
                                     val_crops=1, sample_seconds=0)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"workers_running": []}


def train_from_official_hub(setup, tmp_path, monkeypatch, capsys, **extra):
    """A `stage=lm` run of one step with init_from=official, the official duplex files being the
    parity-size state dicts served by a loopback hub (md5s registered, and their architecture taken
    by `model.loading` as the official one: patched for the test, the run in this process,
    `train_here`); asserts that the three files were downloaded. Returns (run folder, {official
    name: fixture}, md5s, log, evaluations)."""
    from model import hub, loading
    require(PARITY_DIR)
    arch = transformer_config(True)
    official = {k: getattr(arch, k) for k in fields_marked(TransformerConfig, "arch")}  # registered as official
    overrides = {k: v for k, v in official.items() if v != getattr(PRESETS["tiny"], k)}
    with HubServer() as server:
        md5s = {}
        for name, fixture in OFFICIAL_FIXTURES.items():
            data = server.add(f"{name}.pt", PARITY_DIR / fixture)
            md5s[name] = (hashlib.md5(data).hexdigest(), len(data))
            monkeypatch.setitem(hub.OFFICIAL_FILES, name, hub.OfficialFile(name, *md5s[name], "test"))
        monkeypatch.setattr(loading, "TRANSFORMER_HERTZ_DEV",
                            dataclasses.replace(loading.TRANSFORMER_HERTZ_DEV, **official))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        run_dir = tmp_path / "run"
        log, evals = train_here(base_args(setup, run_dir, stage="lm", init_from="official", ckpt_dir=tmp_path / "ckpt",
                                          max_steps=1, eval_interval=1, **overrides, **extra), capsys)
        assert len([r for r in server.requests if "/resolve/" in r]) == 3 and "weights from official duplex" in log
    return run_dir, OFFICIAL_FIXTURES, md5s, log, evals


def test_init_from_official_fine_tunes_files_in_the_official_layout(setup, tmp_path, monkeypatch, capsys):
    """The official duplex files (parity-size state dicts served by a local hub, md5-checked) fill
    the model; stage=lm then trains the LM only, so the exported quantizer and resynthesizer are
    exactly the official tensors."""
    run_dir, files, md5s, log, evals = train_from_official_hub(setup, tmp_path, monkeypatch, capsys)
    state, _ = read_weights(run_dir / "latest.safetensors")
    for part, fixture in (("quantizer", files["inference_volcano_3"]),
                          ("resynth", files["inference_care_50000"]), ("lm", files["inference_scion_54000"])):
        official = torch.load(PARITY_DIR / fixture, weights_only=True)
        same = all(torch.equal(substate(state, part)[k], v.float()) for k, v in official.items())
        assert same == (part != "lm"), part


def test_missing_default_codec_names_the_command(tmp_path, monkeypatch):
    import train_transformer
    from config import ConfigError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"python train_codec.py --config tiny"):
        train_transformer.main(["--config", "tiny", "wandb=disabled"])


def fails(args, env=None) -> str:
    """Run the trainer in a subprocess that must fail with one `error:` line and no traceback."""
    out = subprocess.run([sys.executable, "train_transformer.py", *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("mistake, message", [
    (["--config", "huge"], "unknown preset 'huge'"),
    (["max_step=3"], "unknown config key 'max_step'"),
    (["max_steps=many"], "max_steps: expected an int, got 'many'"),
    (["train_data_path=MISSING"], "train_data_path="),
    (["val_data_path=MISSING"], "val_data_path="),
    # an audio file where a folder belongs: was "no such folder", though it exists
    (["train_data_path=FILE"], "train_data_path='FILE' is a file, not a folder; expected a folder of .wav"),
    # each valid alone, contradicting together: before, each trained (the first three silently
    # on nothing but weight decay, the last with a rate rising to min_lr, the fourth ignored)
    (["stage=lm", "lm_loss_weight=0.0"], "lm_loss_weight=0 with stage=lm, which trains on lm_ce"),
    (["resynth_loss_weight=0.0"], "resynth_loss_weight=0 with stage=all, which trains on resynth_nll: nothing "
                                  "would learn from it; set resynth_loss_weight > 0, or stage=lm"),
    (["stage=quantizer", "resynth_loss_weight=0.0"], "resynth_loss_weight=0 with stage=quantizer"),
    (["duplex=false", "model_channel=0"], "model_channel=0 with duplex=false: it applies to duplex runs only"),
    (["learning_rate=1e-5"], "min_lr=0.0001 is above learning_rate=1e-05"),
    # the decay factor 1 - 0.02 * 100 = -1: the weights flipped each step; it trained on, its quantizer
    # collapsed to one code
    (["learning_rate=0.02", "weight_decay=100.0"], "learning_rate=0.02 with weight_decay=100: AdamW multiplies"),
    # the audio resampled to 8 kHz and encoded by a 16 kHz codec: other latents, trained on silently
    # (in the words of loading a model with a codec: model.loading.codec_config_fitting)
    (["sample_rate=8000"], "makes 32-dim latents of 16000 Hz audio, but this run takes 32-dim latents of 8000 Hz "
                           "audio: set latent_dim and sample_rate to the codec's, or pass another codec_checkpoint"),
    # latents of another size than the model reads: a shape traceback at the first step, after encoding
    (["latent_dim=16"], "makes 32-dim latents of 16000 Hz audio, but this run takes 16-dim latents of 16000 Hz"),
    # a val folder without audio: found after the train folder was encoded (EMPTY: a folder with no audio in it)
    (["val_data_path=EMPTY"], "has no audio files"),
    # heads that do not split the width: an AssertionError traceback from check_config's meta build;
    # an odd head size (rotary turns pairs): a shape traceback at the first step, after encoding
    (["lm_heads=3"], "lm_dim=64 and lm_heads=3: the heads split lm_dim into equal heads of an even size"),
    (["resynth_dim=60"], "resynth_dim=60 and resynth_heads=4: the heads split resynth_dim"),
    (["lm_kv_heads=3"], "lm_heads=4 and lm_kv_heads=3: each key/value head serves an equal group"),
    # its samples/step_*.wav joined the corpus: a resumed run encoded it anew and trained on them
    (["checkpoint_dir=VAL/run"], "checkpoint_dir='VAL/run' lies inside val_data_path='VAL': the audio samples"),
    # a folder under a file: a NotADirectoryError traceback when the run folder was made, after encoding
    (["checkpoint_dir=FILE/run"], "checkpoint_dir='FILE/run' cannot be made: FILE is a file, not a folder"),
    # a link to nothing on the way (a disk not mounted): "cannot write .../.run.lock: File exists", the config passed
    # logits of 26 TB: a failed allocation (traceback) at the step-0 evaluation, after encoding (only the
    # unit test runs it without the check: it would allocate what it can first)
    (["seq_len=100000000", "sample_seconds=0.0"], "seq_len=100000000 with batch_size=2: the LM's logits of one batch"),
    (["checkpoint_dir=LINK/run"], "checkpoint_dir='LINK/run' cannot be made: LINK is a symbolic link to "
                                  "disk/runs, which does not exist"),
    # a codec of two channels in: a shape traceback once the encoding had started
    (["codec_checkpoint=STEREO"], "codec_checkpoint=STEREO has input_channels=2 and output_channels=1: the latents "
                                  "are made one speaker's channel at a time by a mono codec"),
    # "restart from my best": the folder moved aside, the latents encoded, then "no such file"
    (["resume=false", "init_from=RUN/best.safetensors"], "init_from=RUN/best.safetensors lies in checkpoint_dir=RUN, "
                                                         "which resume=false moves aside before the weights are read"),
], ids=["preset", "key", "type", "train-folder", "val-folder", "train-file", "lm-weight-0", "resynth-weight-0",
        "quantizer-weight-0", "mono-model-channel", "min-lr-above-lr", "decay-flips-weights", "codec-rate", "codec-latent-dim",
        "val-without-audio", "heads-split-width", "odd-head-size", "kv-heads", "run-inside-data", "run-under-file",
        "logits-outgrow-memory", "run-in-a-dangling-link", "stereo-codec", "init-from-the-run-moved-aside"])
def test_user_errors_are_one_error_line(setup, tmp_path, mistake, message, capsys):
    if any("FILE" in a for a in mistake):
        (tmp_path / "one.wav").write_bytes(b"")
    if any("STEREO" in a for a in mistake):
        save_codec(tmp_path / "stereo.safetensors", build(Codec, dataclasses.replace(CODEC_PRESETS["tiny"],
                                                                                     input_channels=2)))
    if any("RUN" in a for a in mistake):
        (tmp_path / "run").mkdir()
        shutil.copy(run_stage(setup, "quantizer", True, capsys)[0] / "best.safetensors", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unmounted").symlink_to("disk/runs")
    names = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"), "LINK": str(tmp_path / "unmounted"),
             "FILE": str(tmp_path / "one.wav"), "VAL": str(setup["root"] / "corpus/val"),
             "STEREO": str(tmp_path / "stereo.safetensors"), "RUN": str(tmp_path / "run")}
    for name, path in names.items():
        mistake, message = [a.replace(name, path) for a in mistake], message.replace(name, path)
    preset = mistake[1] if mistake[0] == "--config" else "tiny"  # each key given once: a second one is an error
    args = base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents", preset=preset,
                     **dict(a.split("=", 1) for a in mistake if "=" in a))
    assert message in fails_here(args, capsys)
    assert not (tmp_path / "latents").exists()


def test_the_official_codec_missing_offline_is_an_error_not_a_traceback(setup, tmp_path, monkeypatch, capsys):
    """codec_checkpoint=official with the file not in ckpt_dir and HF_HUB_OFFLINE=1 (which model.hub
    reads when asked): an `error:` naming the codec's file and where to put it (until session 17:
    hub's WeightsError as a traceback). The trainer's main in this process (`fails_here`)."""
    from model.hub import CODEC, OFFICIAL_FILES
    folder = tmp_path / "official"
    args = base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents", codec_checkpoint="official",
                     ckpt_dir=folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    log = fails_here(args, capsys)
    assert "error: offline mode and these official hertz-dev files are missing" in log
    assert OFFICIAL_FILES[CODEC].filename in log and "Traceback" not in log


def test_float16_whose_gradient_norm_overflows_stops_with_an_error(setup, tmp_path, capsys):
    """dtype=float16 with loss weights of 1e36: the first steps' scaled loss overflows, and each is
    skipped while the scale halves (float16's rule); then the gradients fit but their norm
    overflows float32, which skipped every later step, the scale never lowered again, and the run
    ended "done" with its first weights. Now that step stops the run with one error line."""
    run_dir = tmp_path / "run"
    log = fails_here(base_args(setup, run_dir, dtype="float16", lm_loss_weight=1e36, resynth_loss_weight=1e36,
                               max_steps=30, eval_interval=30, save_interval=4), capsys)
    error = next(line for line in log.splitlines() if line.startswith("error: "))
    step = int(re.match(r"error: non-finite gradient norm \(inf\) at step (\d+) on a batch from ", error)[1])
    scale = torch.load(run_dir / "latest.pt", weights_only=False)["scaler"]["scale"]
    assert 4 <= step < 30 and scale < 2.0 ** 16  # the scale fell over the first steps, skipped without an error


def test_float16_with_fsdp_across_processes_is_one_error_line(setup, tmp_path):
    """FSDP shards the gradients, and the float16 loss scale here is not sharded: refused at once
    (as torchrun's WORLD_SIZE says), before anything loads or encodes; one process, or DDP, trains."""
    log = fails(base_args(setup, tmp_path / "run", dtype="float16", parallel="fsdp", latents_dir=tmp_path / "latents"),
                env={"WORLD_SIZE": "2"})
    assert "error: dtype=float16 with parallel=fsdp" in log and "parallel=ddp" in log
    assert not (tmp_path / "latents").exists()


def test_a_contradicting_resume_fails_before_encoding(setup, tmp_path, capsys):
    """A run to resume, then the same folder with another architecture, or latents of another
    codec: one error line, found before any latent is encoded (no latents folder is made)."""
    run_dir = tmp_path / "run"
    train_here(base_args(setup, run_dir, max_steps=1, eval_interval=1, save_interval=1, sample_seconds=0), capsys)
    log = fails_here(base_args(setup, run_dir, lm_layers=3, latents_dir=tmp_path / "latents-arch"), capsys)
    assert "contradicts the checkpoint" in log and "lm_layers" in log and "resume=false" in log
    torch.manual_seed(1)
    other = save_codec(tmp_path / "other-codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    log = fails_here(base_args(setup, run_dir, codec_checkpoint=other, latents_dir=tmp_path / "latents-codec"), capsys)
    assert "was trained on latents of codec" in log and "encoding" not in log
    assert not (tmp_path / "latents-arch").exists() and not (tmp_path / "latents-codec").exists()


def test_a_codec_run_or_a_wrong_init_from_fails_before_encoding(setup, tmp_path, capsys):
    """checkpoint_dir naming a run of train_codec.py (it was a KeyError traceback), and init_from
    naming a codec, a file that is not a checkpoint or a transformer of another architecture
    (found after the latents were encoded): one error line each, no latents folder made."""
    codec_run = tmp_path / "codec-run"
    codec_run.mkdir()
    torch.save({"generator": build(Codec, CODEC_PRESETS["tiny"]).state_dict(), "discriminators": {}, "opt_g": {},
                "opt_d": {}, "step": 2, "config": dataclasses.asdict(CODEC_PRESETS["tiny"]), "rng_state": []},
               codec_run / "latest.pt")
    other = dataclasses.replace(tiny(True), lm_layers=3)
    wider = save_transformer(tmp_path / "wider.safetensors", build(HertzDev, other), codec_source=str(setup["codec"]))
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    latents = tmp_path / "latents"
    log = fails_here(base_args(setup, codec_run, latents_dir=latents), capsys)
    assert (f"error: {codec_run / 'latest.pt'} is not a training state of train_transformer.py (it holds no "
            "'model'") in log
    for init_from, message in ((setup["codec"], "expected a transformer checkpoint (.safetensors), found a codec"),
                               (tmp_path / "text.safetensors", "found a file that is neither safetensors nor PyTorch"),
                               (wider, "lm_layers: the checkpoint has 3, this run has 2")):
        log = fails_here(base_args(setup, tmp_path / "run", latents_dir=latents, init_from=init_from), capsys)
        assert message in log and "encoding" not in log, log[-2000:]
    assert not latents.exists()


def test_init_from_official_of_another_architecture_or_missing_offline_is_found_first(tmp_path, monkeypatch):
    """init_from=official (or a variant) on a run whose architecture is not the official one, or
    whose official files are not in ckpt_dir offline: refused by check_init_from, before the codec
    loads; both were found by initial_weights, after the latents were encoded (and, online, after
    the 34 GB had downloaded)."""
    from config import ConfigMismatch
    from model.hub import WeightsError
    from train_transformer import check_init_from
    with pytest.raises(ConfigMismatch, match=r"init_from=official has the official architecture:\n  quantizer_dim: "
                       r"the checkpoint has 2048, this run has 32\n(.|\n)*--config hertz_dev"):
        check_init_from(dataclasses.replace(PRESETS["tiny"], init_from="official"))
    with pytest.raises(ConfigMismatch, match="init_from=mono has the official architecture"):
        check_init_from(dataclasses.replace(PRESETS["tiny"], init_from="mono", duplex=False))
    mono = dataclasses.replace(PRESETS["hertz_dev"], init_from="official", duplex=False, ckpt_dir=str(tmp_path))
    check_init_from(mono)  # online: downloaded when the weights load
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1.5")  # (what the download would refuse, said now too)
    with pytest.raises(WeightsError, match=r"^HF_HUB_DOWNLOAD_TIMEOUT: expected a whole number of seconds > 0"):
        check_init_from(mono)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"offline mode and these official hertz-dev files are missing:\n"
                       r"  inference_volcano_3.pt (.|\n)*  inference_caraway_\S*.pt"):
        check_init_from(mono)


def test_a_run_folder_beside_or_hidden_in_the_data_is_allowed(tmp_path):
    """check_outside_data refuses checkpoint_dir inside a scanned data folder only: a sibling
    whose name extends the folder's, a hidden subfolder (never scanned) and a manifest's folder
    (it lists its own files) are fine, and so is any folder with sample_seconds=0 (no audio written)."""
    from config import ConfigError
    from train_transformer import check_config
    (tmp_path / "data").mkdir()
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "data.jsonl").write_text(json.dumps({"path": "a.wav"}) + "\n")
    cfg = dataclasses.replace(PRESETS["tiny"], codec_checkpoint="official", train_data_path=str(tmp_path / "data"),
                              val_data_path=str(tmp_path / "data"), latents_dir=str(tmp_path / "latents"))
    for run in ("data2/run", "data/.runs/a", "data/x/../../elsewhere"):
        check_config(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / run)))
    check_config(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "data/run"), sample_seconds=0.0))
    with pytest.raises(ConfigError, match="lies inside train_data_path="):
        check_config(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "data")))
    manifest = str(tmp_path / "data.jsonl")  # the run in the manifest's folder
    check_config(dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "run"), train_data_path=manifest,
                                      val_data_path=manifest))


def noise_files(folder, names):
    """Half-second mono noise files `names` in a new `folder`, and a tiny codec (seed 0); returns the
    random generator (for more files) and the codec."""
    import soundfile as sf
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in names:
        sf.write(folder / name, 0.1 * rng.standard_normal(8_000).astype(np.float32), 16000)
    torch.manual_seed(0)
    return rng, build(Codec, CODEC_PRESETS["tiny"]).eval()


def test_a_duplex_run_on_one_channel_files_only_says_what_the_model_learns(tmp_path):
    """duplex=true (every preset's default) on a folder of mono recordings trained, silently, a
    model whose own channel (1) was silence in every file: it learnt to say nothing. Now a note,
    before encoding; a corpus with one two-channel file, or duplex=false, gets none."""
    import soundfile as sf
    from train_transformer import build_data
    rng, codec = noise_files(tmp_path / "mono", ("a.wav", "b.wav"))
    cfg = dataclasses.replace(tiny(True), train_data_path=str(tmp_path / "mono"), val_data_path=str(tmp_path / "mono"),
                              latents_dir=str(tmp_path / "latents"), seq_len=4)
    said = []
    build_data(cfg, codec, "f", said.append)
    notes = [m for m in said if "has one channel" in m]  # (train is val: a note says that too)
    assert notes == [f"note: every file of train_data_path={tmp_path / 'mono'} has one channel: duplex=true pairs "
                     "each with silence (mono_to_stereo=silence), so the model learns to stay silent on channel 1, "
                     "the voice it becomes; set duplex=false for a mono model, or give it two-channel conversations"]
    assert notes[0] == said[0]  # before encoding
    said.clear()
    build_data(dataclasses.replace(cfg, duplex=False), codec, "f", said.append)
    sf.write(tmp_path / "mono" / "c.wav", 0.1 * rng.standard_normal((8_000, 2)).astype(np.float32), 16000)
    build_data(cfg, codec, "f", said.append)
    assert not [m for m in said if "has one channel" in m]


def test_a_seq_len_longer_than_every_training_file_is_said(tmp_path):
    """seq_len=64 on files of 4 latents trained, without a word, on crops that were 94% padding
    (and counted them in latents/s): a note names the longest file's length; a seq_len that some
    file fills gets none."""
    from train_transformer import build_data
    _, codec = noise_files(tmp_path / "short", ("a.wav", "b.wav"))
    cfg = dataclasses.replace(tiny(False), train_data_path=str(tmp_path / "short"), val_data_path=str(tmp_path / "short"),
                              latents_dir=str(tmp_path / "latents"), seq_len=64)
    said = []
    build_data(cfg, codec, "f", said.append)
    assert [m for m in said if m.startswith("note: seq_len")] == [
        f"note: seq_len=64 is longer than every file of train_data_path={tmp_path / 'short'} (the longest is 4 "
        "latents): each crop is padded to seq_len, about 94% of each step is padding that trains nothing; seq_len=4 "
        "trains the same for less"]
    said.clear()
    build_data(dataclasses.replace(cfg, seq_len=4), codec, "f", said.append)
    assert not [m for m in said if m.startswith("note: seq_len")]


def test_a_val_set_sharing_files_with_the_train_set_is_said(tmp_path):
    """A val manifest listing training files (here one of two, and through another path) picked
    best.pt by a loss on training data, silently; now a note naming the shared files, before encoding."""
    from train_transformer import build_data
    _, codec = noise_files(tmp_path / "train", ("a.wav", "b.wav", "c.wav"))
    (tmp_path / "other").symlink_to(tmp_path / "train")
    (tmp_path / "val.jsonl").write_text('{"path": "other/a.wav"}\n{"path": "train/../c.wav"}\n')
    os.replace(tmp_path / "train/c.wav", tmp_path / "c.wav")
    cfg = dataclasses.replace(tiny(False), train_data_path=str(tmp_path / "train"), latents_dir=str(tmp_path / "lat"),
                              val_data_path=str(tmp_path / "val.jsonl"), seq_len=4)
    said = []
    build_data(cfg, codec, "f", said.append)
    assert said[0] == (f"note: val_data_path={tmp_path / 'val.jsonl'} shares 1 of its 2 files with train_data_path "
                       "(other/a.wav): its loss, which picks best.pt, measures how well the model fits its training "
                       "data, not how it generalises")
    said.clear()
    build_data(dataclasses.replace(cfg, eval_only=True), codec, "f", said.append)
    assert not [m for m in said if m.startswith("note:")]


def test_a_val_folder_holding_a_hard_link_of_a_training_file_is_said(setup, tmp_path, capsys):
    """The shared files were found by resolved path only, so a hard link of a training file in the
    val folder (which resolves to itself) went unseen; now by device and inode too, through the
    trainer's main, with the note train_codec.py prints too (`model.data.shared_with_training`)."""
    train, val = val_sharing_training_files(setup["root"] / "corpus", tmp_path)
    log, _ = train_here(base_args(setup, tmp_path / "run", train_data_path=train, val_data_path=val,
                                  latents_dir=tmp_path / "lat", max_steps=1, eval_interval=1, save_interval=1), capsys)
    assert [line for line in log.splitlines() if "shares" in line] == [shared_note(val)]


@torch.no_grad()
def test_the_audio_sample_lasts_sample_seconds_with_a_codec_of_another_hop(setup, tmp_path):
    """A codec of 1000 samples per latent (16 latents/s): each evaluation's sample continued its
    prompt by sample_seconds * 8 latents (the official codec's rate), half the asked length, and its
    caption called the prompt twice as long. The sample written is the prompt plus sample_seconds."""
    import soundfile as sf
    from model.latents import codec_fingerprint
    from model.training import Logger
    from train_transformer import audio_sample, build_data, frozen_codec
    torch.manual_seed(0)
    save_codec(tmp_path / "codec.safetensors", build(Codec, dataclasses.replace(CODEC_PRESETS["tiny"],
                                                                                strides=(2, 2, 2, 5, 5, 5))))
    cfg = dataclasses.replace(PRESETS["tiny"], duplex=False, eval_only=True, sample_seconds=1.0,
                              codec_checkpoint=str(tmp_path / "codec.safetensors"),
                              val_data_path=str(setup["root"] / "corpus/val"), latents_dir=str(tmp_path / "latents"))
    codec = frozen_codec(cfg, torch.device("cpu"))
    _, val_set = build_data(cfg, codec, codec_fingerprint(codec), lambda *a: None)
    audio_sample(3, build(HertzDev, cfg), val_set.crop(*val_set.crops[0]), codec, cfg, tmp_path / "run",
                 Logger("disabled", "test", tmp_path / "run", cfg), is_main=True)
    prompt = min(int(val_set.crop(*val_set.crops[0])["valid"].sum()), cfg.seq_len // 2)
    info = sf.info(str(tmp_path / "run/samples/step_00000003.wav"))
    assert info.frames == (prompt + 16) * 1000  # the prompt's latents and 1 s at 16 latents/s


def test_an_audio_sample_larger_than_memory_is_refused_by_check_config(tmp_path):
    """sample_seconds=1e9: each evaluation's completion would be a 2 TB tensor, a failed allocation
    (traceback) at the step-0 evaluation after the latents were encoded; check_config refuses it
    (model.generator.completion_problem, as complete.py's --seconds), eval_only (no samples) does not."""
    from config import ConfigError
    from train_transformer import check_config
    cfg = dataclasses.replace(PRESETS["tiny"], codec_checkpoint="official", sample_seconds=1e9,
                              train_data_path=str(REPO / "tests"), val_data_path=str(REPO / "tests"),
                              checkpoint_dir=str(tmp_path / "run"), latents_dir=str(tmp_path / "latents"))
    with pytest.raises(ConfigError, match=r"sample_seconds 1e\+09 needs at least .* GB .*more than "
                       r"this machine's memory .*sample_seconds=0 makes none"):
        check_config(cfg)
    check_config(dataclasses.replace(cfg, sample_seconds=600.0))  # ten minutes fit
    check_config(dataclasses.replace(cfg, eval_only=True))


def test_a_batch_whose_logits_outgrow_memory_is_refused_by_check_config(tmp_path):
    """seq_len=100000 (tiny preset, batch_size=2): the latents were encoded and minutes went by before
    the step-0 evaluation failed to allocate the LM's logits (2 x 100000 x 32768 floats, 26 GB: a
    traceback). check_config refuses a batch whose logits alone outgrow this machine's memory,
    naming seq_len and batch_size; the preset's own, and a long context that fits, pass."""
    from config import ConfigError
    from train_transformer import check_config
    cfg = dataclasses.replace(PRESETS["tiny"], codec_checkpoint="official", seq_len=10**8, batch_size=2, sample_seconds=0.0,
                              train_data_path=str(REPO / "tests"), val_data_path=str(REPO / "tests"),
                              checkpoint_dir=str(tmp_path / "run"), latents_dir=str(tmp_path / "latents"))
    with pytest.raises(ConfigError, match=r"^seq_len=100000000 with batch_size=2: the LM's logits of one batch alone "
                       r"\(2 x 100000000 x 32768 float32\) take 2.62e\+04 GB, more than this machine's memory "
                       r"\(.* GB\): lower seq_len or batch_size$"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"^seq_len=64 with batch_size=100000000: "):
        check_config(dataclasses.replace(cfg, seq_len=64, batch_size=10**8))
    check_config(dataclasses.replace(cfg, seq_len=PRESETS["tiny"].seq_len))
    check_config(dataclasses.replace(cfg, seq_len=4096))


def test_an_init_from_trained_on_another_codec_is_said_before_encoding(setup, tmp_path, capsys):
    """init_from one of our exports, which records the fingerprint of the codec whose latents it
    learnt, with another codec_checkpoint: allowed (a model moved onto a fine-tuned codec), but said
    in a note before any latent is encoded; it was silent."""
    other_codec = save_codec(tmp_path / "other-codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    model = save_transformer(tmp_path / "other.safetensors", build(HertzDev, tiny(True)),
                             codec_source=str(other_codec), extra={"codec_fingerprint": "0123456789abcdef"})
    log, _ = train_here(base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents", init_from=model,
                                  max_steps=1, sample_seconds=0), capsys)
    note = (f"note: init_from={model} was trained on latents of codec 0123456789abcdef ({other_codec}); "
            f"this run's codec {setup['codec']} is ")
    assert note in log and log.index(note) < log.index("encod"), log[-2000:]


def test_a_quantized_init_from_is_refused_for_full_training_before_encoding(setup, tmp_path, capsys):
    """init_from one of our int8 exports with full training: its Linears hold int8 buffers, no
    parameters, so the run trained only the norms and biases, then crashed at its first save with
    a RuntimeError traceback (the export's state dict names qweight/scale); eval_quantize=int4 on it
    evaluated the int8 weights as they were. Now one error line each, before any latent is encoded;
    finetune=lora on it (adapters on a quantized base) is still allowed by the check."""
    from model.quant import quantize_model
    from train_transformer import check_init_from
    model = save_transformer(tmp_path / "int8.safetensors", quantize_model(build(HertzDev, tiny(True)), "int8"),
                             codec_source=str(setup["codec"]))
    log = fails_here(base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents", init_from=model), capsys)
    assert f"error: init_from={model} holds int8 weights, which full training cannot update" in log
    assert not (tmp_path / "latents").exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="eval_quantize=int4 would evaluate them as they are"):
        check_init_from(dataclasses.replace(tiny(True), init_from=str(model), eval_only=True, eval_quantize="int4"))
    check_init_from(dataclasses.replace(tiny(True), init_from=str(model), eval_only=True, eval_quantize="int8"))
    check_init_from(dataclasses.replace(tiny(True), init_from=str(model), finetune="lora"))


def test_a_damaged_latents_folder_is_one_error_line(setup, tmp_path, capsys):
    """A latents shard cut short (a full disk, a killed copy): one line naming the folder and the
    fix, before training; it was a RuntimeError traceback from the first crop that reached the cut."""
    latents = tmp_path / "latents"
    train_here(base_args(setup, tmp_path / "run", latents_dir=latents, max_steps=1, sample_seconds=0), capsys)
    folder = next(latents.glob("train-*"))
    os.truncate(folder / "shard_00000.bin", 1000)
    log = fails_here(base_args(setup, tmp_path / "run2", latents_dir=latents, max_steps=1, sample_seconds=0), capsys)
    assert f"error: latents folder {folder} is damaged: shard_00000.bin holds 1000 bytes" in log
    assert f"delete {folder} and run again to encode it anew" in log and "training from step" not in log


def test_a_latents_shard_cut_short_mid_run_stops_it_saved_with_one_error_line(setup, tmp_path):
    """A training shard cut short once the run has saved (rewritten in place by a copy or a sync,
    under a reader): the trainer died of SIGBUS (exit status 135), no word, the steps since its
    last save lost. Now it stops at the step reached, saves it, and ends with one error line naming
    the shard, exit status 1; latest.pt holds that step."""
    import time
    latents, run_dir = tmp_path / "latents", tmp_path / "run"
    if (setup["root"] / "latents").is_dir():  # (encoded by an earlier test: copied, not encoded again)
        shutil.copytree(setup["root"] / "latents", latents)
    args = base_args(setup, run_dir, duplex=False, stage="lm", latents_dir=latents, max_steps=100_000,
                     eval_interval=100_000, save_interval=2, sample_seconds=0)
    trainer = subprocess.Popen([sys.executable, "train_transformer.py"] + [str(a) for a in args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240  # past step 2's save: a step after it (its row), so steps since it would be lost
        while time.time() < deadline and trainer.poll() is None and not (
                (run_dir / "step_00000002.pt").exists() and logged_past(run_dir, 3)):
            time.sleep(0.1)
        shards = list(latents.glob("train-mono-*/shard_00000.bin"))
        for shard in shards:
            os.truncate(shard, 0)
        out, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 1 and "Traceback" not in err, (trainer.returncode, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert len(errors) == 1 and len(shards) == 1 and stopped > 2, err[-3000:]
    assert errors[0].startswith(f"error: latents folder {shards[0].parent} is damaged: shard_00000.bin changed since "
                                "the run started: it holds 0 bytes, shorter than the ")
    assert errors[0].endswith(f"; stopped at step {stopped}, which latest.pt holds")
    assert json.loads((run_dir / "checkpoints.json").read_text())["latest_step"] == stopped
    assert load_hertz_dev(run_dir / "latest.safetensors", device="cpu", codec=None) is not None




def test_a_latents_shard_cut_short_under_torchrun_stops_every_rank_at_one_step_saved(setup, tmp_path):
    """The same under torchrun (2 gloo processes): the rank whose batch could not be read raised,
    unsaved, and the other stopped with it in the step's collectives, each with its own error line,
    the steps since the last save lost. Now every rank learns of it before the step, all stop at
    that step, saved, and rank 0 alone says the error, naming the shard."""
    import signal
    import time
    latents, run_dir = tmp_path / "latents", tmp_path / "run"
    if (setup["root"] / "latents").is_dir():  # (encoded by an earlier test: copied, not encoded again)
        shutil.copytree(setup["root"] / "latents", latents)
    args = base_args(setup, run_dir, duplex=False, stage="lm", latents_dir=latents, max_steps=100_000,
                     eval_interval=100_000, save_interval=2, sample_seconds=0, parallel="ddp")
    launcher = launch("train_transformer.py", args)
    try:
        deadline = time.time() + 240
        while not (run_dir / "step_00000004.pt").exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        shard = next(latents.glob("train-mono-*/shard_00000.bin"))
        os.truncate(shard, shard.stat().st_size // 2)  # the crops of the later files only: one rank's, at first
        out = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 1, out[-3000:]
    errors = error_lines(out)
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert len(errors) == 1 and errors[0].startswith(f"error: latents folder {shard.parent} is damaged: shard_00000.bin "
                                                     "changed since the run started: "), out[-3000:]
    assert errors[0].endswith(f"; stopped at step {stopped}, which latest.pt holds") and stopped >= 4
    assert max(train_rows(run_dir)) == stopped  # every step trained is saved
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out

def test_a_validation_crop_that_cannot_be_read_is_left_out_and_best_pt_is_not_ranked_on_the_rest(setup, tmp_path,
                                                                                                  capsys):
    """A validation shard holding NaN where a crop lies (damaged after it was encoded): the
    evaluation raised, and the run died without saving the steps since its last save. Now, as the
    codec trainer does, it evaluates on the crops it can read, names the one it cannot, says `on N
    of M crops`, saves the step without ranking it against best.pt (measured on every crop), and
    trains on."""
    latents, run_dir = tmp_path / "latents", tmp_path / "run"
    common = dict(duplex=False, stage="lm", latents_dir=latents, max_steps=4, eval_interval=2, save_interval=2,
                  val_crops=3, sample_seconds=0)
    train_here(base_args(setup, run_dir, stop_step=2, **common), capsys)
    folder = next(latents.glob("val-*"))
    entry = json.loads((folder / "manifest.json").read_text())["files"][0]  # the first crop's file
    with open(folder / entry["shard"], "r+b") as shard:  # overwritten in place, as a sync would
        shard.seek(entry["offset"] * 2 * 32 * 4)
        shard.write(np.full(2 * 32, np.nan, dtype=np.float32).tobytes())
    log, evals = train_here(base_args(setup, run_dir, **common), capsys)
    assert f"leaving the validation crops of {entry['name']} out while they cannot be read (said once; each " \
           f"evaluation's note counts them): latents folder {folder} is damaged: {entry['shard']} holds non-finite " \
           f"values in the latents of {entry['name']}" in log
    assert "note: step 4 evaluated (on 2 of 3 crops: 1 unreadable, named above; not ranked for best.pt, which was " \
           "measured on other crops)" in log
    assert 4 in evals and np.isfinite(evals[4]["val/loss"])
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["latest_step"] == 4 and info["best_step"] == 2


def test_an_evaluation_to_nan_says_which_metrics_and_why(setup, tmp_path, capsys):
    """An evaluation whose losses overflowed (finite weights too large for float32) printed a bare
    NaN in its JSON line and said nothing more, where the codec trainer names its overflowing
    reconstructions. Now a note names the non-finite metrics and the likely cause, in training
    (not ranked for best.pt; metrics.jsonl keeps null) and with eval_only."""
    torch.manual_seed(0)
    model = build(HertzDev, tiny(False))
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.dim() == 2:
                p.mul_(1e10)  # finite, but the LM's activations overflow: val/lm_ce is NaN
    path = save_transformer(tmp_path / "overflowing.safetensors", model, codec_source=str(setup["codec"]))
    common = dict(duplex=False, init_from=path, latents_dir=tmp_path / "latents", sample_seconds=0)
    why = ("evaluated to NaN or inf val/lm_ce, val/lm_ppl, val/loss: the model's outputs overflow on the validation "
           "latents in float32 (weights or latents too large for it)")
    log, evals = train_here(base_args(setup, tmp_path / "eval", eval_only=True, **common), capsys)
    assert np.isnan(evals[0]["val/loss"]) and f"note: {path} {why}\n" in log, log[-2000:]
    log = fails_here(base_args(setup, tmp_path / "run", stage="lm", **common), capsys)  # (its step 0 is NaN too)
    assert f"note: step 0 {why}; not ranked for best.pt\n" in log, log[-2000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 0 and row["val/lm_ce"] is None and row["val/loss"] is None


def test_an_unreadable_validation_file_is_named_once_a_run_by_rank_0(setup, tmp_path, capsys):
    """A validation file whose latents cannot be read (NaN written over them in place), its crops dealt
    out to both ranks: each rank named its own crops in a warning, at every evaluation where their
    count or first reason changed. Now rank 0 names the file once a run; each evaluation's note
    still counts the crops left out."""
    latents = tmp_path / "latents"
    common = dict(duplex=False, stage="lm", latents_dir=latents, seq_len=16, val_crops=12, sample_seconds=0,
                  parallel="ddp")
    train_here(base_args(setup, tmp_path / "encode", max_steps=1, **common), capsys)  # (encodes the latents)
    folder = next(latents.glob("val-*"))
    entry = max(json.loads((folder / "manifest.json").read_text())["files"], key=lambda e: e["length"])  # several crops
    with open(folder / entry["shard"], "r+b") as shard:
        shard.seek(entry["offset"] * 2 * 32 * 4)
        shard.write(np.full(entry["length"] * 2 * 32, np.nan, dtype=np.float32).tobytes())
    log, evals = train(base_args(setup, tmp_path / "run", max_steps=4, eval_interval=2, save_interval=2, **common),
                       nproc=2)
    lines = log.replace("\r", "\n").splitlines()
    warned = [line[line.index("warning: "):] for line in lines if "warning: leaving" in line]  # (after a bar, perhaps)
    assert len(warned) == 1 and f"the validation crops of {entry['name']} out" in warned[0], warned
    notes = [line for line in lines if re.match(r"note: step [024] evaluated \(on \d+ of \d+ crops: \d+ unreadable, "
                                                  r"named above", line)]
    assert len(notes) == 3 and sorted(evals) == [0, 2, 4], log[-3000:]


def test_a_validation_shard_cut_short_mid_run_stops_it_saved_with_one_error_line(setup, tmp_path):
    """Every validation crop unreadable mid-run (its shard cut short in place): the evaluation
    raised and the run died, the steps since its last save lost. Now the evaluation's step is
    saved (not ranked for best.pt: nothing was measured) and the run stops with one error line
    naming the folder, exit status 1."""
    import time
    latents, run_dir = tmp_path / "latents", tmp_path / "run"
    args = base_args(setup, run_dir, duplex=False, stage="lm", latents_dir=latents, max_steps=100_000,
                     eval_interval=4, save_interval=100_000, val_crops=3, sample_seconds=0)
    trainer = subprocess.Popen([sys.executable, "train_transformer.py"] + [str(a) for a in args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not (run_dir / "step_00000004.pt").exists() and time.time() < deadline and trainer.poll() is None:
            time.sleep(0.05)
        folder = next(latents.glob("val-mono-*"))
        os.truncate(folder / "shard_00000.bin", 0)
        out, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 1 and "Traceback" not in err, (trainer.returncode, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert len(errors) == 1 and stopped > 4 and stopped % 4 == 0, err[-3000:]
    assert errors[0] == (f"error: latents folder {folder}: none of its 3 validation crops can be read now (named "
                         f"above); delete {folder} and run again to encode it anew; stopped at step {stopped}, which "
                         "latest.pt holds")
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["latest_step"] == stopped and info["best_step"] < stopped

def test_a_damaged_best_pt_is_one_error_line_before_encoding(setup, tmp_path, capsys):
    """A best.pt cut short while latest.pt is whole: found when the folder was tidied at the start of
    the loop, after the codec had encoded the corpus. Now before encoding: nothing is written to a new
    latents_dir; the error names best.pt."""
    run_dir = tmp_path / "run"
    train_here(base_args(setup, run_dir, max_steps=2, sample_seconds=0), capsys)
    whole = (run_dir / "best.pt").read_bytes()
    (run_dir / "best.pt").unlink()  # (a hard link of a step: that one stays whole)
    (run_dir / "best.pt").write_bytes(whole[:len(whole) // 2])
    latents = tmp_path / "latents"
    log = fails_here(base_args(setup, run_dir, latents_dir=latents, max_steps=4, sample_seconds=0), capsys)
    assert f"error: {run_dir / 'best.pt'} is not a training state written by the trainers (it cannot be read: " in log
    assert "latents (codec" not in log and not any(latents.glob("*/*.bin")), log[-2000:]


def test_eval_only_reads_and_encodes_the_val_data_only(setup, tmp_path, capsys):
    """eval_only evaluates on val_data_path: the train folder was still required and encoded (a
    corpus of hours, for nothing), and a missing one (the default data/demo/train on a machine
    that only evaluates) was an error."""
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, tiny(True)),
                             codec_source=str(setup["codec"]))
    latents = tmp_path / "latents"
    log, evals = train_here(base_args(setup, tmp_path / "run", latents_dir=latents, init_from=model, eval_only=True,
                                      train_data_path=tmp_path / "missing"), capsys)
    assert list(evals) == [0] and evals[0]["source"] == str(model)
    assert [p.name.split("-")[0] for p in latents.iterdir()] == ["val"] and "encoding" in log
    assert "stage all: evaluating quantizer + lm + resynth" in log and ": training " not in log, log  # (it trains nothing)


def test_a_nan_on_one_rank_is_one_error_line_naming_that_rank_s_batch(setup, tmp_path):
    """A NaN loss on rank 1 alone (tests/poisoned_rank.py): DDP averaged it into every rank's
    gradients, so each rank named its own batch, and rank 0 (whose line was often the only one, as
    torchrun stopped rank 1 first) blamed files that were fine. Now one line, from rank 0, naming
    rank 1 and its batch's files."""
    args = base_args(setup, tmp_path / "run", stage="all", max_steps=4, save_interval=2, parallel="ddp")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "tests/poisoned_rank.py"] + [str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "POISON_RANK": "1",
                                           "POISON_PASS": "1"})
    assert out.returncode != 0
    errors = [line[line.index("error: "):] for line in out.stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss (nan) at step 0 on rank 1, on a batch "
                                                     "from "), out.stderr[-3000:]
    assert "[rank0]: Traceback" not in out.stderr and "[rank1]: Traceback" not in out.stderr  # (torchrun's own follows)


def test_validation_figures_do_not_depend_on_the_number_of_processes_or_the_batch(setup, tmp_path, capsys):
    """The validation crops' posterior noise came from one generator a rank, seeded with the rank,
    drawn crop after crop: eval_only of one model read val/lm_ce 10.09 on one process and 10.06 on
    two, so a run resumed on another number of GPUs ranked best.pt among figures measured
    otherwise. Each crop's noise is its own now: the same figures on 1 and 2 processes and with
    another batch size. (The one-process runs in this process, `train_here`: their subject is the
    figures, not the process; the two-process run under torchrun.)"""
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, tiny(True)),
                             codec_source=str(setup["codec"]))
    runs = [(1, 2), (2, 2), (1, 3)]  # (processes, batch size)

    def evaluate(n, b):
        args = base_args(setup, tmp_path / f"run-{n}-{b}", latents_dir=tmp_path / "latents", init_from=model,
                         eval_only=True, val_crops=5, batch_size=b, parallel="ddp")
        return (train(args, nproc=n) if n > 1 else train_here(args, capsys))[1][0]
    evals = [evaluate(n, b) for n, b in runs]
    for key in ("val/lm_ce", "val/resynth_nll", "val/loss", "val/positions"):
        assert evals[1][key] == pytest.approx(evals[0][key], rel=1e-6) and \
            evals[2][key] == pytest.approx(evals[0][key], rel=1e-6), (key, [e[key] for e in evals])


@pytest.mark.parametrize("duplex", [False, True], ids=["mono", "duplex"])
def test_overfits_a_fixed_batch(duplex):
    """LM cross-entropy and mixture NLL of one fixed batch (padding included) fall far."""
    torch.manual_seed(0)
    cfg = tiny(duplex)
    model = build(HertzDev, cfg)
    model.quantizer.requires_grad_(False)
    x = torch.randn(2, 12, 32 * cfg.channels)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 8:] = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(40):
        losses, stats = compute_losses(model.quantizer, model.lm, model.resynth, x, valid, duplex,
                                       ("lm_ce", "resynth_nll"))
        if step == 0:
            first = {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert stats["count"].item() == 11 + 7
    assert first["lm_ce"] > 9 and losses["lm_ce"].item() < 1.0
    assert losses["resynth_nll"].item() < first["resynth_nll"] - 40
    assert stats["lm_correct"].item() >= 0.9 * stats["count"].item() * cfg.channels


def error_here(args, capsys) -> str:
    """The trainer's run in this process (`fails_here`: failed, no traceback, one `error:` line, on a
    line of its own: progress bars redraw with \\r, which splits lines too); that line."""
    return next(line for line in fails_here(args, capsys).splitlines() if line.startswith("error: "))


def test_a_non_finite_loss_stops_with_an_error_and_no_non_finite_checkpoint(setup, capsys):
    from model.checkpoint import non_finite, read_weights
    run_dir = setup["root"] / "run-diverged"
    # the rate alone diverges (with weight decay, check_schedule refuses it before training)
    last = error_here(base_args(setup, run_dir, duplex=False, stage="all", learning_rate=1e30, weight_decay=0.0,
                                max_steps=6, save_interval=1, eval_interval=100, sample_seconds=0), capsys)
    assert re.fullmatch(r"error: non-finite (loss|gradient norm) \(\S+\) at step [1-5] on a batch from "
                        r"(mono|dialogue)/\S+\.wav.*lower the learning rate.*", last), last
    saved = sorted(run_dir.glob("*.pt")) + sorted(run_dir.glob("*.safetensors"))
    assert {"latest.pt", "latest.safetensors"} <= {p.name for p in saved}
    for path in saved:
        state = torch.load(path, weights_only=False) if path.suffix == ".pt" else read_weights(path)[0]
        assert non_finite(state) == [], path


def test_latents_of_a_codec_that_overflows_are_named_not_blamed_on_the_learning_rate(setup, tmp_path, capsys):
    """A codec whose log-variance overflows (finite latents whose samples exp(logvar / 2) * eps are
    inf in float32) or whose means are huge: the first step's loss was NaN and the error said "lower
    the learning rate, or check the data", at step 0, before any update. Now a fresh encoding skips
    such files, named; a folder encoded before that stops the run at the first crop that reads them,
    naming the folder, the file and the codec; and a NaN at step 0 says the learning rate is not at
    fault."""
    from model import load_codec

    def codec_with(name, part, value):  # the bias of the codec's mu (part 0) or logvar (part 1) set to `value`
        codec = load_codec(setup["codec"])
        with torch.no_grad():
            bias = codec.compressor.proj_in.bias
            bias[part * (len(bias) // 2):(part + 1) * (len(bias) // 2)] = value
        return save_codec(tmp_path / name, codec)

    common = dict(duplex=False, stage="lm", max_steps=2, sample_seconds=0)
    overflowing = codec_with("logvar.safetensors", 1, 400.0)
    log = fails_here(base_args(setup, tmp_path / "fresh", codec_checkpoint=overflowing,
                               latents_dir=tmp_path / "fresh-latents", **common), capsys)
    assert "encodes it to non-finite latents" in log and "lower the learning rate" not in log, log[-2000:]
    assert re.search(r"error: no file in \S+ gives latents: .*encoded to finite values \(\d+ skipped, named above\)", log)

    # a folder encoded before: its training latents' log-variance made 400 in place
    latents = tmp_path / "latents"
    train_here(base_args(setup, tmp_path / "encoded", latents_dir=latents, **common), capsys)
    folder = next(latents.glob("train-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        rows = np.memmap(folder / entry["shard"], dtype=np.float32, mode="r+").reshape(-1, 2, 32)
        rows[entry["offset"]:entry["offset"] + entry["length"], 1] = 400.0
        rows.flush()
    line = error_here(base_args(setup, tmp_path / "old", latents_dir=latents, **common), capsys)
    assert re.fullmatch(rf"error: latents folder {re.escape(str(folder))}: the latents of \S+\.wav \(\d+ to \d+, in "
                        r"shard_00000\.bin\) have a log-variance of 400, whose samples overflow float32: codec "
                        r"\w+ overflows on it; use another codec_checkpoint, .*; stopped before any step", line), line

    # finite latents too large for the model: not the learning rate's doing at step 0
    huge = codec_with("mu.safetensors", 0, 1e30)
    line = error_here(base_args(setup, tmp_path / "huge", codec_checkpoint=huge, latents_dir=tmp_path / "huge-latents",
                                **common), capsys)
    assert line.startswith("error: non-finite loss (nan) at step 0 on a batch from ") and line.endswith(
        "it is the run's first step, before any update, so not the learning rate's doing: check that batch's data "
        "(its audio, or the latents made of it) and the weights the run starts from"), line


def test_a_training_state_as_codec_checkpoint_names_the_export_beside_it(setup, tmp_path, capsys):
    from model.loading import load_codec, write_codec
    from model.training import Checkpoints
    codec = load_codec(setup["codec"])
    state = {"generator": codec.state_dict(), "opt_g": {}, "step": 1, "config": dataclasses.asdict(codec.config)}
    Checkpoints(tmp_path).save(1, state, metric=1.0, export=lambda tmp: write_codec(tmp, codec, {"step": 1}))
    last = error_here(base_args(setup, tmp_path / "run", codec_checkpoint=tmp_path / "best.pt"), capsys)
    assert last == (f"error: {tmp_path / 'best.pt'}: expected a codec checkpoint (.safetensors), found a codec "
                    f"training state; load {tmp_path / 'best.safetensors'} beside it (its weights, exported for loading)")


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_sigterm_to_the_process_group_saves_the_step_reached_and_the_run_resumes_from_it(setup, tmp_path, name,
                                                                                           status, capsys):
    """SIGTERM to the trainer's whole process group (as Slurm sends it: the DataLoader workers get
    it too) once it trains: it stops at the next step with its checkpoint saved, one line saying so
    and exit status 143, no traceback; the same command then resumes from that step. A Ctrl-C in
    the terminal (SIGINT to the group) the same, exit status 130: it was a KeyboardInterrupt
    traceback, and every step since the last save lost."""
    import signal
    import time
    run_dir = tmp_path / "run"
    args = base_args(setup, run_dir, duplex=False, stage="lm", max_steps=10_000, eval_interval=10_000,
                     save_interval=10_000, num_workers=2, sample_seconds=0)
    trainer = subprocess.Popen([sys.executable, "train_transformer.py"] + [str(a) for a in args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in trainer.stdout:  # the first log row is written after the first step
            if (run_dir / "metrics.jsonl").is_file() and '"train/total"' in (run_dir / "metrics.jsonl").read_text():
                break
        time.sleep(0.5)
        os.killpg(trainer.pid, signal.Signals[name])
        out = line + trainer.stdout.read()
        assert trainer.wait(timeout=120) == status, out[-3000:]
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    assert "Traceback" not in out and "Error" not in out, out[-3000:]
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert 0 < stopped < 10_000
    assert f"{name} received: stopped at step {stopped}, which latest.pt holds; run the same command" in out
    assert not any(line.startswith('{"eval"') for line in out.splitlines())  # no evaluation on the way out
    log, _ = train_here(base_args(setup, run_dir, duplex=False, stage="lm", max_steps=10_000, eval_interval=10_000,
                                  save_interval=10_000, stop_step=stopped + 1, sample_seconds=0), capsys)
    assert f"training from step {stopped} to {stopped + 1}" in log
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == stopped + 1


def test_a_sigterm_to_torchrun_stops_every_rank_at_once_saved_not_at_the_next_log_step(setup, tmp_path):
    """Under torchrun the ranks agreed on a signal at log steps only, while torchrun forwards it to
    the workers and kills them 30 s later: a run whose log rows come minutes apart (hertz_dev logs
    every 50 steps of seconds each) trained on, was killed, and lost every step since its last save,
    with no word. Now every rank stops one step after it, at the same step, saved."""
    import signal
    import time
    run_dir = tmp_path / "run"
    args = base_args(setup, run_dir, duplex=False, stage="lm", max_steps=100_000, eval_interval=100_000,
                     save_interval=2, log_interval=100_000, sample_seconds=0, parallel="ddp")
    launcher = launch("train_transformer.py", args)
    try:
        deadline = time.time() + 240
        while not (run_dir / "step_00000002.pt").exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert (run_dir / "step_00000002.pt").exists(), launcher.stdout.read()[-3000:]
        sent = time.time()
        launcher.send_signal(signal.SIGTERM)  # to torchrun alone: it forwards it to the workers
        out = launcher.communicate(timeout=120)[0]
        took = time.time() - sent
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    stopped = torch.load(run_dir / "latest.pt", weights_only=False)["step"]
    assert f"SIGTERM received: stopped at step {stopped}, which latest.pt holds; run the same command" in out, out[-3000:]
    assert stopped >= 2 and took < 25, (stopped, took)  # stopped and saved before torchrun's 30 s kill


def test_a_full_run_resumes_whatever_lora_values_its_checkpoint_holds(setup, tmp_path, capsys):
    """LoRA's values (lora_rank, lora_alpha, lora_targets, base_quantize) are resume fields, as
    they shape a LoRA run's adapters; a full run's checkpoint holding others than today's
    defaults (saved when the defaults differed, or by a config that set them) was refused,
    though they do nothing there. Resuming compares them only when finetune=lora."""
    run_dir = tmp_path / "run"
    train_here(base_args(setup, run_dir, duplex=False, stage="lm", max_steps=2, stop_step=1, sample_seconds=0), capsys)
    state = torch.load(run_dir / "latest.pt", weights_only=False)
    state["config"].update(lora_rank=16, lora_alpha=32.0, lora_targets="attention", base_quantize="int8")
    with open(run_dir / "latest.pt", "wb") as f:  # (a hard link of step_00000001.pt: both change)
        torch.save(state, f)
    log, _ = train_here(base_args(setup, run_dir, duplex=False, stage="lm", max_steps=2, sample_seconds=0), capsys)
    assert "training from step 1 to 2" in log
    assert torch.load(run_dir / "latest.pt", weights_only=False)["step"] == 2
    log = fails_here(base_args(setup, run_dir, duplex=False, stage="resynthesizer", max_steps=3, sample_seconds=0),
                     capsys)
    assert "contradicts the checkpoint" in log and "stage" in log and "lora" not in log  # what matters still counts


def test_a_run_resumed_on_another_validation_ranks_best_pt_afresh(setup, tmp_path, capsys):
    """The same run resumed with other validation crops: its val/loss is measured on other data,
    so best.pt is not held to the old value (it was, and stayed at an old step whenever the new
    crops scored worse); the run says so, and the next evaluated checkpoint becomes best.pt."""
    run_dir = tmp_path / "run"
    common = dict(duplex=False, stage="lm", max_steps=4, eval_interval=1, save_interval=1, sample_seconds=0)
    train_here(base_args(setup, run_dir, stop_step=1, val_crops=4, **common), capsys)
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["best_step"] == 1
    # the old best value made unbeatable: on the same validation nothing would replace it
    (run_dir / "checkpoints.json").write_text(json.dumps({**info, "best_metric": -1e9}))
    log, evals = train_here(base_args(setup, run_dir, stop_step=2, val_crops=1, **common), capsys)
    assert "the validation (its data, crops or loss settings) changed since best.pt (step 1)" in log
    info = json.loads((run_dir / "checkpoints.json").read_text())
    assert info["best_step"] == 2 and info["best_metric"] == pytest.approx(evals[2]["val/loss"], abs=1e-4)
    log, _ = train_here(base_args(setup, run_dir, stop_step=3, val_crops=1, **common), capsys)
    assert "changed since best.pt" not in log
