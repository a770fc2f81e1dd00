"""inference_server.py and inference_client.py end to end, each in its own process: the server
from the command line on tiny checkpoints (token, prompt with replay, recordings), the client in
file mode (as fast as answered, at real time, interrupted with Ctrl-C)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import inference_client as client
from live_server import save_tiny, speech_like, tiny_duplex
from model.protocol import float_to_pcm

REPO = Path(__file__).resolve().parents[1]
TOKEN = "t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python inference_server.py ...` on a free port; yields (ws URL, folder)."""
    folder = tmp_path_factory.mktemp("live")
    checkpoint = save_tiny(tiny_duplex(), folder / "ckpt")
    t = np.arange(8000) / 16000  # 0.5 s prompt: 4 chunks, the last 2 replayed
    sf.write(folder / "prompt.wav", np.stack([0.3 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], 1), 16000)
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "inference_server.py", "--checkpoint", str(checkpoint), "--device", "cpu", "--port", str(port),
         "--token", TOKEN, "--max-sessions", "2", "--prompt-path", str(folder / "prompt.wav"), "--replay-seconds", "0.25",
         "--recordings", str(folder / "recordings")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                assert json.loads(r.read())["replay_chunks"] == 2
            break
        except OSError:
            assert proc.poll() is None, (folder / "server.log").read_text()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
    yield f"ws://127.0.0.1:{port}", folder
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=20) == 0, (folder / "server.log").read_text()
    finally:
        proc.kill()
        log.close()


def run_client(*args, timeout=60):
    return subprocess.run([sys.executable, "inference_client.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def client_here(capfd, *args):
    """`run_client` by the client's `main` in this process (`in_process.main_in_process`), as
    `run_client` returns it, without a process' start: for the errors found before or at
    connecting, whose subject is the line, not the process."""
    from in_process import main_in_process
    return main_in_process("inference_client.py", client.main, args, capfd)


def stats(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("stats "))[6:])


def without_torch(tmp_path) -> dict:
    """An environment in which `import torch` fails (the clients must not need it)."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def test_file_mode_end_to_end(server, tmp_path):
    url, folder = server
    audio = speech_like(3.1, rate=22050)  # resampled by the client; 3.1 s -> 25 chunks (the last padded)
    sf.write(tmp_path / "in.wav", audio, 22050)
    r = subprocess.run([sys.executable, "inference_client.py", "--server", url, "--token", TOKEN, "--input-wav",
                        str(tmp_path / "in.wav"), "--output-wav", str(tmp_path / "out.wav"), "--no-realtime", "--seed", "3",
                        "--token-temp", "0.7"], cwd=REPO, env=without_torch(tmp_path), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    s = stats(r.stdout)
    # 25 replies: the prompt's playback answers the first 2 chunks (not timed), the model the other 23.
    assert s["sent"] == s["replies"] == 25 and s["replayed"] == 2 and s["timed"] == 23
    assert s["dropped_by_server"] == 0 and s["p99_ms"] > 0
    assert "round trip over 23 chunks (not counting 2 of prompt playback)" in r.stdout and "token_temp=0.7" in r.stderr
    out, rate = sf.read(tmp_path / "out.wav", dtype="int16")
    assert rate == 16000 and out.shape == (25 * 2000, 2)
    sent = float_to_pcm(client.read_audio(str(tmp_path / "in.wav")))
    assert np.array_equal(out[:len(sent), 0], sent) and not out[len(sent):, 0].any()
    prompt = sf.read(folder / "prompt.wav", dtype="float32")[0].mean(axis=1)
    assert np.abs(out[:4000, 1] - float_to_pcm(prompt[4000:])).max() <= 1  # the replayed end of the prompt
    assert np.abs(out[4000:, 1]).max() > 0  # then the model
    # The server recorded the session: the prompt, then the 23 live chunks (user, model).
    deadline = time.time() + 10
    while not list((folder / "recordings").glob("*.wav")) and time.time() < deadline:
        time.sleep(0.1)
    (rec,) = list((folder / "recordings").glob("*.wav"))
    recorded, _ = sf.read(rec, dtype="int16")
    assert recorded.shape == (8000 + 23 * 2000, 2)
    assert np.array_equal(recorded[8000:, 0], out[4000:, 0])


def test_file_mode_lines_name_the_files_inertly(server, tmp_path):
    """"streaming PATH" and "wrote PATH" printed a name's newline and escape sequence raw (a line
    split in two, the terminal recoloured), where every error and warning line writes them out."""
    url, _ = server
    name = tmp_path / "take\n2\x1b[31m.wav"
    sf.write(name, speech_like(0.5), 16000)
    r = run_client("--server", url, "--token", TOKEN, "--input-wav", name, "--output-wav", f"{name}.chat.wav",
                   "--no-realtime")
    assert r.returncode == 0 and "\x1b" not in r.stderr, r.stderr
    shown = f"{tmp_path}/take\\n2\\x1b[31m.wav"
    assert f"streaming {shown}: 0.5 s, as fast as answered\n" in r.stderr, r.stderr
    assert f"wrote {shown}.chat.wav: 0.5 s, stereo (user, model)\n" in r.stderr, r.stderr


def test_file_mode_real_time_and_ctrl_c(server, tmp_path):
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(1.5), 16000)
    t = time.time()
    r = run_client("--server", url, "--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "rt.wav")
    assert r.returncode == 0, r.stderr
    assert time.time() - t >= 1.4 - 0.125  # 12 chunks at 125 ms
    assert stats(r.stdout)["replies"] == 12 and sf.info(tmp_path / "rt.wav").frames == 12 * 2000

    sf.write(tmp_path / "long.wav", speech_like(20.0), 16000)
    with open(tmp_path / "stderr", "w") as err:  # (a file: read while it runs, nothing lost to a pipe's buffer)
        proc = subprocess.Popen([sys.executable, "inference_client.py", "--server", url, "--token", TOKEN,
                                 "--input-wav", tmp_path / "long.wav", "--output-wav", tmp_path / "cut.wav"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + 30  # a second into its streaming (8 chunks), not a fixed 4 s from the start
    while "streaming" not in (tmp_path / "stderr").read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=20)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and 0 < stats(stdout)["sent"] < 160
    assert 0 < sf.info(tmp_path / "cut.wav").frames < 20 * 16000


def test_file_mode_behind_a_server_that_drops_chunks(tmp_path):
    """A server that falls behind (0.2 s steps for 0.125 s chunks, 2 chunks of queue) drops chunks
    and says so before the next reply. The client's output keeps each reply under its own chunk
    (the server's recording pairs each chunk it stepped with the model's reply to it, one frame
    later) and silence under the dropped ones, and its round trips are the server's own times for
    those replies plus the loopback (a reply timed against an earlier chunk reads 125 ms more)."""
    from live_server import running_server
    sf.write(tmp_path / "in.wav", speech_like(2.5), 16000)  # 20 chunks at real time
    with running_server(tiny_duplex(), max_sessions=1, slow=0.2, max_queue=2, recordings=str(tmp_path / "rec")) as server:
        r = run_client("--server", server.ws, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "out.wav")
        server_ms = [ms for _, ms in server.latency_ms]
        deadline = time.time() + 10
        while not list((tmp_path / "rec").glob("*.wav")) and time.time() < deadline:
            time.sleep(0.1)
    assert r.returncode == 0, r.stderr
    s = stats(r.stdout)
    assert s["sent"] == 20 and s["replies"] + s["dropped_by_server"] == 20 and s["dropped_by_server"] >= 5
    assert s["replies"] == len(server_ms)
    assert np.median(server_ms) - 1 < s["p50_ms"] < np.median(server_ms) + 60 and max(server_ms) - 1 < s["max_ms"] < max(server_ms) + 100
    out = sf.read(tmp_path / "out.wav", dtype="int16")[0].reshape(20, 2000, 2)
    (rec,) = list((tmp_path / "rec").glob("*.wav"))
    recorded = sf.read(rec, dtype="int16")[0].reshape(-1, 2000, 2)
    slots = [next(i for i in range(20) if np.array_equal(out[i, :, 0], chunk)) for chunk in recorded[:, :, 0]]
    assert len(slots) == s["replies"] and slots == sorted(slots)
    for slot, reply in zip(slots, recorded[1:, :, 1]):  # the model's reply to a stepped chunk, under that chunk
        assert np.array_equal(out[slot, :, 1], reply), f"the reply under chunk {slot} is not its own"
    assert not out[sorted(set(range(20)) - set(slots)), :, 1].any()  # silence under the dropped chunks


STUBBORN = """
import asyncio, os, signal, sys
import inference_client as client

