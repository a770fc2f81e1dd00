"""The shared training toolkit: LR schedule, checkpoint rotation, resume checks, RNG state, logging."""
import dataclasses
import json
import os
import random
import re
import signal
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from config import fields_marked
from config.codec_config import PRESETS, CodecConfig
from config import ConfigError
from model.training import (Checkpoints, ConfigMismatch, Deadline, FiniteGuard, Logger, StepTimer, TrainingError,
                            WeightAverage,
                            autocast, before_step, check_architecture, check_finite_step, check_resumable, cosine_lr,
                            finished_message, loss_scaler, move_aside, rng_state, schedule_notes, set_rng_state, state_to_load, stop_message,
                            validation_key, window_peak_gb)


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


def test_a_deleted_best_pt_is_made_again_at_the_next_evaluated_save(tmp_path):
    """best.pt (and its export) deleted by hand while checkpoints.json keeps its value: the next
    evaluated step becomes best again; it never did, unless it beat the deleted one."""
    ck = Checkpoints(tmp_path, keep=1)
    ck.save(10, {"step": 10}, 1.0, export=lambda tmp: Path(tmp).write_text("10"))
    (tmp_path / "best.pt").unlink()
    (tmp_path / "best.safetensors").unlink()
    ck.save(20, {"step": 20}, None)  # not evaluated: nothing to rank
    assert ck.best is None
    ck.save(30, {"step": 30}, 2.0, export=lambda tmp: Path(tmp).write_text("30"))
    assert ck.load(ck.best)["step"] == 30 and (tmp_path / "best.safetensors").read_text() == "30"
    assert ck.best_metric() == 2.0


@pytest.mark.parametrize("record", ["[1]", '"text"', '{"best_metric": "x", "best_step": 10, "latest_step": 10}',
                                    '{"best_metric": 3.0, "best_step": "ten", "latest_step": [10]}'],
                         ids=["list", "string", "metric-text", "steps-not-ints"])
def test_a_checkpoints_json_of_other_types_does_not_stop_the_next_save(tmp_path, record):
    """checkpoints.json edited by hand (or by another tool) into JSON of other types: the next save
    stopped with a TypeError (a list indexed by name, "x" compared with the step's value), the step
    already renamed into place. Entries not of their type are left out; the save records anew."""
    ck = Checkpoints(tmp_path, keep=3)
    ck.save(10, {"step": 10}, 2.0)
    (tmp_path / "checkpoints.json").write_text(record)
    ck.save(20, {"step": 20}, 1.0)
    assert ck.load()["step"] == 20 and ck.load(ck.best)["step"] == 20 and ck.best_metric() == 1.0
    assert json.loads((tmp_path / "checkpoints.json").read_text())["latest_step"] == 20
    assert ck.unnamed_step() is None


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


def test_finite_guard_skips_a_non_finite_update_on_the_device_and_names_it_at_the_check():
    """Two fused AdamW (as the codec trainer): finite steps update the weights; a step whose loss
    or gradient norm is not finite leaves every weight, moment and step count as they were (the
    device skips it, no host check); the next steps update again, and the check names the first
    non-finite step, the value at fault and its batch's files, then forgets what it reported."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (a, b)]
    guard = FiniteGuard(*opts)
    x = torch.randn(8, 4)

    def step(n, scale=1.0):
        loss = b(a(x)).square().mean() * scale
        loss.backward()
        norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0) for m in (a, b)]
        guard.flag(n, {"loss": loss, "gradient norm": norms[0], "discriminator gradient norm": norms[1]},
                   [f"clip{n}.wav", f"clip{n}.wav"])
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def snapshot():
        return [p.detach().clone() for m in (a, b) for p in m.parameters()] + \
            [v.clone() for opt in opts for state in opt.state.values() for v in state.values()]

    step(0)
    guard.check()  # all finite: nothing to say
    before = snapshot()
    step(1, scale=float("inf"))
    assert all(torch.equal(u, v) for u, v in zip(snapshot(), before))  # skipped, moments and counts too
    step(2)
    assert not any(torch.equal(u, v) for u, v in zip(snapshot()[:4], before[:4]))  # the next step updates
    with pytest.raises(TrainingError, match=r"^non-finite loss \(inf\) at step 1 on a batch from clip1\.wav; "
                                            r"its update was skipped"):
        guard.check()
    guard.check()  # reported once
    with pytest.raises(ValueError, match="fused"):
        FiniteGuard(torch.optim.AdamW(a.parameters(), foreach=True))


def float16_steps(seed=0):
    """A Linear, its fused AdamW, a float16 loss scaler (a real GradScaler, on the CPU) and the
    FiniteGuard over them, and `step(n, grad_scale, loss_scale)`: one step as the trainers make it
    (scale, backward, unscale_, clip, flag, step, update), its loss times `loss_scale` and its
    gradients times `grad_scale`."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    scaler = loss_scaler(torch.device("cpu"), "float16")
    guard = FiniteGuard(opt, scaler=scaler)
    x = torch.randn(8, 4)

    def step(n, grad_scale=1.0, loss_scale=1.0):
        loss = lin(x).square().mean()
        scaler.scale(loss * grad_scale).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
        guard.flag(n, {"loss": loss * loss_scale}, [f"clip{n}.wav"], grad_norms={"gradient norm": norm})
        opt.step()
        opt.zero_grad(set_to_none=True)
        scaler.update()
    return lin, opt, scaler, guard, step


def test_finite_guard_skips_an_overflowing_float16_step_without_an_error():
    """Under a float16 loss scale a step whose gradients overflow (the scaler finds them inf) is
    skipped on the device (weights and moments unchanged), the check says nothing and the scale
    halves, while a non-finite loss is still an error; check_finite_step without a gradient norm
    checks the loss alone."""
    lin, opt, scaler, guard, step = float16_steps()
    step(0)
    before = [p.detach().clone() for p in lin.parameters()] + [v.clone() for v in opt.state[lin.weight].values()]
    step(1, grad_scale=float("inf"))  # the gradients overflow: skipped, silently
    after = [p.detach().clone() for p in lin.parameters()] + [v.clone() for v in opt.state[lin.weight].values()]
    assert all(torch.equal(u, v) for u, v in zip(after, before))
    guard.check()
    assert scaler.get_scale() == 2.0 ** 15
    step(2, loss_scale=float("nan"))
    with pytest.raises(TrainingError, match=r"^non-finite loss \(nan\) at step 2 on a batch from clip2\.wav"):
        guard.check()
    check_finite_step(3, torch.tensor(1.0), None)
    with pytest.raises(TrainingError, match=r"^non-finite loss \(inf\) at step 4"):
        check_finite_step(4, torch.tensor(float("inf")), None)


