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
    if event == "return" and frame.f_code is script.main.__code__:
        kept.append(frame)


sys.setprofile(keep)
script.main(sys.argv[2:])
sys.setprofile(None)
assert kept, "main's frame was not seen returning"
print(json.dumps({"workers_running": [p.pid for p in multiprocessing.active_children()]}), flush=True)
