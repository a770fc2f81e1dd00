"""Live full-duplex conversation with hertz-dev over websockets.

    python inference_server.py                                   # official duplex weights, 127.0.0.1:8000
    python inference_server.py --host 0.0.0.0 --token "$(openssl rand -hex 16)" --max-sessions 8
    python inference_server.py --checkpoint checkpoints/transformer/best.safetensors --device cpu
    python inference_server.py --prompt-path prompts/bob_mono.wav --recordings recordings/

Each websocket connection to /audio is a session with its own slot in the live engine: every
2000-sample user chunk (125 ms at 16 kHz) is one model step and 2000 samples of model audio back,
the user on channel 0 and the model on channel 1 of the model's context. Frames are binary 16-bit
little-endian PCM (4000 bytes), or the original server's text frames `data:audio/raw;base64,...`
(replies come in the format of the chunk they answer, so the original inference_client.py works
unchanged); other text frames are JSON control messages (`set_params`, `reset`, `status`).

The weights load once into a `LiveEngine`; a single GPU worker thread owns it and steps every
session whose chunk is ready in one batched forward (the others stay frozen), so the event loop
never waits on the GPU. Bounded per-session queues drop the oldest input when a client sends
faster than real time or compute falls behind, and count it. GET / serves the browser client,
GET /health reports load and latency, POST /set_temperature is the original's endpoint. See the
README's "Live conversation" section for the protocol.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response

log = logging.getLogger("hertz.server")

SAMPLE_RATE = 16000
CHUNK = 2000                          # samples per step: one latent, 125 ms
CHUNK_BYTES = 2 * CHUNK               # 16-bit PCM
TEXT_PREFIX = "data:audio/raw;base64,"  # the original server's audio text frames
PARAM_NAMES = ("token_temp", "top_p", "min_p", "mixture_temp", "gaussian_temp")
WEB_DIR = Path(__file__).resolve().parent / "web"

# Close codes (RFC 6455 and the IANA registry); 1009 comes from the websocket layer itself.
CLOSE_POLICY = 1008       # too many bad messages, or a client that does not read its replies
CLOSE_TOO_BIG = 1009      # a message over --max-message-bytes
CLOSE_INTERNAL = 1011     # the engine failed for this session
CLOSE_TRY_AGAIN = 1013    # every slot is taken: try again later

MAX_BAD_MESSAGES = 32     # a session that sends more than this many bad messages is closed
MAX_OUTBOX_AUDIO = 16     # replies waiting for a slow client (2 s); older ones are dropped
MAX_OUTBOX = 256          # everything waiting; beyond it the client is not reading: closed


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1] (the original's scale: / 32767)."""
    return np.clip(pcm.astype(np.float32) / 32767.0, -1.0, 1.0)


