"""Run a script in Triton's interpreter (TRITON_INTERPRET=1, so kernels run on the CPU): the
interpreter must be switched on before Triton is imported, so each script is a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreted(script: str) -> list:
    """The JSON value `script` prints last, run with Triton's interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cases(source: str, function: str, device: str):
    """`function(device)` of the test script `source` (which imports json): for "cpu" in Triton's
    interpreter, a process of its own; for a GPU in this process, the kernels compiled."""
    if device == "cpu":
        return interpreted(f"{source}\nprint(json.dumps({function}('cpu')))\n")
    scope: dict = {}
    exec(source, scope)
    return scope[function](device)
