"""train_transformer.py finetune=lora end to end (CPU, tiny; the runs compared with, DDP and the
hub's in real subprocesses of the trainer, the others in this process, `train_here`): only
the adapters learn, the base stays bit-identical, adapter files are exported, exact resume, a
contradicting base refused, two-process gloo DDP, init_from=official through the loopback hub,
an int8 base (once model/quant.py is merged) and the one-line config errors."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from config.transformer_config import PRESETS
from model import HertzDev, build, hub, load_hertz_dev
from model.checkpoint import read_weights
from model.loading import save_transformer
from model.lora import base_fingerprint, read_adapter

from test_train_transformer import (REPO, base_args, fails_here, train, train_from_official_hub, train_here,
                                    train_rows)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # `setup`: conftest.py
LORA = {"finetune": "lora", "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def base(setup):
    """A tiny duplex base checkpoint (seeded random weights) recording the test codec."""
    torch.manual_seed(1)
    return save_transformer(setup["root"] / "base.safetensors", build(HertzDev, PRESETS["tiny"]),
                            codec_source=str(setup["codec"]))


def lora_run(setup, base, name="run-lora", **overrides):
    key = ("lora", name)
    if key not in setup["runs"]:
        run_dir = setup["root"] / name
        log, evals = train(base_args(setup, run_dir, init_from=base, **{**LORA, **overrides}))
        setup["runs"][key] = (run_dir, log, evals)
    return setup["runs"][key]


def test_lora_trains_only_the_adapters_and_exports_them(setup, base, capsys):
    run_dir, log, evals = lora_run(setup, base)
    assert "adapter parameters (rank 4, both) on the frozen base" in log
    names = {p.name for p in run_dir.iterdir()}
    assert {"latest.adapter.safetensors", "best.adapter.safetensors", "latest.pt", "best.pt"} <= names
    assert not {"latest.safetensors", "best.safetensors"} & names  # no copy of the base per save
    # the training state holds the adapters (and their optimizer state) and the base's fingerprint only
    state = torch.load(run_dir / "latest.pt", weights_only=False)
    assert state["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in state["model"])
    assert {k.split(".")[0] for k in state["model"]} == {"lm", "resynth"}
    assert state["base_fingerprint"] == base_fingerprint(base) and state["step"] == 2
    config, extra = read_adapter(run_dir / "latest.adapter.safetensors")
    assert (config.rank, config.alpha, config.parts) == (4, 8.0, ("lm", "resynth")) and extra["step"] == 2
    # B started at zero: trained; every base weight of the adapted model is the base file's, bit for bit
    model = load_hertz_dev(base, adapter=run_dir / "latest.adapter.safetensors", codec=None)
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if hasattr(m, "lora_B"))
    stored, _ = read_weights(base)
    adapted = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert adapted.keys() == stored.keys() and all(torch.equal(adapted[k], stored[k]) for k in stored)
    # what the run evaluated at its end is what the exported adapter on the base computes
    _, again = train_here(base_args(setup, run_dir, init_from=base, eval_only=True, **LORA), capsys)
    assert {k: round(v, 5) for k, v in again[2].items() if k.startswith("val/")} == \
        {k: v for k, v in evals[2].items() if k.startswith("val/")}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_resume_continues_exactly(setup, base, dropout, capsys):
    """Stopped after one step and resumed: the same losses and final validation as in one go (at
    the default dropout, 0, the run in one go is `lora_run`'s default one, which other tests share)."""
    default = dropout == PRESETS["tiny"].lora_dropout
    run_dir, _, evals = lora_run(setup, base) if default else \
        lora_run(setup, base, f"run-lora-{dropout}", lora_dropout=dropout)
    resumed = setup["root"] / f"run-lora-resumed-{dropout}"
    log, first = train_here(base_args(setup, resumed, init_from=base, max_minutes=1e-9, lora_dropout=dropout, **LORA),
                            capsys)
    assert "reached at step 1" in log and sorted(first) == [0, 1]
    log, second = train_here(base_args(setup, resumed, init_from=base, lora_dropout=dropout, **LORA), capsys)
    assert f"{resumed / 'latest.pt'} (step 1)" in log and sorted(second) == [2]
    assert train_rows(resumed) == train_rows(run_dir)
    assert second[2] == evals[2]


def test_lora_resume_on_another_base_or_rank_is_refused(setup, base, tmp_path, capsys):
    run_dir, _, _ = lora_run(setup, base)
    torch.manual_seed(2)
    other = save_transformer(tmp_path / "other.safetensors", build(HertzDev, PRESETS["tiny"]),
                             codec_source=str(setup["codec"]))
    log = fails_here(base_args(setup, run_dir, init_from=other, max_steps=3, **LORA), capsys)
    assert f"holds adapters of base {base}" in log and f"init_from is {other}" in log
    log = fails_here(base_args(setup, run_dir, init_from=base, max_steps=3, **{**LORA, "lora_rank": 8}), capsys)
    assert "contradicts the checkpoint" in log and "lora_rank" in log


def test_lora_ddp_two_processes(setup, base):
    """Two gloo processes, DDP over the adapted LM (stage=lm) with gradient accumulation."""
    run_dir = setup["root"] / "run-lora-ddp"
    log, evals = train(base_args(setup, run_dir, init_from=base, stage="lm", parallel="ddp", grad_accum_steps=2,
                                 **LORA), nproc=2)
    assert "2 x cpu (ddp)" in log and all(torch.isfinite(torch.tensor(v)) for v in evals[2].values())
    adapters = torch.load(run_dir / "latest.pt", weights_only=False)["model"]
    assert adapters and {k.split(".")[0] for k in adapters} == {"lm"}
    model = load_hertz_dev(base, adapter=run_dir / "latest.adapter.safetensors", codec=None)
    assert all(m.lora_B.abs().sum() > 0 for m in model.lm.modules() if hasattr(m, "lora_B"))
    assert not any(hasattr(m, "lora_B") for m in model.resynth.modules())


def test_lora_from_official_through_the_hub(setup, tmp_path, monkeypatch, capsys):
    """finetune=lora on init_from=official (parity-size official files from a loopback hub): the
    adapter records the official files' md5s as its base."""
    run_dir, _, md5s, log, evals = train_from_official_hub(setup, tmp_path, monkeypatch, capsys, **LORA)
    config, extra = read_adapter(run_dir / "latest.adapter.safetensors")
    assert config.parts == ("lm",) and extra["base_source"] == "duplex"
    assert extra["base_fingerprint"] == "official:" + ",".join(
        f"{n}={md5s[n][0]}" for n in (hub.QUANTIZER, *hub.VARIANTS["duplex"][:2]))
    assert evals[1]["val/lm_ce"] != evals[0]["val/lm_ce"]  # the adapters learned


def test_lora_on_an_int8_base_runs(setup, base, tmp_path, capsys):
    run_dir = tmp_path / "run-lora-int8"  # (in this process: nothing is compared with another run)
    log, evals = train_here(base_args(setup, run_dir, init_from=base, base_quantize="int8", **LORA), capsys)
    assert "in int8" in log and all(torch.isfinite(torch.tensor(v)) for v in evals[2].values())
    assert evals[2]["val/loss"] != evals[0]["val/loss"]
    assert (run_dir / "latest.adapter.safetensors").is_file()


def test_eval_quantize_of_a_lora_run_quantizes_the_base_under_its_adapters(setup, base, capsys):
    """eval_only=true eval_quantize=int8 on a LoRA run evaluated its adapted layers (every attention
    and SwiGLU projection) in float, the rest in int8, reported as int8: quantize_model skipped
    layers that carry adapters. The base is now quantized before it is adapted, as base_quantize
    does: the same metrics as base_quantize=int8 eval_quantize=int8."""
    run_dir, _, evals = lora_run(setup, base)
    log, quantized = train_here(base_args(setup, run_dir, init_from=base, eval_only=True, eval_quantize="int8", **LORA),
                                capsys)
    assert "in int8" in log
    _, both = train_here(base_args(setup, run_dir, init_from=base, eval_only=True, eval_quantize="int8",
                                   base_quantize="int8", **LORA), capsys)
    val = lambda rows: {k: v for k, v in rows[2].items() if k.startswith("val/")}  # noqa: E731
    assert val(quantized) == val(both) != {k: round(v, 5) for k, v in val(evals).items()}


def test_a_quantized_init_from_is_not_requantized_by_base_quantize(setup, tmp_path, capsys):
    """init_from an int4 checkpoint with base_quantize=int8 trained on the int4 base, logged as int8
    (its layers were skipped); now one error line, before any latent is encoded."""
    from model.quant import quantize_model
    arch = {"lm_dim": 128, "resynth_dim": 128, "resynth_ff_dim": 256}  # widths int4 takes
    int4 = save_transformer(tmp_path / "int4.safetensors",
                            quantize_model(build(HertzDev, dataclasses.replace(PRESETS["tiny"], **arch)), "int4"),
                            codec_source=str(setup["codec"]))
    args = base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents", init_from=int4, base_quantize="int8",
                     **LORA, **arch)
    log = fails_here(args, capsys)
    assert f"init_from={int4} holds int4 weights: base_quantize=int8 cannot requantize them" in log
    assert not (tmp_path / "latents").exists()


