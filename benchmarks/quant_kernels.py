"""The linear layers of one hertz_dev duplex step, alone, per weight format. One JSON object a line.

    python benchmarks/quant_kernels.py                    # CUDA: rows 1 2 8 16 64 128
    python benchmarks/quant_kernels.py --rows 1 --quick   # fewer kernels (no inductor / tinygemm)
    python benchmarks/quant_kernels.py --sweep            # int8 one-row kernels over a grid of configurations

Every `nn.Linear` of the LM, resynthesizer and quantizer of the `hertz_dev` duplex model (shapes
from a model built on `meta`; random weights), called once each in model order with `--rows`
activation rows, the whole pass captured in one CUDA graph and replayed (median of 20 replays, `benchmarks/inference.py`'s
`graph_time`).
Kernels: `bf16` (cuBLAS F.linear), `int8` / `int4` (`model.quant_kernels`, the one-row choice
between GEMV and tile product made on first use, as in the model), `int8_gemv`, `int8_dot`,
`int4_gemv`, `int4_dot` (each kernel forced), `int8_cast` and `int8_gemv_cast` (the same with the
GEMV's floats made by the int-to-float instruction, `model.quant_kernels.BITS` off),
`int8_inductor` (with --inductor: F.linear on the int8 weights cast to bf16 times the scales,
one torch.compile region over the whole pass: the gpt-fast recipe),
`int4_tinygemm` (aten._weight_int4pack_mm, its own packed layout). Fields: ms (one pass), gb
(bytes of weights read), tb_per_s, x_bf16 (speed-up over bf16), rel_err (output of the pass'
last layer against F.linear with the dequantized weights in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.inference import graph_time  # noqa: E402
from config import ArgumentParser  # noqa: E402
from config.transformer_config import PRESETS  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from model import HertzDev  # noqa: E402
from model.quant import dequantize_int4, dequantize_int8, int4_fits  # noqa: E402

T0 = time.time()


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def shapes() -> list[tuple[int, int]]:
    """(out, in) of every Linear of the duplex hertz_dev quantizer, LM and resynthesizer, in order."""
    with torch.device("meta"):
        model = HertzDev(PRESETS["hertz_dev"])
    return [(m.out_features, m.in_features) for part in (model.quantizer, model.lm, model.resynth)
            for m in part.modules() if type(m) is nn.Linear]


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16, 64, 128])
    ap.add_argument("--quick", action="store_true", help="only bf16 and the model's int8 / int4 kernels")
    ap.add_argument("--inductor", action="store_true", help="also int8_inductor (compiles the whole pass: minutes)")
    ap.add_argument("--per-shape", action="store_true",
                    help="also each weight shape alone (all layers of that shape in one graph): where the bandwidth is lost")
    ap.add_argument("--sweep", action="store_true",
                    help="only: the one-row int8 GEMV and tile product at each configuration of a wider grid than "
                         "their autotuners', per weight shape of 4+ layers ('sweep' lines, us per layer)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/quant_kernels.py measures CUDA kernels and needs a CUDA GPU")
    import model.quant_kernels as qk
    if args.sweep:
        return sweep(qk)

    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layers = shapes()
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name(), layers=len(layers),
         params=sum(n * k for n, k in layers))
    weights = {"bf16": [], "int8": [], "int4": []}
    for n, k in layers:
        weights["bf16"].append(torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5)
        weights["int8"].append((torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8),
                                torch.rand(n, device=dev, dtype=dt) / 127 / k ** 0.5))
        fits = int4_fits(k, n, 128)
        weights["int4"].append((torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8),
                                (torch.randn(k // 128, n, 2, device=dev, dtype=dt) / k ** 0.5)) if fits else None)
    int8_bytes = [q.numel() + s.numel() * 2 for q, s in weights["int8"]]
    nbytes = {"bf16": sum(w.numel() * 2 for w in weights["bf16"]), "int8": sum(int8_bytes),
              "int4": sum(w4[0].numel() + w4[1].numel() * 2 if w4 else b8 for w4, b8 in zip(weights["int4"], int8_bytes))}

    def int4_or_int8(i, x, int4_fn):
        w4 = weights["int4"][i]
        return int4_fn(x, *w4) if w4 is not None else qk.int8_linear(x, *weights["int8"][i])

    tiny = {}
    if not args.quick:
        packed = []
        for w4 in weights["int4"]:
            if w4 is None:
                packed.append(None)
                continue
            q, sz = w4
            packed.append((torch.ops.aten._convert_weight_to_int4pack(q, 8), sz))  # our nibble order is tinygemm's
        tiny["packed"] = packed

    if args.inductor:
        @torch.compile(fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": True})
        def inductor_pass(xs):
            return [F.linear(xs[k], q.to(dt)) * s for (n, k), (q, s) in zip(layers, weights["int8"])]
        tiny["inductor"] = inductor_pass

    for M in args.rows:
        xs = {k: torch.randn(M, k, device=dev, dtype=dt) for k in {k for _, k in layers}}
        kernels = {
            "bf16": lambda: [F.linear(xs[k], w) for (n, k), w in zip(layers, weights["bf16"])],
            "int8": lambda: [qk.int8_linear(xs[k], q, s) for (n, k), (q, s) in zip(layers, weights["int8"])],
            "int4": lambda: [int4_or_int8(i, xs[k], lambda x, q, sz: qk.int4_linear(x, q, sz, 128))
                             for i, (n, k) in enumerate(layers)],
        }
        if not args.quick:
            def forced(fn, fmt):
                def run():
                    out = []
                    for i, (n, k) in enumerate(layers):
                        y = torch.empty(M, n, device=dev, dtype=dt)
                        if fmt == "int8" or weights["int4"][i] is None:
                            q, s = weights["int8"][i]
                            (fn if fmt == "int8" else qk._int8_dot_call)(xs[k], q, s, y)
                        else:
                            fn(xs[k], *weights["int4"][i], y, 128)
                        out.append(y)
                    return out
                return run
            kernels.update({
                "int8_cast": lambda: with_bits(False, kernels["int8"]),
                "int8_dot": forced(qk._int8_dot_call, "int8"),
                "int4_dot": forced(qk._int4_dot_call, "int4"),
                "int4_tinygemm": lambda: [int4_or_int8(i, xs[k], lambda x, q, sz: torch.ops.aten._weight_int4pack_mm(
                    x, tiny["packed"][i][0], 128, sz)) for i, (n, k) in enumerate(layers)],
            })
            if args.inductor:
                kernels["int8_inductor"] = lambda: tiny["inductor"](xs)
            if M == 1:
                kernels["int8_gemv"] = forced(qk._int8_gemv_call, "int8")
                kernels["int8_gemv_cast"] = lambda: with_bits(False, forced(qk._int8_gemv_call, "int8"))
                kernels["int4_gemv"] = forced(qk._int4_gemv_call, "int4")
        base = None
        for name, fn in kernels.items():
            fmt = name.split("_")[0]
            try:
                t = time.time()
                with torch.no_grad():
                    out = fn()  # first call: autotuning, compilation
                    ms = graph_time(fn, iters=20)
                n, k = layers[-1]
                if fmt == "bf16":
                    w = weights["bf16"][-1].float()
                elif fmt == "int4" and weights["int4"][-1] is not None:
                    w = dequantize_int4(*weights["int4"][-1], 128, torch.float32)
                else:
                    w = dequantize_int8(*weights["int8"][-1], torch.float32)
                err = rel_err(out[-1], xs[k].float() @ w.t())
                base = ms if name == "bf16" else base
                emit(bench="linears", rows=M, kernel=name, ms=ms, gb=nbytes[fmt] / 1e9,
                     tb_per_s=nbytes[fmt] / ms / 1e9, x_bf16=base / ms if base else None, rel_err=err,
                     first_call_s=time.time() - t)
            except Exception as e:  # one kernel failing must not hide the others' figures
                emit(bench="linears", rows=M, kernel=name, error=f"{type(e).__name__}: {e}"[:400])
        if args.per_shape:
            per_shape(layers, weights, xs, M, tiny.get("packed"), qk)
    emit(bench="choices", **{f"{k[0]}_{k[1]}x{k[2]}{'_cast' if k[3:] == (False,) else ''}": v
                             for k, v in qk.kernel_choices().items()})
    emit(bench="done", elapsed_s=time.time() - T0)


def with_bits(bits: bool, fn):
    """fn() with `model.quant_kernels.BITS` set (the model's kernels, their one-row choice included)."""
    import model.quant_kernels as qk
    before, qk.BITS = qk.BITS, bits
    try:
        return fn()
    finally:
        qk.BITS = before


@torch.no_grad()
def sweep(qk) -> None:
    """Each int8 one-row kernel configuration on all layers of each repeated shape (one CUDA graph,
    cold weights as in the step), to see what the autotuners' grids leave out. The configurations
    in `model.quant_kernels`' grids are marked `in_grid`."""
    import triton
    groups: dict = {}
    for i, shape in enumerate(shapes()):
        groups.setdefault(shape, []).append(i)
    gemv_grid = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in qk._gemv_configs()}
    dot_grid = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in qk._dot_configs((128, 256))}
    gemv = [(bn, bk, w, st) for bn in (4, 8, 16, 32, 64) for bk in (256, 512, 1024, 2048)
            if 2048 <= bn * bk <= 32768 for w in (4, 8) for st in (2, 3, 4)]
    dot = [(bn, bk, w, st) for bn in (32, 64, 128) for bk in (128, 256, 512) for w in (4, 8) for st in (3, 4)]
    emit(bench="sweep_grid", gemv=len(gemv), dot=len(dot))
    for (n, k), idx in groups.items():
        if len(idx) < 4 or n * k < 1 << 20:
            continue
        torch.manual_seed(0)
        ws = [(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
               torch.rand(n, device="cuda", dtype=torch.bfloat16) / 127 / k ** 0.5) for _ in idx]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        for kind, grid_cfgs, in_grid in (("gemv", gemv, gemv_grid), ("dot", dot, dot_grid)):
            for bn, bk, w, st in grid_cfgs:
                if kind == "gemv":
                    def call(q, sc, bn=bn, bk=bk, w=w, st=st):
                        qk._int8_gemv.fn[(triton.cdiv(n, bn),)](x, q, sc, y, n, k, x, x, 0.0, BITS=True, NORM=False,
                                                                 SWIGLU=False, RESIDUAL=False, PDL=False, KP=1, BLOCK_N=bn,
                                                                 BLOCK_K=bk, num_warps=w, num_stages=st)
                else:
                    def call(q, sc, bn=bn, bk=bk, w=w, st=st):
                        qk._int8_dot.fn[(triton.cdiv(n, bn), 1)](x, q, sc, y, 1, n, k, BLOCK_M=16, BLOCK_N=bn,
                                                                  BLOCK_K=bk, num_warps=w, num_stages=st)
                try:
                    us = graph_time(lambda: [call(q, sc) for q, sc in ws], iters=10) / len(ws) * 1e3
                    emit(bench="sweep", kernel=kind, out=n, inp=k, block_n=bn, block_k=bk, warps=w, stages=st,
                         us=us, tb_per_s=n * k / us / 1e6, in_grid=(bn, bk, w, st) in in_grid)
                except Exception as e:  # a configuration out of resources: say so, go on
                    emit(bench="sweep", kernel=kind, out=n, inp=k, block_n=bn, block_k=bk, warps=w, stages=st,
                         error=f"{type(e).__name__}: {e}"[:200])
    emit(bench="done", elapsed_s=time.time() - T0)


