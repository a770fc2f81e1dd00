"""A trainer under torchrun for the tests: two CPU ranks (gloo) in a process group of their own, so
a test can kill the whole launch; and the `error:` lines of its output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, args) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 SCRIPT ARGS` in the repository, one OpenMP thread a
    rank, stdout and stderr together as text."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             script] + [str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def error_lines(out: str) -> list[str]:
    """Each `error: ...` of a launch's output, from its `error: ` on (a rank's prefix and a
    progress bar's carriage returns left out)."""
    return [line[line.index("error: "):] for line in out.replace("\r", "\n").splitlines() if "error: " in line]
