"""Small pieces shared by train_codec.py and train_transformer.py; the loops stay in the scripts.

- `setup_distributed`: one code path for a single process and `torchrun` (NCCL on GPUs, gloo on CPU).
- `cosine_lr`: linear warmup then cosine decay to `min_lr`.
- `Checkpoints`: atomic training checkpoints in a folder: `step_XXXXXXXX.pt` (the last N kept),
  `latest.pt` and `best.pt` (hard links, so no extra space), plus our `.safetensors` model
  exports beside them for the loading API, saved together with the state; never non-finite;
  best.pt ranked among metrics measured on the same validation only (`validation_key`).
- `check_finite_step`: a non-finite loss or gradient stops training with a TrainingError;
  `FiniteGuard` the same without a host sync per step (fused optimizers), `StepTimer` the step
  times without one.
- `WeightAverage`: an exponential moving average of a model's weights, swapped in place for an
  evaluation or an export.
- `rng_state` / `set_rng_state`: exact resume of python, numpy and torch generators.
- `state_to_load` / `move_aside`: where a run's weights come from (`latest.pt` when resuming or
  evaluating it), and a run with `resume=false` moving the previous run into an `old-DATE` folder in its folder.
- `Deadline` / `last_step` / `before_step`: the loop's schedule, the same in both trainers: when it
  stops (at `max_steps` or an earlier `stop_step`, at the first step after `max_minutes` have
  passed, or after a SIGTERM or Ctrl-C, saving without evaluating), evaluates and saves, and which value
  ranks a checkpoint for `best.pt`; `finished`: a run resumed at its last step says so and ends
  (nothing re-evaluated or re-saved).
- `check_folders` / `check_data_paths` / `check_schedule`: config mistakes both trainers find
  before anything slow (a file where a run folder goes, a missing data folder or bad manifest,
  `min_lr` above `learning_rate`); `schedule_notes`: what is allowed but may not be meant (a
  warmup as long as the run, a stop_step past max_steps); `resource_notes`: more loader workers
  than cores (`worker_warning_said` then keeps torch's own warning of it quiet), a preload larger
  than the memory (`preload_limit_gb`).
- `check_resumable` / `check_architecture`: a resumed or init_from config that contradicts the
  checkpoint's is a `ConfigMismatch` naming each field (`config.config_diff`).
- `Logger`: Weights & Biases (online, offline fallback, disabled) plus a local `metrics.jsonl`.
- `run_script`: a script's user errors end it with one `error: ...` line instead of a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import random
import re
import signal
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError, ConfigMismatch, OneLine, check_compatible, fields_marked, printable  # noqa: F401 (ConfigMismatch: re-exported)
# (re-exported: the scripts' interrupt handling lives in config, which imports no torch)
from config import Terminated, interrupted_exit, sigterm_as_interrupt  # noqa: F401

from .audio import AudioError, broken_link_above
from .checkpoint import (TEMP_SUFFIX, CheckpointError, atomic_write, listed, non_finite,
                         refuse_non_finite, torch_save, written_temp)
from .checkpoint import _header as header
from .hub import WeightsError
from .data import folder_problem
from .files import cgroup_memory, json_value, os_reason, physical_memory, try_writing_in
from .manifest import ManifestError, is_manifest, read_manifest


# --- the error exit ---------------------------------------------------------------------------

def run_script(main: Callable[[], Any]) -> None:
    """Run a script's `main`. A user's mistake (ConfigError, ConfigMismatch, FileNotFoundError:
    a bad preset, key, value or path, a config that contradicts its checkpoint; AudioError,
    CheckpointError: an unusable file; WeightsError: official weights missing offline, corrupt or
    not downloadable) or a run that cannot go on (TrainingError: a non-finite loss) ends the
    process with one `error: ...` line on stderr, on a line of its own even under an open progress
    bar, and exit code 1; a Ctrl-C that reaches it (outside the training loop, which stops and
    saves on the first: `Deadline.catching_signals`) with one `interrupted` line and exit code 130;
    a data-loading worker that died (killed by the out-of-memory killer, say) with one `error:` line
    naming it and what to change, exit code 1; any other exception is a bug and keeps its traceback.
    A SIGTERM while the latents are encoded is a Ctrl-C too (`sigterm_as_interrupt`: what the
    encoding has done is committed), said as `interrupted (SIGTERM)`, exit code 143."""
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(one_line_warnings, others=shown)
    try:
        main()
    except (ConfigError, ConfigMismatch, FileNotFoundError, AudioError, CheckpointError, WeightsError,
            TrainingError) as e:
        from tqdm import tqdm
        if not first_rank() and (getattr(e, "every_rank", False) or isinstance(e, (ConfigError, ConfigMismatch))):
            time.sleep(2)  # the same line on every rank: rank 0 says it, before torchrun stops it for this exit
            raise SystemExit(1) from None
        tqdm.write(f"error: {printable(own_message(e), newlines=True)}\n", file=sys.stderr, end="")  # one write: a worker's line cannot split it
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside the loop (loading, encoding: it keeps what it has done)
        interrupted_exit(e, ": run the same command to resume")
    except RuntimeError as e:
        message = worker_death_message(e)
        if message is None and peer_gone(e):  # another rank stopped: its own line says why, not 40 lines of gloo's
            message = ("another process of this run stopped, and this one with it: the other's error line (or "
                       "torchrun's report of its exit) says why")
        if message is None:
            raise
        from tqdm import tqdm
        tqdm.write(f"error: {message}\n", file=sys.stderr, end="")
        raise SystemExit(1) from None
    finally:
        warnings.showwarning = shown


def one_line_warnings(message, category, filename, lineno, file=None, line=None, others=None) -> None:
    """`warnings.showwarning` of the scripts: the warnings that name files (`OneLine`: a skipped
    audio file, say) as one `warning: ...` line each, on a line of its own under a progress bar;
    Python's format added a path into this code and its line of source, two lines a file (a screen
    of them for a folder of bad files). Other warnings as `others` (the showwarning before) shows them."""
    if not issubclass(category, OneLine):
        return (others or warnings.showwarning)(message, category, filename, lineno, file, line)
    from tqdm import tqdm
    tqdm.write(f"warning: {printable(str(message))}\n", file=file or sys.stderr, end="")


_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|NCCL communicator was aborted|"
                        r"remote process exited or there was a network error")


def peer_gone(error: RuntimeError) -> bool:
    """Whether `error` is a collective's failure because another process of a torch.distributed run
    went away (gloo's "Connection closed by peer", NCCL's aborted communicator) while this one waited
    in it."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and bool(_PEER_GONE.search(str(error)))


def first_rank() -> bool:
    """Whether this process is torchrun's rank 0, or not under torchrun (its RANK variable)."""
    return os.environ.get("RANK", "0") in ("", "0")


# torch's words when a DataLoader worker process is gone (its SIGCHLD handler raises them in the
# main process, wherever it is: mid-step, so the step cannot be saved)
_WORKER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\) "
                           r"(?:is killed by signal: ([^.]*)|exited unexpectedly(?: with exit code (-?\d+))?)")


def worker_death_message(error: RuntimeError, kept: str = "the steps since the last saved one are lost, run the "
                         "same command to resume from it") -> Optional[str]:
    """One line for a data-loading worker that died, instead of torch's traceback: killed (most
    often by the system's out-of-memory killer: each worker holds the dataset, its audio preloaded
    into memory), or exited without a word, then `kept` (what was saved); None for any other error."""
    found = _WORKER_DEATH.search(str(error))
    if found is None:
        return None
    pids, signal_name, code = found.group(1).strip(), found.group(2), found.group(3)
    if signal_name and "Bus error" in signal_name:
        how = "was killed by signal Bus error (out of shared memory: raise its limit, docker's --shm-size, or lower num_workers)"
    elif signal_name:
        how = (f"was killed by signal {signal_name.strip()} (most often the out-of-memory killer: lower num_workers or "
               "preload_max_gb)")
    else:
        how = f"exited unexpectedly{f' with exit code {code}' if code else ''} (num_workers=0 shows its error)"
    return f"a data-loading worker (pid {pids}) {how}" + (f"; {kept}" if kept else "")


