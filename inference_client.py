"""Talk with hertz-dev through inference_server.py: microphone in, speaker out, or headless from a
file to a file.

    python inference_client.py                                      # ws://127.0.0.1:8000, default devices
    python inference_client.py --server ws://gpu-box:8000 --token "$HERTZ_TOKEN" --token-temp 0.7
    python inference_client.py --list-devices
    python inference_client.py --input-device 2 --output-device "USB"    # index or part of the name
    python inference_client.py --input-wav me.wav --output-wav chat.wav  # headless, in real time
    python inference_client.py --input-wav me.wav --output-wav chat.wav --no-realtime   # as fast as it goes

Audio is 16 kHz mono 16-bit PCM in chunks of 2000 samples (125 ms), sent as binary frames; every
chunk gets one chunk of model audio back. Live, the sound card callbacks never block: the
microphone's frames are handed to the event loop, and the speaker reads replies with
`get_nowait()`, playing silence when none is there. File mode streams the file at real time (or
`--no-realtime`: as fast as the server answers) and writes a stereo WAV: channel 0 the user (the
input, padded to whole chunks), channel 1 the model's reply to each chunk, under that chunk.
Round-trip latency statistics are printed at the end (and every --stats-every seconds live).
Ctrl-C stops cleanly (file mode writes what it has).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import queue
import sys
import tempfile
import time
import urllib.parse
from typing import Callable, Optional

import numpy as np

SAMPLE_RATE = 16000
CHUNK = 2000
PARAM_FLAGS = ("token_temp", "top_p", "min_p", "mixture_temp", "gaussian_temp")


def audio_url(server: str, seed: Optional[int] = None) -> str:
    """ws://host:port[/audio] (http(s):// is accepted too) -> the websocket URL of /audio."""
    if "://" not in server:
        server = "ws://" + server
    u = urllib.parse.urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--server must be ws://, wss://, http:// or https://, got {server!r}")
    path = u.path if u.path not in ("", "/") else "/audio"
    query = urllib.parse.parse_qsl(u.query)
    if seed is not None:
        query.append(("seed", str(seed)))
    return urllib.parse.urlunsplit((scheme, u.netloc, path, urllib.parse.urlencode(query), ""))