async def stubborn(args, stop):  # swallows every cancellation, as a library racing its own timeout can
    print("ready", flush=True)
    while not (sys.argv[1] == "watch" and stop.is_set()):
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
    return 0

print("returned", asyncio.run(client.interruptible(stubborn, None)), flush=True)
"""


@pytest.mark.parametrize("watch", ["watch", "deaf"])
def test_ctrl_c_ends_a_session_whose_cancellation_is_swallowed(tmp_path, watch):
    """The first Ctrl-C sets the session's stop event as well as cancelling it: a session whose
    cancellation a library swallowed (asyncio.wait_for's race before Python 3.12) still ends, at
    its next check, normally; a second Ctrl-C ends even a session that checks nothing (130)."""
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    proc = subprocess.Popen([sys.executable, tmp_path / "stubborn.py", watch], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    if watch == "deaf":
        time.sleep(0.5)
        assert proc.poll() is None  # the first Ctrl-C's cancellation was swallowed
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=10)
    if watch == "watch":
        assert proc.returncode == 0 and stdout == "returned 0\n" and "Traceback" not in stderr, stderr
    else:
        assert proc.returncode == 130 and "interrupted twice" in stderr, stderr


def test_wrong_token_and_bad_parameters(server, tmp_path):
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    common = ("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav", "--no-realtime")
    r = run_client(*common, "--token", "nope")
    assert r.returncode != 0 and "HTTP 403" in r.stderr and "token" in r.stderr and "Traceback" not in r.stderr
    r = run_client(*common, "--token", TOKEN, "--gaussian-temp", "-1")
    assert r.returncode != 0 and r.stderr == "error: gaussian_temp must be in [0, 5], got -1.0\n"


def test_absurd_sampling_values_are_refused_before_connecting(capfd):
    """Checked against model.protocol's ranges when the flags are parsed: nothing listens on the
    port, so an error about the value (not about the connection) shows the order."""
    for flag, value, name in (("--token-temp", "1e9", "token_temp"), ("--top-p", "0", "top_p"),
                              ("--min-p", "1", "min_p"), ("-t3", "nan", "gaussian_temp"), ("-t2", "-0.5", "mixture_temp")):
        r = client_here(capfd, "--server", "ws://127.0.0.1:9", flag, value)
        assert r.returncode != 0 and r.stderr.startswith(f"error: {name} must be in ") and len(r.stderr.splitlines()) == 1


def test_bad_flags_are_one_error_line_before_connecting(tmp_path, capfd):
    """Nothing listens on the port: each flag is refused when parsed. --window 0 used to hang,
    --reply-timeout nan to drop the last replies, --seed -1 to end in the server's close as a
    traceback."""
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    common = ("--server", "ws://127.0.0.1:9", "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav")
    for flags, message in ((("--no-realtime", "--window", "0"), "--window must be >= 1 chunk, got 0"),
                           (("--reply-timeout", "nan"), "--reply-timeout must be > 0 seconds, got nan"),
                           (("--seed", "-1"), "--seed must be an integer in [0, 2**63), got -1"),
                           # a live flag in file mode was ignored without a word
                           (("--input-device", "2"), "--input-device is for live audio (microphone and speaker); with "
                                                     "--input-wav it would not be used"),
                           (("--stats-every", "1"), "--stats-every is for live audio (microphone and speaker); with "
                                                    "--input-wav it would not be used"),
                           (("--window", "8"), "--window is for --no-realtime (chunks in flight at once); in real time "
                                               "the chunks are sent as the audio's clock says"),
                           (("--seed", str(2 ** 63)), f"--seed must be an integer in [0, 2**63), got {2 ** 63}"),
                           # These were tracebacks from the websocket library, after the input file was read.
                           (("--server", "ws://"), "--server 'ws://' names no host (ws://HOST:PORT)"),
                           (("--server", "ws://:8000"), "--server 'ws://:8000' names no host (ws://HOST:PORT)"),
                           (("--server", "ws://127.0.0.1:99999"), "--server 'ws://127.0.0.1:99999': Port out of range 0-65535"),
                           (("--server", "ws://h:port"), "--server 'ws://h:port': Port could not be cast to integer value as 'port'"),
                           (("--server", "ws://[::1"), "--server 'ws://[::1': Invalid IPv6 URL"),  # was "error: Invalid IPv6 URL"
                           (("--token", "t0ken\r"), "--token (or $HERTZ_TOKEN) holds a control character: a newline or "
                                                    "carriage return read from a file?"),
                           # These the server refused once connected (a seed given twice, or not one).
                           (("--server", "ws://127.0.0.1:9/audio?seed=1", "--seed", "2"),
                            "--server 'ws://127.0.0.1:9/audio?seed=1' has a ?seed= and --seed: give the seed once"),
                           (("--server", "ws://127.0.0.1:9/audio?seed=-5"),
                            "--server 'ws://127.0.0.1:9/audio?seed=-5': seed must be a decimal integer in [0, 2**63), "
                            "got '-5'")):
        r = client_here(capfd, *common, *flags)
        assert r.returncode != 0 and r.stderr == f"error: {message}\n", (flags, r.stderr)
        assert not (tmp_path / "o.wav").exists()
    # A token in --server's query is not printed (it was, in these lines; the server redacts its logs too).
    for server, message in (("ws://127.0.0.1:99999/?token=s3cret", "--server 'ws://127.0.0.1:99999/?token=REDACTED': "
                                                                   "Port out of range 0-65535"),
                            ("ws://127.0.0.1:9/audio?token=s3cret", "cannot reach ws://127.0.0.1:9/audio?token=REDACTED: ")):
        r = client_here(capfd, *common, "--server", server)
        assert r.returncode == 1 and r.stderr.startswith(f"error: {message}") and "s3cret" not in r.stderr, r.stderr


def test_an_error_that_ends_the_session_leaves_ctrl_c_as_it_was(tmp_path, capfd):
    """A session ended by an error (nothing listens on the port) raised SystemExit out of asyncio's
    loop while `interruptible` still held Ctrl-C; closing the loop then cancelled it, and it put back
    the handler it had found, asyncio's for that run, which stayed set after `main` returned: in a
    process that goes on (a notebook, this suite: a later test found Ctrl-C bound to a finished run).
    `main` puts back the handler it found."""
    import signal
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    before = signal.getsignal(signal.SIGINT)
    r = client_here(capfd, "--server", "ws://127.0.0.1:9", "--input-wav", tmp_path / "in.wav",
                    "--output-wav", tmp_path / "o.wav")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach ws://127.0.0.1:9"), r.stderr
    assert signal.getsignal(signal.SIGINT) is before


def test_a_session_refused_at_capacity_is_one_line_and_keeps_the_old_output(server, tmp_path):
    """Both rows of the server taken: the client's session is closed at once (1013). Until session
    18 that was a traceback, after an empty WAV had replaced the output; now it is the server's
    reason and exit code 1 (with sampling flags: one `error:` line), and the output is untouched."""
    import asyncio
    from live_server import connect
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    (tmp_path / "o.wav").write_bytes(b"an earlier conversation")
    common = ["inference_client.py", "--server", url, "--token", TOKEN, "--input-wav", str(tmp_path / "in.wav"),
              "--output-wav", str(tmp_path / "o.wav"), "--no-realtime"]

    async def client(*flags):
        p = await asyncio.create_subprocess_exec(sys.executable, *common, *flags, cwd=REPO,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 60)
        return p.returncode, err.decode()

    async def run():
        holders = []
        try:
            for _ in range(30):  # both rows (a start refused by the server's rate limit is tried again)
                if len(holders) == 2:
                    break
                ws = await connect(url + "/audio", token=TOKEN)
                try:
                    await ws.send(json.dumps({"type": "status"}))
                    json.loads(await asyncio.wait_for(ws.recv(), 10))
                    holders.append(ws)
                except Exception:
                    await ws.close()
                    await asyncio.sleep(1)
            assert len(holders) == 2, "the server did not give both rows"
            return await client(), await client("--token-temp", "0.5")
        finally:
            for ws in holders:
                await ws.close()
    (rc, err), (rc_params, err_params) = asyncio.run(run())
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert "the server closed the session: 1013" in err and "capacity" in err and "answered nothing" in err, err
    assert rc_params == 1 and err_params.startswith("error: the server closed the session: 1013"), err_params
    assert len(err_params.splitlines()) == 1, err_params
    assert (tmp_path / "o.wav").read_bytes() == b"an earlier conversation"


@contextlib.contextmanager
def peer(handler, websocket=True):
    """A server on a free loopback port, in a thread of its own: a websockets server calling
    `handler(ws)`, or (websocket=False) a plain TCP server calling `handler(reader, writer)`.
    Yields its ws:// URL."""
    import asyncio
    import threading
    from websockets.asyncio.server import serve
    ready, loop, holder = threading.Event(), asyncio.new_event_loop(), {}

    async def main():
        holder["stop"] = asyncio.Event()
        sock = socket.create_server(("127.0.0.1", 0))
        holder["port"] = sock.getsockname()[1]
        opened = serve(handler, sock=sock) if websocket else asyncio.start_server(handler, sock=sock)
        async with await opened if not websocket else opened:
            ready.set()
            await holder["stop"].wait()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"ws://127.0.0.1:{holder['port']}"
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


def stripping_upgrade(port: int):
    """A reverse proxy to the server on `port` (a `peer(..., websocket=False)` handler) that forwards
    each request without its Upgrade and Connection headers: nginx without `proxy_set_header
    Upgrade` and `Connection`."""
    import asyncio

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handler(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
        head = [line for line in head if not line.lower().startswith((b"upgrade:", b"connection:"))]
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", port)
        upstream.write(b"\r\n".join(head) + b"\r\nConnection: close\r\n\r\n")
        await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer), return_exceptions=True)
    return handler


