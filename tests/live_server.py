"""A real inference server (uvicorn, loopback, a random free port) around a tiny random duplex
model on the CPU, run in a background thread, and a small websocket client for the tests."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS
from model import Codec, HertzDev, build, save_codec, save_transformer
from model.live import LiveEngine
from model.protocol import CHUNK, TEXT_PREFIX, float_to_pcm, pcm_to_float

import inference_server as srv


def tiny_duplex(seed: int = 0) -> HertzDev:
    torch.manual_seed(seed)
    model = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=True)).eval().requires_grad_(False)
    model.codec = build(Codec, CODEC_PRESETS["tiny"]).eval().requires_grad_(False)
    return model


def save_tiny(model: HertzDev, folder: Path) -> Path:
    """Our checkpoint format: codec + transformer .safetensors; returns the transformer's path."""
    folder.mkdir(parents=True, exist_ok=True)
    codec = save_codec(folder / "codec.safetensors", model.codec)
    return save_transformer(folder / "duplex.safetensors", model, codec_source=str(codec))


def speech_like(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """(N,) float32: a gliding tone with noise bursts, never silent."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.25 * np.sin(2 * np.pi * (150 + 50 * seed) * t * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t)))
    x += 0.05 * g.standard_normal(t.shape) * (np.sin(2 * np.pi * 2 * t) > 0)
    return x.astype(np.float32)


def pcm_chunks(audio: np.ndarray) -> list[bytes]:
    pcm = float_to_pcm(audio[: len(audio) // CHUNK * CHUNK])
    return [pcm[i:i + CHUNK].tobytes() for i in range(0, len(pcm), CHUNK)]


def free_socket(send_buffer: int | None = None) -> socket.socket:
    """A listening socket's to be; `send_buffer`: the SO_SNDBUF its connections inherit (the
    kernel's autotuned buffers otherwise absorb megabytes for a client that does not read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


# Tests open sessions, send control messages and stream audio faster than people do.
TEST_LIMITS = srv.Limits(start_rate=100, start_burst=100, control_rate=1000, control_burst=1000, audio_pace=1000)


class SlowEngine:
    """A LiveEngine whose steps take at least `seconds` (compute falling behind), and its resets
    (a session's start, a client's `reset`) `reset_seconds` (a long prompt's prefill)."""

    def __init__(self, engine, seconds: float, reset_seconds: float = 0.0):
        self.engine, self.seconds, self.reset_seconds = engine, seconds, reset_seconds

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.engine.step(*args, **kwargs)

    def reset(self, *args, **kwargs):
        time.sleep(self.reset_seconds)
        return self.engine.reset(*args, **kwargs)


@contextlib.contextmanager
def running_server(model, max_sessions: int = 3, max_message_bytes: int = 1 << 16, slow: float = 0.0,
                   slow_reset: float = 0.0, log_level: str = "warning", access: srv.Access = srv.Access(), limits: srv.Limits = TEST_LIMITS,
                   send_buffer: int | None = None, **kwargs):
    """Yields the `Server` with `.http` and `.ws` base URLs set (and `.port`)."""
    engine = LiveEngine(model, max_sessions=max_sessions)
    server = srv.Server(SlowEngine(engine, slow, slow_reset) if slow or slow_reset else engine, limits=limits, **kwargs)
    server.start()
    sock = free_socket(send_buffer)
    port = sock.getsockname()[1]
    config = srv.uvicorn_config(srv.make_app(server, access), "127.0.0.1", port, max_message_bytes, log_level=log_level,
                                token=server.token)
    userver = srv.HttpServer(config, server)
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not userver.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    server.http, server.ws, server.port = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", port
    try:
        yield server
    finally:
        userver.should_exit = True
        thread.join(timeout=20)
        server.stop()
        sock.close()


def connect(url: str, token: str | None = None, header: bool = True, **kwargs):
    from websockets.asyncio.client import connect as ws_connect
    if token is not None:
        if header:
            kwargs["additional_headers"] = {"Authorization": f"Bearer {token}"}
        else:
            url += ("&" if "?" in url else "?") + f"token={token}"
    return ws_connect(url, max_size=None, open_timeout=10, **kwargs)


async def stream(ws, chunks: list, window: int = 2, text: bool = False) -> list:
    """Send chunks with at most `window` unanswered, collect the replies (bytes, or the decoded
    bytes of text frames) in order. JSON messages in between are returned as dicts."""
    import base64
    import json
    out, sent, got = [], 0, 0
    while got < len(chunks):
        while sent < len(chunks) and sent - got < window:
            c = chunks[sent]
            await ws.send(TEXT_PREFIX + base64.b64encode(c).decode() if text else c)
            sent += 1
        msg = await asyncio.wait_for(ws.recv(), timeout=20)
        if isinstance(msg, bytes):
            out.append(msg)
            got += 1
        elif msg.startswith("data:"):
            out.append(base64.b64decode(msg.split(",")[1]))
            got += 1
        else:
            out.append(json.loads(msg))
    return out


def reference_replies(model, chunks: list, seed: int, params=None, prompt=None, where=(1, 0)) -> np.ndarray:
    """What a session alone in a fresh engine replies: (n, 2000) int16. `where`: (max_sessions,
    row) of the server's session, as float32 results differ in their last bits with the batch
    size and the row (vector lanes); the session is alone in the engine all the same."""
    from model import SamplingParams
    B, row = where
    engine = LiveEngine(model, max_sessions=B)
    engine.reset(row, params or SamplingParams(), seed=seed, prompt=None if prompt is None else torch.from_numpy(prompt))
    out, active = [], np.arange(B) == row
    for c in chunks:
        x = np.zeros((B, CHUNK), dtype=np.float32)
        x[row] = pcm_to_float(np.frombuffer(c, dtype="<i2"))
        out.append(float_to_pcm(engine.step(x, active).numpy()[row]))
    return np.stack(out)


async def where(ws, server) -> tuple[int, int]:
    """(max_sessions, row) of the session on `ws` (a status request; call it before audio)."""
    import json
    await ws.send(json.dumps({"type": "status"}))
    return server.engine.max_sessions, json.loads(await ws.recv())["row"]


def as_pcm(replies: list) -> np.ndarray:
    """The audio among `stream`'s replies (its JSON notices left out)."""
    return np.stack([np.frombuffer(r, dtype="<i2") for r in replies if isinstance(r, bytes)])
