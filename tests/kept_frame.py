"""`python tests/kept_frame.py SCRIPT ARGS...`: run SCRIPT's `main(ARGS)` (train_codec,
train_transformer) in this process with its frame kept after it returns, as a library holding
objects in a reference cycle with it does (matplotlib's layout code did: the frames of a
`plot_metrics` call), then print one JSON line: the data-loading worker processes still running."""
import json
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
script = __import__(sys.argv[1])
kept = []


def keep(frame, event, arg):
    """Keeps main's frame from its call on: the frame object of a running function outlives its
    return holding every local (Python copies them into it), the frame a `return` event would
    catch; the profile hook, which slowed every call of the run, is removed at once."""
    if event == "call" and frame.f_code is script.main.__code__:
        kept.append(frame)
        sys.setprofile(None)


sys.setprofile(keep)
script.main(sys.argv[2:])
sys.setprofile(None)
assert kept and kept[0].f_locals, "main's frame was not kept"
print(json.dumps({"workers_running": [p.pid for p in multiprocessing.active_children()]}), flush=True)