def test_finite_guard_stops_a_float16_run_that_never_updates():
    """Gradients the scaler finds finite whose norm overflows float32 (each ~1e30: their sum of
    squares is inf) were skipped as a float16 overflow, for ever, the scale never lowered: a run
    that never updated ended "done". Now that is the error float32 gives, naming the step; and
    gradients that overflow at every scale stop the run after FiniteGuard.MAX_SKIPPED skipped
    steps in a row (a clean step in between starts the count again)."""
    _, _, scaler, guard, step = float16_steps()
    step(0)
    step(1, grad_scale=1e30)
    with pytest.raises(TrainingError, match=r"^non-finite gradient norm \(inf\) at step 1 on a batch from clip1\.wav; "
                                            r"its update was skipped and training stopped"):
        guard.check()
    assert scaler.get_scale() == 2.0 ** 16  # (the gradients themselves were finite)

    _, _, scaler, guard, step = float16_steps()
    n = FiniteGuard.MAX_SKIPPED
    for i in range(n - 1):
        step(i, grad_scale=float("inf"))
    step(n - 1)  # a clean step: the count starts again
    guard.check()
    for i in range(n, 2 * n):
        step(i, grad_scale=float("inf"))
    with pytest.raises(TrainingError, match=rf"^non-finite gradient norm \(\S+\) at step {2 * n - 1} on a batch from "
                                            rf"clip{2 * n - 1}\.wav; the float16 gradients overflowed at {n} steps in "
                                            r"a row, each skipped while the loss scale fell to .*, and training stopped"):
        guard.check()


def test_step_timer_counts_each_step_from_the_last_ones_end():
    """Host time off CUDA: a step's duration runs from the previous step's end (what happens
    between two steps counts), and a pause (an evaluation) is not counted in the next step."""
    timer = StepTimer(torch.device("cpu"))
    timer.step_start()
    time.sleep(0.02)
    timer.step_end()
    time.sleep(0.03)  # between steps: the loader, say
    timer.step_start()
    timer.step_end()
    timer.pause()
    time.sleep(0.05)  # an evaluation
    timer.step_start()
    time.sleep(0.01)
    timer.step_end()
    first, second, third = timer.durations()
    assert 0.02 <= first < 0.03 and 0.03 <= second < 0.045 and 0.01 <= third < 0.03
    assert timer.durations() == []


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


def test_logger_online_without_a_network_logs_offline_at_once(tmp_path, monkeypatch, capsys):
    """wandb=online, logged in, with the W&B server out of reach: one note and an offline run,
    within seconds; wandb.init retried for 90 s and raised a CommError traceback."""
    wandb = pytest.importorskip("wandb")
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    for name in ("no_proxy", "NO_PROXY"):  # straight to the port, whatever proxy this machine sets
        monkeypatch.setenv(name, "*")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")  # without the check: fail in 20 s, not 90
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()  # settings are read from the environment once per wandb.setup
    began = time.time()
    log = Logger("online", "hertz-test", tmp_path / "run", PRESETS["tiny"])
    log.finish()
    assert f"wandb: cannot reach {url} (Connection refused), logging offline instead" in capsys.readouterr().out
    assert time.time() - began < 15 and list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    wandb.teardown()


def test_logger_disabled_only_writes_jsonl(tmp_path):
    log = Logger("disabled", "x", tmp_path, PRESETS["tiny"])
    log.log({"a": 1}, 1)
    log.finish()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1 and not (tmp_path / "wandb").exists()



