"""The browser client (web/index.html, served at /) in headless Chromium, driven over the Chrome
DevTools protocol: the fake microphone plays a 440 Hz WAV through getUserMedia and the
AudioWorklet; the server must receive it (its recording's user channel holds 440 Hz, so the
resampling to 16 kHz is right) and the page must receive and play the model's audio."""
import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from live_server import running_server, tiny_duplex

TOKEN = "br0wser"


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs and runs it")


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


def launch(chromium, profile, mic_wav, url):
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", url]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("chromium did not start: " + proc.stderr.read().decode(errors="replace")[-2000:])
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    for _ in range(100):
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
        pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(url.split("?")[0])]
        if pages:
            return proc, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise RuntimeError(f"no page for {url} among {targets}")


def test_browser_client_talks_both_ways(tmp_path):
    chromium = chromium_path()
    rate = 48000  # the fake microphone: 440 Hz with a little noise, resampled by the page to 16 kHz
    t = np.arange(rate * 4) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    sf.write(tmp_path / "mic.wav", tone.astype(np.float32), rate, subtype="PCM_16")
    recordings = tmp_path / "recordings"
    with running_server(tiny_duplex(), max_sessions=2, token=TOKEN, recordings=str(recordings)) as server:
        url = f"{server.http}/?token={TOKEN}"
        proc, devtools = launch(chromium, tmp_path / "profile", tmp_path / "mic.wav", url)
        try:
            async def run():
                from websockets.asyncio.client import connect
                async with connect(devtools, max_size=None) as ws:
                    page = Page(ws)
                    await page.wait_for("document.readyState === 'complete' && !!window.hertz")
                    await page.js("document.getElementById('start').click()", gesture=True)
                    await page.wait_for("window.hertz.state === 'live'")
                    # A temperature slider moved, then Reset: the server acknowledges both.
                    await page.js("""(() => { const s = document.querySelector('input[name=token_temp]');
                                     s.value = '0.6'; s.dispatchEvent(new Event('input')); })()""")
                    await page.wait_for("window.hertz.acks >= 2")
                    await page.js("document.getElementById('reset').click()", gesture=True)
                    await page.wait_for("window.hertz.received >= 24 && window.hertz.played > 16000 && window.hertz.acks >= 3")
                    state = await page.js("JSON.stringify(window.hertz)")
                    readout = await page.js("document.getElementById('rtt').textContent")
                    await page.js("document.getElementById('stop').click()", gesture=True)
                    await page.wait_for("window.hertz.state === 'stopped'")
                    return json.loads(state), readout
            hertz, readout = asyncio.run(asyncio.wait_for(run(), 90))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        deadline = time.time() + 10
        while not list(recordings.glob("*.wav")) and time.time() < deadline:
            time.sleep(0.1)
    assert hertz["errors"] == [] and hertz["dropped"] == 0
    assert hertz["sent"] >= hertz["received"] >= 24
    assert hertz["playedEnergy"] > 0  # the model's audio went out through the worklet
    assert len(hertz["rtt"]) >= 20 and readout.endswith("ms")
    (wav,) = list(recordings.glob("*.wav"))
    audio, sr = sf.read(wav, dtype="float32")
    user = audio[8000:, 0]  # after the first half second
    assert sr == 16000 and len(user) >= 16000 and np.sqrt(np.mean(user ** 2)) > 0.01
    spectrum = np.abs(np.fft.rfft(user * np.hanning(len(user))))
    peak = np.argmax(spectrum) * 16000 / len(user)
    assert abs(peak - 440) < 5, f"the microphone's 440 Hz arrived at {peak:.1f} Hz"
    assert np.abs(audio[:, 1]).max() > 0  # and the model's side of the conversation
