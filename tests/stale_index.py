"""Make an audio folder's length index stale on purpose, for the tests of what reading does when
a file no longer matches the length the scan measured."""
import json
import os

from model.data import INDEX_FILENAME, _stamp


def changed_after_the_scan(folder):
    """Re-key `folder`'s `.hertz_index.json` to its files' stat as it is now, keeping the lengths it
    measured before they were rewritten: the index of a scan that ran just before the files changed
    (a file replaced mid-run), which no stat key can tell from a current one. The next scan trusts
    it, as a run's dataset trusts the scan it started with."""
    path = os.path.join(folder, INDEX_FILENAME)
    with open(path) as f:
        index = json.load(f)
    for rel, entry in index["files"].items():
        if "error" not in entry:
            entry.update(_stamp(os.stat(os.path.join(folder, rel))))
    with open(path, "w") as f:
        json.dump(index, f)
