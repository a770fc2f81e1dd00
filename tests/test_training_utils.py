"""The shared training toolkit: LR schedule, checkpoint rotation, resume checks, RNG state, logging."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from config import fields_marked
from config.codec_config import PRESETS, CodecConfig
from model.training import (Checkpoints, ConfigMismatch, Logger, autocast, check_architecture, check_resumable,
                            cosine_lr, rng_state, set_rng_state)


def test_cosine_lr_warms_up_then_decays_to_min():
    lrs = [cosine_lr(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))
    assert lrs[60] == pytest.approx(0.55) and lrs[115] == 0.1


def test_checkpoints_keep_last_n_latest_and_best(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    for step, metric in [(10, 3.0), (20, 1.0), (30, 2.0), (40, 5.0)]:
        ck.save(step, {"step": step}, metric)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000030.pt", "step_00000040.pt"]
    assert ck.load()["step"] == 40
    assert ck.load(ck.best)["step"] == 20  # rotated away as a step file, kept as best
    assert ck.best_metric() == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_check_names_each_difference():
    cfg = PRESETS["tiny"]
    saved = dataclasses.asdict(dataclasses.replace(cfg, encode_channels=8, strides=(2, 4, 250), seed=1))
    saved["strides"] = list(saved["strides"])
    with pytest.raises(ConfigMismatch) as e:
        check_resumable(saved, cfg, fields_marked(CodecConfig, "arch", "resume"))
    lines = str(e.value).splitlines()
    assert lines[0] == "the config contradicts the checkpoint it would resume from:"
    assert lines[1:4] == ["  encode_channels: the checkpoint has 8, this run has 4",
                          f"  strides: the checkpoint has (2, 4, 250), this run has {cfg.strides!r}",
                          "  seed: the checkpoint has 1, this run has 1337"]
    assert "resume=false" in lines[4] and len(lines) == 5
    check_resumable(saved, dataclasses.replace(cfg, encode_channels=8, strides=(2, 4, 250)),
                    fields_marked(CodecConfig, "arch"))


def test_init_from_check_compares_the_architecture_only():
    cfg = PRESETS["tiny"]
    saved = dataclasses.asdict(dataclasses.replace(cfg, latent_dim=16, batch_size=1, mpd_channels=(1,) * 5))
    with pytest.raises(ConfigMismatch) as e:
        check_architecture(saved, cfg, "x.safetensors")
    assert str(e.value).splitlines()[:2] == ["init_from=x.safetensors has another architecture:",
                                             "  latent_dim: the checkpoint has 16, this run has 32"]
    assert len(str(e.value).splitlines()) == 3
    check_architecture(saved, dataclasses.replace(cfg, latent_dim=16), "x.safetensors")


def test_autocast_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="bf16"):
        autocast(torch.device("cpu"), "bf16")


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_logger_offline_writes_a_wandb_run_and_jsonl(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    log = Logger("online", "hertz-test", tmp_path / "run", PRESETS["tiny"])
    assert "not logged in, logging offline" in capsys.readouterr().out
    log.log({"loss/mel": 1.5, "lr": torch.tensor(0.1)}, step=3)
    log.finish()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["loss/mel"] == 1.5
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_logger_disabled_only_writes_jsonl(tmp_path):
    log = Logger("disabled", "x", tmp_path, PRESETS["tiny"])
    log.log({"a": 1}, 1)
    log.finish()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1 and not (tmp_path / "wandb").exists()
