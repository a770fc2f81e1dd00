"""The live step's work outside the transformer blocks and the codec: the counter-based noise
(`StepNoise.draw`), token sampling and latent sampling, for B rows of the duplex hertz_dev shapes
(vocabulary 32768, 8 mixture components, 32 dims, 2 channels). Each timed as a CUDA graph, eager
and with torch.compile (dynamic=False), checked equal. One JSON object a line.

    python benchmarks/glue_probe.py --batches 1 8
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.inference import graph_time  # noqa: E402
from config import ArgumentParser  # noqa: E402
from model.sampling import RowParams, SamplingParams, StepNoise, sample_latents, sample_tokens  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def glue(seed, counter, logits, locs, scales, mix_logits, params, top_p: bool):
    noise = StepNoise.draw(seed, counter, 2, 32)
    tokens = sample_tokens(logits, noise.token, params, top_p)
    latents = sample_latents(locs, scales, mix_logits, noise.mixture, noise.gaussian, params)
    return tokens, latents, noise.posterior


def main() -> None:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/glue_probe.py measures CUDA kernels and needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name())
    for B in args.batches:
        seed = torch.randint(0, 2 ** 62, (B,), device=dev)
        counter = torch.randint(0, 1000, (B,), device=dev)
        logits = torch.randn(B, 2, 32768, device=dev, dtype=dt) * 3
        locs, scales = torch.randn(B, 2, 8, 32, device=dev, dtype=dt), torch.rand(B, 2, 8, 32, device=dev, dtype=dt)
        mix = torch.randn(B, 2, 8, device=dev, dtype=dt)
        params = RowParams.make(B, dev, SamplingParams())
        inputs = (seed, counter, logits, locs, scales, mix, params)
        for top_p in (False, True):
            ref = glue(*inputs, top_p)
            row = dict(bench="glue", batch=B, top_p=top_p)
            try:
                row["eager_ms"] = graph_time(lambda: glue(*inputs, top_p))
                t = time.time()
                compiled = torch.compile(glue, dynamic=False)
                out = compiled(*inputs, top_p)
                row["compile_s"] = time.time() - t
                row["compiled_ms"] = graph_time(lambda: compiled(*inputs, top_p))
                row["tokens_equal"] = bool(torch.equal(out[0], ref[0]))
                row["latents_max_abs_diff"] = float((out[1] - ref[1]).abs().max())
                row["posterior_max_abs_diff"] = float((out[2] - ref[2]).abs().max())
            except Exception as e:  # report, go on with the other cases
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            emit(**row)


if __name__ == "__main__":
    main()
