"""Live full-duplex conversation with hertz-dev over websockets.

    python inference_server.py                                   # official duplex weights, 127.0.0.1:8000
    python inference_server.py --host 0.0.0.0 --token "$(openssl rand -hex 16)" --max-sessions 8
    python inference_server.py --checkpoint checkpoints/transformer/best.safetensors --device cpu
    python inference_server.py --prompt-path prompts/bob_mono.wav --recordings recordings/
    python inference_server.py --adapter checkpoints/transformer/best.adapter.safetensors   # a LoRA fine-tune

Each websocket connection to /audio is a session with its own slot in the live engine: every
2000-sample user chunk (125 ms at 16 kHz) is one model step and 2000 samples of model audio back,
the user on channel 0 and the model on channel 1 of the model's context. Frames are binary 16-bit
little-endian PCM (4000 bytes), or the original server's text frames `data:audio/raw;base64,...`
(replies come in the format of the chunk they answer, so the original inference_client.py works
unchanged); other text frames are JSON control messages (`set_params`, `reset`, `status`).

The weights load once into a `LiveEngine`; a single GPU worker thread owns it and steps every
session whose chunk is ready in one batched forward (the others stay frozen), so the event loop
never waits on the GPU. A session's audio is read at most a quarter faster than real time after
a burst (`model.protocol.AUDIO_PACE`): a client sending faster waits on TCP. Bounded per-session
queues drop the oldest input when compute falls behind, and count it. GET / serves the browser client,
GET /health reports load and latency (counts, no session ids), POST /set_temperature (a JSON
body) is the original's endpoint. Foreign Origin and Host headers are refused (`Access`),
expensive control messages are rate-limited and silent sessions closed (`Limits`), tokens are
redacted from every log line (`RedactToken`). See the README's "Live conversation" section for
the protocol and the security model.
"""
from __future__ import annotations

from config import exit_on_interrupt
with exit_on_interrupt():  # Ctrl-C or SIGTERM while importing (torch: seconds): one line, 130 or 143
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
    import math
    import os
    import re
    import secrets
    import sys
    import threading
    import time
    import uuid
    import warnings
    from dataclasses import dataclass
    from pathlib import Path
    from typing import Callable, Optional

    import numpy as np

    try:  # the server's own packages (requirements.txt: optional for training): one line where one is missing
        import h11  # uvicorn's HTTP/1.1 parser (HttpProtocol)
        import uvicorn
        from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket
        from fastapi.responses import JSONResponse, Response
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.requests import ClientDisconnect
        from uvicorn.protocols.http.h11_impl import H11Protocol
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        from websockets.protocol import State as WebSocketState
    except ImportError as e:
        raise SystemExit(f"error: the live server needs fastapi, uvicorn and websockets ({e}): pip install "
                         "'fastapi>=0.110' 'uvicorn>=0.52.1,<0.56' 'websockets>=13.0'") from None

    from config import ArgumentParser, printable
    from config.transformer_config import KV_DTYPE_NAMES, QUANTIZE_MODES
    from model.files import os_reason, unique_keys_object
    from model.protocol import (AUDIO_BURST, AUDIO_PACE, CHUNK, CHUNK_BYTES, CLOSE_BAD_DATA, CLOSE_IDLE, CLOSE_INTERNAL,
                                CLOSE_POLICY, CLOSE_RESTART, CLOSE_TRY_AGAIN, PARAM_NAMES, PING_BURST, PING_RATE, SAMPLE_RATE,
                                SEED_MAX, SHUTDOWN_REASON, TEXT_PREFIX, check_param, check_params, float_to_pcm,
                                page_constants, pcm_to_float, percentiles, query_params, query_seed, query_window,
                                redact_tokens, wait_up)

log = logging.getLogger("hertz.server")

WEB_DIR = Path(__file__).resolve().parent / "web"

MAX_BAD_MESSAGES = 32     # a session that sends more than this many bad messages is closed
MAX_OUTBOX_AUDIO = 16     # replies waiting for a slow client (2 s); older ones are dropped
MAX_OUTBOX = 256          # everything waiting; beyond it the client is not reading: closed
MAX_INBOX = 32            # messages read while one waits on the engine; beyond it reading waits too
RELEASE_GRACE = 0.5       # seconds a new session waits for a row being given back before it is refused
MAX_HTTP_BODY = 4096      # bytes of a JSON request body
HTTP_BODY_TIMEOUT = 4.0   # seconds for it to arrive (under uvicorn's 5 s graceful shutdown)
MAX_WRITE_BACKLOG = 1 << 20  # bytes waiting for a client; beyond it the connection is dropped (WebSocketProtocol)
WRITE_STALL_TIMEOUT = 10.0   # seconds a client may leave its replies unread (write buffer full); then dropped
HEADER_TIMEOUT = 10.0     # seconds for a request's line and headers to arrive (HttpProtocol); then closed
PARSE_SLICE = 1 << 14     # bytes of a read the websocket parser takes at a time (WebSocketProtocol.data_received)
WAV_HEADER_BYTES = 44      # what a recording writes when it starts
MIN_MESSAGE_BYTES = len(TEXT_PREFIX) + 4 * math.ceil(CHUNK_BYTES / 3)  # a chunk as a text frame: 5358 bytes


# --- the engine and its thread ----------------------------------------------------------------

@dataclass
class Chunk:
    """One user chunk on its way through the engine."""
    session: "Session"
    pcm: np.ndarray           # (2000,) int16, as received
    fmt: str                  # "binary" | "text": the format of the reply
    t_recv: float             # time.perf_counter() at arrival


@dataclass
class DroppedReplies:
    """In a session's outbox, in the place of replies dropped for a client that did not keep up:
    sent as a `dropped` notice."""
    chunks: int


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

    def open_row(self, row: int, params, seed: int, prompt=None) -> asyncio.Future:
        """Reset `row` for a new session (queued now: the future resolves once it has run, to the
        model's audio of the frame the session continues from, `_engine_reset`)."""
        return self.call(_engine_reset, row, params, seed, prompt)

    def restart_row(self, row: int, params, seed: int, prompt=None) -> asyncio.Future:
        """Reset `row` mid-session (a client's `reset`) and drop the chunks it still has queued,
        on the engine thread, so that none of them is stepped after the reset: the prompt's
        playback answers the chunks sent after it at once, and replies go out in order. The future
        resolves to (the chunks dropped, the drops before them not yet reported, the model's audio
        of the frame the session continues from)."""
        def restart(engine):
            pending = _engine_reset(engine, row, params, seed, prompt)
            with self.cond:
                queued, unreported = list(self.inbox[row]), self.dropped[row]
                self.inbox[row].clear()
                self.dropped[row] = 0
            return queued, unreported, pending
        return self.call(restart)

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
        self._post(settle)

    def _post(self, fn, *args) -> None:
        """`fn(*args)` on the event loop; nothing once the loop is closed (the server shut down
        while a step ran: its replies have no session left to go to)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            if not self.loop.is_closed():
                raise

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
                    self._post(chunk.session.on_engine_error, e)
                continue
            ms = 1000 * (time.perf_counter() - t)
            replies = float_to_pcm(out)
            with self.cond:
                self.history.append((t, ms, len(batch)))
                self.steps += 1
            for r, chunk, dropped in batch:
                self._post(chunk.session.on_reply, chunk, replies[r], dropped)
        for fn, args, fut in commands:
            self._settle(fut, exc=RuntimeError("the engine is stopped"))


# The engine API, used only through these (one place to change if it does).
def _engine_reset(engine, row, params, seed, prompt) -> np.ndarray:
    """The row reset; returns the model's audio of the frame the session continues from (int16
    PCM), which a recording puts beside the user's first chunk."""
    import torch
    pending = engine.reset(row, params, seed=seed, prompt=None if prompt is None else torch.from_numpy(prompt))
    return float_to_pcm(pending.numpy()) if pending is not None else np.zeros(CHUNK, dtype="<i2")


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
        self.lock = None  # the `.part`, locked until renamed: another server starting on the folder leaves it
        self.frames = 0
        self.truncated = False
        self.failed: Optional[str] = None  # why a write failed (a full disk): the recording stops there

    def open(self) -> None:
        """A recording that cannot start (a full disk, a folder gone read-only) is said once, naming
        the file and the cause, and leaves nothing behind; the session goes on unrecorded (it was a
        `LibsndfileError(2, "Error opening ...")`, and an empty `.part` that the next start removed as
        an interrupted recording)."""
        import soundfile as sf
        from model.files import open_locked
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while (lock := open_locked(self.tmp, locks_optional=True)) is None:
                pass  # removed as this server locked it: made anew
        except OSError as e:
            return self._not_started(os_reason(e, self.tmp))
        try:
            self.file = sf.SoundFile(str(self.tmp), "w", SAMPLE_RATE, 2, "PCM_16", format="WAV")
        except Exception as e:  # (its header not written)
            why = self._why(e, WAV_HEADER_BYTES)
            with contextlib.suppress(OSError):
                os.remove(self.tmp)  # (still locked: another server starting on the folder does not see it)
            lock.close()
            return self._not_started(why)
        except BaseException:
            lock.close()
            raise
        self.lock = lock

    def _not_started(self, why: str) -> None:
        self.failed = why
        log.error("recording %s: cannot start it in %s (%s): this session is not recorded", self.path.name,
                  self.path.parent, why)

    def write(self, stereo: np.ndarray) -> None:
        """stereo (T, 2) int16. A write that fails (a full disk) is said once, naming the file and the
        cause, and the recording stops there (it was a LibsndfileError(2, '') logged at every chunk)."""
        if self.file is None or self.failed is not None:  # open() failed (and said so), or a write did
            return
        room = self.max_frames - self.frames
        if room < len(stereo):
            self.truncated = True
            stereo = stereo[:max(room, 0)]
        if len(stereo):
            try:
                self.file.write(stereo)
            except Exception as e:  # soundfile's LibsndfileError says nothing: ask the disk why
                self.failed = self._why(e, stereo.nbytes)
                log.error("recording %s: cannot write %s (%s): it stops at %.1f s", self.path.name, self.tmp,
                          self.failed, self.frames / SAMPLE_RATE)
                return
            self.frames += len(stereo)

    def _why(self, e: Exception, nbytes: int = 0) -> str:
        from model.audio import no_room, plain_write_error
        if no_room(self.tmp.parent, nbytes) is not None:
            return "no space left on the device"
        return plain_write_error(self.tmp.parent, nbytes) or str(e).strip() or type(e).__name__  # (ulimit -f, a quota)

    def close(self) -> Optional[Path]:
        if self.file is None:
            return None
        try:
            try:
                self.file.close()  # (its header's sizes: what was written, even after a failed write)
            except Exception as e:
                self.failed = self.failed or self._why(e)
            if self.truncated:
                log.warning("%s: cut at %.0f s (--max-recording-seconds)", self.path.name,
                            self.max_frames / SAMPLE_RATE)
            if self.failed is not None:
                log.warning("recording %s is incomplete: it stops at %.1f s (%s)", self.path.name,
                            self.frames / SAMPLE_RATE, self.failed)
            if self.frames == 0:
                os.remove(self.tmp)
                return None
            publish_recording(self.tmp, self.path)
            return self.path
        except OSError as e:  # (the `.part` removed, the folder gone read-only): said once, here
            log.error("recording %s: cannot finish %s (%s)%s", self.path.name, self.tmp, os_reason(e),
                      ": left for the next start to recover" if os.path.exists(self.tmp) else "")
            return None
        finally:
            self.lock.close()


