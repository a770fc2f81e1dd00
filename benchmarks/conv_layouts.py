"""What the codec generator's convolutions would cost with channels-last activations: every
convolution one training step of a preset calls (recorded from a real forward of the generator,
with the trainer's polyphase dilated convolutions), timed forward and backward (input and weight
gradients) twice: as the trainer calls it, `F.conv1d` / `F.conv_transpose1d` on (B, C, L), where
cuDNN converts NCHW <-> NHWC around each call; and as `F.conv2d` / `F.conv_transpose2d` on
(B, C, 1, L) tensors stored channels-last, the layout cuDNN computes in. The sum over the calls
bounds what keeping the generator's activations channels-last could save in its convolutions
(the elementwise work between them is not counted). One JSON object a line.

    python benchmarks/conv_layouts.py --preset small --batch 32 --seconds 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import ArgumentParser  # noqa: E402
from config.codec_config import PRESETS  # noqa: E402
from model.codec import Codec  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def record_calls(codec: Codec, audio: torch.Tensor) -> list[dict]:
    """Every conv1d / conv_transpose1d of one generator forward: shapes and arguments."""
    calls, originals = [], {"conv1d": F.conv1d, "conv_transpose1d": F.conv_transpose1d}

    def first(v):
        return v if isinstance(v, int) else v[0]

    def recorder(kind):
        # conv1d(x, w, b, stride, padding, dilation, groups); conv_transpose1d(x, w, b, stride, padding,
        # output_padding, groups, dilation): the codec's have padding 0 (it pads causally itself)
        def call(x, w, b=None, stride=1, padding=0, *rest, **kw):
            dilation = (rest[0] if rest else kw.get("dilation", 1)) if kind == "conv1d" else 1
            calls.append(dict(kind=kind, x=tuple(x.shape), w=tuple(w.shape), bias=b is not None,
                              stride=first(stride), padding=first(padding), dilation=first(dilation)))
            return originals[kind](x, w, b, stride, padding, *rest, **kw)
        return call
    try:
        F.conv1d, F.conv_transpose1d = recorder("conv1d"), recorder("conv_transpose1d")
        with torch.no_grad():
            codec(audio)
    finally:
        F.conv1d, F.conv_transpose1d = originals["conv1d"], originals["conv_transpose1d"]
    return calls


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def step_fn(call: dict, layout: str, dtype):
    """Forward + backward of one recorded call in `layout` ("ncl" or "nhwc")."""
    dev = "cuda"
    x = torch.randn(call["x"], device=dev, dtype=dtype)
    w = torch.randn(call["w"], device=dev, dtype=dtype) * 0.05
    b = torch.zeros(call["w"][1 if call["kind"] == "conv_transpose1d" else 0], device=dev, dtype=dtype) \
        if call["bias"] else None
    s, d = call["stride"], call["dilation"]
    assert call["padding"] == 0, "the codec pads causally itself"
    if layout == "nhwc":
        x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        w = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if call["kind"] == "conv1d":
        conv = (lambda: F.conv1d(x, w, b, s, 0, d)) if layout == "ncl" else (lambda: F.conv2d(x, w, b, (1, s), 0, (1, d)))
    else:
        conv = (lambda: F.conv_transpose1d(x, w, b, s)) if layout == "ncl" else (lambda: F.conv_transpose2d(x, w, b, (1, s)))
    y = conv()
    g = torch.randn_like(y)
    if layout == "nhwc":
        assert y.is_contiguous(memory_format=torch.channels_last), "cuDNN returned another layout"

    def run():
        x.grad = w.grad = None
        conv().backward(g)
    return run


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/conv_layouts.py measures CUDA kernels and needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16
    cfg = PRESETS[args.preset]
    codec = Codec(cfg).cuda().to(dtype)
    codec.dilated_convs_polyphase()  # as train_codec.py does on CUDA
    audio = torch.randn(args.batch, 1, round(args.seconds * cfg.sample_rate), device="cuda", dtype=dtype) * 0.1
    calls = record_calls(codec, audio)
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name(), preset=args.preset,
         batch=args.batch, seconds=args.seconds, calls=len(calls))
    t0, totals = time.time(), {"ncl": 0.0, "nhwc": 0.0}
    for i, call in enumerate(calls):
        row = dict(bench="conv", index=i, **{k: v for k, v in call.items() if k != "bias"})
        for layout in totals:
            try:
                row[f"{layout}_ms"] = timed(step_fn(call, layout, dtype), args.iters)
                totals[layout] += row[f"{layout}_ms"]
            except Exception as e:  # one call failing must not hide the others
                row[f"{layout}_error"] = f"{type(e).__name__}: {e}"[:200]
        emit(**row)
    emit(bench="total", preset=args.preset, calls=len(calls), ncl_ms=totals["ncl"], nhwc_ms=totals["nhwc"],
         saved_ms=totals["ncl"] - totals["nhwc"], elapsed_s=time.time() - t0)


if __name__ == "__main__":
    main()