def latency_summary(rtt_s: list) -> dict:
    if not rtt_s:
        return {"replies": 0}
    a = 1000 * np.asarray(rtt_s)
    return {"replies": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p90_ms": round(float(np.percentile(a, 90)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1), "mean_ms": round(float(a.mean()), 1)}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Conversation:
    """One session over an open websocket: sends 16-bit chunks, hands each reply to `on_audio`,
    and keeps round-trip times (a reply answers the oldest unanswered chunk; a `dropped` notice
    from the server stands for that many chunks)."""

    def __init__(self, ws, on_audio: Callable[[np.ndarray], None], on_dropped: Callable[[int], None] = lambda n: None):
        self.ws, self.on_audio, self.on_dropped = ws, on_audio, on_dropped
        self.pending: collections.deque = collections.deque()  # send times of unanswered chunks
        self.rtt: list[float] = []
        self.sent = self.replies = self.dropped = 0
        self.answered = asyncio.Event()

    async def control(self, **message) -> dict:
        """A control message and its answer (call before audio flows)."""
        await self.ws.send(json.dumps(message))
        while True:
            reply = await self.ws.recv()
            if isinstance(reply, str):
                reply = json.loads(reply)
                if reply.get("type") in ("ack", "error", "status"):
                    return reply

    async def send(self, chunk: bytes) -> None:
        self.pending.append(time.perf_counter())
        self.sent += 1
        await self.ws.send(chunk)

    async def receive(self) -> None:
        """Until the server closes the connection."""
        import websockets
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    if self.pending:
                        self.rtt.append(time.perf_counter() - self.pending.popleft())
                    self.replies += 1
                    self.on_audio(np.frombuffer(message, dtype="<i2"))
                else:
                    m = json.loads(message)
                    if m.get("type") == "dropped":
                        n = int(m["chunks"])
                        for _ in range(min(n, len(self.pending))):
                            self.pending.popleft()
                        self.dropped += n
                        self.on_dropped(n)
                    elif m.get("type") == "error":
                        log(f"server: {m.get('message')}")
                self.answered.set()
        except websockets.ConnectionClosedError:
            pass

    @property
    def unanswered(self) -> int:
        return len(self.pending)

    def summary(self) -> dict:
        return {**latency_summary(self.rtt), "sent": self.sent, "dropped_by_server": self.dropped}


def print_summary(conv: Conversation, **extra) -> None:
    s = {**conv.summary(), **extra}
    if s.get("replies"):
        print(f"round trip over {s['replies']} chunks: p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms, "
              f"p99 {s['p99_ms']} ms, max {s['max_ms']} ms", flush=True)
    print("stats " + json.dumps(s), flush=True)


async def open_session(args):
    import websockets
    from websockets.asyncio.client import connect
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    url = audio_url(args.server, args.seed)
    try:
        ws = await connect(url, additional_headers=headers, max_size=1 << 20, open_timeout=20)
    except websockets.InvalidStatus as e:
        code = e.response.status_code
        hint = " (a missing or wrong --token)" if code in (401, 403) else ""
        raise SystemExit(f"error: the server refused the connection: HTTP {code}{hint}")
    except OSError as e:
        raise SystemExit(f"error: cannot reach {url}: {e}")
    return ws


async def start(args, on_audio, on_dropped=lambda n: None) -> Conversation:
    ws = await open_session(args)
    conv = Conversation(ws, on_audio, on_dropped)
    params = {k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) is not None}
    try:
        if params:
            reply = await conv.control(type="set_params", **params)
            if reply["type"] == "error":
                raise SystemExit(f"error: {reply['message']}")
            log("sampling: " + ", ".join(f"{k}={v}" for k, v in reply["params"].items()))
    except Exception:
        await ws.close()
        raise
    return conv


def close_reason(ws) -> str:
    code = ws.close_code
    if code in (None, 1000):
        return ""
    reason = ws.close_reason or ""
    return f"the server closed the session: {code} {reason}".strip()


# --- file mode ---------------------------------------------------------------------------------

def read_audio(path: str) -> np.ndarray:
    """Any file soundfile reads -> mono float32 at 16 kHz."""
    import soundfile as sf
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        import soxr
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio


