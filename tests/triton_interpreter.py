"""Run a script in Triton's interpreter (TRITON_INTERPRET=1, so kernels run on the CPU): the
interpreter must be switched on before Triton is imported, so each script is a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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


def interpreter_and_cuda(source: str, function: str, check):
    """The two tests of a kernel's test script `source`: `check(function(device))` in Triton's
    interpreter on the CPU (skipped without Triton), and on CUDA (skipped without a GPU). Bind them
    to names starting with test_ in the test module."""
    def in_the_interpreter():
        pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernels' interpreter")
        check(run_cases(source, function, "cpu"))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def on_cuda():
        check(run_cases(source, function, "cuda"))

    return in_the_interpreter, on_cuda