def own_message(error: Exception) -> str:
    """The message of `error`; for one raised in a DataLoader worker, which torch raises again in
    the main process with the worker's traceback as its message, the original message (the last
    line of that traceback)."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)  # as given (OneLine)
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if text.startswith(f"Caught {kind.__name__} in DataLoader worker") and f"\n{name}: " in text:
        return text.rsplit(f"\n{name}: ", 1)[1].strip()
    return str(error)


# --- distributed ----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1) and pick this rank's
    device: `cuda` becomes `cuda:LOCAL_RANK`; `cuda` without a GPU is an error."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS (Apple GPUs) is not available here; use device=cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no GPU is visible; use device=cpu")
        if world == 1 and (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local, world, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            value /= dist.get_world_size()
    return value


# --- optimisation ---------------------------------------------------------------------------

def cosine_lr(step: int, learning_rate: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def autocast(device: torch.device, dtype: str, cache: bool = True):
    """bf16/fp16 autocast on CUDA; float32 elsewhere (CPU autocast is slower than it helps).
    `cache=False` for a pass captured in a CUDA graph (`GraphedPass`): autocast's cache of cast
    weights must not outlive a capture."""
    if dtype not in ("bfloat16", "float16", "float32"):  # never train in float32 by a typo
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype), cache_enabled=cache)
    return nullcontext()


def loss_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """A dynamic loss scale for float16 training (nanoGPT's rule: float16 gradients underflow
    without one; the scale halves at a step whose gradients overflow, which is skipped, and doubles
    after 2000 clean steps). bfloat16 and float32 get a disabled scaler, which passes everything
    through. On the CPU, where autocast is off and float16 computes in float32, the scale (a power
    of two) changes no value. Trainers scale each loss before `backward`, `unscale_` each optimizer
    before clipping, and call `update` after the optimizers' steps; its `state_dict` goes into
    the checkpoint."""
    return torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


# --- reproducibility ------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingError(OneLine, RuntimeError):
    """A run that cannot go on (a non-finite loss, a full disk under its log); the scripts print it
    as one `error:` line. `every_rank`: under torch.distributed every rank raises it alike (a
    collective decided it), so rank 0 alone prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def check_finite_step(step: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor],
                      files: Callable[[], Iterable[str]] = tuple, checkpoints: Optional[Checkpoints] = None,
                      resumed: Optional[tuple[Path, int]] = None) -> None:
    """Raise TrainingError naming `step` (and the batch's files, `files()`) if the step's loss or gradient
    norm is NaN or inf, before the optimizer applies it. Under torch.distributed every rank
    learns whether any rank failed, so all stop at the same step (one host sync per step).
    `grad_norm` None: the loss alone (under a float16 loss scale an overflowing gradient is the
    scaler's to skip, `loss_scaler`). `checkpoints`, `resumed`: the run's, for the advice
    (`non_finite_message`)."""
    named = {"loss": loss} if grad_norm is None else {"loss": loss, "gradient norm": grad_norm}
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()])
    finite = torch.isfinite(values).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 1:
        return
    raise TrainingError(non_finite_message(step, *at_fault(dict(zip(named, values.tolist())), files()),
                                           "stopped before updating the weights", checkpoints, resumed),
                        every_rank=dist.is_initialized())