def publish_recording(part: Path, path: Path) -> None:
    """A finished `.part` renamed into place as `path`, readable by all (mode 0o644)."""
    os.chmod(part, 0o644)
    os.replace(part, path)


# --- sessions -----------------------------------------------------------------------------------

class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise NonFinite(f"{name} is not a finite number")


def _unique_keys(pairs: list) -> dict:
    """An object's (key, value) pairs as a dict; ProtocolError naming a key given twice (json.loads
    would keep the last one silently: {"token_temp": 0.5, "token_temp": 9} is 9)."""
    try:
        return unique_keys_object(pairs)
    except ValueError as e:
        raise ProtocolError("bad_message", str(e)) from None


def _int_of_json(digits: str) -> int:
    """A JSON integer; ProtocolError for one of more digits than Python converts (4300: "not JSON",
    with Python's own message cut mid-word before its "use sys.set_int_max_str_digits()")."""
    if (n := len(digits.lstrip("-"))) > sys.get_int_max_str_digits() > 0:
        raise ProtocolError("bad_json", f"a number of {n} digits, too long to parse")
    return int(digits)


def parse_json(text: str, max_depth: int = 16):
    """A JSON text as Python values; ProtocolError for anything that is not JSON, for NaN and
    Infinity, for an object with a key given twice, and for arrays or objects nested deeper than
    `max_depth` (whether or not the parser's recursion limit caught them first)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys,
                           parse_int=_int_of_json)
    except NonFinite as e:
        raise ProtocolError("bad_params", f"{e}: NaN and Infinity are not accepted") from None
    except RecursionError:
        raise ProtocolError("bad_json", f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise ProtocolError("bad_json", f"not JSON ({str(e)[:100]})") from None
    level = [(value, 1)]
    while level:  # iterative: a deep value must not exhaust the stack here either
        v, depth = level.pop()
        if isinstance(v, (list, dict)):
            if depth > max_depth:
                raise ProtocolError("bad_json", f"JSON nested deeper than {max_depth} levels")
            level.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def parse_params(base, values: dict, names: dict[str, str]):
    """`base` SamplingParams updated from a dict of {given name: value}; `names` maps the accepted
    names to SamplingParams fields. Each value is checked by `model.protocol.check_param` (numbers
    in their documented ranges); ProtocolError for unknown names and bad values."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ProtocolError("bad_params", f"unknown parameter(s) {unknown[:8]}; known: {sorted(names)}"[:300])
    update = {}
    for name, value in values.items():
        if names[name] in update:  # a parameter and its alias (mixture_temp, categorical_temp): which one?
            given = [n for n in values if names[n] == names[name]]
            raise ProtocolError("bad_params", f"{names[name]} given twice (as {' and '.join(given)})")
        try:
            update[names[name]] = check_param(names[name], value)
        except ValueError as e:
            raise ProtocolError("bad_params", str(e) if name == names[name] else f"{name}: {e}") from None
    return dataclasses.replace(base, **update)


def _valid_id(value) -> bool:
    """What a control message's "id" may be: echoed in the answer, so short and valid JSON."""
    if isinstance(value, str):
        return len(value) <= 64
    return (type(value) is int and abs(value) < 2 ** 53) or (type(value) is float and math.isfinite(value))