@torch.no_grad()
def per_shape(layers, weights, xs, M, packed, qk) -> None:
    """Each distinct (out, in) shape: all its layers in one graph, per kernel; ms per layer and TB/s."""
    groups: dict = {}
    for i, shape in enumerate(layers):
        groups.setdefault(shape, []).append(i)
    for (n, k), idx in groups.items():
        y = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)
        x = xs[k]
        calls = {"bf16": (2 * n * k, lambda i: F.linear(x, weights["bf16"][i])),
                 "int8": (n * k, lambda i: qk.int8_linear(x, *weights["int8"][i])),
                 "int8_cast": (n * k, lambda i: with_bits(False, lambda: qk.int8_linear(x, *weights["int8"][i]))),
                 "int8_gemv": (n * k, lambda i: qk._int8_gemv_call(x, *weights["int8"][i], y)),
                 "int8_gemv_cast": (n * k, lambda i: with_bits(False, lambda: qk._int8_gemv_call(x, *weights["int8"][i], y))),
                 "int8_dot": (n * k, lambda i: qk._int8_dot_call(x, *weights["int8"][i], y))}
        if weights["int4"][idx[0]] is not None:
            calls.update({"int4": (n * k // 2, lambda i: qk.int4_linear(x, *weights["int4"][i], 128)),
                          "int4_gemv": (n * k // 2, lambda i: qk._int4_gemv_call(x, *weights["int4"][i], y, 128)),
                          "int4_dot": (n * k // 2, lambda i: qk._int4_dot_call(x, *weights["int4"][i], y, 128))})
            if packed is not None:
                calls["int4_tinygemm"] = (n * k // 2, lambda i: torch.ops.aten._weight_int4pack_mm(
                    x, packed[i][0], 128, packed[i][1]))
        for name, (nbytes, call) in calls.items():
            if M > 1 and name.endswith("_gemv"):
                continue
            try:
                ms = graph_time(lambda: [call(i) for i in idx], iters=20) / len(idx)
                emit(bench="shape", rows=M, out=n, inp=k, layers=len(idx), kernel=name, us=ms * 1e3,
                     tb_per_s=nbytes / ms / 1e9)
            except Exception as e:
                emit(bench="shape", rows=M, out=n, inp=k, kernel=name, error=f"{type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    main()
