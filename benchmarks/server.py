"""How many live sessions the server keeps at the 125 ms cadence, and their round trip over
loopback: the real server (inference_server.py's app under uvicorn, in a child process) with
random weights at full size, and N real websocket clients streaming at real time. One JSON
object per line.

    python benchmarks/server.py                              # CUDA, hertz_dev size, bf16, N = 1 2 4 8 12 16, 20 s
    python benchmarks/server.py --sessions 8 16 --seconds 30 --no-compile
    python benchmarks/server.py --smoke                      # CPU, tiny model, N = 1 2, 3 s (a check, not a figure)
    python benchmarks/server.py --quantize int8 --kv-dtype fp8 --sessions 64 128 144   # many sessions

The server runs one engine with --max-sessions rows (default: the largest N), warmed up (CUDA
graphs captured) before the clients start, as a deployment would. For each N, N clients connect
at once; client k sends chunk i at t0 + (i + k/N) * 125 ms (independent speakers: phases
spread over a step) whatever the replies do, and times each reply against its chunk.

Lines: {"bench": "server_sessions", sessions, at_cadence, rtt_ms {p50, p90, p99, max} over all
replies, worst_session_p99_ms, replies, expected, dropped_in, dropped_out, missing, step_ms
{p50, p99} and rows_per_step (the server's own figures over the run), ...}; "server_config"
first. A session is at cadence when every chunk got its reply (none dropped by the server, none
missing) and its p99 round trip is at most --deadline-ms (default 250: a reply arrives before
the chunk after next is sent, so the user hears the model with at most one chunk of delay
beyond the step itself).

Needs: torch, numpy (both processes: numpy only for the clients), fastapi, uvicorn, websockets
(and what they depend on); not soundfile, soxr or sounddevice.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from config import ArgumentParser  # noqa: E402
from config.transformer_config import KV_DTYPE_NAMES, QUANTIZE_MODES  # noqa: E402 (no torch)
from model.protocol import CHUNK, SAMPLE_RATE, float_to_pcm, percentiles  # noqa: E402 (numpy only)

STEP_S = CHUNK / SAMPLE_RATE


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def rtt_stats(values_ms) -> dict:
    """p50, p90, p99 and max of round trips in ms (None without values)."""
    return {**percentiles(values_ms, (50, 90, 99)), "max": round(float(max(values_ms)), 2) if len(values_ms) else None}


def synthetic_chunks(seconds: float, seed: int) -> list[bytes]:
    """Speech-like 16-bit chunks: a gliding tone with noise bursts (never silent)."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds / STEP_S) * CHUNK) / SAMPLE_RATE
    x = 0.2 * np.sin(2 * np.pi * (120 + 10 * (seed % 8)) * t * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t)))
    x += 0.05 * g.standard_normal(t.shape) * (np.sin(2 * np.pi * 3 * t) > 0)
    pcm = float_to_pcm(x)
    return [pcm[i:i + CHUNK].tobytes() for i in range(0, len(pcm), CHUNK)]


# --- the server (child process) -----------------------------------------------------------------

def serve(args) -> None:
    import dataclasses

    import torch

    import inference_server as srv
    from config.codec_config import PRESETS as CODEC_PRESETS
    from config.transformer_config import PRESETS
    from model import Codec, HertzDev, build
    from model.live import LiveEngine
    from model.quant import quantize_model, weight_bytes

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t = time.time()
    model = build(HertzDev, dataclasses.replace(PRESETS[args.size], duplex=True), device=args.device, dtype=dtype)
    codec_size = args.size if args.size in CODEC_PRESETS else "hertz_dev"
    model.codec = build(Codec, CODEC_PRESETS[codec_size], device=args.device, dtype=dtype)
    if args.quantize != "none":  # layer by layer: each float weight is dropped once its layer is quantized
        quantize_model(model, args.quantize)
    model = model.eval().requires_grad_(False)
    engine = LiveEngine(model, max_sessions=args.max_sessions, compile=False if args.no_compile else "auto",
                        cuda_graphs=False if args.no_cuda_graphs else None, kv_dtype=args.kv_dtype)
    print(f"built {args.size} ({args.quantize} weights: {weight_bytes(model)['total'] / 1e9:.3f} GB, "
          f"{args.kv_dtype} KV caches of {args.max_sessions} rows: {engine.state.kv_bytes / 1e9:.3f} GB) on "
          f"{args.device} in {time.time() - t:.1f} s; warming up", file=sys.stderr, flush=True)
    # Every client of a run connects at once: no bucket for new sessions.
    limits = srv.Limits(start_rate=1000, start_burst=1000)
    server = srv.Server(engine, max_queue=args.queue_chunks, limits=limits)
    try:
        srv.serve(server, "127.0.0.1", args.port, log_level="warning")
    except KeyboardInterrupt:
        pass


# --- the clients ------------------------------------------------------------------------------

