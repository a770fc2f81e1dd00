"""inference.ipynb runs headless on tiny checkpoints, parameters injected after its `parameters`
cell as papermill does, and writes the completion WAV."""
import json
from pathlib import Path

import nbformat
import pytest
import soundfile as sf
from nbclient import NotebookClient

from test_complete import make_checkpoints

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "inference.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["duplex", "mono"])
def test_notebook_runs_headless(variant, tmp_path):
    paths = make_checkpoints(tmp_path / "ckpt")
    out = tmp_path / "completion.wav"
    params = {"PROMPT": paths["stereo"], "VARIANT": paths[variant], "SECONDS": 0.5, "NUM_COMPLETIONS": 1,
              "DEVICE": "cpu", "OUT": str(out), "SEED": 1}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {json.dumps(v)}" for k, v in params.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(first + 1, injected)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    info = sf.info(out)
    assert info.channels == (2 if variant == "duplex" else 1) and info.frames == 2000 * (12 + 4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the audio players