def test_a_full_disk_under_metrics_jsonl_is_one_error_naming_it_and_leaves_whole_rows(tmp_path):
    """metrics.jsonl on an 8 KiB tmpfs (a real full disk; needs the right to mount): a row that
    did not fit was an OSError traceback from the buffered file's flush, and left part of the row
    for the next run's first row to join. Now a TrainingError naming the file (one `error:` line
    from the trainers), and the file holds whole rows only."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        log = Logger("disabled", "x", disk, PRESETS["tiny"])
        row = {f"loss/term_{k}": 1.0 / (k + 1) for k in range(40)}  # about 1.2 kB a row
        written = 0
        with pytest.raises(TrainingError, match=rf"^cannot write {re.escape(str(disk))}/metrics.jsonl: "
                                                "No space left on device$"):
            for step in range(100):
                log.log(row, step)
                written += 1
        log.finish()
        lines = (disk / "metrics.jsonl").read_text().splitlines(keepends=True)
        assert 0 < written == len(lines) and all(line.endswith("\n") and json.loads(line) for line in lines)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def schedule(deadline, start_step=0, max_steps=12, eval_interval=4, save_interval=6):
    """before_step over a segment from `start_step`, as the trainers' loops ask it; the steps
    where it stops, evaluates and saves."""
    stops, evals, saves = [], [], []
    for step in range(start_step, max_steps + 1):
        due = before_step(step, start_step, max_steps, eval_interval, save_interval, deadline)
        for happened, record in ((due.evaluate, evals), (due.save, saves), (due.stop, stops)):
            if happened:
                record.append(step)
        if due.stop:
            break
    return stops, evals, saves


def test_a_fresh_and_a_resumed_segment_evaluate_and_save_on_the_same_rule():
    never = Deadline(0)
    assert schedule(never) == ([12], [0, 4, 8, 12], [4, 6, 8, 12])
    # resumed from step 6: its start was saved (and evaluated if due) by the segment before
    assert schedule(never, start_step=6) == ([12], [8, 12], [8, 12])
    assert schedule(never, start_step=8) == ([12], [12], [12])
    # a finished run run again evaluates its weights once and writes nothing
    assert schedule(never, start_step=12) == ([12], [12], [])
    # an hour is never reached in this test
    assert schedule(Deadline(60)) == ([12], [0, 4, 8, 12], [4, 6, 8, 12])


def test_the_deadline_is_asked_at_every_step_but_never_at_a_segment_start():
    """A passed deadline stops the run at the step after the segment's start, whatever its
    log_interval (asked at log steps only, it was never asked where log_interval reached past the
    last step, and a run under a scheduler's time limit trained on past it)."""
    passed = Deadline(1e-9)
    time.sleep(0.01)
    assert passed.passed()
    # stops at the step after the segment's start: evaluates and saves there
    assert schedule(passed) == ([1], [0, 1], [1])
    assert schedule(passed, start_step=6) == ([7], [7], [7])
    due = before_step(6, 6, 12, 4, 6, passed)  # (the segment's start itself: at least one step is trained)
    assert not due.stop and not due.evaluate and not due.save
    assert not Deadline(0).passed() and not Deadline(60).passed()


def test_a_sigterm_in_the_loop_stops_at_the_next_step_saving_without_evaluating():
    """A real SIGTERM to this process inside `catching_signals`: the process lives on, the next
    step (not a log step) stops and saves without evaluating; the handler is put back after."""
    before = signal.getsignal(signal.SIGTERM)
    quiet = Deadline(0)
    with quiet.catching_signals():
        assert schedule(quiet, max_steps=3) == ([3], [0, 3], [3])  # nothing received: the usual schedule
    deadline = Deadline(0)
    with deadline.catching_signals():
        stops, evals, saves = [], [], []
        for step in range(0, 12):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            due = before_step(step, 0, 12, 4, 6, deadline)
            for happened, record in ((due.evaluate, evals), (due.save, saves), (due.stop, stops)):
                if happened:
                    record.append(step)
            if due.stop:
                break
    assert (stops, evals, saves) == ([5], [0, 4], [4, 5]) and deadline.stopped_by == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM received: stopped at step 5, which latest.pt holds" in stop_message(5, 12, 0, 0, "SIGTERM")
    # received before a resumed segment's first step: it stops there, with nothing to save
    deadline = Deadline(0)
    with deadline.catching_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert schedule(deadline, start_step=6) == ([6], [], [])
    # Ctrl-C (SIGINT) the same: it was a KeyboardInterrupt traceback mid-step, losing every step since the last
    # save; a second one is a KeyboardInterrupt again (run_script's one line)
    deadline = Deadline(0)
    with deadline.catching_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert schedule(deadline, max_steps=12) == ([0], [], []) and deadline.stopped_by == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "SIGINT received: stopped at step 5, which latest.pt holds" in stop_message(5, 12, 0, 0, "SIGINT")
    assert "(the script exits with 130)" in stop_message(5, 12, 0, 0, "SIGINT")


def test_a_data_loading_worker_killed_in_the_loop_stops_it_at_the_step_reached_saving():
    """A DataLoader worker killed while the loop trains (the out-of-memory killer's SIGKILL): torch's
    SIGCHLD handler raised its death wherever the main process was, mid-step, so nothing since the
    last checkpoint could be saved. Within `catching_signals` the death is noted; `Deadline.read`,
    reading the step's batches before the step, answers None; the loop stops at that step without
    evaluating and saves; `exit` is one error line saying where it stopped."""
    import multiprocessing
    from model.data import make_loader, stop_workers
    loader = make_loader(torch.utils.data.TensorDataset(torch.arange(400.0)), batch_size=2, shuffle=False,
                         num_workers=2, distributed=False)
    deadline = Deadline(0)
    with deadline.catching_signals():
        before = set(multiprocessing.active_children())
        batches = iter(loader)
        assert [b[0].tolist() for b in deadline.read(batches, 2)] == [[0.0, 1.0], [2.0, 3.0]]
        (victim, *_), = [[w for w in multiprocessing.active_children() if w not in before]]
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.5)  # (the SIGCHLD is handled meanwhile: nothing raised here)
        assert deadline.read(batches, 2) is None
        due = before_step(7, 4, 100, 4, 6, deadline)
        assert due.stop and due.save and not due.evaluate
    lost = f"a data-loading worker (pid {victim.pid}) was killed by signal Killed"
    assert deadline.lost_worker.startswith(lost) and "out-of-memory killer" in deadline.lost_worker
    assert stop_message(7, 100, 0, 0, None, deadline.lost_worker) is None  # (the error line says it)
    with pytest.raises(TrainingError) as raised:
        deadline.exit(7)
    assert str(raised.value).startswith(lost) and str(raised.value).endswith(
        "; stopped at step 7, which latest.pt holds: run the same command to resume")
    # stopped as the trainers stop them: left to the garbage collector (`raised` keeps this frame in
    # a reference cycle), the live worker did not stop when told and the iterator's shutdown waited
    # out its two 5-second joins at the teardown (10 s)
    stop_workers(batches)
    assert not any(w.is_alive() for w in multiprocessing.active_children() if w not in before)


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_status_130(tmp_path):
    """A Ctrl-C while a trainer loads or encodes (the encoding keeps what it has committed) was a
    KeyboardInterrupt traceback; run_script ends it with one line and exit status 130."""
    import subprocess
    import sys
    code = "from model.training import run_script\ndef main():\n    raise KeyboardInterrupt\nrun_script(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr == "interrupted (Ctrl-C): run the same command to resume\n", r.stderr


def test_only_the_evaluation_of_the_step_saved_ranks_it_for_best(tmp_path):
    never = Deadline(0)
    ck = Checkpoints(tmp_path)
    metrics = {}
    for step in range(0, 13):
        due = before_step(step, 0, 12, 4, 6, never)
        if due.evaluate:  # the validation loss falls to step 8, rises at 12
            metrics = {"val/loss": {0: 9.0, 4: 3.0, 8: 1.0, 12: 2.0}[step]}
        if due.save:
            ck.save(step, {"step": step}, due.best_metric(metrics, "val/loss"))
    assert ck.best_metric() == 1.0 and ck.load(ck.best)["step"] == 8
    # step 6 was saved between evaluations: it is not ranked with step 4's metric
    assert json.loads((tmp_path / "checkpoints.json").read_text())["best_step"] == 8
    assert before_step(6, 0, 12, 4, 6, never).best_metric({"val/loss": 0.5}, "val/loss") is None
    # a rank that did not evaluate has no metric to give
    assert before_step(8, 0, 12, 4, 6, never).best_metric({}, "val/loss") is None