def test_a_proxy_that_drops_the_upgrade_header_is_named(server, tmp_path):
    """Through a reverse proxy that drops the Upgrade and Connection headers, the server saw a plain
    GET /audio and answered 404, and the client said "no websocket at /audio", so the user went
    looking for another path. The server answers 426, and the client says the proxy must forward
    those headers (one line, exit status 1, nothing written)."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    with peer(stripping_upgrade(int(url.rsplit(":", 1)[1])), websocket=False) as proxied:
        r = run_client("--server", proxied, "--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav",
                       tmp_path / "o.wav", timeout=30)
    assert r.returncode == 1 and r.stderr == (
        "error: the server refused the connection: HTTP 426 (/audio is a websocket endpoint, and the request reached "
        "it as plain HTTP: a proxy in between must forward the Upgrade and Connection headers)\n"), r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_a_peer_that_is_not_a_hertz_dev_server_is_one_error_line(server, tmp_path):
    """Something else listening at --server: the client says so, naming what went wrong, exits 1
    and keeps an earlier output. Before, a peer that does not speak HTTP or closes at once was a
    traceback (InvalidMessage); an HTTP 200 said 'refused'; a websocket server that sends other
    messages (not JSON, short binary frames) ended the receiver silently with exit code 0; and a
    websocket at another path of the real server was blamed on the token."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    (tmp_path / "o.wav").write_bytes(b"an earlier conversation")
    common = ("--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav", "--no-realtime")

    async def garbage(reader, writer):
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    async def http_200(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    def answering(reply):
        async def handler(ws):
            async for _ in ws:
                await ws.send(reply)
        return handler

    cases = [(peer(garbage, websocket=False), "is not a websocket server (did not receive a valid HTTP response)"),
             (peer(http_200, websocket=False), "HTTP 200 (not a hertz-dev server"),
             (peer(answering("hello")), "the server broke the protocol: a text message that is not a JSON object: 'hello'"),
             (peer(answering(b"abc")), "the server broke the protocol: a binary message of 3 bytes, not one chunk"),
             (peer(answering('{"type": "dropped"}')), "the server broke the protocol: a dropped notice without"),
             (peer(answering("[" * 100000 + "]" * 100000)),  # was a RecursionError, or "stopped answering"
              "the server broke the protocol: a text message that is not a JSON object: '[[[["),
             (contextlib.nullcontext(url + "/nowhere"),
              "HTTP 404 (no websocket at /nowhere: a hertz-dev server's is ws://HOST:PORT/audio)")]
    for context, message in cases:
        with context as where:
            r = run_client("--server", where, *common, timeout=30)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[-1].startswith("error: ") and message in r.stderr, r.stderr
        assert (tmp_path / "o.wav").read_bytes() == b"an earlier conversation"
    for reply in ("hello", "[" * 100000 + "]" * 100000):  # the answer to set_params, before any audio
        with peer(answering(reply)) as where:
            r = run_client("--server", where, *common, "--token-temp", "0.5", timeout=30)
        assert r.returncode == 1 and r.stderr == ("error: the server broke the protocol: a text message that is "
                                                  f"not a JSON object: {reply[:80]!r}\n"), r.stderr


def test_what_a_server_sends_reaches_the_terminal_without_control_characters(tmp_path):
    """A server's error messages and close reason were printed as sent, so a hostile server could
    send escape sequences to the user's terminal (clear it, retitle it). Their control characters
    are printed escaped."""
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)

    async def hostile(ws):
        await ws.recv()
        await ws.send(json.dumps({"type": "error", "message": "\x1b[2Jcleared"}))
        await ws.close(1008, "\x1b]0;owned\x07 bye")

    with peer(hostile) as where:
        r = run_client("--server", where, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                       "--no-realtime", timeout=30)
    assert r.returncode == 1 and "\x1b" not in r.stderr + r.stdout and "\x07" not in r.stderr, r.stderr
    assert "server: \\x1b[2Jcleared" in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == "error: the server closed the session: 1008 \\x1b]0;owned\\x07 bye", r.stderr


