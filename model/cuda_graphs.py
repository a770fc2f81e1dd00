"""CUDA-graph runners that know nothing about the model.

- `StepGraphs` (the engines' decode steps): a step function over preallocated tensors, one graph
  per key, captured on first use and replayed; a step is `fn(key)`, and `active` is the (B,) mask
  of rows the step may advance (cleared during warm-up runs).
- `GraphedPass` (the codec trainer's `cuda_graph`): a training pass, forward and backward,
  replayed from one graph after a few eager calls."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

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


class GraphedPass:
    """A training pass, `fn(*args) -> {name: scalar tensor}` (forward, losses, and backward into
    `params`' gradients, which it adds to), replayed from a CUDA graph: one launch instead of each
    of its kernels' from Python, for a step the host bounds (the codec at 2 s crops).

    Each distinct call (its non-tensor arguments, its tensors' shapes and dtypes) runs eagerly
    `warmup` times (cuDNN's algorithm trials, compilation), on a side stream as CUDA graphs want,
    then is captured and replayed: its tensors are copied into the graph's own, and the values it
    returns are copies of the graph's. Only the latest call's graph is kept (a new one frees the
    last: the codec's passes without and with the discriminators follow one another). The caller
    zeroes the gradients in place (`zero_grad(set_to_none=False)`), never dropping them: the graph
    adds into the tensors they were at capture. A replay draws its random numbers from the default
    CUDA generator, advancing it, as the eager pass does. Disabled (`enabled=False`, or not on
    CUDA) it calls `fn`; a capture that fails is a RuntimeWarning saying why, and the passes run
    eagerly from then on (nothing is lost: a capture computes nothing)."""

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], params: Iterable[torch.Tensor],
                 enabled: bool, warmup: int = 2):
        self.fn, self.params, self.warmup = fn, list(params), warmup
        self.enabled = enabled and torch.cuda.is_available()
        self.key, self.calls, self.graph = None, 0, None
        self.inputs: list[torch.Tensor] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.stream = torch.cuda.Stream() if self.enabled else None

    def __call__(self, *args) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return self.fn(*args)
        key = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        if key != self.key:  # a new kind of call: its own warm-up and graph
            self.key, self.calls, self.graph, self.inputs, self.outputs = key, 0, None, [], {}
        self.calls += 1
        if self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self.graph is None:
            try:
                self._capture(args)
            except RuntimeError as e:  # (capture computes nothing: the gradients are as they were)
                warnings.warn(f"{e}; this run goes on eagerly", RuntimeWarning, stacklevel=2)
                self.enabled, self.graph = False, None
                return self.fn(*args)
        for mine, given in zip(self.inputs, tensors):
            mine.copy_(given, non_blocking=True)
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}

    def _capture(self, args) -> None:
        for p in self.params:  # the graph adds into these tensors, so they must exist before it
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.inputs = [a for a in args if isinstance(a, torch.Tensor)]
        self.graph = torch.cuda.CUDAGraph()  # (entering it syncs and empties the cache: the warm-up's
        previous = torch.cuda.current_stream()  # blocks make room for the graph's pool)
        # the default generator's state, kept aside: a capture registers the state and marks it
        # capturing, and only a capture that ends well unmarks it; a failed one left every later
        # draw on this device an error ("Offset increment outside graph capture ...")
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        before = generator.clone_state()
        try:
            # thread_local: what other threads do meanwhile (the loader's pin-memory thread pinning a
            # new buffer) cannot invalidate the capture, as under the default "global" mode
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                # capture records without computing: the replay after it computes this call
                self.outputs = self.fn(*args)
        except RuntimeError as e:  # an op that syncs with the host, or one CUDA graphs cannot hold
            # torch's graph context leaves its capture stream current when ending the capture fails
            torch.cuda.set_stream(previous)
            generator.graphsafe_set_state(before)  # as it was: a capture draws nothing
            # CUDA's errors come with lines of advice (CUDA_LAUNCH_BLOCKING, ...): the warning is one line
            raise RuntimeError(f"the training pass could not be captured in a CUDA graph ({' '.join(str(e).split())})"
                               ) from e