def test_best_pt_is_ranked_only_among_metrics_measured_on_the_same_validation(tmp_path):
    """A run resumed on another validation (other files, crops or loss weights) compared its new
    values with best.pt's old one, measured on other data: a harder val set kept best.pt at an old
    step for good, an easier one made any step best. A metric measured on another validation is
    no bar now, and the folder says so; one measured on the same is ranked as before."""
    ck = Checkpoints(tmp_path)
    a, b = validation_key(val="a", crops=[(0, 0)]), validation_key(val="b", crops=[(0, 0)])
    assert a != b and a == validation_key(crops=[(0, 0)], val="a")
    ck.save(1, {"step": 1}, 1.0, validation=a)
    ck.save(2, {"step": 2}, 2.0, validation=a)  # worse on the same data: best stays at step 1
    assert ck.load(ck.best)["step"] == 1 and ck.ranked_elsewhere(a) is None
    assert "the validation (its data, crops or loss settings) changed since best.pt (step 1)" in ck.ranked_elsewhere(b)
    ck.save(3, {"step": 3}, None, validation=b)  # not evaluated: nothing to rank
    assert ck.load(ck.best)["step"] == 1
    ck.save(4, {"step": 4}, 5.0, validation=b)  # worse than 1.0, but on other data: the first value on it
    assert ck.load(ck.best)["step"] == 4 and ck.best_metric() == 5.0 and ck.ranked_elsewhere(b) is None
    ck.save(5, {"step": 5}, 6.0, validation=b)
    assert ck.load(ck.best)["step"] == 4


def test_a_partial_evaluation_is_comparable_only_with_a_best_pt_ranked_on_the_same_crops(tmp_path):
    """An evaluation that skipped crops (`train_codec.py`: files unreadable mid-run) is ranked for
    best.pt only against a best.pt ranked on the same crops: a best.pt whose record names no
    validation (written before records named it) was taken as comparable, so a partial figure
    could take best.pt from a full one."""
    full, partial = validation_key(val="a", crops=[(0, 0), (1, 0)]), validation_key(val="a", crops=[(0, 0)])
    assert Checkpoints(tmp_path / "none").comparable(partial)  # no best.pt yet: nothing to compare with
    ck = Checkpoints(tmp_path / "full")
    ck.save(1, {"step": 1}, 1.0, validation=full)
    assert ck.comparable(full) and not ck.comparable(partial)
    unnamed = Checkpoints(tmp_path / "unnamed")
    unnamed.save(1, {"step": 1}, 1.0)  # a record without its validation
    assert not unnamed.comparable(partial)
    unnamed.save(2, {"step": 2}, 0.5, validation=partial)
    assert unnamed.comparable(partial)


def test_move_aside_keeps_every_old_run_and_skips_a_folder_without_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}")
    assert move_aside(run) is None and run.is_dir()  # no latest.pt: not a run, left in place
    olds = []
    for i in range(3):  # three fresh starts within the same second get three names
        (run / "latest.pt").write_text(str(i))
        olds.append(move_aside(run))
        assert sorted(p.name for p in run.iterdir()) == sorted(o.name for o in olds)  # earlier old-* stay
    assert len(set(olds)) == 3 and all(o.parent == run and o.name.startswith("old-") for o in olds)
    assert [(o / "latest.pt").read_text() for o in olds] == ["0", "1", "2"]
    assert (olds[0] / "metrics.jsonl").is_file()  # the whole run moved
    assert move_aside(tmp_path / "missing") is None