def write_wav(path: str, stereo: np.ndarray) -> None:
    """(T, 2) int16 -> a WAV, atomically (temporary file beside it, then renamed)."""
    import soundfile as sf
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".client-", suffix=".wav")
    os.close(fd)
    try:
        sf.write(tmp, stereo, SAMPLE_RATE, subtype="PCM_16")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def to_pcm(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")


async def file_mode(args) -> int:
    audio = read_audio(args.input_wav)
    n = max(1, -(-len(audio) // CHUNK))
    user = np.zeros(n * CHUNK, dtype="<i2")
    user[:len(audio)] = to_pcm(audio)
    model = np.zeros(n * CHUNK, dtype="<i2")
    slot = 0  # the chunk the next reply answers

    def on_audio(pcm):
        nonlocal slot
        if slot < n:
            model[slot * CHUNK:(slot + 1) * CHUNK] = pcm
        slot += 1

    def on_dropped(count):
        nonlocal slot
        slot += count  # those chunks get no reply: silence under them

    conv = await start(args, on_audio, on_dropped)
    receiver = asyncio.create_task(conv.receive())
    log(f"streaming {args.input_wav}: {n * CHUNK / SAMPLE_RATE:.1f} s, {'real time' if args.realtime else 'as fast as answered'}")
    sent = 0
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if args.realtime:
                await asyncio.sleep(max(0.0, t0 + i * CHUNK / SAMPLE_RATE - time.perf_counter()))
            else:
                while conv.unanswered >= args.window and not receiver.done():
                    conv.answered.clear()
                    await conv.answered.wait()
            if receiver.done():
                break
            await conv.send(user[i * CHUNK:(i + 1) * CHUNK].tobytes())
            sent += 1
        deadline = time.perf_counter() + args.reply_timeout
        while slot < sent and not receiver.done() and time.perf_counter() < deadline:
            conv.answered.clear()
            with_timeout = max(0.01, deadline - time.perf_counter())
            try:
                await asyncio.wait_for(conv.answered.wait(), with_timeout)
            except asyncio.TimeoutError:
                break
    finally:  # also on Ctrl-C: close, write what there is, print the statistics
        await conv.ws.close()
        receiver.cancel()
        stereo = np.stack([user[:sent * CHUNK], model[:sent * CHUNK]], axis=1)
        write_wav(args.output_wav, stereo)
        log(f"wrote {args.output_wav}: {sent * CHUNK / SAMPLE_RATE:.1f} s, stereo (user, model)")
        print_summary(conv, missing=max(0, sent - slot))
    reason = close_reason(conv.ws)
    if reason:
        log(reason)
        return 1
    return 0


# --- live mode ---------------------------------------------------------------------------------

class Speaker:
    """The output callback's side: whole replies from a bounded queue, read without blocking;
    silence when none is there. The event loop side drops the oldest reply when it is full."""

    def __init__(self, max_chunks: int = 8):
        self.queue: queue.Queue = queue.Queue(maxsize=max_chunks)
        self.current = np.zeros(0, dtype="<i2")
        self.underruns = self.overflows = 0

    def put(self, pcm: np.ndarray) -> None:  # event loop
        while True:
            try:
                self.queue.put_nowait(pcm)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()
                    self.overflows += 1
                except queue.Empty:
                    pass

    def callback(self, outdata, frames, time_info, status) -> None:  # audio thread: never blocks
        out = outdata[:, 0]
        filled = 0
        while filled < frames:
            if len(self.current) == 0:
                try:
                    self.current = self.queue.get_nowait()
                except queue.Empty:
                    out[filled:] = 0
                    self.underruns += 1
                    break
            take = min(frames - filled, len(self.current))
            out[filled:filled + take] = self.current[:take]
            self.current = self.current[take:]
            filled += take
        for c in range(1, outdata.shape[1]):
            outdata[:, c] = out


def device_arg(value):
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def import_sounddevice():
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:  # OSError: the PortAudio library is missing
        raise SystemExit(f"error: live audio needs sounddevice and PortAudio ({e}); "
                         "on Debian/Ubuntu: apt-get install libportaudio2. Or use --input-wav/--output-wav.")
    return sd


def choose_devices(sd, args) -> None:
    print(sd.query_devices())
    default_in, default_out = sd.default.device
    given = input(f"input device [{default_in}]: ").strip()
    args.input_device = given or args.input_device
    given = input(f"output device [{default_out}]: ").strip()
    args.output_device = given or args.output_device


async def live_mode(args) -> int:
    sd = import_sounddevice()
    if args.choose_devices:
        choose_devices(sd, args)
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue = asyncio.Queue(maxsize=16)
    speaker = Speaker()
    lost_mic = 0

    def take_mic(data: bytes) -> None:  # event loop
        nonlocal lost_mic
        if mic.full():  # the connection is not keeping up: drop the oldest microphone audio
            mic.get_nowait()
            lost_mic += 1
        mic.put_nowait(data)

    def on_input(indata, frames, time_info, status) -> None:  # audio thread: hand over, never block
        loop.call_soon_threadsafe(take_mic, bytes(indata))

    streams = []  # opened first: no server slot is taken for a machine without a microphone
    try:
        streams.append(sd.InputStream(samplerate=SAMPLE_RATE, blocksize=CHUNK, channels=1, dtype="int16",
                                      device=device_arg(args.input_device), callback=on_input))
        streams.append(sd.OutputStream(samplerate=SAMPLE_RATE, blocksize=CHUNK, channels=1, dtype="int16",
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
        pending = b""
        while True:
            pending += await mic.get()
            while len(pending) >= 2 * CHUNK:
                await conv.send(pending[:2 * CHUNK])
                pending = pending[2 * CHUNK:]

    async def report():
        while True:
            await asyncio.sleep(args.stats_every)
            recent = latency_summary(conv.rtt[-int(8 * args.stats_every):])
            log(f"round trip p50 {recent.get('p50_ms')} ms, p99 {recent.get('p99_ms')} ms | "
                f"sent {conv.sent}, received {conv.replies}, dropped {conv.dropped}, "
                f"speaker underruns {speaker.underruns}")

    tasks = []
    try:
        with streams[0], streams[1]:
            log("live: speak now (Ctrl-C to stop)")
            tasks = [asyncio.create_task(send_mic())] + ([asyncio.create_task(report())] if args.stats_every > 0 else [])
            await receiver  # until the server closes the session
    finally:
        for t in tasks + [receiver]:
            t.cancel()
        await conv.ws.close()
        print_summary(conv, speaker_underruns=speaker.underruns, speaker_overflows=speaker.overflows,
                      microphone_dropped=lost_mic)
    reason = close_reason(conv.ws)
    if reason:
        log(reason)
        return 1
    return 0


# --- command line ------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", "-s", default="ws://127.0.0.1:8000", help="the server (ws://, wss://, http://, https://)")
    ap.add_argument("--token", default=os.environ.get("HERTZ_TOKEN"), help="the server's token (default: $HERTZ_TOKEN)")
    ap.add_argument("--seed", type=int, help="the session's random seed (default: the server picks one)")
    ap.add_argument("--token-temp", "--token_temp", "-t1", dest="token_temp", type=float, help="LM token temperature")
    ap.add_argument("--mixture-temp", "--categorical-temp", "--categorical_temp", "-t2", dest="mixture_temp",
                    type=float, help="temperature of the mixture component choice")
    ap.add_argument("--gaussian-temp", "--gaussian_temp", "-t3", dest="gaussian_temp", type=float,
                    help="scale of the Gaussian noise of a latent")
    ap.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling of tokens")
    ap.add_argument("--min-p", dest="min_p", type=float, help="drop tokens below min-p times the likeliest")
    live = ap.add_argument_group("live audio (sounddevice)")
    live.add_argument("--list-devices", action="store_true", help="print the audio devices and exit")
    live.add_argument("--input-device", help="microphone: index or part of the name (default: the system's)")
    live.add_argument("--output-device", help="speaker: index or part of the name (default: the system's)")
    live.add_argument("--choose-devices", action="store_true", help="ask for the devices interactively")
    live.add_argument("--stats-every", type=float, default=5.0, help="seconds between latency lines (0: only at the end)")
    files = ap.add_argument_group("file mode (headless)")
    files.add_argument("--input-wav", help="stream this file (any format soundfile reads; mixed to mono, 16 kHz)")
    files.add_argument("--output-wav", help="write the conversation here: stereo WAV, user and model")
    files.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True,
                       help="send at real time (default), or as fast as the server answers")
    files.add_argument("--window", type=int, default=2, help="--no-realtime: chunks in flight at once")
    files.add_argument("--reply-timeout", type=float, default=10.0, help="seconds to wait for the last replies")
    args = ap.parse_args(argv)
    if bool(args.input_wav) != bool(args.output_wav):
        ap.error("--input-wav and --output-wav go together")
    try:
        audio_url(args.server)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_devices:
        print(import_sounddevice().query_devices())
        return 0
    try:
        return asyncio.run(file_mode(args) if args.input_wav else live_mode(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