class Bucket:
    """A token bucket: `burst` actions at once, then `rate` per second."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()

    def take(self) -> float:
        """0 if an action may go now (and count it), else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else float("inf")


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
        self.inbox: asyncio.Queue = asyncio.Queue(MAX_INBOX)  # (arrival time, message) read, not yet handled
        self.wakeup = asyncio.Event()
        self.closing = asyncio.Event()  # set by fail()
        self.closed = False
        self.released = False  # the row is given back (`release`)
        self.close_code: Optional[tuple[int, str]] = None
        self.replay_left = len(server.replay)
        self.counts = collections.Counter()
        self.model_prev = np.zeros(CHUNK, dtype="<i2")  # the model's audio of the current frame (set at the reset)
        self.recorder: Optional[Recorder] = None
        self.last_audio = time.monotonic()
        lim = server.limits  # this session's token buckets (`Limits`)
        self.limits = {"control": Bucket(lim.control_rate, lim.control_burst),
                       "reset": Bucket(lim.reset_rate, lim.reset_burst)}
        # the chunks `read` takes (None: --audio-pace 0, as fast as they come)
        self.pace = Bucket(lim.audio_pace * SAMPLE_RATE / CHUNK, lim.audio_burst) if lim.audio_pace > 0 else None
        self.retry_at: dict[str, float] = {}  # limit -> when its last rate_limited answer said to try again

    def info(self) -> dict:
        return {"session": self.id, "row": self.row, "seconds": round(time.time() - self.started, 1),
                "replay_left": self.replay_left, **{k: self.counts[k] for k in
                ("chunks_in", "chunks_out", "dropped_in", "dropped_out", "bad_messages", "rate_limited", "replayed")}}

    def release(self) -> None:
        """Give the row back (once). The engine's release runs after every command the session
        queued before it; from then on nothing of this session reaches the row, nor does its id
        (POST /set_temperature) while its recording is closed."""
        if self.released:
            return
        self.released = self.closed = True
        self.server.sessions.pop(self.id, None)
        self.server.worker.release_row(self.row)
        self.server.free.append(self.row)
        self.server.row_freed.set()

    # -- outgoing --
    def send(self, message, audio: bool = False) -> None:
        """Queue a message (bytes or str) for the client. Audio over MAX_OUTBOX_AUDIO waiting
        drops the oldest audio (the client is not keeping up); a binary session is told so in its
        place (a `dropped` notice, which the next dropped reply joins), as the client pairs each
        reply with its oldest unanswered chunk. A backlog over MAX_OUTBOX closes."""
        if self.closed:
            return
        self.outbox.append((audio, message))
        if audio and sum(a for a, _ in self.outbox) > MAX_OUTBOX_AUDIO:
            i = next(i for i, (a, _) in enumerate(self.outbox) if a)
            self.counts["dropped_out"] += 1
            self.server.counts["dropped_out"] += 1
            before = self.outbox[i - 1][1] if i else None
            if not isinstance(self.outbox[i][1], bytes):  # the original's text clients expect audio only
                del self.outbox[i]
            elif isinstance(before, DroppedReplies):
                before.chunks += 1
                del self.outbox[i]
            else:
                self.outbox[i] = (False, DroppedReplies(1))
        if len(self.outbox) > MAX_OUTBOX:
            self.fail(CLOSE_POLICY, "the client is not reading its replies")
        self.wakeup.set()

    def dropped_total(self) -> int:
        """The session's chunks dropped so far: by the engine's queue, and their replies by `send`."""
        return self.counts["dropped_in"] + self.counts["dropped_out"]

    def send_json(self, **message) -> None:
        self.send(json.dumps(message))

    def send_audio(self, pcm: np.ndarray, fmt: str) -> None:
        data = pcm.astype("<i2", copy=False).tobytes()
        self.send(data if fmt == "binary" else TEXT_PREFIX + base64.b64encode(data).decode("ascii"), audio=True)
        self.counts["chunks_out"] += 1

    def error(self, code: str, message: str, bad: bool = True, **extra) -> None:
        """Answer a message with {"type": "error"}; too many bad ones close the session."""
        self.send_json(type="error", error=code, message=message, **extra)
        if not bad:
            return
        self.counts["bad_messages"] += 1
        self.server.counts["bad_messages"] += 1
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
                    if isinstance(message, DroppedReplies):
                        message = json.dumps({"type": "dropped", "chunks": message.chunks, "total": self.dropped_total()})
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
    async def read(self) -> None:
        """Read the client's messages as they come, into `inbox`; returns when the client leaves.
        Apart from `handle`: the websocket layer reads nothing more while a message waits for the
        app, so a client's close frame behind a message would go unseen (and its row held) while
        `handle` waits on the engine (the session's start, a reset's prefill). Audio is read at most
        at the session's pace (`Limits.audio_pace`, after `audio_burst` chunks at once): a chunk
        beyond it waits here, and reading with it, so the client's further audio waits in TCP's
        buffers and its sends slow down (it costs the server nothing meanwhile)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            # A chunk counts against the idle timeout when it arrives: it may wait in `inbox` past
            # the timeout behind a control message that waits on the engine (a reset's prefill).
            data, text = message.get("bytes"), message.get("text")
            if (data is not None and len(data) == CHUNK_BYTES) or (text is not None and text.startswith(TEXT_PREFIX)):
                self.last_audio = time.monotonic()
                while self.pace is not None and (wait := self.pace.take()) > 0:
                    await asyncio.sleep(wait)
            await self.inbox.put((time.perf_counter(), message))

    async def handle(self) -> None:
        """Handle what `read` took, in order."""
        while True:
            arrived, message = await self.inbox.get()
            if message.get("bytes") is not None:
                self.on_binary(message["bytes"], arrived)
            elif message.get("text") is not None:
                await self.on_text(message["text"], arrived)

    def on_binary(self, data: bytes, arrived: float) -> None:
        if len(data) != CHUNK_BYTES:
            hint = " (an odd byte count is not 16-bit PCM)" if len(data) % 2 else ""
            return self.error("bad_chunk", f"a binary frame is one chunk of {CHUNK} samples of 16-bit little-endian "
                                           f"PCM, {CHUNK_BYTES} bytes; got {len(data)} bytes{hint}")
        self.on_audio(np.frombuffer(data, dtype="<i2"), "binary", arrived)

    async def on_text(self, text: str, arrived: float) -> None:
        if text.startswith("data:"):
            header, comma, payload = text.partition(",")
            if header + comma != TEXT_PREFIX:  # another type (audio/wav, float32) is not this PCM
                return self.error("bad_frame", f"an audio text frame is {TEXT_PREFIX}<16-bit PCM>; got "
                                               f"{header[:40]!r}")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                return self.error("bad_base64", "the audio text frame is not valid base64")
            if len(data) != CHUNK_BYTES:
                hint = " (an odd byte count is not 16-bit PCM)" if len(data) % 2 else ""
                return self.error("bad_chunk", f"an audio frame is one chunk of {CHUNK} samples of 16-bit PCM, "
                                               f"{CHUNK_BYTES} bytes; got {len(data)} bytes{hint}")
            return self.on_audio(np.frombuffer(data, dtype="<i2"), "text", arrived)
        echo = {}  # the message's "id", once it is known to be one: the error answering it carries it too
        try:
            message = parse_json(text)
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ProtocolError("bad_message", 'a control message is a JSON object with a string "type"')
            if not _valid_id(message.get("id", "")):
                raise ProtocolError("bad_message", "id must be a string of at most 64 characters or a finite number")
            echo = {"id": message["id"]} if "id" in message else {}
            await self.on_control(message)
        except ProtocolError as e:
            self.error(e.code, e.message, **echo)

    def on_audio(self, pcm: np.ndarray, fmt: str, arrived: float) -> None:
        """A chunk read at `arrived` (time.perf_counter()): it may have waited in `inbox` behind a
        control message that waits on the engine, which its latency counts (`read` took its arrival
        as the session's last audio, for the idle timeout)."""
        if self.replay_left > 0:  # the prompt is played back before the conversation goes live
            # Binary clients are told which replies are playback, so that they time only the
            # replies to their own chunks (the original's text clients expect audio only).
            if fmt == "binary" and self.replay_left == len(self.server.replay):
                self.send_json(type="replay", chunks=self.replay_left)
            self.send_audio(self.server.replay[len(self.server.replay) - self.replay_left], fmt)
            self.replay_left -= 1
            self.counts["replayed"] += 1
            if fmt == "binary" and self.replay_left == 0:
                self.send_json(type="live")
            return
        self.counts["chunks_in"] += 1
        if self.server.worker.submit(self.row, Chunk(self, pcm, fmt, arrived)):
            self.counts["dropped_in"] += 1
            self.server.counts["dropped_in"] += 1

    async def on_control(self, message: dict) -> None:
        kind = message["type"]
        echo = {"id": message["id"]} if "id" in message else {}
        body = {k: v for k, v in message.items() if k not in ("type", "id")}
        # a malformed message is refused before it takes a token: it asks for nothing, and used up the
        # reset a well-formed one after it was then refused
        if kind == "set_params":
            params = parse_params(self.params, body, {n: n for n in PARAM_NAMES})
        elif kind == "reset":
            if set(body) - {"seed"}:
                raise ProtocolError("bad_message", f"reset takes only an optional seed, got {sorted(body)}")
            seed = self.server.seed_from(body.get("seed"))
        for limit in ("control", kind):
            if limit in self.limits and (wait := self.limits[limit].take()) > 0:
                # A bad message when it comes before the time the last one was told to wait for: a
                # client that goes on after being told is closed (and a reconnection goes through the
                # server's bucket of new sessions). One that waited as told is only told again: the
                # page's Reset, clicked again whenever the server allowed it, was closed at the 33rd.
                self.counts["rate_limited"] += 1
                self.server.counts["rate_limited"] += 1
                now = time.monotonic()
                ignored = now < self.retry_at.get(limit, -math.inf)
                self.retry_at[limit] = now + wait
                return self.error("rate_limited", f"too many {limit} messages: try again in {wait_up(wait)} s",
                                  bad=ignored, retry_after=wait_up(wait, 2), **echo)
        if kind == "set_params":
            await self.server.worker.set_params(self.row, params)
            self.params = params
            self.send_json(type="ack", request=kind, params=dataclasses.asdict(params), **echo)
        elif kind == "reset":
            # The chunks still queued from before are dropped: the conversation starts afresh.
            queued, unreported, pending = await self.server.worker.restart_row(self.row, self.params, seed,
                                                                                self.server.prompt)
            self.seed = seed
            self.replay_left = len(self.server.replay)
            self.model_prev = pending
            if self.server.prompt is not None:  # the new conversation's context, as at the session's start
                self.record(self.server.prompt_pcm)
            self.counts["dropped_in"] += len(queued)
            self.server.counts["dropped_in"] += len(queued)
            if any(c.fmt == "binary" for c in queued):  # before the replies to the chunks after it
                self.send_json(type="dropped", chunks=unreported + len(queued), total=self.dropped_total())
            self.send_json(type="ack", request=kind, seed=seed, **echo)
        elif kind == "status":
            if body:
                raise ProtocolError("bad_message", f"status takes no fields, got {sorted(body)[:8]}"[:300])
            self.send_json(type="status", **self.info(), seed=self.seed, params=dataclasses.asdict(self.params), **echo)
        else:
            raise ProtocolError("unknown_type", f"unknown control message type {kind!r}; known: set_params, reset, status")

    # -- from the engine thread (via the loop) --
    def on_reply(self, chunk: Chunk, reply: np.ndarray, dropped: int) -> None:
        if self.closed:
            return
        # the chunk's latency ends here, as its reply is handed on: taken after the send (and the
        # recording), a moment the GIL gives the engine thread (5 ms) counted in it, so the server's
        # figure could exceed the client's own round trip
        now = time.perf_counter()
        self.server.latency_ms.append((now, 1000 * (now - chunk.t_recv)))
        if dropped and chunk.fmt == "binary":  # the original's text clients expect audio only
            self.send_json(type="dropped", chunks=dropped, total=self.dropped_total())
        self.send_audio(reply, chunk.fmt)
        # The model's context frame is (this user chunk, the model audio of the previous reply).
        self.record(np.stack([chunk.pcm, self.model_prev], axis=1))
        self.model_prev = reply

    async def watch_idle(self, timeout: float) -> None:
        """Close the session once no audio has arrived for `timeout` seconds (control messages do
        not count): a client that holds a slot without talking frees it."""
        while True:
            left = self.last_audio + timeout - time.monotonic()
            if left <= 0:
                return self.fail(CLOSE_IDLE, f"no audio for {timeout:g} s")
            await asyncio.sleep(left)

    def on_engine_error(self, e: BaseException) -> None:
        self.fail(CLOSE_INTERNAL, f"engine error: {type(e).__name__}")

    def record(self, stereo: np.ndarray) -> None:
        if self.recorder is not None:  # the disk thread keeps the order: no need to wait
            self.server.disk(self.recorder.write, stereo)


@dataclass(frozen=True)
class Limits:
    """What one client may cost. Token buckets (`burst` at once, then `rate` per second): per
    session, every control message (`control_*`: generous, a dragged slider sends dozens), and
    within it `reset` (a prompt prefill with --prompt-path); over a bucket, a message is answered
    with a `rate_limited` error and its `retry_after`, which counts as a bad message (MAX_BAD_MESSAGES
    of them close the session) when it comes before the previous one's `retry_after` ran out. Over
    all clients, new sessions (each starts with the same prefill; refused with CLOSE_TRY_AGAIN). A
    session without audio for `idle_timeout` seconds is closed (CLOSE_IDLE). A session's audio is
    read at most `audio_pace` times real time after `audio_burst` chunks at once (`Session.read`:
    beyond it reading waits, and TCP slows the client; 0: no pace)."""
    reset_rate: float = 0.2
    reset_burst: float = 2
    control_rate: float = 50.0
    control_burst: float = 100
    start_rate: float = 1.0
    start_burst: float = 8
    idle_timeout: float = 30.0
    audio_pace: float = AUDIO_PACE
    audio_burst: float = AUDIO_BURST


class Server:
    """What the app's routes share: the engine worker, the free rows, the sessions, the prompt,
    the default sampling parameters, and counters. Created once per app (no module state)."""

    def __init__(self, engine, token: Optional[str] = None, prompt: Optional[np.ndarray] = None,
                 replay_seconds: Optional[float] = None, recordings: Optional[str] = None,
                 max_recording_seconds: float = 3600.0, max_queue: int = 4, params=None, warmup: bool = True,
                 limits: Limits = Limits()):
        from model import SamplingParams
        self.engine = engine
        self.token = token
        self.limits = limits
        self.starts = Bucket(limits.start_rate, limits.start_burst)
        self.worker = EngineWorker(engine, max_queue)
        self.free = list(range(engine.max_sessions))[::-1]
        self.sessions: dict[str, Session] = {}
        self.params = params or SamplingParams()
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
        self.stopping = False  # set by close_sessions: new sessions are refused
        self.row_freed = asyncio.Event()  # set by Session.release
        self._disk: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._page = (WEB_DIR / "index.html").read_text()

    @property
    def index_html(self) -> bytes:
        """The page, with the protocol's constants and this server's defaults as they are now (made at
        each request: `POST /set_temperature` changes the defaults, which the page's sliders show)."""
        return self._page.replace("{{PROTOCOL}}", page_constants(dataclasses.asdict(self.params))).encode()

    # -- lifecycle --
    def start(self) -> None:
        """Finish leftover recordings, warm the engine up and start its thread (before the
        server listens)."""
        if self.recordings is not None:
            recover_recordings(self.recordings)
        self.worker.start(self.warmup)
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disk")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.worker.loop = loop

    def stop(self) -> None:
        self.worker.stop()
        if self._disk is not None:
            self._disk.shutdown(wait=True)

    async def close_sessions(self, timeout: float = 2.0) -> None:
        """At shutdown: refuse new sessions, close every session with CLOSE_RESTART and
        SHUTDOWN_REASON (after what is queued for it), and wait up to `timeout` seconds for them
        to end (uvicorn then closes what is left, without a reason)."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while (self.sessions or len(self.free) < self.engine.max_sessions) and time.monotonic() < deadline:
            for session in list(self.sessions.values()):  # again each time: one may have been starting
                session.fail(CLOSE_RESTART, SHUTDOWN_REASON)
            await asyncio.sleep(0.02)

    async def row_given_back(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a row to be free: a client that closed its session and
        reconnects at once (a page reloaded) finds its own row, even when the server has not read
        its close yet, or has but not yet ended its session."""
        deadline = time.monotonic() + timeout
        while not self.free and (left := deadline - time.monotonic()) > 0:
            self.row_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.row_freed.wait(), left)

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
        if type(value) is not int or not 0 <= value < SEED_MAX:
            got = str(value) if type(value) is int and abs(value) < 10 ** 30 else f"a value of type {type(value).__name__}"
            raise ProtocolError("bad_seed", f"seed must be an integer in [0, 2**63), got {got}")
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
            **{k: self.counts[k] for k in ("sessions_total", "refused", "dropped_in", "dropped_out", "bad_messages",
                                           "rate_limited")},
            "prompt_s": 0 if self.prompt is None else self.prompt.shape[1] / SAMPLE_RATE,
            "replay_chunks": len(self.replay),
        }

    # -- a session, start to end --
    async def run_session(self, ws) -> None:
        try:
            query = query_params(ws.query_params.multi_items(), ("seed",))
            seed = self.seed_from(query_seed(query["seed"]) if "seed" in query else None)
        except ValueError as e:  # accepted first: browsers show a close reason, not a refused handshake's status
            return await close_quietly(ws, CLOSE_POLICY, str(e)) if await accepted(ws) else None
        if not await accepted(ws):
            return
        if not self.free and not self.stopping:
            await self.row_given_back(RELEASE_GRACE)
        if self.stopping:
            return await close_quietly(ws, CLOSE_RESTART, SHUTDOWN_REASON)
        if not self.free:
            self.counts["refused"] += 1
            return await close_quietly(ws, CLOSE_TRY_AGAIN, f"the server is at capacity ({self.engine.max_sessions} "
                                                            "sessions); try again later")
        if (wait := self.starts.take()) > 0:  # every start prefills the prompt: bounded like resets
            self.counts["refused"] += 1
            return await close_quietly(ws, CLOSE_TRY_AGAIN, f"too many new sessions; try again in {wait_up(wait)} s")
        row = self.free.pop()
        session = Session(self, ws, row, self.params, seed)
        opened = self.worker.open_row(row, self.params, seed, self.prompt)
        reader = asyncio.create_task(session.read())  # meanwhile too: a client leaving is seen at once
        await asyncio.wait({opened, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not opened.done():  # gone during the start: the row comes back now (released after the reset)
            opened.add_done_callback(_log_failure)
            return session.release()
        if opened.exception() is not None:
            session.release()  # a half-reset row is never stepped
            reader.cancel()
            return await close_quietly(ws, CLOSE_INTERNAL,
                                       f"could not start a session: {type(opened.exception()).__name__}")
        session.model_prev = opened.result()  # the model's audio of the frame its first reply follows
        self.sessions[session.id] = session
        self.counts["sessions_total"] += 1
        session.last_audio = max(session.last_audio, time.monotonic())  # the idle clock starts now, not at connecting
        log.info("session %s started in row %d (%d/%d)", session.id, row, len(self.sessions), self.engine.max_sessions)
        if self.recordings is not None:
            name = time.strftime("%Y%m%d-%H%M%S") + f"-{session.id}.wav"
            session.recorder = Recorder(self.recordings / name, self.max_recording_frames)
            self.disk(session.recorder.open)
            if self.prompt is not None:  # the recording starts with the prompt, as the original's
                session.record(self.prompt_pcm)
        sender = asyncio.create_task(session.sender())
        handler = asyncio.create_task(session.handle())
        closing = asyncio.create_task(session.closing.wait())
        idle = asyncio.create_task(session.watch_idle(self.limits.idle_timeout))
        try:
            # Until the client leaves, or the session is closed from our side (then the sender
            # flushes and sends the close frame; a client that does not read gets 5 s).
            await asyncio.wait({reader, handler, closing}, return_when=asyncio.FIRST_COMPLETED)
            if session.close_code is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(sender), timeout=5)
        finally:
            session.closed = True
            for task in (sender, reader, handler, closing, idle):
                task.cancel()
            for task in (reader, handler):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.info("session %s: %r", session.id, task.exception())
            session.release()  # safe at once: the next reset of this row runs after the release
            log.info("session %s ended: %s", session.id, session.info())
            if session.recorder is not None:  # after the session's writes: one disk thread, in order
                try:
                    closing_file = self.disk(session.recorder.close)
                except RuntimeError as e:  # (the disk thread already stopped): its .part is left for the next start
                    log.error("session %s: its recording is left unfinished for the next start to recover: %s",
                              session.id, e)
                else:
                    try:
                        if (path := await closing_file) is not None:
                            log.info("session %s recorded to %s", session.id, path)
                    except Exception:  # said once, by `disk` (`_log_failure`)
                        pass

    async def set_temperature(self, body: dict) -> dict:
        """POST /set_temperature: {"token_temp", "categorical_temp" (the original's names) or any
        of PARAM_NAMES, "session": optional}. Without "session" it changes the defaults of new
        sessions; with it, that session's parameters (the caller has the token: see make_app)."""
        names = {"categorical_temp": "mixture_temp", **{n: n for n in PARAM_NAMES}}
        if "session" not in body:
            self.params = parse_params(self.params, body, names)
            target = "new sessions"
            params = self.params
        else:  # null too: a caller whose id lookup failed must not change every new session instead
            session_id = body.pop("session")
            if not isinstance(session_id, str):
                raise ProtocolError("bad_message", 'session must be a session id (a string: "session" in its '
                                                   f"status), got {json.dumps(session_id)[:40]}")
            session = self.sessions.get(session_id)
            if session is None:
                raise ProtocolError("unknown_session", "no such session")
            params = parse_params(session.params, body, names)
            await self.worker.set_params(session.row, params)
            session.params = params
            target = f"session {session_id}"
        temps = (params.token_temp, (params.mixture_temp, params.gaussian_temp))
        return {"message": f"Temperature updated to: {temps} for {target}", "status": "success",
                "params": dataclasses.asdict(params)}


def recover_recordings(folder: Path) -> None:
    """Recordings a killed server left as `.NAME.part`: renamed into place as NAME (a complete WAV)
    when their audio is readable and not empty, removed otherwise; one log line each. A `.part` is
    finished in place (libsndfile sets its header's sizes to the audio it holds), so recovering
    needs no room for a second copy: a server restarted on a full disk recovers it all the same.
    One that cannot be finished now (a file this server may not write, a disk error), and anything
    of such a name that is not a regular file (a folder), is left where it is with one warning
    naming it; the server starts all the same. One that a live server (another on the same folder)
    is writing is locked by it (`Recorder`), and left to it."""
    import stat
    import soundfile as sf
    from model.files import drop_dead_temporaries, open_locked

    def leave(part: Path, why: str) -> None:
        log.warning("left the interrupted recording %s for a later start: %s", printable(str(part)), why)

    # a recovery cut short: its temporary, once no server writes it (another server on this folder may be
    # recovering into one now; older servers recovered into a copy); `.NAME.part.tmp`, unlocked, of servers
    # before the recovery wrote through a lock
    drop_dead_temporaries(folder)
    for stale in sorted(folder.glob(".*.part.tmp")) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            os.remove(stale)
    for part in sorted(folder.glob(".*.part")) if folder.is_dir() else []:
        try:
            if not stat.S_ISREG(os.lstat(part).st_mode):
                leave(part, "it is not a regular file (a folder or a link?), so no recording of this server's")
                continue
            held = open_locked(part, create=False, locks_optional=True)
            if held is None:  # renamed into place as this server looked
                continue
        except (BlockingIOError, FileNotFoundError):  # a live server's recording; one another server recovered
            continue
        except OSError as e:  # one this server cannot open for writing (its permissions, a read-only disk)
            leave(part, os_reason(e))
            continue
        with held:
            target = part.with_name(part.name[1:-len(".part")])
            try:
                # its header's sizes set to the audio it holds, in place, when closed (a killed writer's say 0)
                with sf.SoundFile(str(part), "r+") as f:
                    frames, rate = f.frames, f.samplerate
            except sf.LibsndfileError as e:
                if e.code == 2:  # libsndfile's "System error.": the disk's, not the file's
                    leave(part, f"libsndfile could not open it: {e.error_string.strip()}")
                    continue
                frames, rate, why = 0, 0, f"unreadable ({type(e).__name__})"
            except OSError as e:
                leave(part, os_reason(e))
                continue
            else:
                why = "empty" if frames == 0 else f"{target.name} exists" if target.exists() else None
            try:
                if why is None:
                    publish_recording(part, target)
                    log.warning("recovered %.1f s of an interrupted recording: %s", frames / rate, target)
                else:
                    os.remove(part)
                    log.warning("removed an interrupted recording %s: %s", part, why)
            except OSError as e:
                leave(part, os_reason(e))


async def close_quietly(ws, code: int, reason: str) -> None:
    """`ws.close(code, reason)` to a client that may be gone already (a page reloaded while it waited
    for a free row: 74 tracebacks in a burst of 150 such clients): nothing to tell it then."""
    try:
        await ws.close(code, reason)
    except Exception:  # starlette's WebSocketDisconnect, uvicorn's ClientDisconnected, a close after the client's
        pass


async def accepted(ws) -> bool:
    """`ws.accept()`; False for a client gone before it (no traceback: nothing to answer)."""
    try:
        await ws.accept()
        return True
    except Exception:  # (as close_quietly)
        return False


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("%r", fut.exception())


# --- the app ---------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _hostname(netloc: str) -> str:
    """The host of a Host header or URL netloc, lowercased, without port or IPv6 brackets."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Which Host and Origin headers the server answers (the defence against other web pages
    and DNS rebinding; the token, when set, is checked as well).

    Host: the loopback names (localhost, 127.0.0.1, ::1), the `host` the server listens on, and
    `allow_hosts`; when listening on every interface (0.0.0.0 or ::), also any IP address (a
    page cannot rebind a literal address), while other names need `allow_hosts`. A request with
    no Host header (HTTP/1.0) is answered.
    Origin (sent by browsers): none (a program, not a page), the server's own origin (the Origin's
    host:port is the Host header), a page on a loopback origin (http://localhost:*,
    http://127.0.0.1:*, http://[::1]:*), or one of `allow_origins` (scheme://host[:port])."""
    host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()

    def host_allowed(self, header: Optional[str]) -> bool:
        if header is None:
            return True
        name = _hostname(header)
        if name in LOOPBACK_NAMES or name == _hostname(self.host) or name in {_hostname(h) for h in self.allow_hosts}:
            return True
        return self.host in ("0.0.0.0", "::", "") and _is_ip(name)

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        if origin is None:
            return True
        origin = origin.strip().lower().rstrip("/")
        scheme, sep, netloc = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not netloc or "/" in netloc:
            return False  # "null" (sandboxed pages, file://) and anything unparseable
        if host is not None and netloc == host.strip().lower():
            return True
        if _hostname(netloc) in LOOPBACK_NAMES:
            return True
        return origin in {o.strip().lower().rstrip("/") for o in self.allow_origins}


class AccessGuard:
    """ASGI middleware: HTTP requests and websocket handshakes with a Host or Origin that `Access`
    does not allow get 403 before any route runs."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host, origin = headers.get("host"), headers.get("origin")
        if not self.access.host_allowed(host):
            reason = "this server does not answer to that Host (start it with --allow-host)"
        elif not self.access.origin_allowed(origin, host):
            reason = "pages of that origin may not use this server (start it with --allow-origin)"
        else:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # closed before the handshake completes: HTTP 403
            return await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": reason})
        body = json.dumps({"status": "error", "error": "forbidden", "message": reason}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def read_body(request: Request, limit: int) -> Optional[bytes]:
    """A request's body, or None as soon as it goes past `limit` bytes (the rest is never read:
    a chunked body has no length to refuse it by beforehand)."""
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            return None
    return body


def make_app(server: Server, access: Access = Access()):
    """The FastAPI app of a `Server` (call `server.start()` first), behind an `AccessGuard`."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.attach(asyncio.get_running_loop())
        yield  # at shutdown HttpServer has closed every session (1012, with a reason) before this returns

    def require_token(request: Request) -> None:
        if not server.authorized(request.headers, request.query_params):
            raise HTTPException(401, "a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    # No /docs or /openapi.json: they would answer without the token.
    app = FastAPI(title="hertz-dev live", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, access=access)
    http = APIRouter(dependencies=[Depends(require_token)])

    def error(status: int, code: str, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"message": message, "status": "error", "error": code}, status_code=status,
                            headers=headers)

    @http.api_route("/", methods=["GET", "HEAD"])  # HEAD: what monitors and curl -I send
    async def index():
        return Response(server.index_html, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    @http.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        """?window=: seconds the step and latency figures cover (default: the last 4000 steps)."""
        try:
            query = query_params(request.query_params.multi_items(), ("window",))
            return server.health(query_window(query["window"]) if "window" in query else None)
        except ValueError as e:
            return error(400, "bad_query", str(e))

    @http.post("/set_temperature")
    async def set_temperature(request: Request):
        # A JSON body only: a cross-site form cannot send one without a CORS preflight, which
        # this server never grants.
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return error(415, "bad_content_type", "the body must be a JSON object (Content-Type: application/json)")
        def too_big():  # made only when sent
            return error(413, "too_big", f"the body is over {MAX_HTTP_BODY} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_HTTP_BODY:  # refused before any of it is read
            return too_big()
        try:
            body = await asyncio.wait_for(read_body(request, MAX_HTTP_BODY), HTTP_BODY_TIMEOUT)
        except asyncio.TimeoutError:
            return error(408, "timeout", f"the body did not arrive within {HTTP_BODY_TIMEOUT:g} s")
        except ClientDisconnect:  # the caller left before its body came: nothing changed, no one to answer (not sent)
            return Response(status_code=400)
        if body is None:
            return too_big()
        try:
            values = parse_json(body.decode("utf-8", errors="replace"))
            if not isinstance(values, dict):
                raise ProtocolError("bad_message", "the body must be a JSON object")
            if "session" in values and server.token is None:
                return error(403, "needs_token", "a session's parameters change through its own websocket "
                                                 "(set_params), or over HTTP on a server started with --token")
            return await server.set_temperature(values)
        except ProtocolError as e:
            return error(404 if e.code == "unknown_session" else 400, e.code, e.message)

    @http.api_route("/audio", methods=["GET", "HEAD"])
    async def audio_over_http():
        """/audio without the websocket upgrade (a reverse proxy that drops the Upgrade and Connection
        headers; a browser opened at it): 426, saying what is missing, where it was 404 "no such path",
        which sent the user looking for another one. A real upgrade is a websocket request, which only
        the websocket route below answers."""
        return error(426, "upgrade_required", "/audio is a websocket endpoint; connect with ws://HOST:PORT/audio; "
                     "a proxy must forward the Upgrade and Connection headers", headers={"Upgrade": "websocket"})

    app.include_router(http)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """Starlette's refusals (an unknown path, a method a route does not take) and the token's,
        in the shape of the server's other errors, naming what was refused."""
        path = request.url.path[:200]
        allowed = ", ".join(sorted((e.headers or {}).get("Allow", "").split(", ")))  # (a set's order otherwise)
        code, message = {404: ("not_found", f"no such path: {path}"),
                         405: ("method_not_allowed", f"{request.method} {path} is not allowed; allowed: {allowed}"),
                         401: ("unauthorized", str(e.detail))}.get(e.status_code, ("http_error", str(e.detail)))
        return error(e.status_code, code, message, headers=e.headers)

    @app.websocket("/audio")
    async def audio(ws: WebSocket):
        if not server.authorized(ws.headers, ws.query_params):
            await close_quietly(ws, CLOSE_POLICY, "a valid token is required")  # before accept: HTTP 403
            return
        await server.run_session(ws)

    @app.websocket("/{path:path}")  # after /audio: any other path (Starlette's default refusal is a 403)
    async def no_websocket(ws: WebSocket, path: str):
        await ws.send_denial_response(error(404, "not_found", f"no websocket at {ws.url.path[:200]}: "
                                                              "the server's websocket is /audio"))

    return app


class RedactToken(logging.Filter):
    """Removes tokens from log records: `token=...` in URLs, `Bearer ...`, and the server's token
    wherever it appears. Installed on every handler, so records of every logger (uvicorn's
    access and websocket lines, the websockets library at debug level, ours) pass through it."""

    def __init__(self, token: Optional[str] = None):
        super().__init__()
        self.token = token
        # wherever it appears; a short one (under 8 characters) only where it stands alone, not
        # inside a longer word: `--token tok` would otherwise garble every "token=" into "REDACTEDen="
        alone = (r"(?<![\w-])", r"(?![\w-])") if token and len(token) < 8 else ("", "")
        self.literal = re.compile(alone[0] + re.escape(token) + alone[1]) if token else None

    def clean(self, text: str) -> str:
        text = redact_tokens(text)
        return self.literal.sub("REDACTED", text) if self.literal else text

    def filter(self, record: logging.LogRecord) -> bool:
        # Each part is cleaned in place, as formatters (uvicorn's access lines) read the args.
        if isinstance(record.msg, str):
            record.msg = self.clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.clean_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.clean_arg(a) for k, a in record.args.items()}
        return True

    def clean_arg(self, a):
        if isinstance(a, (int, float)) or a is None:
            return a
        text = a if isinstance(a, str) else str(a)
        clean = self.clean(text)
        return a if clean == text else clean


def redact_logs(token: Optional[str]) -> None:
    """Install `RedactToken` on the handlers of the root logger and of uvicorn's loggers (call it
    after logging is configured)."""
    for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactToken) for f in handler.filters):
                handler.addFilter(RedactToken(token))