async def session(url: str, chunks: list[bytes], phase: float, t0: float, grace: float) -> dict:
    """Stream `chunks` at real time from t0 + phase; returns round trips (ms) and counts. Replies
    are awaited until `grace` seconds after the last chunk's time; those still unanswered then
    are `missing`."""
    from websockets.asyncio.client import connect
    sent_at: list[float] = []
    rtt: list[float] = []
    pending = 0  # index of the oldest unanswered chunk
    dropped = 0
    async with connect(url, max_size=None, open_timeout=60) as ws:
        async def send():
            for i, c in enumerate(chunks):
                await asyncio.sleep(max(0.0, t0 + phase + i * STEP_S - time.perf_counter()))
                sent_at.append(time.perf_counter())
                await ws.send(c)

        sender = asyncio.create_task(send())
        deadline = t0 + phase + len(chunks) * STEP_S + grace
        try:
            while pending < len(chunks):
                try:
                    msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
                if isinstance(msg, bytes):
                    rtt.append(1000 * (time.perf_counter() - sent_at[pending]))
                    pending += 1
                else:
                    m = json.loads(msg)
                    if m.get("type") == "dropped":
                        dropped += m["chunks"]
                        pending += m["chunks"]
        finally:
            sender.cancel()
    return {"rtt": rtt, "replies": len(rtt), "dropped": dropped, "missing": len(chunks) - pending}


def health(http: str, window: float | None = None) -> dict:
    url = http + "/health" + (f"?window={window}" if window else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def run_sessions(ws: str, n: int, seconds: float, grace: float) -> list[dict]:
    chunks = [synthetic_chunks(seconds, seed=k) for k in range(n)]
    t0 = time.perf_counter() + 1.0  # connect everyone first
    return await asyncio.gather(*(session(ws + "/audio", chunks[k], k * STEP_S / n, t0, grace) for k in range(n)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=None, help="N values (default 1 2 4 8 12 16)")
    ap.add_argument("--seconds", type=float, default=None, help="streaming time per N (default 20)")
    ap.add_argument("--size", default=None, help="transformer preset (default hertz_dev; --smoke: tiny)")
    ap.add_argument("--device", default=None, help="default cuda (--smoke: cpu)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (--smoke: float32)")
    ap.add_argument("--max-sessions", type=int, default=None, help="engine rows (default: the largest N)")
    ap.add_argument("--queue-chunks", type=int, default=4)
    ap.add_argument("--quantize", choices=("none",) + QUANTIZE_MODES, default="none",
                    help="weight-only quantization of the transformer (model/quant.py)")
    ap.add_argument("--kv-dtype", choices=KV_DTYPE_NAMES, default="auto", help="KV caches: the weights' dtype or fp8")
    ap.add_argument("--no-compile", action="store_true",
                    help="no torch.compile of the transformer block (the engine compiles it on CUDA by default)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--deadline-ms", type=float, default=250.0, help="p99 round trip a session at cadence stays under")
    ap.add_argument("--grace-s", type=float, default=3.0,
                    help="seconds after a run's last chunk to wait for replies still queued (then counted missing)")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, N = 1 2, 3 s: checks the benchmark runs")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = dict(sessions=[1, 2], seconds=3.0, size="tiny", device="cpu", dtype="float32") if args.smoke else \
        dict(sessions=[1, 2, 4, 8, 12, 16], seconds=20.0, size="hertz_dev", device="cuda", dtype="bfloat16")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.max_sessions = args.max_sessions or max(args.sessions)
    if args.serve:
        return serve(args)

    port = free_port()
    child = [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port), "--size", args.size,
             "--device", args.device, "--dtype", args.dtype, "--max-sessions", str(args.max_sessions),
             "--queue-chunks", str(args.queue_chunks), "--quantize", args.quantize, "--kv-dtype", args.kv_dtype,
             "--sessions", *map(str, args.sessions)]
    child += ["--no-compile"] * args.no_compile + ["--no-cuda-graphs"] * args.no_cuda_graphs
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    t = time.time()
    proc = subprocess.Popen(child)  # its output goes to ours (stderr: progress and errors)
    try:
        while True:
            try:
                health(http)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode}")
                if time.time() - t > args.startup_timeout:
                    raise SystemExit("the server did not start in time")
                time.sleep(0.5)
        emit(bench="server_config", size=args.size, device=args.device, dtype=args.dtype, quantize=args.quantize,
             kv_dtype=args.kv_dtype, engine_rows=args.max_sessions,
             compile_block=args.device.startswith("cuda") and not args.no_compile,
             cuda_graphs=args.device.startswith("cuda") and not args.no_cuda_graphs, queue_chunks=args.queue_chunks,
             seconds=args.seconds, deadline_ms=args.deadline_ms, startup_s=round(time.time() - t, 1))
        for n in args.sessions:
            if n > args.max_sessions:
                emit(bench="server_sessions", sessions=n, skipped=f"more than the {args.max_sessions} engine rows")
                continue
            before = health(http)
            t_run = time.time()
            results = asyncio.run(run_sessions(ws, n, args.seconds, args.grace_s))
            after = health(http, window=time.time() - t_run)
            expected = int(args.seconds / STEP_S)
            per = [rtt_stats(r["rtt"])["p99"] for r in results]
            at_cadence = sum(r["replies"] == expected and p is not None and p <= args.deadline_ms
                             for r, p in zip(results, per))
            emit(bench="server_sessions", sessions=n, at_cadence=at_cadence,
                 rtt_ms=rtt_stats([x for r in results for x in r["rtt"]]),
                 worst_session_p99_ms=max((p for p in per if p is not None), default=None),
                 replies=sum(r["replies"] for r in results), expected=n * expected,
                 dropped_in=after["dropped_in"] - before["dropped_in"],
                 dropped_out=after["dropped_out"] - before["dropped_out"],
                 missing=sum(r["missing"] for r in results), steps=after["steps"] - before["steps"],
                 step_ms=after["step_ms"], rows_per_step=after["batch_mean"],
                 server_chunk_latency_ms=after["chunk_latency_ms"])
            deadline = time.time() + 30
            while health(http)["sessions"] and time.time() < deadline:
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
