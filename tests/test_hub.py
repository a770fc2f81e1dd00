"""Official weights: download through huggingface_hub from a real HTTP server on loopback that
serves files in the official layout, md5 verification, atomic writes, retries, offline mode."""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from model import hub, load_hertz_dev
from model.hub import OfficialFile, WeightsError

from hub_server import HubServer
from reference import PARITY_DIR, codec_config, load, rel_err, require, transformer_config


def register(monkeypatch, name, data: bytes, component="test"):
    monkeypatch.setitem(hub.OFFICIAL_FILES, name, OfficialFile(name, hashlib.md5(data).hexdigest(), len(data), component))


def fetch(server, tmp_path, name, **kw):
    return hub.official_file(name, tmp_path / "ckpt", endpoint=server.endpoint, progress=False,
                             backoff=0, **{"log": lambda msg: None, **kw})


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".verified.json")


@pytest.fixture
def server():
    with HubServer() as s:
        yield s


def test_good_file_is_downloaded_verified_and_reused(server, tmp_path, monkeypatch):
    data = b"weights" * 1000
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    path = fetch(server, tmp_path, "inference_volcano_3")
    assert path == tmp_path / "ckpt" / "inference_volcano_3.pt" and path.read_bytes() == data
    assert server.requests == ["/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt"]
    assert fetch(server, tmp_path, "inference_volcano_3") == path
    assert len(server.requests) == 1  # present and verified: no second download
    assert leftovers(path.parent) == []


def test_every_file_verified_stays_recorded(server, tmp_path, monkeypatch):
    """A file downloaded (recorded by the download, under its lock) then one found in place and
    hashed in the same call: the second record was written from what was read before the download,
    dropping the first, which was hashed again (a minute for 27 GB) at every later load."""
    quantizer, codec = b"q" * 1000, b"c" * 1000
    register(monkeypatch, "inference_volcano_3", quantizer)
    register(monkeypatch, "inference_apatosaurus_95000", codec)
    server.add("inference_volcano_3.pt", quantizer)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "inference_apatosaurus_95000.pt").write_bytes(codec)  # (copied by hand)
    hub.official_files(["inference_volcano_3", "inference_apatosaurus_95000"], tmp_path / "ckpt",
                       endpoint=server.endpoint, progress=False, log=lambda m: None)
    record = json.loads((tmp_path / "ckpt" / ".verified.json").read_text())
    assert sorted(record) == ["inference_apatosaurus_95000.pt", "inference_volcano_3.pt"]


def test_a_file_replaced_with_its_size_and_mtime_put_back_is_hashed_again(server, tmp_path, monkeypatch):
    """The record of verified files was keyed by size and mtime: a file replaced in place by other
    bytes of the same size, its mtime put back (`cp -p`, `touch -r`), was taken as verified and
    loaded unchecked. Now it is hashed again, found corrupt and downloaded anew (offline: an error
    naming it)."""
    data = bytes(range(256)) * 64
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    path = fetch(server, tmp_path, "inference_volcano_3")
    st = path.stat()
    path.write_bytes(bytes(reversed(data)))  # same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(WeightsError, match=f"{path} is corrupt: md5"):
        hub.official_file("inference_volcano_3", tmp_path / "ckpt", offline=True, progress=False,
                          log=lambda m: None)
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert len(server.requests) == 2


def test_md5_mismatch_is_downloaded_once_more(server, tmp_path, monkeypatch):
    data = bytes(range(256)) * 64
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["corrupt"]
    path = fetch(server, tmp_path, "inference_volcano_3")
    assert path.read_bytes() == data and len(server.requests) == 2


def test_md5_mismatch_twice_is_a_clear_error(server, tmp_path, monkeypatch):
    data = bytes(range(256)) * 64
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["corrupt", "corrupt", "corrupt"]
    with pytest.raises(WeightsError, match="md5"):
        fetch(server, tmp_path, "inference_volcano_3")
    assert len(server.requests) == 2
    assert not (tmp_path / "ckpt" / "inference_volcano_3.pt").exists()
    assert leftovers(tmp_path / "ckpt") == []


def test_interrupted_transfer_is_retried(server, tmp_path, monkeypatch):
    data = bytes(range(256)) * 4096
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["truncate", "error"]
    path = fetch(server, tmp_path, "inference_volcano_3", retries=3)
    assert path.read_bytes() == data and len(server.requests) == 3
    assert leftovers(path.parent) == []


def test_a_dropped_connection_resumes_where_it_stopped(server, tmp_path, monkeypatch):
    """A transfer dropped at 60% was started over from byte 0 (1.6x the file sent; a 27 GB file
    cut at 90% cost 24 GB again): the retry asks for the rest (`Range: bytes=N-`), goes on hashing
    from what was kept, and the file ends complete and verified with the file sent once."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["drop@0.6"]
    logs = []
    path = fetch(server, tmp_path, "inference_volcano_3", log=logs.append)
    assert path.read_bytes() == data and leftovers(path.parent) == []
    assert server.ranges == [None, f"bytes={int(0.6 * len(data))}-"] and server.sent == len(data)
    assert logs[-1] == "resuming inference_volcano_3.pt at 629.1 KB of 1.0 MB", logs


def test_a_download_that_goes_on_is_not_given_up(server, tmp_path, monkeypatch):
    """Drops that each came after progress used up the retries as failed attempts did (three drops
    over a 27 GB download were an error): an attempt that added bytes starts the count anew."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["drop@0.25", "drop@0.5", "drop@0.75"]
    assert fetch(server, tmp_path, "inference_volcano_3", retries=2).read_bytes() == data
    assert server.ranges == [None] + [f"bytes={int(f * len(data))}-" for f in (0.25, 0.5, 0.75)]


