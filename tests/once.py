"""A fixture's folder built once for a whole test session, shared by pytest-xdist's processes.

A module-scoped fixture is built again by each process (`-n 2`) that runs one of the module's
tests: a codec trained for the tests to compare against cost each process half a minute. Here the
first process to ask builds the folder, under a lock, in the temporary folder the processes of
one session share (their own folders' parent); the others wait for it and read it."""
import fcntl
import os
import shutil


def built_once(tmp_path_factory, name, build):
    """The folder `name` of this session, made by `build(folder)` once between the session's
    processes (without xdist, once in this process). A build that raised is not reused: the next
    process to ask builds again (and fails with its own message)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ... under one folder of the session
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        if not done.exists():
            if folder.exists():  # what a build that raised left
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
