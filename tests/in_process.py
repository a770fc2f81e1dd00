"""A script's `main(argv)` run in the test process, as the script itself runs it, without a
process' start (importing torch, its optimizers' Dynamo, SciPy, matplotlib: seconds a run). For
runs whose subject is not the process; what only a process shows (its signals, environment,
once-per-process warnings, what it imports) stays with real subprocesses."""
import subprocess
import warnings
from contextlib import nullcontext


def main_in_process(script: str, call, argv, capture, record_warnings: bool = True) -> subprocess.CompletedProcess:
    """`script ARGV` by `call(argv)` (its main), as `subprocess.run` returns it: stdout and stderr
    read from `capture` (pytest's capsys, or capfd for what C libraries print too); a SystemExit's
    message is what Python prints to stderr, with exit status 1; with `record_warnings`, the
    warnings raised are added to stderr as a process prints them."""
    argv = [str(a) for a in argv]
    capture.readouterr()
    with warnings.catch_warnings(record=True) if record_warnings else nullcontext([]) as caught:
        try:
            code = call(argv)
        except SystemExit as e:
            code = e.code
    out, err = capture.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess([script, *argv], code or 0, out, err)


def run_in_process(script: str, main, argv, capsys) -> subprocess.CompletedProcess:
    """A training script's `main` as the script runs it (`model.training.run_script`: a user's error
    is one `error:` line on stderr, exit status 1)."""
    from model.training import run_script
    return main_in_process(script, lambda args: run_script(lambda: main(args)), argv, capsys, record_warnings=False)
