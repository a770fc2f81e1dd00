"""A generic CUDA-graph runner for a step function over preallocated tensors: one graph per key,
captured on first use and replayed. It knows nothing about the model: a step is `fn(key)`, and
`active` is the (B,) mask of rows the step may advance (cleared during warm-up runs)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


def attention_windows(max_len: int, smallest: int = 128) -> list[int]:
    """Cache lengths a step may attend over: powers of two from `smallest`, and max_len."""
    windows, w = [], smallest
    while w < max_len:
        windows.append(w)
        w *= 2
    return windows + [max_len]


class StepKey(NamedTuple):
    """What a step's graph is specialised for: the attention window, and whether top-p is on."""
    window: int
    top_p: bool


class StepGraphs:
    """Runs a step `fn(key)` (which reads and writes only preallocated tensors) eagerly, or, when
    `enabled`, as one CUDA graph per StepKey, captured on first use (or by `capture`).

    Capture warms up by running `fn` twice with every row of `active` cleared, so that no state
    advances; the caller's mask is restored afterwards. The step function is passed at each
    call rather than stored, so an engine and its graphs form no reference cycle and free their
    memory as soon as the engine is dropped.
    """

    def __init__(self, windows: Sequence[int], active: Tensor, enabled: bool):
        self.windows, self.active, self.enabled = list(windows), active, enabled
        self.graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if enabled else None

    def key(self, length: int, top_p: bool) -> StepKey:
        """The key of a step over `length` slots: the smallest window holding them."""
        for w in self.windows:
            if w >= length:
                return StepKey(w, bool(top_p))
        raise ValueError(f"{length} slots exceed the context of {self.windows[-1]}")

    def all_keys(self) -> list[StepKey]:
        """Every key a step may need: each window, with and without top-p."""
        return [StepKey(w, t) for w in self.windows for t in (False, True)]

    def dry_run(self, fn: Callable[[StepKey], None], key: StepKey, times: int = 2) -> None:
        """Run `fn` with every row cleared from `active` (nothing advances), then restore it."""
        saved = self.active.clone()
        self.active.zero_()
        try:
            for _ in range(times):
                fn(key)
        finally:
            self.active.copy_(saved)

    def capture(self, fn: Callable[[StepKey], None], keys: Optional[Sequence[StepKey]] = None) -> None:
        """Capture the graphs of `keys` (default: all) not captured yet; nothing when disabled."""
        if not self.enabled:
            return
        for key in keys or self.all_keys():
            if key in self.graphs:
                continue
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.dry_run(fn, key)  # warm-up: compilation, autotuning, cuBLAS plans
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn(key)  # recorded, not run
            self.graphs[key] = graph

    def run(self, fn: Callable[[StepKey], None], key: StepKey) -> None:
        """One step: `fn(key)` eagerly, or its graph replayed (captured first if new)."""
        if not self.enabled:
            fn(key)
            return
        if key not in self.graphs:
            self.capture(fn, [key])
        self.graphs[key].replay()


def use_graphs(flag: Optional[bool], device: torch.device) -> bool:
    """Whether to use CUDA graphs: `flag`, or by default on CUDA devices; an error off CUDA."""
    if flag and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    return device.type == "cuda" if flag is None else flag
