"""inference.ipynb runs headless on tiny checkpoints, parameters injected after its `parameters`
cell as papermill does, and writes the completion WAV; the README's papermill command works after
the demo; bad parameters and prompts stop it before any weights load."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import soundfile as sf
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync

from test_complete import make_checkpoints

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "inference.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)


def execute(params: dict, km=None, then=()):
    """The notebook with `params` injected after its parameters cell, run in the repository: in a
    fresh kernel, or in the running kernel of `km` (`kernel`) with its namespace emptied first.
    `then` [(edit, i)]: after it, as a user edits the parameters and re-runs one cell alone, the
    parameters cell with `params` updated by `edit` injected, and the notebook's cell i, whose error
    stays in its outputs (`errors`) and the next edit runs."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cells = list(nb.cells)
    numpy = lambda params: ["import numpy as np"] if any(isinstance(v, np.generic) for v in params.values()) else []
    injected = lambda params: nbformat.v4.new_code_cell(  # repr: None, not json's null; np.float32(0.25)
        "\n".join(numpy(params) + [f"{k} = {v!r}" for k, v in params.items()]),
        metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(first + 1, injected(params))
    for edit, i in then:
        nb.cells += [nbformat.v4.new_code_cell(cells[first].source), injected({**params, **edit}),
                     nbformat.v4.new_code_cell(cells[i].source, metadata={"tags": ["raises-exception"]})]
    if km is not None:
        nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))  # no name of the notebook's last run is left
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}, km=km)
    try:
        client.execute()
    finally:
        if km is not None and client.kc is not None:
            client.kc.stop_channels()
    return nb


def errors(cells) -> list:
    """Each cell's error, "ename: evalue", or None where it ran through."""
    return [next((f"{o.ename}: {o.evalue}" for o in c.outputs if o.output_type == "error"), None) for c in cells]


