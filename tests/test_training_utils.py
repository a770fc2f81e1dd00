"""The shared training toolkit: LR schedule, checkpoint rotation, resume checks, RNG state, logging."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from config.codec_config import PRESETS
from model.training import (Checkpoints, ConfigMismatch, Logger, check_resumable, cosine_lr, rng_state,
                            set_rng_state)


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
    saved = dataclasses.asdict(dataclasses.replace(cfg, encode_channels=8, strides=(2, 2, 4, 5, 5, 5)))
    saved["strides"] = list(saved["strides"])
    with pytest.raises(ConfigMismatch, match="encode_channels: checkpoint has 8"):
        check_resumable(saved, cfg, ["encode_channels", "strides"])
    check_resumable(saved, cfg, ["strides", "kernel_size"])


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
