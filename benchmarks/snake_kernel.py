"""The codec's Snake activation on CUDA: the Triton kernels (`model.snake_kernels`) against torch's
formula (`model.codec.snake`), forward + backward on a trainer-layout activation (bf16, channels-last
(B, C, 1, L)); one JSON line per shape: ms per pass and the output's largest difference.

    python benchmarks/snake_kernel.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser  # noqa: E402
from model.codec import snake as formula  # noqa: E402
from model.snake_kernels import snake as fused  # noqa: E402


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    # small_fast's decoder end (2 s crops x 32, 64 channels at 16 kHz) and a middle layer
    for b, c, length in ((32, 64, 32000), (32, 256, 1280), (32, 1024, 64)):
        x = torch.randn(b, c, 1, length, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        alpha = (0.5 + torch.rand(c, device="cuda")).requires_grad_()
        g = torch.randn_like(x)

        def run(f):
            def call():
                x.grad = alpha.grad = None
                f().backward(g)
            return call
        ms_formula = timed(run(lambda: formula(x, alpha.view(-1, 1, 1))))
        ms_fused = timed(run(lambda: fused(x, alpha)))
        with torch.no_grad():
            diff = float((fused(x, alpha).float() - formula(x.float(), alpha.view(-1, 1, 1))).abs().max())
        print(json.dumps({"bench": "snake", "shape": [b, c, 1, length], "ms_formula": round(ms_formula, 3),
                          "ms_fused": round(ms_fused, 3), "speedup": round(ms_formula / ms_fused, 2),
                          "max_abs_diff_vs_fp32": diff}), flush=True)


if __name__ == "__main__":
    ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # (--help)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/snake_kernel.py measures CUDA kernels and needs a CUDA GPU")
    main()