def test_move_aside_leaves_the_run_folder_where_it_is(tmp_path):
    """resume=false renamed checkpoint_dir itself: a symlinked run folder (to another disk) had its
    symlink renamed and the fresh run landed beside it, on the wrong disk; a parent this user cannot
    write in (EACCES), a name near 255 bytes (ENAMETOOLONG: `.old-DATE` is 20 bytes more) or a mount
    point (EBUSY) were a traceback after the run's setup. Now the run moves into an old-DATE folder
    inside the folder, which stays where it is (the symlink too); a move that fails is one line."""
    import subprocess
    import sys
    from unprivileged import unprivileged
    disk, repo = tmp_path / "scratch" / "run", tmp_path / "repo"
    (disk / "samples").mkdir(parents=True)
    repo.mkdir()
    (repo / "codec").symlink_to(disk)
    for name in ("latest.pt", "step_00000001.pt", "samples/step_1.wav", ".run.lock"):
        (disk / name).write_text(name)
    old = move_aside(repo / "codec")
    assert (repo / "codec").is_symlink() and sorted(p.name for p in repo.iterdir()) == ["codec"]
    assert old.parent == disk and sorted(p.name for p in disk.iterdir()) == [".run.lock", old.name]
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == [
        "latest.pt", "samples", "samples/step_1.wav", "step_00000001.pt"]
    long = tmp_path / ("r" * 250)  # a legal name; with .old-DATE it was not
    long.mkdir()
    (long / "latest.pt").write_text("x")
    assert (move_aside(long) / "latest.pt").read_text() == "x"
    # a parent folder not writable (a user's own /scratch/$USER): moved as any other; the run folder
    # itself not writable: one line naming it (a trainer's hold finds that before its setup)
    locked = tmp_path / "locked"
    (locked / "run").mkdir(parents=True)
    (locked / "run" / "latest.pt").write_text("x")
    (tmp_path / "frozen").mkdir()
    (tmp_path / "frozen" / "latest.pt").write_text("y")
    code = ("import sys\nfrom model.training import TrainingError, move_aside\n"
            "for f in sys.argv[1:]:\n    try:\n        print(move_aside(f).name)\n"
            "    except TrainingError as e:\n        print(e)")
    locked.chmod(0o555)
    (tmp_path / "frozen").chmod(0o555)
    try:
        r = subprocess.run(unprivileged() + [sys.executable, "-c", code, str(locked / "run"), str(tmp_path / "frozen")],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
        (tmp_path / "frozen").chmod(0o755)
    assert r.returncode == 0, r.stderr[-2000:]
    moved, refused = r.stdout.splitlines()
    assert (locked / "run" / moved / "latest.pt").read_text() == "x"
    assert refused.startswith(f"cannot move the run in {tmp_path / 'frozen'} aside (resume=false) into old-")
    assert refused.endswith(": Permission denied; move its files out by hand, or start the fresh run in another "
                            "checkpoint_dir")
    assert (tmp_path / "frozen" / "latest.pt").read_text() == "y"


def test_state_to_load_picks_latest_for_resume_and_eval_only(tmp_path):
    ck = Checkpoints(tmp_path / "run")
    with pytest.raises(ConfigError, match="eval_only=true: nothing to evaluate in .*run .no latest.pt."):
        state_to_load(ck, True, True, "")
    assert state_to_load(ck, True, False, "") is None  # a fresh run
    assert state_to_load(ck, True, True, "x.safetensors") is None
    ck.save(1, {"step": 1})
    latest = tmp_path / "run" / "latest.pt"
    assert state_to_load(ck, True, False, "") == latest
    assert state_to_load(ck, True, False, "x.safetensors") == latest  # init_from only starts fresh runs
    assert state_to_load(ck, False, False, "") is None  # resume=false
    assert state_to_load(ck, False, True, "") == latest  # eval_only evaluates the latest checkpoint
    assert state_to_load(ck, True, True, "x.safetensors") is None  # ... or init_from
    # a LoRA run's state holds adapters for the init_from base: evaluated together
    assert state_to_load(ck, True, True, "official", adapters=True) == latest
    # without latest.pt there are no adapters to evaluate: it scored the bare base (fresh adapters add
    # nothing) and printed it as the adapters' figures; a folder mistyped, or holding only best.pt
    with pytest.raises(ConfigError) as e:
        state_to_load(Checkpoints(tmp_path / "none"), True, True, "official", adapters=True)
    assert str(e.value) == (f"eval_only=true finetune=lora: no adapters to evaluate in {tmp_path / 'none'} (no "
                            "latest.pt); to score the base alone, run eval_only without finetune=lora")
    (tmp_path / "best_only").mkdir()
    for name in ("best.pt", "best.adapter.safetensors"):
        (tmp_path / "best_only" / name).write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"\(no latest.pt; it holds best.adapter.safetensors, best.pt\)"):
        state_to_load(Checkpoints(tmp_path / "best_only"), True, True, "official", adapters=True)