def test_a_server_that_does_not_answer_the_range_is_downloaded_from_the_start(server, tmp_path, monkeypatch):
    """A server answering 200 (the whole file) to a Range request, or a 206 from another byte, is
    not appended to the kept prefix: the download starts over from 0 and the file is verified."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "ignore-range"]
    logs = []
    path = fetch(server, tmp_path, "inference_volcano_3", log=logs.append)
    assert path.read_bytes() == data and server.ranges == [None, f"bytes={len(data) // 2}-"]
    assert server.sent == len(data) * 3 // 2 and logs[-1] == (
        f"{server.endpoint}/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt answered the request for the rest of "
        "inference_volcano_3.pt with the whole file; reading it from the start, keeping the 524.3 KB downloaded where "
        "they match")
    path.unlink()
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "bad-range"]
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert server.ranges[2:] == [None, f"bytes={len(data) // 2}-", None] and leftovers(path.parent) == []


def test_a_whole_file_sent_for_the_rest_keeps_the_bytes_downloaded(server, tmp_path, monkeypatch):
    """A server answering a Range request with a 200 (the whole file) made the kept partial start
    over at once: when that answer dropped before the kept size, the partial was shorter than
    before (a 27 GB download at 90% cut back to where the drop came), and the error still said
    "the next run resumes from there". Now the answer's first bytes are checked against the kept
    ones, not written over them: the partial only grows, the error says what the server did, and
    a later answer to the Range request resumes it. Kept bytes that differ from the answer's end
    where they differ (the file is then right at once, no md5 failure)."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    partial = tmp_path / "ckpt" / ".inference_volcano_3.pt.download"
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "ignore-range+drop@0.3"]
    with pytest.raises(WeightsError, match="after 1 attempts"):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert partial.read_bytes() == data[:len(data) // 2]
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert partial.read_bytes() == data[:len(data) // 2], "the kept bytes were cut back"
    assert str(e.value).endswith(f"the 524.3 KB downloaded are kept in {partial}, but the server sent the whole file "
                                 "when asked for the rest: the next run asks again, and if it does the same, reads the "
                                 "file from its start again (checking the bytes kept, not losing them)")
    server.faults["inference_volcano_3.pt"] = ["ignore-range+drop@0.8"]
    with pytest.raises(WeightsError):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert partial.read_bytes() == data[:int(0.8 * len(data))]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={int(0.8 * len(data))}-" and leftovers(tmp_path / "ckpt") == []
    (tmp_path / "ckpt" / "inference_volcano_3.pt").unlink()
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "ignore-range"]
    with pytest.raises(WeightsError):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    with partial.open("r+b") as f:  # (damaged kept bytes)
        f.seek(1000)
        f.write(b"\0" * 10)
    requests = len(server.requests)
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert len(server.requests) == requests + 1 and leftovers(tmp_path / "ckpt") == []


def test_a_whole_file_of_no_given_length_sent_for_the_rest_keeps_the_bytes_downloaded(server, tmp_path, monkeypatch):
    """The same, from a server that gives no length (no Content-Length: the body ends when the
    connection closes) or compresses the file: the kept partial was started over, and a body that
    ended early was taken as the whole file, failed its md5 check and was downloaded once more from
    byte 0. Now it is checked against the kept bytes as well, and one that ends before the size the
    partial is of is a failed attempt that resumes; a compressed one that is whole is put in place."""
    data = bytes(range(256)) * 4096
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    partial = tmp_path / "ckpt" / ".inference_volcano_3.pt.download"
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "unsized+ignore-range+drop@0.3", "unsized+ignore-range+drop@0.8"]
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert "after 2 attempts: the answer ended before the 1048576 bytes of inference_volcano_3.pt, with no length " \
           "given; the 524.3 KB downloaded are kept" in str(e.value), str(e.value)
    assert partial.read_bytes() == data[:len(data) // 2]
    server.faults["inference_volcano_3.pt"] = ["unsized+ignore-range+drop@0.8"]
    with pytest.raises(WeightsError):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert partial.read_bytes() == data[:int(0.8 * len(data))]
    server.faults["inference_volcano_3.pt"] = ["gzip"]
    logs = []
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert "keeping the 838.9 KB downloaded where they match" in logs[-1] and leftovers(tmp_path / "ckpt") == []


def test_a_range_answer_holding_part_of_the_rest_is_followed_by_a_request_for_the_next(server, tmp_path, monkeypatch):
    """A server may answer `Range: bytes=N-` with fewer bytes than the rest (its Content-Range says
    which, `bytes N-M/SIZE`): the download ended there, the file failed its md5 check ("does not
    match"), and it was downloaded once more from byte 0. Now each piece is appended and the next
    one asked for, until the file is whole: one md5 check, which passes, and nothing sent twice."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["drop@0.25", "piece@0.5", "piece@0.75"]
    logs = []
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert server.ranges == [None] + [f"bytes={int(f * len(data))}-" for f in (0.25, 0.5, 0.75)]
    assert server.sent == len(data) and not any("md5" in line for line in logs), logs
    assert leftovers(tmp_path / "ckpt") == []


def test_a_range_answer_to_a_request_for_the_whole_file_is_kept_and_resumed(server, tmp_path, monkeypatch):
    """A server answering every request with 206 (one without Range too, `Content-Range: bytes
    0-N/N+1`) was read without a sidecar or a size: a drop after it removed what came, and a piece of
    the file (as its Content-Range said) was taken as the whole, md5-mismatched and downloaded again.
    Now its Content-Range gives the size: what came before a drop is kept and resumed, and a piece is
    followed by a request for the rest."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["always-206+drop@0.5"]
    folder = tmp_path / "ckpt"
    partial = folder / ".inference_volcano_3.pt.download"
    with pytest.raises(WeightsError, match=f"the 524.3 KB downloaded are kept in {re.escape(str(partial))} and the "
                                           "next run resumes from there$"):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert partial.read_bytes() == data[:len(data) // 2]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges == [None, f"bytes={len(data) // 2}-"] and server.sent == len(data)
    (folder / "inference_volcano_3.pt").unlink()
    server.ranges.clear()
    server.faults["inference_volcano_3.pt"] = ["always-206+piece@0.25"]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges == [None, f"bytes={len(data) // 4}-"] and server.sent == 2 * len(data)
    assert leftovers(folder) == []


def test_a_content_length_shorter_than_the_file_is_said_before_the_md5(server, tmp_path, monkeypatch):
    """A server (a proxy) announcing a Content-Length shorter than the body it sends: the client
    stops at the length announced, the file failed its md5 check twice and the error blamed "the
    download source or the file"; a partial kept was started over for it. Now the length announced
    is checked against the file's size (a 200) or the answer's Content-Range (a 206) before the
    body is read: the error names both lengths, the partial is kept, and a later run resumes it."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["short-length"] * 2
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert str(e.value).endswith("after 2 attempts: the server announced a Content-Length of 524288 bytes for "
                                 "inference_volcano_3.pt, which has at least 1048576"), str(e.value)
    assert leftovers(tmp_path / "ckpt") == []
    partial = tmp_path / "ckpt" / ".inference_volcano_3.pt.download"
    server.faults["inference_volcano_3.pt"] = ["drop@0.5"] + ["short-length"] * 2
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert "after 2 attempts: the server announced a Content-Length of 262144 bytes for bytes 524288-1048575 of " \
           "inference_volcano_3.pt (its Content-Range), which are 524288; the 524.3 KB downloaded are kept" in str(e.value)
    assert partial.read_bytes() == data[:len(data) // 2]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={len(data) // 2}-" and leftovers(tmp_path / "ckpt") == []


def test_a_file_sent_compressed_is_taken_whole_at_once(server, tmp_path, monkeypatch):
    """The client asked for any encoding (`Accept-Encoding: gzip, ...`) and a server (a proxy)
    that sent the file gzipped made every attempt fail: the bytes decoded were checked against the
    compressed Content-Length ("ended after 1048576 of 1048914 bytes"), the sidecar recorded the
    compressed size, and the resume that followed was refused (416) and started over. The file is
    asked for as it is (`identity`), and one compressed all the same is taken as of unknown size:
    one request, verified, nothing logged."""
    data = bytes(range(256)) * 4096  # (compressible)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["gzip"]
    logs = []
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert len(server.requests) == 1 and logs == [] and leftovers(tmp_path / "ckpt") == []
    assert server.encodings == ["identity"]


def test_a_partial_holding_the_whole_file_is_checked_not_downloaded_again(server, tmp_path, monkeypatch):
    """A server that announced more bytes than the file has (its Content-Length) sent them all,
    then closed: the partial held the whole file, the request for the rest was answered 416 Range
    Not Satisfiable (`bytes */SIZE`: nothing past it), and the file was downloaded again from
    byte 0. A 416 saying the file ends where the partial does means the partial is whole: its md5
    is checked and it is put in place, nothing sent twice."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["long-length"]
    logs = []
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert server.ranges == [None, f"bytes={len(data)}-"] and server.sent == len(data)
    assert logs[-1] == (f"{server.endpoint}/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt has no bytes of "
                        "inference_volcano_3.pt past the 1.0 MB downloaded; checking them")
    assert leftovers(tmp_path / "ckpt") == []


def test_a_download_of_unknown_size_is_retried_from_the_start(server, tmp_path, monkeypatch):
    """A server that gives no Content-Length, then resets the connection: the retry failed on the
    'resuming ... of <unknown size>' line until the retries ran out, and the error said the bytes
    were kept for the next run. A range answer cannot be checked without the size: the retry
    downloads from the start, and a failure keeps nothing."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["unsized+reset@0.5", "unsized"]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges == [None, None] and leftovers(tmp_path / "ckpt") == []
    (tmp_path / "ckpt" / "inference_volcano_3.pt").unlink()
    server.faults["inference_volcano_3.pt"] = ["unsized+reset@0.5", "error"]
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert str(e.value).endswith("after 2 attempts: HTTP 500 Internal Server Error")
    assert leftovers(tmp_path / "ckpt") == []


def test_a_partial_of_another_file_version_is_not_resumed(server, tmp_path, monkeypatch):
    """A temporary left by an older run for another md5 (a changed OFFICIAL_FILES entry), or by a
    version of this code that kept no sidecar, is started over, never resumed; one whose kept
    bytes are damaged is resumed, fails the md5 check and is downloaded once more from zero."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tmp, meta = folder / ".inference_volcano_3.pt.download", folder / ".inference_volcano_3.pt.download.json"
    for sidecar in ({"md5": "0" * 32, "size": len(data)}, None):
        tmp.write_bytes(os.urandom(len(data) // 2))
        if sidecar:
            meta.write_text(json.dumps(sidecar))
        path = fetch(server, tmp_path, "inference_volcano_3")
        assert path.read_bytes() == data and server.ranges[-1] is None and leftovers(folder) == []
        path.unlink()
    tmp.write_bytes(os.urandom(len(data) // 2))
    meta.write_text(json.dumps({"md5": hashlib.md5(data).hexdigest(), "size": len(data)}))
    server.ranges.clear()
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges == [f"bytes={len(data) // 2}-", None] and leftovers(folder) == []


DOWNLOADER = """
import sys
from model import hub
name, md5, size = sys.argv[3:6]
hub.OFFICIAL_FILES[name] = hub.OfficialFile(name, md5, int(size), "test")
path = hub.official_file(name, sys.argv[1], endpoint=sys.argv[2], progress=False, backoff=0, log=print)
print("done", hub.file_digest(path) == md5, flush=True)
"""


def downloader(server, folder, name, data, env=None):
    """A process downloading `name` from `server` into `folder` (prints its log, then 'done True'
    when what it returned is the verified file), with `env` added to its environment."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-c", DOWNLOADER, str(folder), server.endpoint, name,
                             hashlib.md5(data).hexdigest(), str(len(data))], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait_for(check, child, what):
    deadline = time.monotonic() + 30
    while not check():
        assert child.poll() is None and time.monotonic() < deadline, f"{what}: {child.communicate()[0]}"
        time.sleep(0.01)


def test_a_killed_download_is_resumed_by_the_next_run(server, tmp_path, monkeypatch):
    """A process killed (SIGKILL) during a download left a temporary that the next run started
    over: the next run resumes it at the bytes kept, with one log line saying so."""
    data = os.urandom(4 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.rate = 4 << 20
    tmp = tmp_path / "ckpt" / ".inference_volcano_3.pt.download"
    child = downloader(server, tmp_path / "ckpt", "inference_volcano_3", data)
    try:
        wait_for(lambda: tmp.exists() and tmp.stat().st_size >= 1 << 20, child, "no download seen")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    server.rate = None
    kept, logs = tmp.stat().st_size, []
    assert 0 < kept < len(data)
    path = fetch(server, tmp_path, "inference_volcano_3", log=logs.append)
    assert path.read_bytes() == data and leftovers(path.parent) == []
    assert server.ranges == [None, f"bytes={kept}-"] and server.sent < 1.3 * len(data)
    assert logs == [f"resuming inference_volcano_3.pt at {hub._human(kept)} of 4.2 MB"]


def test_a_stalled_server_fails_the_attempt_after_a_timeout_that_is_said_and_can_be_set(server, tmp_path,
                                                                                        monkeypatch):
    """A server that sent headers (and part of the file), then nothing, held each attempt for a
    fixed 60 s, and the error said only "timed out". The wait is HF_HUB_DOWNLOAD_TIMEOUT's
    (huggingface_hub's variable; 60 s unset), the error says how long it waited and what sets it,
    and keeps what came for the next run; a value that is not a whole number of seconds > 0 is one
    error naming the variable, before any request."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["stall@0.5"] * 3
    folder = tmp_path / "ckpt"
    child = downloader(server, folder, "inference_volcano_3", data, env={"HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    try:
        out = child.communicate(timeout=30)[0]
    finally:
        child.kill()
    partial = folder / ".inference_volcano_3.pt.download"
    assert out.splitlines()[-1] == (
        f"model.hub.WeightsError: could not download inference_volcano_3.pt from {server.endpoint}/si-pbc/hertz-dev/"
        "resolve/main/inference_volcano_3.pt after 3 attempts: no data from the server for 1 s "
        f"(HF_HUB_DOWNLOAD_TIMEOUT sets how long to wait); the 524.3 KB downloaded are kept in {partial} and the "
        "next run resumes from there"), out
    assert partial.read_bytes() == data[:len(data) // 2]
    requests = len(server.requests)
    for value in ("soon", "0.5", "0"):
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", value)
        with pytest.raises(WeightsError) as e:
            fetch(server, tmp_path, "inference_volcano_3")
        assert str(e.value) == f"HF_HUB_DOWNLOAD_TIMEOUT: expected a whole number of seconds > 0, got {value!r}"
    assert len(server.requests) == requests
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT")
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={len(data) // 2}-"


def test_a_bad_download_timeout_is_said_before_a_file_in_place_is_hashed(server, tmp_path, monkeypatch):
    """A bad HF_HUB_DOWNLOAD_TIMEOUT was found only once a file was known to be missing: after
    hashing a file in place not yet recorded as verified (minutes for 27 GB), and not at all when
    its md5 matched. Now it is one error before any hashing whenever the run could download (a file
    not recorded as verified); offline, or with every file recorded as verified, it is not read."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "inference_volcano_3.pt"
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "abc")
    for body in (data, bytes(reversed(data))):  # in place and right (not yet recorded), or corrupt
        path.write_bytes(body)
        logs = []
        with pytest.raises(WeightsError) as e:
            fetch(server, tmp_path, "inference_volcano_3", log=logs.append)
        assert str(e.value) == "HF_HUB_DOWNLOAD_TIMEOUT: expected a whole number of seconds > 0, got 'abc'"
        # not hashed: no record written for the right file, no md5 said of the corrupt one
        assert not (folder / ".verified.json").exists() and logs == [] and server.requests == []
    path.write_bytes(data)
    assert hub.official_file("inference_volcano_3", folder, offline=True, progress=False) == path  # offline: hashed
    assert fetch(server, tmp_path, "inference_volcano_3") == path  # recorded as verified: nothing to download
    assert server.requests == []


@pytest.fixture
def unaccepting():
    """`(host, port)` of a real loopback socket that listens and never accepts, its queue filled:
    a connection to it is never made (its SYNs go unanswered, as to a blackholed address)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    yield listener.getsockname()
    for s in (*fillers, listener):
        s.close()


def test_a_connect_timeout_says_it_could_not_connect(server, tmp_path, monkeypatch, unaccepting):
    """A server that never accepted the connection was said as "no data from the server for N s",
    the words of a server that stopped sending after its headers. Now the error says the
    connection could not be made, to which host, within how long; also where the Hub's redirect led."""
    data = os.urandom(1 << 10)
    register(monkeypatch, "inference_volcano_3", data)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    host, port = unaccepting
    nowhere = f"http://{host}:{port}"
    said = f"could not connect to {host}:{port} within 1 s (HF_HUB_DOWNLOAD_TIMEOUT sets how long to wait)"
    logs = []
    with pytest.raises(WeightsError) as e:
        hub.official_file("inference_volcano_3", tmp_path / "ckpt", endpoint=nowhere, progress=False, backoff=0,
                          retries=2, log=logs.append)
    assert str(e.value) == (f"could not download inference_volcano_3.pt from {nowhere}/si-pbc/hertz-dev/resolve/main/"
                            f"inference_volcano_3.pt after 2 attempts: {said}")
    assert logs == [f"download of inference_volcano_3.pt failed ({said}); retrying in 0.0s (1/2)"]
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = [f"redirect:{nowhere}/file"]
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    assert str(e.value).endswith(f"after 1 attempts: {said}") and len(server.requests) == 1
    assert leftovers(tmp_path / "ckpt") == []


def test_ctrl_c_while_the_server_stalls_keeps_the_partial_and_says_so(server, tmp_path, monkeypatch):
    """Ctrl-C while a stalled server keeps the download waiting: the bytes that came were kept,
    but nothing said so (a KeyboardInterrupt from inside the client). Now one line says the
    download was interrupted, how much is kept where, and that the next run resumes it; it does."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["stall@0.5"]
    folder = tmp_path / "ckpt"
    child = downloader(server, folder, "inference_volcano_3", data)
    try:
        wait_for(lambda: server.sent >= len(data) // 2, child, "no download seen")
        time.sleep(0.5)  # (the client holds them, waiting for more)
        child.send_signal(signal.SIGINT)
        out = child.communicate(timeout=30)[0]
    finally:
        child.kill()
    partial = folder / ".inference_volcano_3.pt.download"
    assert (f"download of inference_volcano_3.pt interrupted; the 524.3 KB downloaded are kept in {partial} and the "
            "next run resumes from there") in out.splitlines(), out
    assert out.splitlines()[-1] == "KeyboardInterrupt" and partial.read_bytes() == data[:len(data) // 2]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={len(data) // 2}-" and leftovers(folder) == []


def test_a_partial_left_beside_a_file_put_in_place_by_hand_is_removed(server, tmp_path, monkeypatch):
    """A download killed (SIGKILL) left its temporary and sidecar; the file then put in place by
    hand (and verified) never made anything look at them again: they stayed for good. The next
    load removes them, under the partial's lock, with one log line; one a live process holds
    (locked) is left to it, silently, and the file is returned without waiting for it."""
    import fcntl
    data = os.urandom(4 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.rate = 4 << 20
    folder = tmp_path / "ckpt"
    tmp, meta = folder / ".inference_volcano_3.pt.download", folder / ".inference_volcano_3.pt.download.json"
    child = downloader(server, folder, "inference_volcano_3", data)
    try:
        wait_for(lambda: tmp.exists() and tmp.stat().st_size >= 1 << 20, child, "no download seen")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    kept = tmp.stat().st_size
    assert meta.is_file() and 0 < kept < len(data)
    (folder / "inference_volcano_3.pt").write_bytes(data)  # (by hand)
    held = tmp.open("r+b")  # a live process' lock on it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    logs = []
    try:
        assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    finally:
        held.close()
    assert logs == [] and tmp.stat().st_size == kept and meta.is_file()
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data
    assert leftovers(folder) == [] and len(server.requests) == 1
    assert logs == [f"removed .inference_volcano_3.pt.download ({hub._human(kept)}) and its sidecar from {folder}: a "
                    "partial download an earlier run left, which nothing resumes now that inference_volcano_3.pt is "
                    "in place and verified"]
    assert fetch(server, tmp_path, "inference_volcano_3", log=logs.append).read_bytes() == data and len(logs) == 1


def test_a_record_temporary_of_a_process_killed_before_its_rename_is_removed(server, tmp_path, monkeypatch):
    """The record of verified files was written to `.verified.json.<pid>.tmp` and renamed: a
    process SIGKILLed between the two left the temporary for good. It is locked by its writer until
    renamed, and the next process reading the record removes it; a live writer's stays."""
    from killed_writer import killed_writer, stopped_writer
    data = b"weights" * 1000
    register(monkeypatch, "inference_volcano_3", data)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "inference_volcano_3.pt").write_bytes(data)  # (copied by hand)
    code = (f"from model.hub import _Verified\nfolder = pathlib.Path({str(folder)!r})\n"
            "_Verified(folder).add(folder / 'inference_volcano_3.pt', 'e' * 32)\n")
    live, held = stopped_writer(code, ".verified.json")
    dead = folder / killed_writer(code, ".verified.json")
    try:
        assert dead.is_file() and (folder / held).is_file()
        assert fetch(server, tmp_path, "inference_volcano_3") == folder / "inference_volcano_3.pt"
        assert not dead.exists(), "the temporary of the killed process is still there"
        assert leftovers(folder) == [held], "the temporary of a live writer was removed"
    finally:
        live.kill()
        live.communicate()
    assert fetch(server, tmp_path, "inference_volcano_3") and leftovers(folder) == []
    assert server.requests == []


def test_two_processes_downloading_one_file_share_one_download(server, tmp_path, monkeypatch):
    """Two processes downloading the same file at once wrote the same temporary: the second
    truncated the first's, the first renamed a file with a hole in it into place and returned it,
    the second failed with a FileNotFoundError traceback. Now the second waits (one log line) and
    finds the verified file in place; when the first is killed, the second takes its partial over."""
    data = os.urandom(3 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.rate = 1 << 20  # (3 s: the second starts while the first downloads)
    folder = tmp_path / "ckpt"
    tmp = folder / ".inference_volcano_3.pt.download"
    first = downloader(server, folder, "inference_volcano_3", data)
    wait_for(lambda: tmp.exists(), first, "no download seen")
    second = downloader(server, folder, "inference_volcano_3", data)
    out = [p.communicate()[0] for p in (first, second)]
    assert out[0].splitlines()[-1] == "done True" and out[1].splitlines()[-1] == "done True", out
    assert out[1].splitlines()[0] == (f"another process is downloading inference_volcano_3.pt into {folder}; "
                                      "waiting for it")
    assert (folder / "inference_volcano_3.pt").read_bytes() == data and leftovers(folder) == []
    assert len(server.requests) == 1 and server.sent == len(data)
    (folder / "inference_volcano_3.pt").unlink()
    first = downloader(server, folder, "inference_volcano_3", data)
    try:
        wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, first, "no download seen")
        second = downloader(server, folder, "inference_volcano_3", data)
        assert second.stdout.readline().startswith("another process is downloading")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    server.rate = None
    out = second.communicate()[0].splitlines()
    assert len(server.ranges) == 3 and re.fullmatch(r"bytes=\d+-", server.ranges[2])
    kept = int(server.ranges[2][6:-1])  # (what the first had written when it was killed)
    assert out == [f"resuming inference_volcano_3.pt at {hub._human(kept)} of 3.1 MB", "done True"] and kept > 0
    assert (folder / "inference_volcano_3.pt").read_bytes() == data and leftovers(folder) == []


def test_retries_are_bounded(server, tmp_path, monkeypatch):
    data = bytes(range(256)) * 4096
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["truncate"] + ["error"] * 10
    with pytest.raises(WeightsError, match="after 2 attempts: .*; the 524.3 KB downloaded are kept in .*"
                                           r"\.inference_volcano_3\.pt\.download and the next run resumes from there$"):
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert len(server.requests) == 2
    assert not (tmp_path / "ckpt" / "inference_volcano_3.pt").exists()
    assert leftovers(tmp_path / "ckpt") == [".inference_volcano_3.pt.download", ".inference_volcano_3.pt.download.json"]
    server.faults.clear()  # the next run asks for the rest
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges == [None, "bytes=524288-", "bytes=524288-"] and server.sent == len(data)
    assert leftovers(tmp_path / "ckpt") == []


def test_an_http_4xx_is_not_retried_and_any_error_is_one_line(server, tmp_path, monkeypatch):
    """A 404 was asked for three times (with backoff), and the client's message spans two lines
    (it ends with a link): one request, one line naming the URL and the status; a 500 is still
    retried, its message one line."""
    data = b"x" * 100
    register(monkeypatch, "inference_volcano_3", data)
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3")
    assert len(server.requests) == 1 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{server.endpoint}/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt "
                                   "answered HTTP 404 Not Found; check HF_ENDPOINT")
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["error"] * 3
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3", retries=3)
    assert len(server.requests) == 4 and str(e.value).endswith("after 3 attempts: HTTP 500 Internal Server Error")


def test_a_redirect_is_followed_and_an_error_after_it_names_where_it_led(server, tmp_path, monkeypatch):
    """The Hub answers with a redirect to its file store, whose URL may hold odd characters (a
    space, an é, sent unencoded) and a signed query: it is followed. An HTTP 4xx from where it led
    was said as the first URL's answer ("check HF_ENDPOINT and the access token"), for a file the
    endpoint did have; the error names where the redirect led, without its query (a signature)."""
    data = os.urandom(1 << 16)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.aliases["/cdn/we%20ird%C3%A9/x.pt?X-Amz-Signature=a%2Fb"] = "inference_volcano_3.pt"
    server.faults["inference_volcano_3.pt"] = ["redirect:/cdn/we ird\u00e9/x.pt?X-Amz-Signature=a%2Fb"]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.requests[-1] == "/cdn/we%20ird%C3%A9/x.pt?X-Amz-Signature=a%2Fb"
    (tmp_path / "ckpt" / "inference_volcano_3.pt").unlink()
    server.faults["inference_volcano_3.pt"] = ["redirect:/cdn/gone.pt?X-Amz-Signature=secret"]
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3")
    assert str(e.value).startswith(f"{server.endpoint}/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt "
                                   f"(redirected to {server.endpoint}/cdn/gone.pt) answered HTTP 404 Not Found; ")
    assert "secret" not in str(e.value)


def test_an_answer_that_is_neither_the_file_nor_part_of_it_is_said_as_such(server, tmp_path, monkeypatch):
    """An answer other than 200 or 206 below 400 (a redirect without a Location, a 204 No Content)
    was taken for the file: its empty body ended as an md5 mismatch (or a Content-Length "of 0
    bytes"). It is a failed attempt naming the status; a partial kept stays for the next run."""
    data = os.urandom(1 << 16)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    for status, reason in ((302, "Found"), (204, "No Content")):
        server.faults["inference_volcano_3.pt"] = [f"status:{status}"] * 2
        with pytest.raises(WeightsError) as e:
            fetch(server, tmp_path, "inference_volcano_3", retries=2)
        assert str(e.value).endswith(f"after 2 attempts: the server answered HTTP {status} {reason}, not the file")
        assert leftovers(tmp_path / "ckpt") == []
    server.faults["inference_volcano_3.pt"] = ["drop@0.5", "status:204"]
    with pytest.raises(WeightsError, match="answered HTTP 204 No Content, not the file; the 32.8 KB downloaded are kept"):
        fetch(server, tmp_path, "inference_volcano_3", retries=2)
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={len(data) // 2}-"


def test_a_web_page_instead_of_the_file_is_one_error_and_keeps_the_partial(server, tmp_path, monkeypatch):
    """A 200 with an HTML page (a captive portal, a proxy's sign-in, a mirror's "not found" page)
    was taken for the file: a partial kept from an earlier run was started over, replaced by the
    page, which was asked for once more on its md5 mismatch, and the error said the source or the
    file was corrupt. Now the page is one error naming what came, at once; the partial is kept,
    and the next run resumes it."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    server.faults["inference_volcano_3.pt"] = ["drop@0.5"]
    with pytest.raises(WeightsError, match="after 1 attempts"):
        fetch(server, tmp_path, "inference_volcano_3", retries=1)
    partial = tmp_path / "ckpt" / ".inference_volcano_3.pt.download"
    assert partial.read_bytes() == data[:len(data) // 2]
    server.faults["inference_volcano_3.pt"] = ["page"]
    url = f"{server.endpoint}/si-pbc/hertz-dev/resolve/main/inference_volcano_3.pt"
    with pytest.raises(WeightsError) as e:
        fetch(server, tmp_path, "inference_volcano_3")
    assert str(e.value) == (f"{url} answered a web page (text/html; charset=utf-8, 60 B), not inference_volcano_3.pt: "
                            "check HF_ENDPOINT and the network (a proxy or a captive portal asking to sign in?), or "
                            "download inference_volcano_3.pt from https://huggingface.co/si-pbc/hertz-dev into "
                            f"{tmp_path / 'ckpt'}/")
    assert len(server.requests) == 2 and partial.read_bytes() == data[:len(data) // 2]
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.ranges[-1] == f"bytes={len(data) // 2}-" and leftovers(tmp_path / "ckpt") == []


def test_a_file_where_the_folder_goes_is_one_error(server, tmp_path, monkeypatch):
    """ckpt_dir naming a file (or a folder under one) was a FileExistsError or NotADirectoryError
    traceback, and a folder under the official file's name an IsADirectoryError after the whole
    download: a WeightsError naming what is in the way, before any request."""
    register(monkeypatch, "inference_volcano_3", b"x")
    (tmp_path / "ckpt").write_text("not a folder")
    for folder in (tmp_path / "ckpt", tmp_path / "ckpt" / "sub"):
        with pytest.raises(WeightsError) as e:
            hub.official_file("inference_volcano_3", folder, endpoint=server.endpoint, progress=False)
        assert str(e.value) == (f"cannot write {folder / 'inference_volcano_3.pt'}: {tmp_path / 'ckpt'} is a file, "
                                "not a folder; choose another folder for the official weights (ckpt_dir)")
    assert server.requests == []
    (tmp_path / "ckpt").unlink()
    (tmp_path / "ckpt" / "inference_volcano_3.pt").mkdir(parents=True)  # a folder under the file's name
    server.add("inference_volcano_3.pt", b"x")
    with pytest.raises(WeightsError) as e:  # (was IsADirectoryError, after the whole download)
        hub.official_file("inference_volcano_3", tmp_path / "ckpt", endpoint=server.endpoint, progress=False)
    assert str(e.value) == (f"cannot write {tmp_path / 'ckpt' / 'inference_volcano_3.pt'}: a folder is in its place; "
                            "move it away or choose another folder for the official weights (ckpt_dir)")
    assert server.requests == [] and leftovers(tmp_path / "ckpt") == []


@pytest.fixture
def mount(tmp_path):
    """`mount(options)`: a real tmpfs (read-only, or small) under tmp_path; needs the right to
    mount (root in a container)."""
    mounted = []

    def make(options):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(folder)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_without_room_is_said_before_downloading_and_a_full_one_is_not_retried(server, tmp_path, monkeypatch,
                                                                                      mount):
    """A full disk was retried three times (each download filling it again) and reported as a
    failed download: a folder with less room than the file needs is refused before the first
    request, and a disk that fills up anyway (the file larger than recorded) ends at once, naming
    the file and the room it needs, keeping what fit for the next run to resume; a read-only folder
    is named as such (it raised an OSError traceback from removing a temporary that was never made),
    before any request."""
    data = bytes(range(256)) * 4096  # 1 MiB
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    small = mount("size=256k")
    with pytest.raises(WeightsError, match=r"has 2\d\d\.\d KB free and inference_volcano_3.pt \(test\) needs about "
                                           r"1\.0 MB: free space there or choose another folder \(ckpt_dir\)$"):
        hub.official_file("inference_volcano_3", small, endpoint=server.endpoint, progress=False, backoff=0)
    assert server.requests == []
    monkeypatch.setitem(hub.OFFICIAL_FILES, "inference_volcano_3",  # recorded smaller than it is
                        OfficialFile("inference_volcano_3", hashlib.md5(data).hexdigest(), 1000, "test"))
    with pytest.raises(WeightsError) as e:
        hub.official_file("inference_volcano_3", small, endpoint=server.endpoint, progress=False, backoff=0)
    assert re.fullmatch(re.escape(f"cannot write {small / 'inference_volcano_3.pt'}: No space left on device; "
                                  "inference_volcano_3.pt needs about 1.0 MB: free space there or choose another "
                                  "folder (ckpt_dir) (the ")
                        + r"2\d\d\.\d KB downloaded are kept for the next run to resume\)",
                        str(e.value)), str(e.value)
    assert len(server.requests) == 1
    assert sorted(p.name for p in small.iterdir()) == [".inference_volcano_3.pt.download",
                                                       ".inference_volcano_3.pt.download.json"]
    read_only = mount("ro,size=4m")
    with pytest.raises(WeightsError) as e:
        hub.official_file("inference_volcano_3", read_only, endpoint=server.endpoint, progress=False, backoff=0)
    assert str(e.value) == (f"cannot write {read_only / 'inference_volcano_3.pt'}: Read-only file system; choose a "
                            "folder this process can write (ckpt_dir)")
    assert len(server.requests) == 1


def test_a_disk_without_room_for_all_the_files_is_said_before_the_first(server, tmp_path, monkeypatch, mount):
    """Room was checked one file at a time, before each download: a disk with room for the 27 GB
    LM but not for the resynthesizer after it was found once the LM was downloaded. Now the room
    all the missing files need (less what their partials hold) is checked before the first request."""
    data = {name: os.urandom(1 << 20) for name in ("inference_volcano_3", "inference_apatosaurus_95000")}
    for name, body in data.items():
        register(monkeypatch, name, body)
        server.add(f"{name}.pt", body)
    small = mount("size=1600k")
    with pytest.raises(WeightsError) as e:
        hub.official_files(list(data), small, endpoint=server.endpoint, progress=False, backoff=0)
    assert re.fullmatch(r"\S+ has 1\.6 MB free and inference_volcano_3\.pt \(test\), inference_apatosaurus_95000\.pt "
                        r"\(test\) need about 2\.1 MB: free space there or choose another folder \(ckpt_dir\)",
                        str(e.value)), str(e.value)
    assert server.requests == [] and list(small.iterdir()) == []


def test_loading_an_official_variant_checks_the_room_for_the_codec_too(server, monkeypatch, mount):
    """load_hertz_dev asked for the quantizer, LM and resynthesizer in one call and for the codec in
    another: a disk with room for the transformer's files but not the codec's was found only after
    the transformer's were downloaded. All four are asked for at once."""
    data = {name: os.urandom(400 << 10) for name in ("inference_volcano_3", "inference_scion_54000",
                                                     "inference_care_50000", "inference_apatosaurus_95000")}
    for name, body in data.items():
        register(monkeypatch, name, body)
        server.add(f"{name}.pt", body)
    small = mount("size=1400k")  # room for three of the files
    with pytest.raises(WeightsError, match=r"inference_apatosaurus_95000\.pt \(test\) need about 1\.6 MB"):
        load_hertz_dev("duplex", ckpt_dir=small, endpoint=server.endpoint)
    assert server.requests == [] and list(small.iterdir()) == []


def test_corrupt_local_file_is_replaced(server, tmp_path, monkeypatch):
    data = b"good" * 100
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "inference_volcano_3.pt").write_bytes(b"bad" * 100)
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data


def test_offline_with_the_file_present(server, tmp_path, monkeypatch):
    data = b"x" * 10
    register(monkeypatch, "inference_volcano_3", data)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "inference_volcano_3.pt").write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
    assert server.requests == []


def test_offline_with_files_absent_names_each_one(server, tmp_path):
    with pytest.raises(WeightsError) as e:
        hub.official_files(["inference_scion_54000", "inference_care_50000"], tmp_path / "ckpt", offline=True,
                           endpoint=server.endpoint)
    msg = str(e.value)
    for needle in ("inference_scion_54000.pt", "27.0 GB", "inference_care_50000.pt", "6.6 GB",
                   str((tmp_path / "ckpt").resolve()), "si-pbc/hertz-dev"):
        assert needle in msg
    assert server.requests == []


def test_the_offline_error_names_a_partial_download_and_what_a_run_online_does_with_it(tmp_path, monkeypatch):
    """A download cut off by the server dying mid-file, the machine then offline: the offline error
    listed the missing file but not the partial download beside it. It names the temporary, how much
    it holds, and that a run online resumes it; or, for one that cannot be resumed (no sidecar), that
    the file is downloaded from the start. Each claim then checked against a run online."""
    data = os.urandom(1 << 20)
    register(monkeypatch, "inference_volcano_3", data)
    folder = tmp_path / "ckpt"
    tmp = (folder / ".inference_volcano_3.pt.download").resolve()
    with HubServer() as dying:
        dying.add("inference_volcano_3.pt", data)
        dying.faults["inference_volcano_3.pt"] = ["drop@0.5"]
        dead = []

        def log(message):  # the server dies at the first failure: the retries find no one
            if "failed" in message and not dead:
                dying.httpd.server_close()  # (its port closed: connections are refused)
                dead.append(True)

        with pytest.raises(WeightsError, match=f"Connection refused; the 524.3 KB downloaded are kept in "
                                               f"{re.escape(str(tmp))} and the next run resumes from there"):
            fetch(dying, tmp_path, "inference_volcano_3", log=log)
    assert tmp.stat().st_size == len(data) // 2

    def offline_error():
        with pytest.raises(WeightsError) as e:
            hub.official_file("inference_volcano_3", folder, offline=True, progress=False)
        return str(e.value)

    assert (f"\n    a partial download of it, {tmp} (524.3 KB of 1.0 MB), is kept: a run without offline mode resumes "
            "it from there\n") in offline_error()
    with HubServer() as server:  # online again: resumed, as said
        server.add("inference_volcano_3.pt", data)
        assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
        assert server.ranges == [f"bytes={len(data) // 2}-"]
        (folder / "inference_volcano_3.pt").unlink()
        tmp.write_bytes(data[:1000])  # a partial without its sidecar (another version of this code's)
        assert (f"\n    a partial download of it, {tmp} (1.0 KB), cannot be resumed (its "
                ".inference_volcano_3.pt.download.json is missing or names another version of the file): a run "
                "without offline mode downloads it from the start\n") in offline_error()
        server.ranges.clear()
        assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data
        assert server.ranges == [None]  # from the start, as said
    (folder / "inference_volcano_3.pt").unlink()
    assert "partial" not in offline_error()  # none left


@torch.no_grad()
def test_official_variant_loads_strict_from_the_server(server, tmp_path, monkeypatch):
    """The whole official path (download, verify, meta build, mmap + assign, strict) with files
    in the official layout at the parity size; outputs match the original's."""
    require(PARITY_DIR)
    files = {"inference_volcano_3": "quantizer_state_dict.pt", "inference_scion_54000": "lm_duplex_state_dict.pt",
             "inference_care_50000": "resynthesizer_duplex_state_dict.pt",
             "inference_apatosaurus_95000": "codec_state_dict.pt"}
    for name, fixture in files.items():
        register(monkeypatch, name, server.add(f"{name}.pt", PARITY_DIR / fixture))
    model = load_hertz_dev("duplex", ckpt_dir=tmp_path / "ckpt", endpoint=server.endpoint,
                           config=transformer_config(True), codec_config=codec_config())
    assert len(server.requests) == 4
    io = load("transformers_duplex_io.pt")
    for got, want in zip(model.lm(io["latents"]), io["lm_logits"]):
        assert rel_err(got, want) <= 1e-4
    audio = load("codec_io.pt")
    assert rel_err(model.codec.encode(audio["audio"])[0], audio["mu"]) <= 1e-4
    # A second load is offline-capable: everything is already verified in ckpt/.
    load_hertz_dev("duplex", ckpt_dir=tmp_path / "ckpt", offline=True, config=transformer_config(True),
                   codec_config=codec_config())
    assert len(server.requests) == 4


def test_unknown_variant():
    with pytest.raises(FileNotFoundError, match="mono-pure-audio"):
        load_hertz_dev("stereo")


@pytest.mark.parametrize("variable, value", [("HF_HUB_OFFLINE", "ON"), ("HF_HUB_OFFLINE", "True"),
                                             ("TRANSFORMERS_OFFLINE", "1")])
def test_offline_is_read_from_the_environment_as_huggingface_hub_reads_it(server, tmp_path, monkeypatch, variable,
                                                                           value):
    """huggingface_hub blocks every request when HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) is 1, ON,
    YES or TRUE in any case; only 1, true and yes of HF_HUB_OFFLINE counted as offline here, so the
    others were three failed attempts (3 s of waits) ending in advice to unset HF_HUB_OFFLINE. Now
    they are the offline error that names each missing file, at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(WeightsError, match="offline mode and these official hertz-dev files are missing"):
        hub.official_files(["inference_volcano_3"], tmp_path / "ckpt", endpoint=server.endpoint, progress=False)
    assert server.requests == []
    monkeypatch.setenv(variable, "0")
    data = b"w" * 100
    register(monkeypatch, "inference_volcano_3", data)
    server.add("inference_volcano_3.pt", data)
    assert fetch(server, tmp_path, "inference_volcano_3").read_bytes() == data


def test_downloading_where_the_environment_sets_offline_is_one_error_not_retried(server, tmp_path):
    """`offline=False` asked for where the environment sets offline mode, which huggingface_hub then
    enforces on every request: one WeightsError saying so, not three attempts."""
    data = b"w" * 100
    code = ("import sys, hashlib; from model import hub; from model.hub import OfficialFile\n"
            f"hub.OFFICIAL_FILES['inference_volcano_3'] = OfficialFile('inference_volcano_3', "
            f"'{hashlib.md5(data).hexdigest()}', {len(data)}, 'test')\n"
            "try:\n"
            f"    hub.official_file('inference_volcano_3', sys.argv[1], offline=False, endpoint='{server.endpoint}', "
            "progress=False)\n"
            "except hub.WeightsError as e:\n"
            "    print('WeightsError:', e)\n")
    server.add("inference_volcano_3.pt", data)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=os.path.dirname(os.path.dirname(__file__)),
                       timeout=120)
    assert r.stdout.startswith("WeightsError: cannot download inference_volcano_3.pt: the environment sets offline "
                               "mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"), r.stdout + r.stderr[-2000:]
    assert "retrying" not in r.stdout + r.stderr and server.requests == []
    assert time.monotonic() - start < 60


def test_a_ckpt_dir_under_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """`--ckpt-dir=~/ckpt` reaches the code with its `~` (the shell expands it only as a word's
    start): it named a folder `~` in the working directory, where online 34 GB would have gone."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = b"w" * 100
    register(monkeypatch, "inference_volcano_3", data)
    (tmp_path / "home" / "ckpt").mkdir(parents=True)
    (tmp_path / "home" / "ckpt" / "inference_volcano_3.pt").write_bytes(data)
    assert hub.official_file("inference_volcano_3", "~/ckpt", offline=True, progress=False) == \
        tmp_path / "home" / "ckpt" / "inference_volcano_3.pt"
    with pytest.raises(WeightsError, match=re.escape(f"put them in {tmp_path / 'home' / 'ckpt'}/")):
        hub.official_files(["inference_scion_54000"], "~/ckpt", offline=True)
    assert not (tmp_path / "~").exists()


def test_files_verified_by_processes_at_once_are_all_recorded(tmp_path):
    """Two processes recording files they verified at the same moment: each read the record, added
    its file and renamed its copy into place, so one's record was lost (in a third of tries), and
    that file (27 GB) hashed again at the next load. The read, merge and rename are under a lock."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    code = ("import sys, time; from pathlib import Path; from model.hub import _Verified\n"
            "folder, who, at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])\n"
            "files = [folder / f'{who}{i}.pt' for i in range(25)]\n"
            "[f.write_bytes(b'x') for f in files]\n"
            "while time.time() < at: pass\n"
            "for f in files: _Verified(folder).add(f, 'md5')\n")
    at = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), who, str(at)],
                              cwd=os.path.dirname(os.path.dirname(__file__))) for who in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    record = json.loads((folder / ".verified.json").read_text())
    assert sorted(record) == sorted(f"{who}{i}.pt" for who in "ab" for i in range(25))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".verified.json"]
