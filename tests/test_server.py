"""inference_server.py: a real uvicorn server on loopback with a tiny random duplex model on the
CPU, and real websocket clients. Replies are compared with a fresh LiveEngine running the same
session alone (same seed, parameters and audio), so "isolated" and "unchanged by bad input" are
checked sample for sample."""
import asyncio
import base64
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import websockets

import inference_server as srv
from live_server import (as_pcm, connect, pcm_chunks, reference_replies, running_server, speech_like, stream,
                         tiny_duplex, where)
from model import SamplingParams

CHUNKS = pcm_chunks(speech_like(10.0))  # 80 chunks: 10 s
B64 = srv.TEXT_PREFIX


@pytest.fixture(scope="module")
def model():
    return tiny_duplex()


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, max_sessions=3) as s:
        yield s


def http(url, method="GET", headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def health(server, **kw):
    status, body, _ = http(server.http + "/health", **kw)
    assert status == 200
    return json.loads(body)


def wait_idle(server, timeout=10.0):
    deadline = time.time() + timeout
    while health(server)["sessions"]:
        assert time.time() < deadline, "sessions did not end"
        time.sleep(0.05)


def assert_close(got, want):
    """Bit-exact: the session in the server equals the same session alone in an engine."""
    got, want = np.asarray(got, dtype=np.int16), np.asarray(want, dtype=np.int16)
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"replies differ from the session alone by up to {np.abs(got.astype(int) - want).max()}"


async def control(ws, **message):
    await ws.send(json.dumps(message))
    while True:
        reply = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(reply, str) and not reply.startswith("data:"):
            return json.loads(reply)


# --- streaming ------------------------------------------------------------------------------

def test_binary_frames_10s(server, model):
    async def run():
        async with connect(server.ws + "/audio?seed=5") as ws:
            return await where(ws, server), await stream(ws, CHUNKS)
    steps = health(server)["steps"]
    at, replies = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(replies) == 80 and all(isinstance(r, bytes) and len(r) == 4000 for r in replies)
    assert_close(as_pcm(replies), reference_replies(model, CHUNKS, seed=5, where=at))
    assert np.abs(as_pcm(replies)).max() > 0
    wait_idle(server)
    h = health(server)
    assert h["steps"] - steps == 80 and h["step_ms"]["p50"] > 0 and h["chunk_latency_ms"]["p99"] > 0
    assert h["sessions"] == 0 and h["capacity"] == 3 and h["dropped_in"] == 0
    time.sleep(0.3)
    quiet = json.loads(http(server.http + "/health?window=0.2")[1])  # figures over the last 0.2 s: no steps
    assert quiet["step_ms"]["p50"] is None and quiet["batch_mean"] is None


def test_text_frames_exactly_as_the_original_client(model):
    """The original inference_client.py: POST /set_temperature with its query names, then
    lock-step `data:audio/raw;base64,` frames of 2000 int16 samples; replies parsed as it does."""
    with running_server(model, max_sessions=2) as server:
        status, body, _ = http(server.http + "/set_temperature?token_temp=0.6&categorical_temp=0.4&gaussian_temp=0.2",
                               method="POST")
        assert status == 200 and json.loads(body)["status"] == "success"
        assert "Temperature updated to: (0.6, (0.4, 0.2))" in json.loads(body)["message"]

        async def run():
            replies = []
            async with connect(server.ws + "/audio") as ws:
                at = await where(ws, server)  # (not in the original client: to check the replies)
                for c in CHUNKS:
                    mic = np.frombuffer(c, dtype=np.int16).reshape(-1, 1)  # sounddevice's (frames, channels)
                    await ws.send(f"data:audio/raw;base64,{base64.b64encode(mic.tobytes()).decode('utf-8')}")
                    response = (await ws.recv()).split(",")[1]
                    replies.append(np.frombuffer(base64.b64decode(response), dtype=np.int16).reshape(-1, 1))
                info = await control(ws, type="status")
            return replies, info, at
        replies, info, at = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(replies) == 80 and all(r.shape == (2000, 1) for r in replies)
    params = SamplingParams(token_temp=0.6, mixture_temp=0.4, gaussian_temp=0.2)
    assert info["params"] == {**SamplingParams().__dict__, **params.__dict__}
    assert_close(np.stack([r[:, 0] for r in replies]), reference_replies(model, CHUNKS, info["seed"], params, where=at))


def test_concurrent_sessions_are_isolated_and_batched(server, model):
    """A and B at once, with their own seeds and parameters; B resets mid-stream. A's replies are
    those of A alone, B's those of B alone before and after its reset."""
    pb = dict(token_temp=0.3, gaussian_temp=0.5, top_p=0.9)

    async def a():
        async with connect(server.ws + "/audio?seed=11") as ws:
            return await where(ws, server), await stream(ws, CHUNKS)

    async def b():
        async with connect(server.ws + "/audio?seed=12") as ws:
            at = await where(ws, server)
            ack = await control(ws, type="set_params", id=1, **pb)
            assert ack["type"] == "ack" and ack["id"] == 1 and ack["params"]["top_p"] == 0.9
            first = await stream(ws, CHUNKS[:20])
            ack = await control(ws, type="reset", seed=13)
            assert ack == {"type": "ack", "request": "reset", "seed": 13}
            return at, first, await stream(ws, CHUNKS[20:])

    async def both():
        return await asyncio.gather(a(), b())
    steps = health(server)["steps"]
    (at_a, got_a), (at_b, b1, b2) = asyncio.run(asyncio.wait_for(both(), 60))
    assert at_a[1] != at_b[1]
    params_b = SamplingParams(**pb)
    assert_close(as_pcm(got_a), reference_replies(model, CHUNKS, 11, where=at_a))
    assert_close(as_pcm(b1), reference_replies(model, CHUNKS[:20], 12, params_b, where=at_b))
    assert_close(as_pcm(b2), reference_replies(model, CHUNKS[20:], 13, params_b, where=at_b))
    assert np.abs(as_pcm(got_a)[:20].astype(int) - as_pcm(b1)).max() > 100
    assert health(server)["steps"] - steps < 130, "concurrent chunks were not batched into shared steps"


def test_control_messages(server, model):
    async def run():
        async with connect(server.ws + "/audio") as ws:
            at = await where(ws, server)
            info = await control(ws, type="status", id="x")
            assert info["type"] == "status" and info["id"] == "x" and info["params"] == SamplingParams().__dict__
            await control(ws, type="set_params", mixture_temp=0.0)
            ack = await control(ws, type="reset", seed=3)
            replies = await stream(ws, CHUNKS[:8])
            info = await control(ws, type="status")
            return ack, replies, info, at
    ack, replies, info, at = asyncio.run(asyncio.wait_for(run(), 30))
    assert ack["seed"] == 3 and info["seed"] == 3 and info["chunks_in"] == info["chunks_out"] == 8
    assert_close(as_pcm(replies), reference_replies(model, CHUNKS[:8], 3, SamplingParams(mixture_temp=0.0), where=at))


def test_set_temperature_for_one_session(server):
    async def run():
        async with connect(server.ws + "/audio") as ws:
            sid = (await control(ws, type="status"))["session"]
            url = server.http + "/set_temperature?token_temp=0.5&session=" + sid
            status, body, _ = await asyncio.to_thread(http, url, "POST")
            assert status == 200 and json.loads(body)["params"]["token_temp"] == 0.5
            assert (await control(ws, type="status"))["params"]["token_temp"] == 0.5
            for query, code in (("token_temp=nan", 400), ("gaussian_temp=-1", 400), ("token_temp=inf", 400)):
                status, body, _ = await asyncio.to_thread(http, server.http + f"/set_temperature?{query}&session={sid}", "POST")
                assert status == code and json.loads(body)["status"] == "error"
            assert (await control(ws, type="status"))["params"]["token_temp"] == 0.5
    asyncio.run(asyncio.wait_for(run(), 30))
    status, body, _ = http(server.http + "/set_temperature?token_temp=0.5&session=nope", "POST")
    assert status == 404


# --- bad input ------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return B64 + base64.b64encode(data).decode()


BAD = {
    "not base64": (B64 + "@@@ not base64 @@@", "bad_base64"),
    "base64, odd byte count": (b64(b"\x01" * 3999), "bad_chunk"),
    "base64, wrong chunk length": (b64(b"\x00" * 400), "bad_chunk"),
    "data url without base64": ("data:audio/raw,AAAA", "bad_frame"),
    "binary, odd byte count": (b"\x01" * 3999, "bad_chunk"),
    "binary, wrong chunk length": (b"\x00" * 4002, "bad_chunk"),
    "binary garbage": (np.random.default_rng(0).bytes(1234), "bad_chunk"),
    "empty binary": (b"", "bad_chunk"),
    "plain text": ("hello", "bad_json"),
    "json, not an object": ("[1, 2]", "bad_message"),
    "json without type": ('{"token_temp": 0.5}', "bad_message"),
    "unknown control message": ('{"type": "dance"}', "unknown_type"),
    "NaN": ('{"type": "set_params", "token_temp": NaN}', "bad_params"),
    "Infinity": ('{"type": "set_params", "gaussian_temp": Infinity}', "bad_params"),
    "-Infinity": ('{"type": "set_params", "mixture_temp": -Infinity}', "bad_params"),
    "overflowing float": ('{"type": "set_params", "token_temp": 1e999}', "bad_params"),
    "negative temperature": ('{"type": "set_params", "token_temp": -0.1}', "bad_params"),
    "top_p out of range": ('{"type": "set_params", "top_p": 0}', "bad_params"),
    "boolean temperature": ('{"type": "set_params", "token_temp": true}', "bad_params"),
    "string temperature": ('{"type": "set_params", "token_temp": "hot"}', "bad_params"),
    "unknown parameter": ('{"type": "set_params", "temperature": 0.5}', "bad_params"),
    "negative seed": ('{"type": "reset", "seed": -3}', "bad_seed"),
    "fractional seed": ('{"type": "reset", "seed": 1.5}', "bad_seed"),
    "reset with extra fields": ('{"type": "reset", "hard": true}', "bad_message"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_answered_and_the_session_goes_on(server, model, name):
    message, code = BAD[name]

    async def run():
        async with connect(server.ws + "/audio?seed=9") as ws:
            at = await where(ws, server)
            first = await stream(ws, CHUNKS[:2])
            await ws.send(message)
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            rest = await stream(ws, CHUNKS[2:4])
            info = await control(ws, type="status")
            return first + rest, error, info, at
    replies, error, info, at = asyncio.run(asyncio.wait_for(run(), 30))
    assert error["type"] == "error" and error["error"] == code and error["message"]
    assert info["params"] == SamplingParams().__dict__ and info["seed"] == 9 and info["bad_messages"] == 1
    assert_close(as_pcm(replies), reference_replies(model, CHUNKS[:4], 9, where=at))


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_oversized_message_closes_that_session(model, kind):
    with running_server(model, max_sessions=2, max_message_bytes=8192) as server:
        async def run():
            async with connect(server.ws + "/audio") as ws:
                await ws.send(b"\x00" * 20000 if kind == "binary" else b64(b"\x00" * 20000))
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                return ws.close_code
        assert asyncio.run(run()) == srv.CLOSE_TOO_BIG
        wait_idle(server)


def test_too_many_bad_messages_close_the_session(server):
    async def run():
        async with connect(server.ws + "/audio") as ws:
            errors = 0
            for _ in range(srv.MAX_BAD_MESSAGES + 1):
                await ws.send(b"\x00" * 3)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    errors += msg["type"] == "error"
            return errors, ws.close_code, ws.close_reason
    errors, code, reason = asyncio.run(run())
    assert errors == srv.MAX_BAD_MESSAGES + 1 and code == srv.CLOSE_POLICY and "bad messages" in reason
    wait_idle(server)


def test_client_vanishing_mid_step(model, tmp_path):
    with running_server(model, max_sessions=2, recordings=str(tmp_path)) as server:
        async def vanish():
            ws = await connect(server.ws + "/audio")
            await stream(ws, CHUNKS[:1])
            for c in CHUNKS[1:4]:
                await ws.send(c)
            await asyncio.sleep(0.01)  # the worker is stepping this session now
            ws.transport.abort()
        asyncio.run(vanish())
        wait_idle(server)

        async def after():  # the slot is free again and the engine still serves
            async with connect(server.ws + "/audio?seed=4") as ws:
                return await where(ws, server), await stream(ws, CHUNKS[:3])
        at, replies = asyncio.run(after())
        assert_close(as_pcm(replies), reference_replies(model, CHUNKS[:3], 4, where=at))
        wait_idle(server)
    assert len(list(tmp_path.glob("*.wav"))) == 2 and not list(tmp_path.glob(".*.part"))


def test_bad_clients_do_not_disturb_a_session_at_real_time(model):
    """One session streams 4 s at real time while other clients send every bad input, an
    oversized message, a flood of garbage and vanish mid-step: it keeps its cadence (every reply,
    none dropped, round trips well under a step) and its replies are those of the session alone."""
    with running_server(model, max_sessions=4) as server:
        good_chunks = CHUNKS[:32]

        async def good():
            sent, replies, rtt = [], [], []
            async with connect(server.ws + "/audio?seed=21") as ws:
                at = await where(ws, server)

                async def send():
                    t0 = time.perf_counter()
                    for i, c in enumerate(good_chunks):
                        await asyncio.sleep(max(0.0, t0 + i * 0.125 - time.perf_counter()))
                        sent.append(time.perf_counter())
                        await ws.send(c)
                sender = asyncio.create_task(send())
                while len(replies) < len(good_chunks):
                    msg = await asyncio.wait_for(ws.recv(), 10)
                    assert isinstance(msg, bytes), msg
                    rtt.append(time.perf_counter() - sent[len(replies)])
                    replies.append(msg)
                await sender
            return replies, rtt, at

        async def bad_inputs():
            async with connect(server.ws + "/audio") as ws:
                for message, _ in BAD.values():
                    await ws.send(message)
                    assert json.loads(await ws.recv())["type"] == "error"
                    await asyncio.sleep(0.02)

        async def oversized():
            await asyncio.sleep(0.5)
            async with connect(server.ws + "/audio") as ws:
                await ws.send(b"\x00" * (1 << 17))
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()

        async def flood():
            await asyncio.sleep(1.0)
            async with connect(server.ws + "/audio") as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    for _ in range(1000):
                        await ws.send(b"garbage")
                        await asyncio.sleep(0.001)
                    while True:
                        await ws.recv()
            assert ws.close_code == srv.CLOSE_POLICY

        async def vanishing():
            for _ in range(3):
                await asyncio.sleep(0.4)
                ws = await connect(server.ws + "/audio")
                for c in CHUNKS[:3]:
                    await ws.send(c)
                await asyncio.sleep(0.03)
                ws.transport.abort()

        async def run():
            results = await asyncio.gather(good(), bad_inputs(), oversized(), flood(), vanishing())
            return results[0]
        replies, rtt, at = asyncio.run(asyncio.wait_for(run(), 60))
        print(f"round trips: p50 {np.median(rtt) * 1000:.0f} ms, max {max(rtt) * 1000:.0f} ms")
        assert len(replies) == len(good_chunks)
        assert_close(as_pcm(replies), reference_replies(model, good_chunks, 21, where=at))
        assert max(rtt) < 0.25, f"round trips {sorted(rtt)[-3:]} s: the session lost its cadence"
        wait_idle(server)
        h = health(server)
        assert h["dropped_in"] == 0 and h["bad_messages"] > len(BAD)


# --- load, capacity, auth -------------------------------------------------------------------

def test_capacity_refuses_with_1013(model):
    with running_server(model, max_sessions=2) as server:
        async def run():
            a = await connect(server.ws + "/audio")
            b = await connect(server.ws + "/audio")
            await stream(a, CHUNKS[:1])
            await stream(b, CHUNKS[:1])
            async with connect(server.ws + "/audio") as c:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(c.recv(), 10)
                refused = (c.close_code, c.close_reason)
            await a.close()
            await asyncio.sleep(0.1)
            async with connect(server.ws + "/audio") as d:  # a slot is free again
                assert len((await stream(d, CHUNKS[:1]))[0]) == 4000
            await b.close()
            return refused
        code, reason = asyncio.run(asyncio.wait_for(run(), 30))
        assert code == srv.CLOSE_TRY_AGAIN and "capacity" in reason and "try again later" in reason
        h = health(server)
        assert h["refused"] == 1 and h["capacity"] == 2


def test_drop_policy_when_compute_falls_behind(model):
    """Steps slower than the client: the queue holds 2 chunks, older ones are dropped, counted
    and announced just before the next reply; every chunk is either answered or dropped."""
    with running_server(model, max_sessions=2, slow=0.1, max_queue=2) as server:
        async def run():
            async with connect(server.ws + "/audio") as ws:
                for c in CHUNKS[:12]:
                    await ws.send(c)
                replies, dropped = 0, 0
                while replies + dropped < 12:
                    msg = await asyncio.wait_for(ws.recv(), 10)
                    if isinstance(msg, bytes):
                        replies += 1
                    else:
                        m = json.loads(msg)
                        assert m["type"] == "dropped" and m["total"] >= m["chunks"]
                        dropped += m["chunks"]
                return replies, dropped
        replies, dropped = asyncio.run(asyncio.wait_for(run(), 30))
        assert replies + dropped == 12 and dropped >= 6
        assert health(server)["dropped_in"] == dropped


def test_outbox_is_bounded_for_a_client_that_does_not_read():
    class Stub:
        counts = __import__("collections").Counter()
        replay = []

    async def run():
        s = srv.Session(Stub(), ws=None, row=0, params=SamplingParams(), seed=0)
        for _ in range(40):
            s.send_audio(np.zeros(2000, dtype="<i2"), "binary")
        assert sum(a for a, _ in s.outbox) == srv.MAX_OUTBOX_AUDIO and s.counts["dropped_out"] == 40 - srv.MAX_OUTBOX_AUDIO
        for _ in range(srv.MAX_OUTBOX):
            s.send_json(type="x")
        assert s.close_code[0] == srv.CLOSE_POLICY
    asyncio.run(run())


def test_token_auth(model):
    token = "s3cret-token"
    with running_server(model, max_sessions=2, token=token) as server:
        for path, method in (("/health", "GET"), ("/", "GET"), ("/set_temperature?token_temp=0.7", "POST")):
            assert http(server.http + path, method)[0] == 401
            status, _, headers = http(server.http + path, method, headers={"Authorization": "Bearer wrong"})
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            assert http(server.http + path, method, headers={"Authorization": f"Bearer {token}"})[0] == 200
            sep = "&" if "?" in path else "?"
            assert http(server.http + path + f"{sep}token={token}", method)[0] == 200
        status, body, _ = http(server.http + f"/?token={token}")
        assert b"<title>hertz-dev" in body

        async def ws_status(**kw):
            try:
                async with connect(server.ws + "/audio", **kw) as ws:
                    return len((await stream(ws, CHUNKS[:1]))[0])
            except websockets.InvalidStatus as e:
                return e.response.status_code
        assert asyncio.run(ws_status()) == 403
        assert asyncio.run(ws_status(token="wrong")) == 403
        assert asyncio.run(ws_status(token="wrong", header=False)) == 403
        assert asyncio.run(ws_status(token=token)) == 4000
        assert asyncio.run(ws_status(token=token, header=False)) == 4000


def test_index_and_no_unauthenticated_docs(server):
    status, body, headers = http(server.http + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"AudioWorklet" in body
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert http(server.http + path)[0] == 404


# --- prompt, replay, recordings -------------------------------------------------------------

def test_prompt_replay_and_recording(model, tmp_path):
    t = np.arange(8000) / 16000
    prompt = np.stack([0.3 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 310 * t)]).astype(np.float32)
    live = CHUNKS[:10]
    with running_server(model, max_sessions=2, prompt=prompt, recordings=str(tmp_path / "rec")) as server:
        assert health(server)["replay_chunks"] == 4

        async def run():
            async with connect(server.ws + "/audio?seed=7") as ws:
                return await where(ws, server), await stream(ws, CHUNKS[:4] + live)
        at, replies = asyncio.run(asyncio.wait_for(run(), 30))
        replies = as_pcm(replies)
        wait_idle(server)
    mono = srv.float_to_pcm(prompt.mean(axis=0))
    assert np.array_equal(replies[:4].reshape(-1), mono)  # the prompt is played back first ...
    assert_close(replies[4:], reference_replies(model, live, 7, prompt=prompt, where=at))  # ... then the warm-started model
    files = list((tmp_path / "rec").iterdir())
    assert len(files) == 1 and files[0].suffix == ".wav"
    audio, rate = sf.read(files[0], dtype="int16")
    assert rate == 16000 and audio.shape == (8000 + 10 * 2000, 2)
    assert np.array_equal(audio[:8000], srv.float_to_pcm(prompt.T))
    assert np.array_equal(audio[8000:, 0], as_pcm(live).reshape(-1))       # the user, as received
    assert np.array_equal(audio[8000:10000, 1], np.zeros(2000))           # the model, one frame behind:
    assert np.array_equal(audio[10000:, 1], replies[4:-1].reshape(-1))    # its reply to chunk t is frame t+1


def test_replay_seconds(model):
    from model.live import LiveEngine
    prompt = np.zeros((2, 16000), dtype=np.float32)
    engine = LiveEngine(model, max_sessions=1)
    assert len(srv.Server(engine, prompt=prompt).replay) == 8
    assert len(srv.Server(engine, prompt=prompt, replay_seconds=0.3).replay) == 2
    assert len(srv.Server(engine, prompt=prompt, replay_seconds=0).replay) == 0


def test_command_line_refuses_to_expose_without_token():
    with pytest.raises(SystemExit):
        srv.parse_args(["--host", "0.0.0.0"])
    assert srv.parse_args(["--host", "0.0.0.0", "--token", "x"]).token == "x"
    assert srv.parse_args([]).host == "127.0.0.1"


def test_recording_is_capped(model, tmp_path):
    with running_server(model, max_sessions=1, recordings=str(tmp_path), max_recording_seconds=0.5) as server:
        async def run():
            async with connect(server.ws + "/audio") as ws:
                await stream(ws, CHUNKS[:8])
        asyncio.run(asyncio.wait_for(run(), 30))
        wait_idle(server)
    (wav,) = list(tmp_path.glob("*.wav"))
    assert sf.info(wav).frames == 8000 and sf.info(wav).channels == 2