# --- command line -------------------------------------------------------------------------------

def uvicorn_config(app, host="127.0.0.1", port: int = 8000, max_message_bytes: int = 1 << 16,
                   log_level: str = "info", access_log: bool = False, token: Optional[str] = None):
    """uvicorn's settings for the app; installs `RedactToken` on the log handlers it configures."""
    # per-message deflate off: PCM does not compress and it would cost CPU on every frame.
    # Slow HTTP clients: an idle keep-alive connection is closed after 5 s, a request's headers
    # must arrive within HEADER_TIMEOUT (HttpProtocol) and are capped at 16 KiB (h11, whose limit
    # this is, rather than httptools where installed), and past 256 open connections new ones get 503.
    config = uvicorn.Config(app, host=host, port=port, http=HttpProtocol, ws=WebSocketProtocol,
                            ws_max_size=max_message_bytes, ws_per_message_deflate=False, log_level=log_level,
                            access_log=access_log, lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=16 * 1024, limit_concurrency=256)
    redact_logs(token)
    return config


def peer(client) -> str:
    """A protocol's `client` (host, port) as the log names it: "HOST:PORT", or "a client"."""
    return "%s:%d" % tuple(client[:2]) if client else "a client"


class HttpProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head. uvicorn waits for a
    request forever: its keep-alive timeout starts only after a response, and the next request's
    first byte stops it. So a connection that sends nothing, or its headers a byte at a time, was
    held open for good, and 256 of them (`limit_concurrency`) made every HTTP request a 503 (the
    page, /health). Now a connection whose request line and headers have not arrived within
    HEADER_TIMEOUT seconds of it opening, or of the previous response, is closed. Once a request
    has arrived (its body: the app's HTTP_BODY_TIMEOUT) or the connection is a websocket (the
    session's --idle-timeout), this deadline no longer applies."""

    head_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm_head_timer()

    def on_response_complete(self) -> None:
        self.arm_head_timer()  # before: it handles a pipelined request at once, which disarms it
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's head has arrived (or the connection ended)
            self.cancel_head_timer()

    def handle_websocket_upgrade(self, event) -> None:
        self.cancel_head_timer()  # the transport goes to the websocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    def arm_head_timer(self) -> None:
        self.cancel_head_timer()
        self.head_timer = self.loop.call_later(HEADER_TIMEOUT, self.head_timeout)

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timeout(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            log.info("%s: closed a connection that sent no request within %g s",
                     peer(self.client), HEADER_TIMEOUT)
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol (its "websockets-sansio"), hardened where a client reaches past
    the app. Pings: uvicorn answers every ping with a pong at once, whatever waits for the client,
    so a client that pings and never reads grew the server's write buffer without bound. The app's
    own sends wait while the buffer is over its high-water mark (64 KiB), so a buffer over
    MAX_WRITE_BACKLOG is pongs piling up: the connection is dropped (its session ends as if the
    client had vanished). Text that is not UTF-8: uvicorn logged a traceback and closed with 1007
    and no reason; now closed with CLOSE_BAD_DATA and a reason, without a traceback. A client
    that reads nothing while it goes on sending audio: its session kept its slot (its replies
    dropped) until uvicorn's keepalive gave up on it, 40 s; now, once its write buffer has stayed
    full for WRITE_STALL_TIMEOUT seconds, the connection is dropped (no close frame could reach
    it) and the session ends as if the client had vanished. A client that pings faster than
    PING_RATE a second after a burst of PING_BURST (a token bucket per connection) is closed with
    CLOSE_POLICY: each ping was answered in the read that brought it, so one pinging flat out
    (43,000 pings in a 256 KiB read, none of which reaches the app, so reading never paused) held
    the event loop, and every other session with it. A read is parsed PARSE_SLICE bytes at a time,
    so what follows such a close is never parsed (a whole read of pings took 0.3 s). uvicorn's
    keepalive (a ping every 20 s, closing with 1011 when its pong is not back within 20 s) waits
    once more, 20 s, when the app is not reading then: a session whose audio is paced
    (`Session.read`) leaves the client's pong behind the audio it has not read yet; only once, so a
    client that died with a backlog of audio sent flat out is still dropped within a minute."""

    stall_timer: Optional[asyncio.TimerHandle] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pings = Bucket(PING_RATE, PING_BURST)

    def data_received(self, data: bytes) -> None:
        if len(data) <= PARSE_SLICE:
            return super().data_received(data)
        for i in range(0, len(data), PARSE_SLICE):
            if self.transport.is_closing():  # failed (too many pings, not UTF-8): the rest is not read
                return
            super().data_received(data[i:i + PARSE_SLICE])

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_timer is None:
            self.stall_timer = self.loop.call_later(WRITE_STALL_TIMEOUT, self.drop_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.cancel_stall_timer()

    def connection_lost(self, exc) -> None:
        self.cancel_stall_timer()
        super().connection_lost(exc)

    def cancel_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def drop_stalled(self) -> None:
        self.stall_timer = None
        log.warning("%s: dropped a connection that has read none of its replies for %g s",
                    peer(self.client), WRITE_STALL_TIMEOUT)
        self.transport.abort()

    pong_deferred = False  # the pong's deadline put off once (`keepalive_timeout`), until a pong comes

    def keepalive_timeout(self) -> None:
        # the app not reading (a session's audio paced): the pong may wait unread behind it, so its
        # deadline is put off once, by ping_timeout; not again, or a client that died with a backlog
        # of audio in TCP's buffers (sent flat out) kept its slot until all of it was read at the pace
        if self.read_paused and not self.pong_deferred:
            self.pong_deferred = True
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        super().keepalive_timeout()

    def handle_pong(self, event) -> None:
        super().handle_pong(event)
        if self.pending_ping_payload is None:  # the ping in flight answered: a later one may be put off again
            self.pong_deferred = False

    def handle_ping(self) -> None:
        if self.transport.is_closing():  # closed for its pings: the others of this slice are not answered
            return
        if self.pings.take() > 0:
            log.warning("%s: closed a connection that sends more than %g pings a second",
                        peer(self.client), PING_RATE)
            if self.conn.state is not WebSocketState.OPEN:  # before the handshake's answer: no close frame yet
                return self.transport.close()
            self.conn.fail(CLOSE_POLICY, f"too many pings (at most {PING_RATE:g} a second)")
            self.handle_parser_exception()  # the app sees the disconnect; the transport closes
            return
        super().handle_ping()
        if self.transport.get_write_buffer_size() > MAX_WRITE_BACKLOG:
            log.warning("%s: dropped a connection that sends pings and does not read the pongs",
                        peer(self.client))
            self.transport.abort()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                self.conn.fail(CLOSE_BAD_DATA, "a text message that is not UTF-8")
                self.handle_parser_exception()  # the app sees the disconnect; the transport closes
                return
        super().send_receive_event_to_app()


class HttpServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first closes the sessions itself (`Server.close_sessions`):
    uvicorn closes the websockets it still holds with 1012 and no reason."""

    def __init__(self, config: uvicorn.Config, server: Server, serving: Optional[str] = None):
        super().__init__(config)
        self.app_server = server
        self.serving = serving

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.serving:  # listening now: the address answers (the engine has warmed up)
            log.info("%s", self.serving)

    async def shutdown(self, sockets=None) -> None:
        await self.app_server.close_sessions()
        await super().shutdown(sockets)
        # (a second Ctrl-C) uvicorn skips the lifespan's end, whose task the loop's teardown then cancelled: two
        # tracebacks. It is one step here, nothing to wait on; not again where uvicorn had ended it already
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            await self.lifespan.shutdown()


def serve(server: Server, host: str, port: int, max_message_bytes: int = 1 << 16, log_level: str = "info",
          access_log: bool = False, sockets=None, access: Optional[Access] = None, serving: Optional[str] = None) -> None:
    """Start the engine, then serve until interrupted; `serving`: a line logged once the server listens."""
    server.start()
    try:
        config = uvicorn_config(make_app(server, access or Access(host)), host, port, max_message_bytes, log_level,
                                access_log, server.token)
        HttpServer(config, server, serving).run(sockets=sockets)
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
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it: use --token)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token", default=os.environ.get("HERTZ_TOKEN"),
                    help="require this token on every call (Authorization: Bearer TOKEN or ?token=TOKEN); "
                         "default: $HERTZ_TOKEN")
    ap.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without a token")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--variant", default="duplex", help="official weights (downloaded to --ckpt-dir); the live "
                                                         "server needs the duplex variant")
    src.add_argument("--checkpoint", type=os.path.expanduser,
        help="one of our duplex transformer checkpoints (.safetensors)")
    ap.add_argument("--adapter", type=os.path.expanduser,
        metavar="PATH", help="a LoRA adapter file (.adapter.safetensors) trained on "
                    "--variant or --checkpoint (train_transformer.py finetune=lora)")
    ap.add_argument("--codec", type=os.path.expanduser,
        default="auto", help="auto (official, or the one recorded in the checkpoint), official, or a path")
    ap.add_argument("--ckpt-dir", type=os.path.expanduser, default="ckpt")
    ap.add_argument("--offline", action="store_true", help="never download official weights")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the content-hash check of our .safetensors files (a changed file is an error by default)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    ap.add_argument("--quantize", choices=QUANTIZE_MODES, help="weight-only int8 or int4 transformer weights "
                    "(model/quant.py; default: float)")
    ap.add_argument("--kv-dtype", choices=KV_DTYPE_NAMES, default="auto",
                    help="KV caches: auto (the weights' dtype) or fp8 (half the bytes: more sessions)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                    help="also accept browser pages of this origin (scheme://host[:port]; repeatable); the "
                         "server's own page and loopback pages are always accepted")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="also answer requests for this host name (repeatable; e.g. the machine's DNS name when "
                         "listening on 0.0.0.0); loopback names and the --host value are always answered")
    ap.add_argument("--max-sessions", default="auto",
                    help="concurrent sessions (engine rows); more are refused. auto: 8 on CUDA, 1 on CPU (every "
                         "row costs a CPU step time even when silent)")
    ap.add_argument("--max-len", type=int, default=None, help="context in latents (default: the model's)")
    ap.add_argument("--no-compile", action="store_true",
                    help="do not torch.compile the transformer block (on CUDA it is by default: ~15 s at start, faster steps)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--encode", choices=("sample", "mean"), default="sample",
                    help="user latents: a draw from the codec posterior (as the original) or its mean")
    ap.add_argument("--prompt-path", type=os.path.expanduser,
        help="warm start: every session starts after this conversation (WAV etc.; "
                                          "stereo = [user, model], mono is put on both)")
    ap.add_argument("--replay-seconds", type=float, default=None,
                    help="how much of the prompt's end is played to the client before going live (default: all, "
                         "as the original; 0: none)")
    ap.add_argument("--recordings", type=os.path.expanduser,
        help="folder for each session's conversation (stereo WAV: user, model)")
    ap.add_argument("--max-recording-seconds", type=float,
                    help="cap of each recording, in seconds (default 3600)")
    ap.add_argument("--queue-chunks", type=int, default=4,
                    help="chunks a session may have waiting; beyond it the oldest is dropped (bounded latency)")
    ap.add_argument("--max-message-bytes", type=int, default=1 << 16, help="larger websocket messages close the session (1009)")
    ap.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout,
                    help="close a session that sends no audio for this many seconds (close code 4408)")
    ap.add_argument("--audio-pace", type=float, default=Limits.audio_pace,
                    help=f"read each session's audio at most this many times real time, after {Limits.audio_burst:g} "
                         "chunks at once (a client sending faster waits on TCP); 0: as fast as it comes (files sent "
                         "with inference_client.py --no-realtime on a server of your own)")
    ap.add_argument("--reset-rate", type=float, default=Limits.reset_rate,
                    help=f"reset messages per second and session, after a burst of {Limits.reset_burst:g} "
                         "(a reset prefills the prompt)")
    ap.add_argument("--token-temp", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--mixture-temp", type=float, default=0.5)
    ap.add_argument("--gaussian-temp", type=float, default=0.1)
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--access-log", action="store_true", help="log every HTTP request (tokens are redacted)")
    args = ap.parse_args(argv)
    if not is_loopback(args.host) and not args.token and not args.insecure:
        host = args.host or "'' (every interface)"
        ap.error(f"--host {host} exposes the server: give a --token (or --insecure to expose it without one)")
    if args.max_sessions != "auto" and not (args.max_sessions.isdigit() and int(args.max_sessions) >= 1):
        ap.error(f"--max-sessions must be auto or an integer >= 1, got {args.max_sessions!r}")
    if args.queue_chunks < 1:
        ap.error("--queue-chunks must be >= 1")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_len is not None and args.max_len < 2:  # a slide keeps at least one latent of it
        ap.error(f"--max-len must be at least 2 latents, got {args.max_len}")
    if not (args.idle_timeout > 0 and args.reset_rate > 0):  # also refuses NaN
        ap.error("--idle-timeout and --reset-rate must be > 0")
    if not (args.audio_pace == 0 or 1 <= args.audio_pace < math.inf):  # below real time no client keeps up
        ap.error(f"--audio-pace must be 0 (no pace) or a finite number >= 1 (times real time), got {args.audio_pace}")
    if args.replay_seconds is not None and not 0 <= args.replay_seconds < math.inf:
        ap.error(f"--replay-seconds must be a finite number >= 0, got {args.replay_seconds}")
    # a flag of a feature not asked for would be ignored without a word: said instead (as the client does)
    if args.replay_seconds is not None and args.prompt_path is None:
        ap.error("--replay-seconds is for --prompt-path (how much of the prompt's end is played back); without a "
                 "prompt it would not be used")
    if args.max_recording_seconds is not None and args.recordings is None:
        ap.error("--max-recording-seconds is for --recordings (the cap of each recording); without them it would "
                 "not be used")
    args.max_recording_seconds = 3600.0 if args.max_recording_seconds is None else args.max_recording_seconds
    if not 0 < args.max_recording_seconds < math.inf:
        ap.error(f"--max-recording-seconds must be a finite number > 0, got {args.max_recording_seconds}")
    if args.max_message_bytes < MIN_MESSAGE_BYTES:  # every session would be closed at its first chunk
        ap.error(f"--max-message-bytes must be at least {MIN_MESSAGE_BYTES} (one audio chunk as a text frame), "
                 f"got {args.max_message_bytes}")
    if args.recordings is not None and not args.recordings.strip():
        ap.error("--recordings needs a folder")
    return args


def check_args(args):
    """The user's mistakes that loading the weights would otherwise hide: SystemExit("error: ...")
    for sampling parameters outside their ranges and missing files (all without importing torch;
    the prompt's audio is read by `load_engine`, which knows the context). Returns the sampling
    parameters {name: value}."""
    from model.audio import AudioError, file_problem, make_folder
    values = {name: getattr(args, name) for name in PARAM_NAMES}
    try:
        params = check_params(values)
    except ValueError as e:
        raise SystemExit(f"error: {printable(e, newlines=True)}")
    if args.checkpoint is None and args.variant != "duplex":  # found now, not after downloading its weights
        raise SystemExit(f"error: --variant {args.variant}: the live server needs the duplex variant "
                         "(or --checkpoint with one of our duplex checkpoints)")
    for path in (args.checkpoint, args.adapter, args.prompt_path, None if args.codec in ("auto", "official") else args.codec):
        if path is not None and (problem := file_problem(path)):
            if path == args.adapter and os.path.isdir(path):  # a run's folder: name the adapter files in it
                from model.lora import AdapterError, read_adapter
                try:
                    read_adapter(path)
                except AdapterError as e:
                    problem = str(e)
            raise SystemExit(f"error: {printable(problem, newlines=True)}")
    if args.recordings is not None:  # found now, not as a lost recording at each session's start
        try:
            make_folder(args.recordings, "--recordings")
        except AudioError as e:
            raise SystemExit(f"error: {printable(e, newlines=True)}") from None
    return params


def load_prompt_file(path: str, max_frames: int, limit: str):
    """The --prompt-path file as (2, N) float32, its last `max_frames` chunks at most (only those
    are read; a longer file is one warning naming `limit`, what sets them), or SystemExit("error:
    ...") for a file unreadable as audio or shorter than a chunk."""
    from model.audio import AudioError, load_prompt
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt = load_prompt(path, 2, SAMPLE_RATE, CHUNK, max_frames=max_frames, limit=limit)
    except (AudioError, ValueError) as e:
        raise SystemExit(f"error: {printable(e, newlines=True)}") from None
    for w in caught:  # longer than the context: its end is kept
        log.warning("%s", w.message)
    return prompt


def load_engine(args):
    import torch
    from model import load_hertz_dev
    from model.live import LiveEngine
    from model.loading import codec_config_of, no_codec_problem, recorded_codec, resolve_device, transformer_config_of
    try:
        device = str(resolve_device(args.device))
    except ValueError as e:
        raise SystemExit(f"error: {printable(e, newlines=True)}") from None
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    source = args.checkpoint or args.variant
    cfg = transformer_config_of(source)  # what the weights would say once loaded: the header or the official config
    if args.checkpoint is not None:
        from model.checkpoint import read_metadata
        if not cfg.duplex:
            raise SystemExit(f"error: --checkpoint {args.checkpoint} is a mono model: "
                             "the live server needs a duplex one")
        meta = read_metadata(args.checkpoint, kind="transformer")
        if problem := no_codec_problem("--checkpoint", args.checkpoint, meta, args.codec):
            raise SystemExit(f"error: {printable(problem, newlines=True)}")
    codec_cfg = codec_config_of(source, args.codec, cfg, adapter=args.adapter)  # from its header: the engine streams 2000-sample chunks
    rates = {f"the model {source}": cfg.sample_rate, "its codec": None if codec_cfg is None else codec_cfg.sample_rate}
    if off := [f"{what} runs at {rate} Hz" for what, rate in rates.items() if rate is not None and rate != SAMPLE_RATE]:
        # the prompt, the clients' audio and the replies are 16 kHz: a 24 kHz model would hear them 1.5x high
        raise SystemExit(f"error: {printable(' and '.join(off))}; the live protocol carries {SAMPLE_RATE} Hz audio: "
                         f"serve a {SAMPLE_RATE} Hz model")
    if codec_cfg is not None and (hop := math.prod(codec_cfg.strides)) != CHUNK:
        named = args.codec if args.codec != "auto" else recorded_codec(args.checkpoint, meta)  # official: 2000
        raise SystemExit(f"error: the codec {named} has {hop} samples per latent; the live "
                         f"server streams chunks of {CHUNK} ({CHUNK * 1000 // SAMPLE_RATE} ms): pass a codec of "
                         f"{CHUNK} (--codec official)")
    if args.max_len is not None and args.max_len > cfg.seq_len:  # before the weights (and caches) load
        raise SystemExit(f"error: --max-len {args.max_len} is beyond the model's context of {cfg.seq_len} latents")
    # the prompt is prefilled with room for one more latent: its last context - 1 chunks at most
    limit = "what " + (f"--max-len {args.max_len}" if args.max_len else "the model's context") + " leaves a prompt"
    prompt = None if args.prompt_path is None else load_prompt_file(args.prompt_path, (args.max_len or cfg.seq_len) - 1,
                                                                    limit)
    t0 = time.monotonic()
    try:  # the arguments are checked: a ValueError is about the weights (a layer --quantize cannot make), as complete.py
        model = load_hertz_dev(source, device=device, dtype=dtype, ckpt_dir=args.ckpt_dir,
                               offline=args.offline or None, codec=args.codec, adapter=args.adapter,
                               verify=not args.no_verify, quantize=args.quantize)
    except ValueError as e:
        raise SystemExit(f"error: {printable(e, newlines=True)}") from None
    from model.quant import TINYGEMM_MAX_ROWS, quantization_of
    mode = (quantization_of(model) or {}).get("mode")  # the weights' own: a checkpoint saved quantized, without --quantize
    log.info("loaded %s on %s in %.1f s%s%s", source, device, time.monotonic() - t0,
             f", {mode} weights" if mode else "", f", adapter {args.adapter} applied" if args.adapter else "")
    if prompt is not None:  # encoded once, before the engine: latents the model cannot take would end every session's start
        from model.stream_codec import PromptLatentsError, encode_frames
        try:
            encode_frames(model.codec, torch.from_numpy(prompt)[None].to(next(model.codec.parameters()).device), args.encode)
        except PromptLatentsError as e:
            raise SystemExit(f"error: --prompt-path {args.prompt_path}: {e}") from None
    max_sessions = int(args.max_sessions) if args.max_sessions != "auto" else 8 if device.startswith("cuda") else 1
    if mode == "int4" and device.startswith("cuda") and 2 * max_sessions > TINYGEMM_MAX_ROWS:
        log.warning("int4 runs tinygemm up to %d rows a step; %d sessions give the resynthesizer %d rows, whose "
                    "int4 layers then unpack their weights at every step (slow): use --quantize int8 for many "
                    "sessions", TINYGEMM_MAX_ROWS, max_sessions, 2 * max_sessions)
    engine = LiveEngine(model, max_sessions=max_sessions, max_len=args.max_len,
                        cuda_graphs=False if args.no_cuda_graphs else None, compile=False if args.no_compile else "auto",
                        encode=args.encode, kv_dtype=args.kv_dtype)
    return engine, prompt


def listening_socket(host: str, port: int):
    """A socket bound to (host, port), as uvicorn binds one (IPv6 for a host with a colon), made
    before the model loads: a port in use or a host that is not this machine's is one error line
    at once, where uvicorn found it only once the weights had loaded (minutes for the official
    model, a download the first time). Clients are refused until the server listens on it."""
    import socket
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # (in use, not an address of this machine, an unknown name, a privileged port)
        sock.close()
        raise SystemExit(f"error: --host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    return sock


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs(args.token)
    values = check_args(args)
    sock = listening_socket(args.host, args.port)  # (a port in use is an error now, not after the weights load)
    with sock:  # (closed on any way out: main is also called in-process, by the tests)
        with exit_on_interrupt(" while loading: the server did not start"):  # (torch: seconds)
            from model import SamplingParams
            from model.loading import LOAD_ERRORS
            from model.training import interrupted_exit, sigterm_as_interrupt
        params = SamplingParams(**values)
        try:
            with sigterm_as_interrupt():  # (minutes with the official weights, a download the first time)
                engine, prompt = load_engine(args)
        except LOAD_ERRORS as e:  # a file the user must fix (refused before any weights load where it can be)
            raise SystemExit(f"error: {printable(e, newlines=True)}") from None
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before serving: one line, as complete.py and the trainers
            interrupted_exit(e, " while loading: the server did not start")
        if prompt is not None:
            log.info("prompt %s: %.1f s", args.prompt_path, prompt.shape[1] / SAMPLE_RATE)
        limits = Limits(reset_rate=args.reset_rate, idle_timeout=args.idle_timeout, audio_pace=args.audio_pace)
        server = Server(engine, token=args.token, prompt=prompt, replay_seconds=args.replay_seconds,
                        recordings=args.recordings, max_recording_seconds=args.max_recording_seconds,
                        max_queue=args.queue_chunks, params=params, limits=limits)
        host = f"[{args.host}]" if ":" in args.host else args.host  # (an IPv6 address, bracketed in a URL)
        where = f"http://{host}:{sock.getsockname()[1]}/"  # (--port 0: the port the system chose)
        # the address is logged once it answers (`HttpServer.startup`): connections are refused until then
        log.info("warming up the engine (CUDA graphs, compiling: minutes on a GPU); the browser client's "
                 "address follows once it serves")
        # SIGTERM (kill, docker stop, systemd) ends the server as Ctrl-C does (`Terminated` is a
        # KeyboardInterrupt): uvicorn re-raises it once shut down, where its default action ended
        # the process with status 143, without stopping the engine and the recordings' disk thread
        # (`serve`'s finally); and while the engine warms up it is told from Ctrl-C.
        try:
            with sigterm_as_interrupt():
                serve(server, args.host, args.port, args.max_message_bytes, args.log_level, args.access_log,
                      sockets=[sock], access=Access(args.host, tuple(args.allow_host), tuple(args.allow_origin)),
                      serving=f"browser client: {where}{'?token=TOKEN' if args.token else ''}")
        except KeyboardInterrupt as e:  # uvicorn re-raises Ctrl-C (and SIGTERM) once it has shut down gracefully
            if not server.worker.ready.is_set():  # the engine's warm-up (CUDA graphs, compiling): nothing served
                interrupted_exit(e, " while warming up: the server did not start")


if __name__ == "__main__":
    main()