@pytest.fixture(scope="module")
def kernel():
    """One kernel for this module's runs of the notebook, started in the repository with
    HF_HUB_OFFLINE=1 (nothing is downloaded) and kept between them: each runs the whole notebook
    in it from its first cell (`execute(params, kernel)`), without paying a kernel's start (the
    imports of torch and the model: seconds) each time. The notebook in a fresh kernel is the
    README's papermill command's (test_readme_papermill_command_after_the_demo)."""
    km = NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3").create_kernel_manager()
    run_sync(km.start_kernel)(cwd=str(REPO), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    yield km
    run_sync(km.shutdown_kernel)(now=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["duplex", "mono"])
def test_notebook_runs_headless(variant, tmp_path, kernel):
    paths = make_checkpoints(tmp_path / "ckpt")
    out = tmp_path / "completion.wav"
    nb = execute({"PROMPT": paths["stereo"], "VARIANT": paths[variant], "SECONDS": 0.5, "NUM_COMPLETIONS": 1,
                  "DEVICE": "cpu", "OUT": str(out), "SEED": 1}, kernel)
    info = sf.info(out)
    assert info.channels == (2 if variant == "duplex" else 1) and info.frames == 2000 * (12 + 4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the audio players


@pytest.mark.slow
def test_notebook_applies_an_adapter(tmp_path, kernel):
    """ADAPTER set: the notebook loads the checkpoint with it and completes; an adapter of another
    base stops it with the error of model/lora.py naming both."""
    from test_complete import make_adapter

    paths = make_checkpoints(tmp_path / "ckpt")
    adapter = make_adapter(paths["duplex"], tmp_path / "duplex.adapter.safetensors")
    out = tmp_path / "completion.wav"
    nb = execute({"PROMPT": paths["stereo"], "VARIANT": paths["duplex"], "ADAPTER": adapter, "SECONDS": 0.5,
                  "NUM_COMPLETIONS": 1, "DEVICE": "cpu", "OUT": str(out), "SEED": 1}, kernel)
    assert sf.info(out).frames == 2000 * (12 + 4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"+ adapter {adapter}" in text
    with pytest.raises(CellExecutionError) as e:
        execute({"PROMPT": paths["stereo"], "VARIANT": paths["mono"], "ADAPTER": adapter, "DEVICE": "cpu",
                 "OUT": str(tmp_path / "wrong.wav")}, kernel)
    assert f"adapter {adapter} belongs to another base" in str(e.value)
    assert not (tmp_path / "wrong.wav").exists()


@pytest.mark.slow
def test_weights_that_overflow_stop_the_notebook_naming_them_and_dtype(tmp_path, kernel):
    """A checkpoint whose weights load but overflow in the model (a layer's weights 1e30), with an
    adapter, in bfloat16: its NaN completions were save_audio's "cannot write audio file ... holds NaN
    or inf", naming neither the weights nor DTYPE. Now complete.py's message (naming VARIANT, ADAPTER
    and DTYPE = "float32"), before any file is written."""
    import torch
    from test_checkpoint import rewritten
    from test_complete import make_adapter

    paths = make_checkpoints(tmp_path / "ckpt")
    key = "resynth.stack.layers.0.attn.attn.attn_out.weight"
    huge = str(rewritten(paths["mono"], tmp_path / "huge.safetensors",
                         state=lambda s: {**s, key: torch.full_like(s[key], 1e30)}))
    adapter = make_adapter(huge, tmp_path / "huge.adapter.safetensors")
    with pytest.raises(CellExecutionError) as e:
        execute({"PROMPT": paths["stereo"], "VARIANT": huge, "ADAPTER": adapter, "DTYPE": "bfloat16",
                 "SECONDS": 0.25, "NUM_COMPLETIONS": 2, "DEVICE": "cpu", "OUT": str(tmp_path / "o.wav"),
                 "PLOTS": False}, kernel)
    assert (f"the completion holds NaN or inf: the weights of {huge} with adapter {adapter} overflow in bfloat16 "
            '(values too large for it, or a damaged file): try DTYPE = "float32", or re-export them; no file written'
            in str(e.value)), str(e.value)[-2000:]
    assert not list(tmp_path.glob("o*.wav"))
    # the codec's weights overflow (its decoder's gains x1e30), the transformer's latents are finite:
    # the codec is named, not the transformer (complete.py's message)
    from test_complete import overflowing_codec
    huge_codec = str(overflowing_codec(paths["codec"], tmp_path / "huge_codec.safetensors"))
    with pytest.raises(CellExecutionError) as e:
        execute({"PROMPT": paths["stereo"], "VARIANT": paths["mono"], "CODEC": huge_codec, "SECONDS": 0.25,
                 "NUM_COMPLETIONS": 1, "DEVICE": "cpu", "OUT": str(tmp_path / "o.wav"), "PLOTS": False}, kernel)
    assert (f"the completion holds NaN or inf: the codec {huge_codec} decodes the finite latents of {paths['mono']} "
            "to NaN or inf: its weights overflow in float32" in str(e.value)), str(e.value)[-2000:]
    assert not list(tmp_path.glob("o*.wav"))


@pytest.mark.slow
def test_notebook_with_int8_weights_and_fp8_cache(tmp_path, kernel):
    paths = make_checkpoints(tmp_path / "ckpt")
    out = tmp_path / "completion.wav"
    nb = execute({"PROMPT": paths["stereo"], "VARIANT": paths["duplex"], "QUANTIZE": "int8", "KV_DTYPE": "fp8",
                  "SECONDS": 0.5, "NUM_COMPLETIONS": 1, "DEVICE": "cpu", "OUT": str(out), "SEED": 1}, kernel)
    audio, _ = sf.read(out)
    assert audio.shape == (2000 * (12 + 4), 2) and np.isfinite(audio).all()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "(int8 weights)" in text


@pytest.mark.slow
def test_a_cell_re_run_alone_after_an_edit_checks_and_applies_it(tmp_path, kernel):
    """The parameters edited, then the completions' cell (or the prompt's) re-run alone, the weights
    still loaded: each edit is checked and applied as in a run of every cell. The temperatures
    were ignored (the cell that loads the weights made them), SECONDS -1 wrote 0.125 s, TOP_P 1.5
    and an OUT that is the PROMPT file were taken (the prompt replaced), "~" made a folder "~" here,
    the memory check was skipped; an edit of what the weights or the prompt were loaded with was
    ignored too, and is now an error naming the cell to run again."""
    paths = make_checkpoints(tmp_path / "ckpt")
    prompt = shutil.copy(paths["stereo"], str(tmp_path / "prompt.flac"))
    before = Path(prompt).read_bytes()
    home_out = os.path.expanduser("~/hertz-dev-no-such-folder/x.mp4")
    params = {"PROMPT": prompt, "VARIANT": paths["duplex"], "SECONDS": 0.5, "NUM_COMPLETIONS": 1, "DEVICE": "cpu",
              "OUT": str(tmp_path / "a.wav"), "SEED": 1, "PLOTS": False}
    edits = [
        ({"TOKEN_TEMP": 3.0, "MIXTURE_TEMP": 3.0, "GAUSSIAN_TEMP": 2.0, "OUT": str(tmp_path / "b.wav")}, 4, None),
        ({"SECONDS": -1}, 4, "ValueError: SECONDS must be a finite number > 0, got -1"),
        ({"TOP_P": 1.5}, 4, "ValueError: top_p must be in (0, 1], got 1.5"),
        ({"OUT": prompt}, 4, f"cannot write {prompt}: it is PROMPT, which the output would replace"),
        ({"OUT": "~/hertz-dev-no-such-folder/x.mp4"}, 4, f"cannot write {home_out}: soundfile writes no .mp4 files"),
        ({"NUM_COMPLETIONS": 2, "SECONDS": 1e9}, 4, "NUM_COMPLETIONS 2 x SECONDS 1e+09 need at least "),
        ({"VARIANT": paths["mono"]}, 4, "VARIANT was edited after the cell that loads the weights ran: run that cell"),
        ({"PROMPT": paths["mono_prompt"]}, 4, "PROMPT was edited after the cell that reads the prompt ran"),
        # numpy's scalars (SECONDS = np.float32(...)) are numbers: they were refused
        ({"SECONDS": np.float32(0.25), "NUM_COMPLETIONS": np.int64(2), "OUT": str(tmp_path / "c.wav")}, 4, None),
    ]
    nb = execute(params, kernel, then=[(edit, i) for edit, i, _ in edits])
    for (edit, _, message), error in zip(edits, errors(nb.cells[-3 * len(edits) + 2::3])):
        assert (error is None) if message is None else (message in (error or "")), (edit, error)
    assert not np.array_equal(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0])  # the temperatures
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["a.wav", "b.wav", "c-0.wav", "c-1.wav"]
    assert sf.info(tmp_path / "c-1.wav").frames == sf.info(tmp_path / "a.wav").frames - 2000 * 2
    assert Path(prompt).read_bytes() == before and not (REPO / "~").exists()


@pytest.mark.parametrize("params, message", [
    # The prompt is checked once the model's context is known (only its last context's worth is
    # read): VARIANT names an official model, offline with no weights, for its config
    ({"PROMPT": "MISSING", "VARIANT": "mono", "CKPT_DIR": "MISSING"}, "no such file: MISSING"),
    ({"PROMPT": "NAN", "VARIANT": "mono", "CKPT_DIR": "MISSING"}, "non-finite samples"),
    ({"TOKEN_TEMP": 1e6}, "token_temp must be in [0, 5]"),
    ({"TOP_P": 0.0}, "top_p must be in (0, 1]"),
    ({"SECONDS": -1}, "SECONDS must be a finite number > 0, got -1"),
    # an int beyond a float's range passed as finite, then was an OverflowError naming nothing
    ({"SECONDS": 10 ** 400}, "SECONDS must be a finite number > 0, got an integer too large"),
    ({"SEED": -1}, "seed must be an int in [0, 2**63), got -1"),  # was taken as seed 2**64 - 1, after loading
    # a TypeError from the seeds (range(2.0)) naming neither (papermill -p NUM_COMPLETIONS 2.0 gives a float)
    ({"NUM_COMPLETIONS": 2.0}, "NUM_COMPLETIONS must be an integer >= 1, got 2.0"),
    ({"SECONDS": 1e9, "VARIANT": "mono", "CKPT_DIR": "MISSING"},  # 1.3e5 GB of audio: it was taken, as NaN was
     "NUM_COMPLETIONS 2 x SECONDS 1e+09 need at least "),
    ({"ADAPTER": "MISSING"}, "no such file: MISSING"),
    ({"ADAPTER": "FOLDER"}, "FOLDER is a folder, not an adapter file: pass one of its adapter files, FOLDER/b"),
    ({"CODEC": "MISSING"}, "CODEC: no such file: MISSING"),  # was load_hertz_dev's FileNotFoundError
    ({"CODEC": None}, "CODEC = None: the notebook makes audio, so it needs a codec"),  # an AttributeError after loading
    ({"QUANTIZE": "int3"}, "QUANTIZE must be None or one of ('int8', 'int4'), got 'int3'"),
    ({"KV_DTYPE": "fp4"}, "KV_DTYPE must be one of ('auto', 'fp8'), got 'fp4'"),
    ({"OUT": "out.mp4"}, "soundfile writes no .mp4 files"),
    ({"OUT": "OK", "NUM_COMPLETIONS": 1}, "cannot write OK: it is PROMPT, which the output would replace"),
    ({"DEVICE": "gpu"}, "DEVICE = 'gpu': expected auto, cpu, cuda, cuda:N or mps"),  # was torch's RuntimeError
    ({"DTYPE": "bf16"}, "DTYPE = 'bf16': expected auto, bfloat16, float16, float32"),  # KeyError
    ({"ENCODE": "median"}, "ENCODE must be 'sample' or 'mean', got 'median'"),  # was found after the weights loaded
    # "~" is the home folder, as the scripts read it: "no such file: ~/..." for a file that was there
    ({"PROMPT": "~/hertz-dev-no-such-prompt.wav", "VARIANT": "mono", "CKPT_DIR": "MISSING"},
     "no such file: " + os.path.expanduser("~/hertz-dev-no-such-prompt.wav")),
    # paths that are not strings: an int (papermill -p PROMPT 3 passes one) was taken for file
    # descriptor 3 ("3 is not a regular file", or passed where it was open); None and ints were bare
    # TypeErrors; ADAPTER "" was "." ("a folder, not an adapter file")
    ({"PROMPT": 3}, "PROMPT must be a string (a path), got 3 (papermill -p reads 3 as a number: -r PROMPT 3 passes "),
    ({"OUT": None}, "OUT must be a string (a path), got None"),
    ({"VARIANT": None}, "VARIANT must be a string (one of duplex, mono, mono-pure-audio, or a path), got None"),
    ({"ADAPTER": 30}, "ADAPTER must be a string (a path, or None), got 30"),
    ({"ADAPTER": ""}, "ADAPTER must be a string (a path, or None), got ''"),
], ids=["missing", "nan", "token-temp", "top-p", "seconds", "seconds-huge", "seed", "num-float", "seconds-memory", "adapter", "adapter-folder", "codec", "codec-none", "quantize", "kv-dtype", "output", "output-prompt", "device",
        "dtype", "encode", "prompt-in-home", "prompt-int", "out-none", "variant-none", "adapter-int", "adapter-empty"])
def test_bad_parameters_stop_before_the_weights_load(tmp_path, kernel, params, message):
    """VARIANT names a checkpoint that does not exist (or an official one, offline, with no files):
    loading would fail on it, so the error about the parameter shows that the check came first. The
    folders of OUT that the output check made are taken away, as complete.py does (they were left
    by a mistake found after that check)."""
    files = {"MISSING": str(tmp_path / "missing.wav"), "NAN": str(tmp_path / "nan.wav"), "OK": str(tmp_path / "ok.wav"),
             "FOLDER": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()  # a LoRA run's folder, given for its adapter file (was "no such file")
    (tmp_path / "run" / "best.adapter.safetensors").write_bytes(b"")
    sf.write(files["OK"], 0.3 * np.sin(np.arange(16000) / 10), 16000)
    sf.write(files["NAN"], np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    params = {"PROMPT": files["OK"], "VARIANT": str(tmp_path / "no-such.safetensors"), "OUT": str(tmp_path / "new/folders/out.wav"),
              "DEVICE": "cpu", **{k: files.get(v, v) if isinstance(v, str) else v for k, v in params.items()}}
    with pytest.raises(CellExecutionError) as e:
        execute(params, kernel)
    for name, path in files.items():
        message = message.replace(name, path)
    assert message in str(e.value) and "no-such.safetensors" not in str(e.value)
    assert not list(tmp_path.glob("out*.wav")) and not (tmp_path / "new").exists()


def test_a_checkpoint_that_records_no_codec_stops_before_its_weights_load(tmp_path, kernel):
    """VARIANT one of ours saved without codec_source, CODEC "auto": the error complete.py gives
    (naming CODEC), before the weights load; it was an AttributeError on `model.codec` after them."""
    import torch
    from config.transformer_config import PRESETS
    from model import HertzDev, build, save_transformer

    torch.manual_seed(0)
    variant = save_transformer(tmp_path / "no-codec.safetensors", build(HertzDev, PRESETS["tiny"]))
    sf.write(tmp_path / "ok.wav", 0.3 * np.sin(np.arange(16000) / 10), 16000)
    with pytest.raises(CellExecutionError) as e:
        execute({"PROMPT": str(tmp_path / "ok.wav"), "VARIANT": str(variant), "OUT": str(tmp_path / "out.wav"),
                 "DEVICE": "cpu"}, kernel)
    assert (f"VARIANT {variant} records no codec (saved without codec_source): pass CODEC = official or the path"
            in str(e.value))
    assert e.value.ename == "ValueError" and not list(tmp_path.glob("out*.wav"))


def test_the_prompt_is_checked_in_latents_of_the_codec_s_hop(tmp_path, kernel):
    """CODEC one of ours of 4000 samples per latent: the check before the weights load took the
    official 2000, so a prompt of 3000 samples passed it and failed once the weights had loaded
    (here they are corrupt, which reading them would report)."""
    from test_complete import codec_of_hop, corrupted_copy

    paths = make_checkpoints(tmp_path / "ckpt")
    sf.write(tmp_path / "short.wav", 0.3 * np.sin(np.arange(3000) / 10), 16000)
    with pytest.raises(CellExecutionError) as e:
        execute({"PROMPT": str(tmp_path / "short.wav"), "VARIANT": str(corrupted_copy(paths["mono"], tmp_path)),
                 "CODEC": codec_of_hop(tmp_path, (2, 2, 4, 5, 5, 10)), "DEVICE": "cpu",
                 "OUT": str(tmp_path / "out.wav")}, kernel)
    assert "short.wav holds 3000 samples at 16000 Hz: a prompt needs at least 4000 samples at 16000 Hz (0.250 s" in str(e.value)
    assert not list(tmp_path.glob("out*.wav"))


@pytest.mark.slow
def test_readme_papermill_command_after_the_demo(tmp_path):
    """The README's notebook command, verbatim, in a folder laid out as after `python demo.py`
    (a tiny duplex checkpoint, a demo prompt and the output folder at the paths it names)."""
    command = re.search(r"^papermill inference\.ipynb .*$", (REPO / "README.md").read_text(), re.M).group(0)
    for name in ("config", "model", "inference.ipynb"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    paths = make_checkpoints(tmp_path / "made")
    (tmp_path / "checkpoints/transformer").mkdir(parents=True)
    shutil.copy(paths["duplex"], tmp_path / "checkpoints/transformer/best.safetensors")
    (tmp_path / "data/demo/val/dialogue").mkdir(parents=True)
    (tmp_path / "outputs/demo").mkdir(parents=True)  # where the demo wrote its completion
    sf.write(tmp_path / "data/demo/val/dialogue/dialogue_00000.wav", sf.read(paths["stereo"])[0], 44100)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(tmp_path.glob("outputs/**/*"))
    assert any(p.suffix == ".ipynb" for p in written), written
    wavs = [p for p in written if p.suffix == ".wav"]
    assert wavs and all(sf.info(p).channels == 2 for p in wavs)
