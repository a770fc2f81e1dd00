"""A training script's `main(argv)` run in the test process, as the script itself runs it
(`model.training.run_script`: a user's error is one `error:` line on stderr, exit status 1), without
a process' start (importing torch, its optimizers' Dynamo, SciPy, matplotlib: seconds a run). For
runs whose subject is not the process; what only a process shows (its signals, environment,
once-per-process warnings) stays with real subprocesses."""
import subprocess

from model.training import run_script


def run_in_process(script: str, main, argv, capsys) -> subprocess.CompletedProcess:
    """`script ARGV` by its `main`: the exit status and what it printed, as `subprocess.run` returns them."""
    argv = [str(a) for a in argv]
    capsys.readouterr()
    try:
        run_script(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], code, printed.out, printed.err)