def test_a_run_folder_whose_latest_pt_was_taken_away_is_neither_restarted_nor_mixed_into(tmp_path):
    """latest.pt deleted (or moved) by hand, its step files left: resuming started a fresh run from
    step 0 in the folder, whose saves the rotation then sorted in among the old run's steps (it
    deleted the old step_2 and kept old 4 and 6 beside the new 8), and resume=false did not move
    the folder aside. Now resuming is a ConfigError naming the steps and what to do, and
    resume=false moves the folder aside."""
    run = tmp_path / "run"
    ck = Checkpoints(run, keep=3)
    for step in (2, 4, 6):
        ck.save(step, {"step": step})
    (run / "latest.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^checkpoint_dir='{re.escape(str(run))}' holds step_00000006.pt, "
                                          r"step_00000004.pt, step_00000002.pt but no latest.pt: .* copy the step to "
                                          rf"resume from to latest.pt \(cp {re.escape(str(run))}/step_00000006.pt .*"
                                          r"resume=false"):
        state_to_load(ck, True, False, "")
    assert state_to_load(ck, False, False, "") is None  # resume=false starts afresh ...
    old = move_aside(run)  # ... in an empty folder
    assert list(run.iterdir()) == [old] and sorted(p.name for p in old.glob("step_*.pt")) == [
        "step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    assert state_to_load(Checkpoints(run), True, False, "") is None


def test_a_second_run_in_the_same_folder_at_once_is_refused(tmp_path):
    """Two runs in one checkpoint_dir at the same time (the same command in two terminals, a job
    requeued while the last still saves) both resumed latest.pt and wrote their steps in among each
    other's. The first to start holds the folder; another process is refused, naming it; the same
    process may take it again (a trainer's main called twice), and the next run once it ended."""
    import subprocess
    import sys
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from model.training import Checkpoints; "
                               f"Checkpoints({str(run)!r}).hold(); print('held', flush=True); time.sleep(60)"],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"^checkpoint_dir='{re.escape(str(run))}': another run is training in "
                                              r"it now \(it holds .run.lock\); wait for it to end, or use another"):
            Checkpoints(run).hold()
    finally:
        holder.kill()
        holder.wait()
    first, again = Checkpoints(run), Checkpoints(run)
    first.hold()
    again.hold()  # this process again
    first.release()
    again.release()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_user_error():
    from model.training import setup_distributed
    with pytest.raises(ConfigError, match="device=cuda but no GPU is visible; use device=cpu"):
        setup_distributed("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_device_mps_without_mps_is_a_user_error():
    """It was a traceback from the first `.to("mps")`, after the data had been read."""
    from model.training import setup_distributed
    with pytest.raises(ConfigError, match=r"device=mps but MPS \(Apple GPUs\) is not available here; use device=cpu"):
        setup_distributed("mps")


def _average_in_two_processes(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from model.parallel import average_gradients, broadcast_parameters
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights on each rank
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    broadcast_parameters(module)
    module(torch.full((5, 3), float(rank + 1))).sum().backward()  # different gradients on each rank
    local = [p.grad.clone() for p in module.parameters()]
    average_gradients(module)
    torch.save({"params": [p.detach() for p in module.parameters()], "local": local,
                "averaged": [p.grad for p in module.parameters()]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_broadcast_parameters_and_average_gradients_across_two_gloo_processes(tmp_path):
    """The codec trainer's discriminators outside DDP: rank 0's weights on both ranks, then each
    gradient the mean of the two ranks' gradients, on both."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_in_two_processes, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    first = [p.detach() for p in torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).parameters()]
    for a, b, c in zip(r0["params"], r1["params"], first):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert not all(torch.equal(l0, l1) for l0, l1 in zip(r0["local"], r1["local"]))
    for l0, l1, a0, a1 in zip(r0["local"], r1["local"], r0["averaged"], r1["averaged"]):
        torch.testing.assert_close(a0, (l0 + l1) / 2)
        assert torch.equal(a0, a1)


def test_window_peak_is_none_off_cuda():
    assert window_peak_gb(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_window_peak_covers_its_window_only():
    """Each call reports the peak since the one before: a large tensor freed within a window counts
    there and not in the next."""
    device = torch.device("cuda")
    window_peak_gb(device)
    big = torch.empty(int(2e9), dtype=torch.uint8, device=device)  # 2 GB
    del big
    assert window_peak_gb(device) >= 2.0
    assert window_peak_gb(device) < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finite_guard_and_step_timer_on_cuda():
    """On CUDA (the trainer's case): a non-finite step's fused AdamW update is skipped on the
    device and reported at the check; the step timer's durations are the device's, so a step whose
    kernels run long (a sleep kernel of 100M cycles, ~50 ms, queued by a host that returns at
    once) reads long. The first step is a warm-up: it holds CUDA's lazy initialisation (0.4 s on
    the H200), which the timer rightly counts, since the device waited for the host."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4, device=device)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    guard, timer = FiniteGuard(opt), StepTimer(device)
    x = torch.randn(8, 4, device=device)
    for n, scale in enumerate((1.0, 1.0, float("nan"), 1.0)):
        timer.step_start()
        if n == 2:
            torch.cuda._sleep(100_000_000)  # cycles: ~50 ms at 2 GHz
        loss = layer(x).square().mean() * scale
        loss.backward()
        before = [p.detach().clone() for p in layer.parameters()]
        guard.flag(n, {"loss": loss, "gradient norm": torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)})
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before)) == (n == 2)
        timer.step_end()
    with pytest.raises(TrainingError, match=r"^non-finite loss \(nan\) at step 2; its update was skipped"):
        guard.check()
    _, fast, slow, fast2 = timer.durations()
    assert slow > 0.005 and slow > 5 * max(fast, fast2)


def test_finished_message_says_what_is_left_to_train():
    """A run resumed at its last step (what `finished` tells the trainers to say and end on):
    nothing at max_steps but raising it; stopped by stop_step, a later stop_step."""
    assert finished_message(5, 8, 0, "run") is None and finished_message(3, 8, 4, "run") is None
    assert finished_message(8, 8, 0, "run").startswith(
        "the run in run is already finished at step 8 (max_steps=8); nothing to train. To train further, raise "
        "max_steps (e.g. max_steps=16")
    assert finished_message(12, 8, 0, "run").startswith("the run in run is already finished at step 12 (max_steps=8)")
    assert finished_message(4, 8, 4, "run") == ("the run in run already stopped at step 4 (stop_step=4); nothing to "
                                                "train: run again with a later stop_step (or 0) to continue to "
                                                "max_steps=8")


def test_more_workers_than_cores_and_a_preload_larger_than_memory_are_notes(monkeypatch):
    """num_workers above the cores, and preload_max_gb above the memory, were taken silently: each
    worker is a process of its own, and a corpus decoded up to a cap over the memory ran the machine
    out of it (per torchrun process: each decodes its own). One note each (both trainers); the cap
    is lowered to half the memory available to each process (validation and training each decode
    up to it), and a cap within it is kept."""
    from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
    from model.training import memory_available, preload_limit_gb, resource_notes
    cores = len(os.sched_getaffinity(0))
    cfg = dataclasses.replace(PRESETS["tiny"], num_workers=cores, preload_max_gb=0.001)
    assert resource_notes(cfg) == [] and preload_limit_gb(0.001) == 0.001
    notes = resource_notes(dataclasses.replace(cfg, num_workers=cores + 1, preload_max_gb=1e6))
    assert notes[0].startswith(f"num_workers={cores + 1} is more than the {cores} CPU cores here: each worker is a "
                               "process with its own memory")
    assert re.fullmatch(r"preload_max_gb=1e\+06 is more than half the [\d.]+ GB of memory available here \(the "
                        r"validation and the training corpus are each decoded up to it\): a corpus over [\d.]+ GB is "
                        r"streamed instead", notes[1])
    # the memory available, read once: it moves between two reads while other processes run
    available = memory_available()
    assert 0 < preload_limit_gb(1e6) and preload_limit_gb(1e6, available) == available / 2e9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's: two processes on this machine, a copy each
    assert preload_limit_gb(1e6, available) == available / 4e9 and preload_limit_gb(0.001, available) == 0.001
    notes = resource_notes(dataclasses.replace(cfg, num_workers=cores, preload_max_gb=1e6))
    assert "for each of 2 processes" in notes[-1] and len(notes) == (2 if cores > 1 else 1)
    assert resource_notes(dataclasses.replace(TRANSFORMER_PRESETS["tiny"], num_workers=0)) == []


# what a trainer reads of the memory, from a process of its own
MEMORY_SEEN = """
import dataclasses, json
from config.codec_config import PRESETS
from model.files import physical_memory
from model.training import memory_available, resource_notes
print(json.dumps([physical_memory(), memory_available(),
                  resource_notes(dataclasses.replace(PRESETS["tiny"], num_workers=0, preload_max_gb=4))]))
"""


def test_a_cgroup_s_memory_limit_is_the_memory_the_checks_count(memory_cgroup_of_2gb):
    """In a container limited to less than the machine (docker --memory, Slurm's --mem), the
    checks counted the machine's memory: preload_max_gb=4 was kept in a 2 GB cgroup, whose corpus
    the out-of-memory killer would end. A process in a real 2 GB memory cgroup now sees the
    cgroup's limit, and its memory available within it, and the trainer's note lowers the preload."""
    import subprocess
    import sys
    from model.training import memory_available
    if memory_available() < 9e9:
        pytest.skip(f"this machine's {memory_available() / 1e9:.1f} GB available do not take the preload asked for either")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    seen = lambda prefix: json.loads(subprocess.run([*prefix, sys.executable, "-c", MEMORY_SEEN], env=env, check=True,
                                                    capture_output=True, text=True, timeout=120).stdout)
    assert not any("preload_max_gb" in note for note in seen([])[2])  # outside the cgroup: taken as asked
    limit, available, notes = seen(memory_cgroup_of_2gb)
    assert limit <= 2e9
    assert 0 < available <= limit  # the limit less what the process (python, torch) already holds
    assert re.fullmatch(r"preload_max_gb=4 is more than half the ([\d.]+) GB of memory available here \(the "
                        r"validation and the training corpus are each decoded up to it\): a corpus over [\d.]+ GB is "
                        r"streamed instead", notes[-1])
    assert float(re.match(r".* half the ([\d.]+) GB", notes[-1])[1]) <= 2.0


def test_torch_s_warning_of_too_many_workers_is_quiet_only_where_the_note_says_it():
    """`worker_warning_said`: torch's own DataLoader warning of more workers than cores is left out
    where `resource_notes` says it (the trainers' `main`), and shown as before elsewhere and after."""
    from model.training import worker_warning_said
    cores = len(os.sched_getaffinity(0))
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=cores + 1)

    def warned():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", append=True)  # (after the filter under test)
            loader.check_worker_number_rationality()  # what torch calls as it makes each iterator
        return [str(w.message) for w in caught]
    with worker_warning_said(dataclasses.replace(PRESETS["tiny"], num_workers=cores + 1)):
        assert warned() == []
    assert warned()[0].startswith(f"This DataLoader will create {cores + 1} worker processes in total")
    with worker_warning_said(dataclasses.replace(PRESETS["tiny"], num_workers=cores)):  # no note, nothing hidden
        assert len(warned()) == 1


