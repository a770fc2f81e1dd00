"""A real writer of the project stopped between writing a temporary and renaming it into place: a
child Python process runs `code` (from the repository root) with `pathlib.Path.write_text` made to
stop, once it has written a file whose name holds `name`, until the test SIGKILLs it (what the OOM
killer, a `kill -9` or a power cut does there). The writer under test is the project's own; only
the moment is chosen."""
import os
import select
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STOP = """
import pathlib, sys, time
_write_text = pathlib.Path.write_text
def _stopping(self, *args, **kwargs):
    n = _write_text(self, *args, **kwargs)
    if {name!r} in self.name:
        print(self.name, flush=True)  # written, not renamed yet: the test kills this process now
        time.sleep(600)
    return n
pathlib.Path.write_text = _stopping
"""


def stopped_writer(code: str, name: str) -> tuple[subprocess.Popen, str]:
    """The child, stopped after writing its temporary, and the temporary's name."""
    child = subprocess.Popen([sys.executable, "-c", STOP.format(name=name) + code], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not select.select([child.stdout], [], [], 0.1)[0]:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the writer never wrote its temporary: {child.communicate()[1][-2000:]}")
    return child, child.stdout.readline().strip()


def killed_writer(code: str, name: str) -> str:
    """Run the writer, SIGKILL it between its write and its rename; the temporary it left."""
    child, temporary = stopped_writer(code, name)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    child.stderr.close()
    return temporary