def test_an_unknown_message_type_is_named_once_and_ignored(tmp_path):
    """A server that sends, beside its replies, notices of a type this client does not know (a
    newer version, or another server): the client went on without a word. It now names the type
    once, and the conversation goes on (every chunk answered, exit 0)."""
    async def handler(ws):
        async for chunk in ws:
            await ws.send(json.dumps({"type": "surprise", "n": 1}))
            await ws.send(chunk)
    sf.write(tmp_path / "in.wav", speech_like(0.75), 16000)  # 6 chunks
    with peer(handler) as url:
        r = run_client("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                       "--no-realtime", timeout=30)
    assert r.returncode == 0 and stats(r.stdout)["replies"] == 6, r.stderr
    assert [line for line in r.stderr.splitlines() if "surprise" in line] == [
        "server: a message of unknown type 'surprise' (ignored)"], r.stderr


@pytest.mark.parametrize("end", ["1012", "lost"])
def test_a_server_gone_mid_session_is_named_and_the_conversation_kept(tmp_path, end):
    """A server that answers 3 chunks, then shuts down (1012, uvicorn gives no reason) or vanishes
    (no closing handshake: 1006). Before, both were 'the server closed the session: 1012' or
    '...: 1006', numbers only; now they say what happened, and the answered chunks are written."""
    async def handler(ws):
        for _ in range(3):
            await ws.send(await ws.recv())
        if end == "lost":
            ws.transport.abort()
        else:
            await ws.close(1012)
    sf.write(tmp_path / "in.wav", speech_like(1.0), 16000)
    with peer(handler) as url:
        r = run_client("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                       "--no-realtime", "--window", "1", timeout=30)
    message = {"1012": "error: the server closed the session: 1012 the server is shutting down",
               "lost": "error: the connection to the server was lost (1006)"}[end]
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == message, r.stderr
    assert sf.info(tmp_path / "o.wav").frames >= 3 * 2000  # and the chunk in flight, unanswered


@pytest.mark.parametrize("mode", ["--realtime", "--no-realtime"])
def test_a_server_that_stops_answering_is_an_error_not_a_hang(tmp_path, mode):
    """A server that answers 2 chunks, then takes the others and answers none (a hung engine)
    without closing. Before, --no-realtime waited for its window forever, and --realtime said
    nothing of the missing replies and exited 0; now both give up after --reply-timeout, write
    what was answered, and exit 1 with one line naming the missing replies."""
    async def handler(ws):
        for _ in range(2):
            await ws.send(await ws.recv())
        async for _ in ws:
            pass
    sf.write(tmp_path / "in.wav", speech_like(0.75), 16000)  # 6 chunks
    with peer(handler) as url:
        t0 = time.perf_counter()
        r = run_client("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                       mode, "--reply-timeout", "1", timeout=30)
    sent = 6 if mode == "--realtime" else 4  # the window of 2 is never answered again
    assert r.returncode == 1 and time.perf_counter() - t0 < 15, r.stderr
    assert r.stderr.splitlines()[-1] == (f"error: {sent - 2} of {sent} chunks got no reply within --reply-timeout "
                                         "(1 s): the server stopped answering"), r.stderr
    assert stats(r.stdout)["missing"] == sent - 2 and sf.info(tmp_path / "o.wav").frames == sent * 2000


async def silent(ws):
    """A websocket server that takes the session and its audio and answers nothing (a hung engine)."""
    async for _ in ws:
        pass


def unanswered(stderr: str) -> tuple[int, int]:
    """(unanswered, sent) of the client's last line, which must say the server stopped answering
    within a --reply-timeout of 1 s."""
    import re
    match = re.fullmatch(r"error: (\d+) of (\d+) chunks got no reply within --reply-timeout \(1 s\): the server "
                         r"stopped answering", stderr.splitlines()[-1] if stderr else "")
    assert match, stderr
    return int(match[1]), int(match[2])


def test_a_server_that_stops_answering_mid_stream_is_noticed_within_the_reply_timeout(tmp_path):
    """A server that answers nothing, without closing: file mode at real time found out at the end
    of the file (for an hour-long one, an hour later; here 30 s). It now ends once the oldest
    unanswered chunk has waited --reply-timeout, with the one line naming the chunks unanswered,
    having sent about that long of the file (live mode's check is the same: the next test)."""
    sf.write(tmp_path / "in.wav", speech_like(30.0), 16000)  # 240 chunks at real time
    with peer(silent) as url:
        r = run_client("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                       "--reply-timeout", "1", timeout=60)
    sent = stats(r.stdout)["sent"]
    assert r.returncode == 1 and unanswered(r.stderr) == (sent, sent), r.stderr
    assert 8 <= sent <= 24, f"{sent} chunks sent: 1 s of them (8) before the oldest had waited 1 s, not 3 s"
    assert "the server answered nothing" in r.stderr and not (tmp_path / "o.wav").exists()


def test_live_mode_ends_when_the_server_stops_answering(tmp_path):
    """Live, a server that stops answering without closing was never noticed: the client went on
    until Ctrl-C. It now ends like file mode, once the oldest unanswered chunk has waited
    --reply-timeout: one error line naming the chunks unanswered, exit status 1."""
    env = virtual_sound_card(tmp_path, 3.0)
    with peer(silent) as url:
        proc = subprocess.Popen([sys.executable, "inference_client.py", "--server", url, "--reply-timeout", "1"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=20)
            pytest.fail(f"the client did not notice in 30 s; stopped with Ctrl-C: {stderr[-2000:]}")
    s = stats(stdout)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert unanswered(stderr) == (s["sent"], s["sent"]) and s["sent"] > 0 and s["replies"] == 0, stderr


def test_ctrl_c_ends_a_live_session_whose_close_waits_behind_unread_audio(tmp_path):
    """A server that does not read what the client sends (one that paces a client far ahead of
    real time, as the live server does, or a hung one): the close frame waits behind the audio in
    the connection's buffers, and the websocket library waits for them to drain before its own
    close timeout starts, so the first Ctrl-C did not end a live session whose microphone ran ahead.
    Closing now gives up after 2 s, as the README says: Ctrl-C ends it (status 0)."""
    import asyncio
    import threading
    done = threading.Event()

    async def deaf(ws):  # takes the session and reads nothing: the client's sends fill the buffers
        while not done.is_set():
            await asyncio.sleep(0.05)
        ws.transport.abort()  # (not reading, it would not see the client go)
    env = virtual_sound_card(tmp_path, 3.0)
    with peer(deaf) as url, open(tmp_path / "stderr", "w") as err:  # (a file: read while it runs)
        proc = subprocess.Popen([sys.executable, "inference_client.py", "--server", url, "--stats-every", "0"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 30
        while "live: speak now" not in (tmp_path / "stderr").read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # (the microphone, far faster than real time, fills the buffers within a second)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            pytest.fail("the first Ctrl-C did not end the session within 15 s: "
                        + (tmp_path / "stderr").read_text()[-2000:])
        finally:
            done.set()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0 and "Traceback" not in stderr and stats(stdout)["sent"] > 0, stderr


def test_a_server_that_does_not_answer_the_handshake_is_named_within_the_reply_timeout(tmp_path, capfd):
    """A port that takes the TCP connection and never answers the websocket handshake: the client
    waited a fixed 20 s, whatever --reply-timeout said, and then said it "cannot reach" a server it
    had reached. It now waits --reply-timeout and says the server did not answer the handshake."""
    async def mute(reader, writer):
        await reader.read()  # until the client gives up
        writer.close()
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    with peer(mute, websocket=False) as url:
        t0 = time.perf_counter()
        r = client_here(capfd, "--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                        "--reply-timeout", "1")
        took = time.perf_counter() - t0
    assert r.returncode == 1 and r.stderr == (f"error: {url}/audio did not answer the websocket handshake within "
                                              "--reply-timeout (1 s)\n"), r.stderr
    assert took < 10 and not (tmp_path / "o.wav").exists()


def test_an_unanswered_or_odd_answer_to_the_sampling_flags_is_one_error_line(tmp_path):
    """The sampling flags are sent as set_params before any audio. A server that took the session
    and never answered it held the client forever; an ack without the session's params was a
    KeyError traceback; an error without a message printed 'error: None'."""
    def answering(reply):
        async def handler(ws):
            async for _ in ws:
                if reply is not None:
                    await ws.send(reply)
        return handler
    sf.write(tmp_path / "in.wav", speech_like(0.25), 16000)
    cases = {None: "error: the server did not answer set_params within --reply-timeout (1 s)",
             '{"type": "ack"}': 'error: the server broke the protocol: an answer to set_params without the '
                                'session\'s params: {"type": "ack"}',
             '{"type": "error"}': "error: the server refused set_params"}
    for reply, message in cases.items():
        with peer(answering(reply)) as url:
            r = run_client("--server", url, "--input-wav", tmp_path / "in.wav", "--output-wav", tmp_path / "o.wav",
                           "--token-temp", "0.5", "--reply-timeout", "1", timeout=20)
        assert r.returncode == 1 and r.stderr.splitlines()[-1] == message, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("flags, flag", [(["--no-realtime"], "--no-realtime"), (["--realtime"], "--realtime"),
                                         (["--window", "4"], "--window")])
def test_a_file_mode_flag_live_is_one_error_line(capfd, flags, flag):
    """--no-realtime or --window without --input-wav: the live client ran without a word about them."""
    r = client_here(capfd, "--server", "ws://127.0.0.1:9", *flags)
    assert r.returncode != 0 and r.stderr == (f"error: {flag} is for file mode (--input-wav, --output-wav); live it "
                                              "would not be used\n"), r.stderr


def test_choose_devices_without_a_terminal_is_one_error_line():
    """--choose-devices asks on stdin: at its end, one line instead of an EOFError traceback (and
    it asks before the event loop starts, so that Ctrl-C at the prompt is not held up)."""
    try:
        import sounddevice  # noqa: F401
    except OSError as e:
        pytest.skip(f"PortAudio is not installed ({e})")
    r = subprocess.run([sys.executable, "inference_client.py", "--server", "ws://127.0.0.1:9", "--choose-devices"],
                       cwd=REPO, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: --choose-devices asks on the terminal"), r.stderr


def test_without_websockets_it_is_one_error_line(tmp_path):
    """websockets missing (a stand-in module that fails to import, first on the path): one `error:`
    line saying what to install, before anything else; it was an ImportError traceback when the
    first session opened."""
    sf.write(tmp_path / "in.wav", np.zeros(4000), 16000)
    (tmp_path / "websockets.py").write_text("raise ImportError('No module named websockets')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    r = subprocess.run([sys.executable, "inference_client.py", "--server", "ws://127.0.0.1:9", "--input-wav",
                        str(tmp_path / "in.wav"), "--output-wav", str(tmp_path / "out.wav")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: the client needs websockets 13 or later (No module named websockets): pip install 'websockets>=13.0'"]
    assert not (tmp_path / "out.wav").exists()


def test_client_imports_no_torch():
    code = "import sys, inference_client; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_live_mode_without_audio_devices_says_so():
    """CI machines have no sound card: the live path must fail with a clear message."""
    r = run_client("--server", "ws://127.0.0.1:9", "--list-devices", timeout=30)
    assert r.returncode == 0 or "PortAudio" in r.stderr
    r = run_client("--server", "ws://127.0.0.1:9", timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.startswith("error:")


def test_audio_url():
    assert client.audio_url("ws://h:8000") == "ws://h:8000/audio"
    assert client.audio_url("http://h:8000/", seed=3) == "ws://h:8000/audio?seed=3"
    assert client.audio_url("ws://h:8000/audio?seed=4") == "ws://h:8000/audio?seed=4"
    with pytest.raises(ValueError, match="has a \\?seed=: give the seed once"):
        client.audio_url("ws://h:8000/audio?seed=4&seed=4")
    assert client.audio_url("https://h/x/audio") == "wss://h/x/audio"
    assert client.audio_url("127.0.0.1:8000") == "ws://127.0.0.1:8000/audio"
    with pytest.raises(ValueError):
        client.audio_url("ftp://h")


class Times:
    """A sound card callback's time_info (PortAudio's stream times, in seconds)."""

    def __init__(self, current, dac):
        self.currentTime, self.outputBufferDacTime = current, dac


def test_speaker_times_capture_to_playback():
    """From a chunk's last sample captured to the first sample of its reply played: the callback's
    clock, plus where the reply starts in the block (after the jitter margin, 20 ms = 320 samples,
    for the first reply after silence), plus the card's output delay."""
    now = [100.0]
    sp = client.Speaker(clock=lambda: now[0])
    sp.put(np.full(2000, 1, dtype="<i2"), captured=99.9)
    out = np.full((1000, 1), 9, dtype=np.int16)
    sp.callback(out, 1000, Times(5.0, 5.02), None)  # the block plays 20 ms after the callback
    assert sp.c2p == [pytest.approx(100.0 + 0.02 + 320 / 16000 - 99.9)]
    assert (out[:320] == 0).all() and (out[320:] == 1).all()
    sp.put(np.full(2000, 2, dtype="<i2"), captured=None)  # the prompt's playback: not timed
    now[0] = 100.0625
    out = np.zeros((1200, 1), dtype=np.int16)
    for _ in range(2):
        sp.callback(out, 1200, None, None)  # no stream times: played from the callback on
    sp.put(np.full(2000, 3, dtype="<i2"), captured=100.05)
    sp.callback(out, 1200, None, None)
    # 680 + 3 * 1200 samples played: the third reply started 920 samples into the last block
    assert sp.c2p == [pytest.approx(0.14), pytest.approx(100.0625 + 920 / 16000 - 100.05)]
    assert (out[:920] == 2).all() and (out[920:] == 3).all()
    assert sp.underruns == 0 and sp.overflows == 0


def test_speaker_callback_never_blocks_plays_silence_and_bounds_its_buffer():
    sp = client.Speaker()
    out = np.full((2000, 1), 7, dtype=np.int16)
    sp.callback(out, 2000, None, None)
    assert not out.any() and sp.underruns == 0  # silence before any reply is not an underrun
    for v in (1, 2, 3):  # a burst: the buffer keeps the margin plus two chunks, the oldest goes
        sp.put(np.full(2000, v, dtype="<i2"))
    out = np.zeros((1500, 1), dtype=np.int16)
    sp.callback(out, 1500, None, None)
    assert sp.overflows == 1 and (out[:320] == 0).all() and (out[320:] == 2).all()
    out = np.zeros((3000, 1), dtype=np.int16)
    sp.callback(out, 3000, None, None)
    assert (out[:820] == 2).all() and (out[820:2820] == 3).all() and (out[2820:] == 0).all()
    assert sp.underruns == 1  # it ran dry while playing
    lost = client.Speaker(max_pending=2)  # the audio thread not running: put keeps the newest, never blocks
    for v in (1, 2, 3):
        lost.put(np.full(2000, v, dtype="<i2"))
    assert lost.overflows == 1 and [int(pcm[0]) for pcm, _ in list(lost.incoming.queue)] == [2, 3]


def play(sp, replies_at, blocks, block=400):
    """Run `blocks` callbacks of `block` samples; before block i, put a 2000-sample reply for each
    entry of replies_at equal to i. Returns the audio played (samples) and the block index of
    every underrun."""
    played, underruns = [], []
    for i in range(blocks):
        for _ in range(replies_at.count(i)):
            sp.put(np.full(2000, 1, dtype="<i2"))
        before = sp.underruns
        out = np.zeros((block, 1), dtype=np.int16)
        sp.callback(out, block, None, None)
        played.append(out[:, 0].copy())
        if sp.underruns > before:
            underruns.append(i)
    return np.concatenate(played), underruns


def test_speaker_jitter_margin_grows_on_underruns_and_shrinks_when_stable():
    """Replies every 125 ms (5 blocks of 25 ms): steady playback at the start margin. A reply late
    by 75 ms makes one underrun, and the margin grows by 20 ms (320 samples); a reply 25 ms late
    then no longer runs it dry (at the start margin it does). Many late replies stop at 250 ms.
    After 5 s without an underrun the margin gives back 10 ms (160 samples), never below 20 ms."""
    sp = client.Speaker()
    steady = list(range(0, 40, 5))
    _, underruns = play(sp, steady, 40)
    assert underruns == [] and sp.margin == 320
    sp = client.Speaker()  # the second reply late by 3 blocks (75 ms): the first runs out in block 5
    played, underruns = play(sp, [0] + list(range(8, 40, 5)), 40)
    assert underruns == [5] and sp.margin == 320 + 320 == sp.max_margin
    assert sp.overflows == 0 and sp.trimmed == 0  # late audio is delayed, never dropped
    assert (played[:320] == 0).all() and (played[320:2320] == 1).all()  # the first reply, after the margin
    # with the larger margin a reply one block (25 ms) late finds audio still buffered
    _, underruns = play(sp, [3, 8, 14, 18, 23], 25)  # blocks 43, 48, 54 (one late), 58, 63
    assert underruns == [] and sp.margin == 640
    _, underruns = play(client.Speaker(), [0, 5, 11, 15, 20], 25)  # the same lateness at the start margin
    assert underruns == [10]
    worst = client.Speaker()
    for _ in range(30):  # a reply, then silence until it ran dry: an underrun each time
        play(worst, [0], 20)
    assert worst.underruns == 30 and worst.margin == 4000 == worst.max_margin  # 250 ms
    calm = client.Speaker()
    calm.margin = 320 + 160 * 3
    _, underruns = play(calm, list(range(0, 1000, 5)), 1000)  # 25 s of steady replies
    assert underruns == []
    assert calm.margin == 320  # one step a 5 s, never below the start
    assert calm.trimmed > 0 and calm.overflows == 0


ASOUNDRC = """pcm.!default {
    type asym
    playback.pcm "null"
    capture.pcm { type file; slave.pcm "null"; file "/dev/null"; infile "%s"; format "raw" }
}
"""


def virtual_sound_card(tmp_path, seconds: float) -> dict:
    """The environment of a client whose sound card is ALSA's null device (a user ~/.asoundrc in
    `tmp_path`), its microphone reading `seconds` of speech from a raw file, unpaced: far faster
    than real time. Skips the test where PortAudio is missing (outside CI)."""
    try:
        import sounddevice  # noqa: F401
    except OSError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PortAudio is not installed ({e}); .ci/run installs libportaudio2")
    float_to_pcm(speech_like(seconds)).tofile(tmp_path / "mic.raw")
    (tmp_path / ".asoundrc").write_text(ASOUNDRC % (tmp_path / "mic.raw"))
    return {**os.environ, "HOME": str(tmp_path)}


def test_live_mode_on_a_virtual_sound_card(server, tmp_path):
    """The microphone path with sounddevice on ALSA's null device (a user ~/.asoundrc): the
    capture reads a raw file and nothing paces it, so the microphone runs far faster than real
    time. The client streams, plays replies, survives the flood (the server drops and says so),
    prints latency lines, and exits cleanly on Ctrl-C."""
    env = virtual_sound_card(tmp_path, 3.0)
    url, _ = server
    proc = subprocess.Popen([sys.executable, "inference_client.py", "--server", url, "--token", TOKEN, "--stats-every", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert "live: speak now" in stderr and "round trip p50" in stderr and "Traceback" not in stderr
    assert "capture to playback p50" in stderr
    s = stats(stdout)
    assert s["replies"] >= 5 and s["sent"] > s["replies"] and s["dropped_by_server"] > 0
    # The server replays 2 chunks of its prompt first: answered, not timed.
    assert s["replayed"] == 2 and s["timed"] == s["replies"] - 2 and 0 < s["c2p"]["chunks"] <= s["timed"]


def test_a_bad_input_file_is_one_error_line_before_connecting(tmp_path, capfd):
    """NaN, inf, a mis-scaled float file, a file that is not audio and a missing one: each is
    refused naming the file, before connecting (nothing listens on the port), as the trainers and
    the server's prompt refuse them (model.audio)."""
    x = speech_like(0.5).astype(np.float32)
    nan, inf, huge = x.copy(), x.copy(), x * 32768  # int16 values written as floats
    nan[100] = np.nan
    inf[200] = np.inf
    for name, data in (("nan.wav", nan), ("inf.wav", inf), ("huge.wav", huge)):
        sf.write(tmp_path / name, data, 16000, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not a sound\n")
    # Not refused before: an empty file (it sent a chunk of silence and wrote it) and a 1 Hz one (upsampled:
    # gigabytes for a large file); a missing file or a folder said "System error." or "Format not recognised.".
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "folder.wav").mkdir()
    sf.write(tmp_path / "1hz.wav", np.full(2000, 0.1, np.float32), 1)
    cases = {"nan.wav": "non-finite", "inf.wav": "non-finite", "huge.wav": "beyond", "text.wav": "cannot read",
             "missing.wav": ": no such file", "folder.wav": ": it is a folder", "empty.wav": "holds no audio",
             "1hz.wav": "a sample rate of 1 Hz, below 4000 Hz"}
    for name, reason in cases.items():
        path = tmp_path / name
        r = client_here(capfd, "--server", "ws://127.0.0.1:9", "--input-wav", path, "--output-wav", tmp_path / "o.wav")
        assert r.returncode != 0, name
        assert r.stderr.startswith(f"error: cannot read audio file {path}") and reason in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "connect" not in r.stderr, r.stderr
        assert not (tmp_path / "o.wav").exists()


def test_an_input_mp3_cut_short_is_one_error_line_before_connecting(tmp_path, capfd):
    """An MP3 cut short by a download (its Xing header still counts 10 s) was streamed as the 3.9 s
    left, without a word, where the trainers skip it and complete.py and the server's prompt
    refuse it: refused here too, naming the file, before connecting (nothing listens)."""
    t = np.arange(10 * 44100) / 44100
    try:
        sf.write(tmp_path / "talk.mp3", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100)
    except Exception as e:  # an old libsndfile without an MP3 encoder
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    data = (tmp_path / "talk.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(data[:len(data) * 4 // 10])  # a download cut at 40%
    r = client_here(capfd, "--server", "ws://127.0.0.1:9", "--input-wav", tmp_path / "cut.mp3",
                    "--output-wav", tmp_path / "o.wav")
    error = r.stderr.splitlines()[-1]  # (mpg123's own notes may come before it: they are let be)
    assert r.returncode != 0 and error.startswith(f"error: cannot read audio file {tmp_path / 'cut.mp3'}: its header "
                                                  "counts 441000 frames, but it holds fewer"), r.stderr
    assert "connect" not in r.stderr, r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_an_input_that_is_a_named_pipe_or_a_device_is_one_error_line_not_a_wait(tmp_path):
    """A named pipe as --input-wav made the client wait for ever, in soundfile's open, for a writer
    that never came (the trainers, complete.py and the server refuse one before opening it); a
    device such as /dev/zero was "no such file". Each is one line saying what it is, at once."""
    os.mkfifo(tmp_path / "pipe.wav")
    for path in (tmp_path / "pipe.wav", "/dev/zero"):
        r = run_client("--server", "ws://127.0.0.1:9", "--input-wav", path, "--output-wav", tmp_path / "o.wav",
                       timeout=30)
        assert r.returncode != 0 and r.stderr == (f"error: cannot read audio file {path}: it is not a regular file "
                                                  "(a named pipe or a device)\n"), r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_an_output_that_cannot_be_written_is_one_error_line_before_connecting(tmp_path, capfd):
    """The conversation would be lost at the end: refused before connecting (nothing listens)."""
    sf.write(tmp_path / "in.wav", speech_like(0.5).astype(np.float32), 16000)
    (tmp_path / "taken").write_text("a file")
    cases = {tmp_path / "taken" / "o.wav": f"cannot write {tmp_path / 'taken' / 'o.wav'}: {tmp_path / 'taken'} is a file, "
                                            "not a folder",
             tmp_path: f"cannot write '{tmp_path}': it names a folder; name an audio file (out.wav, for example)",
             tmp_path / "o.xyz": f"cannot write {tmp_path / 'o.xyz'}: soundfile writes no .xyz files (.wav, .flac or "
                                 ".ogg, for example)"}
    for out, message in cases.items():
        r = client_here(capfd, "--server", "ws://127.0.0.1:9", "--input-wav", tmp_path / "in.wav", "--output-wav", out)
        assert r.returncode != 0 and r.stderr == f"error: {message}\n", r.stderr
    # The input itself (by another name too) would be replaced by the conversation: it was.
    before = (tmp_path / "in.wav").read_bytes()
    (tmp_path / "link.wav").symlink_to(tmp_path / "in.wav")
    for out in (tmp_path / "in.wav", tmp_path / "." / "link.wav"):
        r = client_here(capfd, "--server", "ws://127.0.0.1:9", "--input-wav", tmp_path / "in.wav", "--output-wav", out)
        assert r.returncode != 0 and r.stderr == (f"error: cannot write {out}: it is the --input-wav file, which "
                                                  "the output would replace; name another file\n"), r.stderr
    assert (tmp_path / "in.wav").read_bytes() == before


def test_the_conversation_is_written_in_the_format_its_name_gives(server, tmp_path):
    """--output-wav chat.flac was a WAV under a .flac name (tools that go by the extension then
    misread it); the conversation is now written in the format the extension names, as complete.py
    writes its output, and a name without an extension is a WAV."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    for name, fmt in (("chat.flac", "FLAC"), ("chat.ogg", "OGG"), ("chat", "WAV")):
        r = run_client("--server", url, "--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav",
                       tmp_path / name, "--no-realtime")
        assert r.returncode == 0, r.stderr
        info = sf.info(tmp_path / name)
        assert info.format == fmt and info.channels == 2 and info.samplerate == 16000 and info.frames == 4 * 2000, info
    lossless, _ = sf.read(tmp_path / "chat.flac", dtype="int16")
    assert np.array_equal(lossless[:, 0], sf.read(tmp_path / "chat", dtype="int16")[0][:, 0])  # the user's side


def test_an_output_that_is_a_device_is_written_into_not_replaced(server, tmp_path):
    """--output-wav /dev/null (a benchmark that keeps nothing) was renamed over: the client wrote
    its temporary file beside it and replaced the device with a regular file, which as root broke
    /dev/null for the whole machine. A device (here through a link, so that a failing run replaces
    the link, not the device) is now written into."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    for name in ("out.wav", "null"):  # without an extension, as /dev/null: a WAV all the same
        (tmp_path / name).symlink_to("/dev/null")
        r = run_client("--server", url, "--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav",
                       tmp_path / name, "--no-realtime")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / name).is_symlink() and os.readlink(tmp_path / name) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "null", "out.wav"]  # no temporary left beside it


def test_an_output_that_fails_at_the_end_is_one_error_line_and_the_conversation_is_kept(server, tmp_path):
    """The output checked before connecting can still fail when written, after the session (a disk
    that filled up: here /dev/full, through a link). That was a traceback, and the conversation
    lost; it is one `error:` line naming the file and why, exit status 1, and the conversation is
    written to the temporary folder instead, named on that line."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    (tmp_path / "full.wav").symlink_to("/dev/full")
    (tmp_path / "tmp").mkdir()
    r = subprocess.run([sys.executable, "inference_client.py", "--server", url, "--token", TOKEN, "--input-wav",
                        str(tmp_path / "in.wav"), "--output-wav", str(tmp_path / "full.wav"), "--no-realtime"],
                       cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (rescue,) = list((tmp_path / "tmp").iterdir())
    line = r.stderr.splitlines()[-1]
    assert line.startswith(f"error: cannot write {tmp_path / 'full.wav'}: ") and \
        line.endswith(f"; the conversation is in {rescue}"), r.stderr
    kept, rate = sf.read(rescue, dtype="int16")
    assert rate == 16000 and kept.shape == (4 * 2000, 2)
    assert np.array_equal(kept[:, 0], float_to_pcm(client.read_audio(str(tmp_path / "in.wav"))))
    assert stats(r.stdout)["replies"] == 4


def test_a_conversation_whose_name_soundfile_cannot_encode_is_kept_in_the_temporary_folder(tmp_path, monkeypatch):
    """A name of bytes that are not UTF-8 (the command line refuses it first; a caller of
    save_conversation may not): soundfile's UnicodeEncodeError escaped the rescue, a traceback and
    the conversation lost. Now it is kept in the temporary folder, as for a full disk."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stereo = np.zeros((4000, 2), dtype=np.int16)
    stereo[:, 0] = 1000
    said = client.save_conversation(str(tmp_path) + "/c\udce9.wav", stereo)
    (rescue,) = list((tmp_path / "tmp").iterdir())
    assert said.startswith(f"cannot write {tmp_path}/c\\udce9.wav: ") and said.endswith(f"; the conversation is in {rescue}")
    assert np.array_equal(sf.read(rescue, dtype="int16")[0], stereo)


def test_an_output_that_is_a_pipe_is_one_error_line_before_connecting(server, tmp_path):
    """A named pipe as --output-wav (or /dev/stdout piped on) passed the checks; after the session
    the client waited forever for a reader to open it (and then could not write a WAV into it:
    soundfile seeks to write its header). It is refused before connecting."""
    url, _ = server
    sf.write(tmp_path / "in.wav", speech_like(0.5), 16000)
    os.mkfifo(tmp_path / "pipe.wav")
    r = run_client("--server", url, "--token", TOKEN, "--input-wav", tmp_path / "in.wav", "--output-wav",
                   tmp_path / "pipe.wav", "--no-realtime", timeout=30)
    assert r.returncode == 1 and r.stderr == (f"error: cannot write {tmp_path / 'pipe.wav'}: it is a pipe, and a WAV "
                                              "is written with seeks (its header last); name a file\n"), r.stderr


def test_ctrl_c_then_an_output_that_cannot_be_written_is_status_1(server, tmp_path):
    """Ctrl-C in file mode, then the conversation cannot be written (its folder made read-only while
    it streamed): the `error:` line was printed, but the status was 0, as after a clean Ctrl-C; a
    script checking it took --output-wav as written. Run without root's capabilities."""
    from unprivileged import unprivileged
    url, _ = server
    sf.write(tmp_path / "long.wav", speech_like(20.0), 16000)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(unprivileged() + [sys.executable, "inference_client.py", "--server", url, "--token",
                                                  TOKEN, "--input-wav", str(tmp_path / "long.wav"), "--output-wav",
                                                  str(tmp_path / "out" / "cut.wav")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 30
        while "streaming" not in (tmp_path / "stderr").read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        (tmp_path / "out").chmod(0o555)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        (tmp_path / "out").chmod(0o755)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"error: cannot write {tmp_path / 'out' / 'cut.wav'}" in stderr and not (tmp_path / "out" / "cut.wav").exists()


@pytest.mark.parametrize("flags, flag", [(["--input-wav", "", "--output-wav", ""], "--input-wav"),
                                         (["--input-wav", "in.wav", "--output-wav", ""], "--output-wav")])
def test_an_empty_file_argument_is_refused_not_taken_as_none(tmp_path, capfd, flags, flag):
    """`--input-wav '' --output-wav ''` was taken as neither given: the client opened the microphone;
    one of them empty was 'they go together', though both were given."""
    r = client_here(capfd, "--server", "ws://127.0.0.1:9/audio", *flags)
    assert r.returncode != 0 and r.stderr.strip() == f"error: {flag} needs a file, got ''", r.stderr