def test_a_learning_rate_of_zero_is_a_note():
    """learning_rate=0 (negative and non-finite rates are refused by the config: test_config) was
    taken without a word: a run whose weights never change. Meant in a run that re-exports its
    init_from, so a note; the codec's names the discriminators' rate, which still trains them."""
    from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
    assert schedule_notes(dataclasses.replace(TRANSFORMER_PRESETS["tiny"], learning_rate=0.0, min_lr=0.0)) == [
        "learning_rate=0: the weights are never changed; set learning_rate > 0 unless this is meant"]
    assert schedule_notes(dataclasses.replace(PRESETS["tiny"], learning_rate=0.0, min_lr=0.0, warmup_steps=40)) == [
        "learning_rate=0: the weights are never changed (the discriminators' are, at disc_learning_rate=0.001); set "
        "learning_rate > 0 unless this is meant"]


def test_a_warmup_as_long_as_the_run_is_a_note():
    """warmup_steps above max_steps was accepted silently: the rate never reached its peak nor
    decayed (cosine_lr has no division by zero or negative progress there, and a short trial run
    may mean it), so it is a note naming both fields and the rate the run ends at."""
    tiny = PRESETS["tiny"]  # learning_rate 1e-3, warmup 5 of 20 steps
    assert schedule_notes(tiny) == [] and schedule_notes(dataclasses.replace(tiny, warmup_steps=19)) == []
    assert schedule_notes(dataclasses.replace(tiny, warmup_steps=40)) == [
        "warmup_steps=40 >= max_steps=20: the learning rate rises for the whole run, to 0.0005 (50% of "
        "learning_rate=0.001) at its last step, and never decays; lower warmup_steps unless this is meant"]
    assert "to 0.001 (100% of learning_rate=0.001)" in schedule_notes(dataclasses.replace(tiny, warmup_steps=20))[0]
    for warmup in (0, 19, 20, 40):  # the rates the note describes: finite, never above the peak
        rates = [cosine_lr(s, 1e-3, 1e-4, warmup, 20) for s in range(21)]
        assert all(0 < r <= 1e-3 for r in rates)


def test_a_batch_whose_worker_is_killed_as_it_hands_it_over_is_that_workers_death():
    """A data-loading worker killed as it hands a batch over (its tensors' descriptors, through a
    connection to it), before it has finished exiting: torch's loader, finding it alive, raised the
    ConnectionResetError as it was, a traceback that lost the steps since the last save (a run
    under torchrun, CI). `Deadline.read` now takes a reset hand-over for the death of the worker
    found dead, as torch's SIGCHLD handler would have said it. Modelled here: the worker killed,
    its SIGCHLD held back, and the hand-over's reset raised by the batches read."""
    from torch.utils.data import DataLoader
    from model.training import Deadline
    loader = iter(DataLoader([torch.zeros(4)] * 64, num_workers=1))
    next(loader)  # (its worker started, its pid registered for torch's checks)
    worker = loader._workers[0].pid

    def reset_hand_over():
        raise ConnectionResetError(104, "Connection reset by peer")
        yield

    deadline = Deadline(0)
    with deadline.catching_signals():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            os.kill(worker, signal.SIGKILL)
            assert deadline.read(reset_hand_over(), 1) is None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    assert deadline.lost_worker.startswith(f"a data-loading worker (pid {worker}) was killed by signal Killed")
    assert deadline.interrupted()
    del loader


