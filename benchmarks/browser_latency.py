"""Capture-to-playback latency of the browser client: the real server (inference_server.py in a
child process, a tiny random duplex model on the CPU, a prompt whose end is replayed) and
web/index.html in headless Chromium, whose fake microphone plays a WAV. One JSON object per line.

    python benchmarks/browser_latency.py                   # 20 s of conversation
    python benchmarks/browser_latency.py --seconds 60 --gpu-step-ms 7.37

Capture to playback is the page's own figure: from the audio-clock time a chunk's last sample
was captured to the time the first sample of the reply to that chunk is played (the prompt's
playback is not timed). It is the round trip (network, server, one model step) plus the jitter
buffer's margin and the wait for the next audio render quantum; the sound card's own output
latency comes on top (`output_latency_ms`, reported apart). The figure a GPU server implies
swaps the CPU step for the GPU's:

    implied_gpu_c2p_p50_ms = c2p_ms.p50 - step_ms.p50 (this CPU server's) + --gpu-step-ms

(--gpu-step-ms default 7.37: the live duplex step p50 of the official-size model on one H200,
from benchmarks/inference.py). It assumes the jitter buffer keeps the same margin, which holds
when the GPU's step time varies no more than the CPU's.

Lines: {"bench": "browser_latency_config", ...} first, then {"bench": "browser_latency",
c2p_ms {p50, p90, p99}, rtt_ms {p50, p90, p99}, step_ms {p50, p99}, margin_ms, max_margin_ms,
max_buffered_ms, buffer_bound_ms, underruns, overflows, trimmed_ms, sent, received, replayed,
timed, dropped, output_latency_ms, implied_gpu_c2p_p50_ms}.

Needs chromium (apt-get install chromium), torch (the server), fastapi, uvicorn, websockets,
soundfile.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from config import ArgumentParser  # noqa: E402
from model.protocol import SAMPLE_RATE, percentiles  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """A page of a headless Chromium, through the DevTools protocol over a websocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]

    async def js(self, expression, gesture=False):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                                 userGesture=gesture)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(self, expression, timeout=30.0):
        deadline = time.time() + timeout
        while not await self.js(expression):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {expression}: {await self.js('JSON.stringify(window.hertz)')}")
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def chromium_page(chromium, profile: Path, mic_wav: Path, url: str, extra=()):
    """Headless Chromium on `url`, its fake microphone playing `mic_wav` (looped); yields the
    page's DevTools websocket URL, and ends the browser on exit. `extra`: more command-line flags."""
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", *extra, url]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("chromium did not start: " + proc.stderr.read().decode(errors="replace")[-2000:])
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(100):
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(url.split("?")[0])]
            if pages:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"no page for {url} among {targets}")
        yield pages[0]["webSocketDebuggerUrl"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def talk(devtools: str, seconds: float) -> dict:
    """Start the page's conversation, let it run `seconds` after the first timed reply, stop it;
    returns window.hertz."""
    from websockets.asyncio.client import connect
    async with connect(devtools, max_size=None) as ws:
        page = Page(ws)
        await page.wait_for("document.readyState === 'complete' && !!window.hertz")
        await page.js("document.getElementById('start').click()", gesture=True)
        await page.wait_for("window.hertz.c2pCount > 0", timeout=60)
        await asyncio.sleep(seconds)
        hertz = json.loads(await page.js("JSON.stringify(window.hertz)"))
        await page.js("document.getElementById('stop').click()", gesture=True)
        return hertz


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny random duplex model in our checkpoint format; returns the transformer's path."""
    import torch
    from config.codec_config import PRESETS as CODEC_PRESETS
    from config.transformer_config import PRESETS
    from model import Codec, HertzDev, build, save_codec, save_transformer
    torch.manual_seed(0)
    model = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=True)).eval()
    model.codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    codec = save_codec(folder / "codec.safetensors", model.codec)
    return save_transformer(folder / "duplex.safetensors", model, codec_source=str(codec))


def tone(seconds: float, rate: int, f0: float, seed: int = 0) -> np.ndarray:
    """A gliding tone with a little noise: never silent."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
    return (x + 0.01 * np.random.default_rng(seed).standard_normal(t.shape)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(folder: Path, prompt_seconds: float, replay_seconds: float):
    """`python inference_server.py` on a tiny model, the CPU and a free port; yields its http URL."""
    import soundfile as sf
    checkpoint = tiny_checkpoint(folder)
    prompt = np.stack([tone(prompt_seconds, SAMPLE_RATE, 200), tone(prompt_seconds, SAMPLE_RATE, 300, 1)], 1)
    sf.write(folder / "prompt.wav", prompt, SAMPLE_RATE)
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "inference_server.py", "--checkpoint", str(checkpoint), "--device", "cpu",
                             "--port", str(port), "--max-sessions", "1", "--prompt-path", str(folder / "prompt.wav"),
                             "--replay-seconds", str(replay_seconds), "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start: " + (folder / "server.log").read_text()[-2000:])
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def summary(hertz: dict, health: dict, gpu_step_ms: float) -> dict:
    c2p = percentiles(hertz["c2p"], (50, 90, 99))
    step = health["step_ms"]
    implied = None if c2p["p50"] is None or step["p50"] is None else round(c2p["p50"] - step["p50"] + gpu_step_ms, 1)
    return dict(bench="browser_latency", c2p_ms=c2p, rtt_ms=percentiles(hertz["rtt"], (50, 90, 99)), step_ms=step,
                margin_ms=round(hertz["marginMs"], 1), max_margin_ms=round(hertz["maxMarginMs"], 1),
                max_buffered_ms=round(hertz["maxBufferedMs"], 1), buffer_bound_ms=hertz["jitter"]["boundMs"],
                underruns=hertz["underruns"], overflows=hertz["overflows"], trimmed_ms=round(hertz["trimmedMs"], 1),
                sent=hertz["sent"], received=hertz["received"], replayed=hertz["replayed"], timed=hertz["timed"],
                dropped=hertz["dropped"], output_latency_ms=hertz["outputLatencyMs"],
                implied_gpu_c2p_p50_ms=implied, gpu_step_ms=gpu_step_ms)


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="conversation measured, after the first timed reply")
    ap.add_argument("--prompt-seconds", type=float, default=1.0, help="the server's prompt")
    ap.add_argument("--replay-seconds", type=float, default=0.5, help="the prompt's end played back first")
    ap.add_argument("--gpu-step-ms", type=float, default=7.37, help="the GPU step time the implied figure assumes")
    ap.add_argument("--chromium", default=find_chromium(), help="the browser (default: chromium on PATH)")
    args = ap.parse_args(argv)
    if not args.chromium:
        raise SystemExit("error: chromium is not installed (apt-get install chromium) or give --chromium PATH")
    import soundfile as sf
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sf.write(folder / "mic.wav", tone(4.0, 48000, 440), 48000, subtype="PCM_16")
        emit(bench="browser_latency_config", seconds=args.seconds, model="tiny (random weights)", device="cpu",
             replay_seconds=args.replay_seconds, chromium=args.chromium)
        with server_process(folder, args.prompt_seconds, args.replay_seconds) as url:
            start = time.perf_counter()
            with chromium_page(args.chromium, folder / "profile", folder / "mic.wav", url + "/") as devtools:
                hertz = asyncio.run(asyncio.wait_for(talk(devtools, args.seconds), args.seconds + 120))
            window = time.perf_counter() - start
            health = json.loads(urllib.request.urlopen(f"{url}/health?window={window:.1f}", timeout=10).read())
        emit(**summary(hertz, health, args.gpu_step_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