def float_to_pcm(audio: np.ndarray) -> np.ndarray:
    """float audio -> int16 little-endian PCM, clipped (no wrap-around on loud samples)."""
    return np.clip(np.round(np.asarray(audio, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")


def percentiles(values, qs=(50, 99)) -> dict:
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in qs}


# --- the engine and its thread ----------------------------------------------------------------

@dataclass
class Chunk:
    """One user chunk on its way through the engine."""
    session: "Session"
    pcm: np.ndarray           # (2000,) int16, as received
    fmt: str                  # "binary" | "text": the format of the reply
    t_recv: float             # time.perf_counter() at arrival


class EngineWorker:
    """The only code that touches the `LiveEngine`, on one thread of its own.

    Sessions hand chunks to `submit` (a per-row bounded queue); the thread steps every row that
    has a chunk in one `LiveEngine.step` (the `active` mask freezes the others) and hands each
    reply back to its session on the event loop. Engine commands (reset, release, parameters)
    run on the same thread between steps, in the order they were issued.
    """

    def __init__(self, engine, max_queue: int = 4):
        self.engine = engine
        self.rows = engine.max_sessions
        self.max_queue = max_queue
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.cond = threading.Condition()
        self.inbox = [collections.deque() for _ in range(self.rows)]
        self.dropped = [0] * self.rows          # drops not yet reported to the row's session
        self.commands: collections.deque = collections.deque()
        self.stopping = False
        self.ready = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.history: collections.deque = collections.deque(maxlen=4000)  # (time, step ms, rows stepped)
        self.steps = 0
        self.failed: Optional[BaseException] = None

    # -- lifecycle (called from the main thread) --
    def start(self, warmup: bool = True) -> None:
        """Start the thread; with `warmup`, capture the engine's CUDA graphs first (on the
        thread that will replay them) and return once done."""
        self.thread = threading.Thread(target=self._run, args=(warmup,), name="engine", daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.failed is not None:
            raise RuntimeError("the engine failed to warm up") from self.failed

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # -- called from the event loop --
    def submit(self, row: int, chunk: Chunk) -> bool:
        """Queue a chunk for `row`; returns True if the queue was full and its oldest chunk was
        dropped (reported to the session just before the reply to the next chunk stepped)."""
        with self.cond:
            q = self.inbox[row]
            dropped = len(q) >= self.max_queue
            if dropped:
                q.popleft()
                self.dropped[row] += 1
            q.append(chunk)
            self.cond.notify()
        return dropped

    def call(self, fn: Callable, *args) -> asyncio.Future:
        """Run `fn(engine, *args)` on the engine thread; the future resolves on the loop."""
        fut = self.loop.create_future()
        with self.cond:
            if self.stopping or not self.thread.is_alive():
                fut.set_exception(RuntimeError("the engine is stopped"))
                return fut
            self.commands.append((fn, args, fut))
            self.cond.notify()
        return fut

    async def open_row(self, row: int, params, seed: int, prompt=None) -> None:
        await self.call(_engine_reset, row, params, seed, prompt)

    def release_row(self, row: int) -> None:
        """Free `row`: its queued chunks are discarded now, the engine slot once the commands
        before it have run (a session opened in the row later is reset after that)."""
        with self.cond:
            self.inbox[row].clear()
            self.dropped[row] = 0
        self.call(_engine_release, row).add_done_callback(_log_failure)

    async def set_params(self, row: int, params) -> None:
        await self.call(_engine_set_params, row, params)

    def stats(self, window_s: Optional[float] = None) -> dict:
        """Step count, and step time and rows per step over the last `window_s` seconds (default:
        the last 4000 steps)."""
        since = -1.0 if window_s is None else time.perf_counter() - window_s
        with self.cond:
            recent = [(ms, n) for t, ms, n in self.history if t >= since]
            queued = sum(len(q) for q in self.inbox)
        return {"steps": self.steps, "step_ms": percentiles([ms for ms, _ in recent]),
                "batch_mean": round(float(np.mean([n for _, n in recent])), 2) if recent else None,
                "queued_chunks": queued}

    # -- the thread --
    def _settle(self, fut: asyncio.Future, result=None, exc: Optional[BaseException] = None) -> None:
        def settle():
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(result)
        self.loop.call_soon_threadsafe(settle)

    def _run(self, warmup: bool) -> None:
        try:
            if warmup:
                self.engine.warmup()
        except BaseException as e:  # reported by start()
            self.failed = e
            self.ready.set()
            return
        self.ready.set()
        B = self.rows
        chunks = np.zeros((B, CHUNK), dtype=np.float32)
        while True:
            with self.cond:
                while not (self.stopping or self.commands or any(self.inbox)):
                    self.cond.wait()
                if self.stopping:
                    commands, self.commands = list(self.commands), collections.deque()
                    break
                commands, self.commands = list(self.commands), collections.deque()
            for fn, args, fut in commands:
                try:
                    self._settle(fut, fn(self.engine, *args))
                except Exception as e:
                    log.exception("engine command %s failed", fn.__name__)
                    self._settle(fut, exc=e)
            with self.cond:
                batch = []
                for r, q in enumerate(self.inbox):
                    if q:
                        batch.append((r, q.popleft(), self.dropped[r]))
                        self.dropped[r] = 0
            if not batch:
                continue
            active = np.zeros(B, dtype=bool)
            chunks.fill(0)
            for r, chunk, _ in batch:
                chunks[r] = pcm_to_float(chunk.pcm)
                active[r] = True
            t = time.perf_counter()
            try:
                out = _engine_step(self.engine, chunks, active).numpy()
            except Exception as e:
                log.exception("engine step failed; closing the sessions of this step")
                for r, chunk, _ in batch:
                    self.loop.call_soon_threadsafe(chunk.session.on_engine_error, e)
                continue
            ms = 1000 * (time.perf_counter() - t)
            replies = float_to_pcm(out)
            with self.cond:
                self.history.append((t, ms, len(batch)))
                self.steps += 1
            for r, chunk, dropped in batch:
                self.loop.call_soon_threadsafe(chunk.session.on_reply, chunk, replies[r], dropped)
        for fn, args, fut in commands:
            self._settle(fut, exc=RuntimeError("the engine is stopped"))


# The engine API, used only through these (one place to change if it does).
def _engine_reset(engine, row, params, seed, prompt):
    import torch
    engine.reset(row, params, seed=seed, prompt=None if prompt is None else torch.from_numpy(prompt))


def _engine_step(engine, chunks, active):
    return engine.step(chunks, active)


def _engine_release(engine, row):
    engine.release(row)


def _engine_set_params(engine, row, params):
    engine.set_params(row, params)


# --- recordings ---------------------------------------------------------------------------------

class Recorder:
    """A session's conversation streamed to a stereo 16-bit WAV (channel 0 user, channel 1 model):
    written to a hidden `.part` file beside the target and renamed over it when the session ends,
    so a reader never sees half a file and memory does not grow with the conversation. Every
    method does file I/O: run them on the server's disk thread."""

    def __init__(self, path: Path, max_frames: int):
        self.path, self.max_frames = Path(path), max_frames
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.file = None
        self.frames = 0
        self.truncated = False

    def open(self) -> None:
        import soundfile as sf
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = sf.SoundFile(str(self.tmp), "w", SAMPLE_RATE, 2, "PCM_16", format="WAV")

    def write(self, stereo: np.ndarray) -> None:
        """stereo (T, 2) int16."""
        if self.file is None:  # open() failed (and said so)
            return
        room = self.max_frames - self.frames
        if room < len(stereo):
            self.truncated = True
            stereo = stereo[:max(room, 0)]
        if len(stereo):
            self.file.write(stereo)
            self.frames += len(stereo)

    def close(self) -> Optional[Path]:
        if self.file is None:
            return None
        self.file.close()
        if self.truncated:
            log.warning("%s: cut at %.0f s (--max-recording-seconds)", self.path.name, self.max_frames / SAMPLE_RATE)
        if self.frames == 0:
            os.remove(self.tmp)
            return None
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return self.path


# --- sessions -----------------------------------------------------------------------------------

class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise NonFinite(f"{name} is not a finite number")


def parse_params(base, values: dict, names: dict[str, str]):
    """`base` SamplingParams updated from a dict of {given name: value}; `names` maps the accepted
    names to SamplingParams fields. Raises ProtocolError for unknown names and for values that
    are not finite non-negative numbers in range."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ProtocolError("bad_params", f"unknown parameter(s) {unknown}; known: {sorted(names)}")
    update = {}
    for name, value in values.items():
        if type(value) not in (int, float):  # bool is an int subclass: refuse it explicitly
            raise ProtocolError("bad_params", f"{name} must be a number, got {json.dumps(value)}")
        update[names[name]] = float(value)
    try:
        return dataclasses.replace(base, **update).validate()
    except ValueError as e:
        raise ProtocolError("bad_params", str(e)) from None


class Session:
    """One websocket connection: its engine row, parameters, seed, queues, counters, replay
    position and recording. Lives on the event loop; the engine thread reaches it only through
    `loop.call_soon_threadsafe(session.on_reply, ...)`."""

    def __init__(self, server: "Server", ws, row: int, params, seed: int):
        self.server, self.ws, self.row = server, ws, row
        self.id = uuid.uuid4().hex[:12]
        self.params, self.seed = params, seed
        self.started = time.time()
        self.outbox: collections.deque = collections.deque()
        self.wakeup = asyncio.Event()
        self.closing = asyncio.Event()  # set by fail()
        self.closed = False
        self.close_code: Optional[tuple[int, str]] = None
        self.replay_left = len(server.replay)
        self.counts = collections.Counter()
        self.model_prev = np.zeros(CHUNK, dtype="<i2")  # the model's audio of the current frame
        self.recorder: Optional[Recorder] = None

    def info(self) -> dict:
        return {"session": self.id, "row": self.row, "seconds": round(time.time() - self.started, 1),
                "replay_left": self.replay_left, **{k: self.counts[k] for k in
                ("chunks_in", "chunks_out", "dropped_in", "dropped_out", "bad_messages", "replayed")}}

    # -- outgoing --
    def send(self, message, audio: bool = False) -> None:
        """Queue a message (bytes or str) for the client. Audio over MAX_OUTBOX_AUDIO waiting
        drops the oldest audio (the client is not keeping up); a backlog over MAX_OUTBOX closes."""
        if self.closed:
            return
        self.outbox.append((audio, message))
        if audio and sum(a for a, _ in self.outbox) > MAX_OUTBOX_AUDIO:
            for i, (a, _) in enumerate(self.outbox):
                if a:
                    del self.outbox[i]
                    break
            self.counts["dropped_out"] += 1
            self.server.counts["dropped_out"] += 1
        if len(self.outbox) > MAX_OUTBOX:
            self.fail(CLOSE_POLICY, "the client is not reading its replies")
        self.wakeup.set()

    def send_json(self, **message) -> None:
        self.send(json.dumps(message))

    def send_audio(self, pcm: np.ndarray, fmt: str) -> None:
        data = pcm.astype("<i2", copy=False).tobytes()
        self.send(data if fmt == "binary" else TEXT_PREFIX + base64.b64encode(data).decode("ascii"), audio=True)
        self.counts["chunks_out"] += 1

    def error(self, code: str, message: str) -> None:
        """Answer a bad message with {"type": "error"}; too many of them close the session."""
        self.counts["bad_messages"] += 1
        self.server.counts["bad_messages"] += 1
        self.send_json(type="error", error=code, message=message)
        if self.counts["bad_messages"] > MAX_BAD_MESSAGES:
            self.fail(CLOSE_POLICY, f"more than {MAX_BAD_MESSAGES} bad messages")

    def fail(self, code: int, reason: str) -> None:
        """Close this session (after what is queued has been sent)."""
        if self.close_code is None:
            self.close_code = (code, reason)
            self.wakeup.set()
            self.closing.set()

    async def sender(self) -> None:
        """Send what is queued, in order; close when `fail` was called."""
        ws = self.ws
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while self.outbox:
                    _, message = self.outbox.popleft()
                    if isinstance(message, bytes):
                        await ws.send_bytes(message)
                    else:
                        await ws.send_text(message)
                if self.close_code is not None:
                    await ws.close(*self.close_code)
                    return
        except Exception:  # the client went away mid-send: the receive loop sees the disconnect
            self.closed = True

    # -- incoming --
    async def receive(self) -> None:
        ws = self.ws
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                self.on_binary(message["bytes"])
            elif message.get("text") is not None:
                await self.on_text(message["text"])

    def on_binary(self, data: bytes) -> None:
        if len(data) != CHUNK_BYTES:
            hint = " (an odd byte count is not 16-bit PCM)" if len(data) % 2 else ""
            return self.error("bad_chunk", f"a binary frame is one chunk of {CHUNK} samples of 16-bit little-endian "
                                           f"PCM, {CHUNK_BYTES} bytes; got {len(data)} bytes{hint}")
        self.on_audio(np.frombuffer(data, dtype="<i2"), "binary")

    async def on_text(self, text: str) -> None:
        if text.startswith("data:"):
            header, comma, payload = text.partition(",")
            if not comma or not header.endswith(";base64"):
                return self.error("bad_frame", "an audio text frame is data:audio/raw;base64,<16-bit PCM>")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                return self.error("bad_base64", "the audio text frame is not valid base64")
            if len(data) != CHUNK_BYTES:
                hint = " (an odd byte count is not 16-bit PCM)" if len(data) % 2 else ""
                return self.error("bad_chunk", f"an audio frame is one chunk of {CHUNK} samples of 16-bit PCM, "
                                               f"{CHUNK_BYTES} bytes; got {len(data)} bytes{hint}")
            return self.on_audio(np.frombuffer(data, dtype="<i2"), "text")
        try:
            message = json.loads(text, parse_constant=_reject_constant)
        except NonFinite as e:
            return self.error("bad_params", f"{e}: NaN and Infinity are not accepted")
        except ValueError as e:
            return self.error("bad_json", f"a text frame is a JSON control message or a data:audio/raw;base64 "
                                          f"audio frame; this one is neither ({e})")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return self.error("bad_message", 'a control message is a JSON object with a string "type"')
        try:
            await self.on_control(message)
        except ProtocolError as e:
            self.error(e.code, e.message)

    def on_audio(self, pcm: np.ndarray, fmt: str) -> None:
        if self.replay_left > 0:  # the prompt is played back before the conversation goes live
            self.send_audio(self.server.replay[len(self.server.replay) - self.replay_left], fmt)
            self.replay_left -= 1
            self.counts["replayed"] += 1
            return
        self.counts["chunks_in"] += 1
        if self.server.worker.submit(self.row, Chunk(self, pcm, fmt, time.perf_counter())):
            self.counts["dropped_in"] += 1
            self.server.counts["dropped_in"] += 1

    async def on_control(self, message: dict) -> None:
        kind = message["type"]
        echo = {"id": message["id"]} if "id" in message else {}
        body = {k: v for k, v in message.items() if k not in ("type", "id")}
        if kind == "set_params":
            params = parse_params(self.params, body, {n: n for n in PARAM_NAMES})
            await self.server.worker.set_params(self.row, params)
            self.params = params
            self.send_json(type="ack", request=kind, params=dataclasses.asdict(params), **echo)
        elif kind == "reset":
            if set(body) - {"seed"}:
                raise ProtocolError("bad_message", f"reset takes only an optional seed, got {sorted(body)}")
            seed = self.server.seed_from(body.get("seed"))
            # Chunks still queued from before are stepped after the reset, in the new conversation.
            await self.server.worker.open_row(self.row, self.params, seed, self.server.prompt)
            self.seed = seed
            self.replay_left = len(self.server.replay)
            self.model_prev = np.zeros(CHUNK, dtype="<i2")
            self.send_json(type="ack", request=kind, seed=seed, **echo)
        elif kind == "status":
            self.send_json(type="status", **self.info(), seed=self.seed, params=dataclasses.asdict(self.params), **echo)
        else:
            raise ProtocolError("unknown_type", f"unknown control message type {kind!r}; known: set_params, reset, status")

    # -- from the engine thread (via the loop) --
    def on_reply(self, chunk: Chunk, reply: np.ndarray, dropped: int) -> None:
        if self.closed:
            return
        if dropped and chunk.fmt == "binary":  # the original's text clients expect audio only
            self.send_json(type="dropped", chunks=dropped, total=self.counts["dropped_in"])
        self.send_audio(reply, chunk.fmt)
        # The model's context frame is (this user chunk, the model audio of the previous reply).
        self.record(np.stack([chunk.pcm, self.model_prev], axis=1))
        self.model_prev = reply
        now = time.perf_counter()
        self.server.latency_ms.append((now, 1000 * (now - chunk.t_recv)))

    def on_engine_error(self, e: BaseException) -> None:
        self.fail(CLOSE_INTERNAL, f"engine error: {type(e).__name__}")

    def record(self, stereo: np.ndarray) -> None:
        if self.recorder is not None:  # the disk thread keeps the order: no need to wait
            self.server.disk(self.recorder.write, stereo)


class Server:
    """What the app's routes share: the engine worker, the free rows, the sessions, the prompt,
    the default sampling parameters, and counters. Created once per app (no module state)."""

    def __init__(self, engine, token: Optional[str] = None, prompt: Optional[np.ndarray] = None,
                 replay_seconds: Optional[float] = None, recordings: Optional[str] = None,
                 max_recording_seconds: float = 3600.0, max_queue: int = 4, params=None, warmup: bool = True):
        from model import SamplingParams
        self.engine = engine
        self.token = token
        self.worker = EngineWorker(engine, max_queue)
        self.free = list(range(engine.max_sessions))[::-1]
        self.sessions: dict[str, Session] = {}
        self.params = (params or SamplingParams()).validate()
        self.prompt = prompt  # (2, N) float32, [user, model], N a multiple of CHUNK
        self.replay: list[np.ndarray] = []
        self.prompt_pcm = None if prompt is None else float_to_pcm(prompt.T)  # (N, 2): the start of each recording
        if prompt is not None:
            mono = float_to_pcm(prompt.mean(axis=0))  # the original replays both speakers, mixed
            n = len(mono) // CHUNK if replay_seconds is None else min(len(mono) // CHUNK, int(replay_seconds * SAMPLE_RATE) // CHUNK)
            self.replay = [mono[len(mono) - (n - i) * CHUNK:len(mono) - (n - i - 1) * CHUNK] for i in range(n)]
        self.recordings = Path(recordings) if recordings else None
        self.max_recording_frames = int(max_recording_seconds * SAMPLE_RATE)
        self.counts = collections.Counter()
        self.latency_ms: collections.deque = collections.deque(maxlen=4000)  # (time, chunk arrival to reply ms)
        self.started = time.time()
        self.warmup = warmup
        self._disk: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.index_html = (WEB_DIR / "index.html").read_bytes()

    # -- lifecycle --
    def start(self) -> None:
        """Warm the engine up and start its thread (before the server listens)."""
        self.worker.start(self.warmup)
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disk")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.worker.loop = loop

    def stop(self) -> None:
        self.worker.stop()
        if self._disk is not None:
            self._disk.shutdown(wait=True)

    def disk(self, fn, *args) -> asyncio.Future:
        """Run file I/O on the disk thread (one thread: a session's writes stay in order)."""
        fut = asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)
        fut.add_done_callback(_log_failure)
        return fut

    # -- helpers --
    def authorized(self, headers, query) -> bool:
        if self.token is None:
            return True
        given = query.get("token")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def seed_from(value) -> int:
        if value is None:
            return secrets.randbits(62)
        if type(value) is not int or not 0 <= value < 2 ** 63:
            raise ProtocolError("bad_seed", f"seed must be an integer in [0, 2**63), got {json.dumps(value)}")
        return value

    def health(self, window_s: Optional[float] = None) -> dict:
        since = -1.0 if window_s is None else time.perf_counter() - window_s
        return {
            "status": "ok",
            "sessions": len(self.sessions),
            "capacity": self.engine.max_sessions,
            "uptime_s": round(time.time() - self.started, 1),
            **self.worker.stats(window_s),
            "chunk_latency_ms": percentiles([ms for t, ms in list(self.latency_ms) if t >= since]),
            **{k: self.counts[k] for k in ("sessions_total", "refused", "dropped_in", "dropped_out", "bad_messages")},
            "prompt_s": 0 if self.prompt is None else self.prompt.shape[1] / SAMPLE_RATE,
            "replay_chunks": len(self.replay),
            "details": [s.info() for s in self.sessions.values()],
        }

    # -- a session, start to end --
    async def run_session(self, ws) -> None:
        try:
            seed = self.seed_from(int(ws.query_params["seed"])) if "seed" in ws.query_params else self.seed_from(None)
        except (ValueError, ProtocolError):
            await ws.accept()
            return await ws.close(CLOSE_POLICY, "seed must be an integer in [0, 2**63)")
        await ws.accept()
        if not self.free:
            self.counts["refused"] += 1
            return await ws.close(CLOSE_TRY_AGAIN, f"the server is at capacity ({self.engine.max_sessions} sessions); "
                                                   "try again later")
        row = self.free.pop()
        session = Session(self, ws, row, self.params, seed)
        try:
            await self.worker.open_row(row, self.params, seed, self.prompt)
        except Exception as e:
            self.free.append(row)
            return await ws.close(CLOSE_INTERNAL, f"could not start a session: {type(e).__name__}")
        self.sessions[session.id] = session
        self.counts["sessions_total"] += 1
        log.info("session %s started in row %d (%d/%d)", session.id, row, len(self.sessions), self.engine.max_sessions)
        if self.recordings is not None:
            name = time.strftime("%Y%m%d-%H%M%S") + f"-{session.id}.wav"
            session.recorder = Recorder(self.recordings / name, self.max_recording_frames)
            self.disk(session.recorder.open)
            if self.prompt is not None:  # the recording starts with the prompt, as the original's
                session.record(self.prompt_pcm)
        sender = asyncio.create_task(session.sender())
        receiver = asyncio.create_task(session.receive())
        closing = asyncio.create_task(session.closing.wait())
        try:
            # Until the client leaves, or the session is closed from our side (then the sender
            # flushes and sends the close frame; a client that does not read gets 5 s).
            await asyncio.wait({receiver, closing}, return_when=asyncio.FIRST_COMPLETED)
            if session.close_code is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(sender), timeout=5)
        finally:
            session.closed = True
            for task in (sender, receiver, closing):
                task.cancel()
            if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
                log.info("session %s: %r", session.id, receiver.exception())
            self.worker.release_row(row)
            self.free.append(row)  # safe at once: the next reset of this row runs after the release
            try:
                if session.recorder is not None:  # after the session's writes: one disk thread, in order
                    path = await self.disk(session.recorder.close)
                    if path is not None:
                        log.info("session %s recorded to %s", session.id, path)
            except Exception as e:
                log.error("session %s: the recording failed: %r", session.id, e)
            finally:
                self.sessions.pop(session.id, None)
                log.info("session %s ended: %s", session.id, session.info())

    async def set_temperature(self, token_temp, categorical_temp, gaussian_temp, session_id) -> dict:
        names = {"token_temp": "token_temp", "categorical_temp": "mixture_temp", "gaussian_temp": "gaussian_temp"}
        given = {k: v for k, v in (("token_temp", token_temp), ("categorical_temp", categorical_temp),
                                   ("gaussian_temp", gaussian_temp)) if v is not None}
        if session_id is None:
            self.params = parse_params(self.params, given, names)
            target = "new sessions"
            params = self.params
        else:
            session = self.sessions.get(session_id)
            if session is None:
                raise ProtocolError("unknown_session", f"no session {session_id!r}")
            params = parse_params(session.params, given, names)
            await self.worker.set_params(session.row, params)
            session.params = params
            target = f"session {session_id}"
        temps = (params.token_temp, (params.mixture_temp, params.gaussian_temp))
        return {"message": f"Temperature updated to: {temps} for {target}", "status": "success",
                "params": dataclasses.asdict(params)}


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("%r", fut.exception())


# --- the app ----------------------------------------------------------------------------------

def make_app(server: Server):
    """The FastAPI app of a `Server` (call `server.start()` first)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.attach(asyncio.get_running_loop())
        yield  # at shutdown uvicorn closes every websocket with 1012 before this returns

    def require_token(request: Request) -> None:
        if not server.authorized(request.headers, request.query_params):
            raise HTTPException(401, "a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    # No /docs or /openapi.json: they would answer without the token.
    app = FastAPI(title="hertz-dev live", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    http = APIRouter(dependencies=[Depends(require_token)])

    @http.get("/")
    async def index():
        return Response(server.index_html, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    @http.get("/health")
    async def health(window: Optional[float] = None):
        """window: seconds the step and latency figures cover (default: the last 4000 steps)."""
        return server.health(window)

    @http.post("/set_temperature")
    async def set_temperature(token_temp: Optional[float] = None, categorical_temp: Optional[float] = None,
                              gaussian_temp: Optional[float] = None, session: Optional[str] = None):
        try:
            return await server.set_temperature(token_temp, categorical_temp, gaussian_temp, session)
        except ProtocolError as e:
            return JSONResponse({"message": e.message, "status": "error", "error": e.code},
                                status_code=404 if e.code == "unknown_session" else 400)

    app.include_router(http)

    @app.websocket("/audio")
    async def audio(ws: WebSocket):
        if not server.authorized(ws.headers, ws.query_params):
            await ws.close(CLOSE_POLICY, "a valid token is required")  # before accept: HTTP 403
            return
        await server.run_session(ws)

    return app


# --- command line -------------------------------------------------------------------------------

def uvicorn_config(app, host="127.0.0.1", port: int = 8000, max_message_bytes: int = 1 << 16,
                   log_level: str = "info", access_log: bool = False):
    # per-message deflate off: PCM does not compress and it would cost CPU on every frame.
    return uvicorn.Config(app, host=host, port=port, ws="websockets-sansio", ws_max_size=max_message_bytes,
                          ws_per_message_deflate=False, log_level=log_level, access_log=access_log,
                          lifespan="on", timeout_graceful_shutdown=5)


def serve(server: Server, host: str, port: int, max_message_bytes: int = 1 << 16, log_level: str = "info",
          access_log: bool = False, sockets=None) -> None:
    """Start the engine, then serve until interrupted."""
    server.start()
    try:
        config = uvicorn_config(make_app(server), host, port, max_message_bytes, log_level, access_log)
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        server.stop()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it: use --token)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=os.environ.get("HERTZ_TOKEN"),
                    help="require this token on every call (Authorization: Bearer TOKEN or ?token=TOKEN); "
                         "default: $HERTZ_TOKEN")
    ap.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without a token")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--variant", default="duplex", help="official weights (downloaded to --ckpt-dir); the live "
                                                         "server needs the duplex variant")
    src.add_argument("--checkpoint", help="one of our duplex transformer checkpoints (.safetensors)")
    ap.add_argument("--codec", default="auto", help="auto (official, or the one recorded in the checkpoint), official, or a path")
    ap.add_argument("--ckpt-dir", default="ckpt")
    ap.add_argument("--offline", action="store_true", help="never download official weights")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (engine rows); more are refused")
    ap.add_argument("--max-len", type=int, default=None, help="context in latents (default: the model's)")
    ap.add_argument("--no-compile", action="store_true",
                    help="do not torch.compile the transformer block (on CUDA it is by default: ~15 s at start, faster steps)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--encode", choices=("sample", "mean"), default="sample",
                    help="user latents: a draw from the codec posterior (as the original) or its mean")
    ap.add_argument("--prompt-path", help="warm start: every session starts after this conversation (WAV etc.; "
                                          "stereo = [user, model], mono is put on both)")
    ap.add_argument("--replay-seconds", type=float, default=None,
                    help="how much of the prompt's end is played to the client before going live (default: all, "
                         "as the original; 0: none)")
    ap.add_argument("--recordings", help="folder for each session's conversation (stereo WAV: user, model)")
    ap.add_argument("--max-recording-seconds", type=float, default=3600.0)
    ap.add_argument("--queue-chunks", type=int, default=4,
                    help="chunks a session may have waiting; beyond it the oldest is dropped (bounded latency)")
    ap.add_argument("--max-message-bytes", type=int, default=1 << 16, help="larger websocket messages close the session (1009)")
    ap.add_argument("--token-temp", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--mixture-temp", type=float, default=0.5)
    ap.add_argument("--gaussian-temp", type=float, default=0.1)
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--access-log", action="store_true", help="log every HTTP request (the log shows ?token=)")
    args = ap.parse_args(argv)
    if not is_loopback(args.host) and not args.token and not args.insecure:
        ap.error(f"--host {args.host} exposes the server: give a --token (or --insecure to expose it without one)")
    if args.max_sessions < 1 or args.queue_chunks < 1:
        ap.error("--max-sessions and --queue-chunks must be >= 1")
    return args


def load_engine(args):
    import torch
    from model import load_hertz_dev
    from model.live import LiveEngine
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    source = args.checkpoint or args.variant
    log.info("loading %s on %s", source, device)
    model = load_hertz_dev(source, device=device, dtype=dtype, ckpt_dir=args.ckpt_dir, offline=args.offline or None,
                           codec=args.codec)
    return LiveEngine(model, max_sessions=args.max_sessions, max_len=args.max_len,
                      cuda_graphs=False if args.no_cuda_graphs else None, compile=False if args.no_compile else "auto", encode=args.encode)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model import SamplingParams
    try:
        params = SamplingParams(args.token_temp, args.top_p, args.min_p, args.mixture_temp, args.gaussian_temp).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    engine = load_engine(args)
    prompt = None
    if args.prompt_path:
        from model.audio import load_prompt
        prompt = load_prompt(args.prompt_path, 2, SAMPLE_RATE, CHUNK, max_frames=engine.state.max_len - 1)
        log.info("prompt %s: %.1f s", args.prompt_path, prompt.shape[1] / SAMPLE_RATE)
    server = Server(engine, token=args.token, prompt=prompt, replay_seconds=args.replay_seconds,
                    recordings=args.recordings, max_recording_seconds=args.max_recording_seconds,
                    max_queue=args.queue_chunks, params=params)
    where = f"http://{args.host}:{args.port}/"
    log.info("browser client: %s%s", where, "?token=TOKEN" if args.token else "")
    try:
        serve(server, args.host, args.port, args.max_message_bytes, args.log_level, args.access_log)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass


if __name__ == "__main__":
    main()