def test_a_data_loading_worker_killed_mid_run_is_one_error_line_and_the_step_reached_is_saved(setup, tmp_path,
                                                                                                capsys):
    """A DataLoader worker killed under a running trainer (the out-of-memory killer's SIGKILL: each
    worker holds the preloaded audio) was torch's RuntimeError traceback from wherever the main
    process was; run_script made it one error line naming the worker and what to change, but the
    steps since the last checkpoint were lost. Now the loop stops at the step reached, saved
    (`Deadline.read`), and the line says so; the same command resumes from it (its main in this
    process: `in_process.run_in_process`)."""
    import subprocess
    import sys
    import train_codec
    from in_process import run_in_process
    corpus, run = setup["root"] / "corpus", tmp_path / "run"
    cmd = [sys.executable, "train_codec.py", "--config", "tiny", f"train_data_path={corpus / 'train'}",
           f"val_data_path={corpus / 'val'}", f"checkpoint_dir={run}", "num_workers=1", "max_steps=100000",
           "log_interval=1", "eval_interval=100000", "save_interval=100000", "wandb=disabled",
           "val_crops=1", "num_audio_samples=0"]  # (evaluations no longer than the test needs)
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").is_file() or '"loss/total"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children  # the one worker (it loads the training batches)
        os.kill(int(children[0]), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    stopped = torch.load(run / "latest.pt", weights_only=False)["step"]
    assert stopped > 0
    assert re.search(rf"^error: a data-loading worker \(pid {children[0]}\) was killed by signal Killed \(most often "
                     r"the out-of-memory killer: lower num_workers or preload_max_gb\); stopped at step "
                     rf"{stopped}, which latest.pt holds: run the same command to resume$", err, re.M), err[-3000:]
    resumed = run_in_process("train_codec.py", train_codec.main, cmd[2:] + [f"stop_step={stopped + 1}"], capsys)
    assert resumed.returncode == 0 and f"training from step {stopped} to {stopped + 1}" in resumed.stdout + resumed.stderr



def test_metrics_jsonl_deleted_during_a_run_is_started_anew_and_the_plot_does_not_fail(tmp_path):
    """metrics.jsonl deleted (or the run folder tidied away) while the run went on: its rows went into
    the unlinked file, lost, and the run's end failed on the missing path (`error: [Errno 2] ...`,
    exit 1, after training had finished and saved). The rows to come go to a new file there."""
    from model.plots import plot_metrics
    log = Logger("disabled", "x", tmp_path / "run", PRESETS["tiny"])
    log.log({"loss/total": 1.0}, 1)
    (tmp_path / "run" / "metrics.jsonl").unlink()
    assert plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "m.png") is None
    log.log({"loss/total": 0.5}, 2)
    import shutil
    shutil.rmtree(tmp_path / "run")
    log.log({"loss/total": 0.25}, 3)
    log.finish()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/total"]) for r in rows] == [(3, 0.25)]


def test_a_damaged_byte_in_metrics_jsonl_leaves_its_line_out_of_the_curves(tmp_path):
    """One byte of metrics.jsonl that is not UTF-8 (a damaged disk block, an editor's encoding): the
    end of a saved run drew the curves with a strict decoder, and its UnicodeDecodeError (which
    `write_samples` does not catch: a ValueError) ended the run with a traceback after its last save.
    The damaged line is left out; the others are drawn."""
    from model.plots import plot_metrics, read_metrics
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss/total": 1.0 / s}).encode() for s in (1, 2, 3)]
    metrics.write_bytes(rows[0] + b"\n" + rows[1].replace(b"total", b"tot\xffal") + b"\n" + rows[2] + b"\n[1, 2]\n")
    steps, values = read_metrics(metrics)["loss/total"]
    assert steps.tolist() == [1, 3] and values.tolist() == [1.0, 1.0 / 3]
    assert plot_metrics(metrics, tmp_path / "curves.png") == str(tmp_path / "curves.png")


def test_the_working_folder_is_not_moved_aside(tmp_path, monkeypatch):
    """`checkpoint_dir=. resume=false` over a run: a ValueError traceback ("PosixPath('.') has an
    empty name"); renamed by its absolute path, the new run's relative paths would have followed it
    to its new name. Now a TrainingError saying so, and nothing moved."""
    from model.training import TrainingError
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "latest.pt").write_bytes(b"state")
    for cwd in (run, run / "sub"):
        monkeypatch.chdir(cwd)
        with pytest.raises(TrainingError, match=re.escape(f"cannot move the run in {run} aside (resume=false): it is "
                                                          "the working folder, or holds it")):
            move_aside("." if cwd == run else "..")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (run / "latest.pt").is_file()
    monkeypatch.chdir(tmp_path)
    assert move_aside("run").name.startswith("old-")  # from outside: moved as before


def test_a_folder_named_like_a_step_is_not_taken_for_one(tmp_path):
    """A folder named step_00000099.pt in a run folder (made by hand): the run's recovery and the
    pruning of old states took it for the newest state, an IsADirectoryError traceback."""
    (tmp_path / "run" / "step_00000099.pt").mkdir(parents=True)
    folder = Checkpoints(tmp_path / "run", keep=1)
    assert folder.recover(lambda state, path: None) == []
    folder.save(1, {"step": 1})
    folder.save(2, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*.pt")) == ["step_00000002.pt", "step_00000099.pt"]
    assert (tmp_path / "run" / "step_00000099.pt").is_dir()


def test_a_weight_average_follows_its_recurrence_and_swaps_in_place():
    """WeightAverage: after the update that made step s, avg = d * avg + (1 - d) * w with
    d = min(decay, (1 + s) / (10 + s)); `averaged()` puts it into the module's own tensors (a CUDA
    graph holds their addresses) and the training weights back bit for bit, even when the body raises."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 2)))
    average = WeightAverage(module, decay=0.9)
    expected = {k: p.detach().clone() for k, p in module.named_parameters()}
    for step in range(1, 41):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = {k: d * expected[k] + (1 - d) * p.detach() for k, p in module.named_parameters()}
    assert set(average.state_dict()) == set(expected)  # the state dict's names, weight norm's included
    for k, v in average.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    weights = {k: p.detach().clone() for k, p in module.named_parameters()}
    addresses = [p.data_ptr() for p in module.parameters()]
    x = torch.randn(5, 3)
    with average.averaged():
        assert [p.data_ptr() for p in module.parameters()] == addresses
        assert all(torch.equal(p, average.state_dict()[k]) for k, p in module.named_parameters())
        averaged_output = module(x)
    assert not torch.equal(averaged_output, module(x))
    with pytest.raises(KeyError), average.averaged():
        raise KeyError("an evaluation that fails")
    assert all(torch.equal(p, weights[k]) for k, p in module.named_parameters())
    # a saved average loads back; one of another model is refused by name
    other = WeightAverage(module, decay=0.9)
    other.load_state_dict(average.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in average.state_dict().items())
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        other.load_state_dict({k: v for k, v in average.state_dict().items() if k != "0.bias"})