@pytest.mark.parametrize("mistake, message", [
    ({"finetune": "lora"}, "finetune=lora adapts a trained base: pass init_from=official"),
    ({"finetune": "lora", "init_from": "BASE", "stage": "quantizer"}, "the quantizer stays frozen"),
    ({"base_quantize": "int8"}, "pass finetune=lora too"),
    ({"finetune": "lora", "init_from": "BASE", "lora_rank": 0}, "lora_rank: expected a number >= 1, got 0"),
    # every output NaN at step 0 (1e300 / 4 is inf in float32), blamed on the learning rate or the data
    ({"finetune": "lora", "init_from": "BASE", "lora_rank": 4, "lora_alpha": 1e300},
     "error: lora_alpha / lora_rank = 1e+300 / 4 = 2.5e+299, the adapters' scale, is above 10000"),
    # finetune=lora forgotten: every weight of the stage trained (and exported whole), silently
    ({"init_from": "BASE", "lora_rank": 8, "lora_targets": "all"},
     "lora_rank=8, lora_targets='all' with finetune=full: LoRA settings, which a full fine-tune ignores"),
    ({"finetune": "lora", "init_from": "BASE", "eval_only": True, "base_quantize": "int8", "eval_quantize": "int4"},
     "base_quantize=int8 and eval_quantize=int4: the base is quantized once, before its adapters"),
], ids=["no-init-from", "quantizer-stage", "quantize-without-lora", "rank", "scale", "lora-fields-without-lora",
        "base-and-eval-quantize"])
