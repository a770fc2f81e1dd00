"""Talk with hertz-dev through inference_server.py: microphone in, speaker out, or headless from a
file to a file.

    python inference_client.py                                      # ws://127.0.0.1:8000, default devices
    python inference_client.py --server ws://gpu-box:8000 --token "$HERTZ_TOKEN" --token-temp 0.7
    python inference_client.py --list-devices
    python inference_client.py --input-device 2 --output-device "USB"    # index or part of the name
    python inference_client.py --input-wav me.wav --output-wav chat.wav  # headless, in real time
    python inference_client.py --input-wav me.wav --output-wav chat.wav --no-realtime   # as fast as the server reads

Audio is 16 kHz mono 16-bit PCM in chunks of 2000 samples (125 ms), sent as binary frames; every
chunk gets one chunk of model audio back. Live, the sound card callbacks never block: the
microphone's frames are handed to the event loop, and the speaker reads replies with
`get_nowait()`, playing silence when none is there. File mode streams the file at real time (or
`--no-realtime`: as fast as the server answers, which reads at most its --audio-pace, 1.25x real time
by default) and writes a stereo WAV: channel 0 the user (the
input, padded to whole chunks), channel 1 the model's reply to each chunk, under that chunk.
Latency statistics are printed at the end (and every --stats-every seconds live): the round trip
(a chunk sent to its reply received) and, live, capture to playback (a chunk's last sample
captured to the first sample of its reply played). Both count only replies to the user's own
chunks: with a server `--prompt-path`, the prompt's playback at the start is not timed.
Ctrl-C stops cleanly (file mode writes what it has). Needs numpy and websockets, not torch.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import queue
import signal
import sys
import time
import urllib.parse
from typing import Callable, Mapping, Optional

import numpy as np

from config import ArgumentParser, printable
from model.protocol import (CHUNK, CHUNK_BYTES, CLOSE_RESTART, JITTER, PARAM_NAMES, PARAM_RANGES, REPLY_TIMEOUT_S,
                            SAMPLE_RATE, SEED_MAX, SHUTDOWN_REASON, check_param, describe_range, float_to_pcm,
                            percentiles, query_seed, redact_tokens)

# The command-line flags of each sampling parameter (the original client's names too).
PARAM_FLAGS = {"token_temp": ("--token-temp", "--token_temp", "-t1"),
               "top_p": ("--top-p", "--top_p"),
               "min_p": ("--min-p", "--min_p"),
               "mixture_temp": ("--mixture-temp", "--categorical-temp", "--categorical_temp", "-t2"),
               "gaussian_temp": ("--gaussian-temp", "--gaussian_temp", "-t3")}


def audio_url(server: str, seed: Optional[int] = None) -> str:
    """ws://host:port[/audio] (http(s):// is accepted too) -> the websocket URL of /audio, with
    `seed` as its ?seed=; a ValueError for an address the server would refuse (a seed given twice,
    in it and as `seed`, or out of range included)."""
    if "://" not in server:
        server = "ws://" + server
    try:
        u = urllib.parse.urlsplit(server)  # an unclosed [IPv6 address] raises here
    except ValueError as e:
        raise ValueError(f"--server {server!r}: {e}") from None
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--server must be ws://, wss://, http:// or https://, got {server!r}")
    try:
        u.port  # a port that is not a number in 0..65535 raises here
    except ValueError as e:
        raise ValueError(f"--server {server!r}: {e}") from None
    if not u.hostname:
        raise ValueError(f"--server {server!r} names no host (ws://HOST:PORT)")
    if u.username is not None:
        raise ValueError(f"--server {server!r}: a user name in the address is not supported (use --token)")
    path = u.path if u.path not in ("", "/") else "/audio"
    query = urllib.parse.parse_qsl(u.query)
    if seed is not None:
        query.append(("seed", str(seed)))
    seeds = [value for name, value in query if name == "seed"]
    if len(seeds) > 1:  # the server refuses a seed given twice, once connected
        also = " and --seed" if seed is not None else ""
        raise ValueError(f"--server {server!r} has a ?seed={also}: give the seed once")
    for value in seeds:  # the server's rule, found before connecting
        try:
            query_seed(value)
        except ValueError as e:
            raise ValueError(f"--server {server!r}: {e}") from None
    return urllib.parse.urlunsplit((scheme, u.netloc, path, urllib.parse.urlencode(query), ""))


def latency_summary(seconds: list) -> dict:
    """{"p50_ms", "p90_ms", "p99_ms", "max_ms"} of durations in seconds (None where there are none)."""
    ms = 1000 * np.asarray(seconds, dtype=np.float64)
    return {**{f"{k}_ms": v for k, v in percentiles(ms, (50, 90, 99)).items()},
            "max_ms": round(float(ms.max()), 2) if len(ms) else None}


CLOSE_TIMEOUT_S = 2.0  # seconds the end of a session (or Ctrl-C) waits for the server's closing handshake


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Conversation:
    """One session over an open websocket: sends 16-bit chunks, hands each reply to `on_audio`,
    and keeps round-trip times. A reply answers the oldest unanswered chunk; a `dropped` notice
    from the server stands for that many chunks. The replies between the server's `replay` and
    `live` notices are the prompt's playback: they answer chunks too, but are not timed, and
    `on_audio` gets them with no capture time."""

    def __init__(self, ws, on_audio: Callable[[np.ndarray, Optional[float]], None],
                 on_dropped: Callable[[int], None] = lambda n: None):
        self.ws, self.on_audio, self.on_dropped = ws, on_audio, on_dropped
        self.pending: collections.deque = collections.deque()  # (send time, capture time) of unanswered chunks
        self.rtt: list[float] = []
        self.sent = self.replies = self.replayed = self.dropped = 0
        self.replaying = False
        self.failure = ""  # what the server sent that no hertz-dev server sends
        self.unknown: set = set()  # the message types it sent that this client does not know
        self.answered = asyncio.Event()

    async def control(self, **message) -> dict:
        """A control message and its answer (call before audio flows)."""
        await self.ws.send(json.dumps(message))
        while True:
            reply = await self.ws.recv()
            if isinstance(reply, str):
                reply = server_notice(reply)
                if reply.get("type") in ("ack", "error", "status"):
                    return reply

    async def send(self, chunk: bytes, captured: Optional[float] = None) -> None:
        """Send one chunk; `captured`: the time.perf_counter() its last sample was captured at."""
        self.pending.append((time.perf_counter(), captured))
        await self.ws.send(chunk)
        self.sent += 1

    async def receive(self) -> None:
        """Until the server closes the connection."""
        import websockets
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    if len(message) != CHUNK_BYTES:
                        raise ValueError(f"a binary message of {len(message)} bytes, not one chunk ({CHUNK_BYTES})")
                    sent, captured = self.pending.popleft() if self.pending else (None, None)
                    self.replies += 1
                    if self.replaying:
                        self.replayed += 1
                        captured = None
                    elif sent is not None:
                        self.rtt.append(time.perf_counter() - sent)
                    self.on_audio(np.frombuffer(message, dtype="<i2"), captured)
                else:
                    m = server_notice(message)
                    kind = m.get("type")
                    if kind == "dropped":
                        n = m.get("chunks")
                        if not isinstance(n, int) or n < 0:
                            raise ValueError(f"a dropped notice without a chunk count: {message[:80]!r}")
                        for _ in range(min(n, len(self.pending))):
                            self.pending.popleft()
                        self.dropped += n
                        self.on_dropped(n)
                    elif kind in ("replay", "live"):
                        self.replaying = kind == "replay"
                    elif kind == "error":
                        log(f"server: {shown(m.get('message'))}")
                    elif kind not in ("ack", "status") and repr(kind) not in self.unknown:  # named once a type
                        self.unknown.add(repr(kind))
                        log(f"server: a message of unknown type {shown(repr(kind))} (ignored)")
                self.answered.set()
        except websockets.ConnectionClosedError:
            pass
        except ValueError as e:  # not a hertz-dev server, or another version of the protocol
            self.failure = f"the server broke the protocol: {e}"
            await self.ws.close()
        finally:  # wake a sender waiting for replies (--no-realtime's window): none will come now
            self.answered.set()

    @property
    def unanswered(self) -> int:
        return len(self.pending)

    async def stopped_answering(self, timeout: float) -> None:
        """Returns once the oldest unanswered chunk has waited `timeout` seconds for its reply: a server
        that takes the chunks and answers none, without closing (file mode's real-time loop and live
        mode watch for it; --no-realtime's window waits for the next reply instead)."""
        while not (self.pending and time.perf_counter() - self.pending[0][0] >= timeout):
            await asyncio.sleep(0.05)

    def summary(self) -> dict:
        return {"replies": self.replies, "replayed": self.replayed, "timed": len(self.rtt),
                **latency_summary(self.rtt), "sent": self.sent, "dropped_by_server": self.dropped}


def unanswered_line(unanswered: int, sent: int, timeout: float) -> str:
    """What ends a session whose server stopped answering (the error line's text)."""
    return (f"{unanswered} of {sent} chunks got no reply within --reply-timeout ({timeout:g} s): "
            "the server stopped answering")


def shown(text) -> str:
    """Text the server sent (a close reason, an error's message), as printed: at most 300
    characters, and its control characters escaped (`\\x1b`), so a hostile server cannot send
    escape sequences to the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:300])


def server_notice(text: str) -> dict:
    """A text message of the server -> its JSON object; ValueError (naming it) when it is none."""
    try:
        m = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
        m = None
    if not isinstance(m, dict):
        raise ValueError(f"a text message that is not a JSON object: {text[:80]!r}")
    return m


def print_summary(conv: Conversation, **extra) -> None:
    s = {**conv.summary(), **extra}
    if s["timed"]:
        replayed = f" (not counting {s['replayed']} of prompt playback)" if s["replayed"] else ""
        print(f"round trip over {s['timed']} chunks{replayed}: p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms, "
              f"p99 {s['p99_ms']} ms, max {s['max_ms']} ms", flush=True)
    if s.get("c2p", {}).get("p50_ms") is not None:
        c = s["c2p"]
        print(f"capture to playback over {c['chunks']} chunks: p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms", flush=True)
    print("stats " + json.dumps(s), flush=True)


async def open_session(args):
    import websockets
    from websockets.asyncio.client import ClientConnection, connect
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    url = audio_url(args.server, args.seed)
    shown = redact_tokens(url)  # a ?token= in --server is not printed
    reached = []  # the TCP connection was made: a server that then does not answer its handshake was reached

    class Connection(ClientConnection):
        def connection_made(self, transport) -> None:
            reached.append(True)
            super().connection_made(transport)
    try:
        # close_timeout: at the end (or Ctrl-C) wait at most 2 s for the server's closing handshake
        ws = await connect(url, additional_headers=headers, max_size=1 << 20, open_timeout=args.reply_timeout,
                           close_timeout=CLOSE_TIMEOUT_S, create_connection=Connection)
    except websockets.InvalidStatus as e:
        code, path = e.response.status_code, urllib.parse.urlsplit(url).path
        if code in (401, 403):
            hint = " (a missing or wrong --token)"
        elif code == 404:
            hint = f" (no websocket at {path}: a hertz-dev server's is ws://HOST:PORT/audio)"
        elif code == 426:  # the request reached /audio without its Upgrade header
            hint = (f" ({path} is a websocket endpoint, and the request reached it as plain HTTP: a proxy in between "
                    "must forward the Upgrade and Connection headers)")
        else:
            hint = " (not a hertz-dev server: its websocket is ws://HOST:PORT/audio)"
        raise SystemExit(f"error: the server refused the connection: HTTP {code}{hint}")
    except websockets.InvalidHandshake as e:  # something listens there, but it does not speak websocket
        raise SystemExit(f"error: {shown} is not a websocket server ({e})")
    except TimeoutError as e:  # (an OSError: before it) open_timeout, or the system's own for connecting
        if reached:
            raise SystemExit(f"error: {shown} did not answer the websocket handshake within --reply-timeout "
                             f"({args.reply_timeout:g} s)") from None
        why = e if e.errno is not None else f"no connection within --reply-timeout ({args.reply_timeout:g} s)"
        raise SystemExit(f"error: cannot reach {shown}: {why}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot reach {shown}: {e}")
    return ws


async def start(args, on_audio, on_dropped=lambda n: None) -> Conversation:
    import websockets
    ws = await open_session(args)
    conv = Conversation(ws, on_audio, on_dropped)
    params = {k: getattr(args, k) for k in PARAM_NAMES if getattr(args, k) is not None}
    try:
        if params:
            try:
                reply = await asyncio.wait_for(conv.control(type="set_params", **params), args.reply_timeout)
            except asyncio.TimeoutError:  # it took the session and answers nothing
                await ws.close()
                raise SystemExit(f"error: the server did not answer set_params within --reply-timeout "
                                 f"({args.reply_timeout:g} s)") from None
            if reply["type"] == "error":
                raise SystemExit(f"error: {shown(reply.get('message') or 'the server refused set_params')}")
            if not isinstance(reply.get("params"), dict):
                raise ValueError(f"an answer to set_params without the session's params: {json.dumps(reply)[:80]}")
            log("sampling: " + ", ".join(f"{k}={v}" for k, v in reply["params"].items()))
    except websockets.ConnectionClosed:  # the server refused the session (at capacity, a bad seed)
        raise SystemExit(f"error: {close_reason(ws) or 'the server closed the session'}") from None
    except ValueError as e:  # its answer was not JSON: not a hertz-dev server
        await ws.close()
        raise SystemExit(f"error: the server broke the protocol: {e}") from None
    except Exception:
        await ws.close()
        raise
    return conv


async def close_session(ws) -> None:
    """Close the websocket within CLOSE_TIMEOUT_S: the close frame can wait behind audio the server
    has not read (it reads at most 1.25x real time; a hung server reads nothing), which websockets
    waits to drain before its own close timeout starts; then the connection is dropped."""
    try:
        await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
    except asyncio.TimeoutError:
        ws.transport.abort()


def close_reason(ws) -> str:
    code = ws.close_code
    if code in (None, 1000):
        return ""
    if code == 1006:  # no closing handshake: the server died or the network went away
        return "the connection to the server was lost (1006)"
    reason = ws.close_reason or {CLOSE_RESTART: SHUTDOWN_REASON}.get(code, "")  # (a close by uvicorn itself gives none)
    return f"the server closed the session: {code} {shown(reason)}".strip()


# --- file mode ---------------------------------------------------------------------------------

def read_audio(path: str) -> np.ndarray:
    """Any file soundfile reads -> mono float32 at 16 kHz. AudioError (naming the file) when it
    cannot be read, or holds a NaN, an inf or a sample far beyond full scale: the rules of the
    trainers and the server's prompt (`model.audio`); also when it holds no samples (nothing to send),
    or decodes well short of the length its header gives (`cut_short`: an MP3 cut short by a download,
    which the trainers skip and complete.py and the server's prompt refuse, was streamed as what was left)."""
    # soundfile and soxr: needed in file mode only
    from model.audio import AudioError, audio_info, cut_short, load_audio
    audio = load_audio(path, SAMPLE_RATE, channels="mono")[0]  # first: it refuses a named pipe before opening it
    frames, rate, _ = audio_info(path)
    if len(audio) == 0:
        raise AudioError(f"cannot read audio file {path}: it holds no audio (0 samples)")
    if cut_short(len(audio), frames * SAMPLE_RATE // rate, SAMPLE_RATE):
        raise AudioError(f"cannot read audio file {path}: its header counts {frames} frames, but it holds fewer "
                         f"({len(audio) / SAMPLE_RATE:.1f} s of the {frames / rate:.1f} s it gives: a file cut short?)")
    return audio


def write_wav(path: str, stereo: np.ndarray) -> None:
    """(T, 2) int16 -> an audio file of the format its extension names (a WAV without one, as a
    device such as /dev/null), atomically (temporary file beside it, then renamed)."""
    import soundfile as sf

    from model.audio import output_format
    from model.files import replace_atomically
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # format: soundfile takes it from the name, which a device (/dev/null) written into has none of
    ext, fmt, subtype = output_format(path)
    replace_atomically(path, lambda tmp: sf.write(tmp, stereo, SAMPLE_RATE, subtype=subtype, format=fmt), suffix=ext)


def save_conversation(path: str, stereo: np.ndarray) -> str:
    """Write the conversation to `path` (`write_wav`); "" when written, else one line saying why
    not and where it went instead (a new file in the temporary folder), so that a disk that filled
    up, or a folder gone, during the session does not lose it."""
    import tempfile
    try:
        write_wav(path, stereo)
        return ""
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: soundfile's; ValueError: a name it cannot encode
        problem = f"cannot write {printable(path)}: {e}"
    try:
        fd, rescue = tempfile.mkstemp(prefix="hertz-conversation-", suffix=".wav")
        os.close(fd)
        write_wav(rescue, stereo)
    except (OSError, RuntimeError) as e:
        return f"{problem}; nor a copy in the temporary folder ({e}): the conversation is lost"
    return f"{problem}; the conversation is in {rescue}"


async def file_mode(args, stop: asyncio.Event) -> int:
    import websockets
    audio = args.audio  # read by parse_args, before connecting
    n = max(1, -(-len(audio) // CHUNK))
    user = np.zeros(n * CHUNK, dtype="<i2")
    user[:len(audio)] = float_to_pcm(audio)
    model = np.zeros(n * CHUNK, dtype="<i2")
    slot = 0  # the chunk the next reply answers

    def on_audio(pcm, captured):
        nonlocal slot
        if slot < n:
            model[slot * CHUNK:(slot + 1) * CHUNK] = pcm
        slot += 1

    def on_dropped(count):
        nonlocal slot
        slot += count  # those chunks get no reply: silence under them

    conv = await start(args, on_audio, on_dropped)
    receiver = asyncio.create_task(conv.receive())
    log(f"streaming {printable(args.input_wav)}: {n * CHUNK / SAMPLE_RATE:.1f} s, "
        f"{'real time' if args.realtime else 'as fast as answered'}")
    async def answered_within(seconds: float) -> bool:
        """Wait for the server's next message; False when none came within `seconds`."""
        conv.answered.clear()
        try:
            await asyncio.wait_for(conv.answered.wait(), max(0.01, seconds))
            return True
        except asyncio.TimeoutError:
            return False

    sent, stalled, unwritten = 0, False, ""
    # in real time, a server that stops answering is noticed by the age of the oldest unanswered chunk
    watch = asyncio.create_task(conv.stopped_answering(args.reply_timeout)) if args.realtime else None
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if args.realtime:
                await asyncio.sleep(max(0.0, t0 + i * CHUNK / SAMPLE_RATE - time.perf_counter()))
                stalled = watch.done()
            else:  # a server that takes chunks and answers none must not hold the window shut forever
                while conv.unanswered >= args.window and not receiver.done() and not stalled:
                    stalled = not await answered_within(args.reply_timeout)
            if receiver.done() or stop.is_set() or stalled:
                break
            try:
                await conv.send(user[i * CHUNK:(i + 1) * CHUNK].tobytes())
            except websockets.ConnectionClosed:  # the server ended the session: its reason is reported below
                break
            sent += 1
        deadline = time.perf_counter() + args.reply_timeout
        while (slot < sent and not stalled and not receiver.done() and not stop.is_set()
               and time.perf_counter() < deadline):
            if not await answered_within(deadline - time.perf_counter()):
                break
    finally:  # also on Ctrl-C: close, write what there is, print the statistics
        if watch is not None:
            watch.cancel()
        await close_session(conv.ws)
        receiver.cancel()
        if conv.replies:  # a session refused at its start does not replace an earlier conversation
            stereo = np.stack([user[:sent * CHUNK], model[:sent * CHUNK]], axis=1)
            if unwritten := save_conversation(args.output_wav, stereo):
                log(f"error: {unwritten}")  # here: on Ctrl-C nothing after this block runs
                args.unwritten = True  # (for interruptible: a Ctrl-C then ends with status 1, not 0)
            else:
                log(f"wrote {printable(args.output_wav)}: {sent * CHUNK / SAMPLE_RATE:.1f} s, stereo (user, model)")
        else:
            log(f"the server answered nothing: {args.output_wav} not written")
        print_summary(conv, missing=max(0, sent - slot))
    reason = conv.failure or close_reason(conv.ws)
    if not reason and slot < sent and not stop.is_set():  # a server that stopped answering is no success
        reason = unanswered_line(sent - slot, sent, args.reply_timeout)
    if reason:
        log(f"error: {reason}")
    return 1 if reason or unwritten else 0


# --- live mode ---------------------------------------------------------------------------------

def stream_offset(time_info, field: str) -> float:
    """Seconds from a sound card callback's `currentTime` to `field` of its time_info (the ADC
    time of the input's first sample, or the DAC time of the output's); 0 where the host API
    gives no times."""
    try:
        now, then = time_info.currentTime, getattr(time_info, field)
    except AttributeError:
        return 0.0
    return then - now if now > 0 and then > 0 and abs(then - now) < 1 else 0.0


def samples_ms(n: int) -> float:
    """n samples at 16 kHz in milliseconds."""
    return 1000 * n / SAMPLE_RATE


class Speaker:
    """The output callback's side: the model's replies through the adaptive jitter buffer of the
    browser page (`model.protocol.JITTER`, one policy for both clients): after silence a reply
    starts playing `margin` after it arrived (20 ms at first); each underrun (the buffer ran dry
    while playing) grows the margin by 20 ms, up to 250 ms, so a network that delays replies
    unevenly costs a little latency instead of a gap every few chunks; after 5 s without an
    underrun it shrinks by 10 ms, down to the start, dropping up to 10 ms of what the buffer held
    beyond it. The buffer holds at most the margin plus two chunks (a burst beyond drops the
    oldest reply: an overflow).

    `put` (the event loop) hands a reply over through a bounded thread-safe queue; the callback
    (the audio thread) takes what arrived, keeps the buffer and never blocks. Times are counted
    in samples played. For each reply put with the capture time of the chunk it answers, it
    keeps the capture to playback time: from that chunk's last sample captured to the reply's
    first sample played."""

    def __init__(self, jitter: Mapping[str, float] = JITTER, clock: Callable[[], float] = time.perf_counter,
                 max_pending: int = 64):
        def samples(ms: float) -> int:
            return round(ms / 1000 * SAMPLE_RATE)
        self.incoming: queue.Queue = queue.Queue(maxsize=max_pending)  # put -> callback
        self.clock = clock
        self.buffer: collections.deque = collections.deque()  # (pcm, captured) not yet played
        self.head = 0                # samples of buffer[0] already played
        self.buffered = 0            # samples in the buffer from the head on
        self.margin = self.margin_min = samples(jitter["marginStartMs"])
        self.margin_max, self.grow, self.step = (samples(jitter[k]) for k in ("marginMaxMs", "growMs", "shrinkMs"))
        self.shrink_after = samples(jitter["shrinkAfterMs"])
        self.playing = False
        self.waited = 0              # samples the reply after silence has waited to start
        self.dry = False             # ran dry while playing, and no reply since
        self.slack = math.inf        # the least the buffer held when a reply arrived while playing
        self.stable = 0              # samples played since the last underrun or change of margin
        self.max_margin = self.margin
        self.underruns = self.trimmed = self.burst_drops = self.lost = 0
        self.c2p: list[float] = []  # seconds

    @property
    def overflows(self) -> int:
        """Replies dropped: bursts beyond the bound, and replies the callback did not take in time."""
        return self.burst_drops + self.lost

    def put(self, pcm: np.ndarray, captured: Optional[float] = None) -> None:  # event loop: never blocks
        while True:
            try:
                self.incoming.put_nowait((pcm, captured))
                return
            except queue.Full:  # the audio thread is not running: keep the newest
                try:
                    self.incoming.get_nowait()
                    self.lost += 1
                except queue.Empty:
                    pass

    def _arrive(self, pcm: np.ndarray, captured: Optional[float]) -> None:
        if self.playing:
            self.slack = min(self.slack, self.buffered)
        if self.dry:  # the reply after an underrun: a larger margin from now on
            self.margin = min(self.margin_max, self.margin + self.grow)
            self.max_margin = max(self.max_margin, self.margin)
            self.dry, self.stable, self.slack = False, 0, math.inf
        self.buffer.append((pcm, captured))
        self.buffered += len(pcm)
        while self.buffered > self.margin + 2 * CHUNK and len(self.buffer) > 1:  # a burst: drop the oldest
            self.buffered -= len(self.buffer.popleft()[0]) - self.head
            self.head = 0
            self.burst_drops += 1

    def _drop(self, n: int) -> None:
        """Skip up to n samples from the head of the buffer."""
        while n > 0 and self.buffer:
            take = min(n, len(self.buffer[0][0]) - self.head)
            self.head += take
            self.buffered -= take
            self.trimmed += take
            n -= take
            if self.head == len(self.buffer[0][0]):
                self.buffer.popleft()
                self.head = 0

    def callback(self, outdata, frames, time_info, status) -> None:  # audio thread: never blocks
        plays_at = self.clock() + stream_offset(time_info, "outputBufferDacTime")  # this block's first sample
        while True:
            try:
                self._arrive(*self.incoming.get_nowait())
            except queue.Empty:
                break
        out = outdata[:, 0]
        start = 0 if self.playing else frames  # where this block's playback starts
        if not self.playing and self.buffered:  # a reply after silence: it waits the margin first
            start = max(0, self.margin - self.waited)
            self.waited += frames
            if start < frames:
                self.playing, self.waited = True, 0
        out[:start] = 0
        filled = start
        while self.playing and filled < frames:
            if not self.buffer:  # ran dry
                out[filled:] = 0
                self.playing, self.dry = False, True
                self.underruns += 1
                break
            pcm, captured = self.buffer[0]
            if self.head == 0 and captured is not None:
                self.c2p.append(plays_at + filled / SAMPLE_RATE - captured)
            take = min(frames - filled, len(pcm) - self.head)
            out[filled:filled + take] = pcm[self.head:self.head + take]
            self.head += take
            self.buffered -= take
            filled += take
            if self.head == len(pcm):
                self.buffer.popleft()
                self.head = 0
        if self.playing:
            self.stable += frames
            if self.stable >= self.shrink_after:  # stable for a while: less margin, less held beyond it
                if self.margin > self.margin_min or self.slack - self.margin > self.step:
                    self.margin = max(self.margin_min, self.margin - self.step)
                    self._drop(min(self.slack - self.margin, self.step))
                    self.slack = math.inf
                self.stable = 0
        for c in range(1, outdata.shape[1]):
            outdata[:, c] = out


def device_arg(value):
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def check_websockets() -> None:
    """SystemExit("error: ...") where websockets (13 or later: its asyncio client) is missing: one
    line before connecting, not a traceback at the first `import websockets`."""
    try:
        import websockets.asyncio.client  # noqa: F401 (the module `open_session` connects with)
    except ImportError as e:
        raise SystemExit(f"error: the client needs websockets 13 or later ({e}): pip install 'websockets>=13.0'")


def import_sounddevice():
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:  # OSError: the PortAudio library is missing
        raise SystemExit(f"error: live audio needs sounddevice and PortAudio ({e}); "
                         "on Debian/Ubuntu: apt-get install libportaudio2. Or use --input-wav/--output-wav.")
    return sd


def choose_devices(sd, args) -> None:
    """Ask for the devices on the terminal (before the event loop starts: input() blocks)."""
    print(sd.query_devices())
    default_in, default_out = sd.default.device
    try:
        given = input(f"input device [{default_in}]: ").strip()
        args.input_device = given or args.input_device
        given = input(f"output device [{default_out}]: ").strip()
        args.output_device = given or args.output_device
    except EOFError:
        raise SystemExit("\nerror: --choose-devices asks on the terminal, and its input ended; "
                         "give --input-device and --output-device instead") from None


async def live_mode(args, stop: asyncio.Event) -> int:
    sd = import_sounddevice()
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue = asyncio.Queue(maxsize=16)
    speaker = Speaker()
    lost_mic = 0

    def take_mic(data: bytes, captured: float) -> None:  # event loop
        nonlocal lost_mic
        if mic.full():  # the connection is not keeping up: drop the oldest microphone audio
            mic.get_nowait()
            lost_mic += 1
        mic.put_nowait((data, captured))

    def on_input(indata, frames, time_info, status) -> None:  # audio thread: hand over, never block
        # When the block's last sample was captured, on time.perf_counter()'s clock (without the
        # host's times: now, as the callback comes once the block is complete).
        first = stream_offset(time_info, "inputBufferAdcTime")  # < 0: the first sample's age
        last = time.perf_counter() + (first + (frames - 1) / SAMPLE_RATE if first else 0.0)
        loop.call_soon_threadsafe(take_mic, bytes(indata), last)

    streams = []  # opened first: no server slot is taken for a machine without a microphone
    try:
        streams.append(sd.InputStream(samplerate=SAMPLE_RATE, blocksize=CHUNK, channels=1, dtype="int16",
                                      device=device_arg(args.input_device), callback=on_input))
        # Output in the host's small blocks: a reply starts playing soon after it arrives.
        streams.append(sd.OutputStream(samplerate=SAMPLE_RATE, blocksize=0, latency="low", channels=1, dtype="int16",
                                       device=device_arg(args.output_device), callback=speaker.callback))
        conv = await start(args, speaker.put)
    except BaseException as e:
        for stream in streams:
            stream.close()
        if isinstance(e, (sd.PortAudioError, ValueError)):
            raise SystemExit(f"error: cannot open the audio devices ({e}); see --list-devices, --input-device, "
                             "--output-device, or use --input-wav/--output-wav")
        raise
    receiver = asyncio.create_task(conv.receive())

    async def send_mic():
        pending, end = b"", 0.0  # end: when the last sample of `pending` was captured
        while True:
            data, end = await mic.get()
            pending += data
            while len(pending) >= CHUNK_BYTES:
                await conv.send(pending[:CHUNK_BYTES], captured=end - (len(pending) - CHUNK_BYTES) / 2 / SAMPLE_RATE)
                pending = pending[CHUNK_BYTES:]

    async def report():
        while True:
            await asyncio.sleep(args.stats_every)
            recent = max(1, int(8 * args.stats_every))  # about the chunks of the last interval (at least one)
            rtt, c2p = latency_summary(conv.rtt[-recent:]), latency_summary(speaker.c2p[-recent:])
            log(f"round trip p50 {rtt['p50_ms']} ms, p99 {rtt['p99_ms']} ms | capture to playback p50 "
                f"{c2p['p50_ms']} ms, p99 {c2p['p99_ms']} ms | sent {conv.sent}, received {conv.replies} "
                f"({conv.replayed} prompt playback), dropped {conv.dropped}, speaker underruns {speaker.underruns}, "
                f"jitter margin {samples_ms(speaker.margin):.0f} ms")

    tasks, stalled = [], False
    try:
        with streams[0], streams[1]:
            log("live: speak now (Ctrl-C to stop)")
            tasks = [asyncio.create_task(send_mic())] + ([asyncio.create_task(report())] if args.stats_every > 0 else [])
            stopped = asyncio.create_task(stop.wait())
            watch = asyncio.create_task(conv.stopped_answering(args.reply_timeout))
            tasks += [stopped, watch]
            # until the server closes the session, stops answering, or Ctrl-C
            await asyncio.wait({receiver, stopped, watch}, return_when=asyncio.FIRST_COMPLETED)
            stalled = watch.done() and not stop.is_set()
    finally:
        for t in tasks + [receiver]:
            t.cancel()
        await close_session(conv.ws)
        print_summary(conv, c2p={"chunks": len(speaker.c2p), **latency_summary(speaker.c2p)},
                      speaker_underruns=speaker.underruns, speaker_overflows=speaker.overflows,
                      speaker_max_margin_ms=samples_ms(speaker.max_margin),
                      speaker_trimmed_ms=samples_ms(speaker.trimmed), microphone_dropped=lost_mic)
    reason = conv.failure or close_reason(conv.ws)
    if not reason and stalled:
        reason = unanswered_line(conv.unanswered, conv.sent, args.reply_timeout)
    if reason:
        log(f"error: {reason}")
        return 1
    return 0


# --- command line ------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", "-s", default="ws://127.0.0.1:8000", help="the server (ws://, wss://, http://, https://)")
    ap.add_argument("--token", default=os.environ.get("HERTZ_TOKEN"), help="the server's token (default: $HERTZ_TOKEN)")
    ap.add_argument("--seed", type=int, help="the session's random seed (default: the server picks one)")
    for name in PARAM_NAMES:
        what = PARAM_RANGES[name][4]
        ap.add_argument(*PARAM_FLAGS[name], dest=name, type=float, help=f"{what}, in {describe_range(name)}")
    live = ap.add_argument_group("live audio (sounddevice)")
    live.add_argument("--list-devices", action="store_true", help="print the audio devices and exit")
    live.add_argument("--input-device", help="microphone: index or part of the name (default: the system's)")
    live.add_argument("--output-device", help="speaker: index or part of the name (default: the system's)")
    live.add_argument("--choose-devices", action="store_true", help="ask for the devices interactively")
    live.add_argument("--stats-every", type=float, help="seconds between latency lines (0: only at the end; default 5)")
    files = ap.add_argument_group("file mode (headless)")
    files.add_argument("--input-wav", type=os.path.expanduser,
        help="stream this file (any format soundfile reads; mixed to mono, 16 kHz)")
    files.add_argument("--output-wav", type=os.path.expanduser,
        help="write the conversation here: stereo, user and model (WAV, or the "
                       "format its extension names: .flac, .ogg)")
    files.add_argument("--realtime", action=argparse.BooleanOptionalAction,
                       help="send at real time (default), or as fast as the server answers (it reads at most its --audio-pace, "
                            "1.25x real time by default)")
    files.add_argument("--window", type=int, help="--no-realtime: chunks in flight at once (default 2)")
    ap.add_argument("--reply-timeout", type=float, default=REPLY_TIMEOUT_S,
                    help="seconds to wait for the server before giving up: the websocket handshake, the answer "
                         "to the sampling flags, the reply to the oldest chunk unanswered (with --no-realtime: "
                         "the next reply)")
    args = ap.parse_args(argv)
    for flag, value in (("--input-wav", args.input_wav), ("--output-wav", args.output_wav)):
        if value == "":  # (taken as not given: both empty switched to the microphone)
            raise SystemExit(f"error: {flag} needs a file, got ''")
    if bool(args.input_wav) != bool(args.output_wav):
        raise SystemExit("error: --input-wav and --output-wav go together")
    # a flag of the other mode would be ignored without a word: said instead (--list-devices only lists)
    live_only = [flag for flag, given in (("--input-device", args.input_device is not None),
                                          ("--output-device", args.output_device is not None),
                                          ("--choose-devices", args.choose_devices),
                                          ("--stats-every", args.stats_every is not None)) if given]
    file_only = [flag for flag, given in (("--realtime" if args.realtime else "--no-realtime", args.realtime is not None),
                                          ("--window", args.window is not None)) if given]
    if args.input_wav and live_only:
        raise SystemExit(f"error: {live_only[0]} is for live audio (microphone and speaker); with --input-wav it "
                         "would not be used")
    if args.input_wav and args.window is not None and args.realtime is not False:  # (read only as fast as answered)
        raise SystemExit("error: --window is for --no-realtime (chunks in flight at once); in real time the "
                         "chunks are sent as the audio's clock says")
    if not args.input_wav and file_only and not args.list_devices:
        raise SystemExit(f"error: {file_only[0]} is for file mode (--input-wav, --output-wav); live it would not be "
                         "used")
    args.stats_every = 5.0 if args.stats_every is None else args.stats_every
    args.realtime = True if args.realtime is None else args.realtime
    args.window = 2 if args.window is None else args.window
    if args.seed is not None and not 0 <= args.seed < SEED_MAX:  # the server's range: refused before connecting
        raise SystemExit(f"error: --seed must be an integer in [0, 2**63), got {args.seed}")
    try:
        audio_url(args.server, args.seed)
        for name in PARAM_NAMES:  # found here, before connecting
            if getattr(args, name) is not None:
                check_param(name, getattr(args, name))
    except ValueError as e:
        raise SystemExit(f"error: {redact_tokens(str(e))}")
    args.audio = None
    if args.input_wav:  # read here, before connecting
        from model.audio import AudioError, check_output
        try:
            args.audio = read_audio(args.input_wav)
            # where the conversation goes: a format soundfile writes (by the extension; a WAV without
            # one), not a folder, a pipe or the input
            check_output(args.output_wav, keep={"the --input-wav file": args.input_wav})
        except AudioError as e:
            raise SystemExit(f"error: {e}")
    if not args.stats_every >= 0:  # also refuses NaN
        raise SystemExit(f"error: --stats-every must be >= 0 seconds, got {args.stats_every}")
    if args.window < 1:  # no chunk could ever be sent
        raise SystemExit(f"error: --window must be >= 1 chunk, got {args.window}")
    if not args.reply_timeout > 0:  # also refuses NaN, which would give up on every last reply
        raise SystemExit(f"error: --reply-timeout must be > 0 seconds, got {args.reply_timeout}")
    if args.token and not args.token.isprintable():  # an HTTP header cannot carry it
        raise SystemExit("error: --token (or $HERTZ_TOKEN) holds a control character: a newline or carriage return "
                         "read from a file?")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_devices:
        print(import_sounddevice().query_devices())
        return 0
    check_websockets()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        if args.choose_devices and not args.input_wav:
            choose_devices(import_sounddevice(), args)
        return asyncio.run(interruptible(file_mode if args.input_wav else live_mode, args))
    except KeyboardInterrupt:
        return 0
    finally:  # an error that ends the session (SystemExit) left asyncio's Ctrl-C handler set, in a process
        # that goes on (a notebook): it is put back as it was
        if sigint is not None and signal.getsignal(signal.SIGINT) is not sigint:
            try:
                signal.signal(signal.SIGINT, sigint)
            except ValueError:  # not the main thread, where the handler was never changed
                pass


async def interruptible(session, args) -> int:
    """Run `session(args, stop)` until it ends or Ctrl-C stops it. The first Ctrl-C sets `stop`,
    which the session's loops watch, and cancels the session (which then closes, writes and
    reports what it has): a cancellation swallowed inside a library (asyncio.wait_for's race
    before Python 3.12) still ends it at its next chunk. A second Ctrl-C exits at once (status
    130, nothing written: what the first one would have written is what it gives up).

    A Python signal handler, not `loop.add_signal_handler`: asyncio's handler learns of the signal
    through the loop's self-pipe, which a flood of `call_soon_threadsafe` calls (a microphone
    delivering faster than real time) can fill, and a signal whose byte is lost there never acts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(session(args, stop))
    count = 0

    def stop_session() -> None:
        stop.set()
        task.cancel()

    def on_sigint(signum, frame) -> None:  # the main thread, between two bytecodes
        nonlocal count
        count += 1
        if count > 1:
            log("interrupted twice: exiting")
            os._exit(130)
        loop.call_soon_threadsafe(stop_session)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Python's (or the caller's) own Ctrl-C handling
        previous = None
    try:
        return await task
    except asyncio.CancelledError:
        if stop.is_set():  # stopped by Ctrl-C: a success unless what there was could not be written
            return 1 if getattr(args, "unwritten", False) else 0
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
