"""Fixtures shared by several test modules.

The suite runs in two processes (the README's `-n 2`): each, and every subprocess a test starts,
gets one OpenMP thread unless OMP_NUM_THREADS says otherwise, so the processes do not compete for
the cores (tiny tensors gain nothing from more threads; set before torch is imported).

Ctrl-C is Python's KeyboardInterrupt in each of them even when the suite was started in the
background of a non-interactive shell (`cmd &`), which starts it with SIGINT ignored, an
inheritance every subprocess would keep: the tests that press Ctrl-C on a trainer, the demo or the
corpus maker would see it ignored."""
import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def stop_signal_handlers_put_back():
    """Each test leaves Ctrl-C's and SIGTERM's handlers as it found them: the scripts' `main`s run in
    this process (tests/in_process.py and the tests' own `*_here` helpers) set their own, and one
    left behind would change what a later test of the same process sees (a test that checks a
    handler is put back checks it itself, before this)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core CPU: one thread is faster, and immune to other processes
    (OpenMP threads that outnumber the free cores spin and can make a step 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """The transformer trainer's tests' (test_train_transformer.py, test_finetune.py: once per
    process, not once per module): a 1.4-minute demo corpus (monologues and dialogues), a tiny random codec, a
    latents folder (encoded by the first run), and `runs`, the runs made so far by name. The corpus
    is synthesized once for the session's processes (`once.built_once`) and copied into each
    process' folder (a few MB: milliseconds), which stays the process' own."""
    import shutil
    from config.codec_config import PRESETS as CODEC_PRESETS
    from model import Codec, build, save_codec
    from once import built_once

    def synthesize(out):
        subprocess.run([sys.executable, "data/demo/prepare.py", "--minutes", "1", "--seed", "0",
                        "--out", str(out / "corpus")], cwd=REPO, check=True, capture_output=True)
    root = tmp_path_factory.mktemp("transformer")
    shutil.copytree(built_once(tmp_path_factory, "transformer-corpus", synthesize) / "corpus", root / "corpus")
    torch.manual_seed(0)
    codec = save_codec(root / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    return {"root": root, "codec": codec, "runs": {}}


@pytest.fixture
def memory_cgroup_of_2gb():
    """A command's prefix that runs it in a new memory cgroup limited to 2 GB (a child of this
    process' own, at the usual mounts: cgroup v1's memory controller, else v2 with the memory
    controller given to children), as a container's --memory or a Slurm job's --mem runs it. The
    cgroup is removed after the test. Skipped where none can be made (not root, no controller)."""
    with open("/proc/self/cgroup") as f:
        groups = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [path for _, controllers, path in groups if "memory" in controllers.split(",")]
    parent = f"/sys/fs/cgroup/memory{v1[0]}" if v1 else f"/sys/fs/cgroup{groups[-1][2]}"
    folder = Path(parent.rstrip("/")) / f"hertz_test_{os.getpid()}"
    limit = folder / ("memory.limit_in_bytes" if v1 else "memory.max")
    try:
        folder.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup in {parent}: {e.strerror}")
    try:
        try:
            limit.write_text(str(2 * 10 ** 9))
        except OSError as e:
            pytest.skip(f"cannot limit a cgroup's memory ({limit}): {e.strerror}")
        # the shell moves itself into the cgroup, then becomes the command
        yield ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(folder)]
    finally:
        folder.rmdir()