def test_lora_config_errors_are_one_line(setup, base, tmp_path, mistake, message, capsys):
    args = base_args(setup, tmp_path / "run", latents_dir=tmp_path / "latents",
                     **{k: (base if v == "BASE" else v) for k, v in mistake.items()})
    assert message in fails_here(args, capsys)
    assert not (tmp_path / "latents").exists()  # found before any latent is encoded


def test_benchmark_lora_smoke():
    """benchmarks/transformer_train.py's CPU smoke run, full training (its default) beside LoRA: a
    line each, with a throughput and a FLOP count."""
    out = subprocess.run([sys.executable, "benchmarks/transformer_train.py", "--device", "cpu", "--preset", "tiny",
                          "--steps", "2", "--finetune", "full,lora", "--lora-rank", "4"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["finetune"] for r in rows] == ["full", "lora"]
    assert all(r["latents_per_s"] > 0 and r["gflop_per_latent"] > 0 for r in rows)
    assert 0 < rows[1]["trainable_m"] < 0.01 * sum(rows[1]["params_m"].values())  # LoRA: adapters only
    assert rows[0]["trainable_m"] > 0.9 * sum(rows[0]["params_m"].values())  # full: every weight


def test_lora_adapter_export_lost_to_a_kill_is_rebuilt(setup, base, tmp_path, capsys):
    """A kill between a state's rename and its export's: the next start rebuilds the adapter file
    from the training state, the same file as the one written with it."""
    import shutil
    run_dir, _, _ = lora_run(setup, base)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    from safetensors import safe_open
    from safetensors.torch import load_file

    def content(path):  # the header's order of keys varies from one write to the next
        with safe_open(str(path), "pt") as f:
            return f.metadata(), load_file(str(path))
    meta, tensors = content(copy / "latest.adapter.safetensors")
    (copy / "latest.adapter.safetensors").unlink()
    log, _ = train_here(base_args(setup, copy, init_from=base, **LORA), capsys)
    assert "rebuilt latest.adapter.safetensors from latest.pt (step 2; it held nothing)" in log
    meta2, tensors2 = content(copy / "latest.adapter.safetensors")
    assert meta2 == meta and tensors2.keys() == tensors.keys() and all(torch.equal(tensors2[k], v) for k, v in tensors.items())


def test_lora_under_torchrun_needs_ddp():
    """Every GPU of a LoRA run holds the whole frozen base: FSDP (hertz_dev's default) is refused."""
    from config import ConfigError
    from model import finetune
    cfg = dataclasses.replace(PRESETS["hertz_dev"], finetune="lora", init_from="official")
    finetune.check_config(cfg, 1)
    finetune.check_config(dataclasses.replace(cfg, parallel="ddp"), 2)
    with pytest.raises(ConfigError, match="pass parallel=ddp with torchrun"):
        finetune.check_config(cfg, 2)


@pytest.mark.parametrize("run, overrides, message", [
    # was: the adapters loaded as the full model, a strict load_state_dict traceback after encoding
    ("lora", {"finetune": "full", "init_from": None}, "finetune: the checkpoint has 'lora', this run has 'full'"),
    # was: "holds adapters of base None (None)"
    ("full", {}, "finetune: the checkpoint has 'full', this run has 'lora'"),
    # was: a copy_ shape traceback after the base loaded
    ("lora", {"lora_rank": 8}, "lora_rank: the checkpoint has 4, this run has 8"),
    # was: evaluated silently with the adapters scaled by 16 / 4 instead of 8 / 4
    ("lora", {"lora_alpha": 16.0}, "lora_alpha: the checkpoint has 8.0, this run has 16.0"),
    # was: a ConfigMismatch about tensor counts, after the base loaded
    ("lora", {"stage": "lm"}, "stage: the checkpoint has 'all', this run has 'lm'"),
], ids=["lora-as-full", "full-as-lora", "rank", "alpha", "stage"])
def test_eval_only_checks_what_the_state_holds(tmp_path, run, overrides, message):
    """eval_only reads latest.pt as adapters (finetune=lora) or full weights: a state of the other
    kind, or adapters of another rank, scale or stage, is refused from its config (read_state), before
    any weights load; the training settings (dropout, base_quantize) may differ."""
    import train_transformer
    from config import ConfigMismatch
    from model import finetune
    lora = dataclasses.replace(PRESETS["tiny"], init_from="official", checkpoint_dir=str(tmp_path),
                               **{k: v for k, v in LORA.items() if k != "finetune"}, finetune="lora")
    saved = lora if run == "lora" else dataclasses.replace(lora, finetune="full", init_from=None)
    torch.save({"model": {}, "optimizer": {}, "step": 2, "config": dataclasses.asdict(saved), "codec": "0",
                **finetune.base_of(lora)}, tmp_path / "latest.pt")
    same = dataclasses.replace(lora, eval_only=True, lora_dropout=0.1, base_quantize="int8")
    if run == "lora":
        assert train_transformer.read_state(tmp_path / "latest.pt", same, finetune.base_of(same))["step"] == 2
    cfg = dataclasses.replace(same, **overrides)
    with pytest.raises(ConfigMismatch, match="contradicts the checkpoint it would evaluate") as e:
        train_transformer.read_state(tmp_path / "latest.pt", cfg, finetune.base_of(cfg) if cfg.finetune == "lora" else {})
    assert message in str(e.value)