class FiniteGuard:
    """`check_finite_step`'s rule without a host sync per step, for fused AdamW optimizers (they
    read `found_inf`, as under a GradScaler). `flag` decides on the device whether a step's values
    (losses, gradient norms) are all finite on every rank and hands that to the optimizers, so a
    non-finite step's updates are skipped on the device; `check` reads the decisions made since the
    last check (one sync) and raises the TrainingError naming the first non-finite step and its
    batch's files. The trainer checks at every log row and before it evaluates, saves or stops, so
    no checkpoint or metric follows an unchecked step, and each step's kernels queue behind the
    last step's without the device draining in between (a codec step at 2 s crops is short
    enough for that to show).

    `scaler`: the float16 loss scale (`loss_scaler`), whose overflowing steps are skipped without an
    error, `MAX_SKIPPED` in a row at most: a run that never updates stops. `checkpoints`, `resumed`:
    the run's, for the error's advice (`non_finite_message`)."""

    MAX_SKIPPED = 50  # float16 overflows in a row: the scale fell 2^50-fold, and the gradients still overflow

    def __init__(self, *optimizers: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler] = None,
                 checkpoints: Optional[Checkpoints] = None, resumed: Optional[tuple[Path, int]] = None):
        for optimizer in optimizers:
            if not optimizer.defaults.get("fused"):
                raise ValueError("FiniteGuard needs fused optimizers: the others ignore found_inf")
        self.optimizers = optimizers
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.pending: list[tuple[int, dict[str, torch.Tensor], torch.Tensor, Iterable[str]]] = []
        self.skipped = 0  # steps skipped in a row by the float16 scale, up to the last check
        self.checkpoints, self.resumed = checkpoints, resumed

    def flag(self, step: int, values: dict[str, torch.Tensor], files: Iterable[str] = (),
             grad_norms: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Before the optimizers' steps: `values` (name -> scalar tensor: losses) and `grad_norms` of
        `step`, whose batch came from `files`, after the scaler's `unscale_`. A non-finite gradient
        norm skips the step without an error only where the scaler found the gradients themselves
        overflowing (its `found_inf`; it halves its scale at `update`); one whose gradients were
        finite (their sum of squares overflowed float32) is an error, as it is without a scale."""
        def bad(named):
            return 1.0 - torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in named.values()])
                                        ).all().float()
        error = bad(values)
        found = [t.to(error.device) for optimizer in self.optimizers if self.scaler
                 for t in self.scaler._found_inf_per_device(optimizer).values()]  # (those unscaled this step)
        flags = torch.stack([error, bad(grad_norms) if grad_norms else torch.zeros_like(error),
                             torch.stack(found).max().float() if found else torch.zeros_like(error)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        error, found_inf = torch.maximum(flags[0], flags[1] * (1 - flags[2])), flags.max()
        for optimizer in self.optimizers:
            optimizer.found_inf = found_inf
        self.pending.append((step, {**values, **(grad_norms or {})}, torch.stack([error, found_inf]), files))

    def check(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        flags = torch.stack([flag for _, _, flag, _ in pending]).tolist()
        for (step, values, _, files), (error, skipped) in zip(pending, flags):
            self.skipped = self.skipped + 1 if skipped else 0
            if error or self.skipped >= self.MAX_SKIPPED:
                what = "its update was skipped and training stopped" if error else (
                    f"the float16 gradients overflowed at {self.skipped} steps in a row, each skipped while the "
                    f"loss scale fell to {self.scaler.get_scale():.3g}, and training stopped")
                raise TrainingError(non_finite_message(step, *at_fault({k: v.float().item() for k, v in values.items()},
                                                                       files), what, self.checkpoints, self.resumed),
                                    every_rank=dist.is_initialized())


def at_fault(values: dict[str, float], files: Iterable[str]) -> tuple[dict[str, float], list[str], Optional[int]]:
    """The values, batch files and rank a non-finite step's error names. In one process this one's;
    under torch.distributed (every rank raising the error at the same step: a collective) those of
    the first rank whose own losses were non-finite: DDP averages the gradients, so one rank's
    NaN makes every rank's gradient norm NaN, and each rank named its own batch, rank 0 a batch
    that was fine (and torchrun often killed the rank at fault before it said anything)."""
    files = sorted(set(files))
    if not dist.is_initialized():
        return values, files, None
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (values, files))
    for own in (lambda name: "gradient norm" not in name, lambda name: True):  # its losses first, then any value
        for rank, (vals, names) in enumerate(gathered):
            if any(own(k) and not math.isfinite(v) for k, v in vals.items()):
                return vals, names, rank
    return values, files, dist.get_rank()


class WeightAverage:
    """An exponential moving average of a module's parameters (Polyak averaging, as image GANs keep
    of their generator): `update(step)` after each optimizer step moves the average towards the
    weights by `1 - d`, with `d = min(decay, (1 + step) / (10 + step))` so the first steps' random
    weights are soon forgotten; `averaged()` puts the average into the module's own tensors for
    what runs inside it (an evaluation, an export) and the training weights back after, in place,
    so a CUDA graph or DDP that holds those tensors keeps them. The average is float32, one tensor a
    parameter, and named as the module's state dict names them (`state_dict`, `load_state_dict`)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        named = list(module.named_parameters())
        self.decay = decay
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After the optimizer step that made `step` updates in all."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.float() for p in self.params], 1.0 - d)

    @contextmanager
    def averaged(self):
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, kept)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raises ValueError naming the parameters `state` lacks or has besides the module's."""
        missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
        if missing or extra:
            raise ValueError(f"the weight average does not fit the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        with torch.no_grad():
            for name, tensor in zip(self.names, self.average):
                tensor.copy_(state[name])


class StepTimer:
    """Each step's duration without a host sync per step (see `FiniteGuard`). On CUDA, the time
    between events the device passes as it finishes one step's work and the next's, so whatever
    the device waited on (the host, the loader, a stall) counts in the step it delayed; on other
    devices the host's time. `pause()` after anything that is not a step (an evaluation, a save);
    `durations()` returns the steps' seconds since its last call, after the device caught up."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last = None  # where the next step starts: the last step's end, None after a pause
        self.spans: list = []  # (start, end) of the steps since the last `durations()`

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pause(self) -> None:
        self.last = None

    def step_start(self) -> None:
        if self.last is None:
            self.last = self._now()

    def step_end(self) -> None:
        end = self._now()
        self.spans.append((self.last, end))
        self.last = end

    def durations(self) -> list[float]:
        spans, self.spans = self.spans, []
        if self.cuda and spans:
            spans[-1][1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in spans]
        return [b - a for a, b in spans]


def non_finite_message(step: int, values: dict[str, float], files: Iterable[str], rank: Optional[int],
                       what_happened: str, checkpoints: Optional[Checkpoints] = None,
                       resumed: Optional[tuple[Path, int]] = None) -> str:
    """The finite-step rule's error: the first non-finite value by name, the step, the rank (under
    torch.distributed, `at_fault`), the batch's files, and what to do. `checkpoints`: the run's
    folder, said to hold the last finite weights only when it holds a state; `resumed`: the state
    this run resumed from and its step. A run that fails at that very step would fail there again
    (the state's weights are finite but were diverging when saved): the error says so and names
    the earlier step files to resume from. At step 0 (a fresh run's first step) no update was made:
    the data or the initial weights are at fault, not the learning rate."""
    bad = next(((name, v) for name, v in values.items() if not math.isfinite(v)), None)
    what = f"non-finite {bad[0]} ({bad[1]})" if bad else "a non-finite loss on another rank"
    names = sorted(set(files))
    head = (f"{what} at step {step}" + (f" on rank {rank}" if rank is not None else "")
            + (f", on a batch from {listed(names, 8)}" if names and rank is not None else
               f" on a batch from {listed(names, 8)}" if names else "") + f"; {what_happened}")
    if checkpoints is not None and resumed is not None and resumed[1] == step:  # (a state's own loss and gradients)
        earlier = [p for p in step_files(checkpoints.folder) if int(Checkpoints.STEP.search(p.name)[1]) < step]
        return head + (f": it is the first step resumed from {resumed[0].name} (step {step}), before any update: that "
                       "state is at fault (finite weights, diverging when saved), unless this run's settings changed, "
                       "and resumed again it fails the same way; ") + (
            f"resume from an earlier step with a lower learning rate (kept: {listed([p.name for p in earlier[::-1]], 8)}; "
            f"for {earlier[-1].name}: ln -f {earlier[-1]} {checkpoints.folder / 'latest.pt'}), or start afresh "
            "(resume=false)" if earlier else
            "no earlier step_*.pt is kept: start afresh (resume=false) with a lower learning rate") + (
            f"; or check the data: a resumed run reads the same batches, this one again at step {step}")
    if step == 0:  # (a fresh run's first step: nothing saved, no update made)
        return head + (": it is the run's first step, before any update, so not the learning rate's doing: check that "
                       "batch's data (its audio, or the latents made of it) and the weights the run starts from")
    saved = checkpoints is None or checkpoints.latest is not None
    return head + (" (the checkpoints hold the last finite weights)" if saved else "") + \
        ": lower the learning rate, or check the data"


# --- checkpoints ----------------------------------------------------------------------------

def check_folders(cfg, *keys: str) -> None:
    """ConfigError naming the key when one of these config paths is a file where the run will make
    or read a folder, or lies under a file or a link to nothing (found before anything slow, not
    when the first checkpoint is written or the latents are encoded)."""
    for key in keys:
        path = getattr(cfg, key)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{key}={path!r} is a file, not a folder")
        above = os.path.dirname(os.path.abspath(path))  # the folder to be made in: under a file it cannot be
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if problem := broken_link_above(path):  # (a disk not mounted?)
            raise ConfigError(f"{key}={path!r} cannot be made: {problem}")
        if not os.path.isdir(above):
            raise ConfigError(f"{key}={path!r} cannot be made: {above} is a file, not a folder")


def check_outside_data(cfg, output: str, *keys: str) -> None:
    """ConfigError when the folder `output` names (where a run writes its audio samples) lies in
    one of these data folders, where a folder scan would find it (a manifest lists its own files):
    the next run, or a resumed one, would train and validate on the model's own output, and encode
    the corpus anew each time its samples change."""
    folder = os.path.realpath(getattr(cfg, output))
    for key in keys:
        data = getattr(cfg, key)
        if is_manifest(data) or not os.path.isdir(data):
            continue
        rel = os.path.relpath(folder, os.path.realpath(data))
        parts = [] if rel == "." else rel.split(os.sep)
        if (not parts or parts[0] != "..") and not any(p.startswith(".") for p in parts):  # hidden ones are not scanned
            raise ConfigError(f"{output}={getattr(cfg, output)!r} lies inside {key}={data!r}: the audio samples the "
                              "run writes there would join the corpus and be trained on; put it elsewhere")


def check_data_paths(cfg, *keys: str) -> None:
    """ConfigError naming the key when one of these config paths is neither a folder nor a usable
    jsonl manifest (a bad line, a missing file: `read_manifest`), before the codec loads or any
    audio is read."""
    for key in keys:
        folder = getattr(cfg, key)
        if is_manifest(folder):
            try:
                read_manifest(folder)
            except ManifestError as e:
                raise ConfigError(f"{key}: {e}") from None
        elif problem := folder_problem(folder):
            raise ConfigError(f"{key}={folder!r} {problem}")


def check_schedule(cfg) -> None:
    """ConfigError when the learning-rate schedule (`cosine_lr`) contradicts itself: a `min_lr`
    above `learning_rate` would make the decay raise the rate; or when a peak rate (`learning_rate`,
    the codec's `disc_learning_rate` too) times `weight_decay` reaches 1: AdamW's decoupled decay
    multiplies the weights by 1 - rate * weight_decay each step, which then zeroes or flips them
    (a run trained on silently: a tiny transformer's quantizer collapsed to one code)."""
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr={cfg.min_lr} is above learning_rate={cfg.learning_rate}: the cosine decay would "
                          f"raise the rate; set min_lr <= learning_rate (e.g. min_lr={cfg.learning_rate / 10:g})")
    for key in ("learning_rate", "disc_learning_rate"):
        rate = getattr(cfg, key, 0.0)
        if rate * cfg.weight_decay >= 1:
            raise ConfigError(f"{key}={rate:g} with weight_decay={cfg.weight_decay:g}: AdamW multiplies the weights "
                              f"by 1 - {key} * weight_decay = {1 - rate * cfg.weight_decay:g} each step, which zeroes "
                              "or flips them; the decay is decoupled from the gradient, so keep the product far "
                              "below 1 (weight_decay 0.01-0.1 is usual)")


def schedule_notes(cfg) -> list[str]:
    """What a training run's schedule does that is allowed but may not be meant (said as notes):
    `learning_rate=0` (with `min_lr=0`, as it must be) never changes the weights, on purpose in a
    run that only evaluates or re-exports its `init_from`; a warmup as long as the run
    (`warmup_steps >= max_steps`) never reaches the peak rate and never decays, on purpose in a
    short trial run; a `stop_step` past `max_steps` is never reached (`last_step`: the run ends at
    max_steps; it was taken without a word). None is an error."""
    notes = []
    if cfg.stop_step > cfg.max_steps:
        notes.append(f"stop_step={cfg.stop_step} is past max_steps={cfg.max_steps}: the run ends at max_steps; "
                     "raise max_steps to train longer (the cosine decay is then stretched to it)")
    if cfg.learning_rate == 0:
        return notes + ["learning_rate=0: the weights are never changed" + (" (the discriminators' are, at "
                        f"disc_learning_rate={cfg.disc_learning_rate:g})" if getattr(cfg, "disc_learning_rate", 0)
                        else "") + "; set learning_rate > 0 unless this is meant"]
    if cfg.warmup_steps < cfg.max_steps:
        return notes
    last = cosine_lr(cfg.max_steps - 1, cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    return notes + [f"warmup_steps={cfg.warmup_steps} >= max_steps={cfg.max_steps}: the learning rate rises for the "
                    f"whole run, to {last:g} ({last / cfg.learning_rate:.0%} of learning_rate={cfg.learning_rate:g}) "
                    "at its last step, and never decays; lower warmup_steps unless this is meant"]


def processes_here() -> int:
    """The trainer's processes on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def memory_available() -> int:
    """Bytes of memory this process can still be given without swapping: MemAvailable of
    /proc/meminfo (Linux), else its physical memory; less where a memory cgroup over it (a
    container's, a Slurm job's) can take less before its limit (`cgroup_memory`)."""
    cgroups = [left for _, _, left in cgroup_memory()]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min([int(line.split()[1]) * 1024] + cgroups)
    except (OSError, ValueError, IndexError):
        pass
    return min([physical_memory()] + cgroups)


def preload_limit_gb(preload_max_gb: float, available: Optional[int] = None) -> float:
    """The size up to which a corpus is decoded into memory (`AudioCropDataset`'s preload_max_gb):
    `preload_max_gb`, at most half the memory available to each process here, since the validation
    and the training corpus are each decoded up to it (and every torchrun process decodes its own);
    a corpus above it is streamed, not decoded until the machine runs out of memory."""
    available = memory_available() if available is None else available  # (bytes)
    return min(preload_max_gb, available / 2 / processes_here() / 1e9)


def resource_notes(cfg) -> list[str]:
    """What a config asks of this machine beyond what it has (said as notes, once, before the data
    loads): more DataLoader workers (`num_workers`) than CPU cores for each process, each a process
    with its own memory (more can still help where files are slow to read, a network file system);
    a `preload_max_gb` (the codec's) above `preload_limit_gb`, which is lowered to it."""
    notes, processes = [], processes_here()
    each = f" for each of {processes} processes" if processes > 1 else ""
    cores = cores_here()
    if too_many_workers(cfg):
        notes.append(f"num_workers={cfg.num_workers} is more than the {cores} CPU cores here{each}: each worker is a "
                     "process with its own memory, and more of them than cores decode no faster; lower num_workers "
                     "unless the files are slow to read (a network file system)")
    wanted = getattr(cfg, "preload_max_gb", 0.0)
    available = memory_available()  # (read once: the note's figures agree with each other)
    if wanted and (limit := preload_limit_gb(wanted, available)) < wanted:
        notes.append(f"preload_max_gb={wanted:g} is more than half the {available / 1e9:.1f} GB of memory "
                     f"available here{each} (the validation and the training corpus are each decoded up to it): a "
                     f"corpus over {limit:.1f} GB is streamed instead")
    return notes


def cores_here() -> int:
    """The CPU cores this process may run on (its affinity, where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def too_many_workers(cfg) -> bool:
    """Whether `num_workers` is more than the cores here for each trainer process (`resource_notes`)."""
    return cfg.num_workers > max(1, cores_here() // processes_here())


# torch's own warning where a DataLoader's workers outnumber the cores: three lines, at every iterator
_TORCH_WORKER_WARNING = r"This DataLoader will create \d+ worker processes in total"


@contextmanager
def worker_warning_said(cfg):
    """Within it (a trainer's `main`, whose `resource_notes` come first), torch's own warning about
    more DataLoader workers than cores is not shown where the note about `num_workers` says it:
    torch's three lines came after the note at each new iterator (the training loader's, then every
    evaluation's). Elsewhere, and after it, torch's warning is as it was."""
    if not too_many_workers(cfg):
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING, category=UserWarning)
        yield


RUN_STATE_ADVICE = "put an earlier step_*.pt in its place, or start afresh (resume=false)"


def load_training_state(path: str | os.PathLike, mmap: bool = False, map_location="cpu",
                        advice: str = RUN_STATE_ADVICE) -> dict:
    """A training state (`.pt`) written by a trainer, or CheckpointError naming the file when it is
    not one (damaged, or another kind of file) instead of the unpickler's traceback, or when it holds
    NaN or inf (found now, not as a non-finite loss that would blame the data). The error ends with
    `advice`: what to do (by default about a run folder's own states)."""
    try:
        state = torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    except Exception as e:  # pickle, zip or storage errors: a file this cannot read back
        why = str(e).strip().split(". ")[0] or type(e).__name__  # (torch goes on for lines about what may have happened)
        raise CheckpointError(f"{path} is not a training state written by the trainers (it cannot be read: {why}): "
                              f"damaged, cut short or another kind of file; {advice}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a training state written by the trainers (no step in it)")
    if bad := non_finite(state):  # never saved by `Checkpoints.save`: a damaged or hand-made file
        raise CheckpointError(f"{path} holds NaN or inf in {len(bad)} tensors ({listed(bad)}), which the trainers never "
                              f"save: it was damaged or made by other means; {advice}")
    return state


def check_trainer(state: dict, path: str | os.PathLike, key: str, trainer: str) -> None:
    """CheckpointError naming `path` when a training state lacks `key`, what every state of
    `trainer` holds: the other trainer's run (a codec run's folder as the transformer's
    checkpoint_dir, or the other way round), found before its weights are used."""
    if key not in state:
        raise CheckpointError(f"{path} is not a training state of {trainer} (it holds no {key!r}: another "
                              "trainer's run?); use another checkpoint_dir, or resume=false to start fresh")


def check_resumable(saved: dict, cfg, fields: Iterable[str]) -> None:
    """Raise ConfigMismatch naming each of `fields` that differs between the checkpoint's config
    and this run's (`fields_marked(type(cfg), "arch", "resume")` and the like)."""
    check_compatible(saved, cfg, fields, "the config contradicts the checkpoint it would resume from",
                     "Use the checkpoint's values, another checkpoint_dir, or resume=false to start fresh.")


def check_architecture(saved: dict, cfg, source) -> None:
    """Raise ConfigMismatch naming each architecture field (`metadata={"arch": True}`) in which
    the config saved with `source` (an init_from checkpoint) differs from this run's."""
    check_compatible(saved, cfg, fields_marked(type(cfg), "arch"), f"init_from={source} has another architecture",
                     "Pass the same values (a matching --config preset or key=value overrides).")


def validation_key(**what) -> str:
    """16 hex digits naming what a run's validation metric is measured on (`what`: its data, its
    crops, the settings that scale it), for `Checkpoints.save`: best.pt is ranked only among
    metrics measured on the same."""
    import hashlib
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partial_note(crops: int, skipped: list[int], ranked: bool) -> str:
    """What an evaluation's line adds when it left `skipped` of the `crops` validation crops out
    (their files failed to read, named above): the share scored, and, when `ranked` is False,
    that best.pt is not ranked on it (best.pt was measured on another share: the values do not
    compare, and a metric on fewer crops is no better)."""
    return (f" (on {crops - len(skipped)} of {crops} crops: {len(skipped)} unreadable, named above"
            + ("" if ranked else "; not ranked for best.pt, which was measured on other crops") + ")")


LINK_SUFFIX = ".link"  # _link's temporary: `.NAME.link`


def _link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`, atomically (hard link, or a copy if links fail: a
    FAT drive, some network shares). CheckpointError naming `dst` (and the copy, if it was one)
    when neither can be made (a full disk under the copy, a folder in the way), the temporary
    removed: `src` itself is whole, and it was `dst` that failed."""
    if dst.is_file() and os.path.samefile(src, dst):  # (a rename onto a link of the same file does nothing,
        return                                        # leaving the temporary link behind)
    tmp = dst.with_name(f".{dst.name}{LINK_SUFFIX}")
    copied = False
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            import shutil
            copied = True
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        how = f" (a copy of {src.name}: no hard links here)" if copied else ""
        raise CheckpointError(f"cannot write {dst}{how}: {os_reason(e)}") from None


# The run locks this process holds: (st_dev, st_ino) of a folder's `.run.lock` -> [its descriptor, holders].
# A POSIX lock belongs to the process, and closing ANY descriptor of the file drops it: so a process opens
# each folder's lock file once, and closes it when the last `Checkpoints` holding it releases it. (Per
# process, as the kernel's locks are; the guard for trainers called from threads.)
_run_locks: dict[tuple[int, int], list[int]] = {}
_run_locks_guard = threading.Lock()


class Checkpoints:
    """A folder of training checkpoints: `step_XXXXXXXX.pt` (last `keep` kept), `latest.pt`,
    `best.pt`, their model exports `latest.safetensors` / `best.safetensors`, and
    `checkpoints.json` recording which step is best and by what value.

    A state and its export are saved together: both are written to temporary files first, then
    renamed, so a kill leaves at worst an export one save behind its `.pt`, which `recover`
    finds (by the step recorded in both) and rebuilds, or a step file that `latest.pt` does not
    name yet, which `latest` returns. What a save is to do (its step, metric and validation) is
    recorded in `checkpoints.json` before its first rename, and `recover` finishes a save killed
    after it: latest.pt, and best.pt if its metric is better. Nothing holding NaN or inf is written.
    """

    STEP = re.compile(r"step_(\d{8})\.pt$")

    def __init__(self, folder: str | os.PathLike, keep: int = 3, lower_is_better: bool = True,
                 export_suffix: str = ".safetensors"):
        self.folder = Path(folder)
        self.export_suffix = export_suffix  # ".adapter.safetensors" for LoRA runs (model/finetune.py)
        self.keep = keep
        self.lower_is_better = lower_is_better
        self._lock: Optional[tuple[int, int]] = None  # the run lock this object holds (`hold`): its `_run_locks` key

    def names(self) -> list[Path]:
        """The paths a save writes whole files to by name (besides its step file)."""
        return [self.folder / name for name in ("latest.pt", "best.pt", f"latest{self.export_suffix}",
                                                f"best{self.export_suffix}", "checkpoints.json")]

    def not_files(self) -> list[Path]:
        """Those of `names` that are there but are no file (a folder made by hand, a device): unread
        as if missing, and a save's rename onto one fails, after the run's first steps."""
        return [p for p in self.names() if os.path.lexists(p) and not p.is_file()]

    @property
    def latest(self) -> Optional[Path]:
        """`latest.pt`, or the step file of a save killed before it named `latest.pt` (see
        `unnamed_step`)."""
        path = self.folder / "latest.pt"
        return self.unnamed_step() or (path if path.is_file() else None)

    def unnamed_step(self) -> Optional[Path]:
        """The newest `step_*.pt` when a save was killed after renaming it into place but before
        recording it as the latest (in `checkpoints.json`, written last): a whole state, newer
        than what `latest.pt` names. None otherwise, so a `latest.pt` put back by hand in place of
        a damaged newest step is kept."""
        steps = step_files(self.folder)
        if not steps:
            return None
        latest, recorded = self.folder / "latest.pt", self._info().get("latest_step")
        if latest.is_file() and os.path.samefile(latest, steps[-1]):
            return None
        newest = int(self.STEP.search(steps[-1].name).group(1))
        return steps[-1] if not isinstance(recorded, int) or newest > recorded else None

    def hold(self) -> None:
        """Lock the folder for this process's run (a POSIX lock on `.run.lock`, held until `release`),
        so that a second run in it at the same time (the same command in two terminals, a job
        requeued while the last one still saves) is refused before anything slow: a ConfigError
        naming the folder. Two runs in one folder resumed the same state and wrote their steps in
        among each other's. A POSIX lock (not `flock`, as `model.files.open_locked`) belongs to the
        process: forked DataLoader workers do not inherit it, and the same process (a trainer's
        `main` called again) takes it again, through the one descriptor it
        has of the file (`_run_locks`: holders are counted). A file system without locks goes
        unlocked."""
        import fcntl
        path = self.folder / ".run.lock"
        with _run_locks_guard:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot write {path}: {os_reason(e, path)}") from None
            try:  # a folder the saves cannot write in (read-only, not this user's) is found now, not by the
                # first save after the steps it would lose (an existing writable .run.lock opens all the same)
                try_writing_in(self.folder)
            except OSError as e:
                raise CheckpointError(f"cannot write in {self.folder}: {os_reason(e)}; the checkpoints could not be "
                                      "saved (choose a checkpoint_dir this process can write)") from None
            try:
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                key = None
            except OSError as e:
                raise CheckpointError(f"cannot write {path}: {os_reason(e, path)}") from None
            if key is not None and key == self._lock:  # held by this object already
                return
            if key in _run_locks:  # held by this process (another `Checkpoints`): not a second descriptor
                _run_locks[key][1] += 1
            else:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
                except OSError as e:
                    raise CheckpointError(f"cannot write {path}: {os_reason(e, path)}") from None
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except (BlockingIOError, PermissionError):  # (EAGAIN or EACCES: held by another process)
                    os.close(fd)
                    raise ConfigError(f"checkpoint_dir={str(self.folder)!r}: another run is training in it now "
                                      f"(it holds {path.name}); wait for it to end, or use another "
                                      "checkpoint_dir") from None
                except OSError:
                    pass  # no locks here
                st = os.fstat(fd)
                key = (st.st_dev, st.st_ino)
                _run_locks[key] = [fd, 1]
            old, self._lock = self._lock, key
            self._drop(old)

    def release(self) -> None:
        """Give up this object's hold on the folder's run lock (`hold`); the lock itself is released
        (its descriptor closed) when no other `Checkpoints` of this process holds it. Nothing if it
        holds none."""
        with _run_locks_guard:
            self._drop(self._lock)
            self._lock = None

    @staticmethod
    def _drop(key: Optional[tuple[int, int]]) -> None:
        if key is None:
            return
        held = _run_locks[key]
        held[1] -= 1
        if held[1] == 0:
            del _run_locks[key]
            os.close(held[0])

    @contextmanager
    def holding(self, hold: bool = True):
        """`hold` (when `hold`) for the time of a `with` block, released when it ends or raises: a
        trainer's `main` called again in one process (a notebook) leaves no descriptor open."""
        if hold:
            self.hold()
        try:
            yield self
        finally:
            self.release()

    def move_aside(self) -> Optional[Path]:
        """`move_aside(self.folder)` (resume=false); the run's lock stays in the folder, held."""
        return move_aside(self.folder)

    @property
    def best(self) -> Optional[Path]:
        path = self.folder / "best.pt"
        return path if path.is_file() else None

    def _info(self) -> dict:
        """`checkpoints.json`'s record, less the entries not of their type (a hand edit, another
        tool: a best_metric of "x" compared with a step's value was a TypeError at the save, the
        step already renamed into place): {} for a file that is not a JSON object."""
        try:
            info = json_value((self.folder / "checkpoints.json").read_text())
        except (OSError, ValueError):
            return {}

        def fits(key: str, value) -> bool:
            if key in ("latest_step", "best_step"):
                return isinstance(value, int) and not isinstance(value, bool)
            if key == "best_metric":
                return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if key == "pending":  # (`save`'s record of what it is to do)
                return isinstance(value, dict) and {"step", "metric", "validation", "export"} <= value.keys() and \
                    fits("latest_step", value.get("step")) and (
                    value.get("metric") is None or fits("best_metric", value.get("metric"))) and fits(
                    "best_validation", value.get("validation")) and isinstance(value.get("export"), bool)
            return key != "best_validation" or value is None or isinstance(value, str)

        return {k: v for k, v in info.items() if fits(k, v)} if isinstance(info, dict) else {}

    def _record(self, info: dict) -> None:
        atomic_write(self.folder / "checkpoints.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))

    def best_metric(self) -> Optional[float]:
        return self._info().get("best_metric")

    def ranked_elsewhere(self, validation: str) -> Optional[str]:
        """A note when best.pt was ranked by a metric measured on another validation than
        `validation` (`validation_key`: the data or the settings changed since): the next evaluated
        save becomes best.pt, whatever its value. None otherwise."""
        info = self._info()
        if self.best is None or info.get("best_validation") in (None, validation):  # (None: unknown, as before)
            return None
        return (f"the validation (its data, crops or loss settings) changed since best.pt (step "
                f"{info.get('best_step')}) was ranked on it: its value is not comparable, so the next evaluated "
                "checkpoint becomes best.pt")

    def comparable(self, validation: str) -> bool:
        """Whether a metric measured on `validation` (`validation_key`) may be ranked against
        best.pt's: there is no best.pt, or it was ranked on that same validation. A trainer's
        evaluation on part of its validation (crops whose files failed to read) is ranked only so:
        against a value measured on another part, or on a validation its record does not name (a
        record written before records named it), it would take best.pt by a figure that does not
        compare."""
        return self.best is None or self._info().get("best_validation") == validation

    def save(self, step: int, state: dict, metric: Optional[float] = None,
             export: Optional[Callable[[str], None]] = None, validation: Optional[str] = None) -> Path:
        """Write the step's training state, and with it `export(path)` (the model as our
        .safetensors) to latest.safetensors; update latest, best (if `metric` improves, with
        best.safetensors) and the rotation. `metric` is the trainers' `Due.best_metric`: the
        validation value of an evaluation made at this step, None for a step not evaluated;
        `validation` (`validation_key`) names what it was measured on: a best metric measured on
        another is no bar (`ranked_elsewhere`). Returns the step file. Raises CheckpointError, and
        writes nothing, if the state holds NaN or inf or the folder cannot be written."""
        path = self.folder / f"step_{step:08d}.pt"
        refuse_non_finite(state, path)
        exported = self.folder / f"latest{self.export_suffix}"
        with ExitStack() as temporaries:  # (each removed at the end unless renamed into place)
            tmp_state = temporaries.enter_context(written_temp(path, lambda tmp: torch_save(state, tmp)))
            tmp_export = temporaries.enter_context(written_temp(exported, export)) if export else None
            # what this save is to do, recorded before its first rename: a save killed after it is
            # finished by `recover` (its step named latest.pt, and best.pt if its metric is better)
            info = self._info()
            info["pending"] = {"step": step, "metric": metric if metric is None or math.isfinite(metric) else None,
                               "validation": validation, "export": export is not None}
            self._record(info)
            try:
                os.replace(tmp_state, path)
                if tmp_export:
                    os.replace(tmp_export, exported)
            except OSError as e:
                raise CheckpointError(f"cannot write {path}: {os_reason(e)}") from None
            try:
                info = self._finish(info)
            except CheckpointError as e:  # (latest.pt or best.pt: the step file is in place, whole)
                raise CheckpointError(f"{e}; {path.name} is saved whole, and the next start finishes its save "
                                      "once that can be written") from None
        self._record(info)
        steps = step_files(self.folder)
        for old in steps[:-self.keep] if self.keep > 0 else []:
            old.unlink(missing_ok=True)
        return path

    def _finish(self, info: dict) -> dict:
        """The pending save of `info` (`checkpoints.json`'s record, its step file renamed into
        place): its step named latest.pt, and best.pt (with best.safetensors) if its metric is
        better than the best's; returns the record to write, without the pending entry."""
        pending = info.pop("pending")
        step, metric, validation = pending["step"], pending["metric"], pending["validation"]
        path, exported = self.folder / f"step_{step:08d}.pt", self.folder / f"latest{self.export_suffix}"
        _link(path, self.folder / "latest.pt")
        info["latest_step"] = step
        # a best.pt deleted since is no bar: else no later step could ever become best again
        best = info.get("best_metric") if self.best else None
        if validation is not None and info.get("best_validation") not in (None, validation):
            best = None  # measured on other data or settings: not comparable
        if metric is not None and (best is None or (metric < best if self.lower_is_better else metric > best)):
            _link(path, self.folder / "best.pt")
            if pending["export"] and exported.is_file():  # (one a step behind after a kill: `recover` rebuilds it)
                _link(exported, self.folder / f"best{self.export_suffix}")
            info.update(best_metric=metric, best_step=step, best_validation=validation)
        return info

    def recover(self, export: Callable[[dict, str], None]) -> list[str]:
        """Tidy the folder after an interrupted save, at the start of a run: remove the stale
        temporaries (`.*.tmp` of atomic writes, `.*.link` of links) and rebuild latest/best
        .safetensors with `export(state, path)` where its step differs from its .pt's. Returns
        one note per thing done."""
        notes = []
        if not self.folder.is_dir():
            return notes
        for pattern in (f".*{TEMP_SUFFIX}", f".*{LINK_SUFFIX}"):
            for stale in sorted(self.folder.glob(pattern)):
                if stale.is_dir() and not stale.is_symlink():  # (not one of ours: a folder made by hand)
                    continue
                stale.unlink(missing_ok=True)
                notes.append(f"removed {stale.name}, left by an interrupted save")
        info = self._info()
        pending = info.get("pending")
        if pending and (self.folder / f"step_{pending['step']:08d}.pt").is_file():  # killed after its first rename
            best = info.get("best_step")
            try:
                info = self._finish(info)
            except CheckpointError as e:  # (as in `save`: one line naming latest.pt or best.pt)
                raise CheckpointError(f"{e}, finishing the interrupted save of step {pending['step']}; run again "
                                      "once that can be written") from None
            self._record(info)
            ranked = info.get("best_step") != best
            notes.append(f"finished the interrupted save of step {pending['step']}: latest.pt"
                         + (" and best.pt name it" if ranked else " names it"))
        elif pending:  # killed before it: nothing of it is in place
            del info["pending"]
            self._record(info)
        unnamed = self.unnamed_step()
        if unnamed:
            _link(unnamed, self.folder / "latest.pt")
            info = self._info()
            info["latest_step"] = int(self.STEP.search(unnamed.name).group(1))
            self._record(info)
            notes.append(f"latest.pt now names {unnamed.name}, whose save was interrupted before it did")
        for name in ("latest", "best"):
            pt, exported = self.folder / f"{name}.pt", self.folder / f"{name}{self.export_suffix}"
            if not pt.is_file():
                continue
            state = load_training_state(pt, mmap=True)
            try:
                have = json_value(header(exported).get("extra", "{}")).get("step") if exported.is_file() else None
            except (CheckpointError, ValueError):
                have = None  # not one of ours, or damaged: rebuild it
            if have != state["step"]:
                atomic_write(exported, lambda tmp: export(state, tmp))
                notes.append(f"rebuilt {exported.name} from {pt.name} (step {state['step']}; "
                             f"it held {'nothing' if have is None else f'step {have}'})")
        return notes

    def load(self, path: Optional[str | os.PathLike] = None, map_location="cpu") -> Optional[dict]:
        """The training state at `path` (default: latest), or None when there is none."""
        path = Path(path) if path else self.latest
        if path is None or not path.is_file():
            return None
        return load_training_state(path, map_location=map_location)


def state_to_load(checkpoints: Checkpoints, resume: bool, eval_only: bool, init_from: str,
                  adapters: bool = False) -> Optional[Path]:
    """The training state a run starts from: `latest.pt` when a training run resumes (`resume`),
    or when `eval_only` has no `init_from` (it evaluates the latest checkpoint); None when the
    weights come from `init_from` or a fresh initialisation. With `adapters` (a LoRA run: its
    states hold adapters on the `init_from` base) eval_only loads `latest.pt`, if there is one,
    together with `init_from` instead of in its place. Raises ConfigError for `eval_only` with
    neither, for `eval_only` of adapters without `latest.pt` (it scored the bare base), and for a training run to resume in a folder holding `step_*.pt` but no `latest.pt`
    (taken away by hand: a fresh run there would rotate its steps in among that run's)."""
    if (resume or eval_only) and (not_files := checkpoints.not_files()):  # now, not at the first save's rename
        # ("error: cannot write step_00000002.pt: Is a directory", after the run's first steps; resume=false moves
        # the folder's contents aside)
        raise ConfigError(f"checkpoint_dir={str(checkpoints.folder)!r} holds {listed([p.name for p in not_files])}, "
                          "which a run writes its checkpoints to, as something other than a file (a folder?): move "
                          "it away, or pass another checkpoint_dir")
    if eval_only and not init_from and checkpoints.latest is None:
        raise ConfigError(f"eval_only=true: nothing to evaluate in {checkpoints.folder} (no latest.pt); "
                          "pass init_from=official or init_from=PATH")
    steps = step_files(checkpoints.folder)
    if resume and not eval_only and checkpoints.latest is None and steps:  # latest.pt deleted or moved by hand
        raise ConfigError(f"checkpoint_dir={str(checkpoints.folder)!r} holds {listed([p.name for p in steps[::-1]])} "
                          "but no latest.pt: a fresh run there would mix its steps with that run's. To resume, copy "
                          f"the step to resume from to latest.pt (cp {steps[-1]} {checkpoints.folder / 'latest.pt'}); "
                          "to start afresh, resume=false (the old run is moved aside)")
    if eval_only and adapters and checkpoints.latest is None:  # (it scored the base, as if the adapters')
        found = sorted(p.name for p in checkpoints.folder.glob("*") if p.name == "best.pt"
                       or p.name.endswith(".adapter.safetensors")) if checkpoints.folder.is_dir() else []
        raise ConfigError(f"eval_only=true finetune=lora: no adapters to evaluate in {checkpoints.folder} (no "
                          "latest.pt" + (f"; it holds {listed(found)}" if found else "") + "); to score the base "
                          "alone, run eval_only without finetune=lora")
    if eval_only:
        return checkpoints.latest if adapters or not init_from else None
    return checkpoints.latest if resume else None


def step_files(folder: Path) -> list[Path]:
    """The run's `step_*.pt` files, oldest first; something else of the name (a folder made by hand)
    is not one: it was an IsADirectoryError where the run recovered or pruned its states."""
    return sorted(p for p in folder.glob("step_*.pt") if p.is_file())


OLD_RUN = re.compile(r"old-\d{8}-\d{6}(-\d+)?")  # the folders `move_aside` makes in a run folder


def move_aside(folder: str | os.PathLike) -> Optional[Path]:
    """Move the run in a folder that holds `latest.pt` or a `step_*.pt` into a new folder inside it,
    `old-YYYYmmdd-HHMMSS` (`-2`, `-3`, ... appended when that name is taken), so a fresh run starts
    empty there and nothing is deleted. Everything in the folder moves but its run lock and the
    `old-*` folders of earlier fresh starts. The run folder itself stays (a symlink to it, a mount
    point, a parent this user cannot write in: renaming it moved the symlink, or failed after the
    run's setup), so only the folder itself must be writable (`Checkpoints.hold` checks that first).
    Returns the new folder, or None when the folder holds no run. TrainingError for the working
    folder or one above it (its files are not only the run's), and for a move that fails."""
    folder = Path(os.path.realpath(folder))
    if not (folder / "latest.pt").exists() and not any(folder.glob("step_*.pt")):
        return None
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise TrainingError(f"cannot move the run in {folder} aside (resume=false): it is the working folder, or "
                            "holds it; start the fresh run in another checkpoint_dir, or from another folder")
    stamp = time.strftime('%Y%m%d-%H%M%S')
    old, n = folder / f"old-{stamp}", 1
    while os.path.lexists(old):
        n += 1
        old = folder / f"old-{stamp}-{n}"
    # latest.pt and the steps last: a move cut short leaves a run that the next resume=false moves on
    run = [p for p in folder.iterdir() if p.name != ".run.lock" and not (OLD_RUN.fullmatch(p.name) and p.is_dir())]
    run.sort(key=lambda p: (p.name == "latest.pt" or p.name.startswith("step_"), p.name))
    try:
        old.mkdir()
        for p in run:
            p.rename(old / p.name)
    except OSError as e:
        raise TrainingError(f"cannot move the run in {folder} aside (resume=false) into {old.name}: {os_reason(e)}; "
                            "move its files out by hand, or start the fresh run in another checkpoint_dir") from None
    return old


def moved_aside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` lies in the run that `move_aside(folder)` moves (not in an earlier `old-*`)."""
    folder, path = Path(os.path.realpath(folder)), Path(os.path.realpath(path))
    if folder not in path.parents:
        return False
    inside = path.relative_to(folder).parts
    return not (len(inside) > 1 and OLD_RUN.fullmatch(inside[0]))


# --- the loop's schedule --------------------------------------------------------------------

class Deadline:
    """`max_minutes` of wall time, counted from when the Deadline is made (at the start of a
    run's setup, so that a time-limited job's loading and encoding count too); 0: none. And a
    SIGTERM (a cluster scheduler's, `kill`, `docker stop`) or a Ctrl-C (SIGINT) received while
    `catching_signals` (the training loop): the run then stops as at its deadline, but at once and
    without evaluating (the scheduler's grace period is short), saves, and its script exits with
    128 + the signal's number (143, 130); a second one ends the process at once. A data-loading
    worker that dies (the out-of-memory killer's) stops the loop the same way, found as the step's
    batches are read (`read`), and its script ends with one error line (`exit`); so does a batch
    whose data cannot be read (`unreadable`: a latents shard cut short since the run started)."""

    def __init__(self, max_minutes: float):
        self.seconds = 60 * max_minutes
        self.start = time.monotonic()
        self.catching = False
        self.received: Optional[str] = None    # the signal's name, set in this process by the handler
        self.stopped_by: Optional[str] = None  # the signal that stopped the loop, the same on every rank
        self.worker_error: Optional[RuntimeError] = None  # a data-loading worker's death, as torch words it
        self.lost_worker: Optional[str] = None  # that, when it stopped the loop (every rank, under torchrun rank 0's)
        self.unreadable: Optional[str] = None  # why a step's batch could not be read, when that stopped it (every rank)
        self._signals = None  # under torch.distributed: (its CPU process group, the all-reduce in flight, its flags)
        self.timed_out = False  # under torch.distributed: rank 0's clock past max_minutes, as every rank agreed

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    @contextmanager
    def catching_signals(self):
        """Within it, a SIGTERM or SIGINT stops the loop (`interrupted`, `passed`) instead of the
        process, and a data-loading worker's death is noted (`worker_error`) instead of raised by
        torch's SIGCHLD handler wherever the main process is, in the middle of a step that then
        could not be saved; the previous handlers are put back on leaving. Outside the main thread
        (no signals there): nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails, _set_SIGCHLD_handler
        _set_SIGCHLD_handler()  # (torch's, which a loader's first iterator sets once: now, so that this one wins)

        def handler(signum, frame):
            self.received = signal.Signals(signum).name
            for s in self.SIGNALS:  # a second one ends the process at once (SIGINT: run_script's one line)
                signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)

        def child_ended(signum, frame):
            try:
                _error_if_any_worker_fails()  # (torch's own check: it leaves the worker to be reaped by its loader)
            except RuntimeError as e:
                self.worker_error = self.worker_error or e

        previous = {s: signal.signal(s, handler) for s in self.SIGNALS} | {
            signal.SIGCHLD: signal.signal(signal.SIGCHLD, child_ended)}
        self.catching = True
        try:
            yield self
        finally:
            self.catching = False
            for s, h in previous.items():
                signal.signal(s, h)
            if self._signals is not None and self._signals[1] is not None:
                try:  # every rank launched it at the same step: settled, not left in flight
                    self._signals[1].wait()
                except RuntimeError:  # a rank gone: the error that ends this one is already on its way
                    pass

    def _agreed(self) -> tuple[bool, int]:
        """Under torch.distributed: whether rank 0 had found the time up one step ago, and the signal
        (its number, 0 for none) that any rank had received then, the same on every rank. Each step
        all-reduces this rank's on a CPU process group of its own (gloo), without waiting, and reads
        the one launched the step before, long done: no collective or host sync on the device's
        stream, where the finite guard's steps queue behind each other. Torchrun forwards a SIGTERM
        or Ctrl-C to every worker and kills them 30 s later: asked only on log steps, a run whose log
        rows came minutes apart trained on past the signal and was killed unsaved; and a deadline
        asked only on log steps was never asked where `log_interval` reached past the run's last step."""
        self._group()
        group, work, flags = self._signals
        timed, agreed = False, 0
        if work is not None:
            work.wait()
            timed, agreed = bool(flags[0].item()), int(flags[1].item())
        flags = torch.tensor([float(self._time_up() and dist.get_rank() == 0),
                              float(signal.Signals[self.received].value if self.received else 0)])
        self._signals = (group, dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group, async_op=True), flags)
        return timed, agreed  # (SIGTERM, 15, over SIGINT, 2)

    def _group(self):
        """The signals' CPU process group (gloo), made at the first call (every rank calls at the same step)."""
        if self._signals is None:
            self._signals = (dist.new_group(backend="gloo"), None, None)
        return self._signals[0]

    def _first_unreadable(self, why: Optional[tuple[str, str]]) -> Optional[tuple[str, str]]:
        """Under torch.distributed: what the first rank whose step's batches could not be read says
        (`why` on this rank, None when read), or None when every rank read its batches; the same
        on every rank. One all-reduce of a flag on the signals' process group, waited for (the
        others must know before they start the step's collectives, which the failed rank would not
        join; a CPU group: no sync with the device); the messages are gathered only when one failed."""
        failed = torch.tensor([float(why is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self._group())
        if failed.item() == 0:
            return None
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, why, group=self._group())
        return next(message for message in gathered if message is not None)

    def _time_up(self) -> bool:
        """Whether `max_minutes` have passed, by this process's clock."""
        return self.seconds > 0 and time.monotonic() - self.start > self.seconds

    def read(self, batches: Iterable, n: int) -> Optional[list]:
        """The step's `n` micro-batches from `batches`, all read before the step starts; None when a
        data-loading worker has died, or a batch's data file cannot be read (a FileNotFoundError
        naming it, as the scripts' user errors are: `LatentsError`, a shard cut short mid-run): the
        loop then stops at its next `before_step`, saved, as after a SIGTERM, and `exit` ends the
        script with one error line. Under torch.distributed every rank learns whether any rank's
        batches could not be read, its worker dead or its file (`_first_unreadable`), so all stop
        at the same step, saved, and rank 0 says the first such rank's error."""
        why = micro_batches = None  # why: ("lost_worker" or "unreadable", its message) when not read
        try:
            if self.worker_error is not None:
                raise self.worker_error
            micro_batches = [next(batches) for _ in range(n)]
        except FileNotFoundError as e:
            why = "unreadable", own_message(e)  # (raised in a worker: its own line, not torch's traceback)
        except RuntimeError as e:
            lost = worker_death_message(self.worker_error or e, kept="")
            if lost is None:
                raise
            why = "lost_worker", lost
        except (ConnectionError, EOFError):  # a worker killed as it handed a batch over (its tensors' descriptors)
            if (lost := self._worker_death()) is None:
                raise
            why = "lost_worker", lost
        if dist.is_initialized():
            why = self._first_unreadable(why)
        if why is None:
            return micro_batches
        if why[0] == "lost_worker":
            self.lost_worker = why[1]
        else:
            self.unreadable = why[1]
        return None

    def _worker_death(self, seconds: float = 1.0) -> Optional[str]:
        """`worker_death_message` for a data-loading worker found dead within `seconds`, else None:
        after a batch's hand-over failed (a reset connection to the worker that sent it), where the
        worker, killed, may not have finished exiting (its connections close after its memory is
        gone: the rest takes milliseconds), so that torch's loader found it alive, and its SIGCHLD
        is still to come. (Any other reset, with no worker to die, is so raised a second late.)"""
        from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails
        end = time.monotonic() + seconds
        while self.worker_error is None:
            try:
                _error_if_any_worker_fails()  # (torch's check of its workers' pids, the signal or not)
            except RuntimeError as e:
                self.worker_error = e
            if self.worker_error is None:
                if time.monotonic() > end:
                    return None
                time.sleep(0.05)
        return worker_death_message(self.worker_error, kept="")

    def exit(self, step: int) -> None:
        """After the loop: a run that a signal stopped exits with 128 + its number, one that a
        data-loading worker's death or an unreadable batch stopped with one error line
        (TrainingError); saved either way."""
        held = f"stopped at step {step}, which latest.pt holds" if step > 0 else "stopped before any step"
        every_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1  # (every rank's under torchrun: rank 0 says it)
        if self.lost_worker:
            raise TrainingError(f"{self.lost_worker}; {held}: run the same command to resume", every_rank=every_rank)
        if self.unreadable:  # (its own message says what to do about the file)
            raise TrainingError(f"{self.unreadable}; {held}", every_rank=every_rank)
        if self.stopped_by:  # saved but not finished: the status says so (a shell's `&&` goes no further)
            raise SystemExit(128 + signal.Signals[self.stopped_by])

    def interrupted(self) -> bool:
        """Whether a SIGTERM or SIGINT (or a data-loading worker's death, an unreadable batch) stops
        the loop now: asked before every step. In one process a host-side flag, no sync; under
        torch.distributed what every rank agrees on one step after the signal came (`_agreed`), so
        all stop at the same step, saved; the deadline is agreed on in the same all-reduce, for
        `passed`."""
        if self.lost_worker or self.unreadable:
            return True
        if dist.is_initialized():
            if not self.catching and self.seconds <= 0:
                return False
            self.timed_out, agreed = self._agreed()
            if agreed:
                self.stopped_by = signal.Signals(agreed).name
            return agreed != 0
        if self.received is None:
            return False
        self.stopped_by = self.received
        return True

    def passed(self) -> bool:
        """Whether the time is up, or a SIGTERM or SIGINT came: asked before every step (a clock
        read). Under torch.distributed what `interrupted`, asked just before, agreed on: rank 0's
        clock one step ago, the same on every rank, with no collective of its own."""
        if dist.is_initialized():
            return self.timed_out
        if self.received is not None:
            self.stopped_by = self.received
        return self._time_up() or self.received is not None


@dataclass(frozen=True)
class Due:
    """What a training loop does before its next step: `before_step`'s answer."""
    stop: bool      # leave the loop (after evaluating and saving)
    evaluate: bool  # run the validation
    save: bool      # write a checkpoint

    def best_metric(self, metrics: dict, key: str) -> Optional[float]:
        """The value that ranks this step's checkpoint for best.pt (`Checkpoints.save`'s
        `metric`): `metrics[key]` of the evaluation made at this step, None when the step was not
        evaluated (an earlier evaluation describes other weights) or `metrics` lacks it (on a
        rank that does not evaluate)."""
        return metrics.get(key) if self.evaluate else None


def last_step(max_steps: int, stop_step: int) -> int:
    """The step a run stops at: `stop_step` when set (> 0; a run ended early on purpose, e.g. to
    compare recipes at equal steps), else `max_steps`; the learning-rate schedule always ends at
    `max_steps`, so a run stopped early continues on the same schedule when run again."""
    return min(stop_step, max_steps) if stop_step > 0 else max_steps


def stop_message(step: int, max_steps: int, stop_step: int, max_minutes: float,
                 signal_name: Optional[str] = None, lost_worker: Optional[str] = None) -> Optional[str]:
    """What a run that stopped at `step` says about it (None at max_steps: it is done, or when a
    data-loading worker's death or an unreadable batch stopped it, `lost_worker` (`Deadline.lost_worker`
    or `Deadline.unreadable`): `Deadline.exit`'s error says so); `signal_name`: the signal that
    stopped it (`Deadline.stopped_by`)."""
    if lost_worker:
        return None
    if signal_name:
        held = "which latest.pt holds" if step > 0 else "before any training: nothing was saved"
        return (f"{signal_name} received: stopped at step {step}, {held}; run the same command to resume "
                f"(the script exits with {128 + signal.Signals[signal_name]})")
    if step < last_step(max_steps, stop_step):
        return f"max_minutes={max_minutes} reached at step {step}: run the same command to resume"
    if step < max_steps:
        return (f"stop_step={stop_step} reached; the schedule runs to max_steps={max_steps}: "
                f"run again with a later stop_step (or 0) to continue")
    return None


def finished_message(step: int, max_steps: int, stop_step: int, folder: str | os.PathLike) -> Optional[str]:
    """What a training run resumed at `step` says instead of training when nothing is left to
    train (its `last_step` reached: the same command run again after it finished); None otherwise."""
    if step < last_step(max_steps, stop_step):
        return None
    if step < max_steps:
        return (f"the run in {printable(folder)} already stopped at step {step} (stop_step={stop_step}); nothing to train: run "
                f"again with a later stop_step (or 0) to continue to max_steps={max_steps}")
    return (f"the run in {printable(folder)} is already finished at step {step} (max_steps={max_steps}); nothing to train. "
            f"To train further, raise max_steps (e.g. max_steps={2 * step}: the cosine decay is then stretched to "
            "it, so the learning rate rises again); to start afresh, resume=false")


def finished(state: Optional[dict], cfg, checkpoints: "Checkpoints", export: Callable[[dict, str], None],
             is_main: bool, say: Callable[[str], None]) -> bool:
    """True, having said so (`finished_message`), when a training run (not eval_only) would resume
    from `state` with nothing left to train; before that, rank 0 completes an interrupted last
    save (`Checkpoints.recover`). The trainer then ends without loading data, evaluating or saving."""
    done = state is not None and not cfg.eval_only and finished_message(state["step"], cfg.max_steps, cfg.stop_step,
                                                                         checkpoints.folder)
    if not done:
        return False
    for note in checkpoints.recover(export) if is_main else []:
        say(f"note: {note}")
    say(done)
    return True


def before_step(step: int, start_step: int, end_step: int, eval_interval: int, save_interval: int,
                deadline: Deadline) -> Due:
    """The schedule of both trainers, asked before training step `step` (the model has had `step`
    updates; this run segment started at `start_step`):

    - stop at `end_step` (`last_step`: max_steps or an earlier stop_step), or once the deadline
      has passed; the deadline is asked at every step after the segment's first, so a segment
      always trains at least one step (a clock read; under torch.distributed rank 0's clock of one
      step before, agreed on with the signals, no collective of its own); asked on log steps
      only, a run whose `log_interval` reached past its last step never stopped at it;
    - stop at once after a SIGTERM or SIGINT (`Deadline.interrupted`; under torch.distributed one
      step later, every rank at the same step), or a data-loading worker's death or a batch that
      cannot be read (`Deadline.read`), without evaluating: a scheduler's grace period is short;
    - evaluate at step 0, every `eval_interval` steps and when stopping, but not at the step a
      resumed segment starts from (it was evaluated before that checkpoint was saved) unless
      it stops there;
    - save every `save_interval` steps, after every evaluation and when stopping, but never the
      state a segment started from."""
    stop = step >= end_step or deadline.interrupted() or (step > start_step and deadline.passed())
    evaluate = deadline.stopped_by is None and deadline.lost_worker is None and deadline.unreadable is None and \
        (stop or (step % eval_interval == 0 and (step != start_step or step == 0)))
    save = step > start_step and (stop or evaluate or step % save_interval == 0)
    return Due(stop, evaluate, save)


# --- logging --------------------------------------------------------------------------------

def window_peak_gb(device: torch.device, reserved: bool = False) -> Optional[float]:
    """Peak GPU memory allocated since the last call (the first: since the process started), in GB,
    and the peak counter reset, so that each log row shows its own window; None off CUDA. The first
    window also holds compilation and cuDNN's algorithm trials, which later ones do not.
    `reserved`: the peak the allocator reserved instead, for steps replayed from a CUDA graph,
    whose memory stays reserved for the graph and is allocated only while it is captured."""
    if device.type != "cuda":
        return None
    peak = (torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated)(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def write_samples(folder: Path, write: Callable[[Path], Any], what: str = "the samples",
                  then: str = "training goes on") -> Any:
    """`write(folder)` (a run's listening samples, or its loss curves) after making `folder`; what
    it returns, or None when the folder or the disk fails it (a file named like the folder, a full
    disk): one warning line saying `what` and `then`, and the run goes on. A failure there stopped
    the run at its evaluation, losing the steps since its last save, for files that are only for
    listening (or looking at)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return write(folder)
    except (OSError, AudioError) as e:
        reason = os_reason(e, folder) if isinstance(e, OSError) else str(e)
        from tqdm import tqdm
        tqdm.write(f"warning: cannot write {what} in {folder}: {printable(reason)}; {then}", file=sys.stderr)
        return None


class Logger:
    """Weights & Biases on rank 0 plus a local `metrics.jsonl`.

    mode "online": if wandb is missing or not logged in, falls back to offline with one line
    saying so. "offline": runs are stored under `<dir>/wandb` for `wandb sync`. "disabled": only
    metrics.jsonl, where a NaN or inf value is written as null. Non-main ranks log nothing.
    """

    def __init__(self, mode: str, project: str, run_dir: str | os.PathLike, config, is_main: bool = True,
                 name: Optional[str] = None, resume_id: Optional[str] = None):
        self.is_main = is_main
        self.run = None
        self.run_dir = Path(run_dir)
        self.mode = mode
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "ab", buffering=0)  # each row written whole, or not at all
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: logging to metrics.jsonl only (pip install wandb)")
            self.mode = "disabled"
            return
        if mode == "online" and not _wandb_logged_in(wandb):
            print("wandb: not logged in, logging offline instead (run `wandb login`, then `wandb sync` the run)")
            mode = "offline"
        if mode == "online" and (why := _wandb_unreachable(wandb)):  # wandb.init would retry for 90 s, then raise
            print(f"wandb: {why}, logging offline instead (`wandb sync` the run when online)")
            mode = "offline"
        self.mode = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, dir=str(self.run_dir), mode=mode,
                              config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
                              id=resume_id, resume="allow" if resume_id else None)
        if mode == "offline":
            print(f"wandb: offline run in {self.run.dir} (upload later with `wandb sync`)")

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def _reopen_if_gone(self) -> None:
        """metrics.jsonl deleted or replaced during the run (the run folder tidied, moved): rows went on
        into the unlinked file, lost, and the end's plot failed on the missing path. A new file is
        started where the path is, with the rows to come (the plot then covers those)."""
        path = self.run_dir / "metrics.jsonl"
        try:
            same = os.path.samestat(os.fstat(self.jsonl.fileno()), os.stat(path))
        except OSError:
            same = False
        if not same:
            self.jsonl.close()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.jsonl = open(path, "ab", buffering=0)
            except OSError as e:
                raise TrainingError(f"cannot write {path}: {os_reason(e)}") from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        plain = {k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                 for k, v in metrics.items() if not _is_media(v)}
        # NaN or inf as null: json.dumps writes them as bare NaN / Infinity, which strict JSON parsers refuse
        plain = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in plain.items()}
        self._reopen_if_gone()
        row, end = (json.dumps({"step": step, "time": time.time(), **plain}) + "\n").encode(), self.jsonl.tell()
        try:
            while row:
                row = row[self.jsonl.write(row):]
        except OSError as e:  # a full disk: cut the row off, else the next run's first row would join it
            try:
                self.jsonl.truncate(end)
            except OSError:
                pass
            raise TrainingError(f"cannot write {self.run_dir / 'metrics.jsonl'}: {os_reason(e)}") from None
        if self.run is not None:
            self.run.log({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}, step=step)

    def audio(self, key: str, audio: np.ndarray, sample_rate: int, caption: str = ""):
        """A wandb.Audio for `log`, or None when wandb is off."""
        if self.run is None:
            return None
        import wandb
        return wandb.Audio(np.asarray(audio, dtype=np.float32).T, sample_rate=sample_rate, caption=caption)

    def image(self, figure):
        if self.run is None:
            return None
        import wandb
        return wandb.Image(figure)

    def finish(self) -> None:
        if not self.is_main:
            return
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()


def _is_media(value) -> bool:
    return type(value).__module__.startswith("wandb") or isinstance(value, (list, dict))


def _wandb_unreachable(wandb, timeout: float = 5.0) -> Optional[str]:
    """Why the W&B server (WANDB_BASE_URL, or wandb's default) cannot be reached, or None: one TCP
    connection to it, or to the proxy the environment sets for it, at most `timeout` seconds."""
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    url = wandb.setup().settings.base_url
    server = urlsplit(url)
    proxy = getproxies().get(server.scheme)
    target = urlsplit(proxy if proxy and not proxy_bypass(server.hostname or "") else url)
    try:
        socket.create_connection((target.hostname, target.port or (443 if target.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {url}" + (f" through the proxy {proxy}" if target.geturl() != server.geturl() else "") \
            + f" ({os_reason(e)})"
    return None


def _wandb_logged_in(wandb) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.api.api_key)
    except Exception:
        return False
