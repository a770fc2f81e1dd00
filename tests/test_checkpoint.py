"""Our checkpoint format: weights + config in one safetensors file; round trips rebuild the model."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
from model import Codec, HertzDev, build, load_codec, load_hertz_dev, save_codec, save_transformer
from model.checkpoint import CheckpointError, _header as header, atomic_write, content_hash, file_kind, read_metadata
from model.loading import write_codec, write_transformer
from model import training
from model.training import Checkpoints


REPO = Path(__file__).resolve().parents[1]


def codec_state(codec):
    return {f"codec.{k}": v for k, v in codec.state_dict().items()}


@pytest.mark.parametrize("activation", ["elu", "snake"])
@torch.no_grad()
def test_codec_round_trip(tmp_path, activation):
    cfg = dataclasses.replace(CODEC_PRESETS["tiny"], encode_channels=5, activation=activation)  # a non-preset shape
    torch.manual_seed(0)
    codec = build(Codec, cfg).eval()
    for name, p in codec.named_parameters():
        if name.endswith("alpha"):  # Snake's frequencies, each its own
            p.uniform_(0.5, 2.0)
    assert any(name.endswith("alpha") for name, _ in codec.named_parameters()) == (activation == "snake")
    path = save_codec(tmp_path / "codec.safetensors", codec)
    meta = read_metadata(path)
    assert meta["kind"] == "codec" and meta["config"]["encode_channels"] == 5
    loaded = load_codec(path)
    assert loaded.config.encode_channels == 5 and loaded.config.channel_ratios == cfg.channel_ratios
    assert loaded.config.activation == activation
    audio = torch.randn(1, 1, 6000)
    assert torch.equal(loaded.encode(audio)[0], codec.encode(audio)[0])
    z = torch.randn(1, 3, 32)
    assert torch.equal(loaded.decode(z), codec.decode(z))


def test_the_codec_weight_norm_is_torch_s_and_loading_does_not_import_dynamo(tmp_path):
    """The loaders build the codec on `meta`, where torch's weight_norm computed each magnitude with
    Python reference kernels: the first imported torch._dynamo (about 2 s of CPU at every start of
    complete.py, the server or a trainer's codec load). The codec's parametrization is torch's:
    the same parameter names and values on a real build."""
    cfg = CODEC_PRESETS["tiny"]
    torch.manual_seed(0)
    codec = Codec(cfg)
    torch.manual_seed(0)
    plain = Codec(dataclasses.replace(cfg, weight_norm=False))
    convs = [m for m in list(plain.encoder.modules()) + list(plain.decoder.modules())
             if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    for m in convs + [plain.compressor.proj_in, plain.compressor.proj_out]:
        torch.nn.utils.parametrizations.weight_norm(m)
    ours, torchs = codec.state_dict(), plain.state_dict()
    assert list(ours) == list(torchs) and all(torch.equal(ours[k], torchs[k]) for k in ours)
    path = save_codec(tmp_path / "codec.safetensors", codec)
    code = ("import sys; from model import load_codec; load_codec(sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch._dynamo" not in out.stdout


@pytest.mark.parametrize("duplex", [False, True])
@torch.no_grad()
def test_transformer_round_trip_with_codec(tmp_path, duplex):
    cfg = dataclasses.replace(TRANSFORMER_PRESETS["tiny"], duplex=duplex, lm_layers=3)
    torch.manual_seed(0)
    model = build(HertzDev, cfg).eval()
    codec_path = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    path = save_transformer(tmp_path / "model.safetensors", model, codec_source=str(codec_path))
    loaded = load_hertz_dev(path)
    assert loaded.config == cfg and loaded.codec is not None and loaded.codec.config == CODEC_PRESETS["tiny"]
    x = torch.randn(2, 7, 32 * cfg.channels)
    for got, want in zip(torch.utils._pytree.tree_leaves(loaded.lm(x)), torch.utils._pytree.tree_leaves(model.lm(x))):
        assert torch.equal(got, want)
    assert load_hertz_dev(path, codec=None).codec is None


def training_folder(tmp_path, steps=(1, 2)):
    """A Checkpoints folder as the codec trainer leaves it: training states and their exports."""
    torch.manual_seed(0)
    codec = build(Codec, CODEC_PRESETS["tiny"])
    folder = Checkpoints(tmp_path / "run")
    for step in steps:
        state = {"generator": codec.state_dict(), "opt_g": {}, "step": step,
                 "config": dataclasses.asdict(codec.config)}
        folder.save(step, state, metric=1.0 / step, export=lambda tmp: write_codec(tmp, codec, {"step": step}))
    return folder, codec


def export_state(state, tmp):
    codec = build(Codec, CODEC_PRESETS["tiny"])
    codec.load_state_dict(state["generator"])
    write_codec(tmp, codec, {"step": state["step"]})


def test_wrong_kind_and_foreign_files_are_clear_errors(tmp_path):
    codec_path = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    with pytest.raises(CheckpointError, match="expected a transformer checkpoint .*found a codec"):
        load_hertz_dev(codec_path)
    model_path = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    with pytest.raises(CheckpointError, match="expected a codec checkpoint .*found a transformer"):
        load_codec(model_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a hertz-dev checkpoint"):
        load_codec(tmp_path / "other.safetensors")
    torch.save(build(Codec, CODEC_PRESETS["tiny"]).state_dict(), tmp_path / "official_layout.pt")
    with pytest.raises(CheckpointError, match="expected a codec checkpoint .*found a PyTorch state dict.*'official'"):
        load_codec(tmp_path / "official_layout.pt")
    (tmp_path / "noise.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="noise.bin: expected a codec .*neither safetensors nor PyTorch"):
        load_codec(tmp_path / "noise.bin")



def test_a_safetensors_header_whose_length_starts_with_byte_0x80_is_ours_not_a_legacy_pickle(tmp_path):
    """A safetensors file begins with its header's length (8 bytes, little-endian): a length of
    128 + 256 k begins with 0x80, as torch.save's legacy pickle does, and such a checkpoint (a
    trainer's export, whose header holds its paths) was refused as a PyTorch state dict."""
    codec = build(Codec, CODEC_PRESETS["tiny"])
    for pad in range(256):  # the header grows by one byte a character of `extra`
        path = save_codec(tmp_path / "codec.safetensors", codec, extra={"note": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert file_kind(path) == "codec" and load_codec(path).config == codec.config
    torch.save(codec.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert file_kind(tmp_path / "legacy.pt") == "PyTorch state dict"

def test_a_training_state_names_the_export_beside_it(tmp_path):
    folder, _ = training_folder(tmp_path)
    best = folder.folder / "best.pt"
    assert file_kind(best) == "codec training state"
    for load in (load_codec, load_hertz_dev):  # never "SafetensorError: header too large"
        with pytest.raises(CheckpointError, match=re.escape(f"{best}: expected a ") + ".*found a codec training "
                           f"state; load {re.escape(str(best.with_suffix('.safetensors')))} beside it"):
            load(best)
    (folder.folder / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="its export best.safetensors is not beside it"):
        load_codec(best)
    (folder.folder / "best.adapter.safetensors").write_bytes(b"")  # a LoRA run exports its adapters instead
    with pytest.raises(CheckpointError, match=re.escape(f"it is a LoRA run's: pass {best.with_suffix('.adapter.safetensors')} "
                                                        "beside it as adapter=")):
        load_codec(best)


def test_a_lora_run_s_training_state_names_its_adapter_export(tmp_path):
    """A LoRA run's latest.pt (the trainer's keys: adapters as "model", the base it records) given
    for a model: its export is latest.adapter.safetensors, but with the export gone the message
    named latest.safetensors, a file such a run never writes; it names the adapter file now, and
    a full run's state still names latest.safetensors."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = dataclasses.asdict(dataclasses.replace(TRANSFORMER_PRESETS["tiny"], finetune="lora", init_from="official"))
    common = {"optimizer": {}, "scaler": {}, "step": 2, "config": cfg, "codec": "0", "codec_source": "official",
              "world_size": 1, "wandb_id": None, "val/loss": 1.0}
    torch.save({"model": {"lm.layers.0.attn.wqkv.lora_A": torch.zeros(4, 8)}, **common,
                "base_source": "official", "base_fingerprint": "f" * 16}, run / "latest.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{run / 'latest.pt'}: expected a transformer checkpoint "
                                                        "(.safetensors), found a transformer training state; it is a "
                                                        "LoRA run's, and its export latest.adapter.safetensors is not "
                                                        "beside it: rerun the trainer")):
        load_hertz_dev(run / "latest.pt")
    (run / "latest.adapter.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"it is a LoRA run's: pass {run / 'latest.adapter.safetensors'} "
                                                        "beside it as adapter=")):
        load_hertz_dev(run / "latest.pt")
    torch.save({"model": {}, **common}, run / "best.pt")  # a full run's
    with pytest.raises(CheckpointError, match="; its export best.safetensors is not beside it"):
        load_hertz_dev(run / "best.pt")


def test_changed_bytes_are_detected_on_load(tmp_path):
    codec = build(Codec, CODEC_PRESETS["tiny"])
    path = save_codec(tmp_path / "codec.safetensors", codec)
    assert read_metadata(path)["hash"] == content_hash(codec_state(codec), header(path))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " is corrupted.*verify=False"):
        load_codec(path)
    loaded = load_codec(path, verify=False)
    assert not all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), codec.state_dict().values()))


def test_a_file_without_hash_loads_with_a_warning(tmp_path):
    from safetensors.torch import save_file
    codec = build(Codec, CODEC_PRESETS["tiny"])
    meta = {k: v for k, v in header(save_codec(tmp_path / "new.safetensors", codec)).items() if k != "content_sha256"}
    save_file(codec_state(codec), str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.warns(UserWarning, match="old.safetensors has no content hash"):
        loaded = load_codec(tmp_path / "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), codec.state_dict().values()))


def test_non_finite_weights_are_never_written(tmp_path):
    codec = build(Codec, CODEC_PRESETS["tiny"])
    with torch.no_grad():
        next(codec.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="refusing to write .*codec.safetensors: 1 tensors hold NaN or inf"):
        save_codec(tmp_path / "codec.safetensors", codec)
    folder = Checkpoints(tmp_path / "run")
    state = {"generator": codec.state_dict(), "step": 3}
    with pytest.raises(CheckpointError, match="refusing to write .*step_00000003.pt: 1 tensors hold NaN"):
        folder.save(3, state, export=lambda tmp: write_codec(tmp, codec))
    assert not list(tmp_path.rglob("*.*"))  # not a file, not a temporary


def test_state_and_export_are_saved_together_and_recovered(tmp_path):
    folder, codec = training_folder(tmp_path)
    run = folder.folder
    assert read_metadata(run / "latest.safetensors")["extra"]["step"] == torch.load(run / "latest.pt")["step"] == 2
    assert read_metadata(run / "best.safetensors")["extra"]["step"] == torch.load(run / "best.pt")["step"] == 2
    # a kill between the renames of a third save: the .pt moved on, its export did not; and
    # temporaries of interrupted writes and links
    save = Checkpoints(run)
    save.save(3, {**torch.load(run / "latest.pt"), "step": 3}, metric=5.0)  # no export: latest lags
    (run / ".latest.pt.a1b2c3d4.tmp").write_bytes(b"partial")
    (run / ".best.pt.link").write_bytes(b"")
    notes = save.recover(export_state)
    assert notes[:2] == ["removed .latest.pt.a1b2c3d4.tmp, left by an interrupted save",
                         "removed .best.pt.link, left by an interrupted save"]
    assert notes[2:] == ["rebuilt latest.safetensors from latest.pt (step 3; it held step 2)"]
    assert read_metadata(run / "latest.safetensors")["extra"]["step"] == 3
    assert not list(run.glob(".*")) and load_codec(run / "latest.safetensors") is not None
    assert save.recover(export_state) == []  # nothing left to do


def test_a_save_killed_before_it_named_its_step_latest_is_resumed_from_that_step(tmp_path, monkeypatch):
    """A kill after a save renamed step_00000003.pt into place but before it linked latest.pt (or
    recorded the step in checkpoints.json): the run resumes from step 3, not 2, and recover names it."""
    folder, codec = training_folder(tmp_path)
    run = folder.folder

    def killed(src, dst):
        raise KeyboardInterrupt(f"killed before linking {dst.name}")

    monkeypatch.setattr(training, "_link", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.save(3, {**torch.load(run / "latest.pt"), "step": 3},
                    export=lambda tmp: write_codec(tmp, codec, {"step": 3}))
    monkeypatch.undo()
    assert torch.load(run / "latest.pt")["step"] == 2 and (run / "step_00000003.pt").is_file()
    assert folder.latest == run / "step_00000003.pt" and folder.load()["step"] == 3
    assert training.state_to_load(folder, resume=True, eval_only=False, init_from="") == run / "step_00000003.pt"
    assert folder.recover(export_state) == ["finished the interrupted save of step 3: latest.pt names it"]
    assert torch.load(run / "latest.pt")["step"] == 3 and folder.latest == run / "latest.pt"
    assert torch.load(run / "best.pt")["step"] == 2  # its evaluation was never recorded
    assert folder.recover(export_state) == []
    # a latest.pt put back by hand in place of a damaged newest step is kept
    (run / "latest.pt").unlink()
    (run / "latest.pt").write_bytes((run / "step_00000002.pt").read_bytes())
    assert folder.latest == run / "latest.pt" and folder.load()["step"] == 2
    # and a folder whose only save was killed so is a run that resume=false moves aside
    lone = Checkpoints(tmp_path / "lone")
    monkeypatch.setattr(training, "_link", killed)
    with pytest.raises(KeyboardInterrupt):
        lone.save(1, {"step": 1})
    monkeypatch.undo()
    assert lone.latest == lone.folder / "step_00000001.pt"
    assert training.move_aside(lone.folder) is not None and lone.latest is None


@pytest.mark.parametrize("at", ["latest.pt", "best.pt", "best.safetensors", "checkpoints.json"])
def test_a_save_killed_inside_is_finished_at_the_next_start_its_best_ranked(tmp_path, monkeypatch, at):
    """A save of a better step killed after its step file was in place, before it linked best.pt
    or recorded the step (kill-and-resume hunt, session 37: SIGKILL at the rename of best.pt):
    best.pt and best.safetensors kept the worse step for good and checkpoints.json an older
    latest_step, as the resumed run never evaluates its start again, and demo.py and complete.py
    took the worse model. What a save is to do is now recorded before its first rename, and
    `recover` finishes it."""
    folder, codec = training_folder(tmp_path)  # steps 1 and 2, metric 1 / step: step 2 the best
    run = folder.folder
    link, record = training._link, Checkpoints._record
    if at == "checkpoints.json":
        def killed(self, info):
            if "pending" not in info:  # (the save's last record)
                raise KeyboardInterrupt("killed before recording the save")
            record(self, info)
        monkeypatch.setattr(Checkpoints, "_record", killed)
    else:
        def killed(src, dst):
            if dst.name == at:
                raise KeyboardInterrupt(f"killed before linking {at}")
            link(src, dst)
        monkeypatch.setattr(training, "_link", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.save(3, {**torch.load(run / "latest.pt"), "step": 3}, metric=0.25,
                    export=lambda tmp: write_codec(tmp, codec, {"step": 3}))
    monkeypatch.undo()
    notes = folder.recover(export_state)
    assert notes[0] == "finished the interrupted save of step 3: latest.pt and best.pt name it", notes
    info = json.loads((run / "checkpoints.json").read_text())
    assert info == {**info, "latest_step": 3, "best_step": 3, "best_metric": 0.25} and "pending" not in info
    for name in ("latest", "best"):
        assert torch.load(run / f"{name}.pt")["step"] == 3
        assert json.loads(header(run / f"{name}.safetensors")["extra"])["step"] == 3
    assert folder.recover(export_state) == []
    # a save killed before its step file was in place: nothing of it is, and its record goes
    monkeypatch.setattr(training.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        folder.save(4, {**torch.load(run / "latest.pt"), "step": 4}, metric=0.1)
    monkeypatch.undo()
    assert folder.recover(export_state) == [] and "pending" not in json.loads((run / "checkpoints.json").read_text())
    assert torch.load(run / "best.pt")["step"] == 3 and not (run / "step_00000004.pt").exists()


NO_LINKS_UNDER_A_SIZE_LIMIT = """\
import errno, os, resource, sys
from model.training import Checkpoints
def no_link(src, dst, *args, **kwargs):  # a file system without hard links (FAT, some network shares) says so
    raise PermissionError(errno.EPERM, "Operation not permitted", dst)
os.link = no_link
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))  # (SIGXFSZ: ignored)
Checkpoints(sys.argv[1]).recover(lambda state, tmp: None)
"""


def test_a_latest_pt_that_cannot_be_made_is_one_error_naming_it_and_the_next_start_finishes_the_save(tmp_path):
    """A save whose step file was in place but whose latest.pt could not be made (where the file
    system has no hard links, a copy that fills the disk) blamed the step file, `cannot write
    step_00000003.pt`, and the next start, finishing that save (`recover`), ended in the copy's
    OSError traceback. Both are one CheckpointError naming latest.pt now, no temporary is left, and
    a start once it can be written finishes the save. Here a folder in the way of latest.pt, then,
    in a process of its own, a copy that fails at a file size limit where no hard links are made."""
    import subprocess
    import sys
    folder, codec = training_folder(tmp_path)
    run = folder.folder
    (run / "latest.pt").unlink()
    (run / "latest.pt").mkdir()
    with pytest.raises(CheckpointError) as error:
        folder.save(3, {**torch.load(run / "step_00000002.pt"), "step": 3}, metric=0.25,
                    export=lambda tmp: write_codec(tmp, codec, {"step": 3}))
    assert str(error.value) == (f"cannot write {run / 'latest.pt'}: Is a directory; step_00000003.pt is saved whole, "
                                "and the next start finishes its save once that can be written")
    assert (run / "step_00000003.pt").is_file() and not (run / ".latest.pt.link").exists()
    with pytest.raises(CheckpointError) as error:
        folder.recover(export_state)
    assert str(error.value) == (f"cannot write {run / 'latest.pt'}: Is a directory, finishing the interrupted save of "
                                "step 3; run again once that can be written")
    (run / "latest.pt").rmdir()
    r = subprocess.run([sys.executable, "-c", NO_LINKS_UNDER_A_SIZE_LIMIT, str(run)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"model.checkpoint.CheckpointError: cannot write {run / 'latest.pt'} (a copy of step_00000003.pt: no hard links "
        "here): File too large, finishing the interrupted save of step 3; run again once that can be written"), r.stderr
    assert not (run / ".latest.pt.link").exists() and not (run / "latest.pt").exists()
    assert folder.recover(export_state)[0] == "finished the interrupted save of step 3: latest.pt and best.pt name it"
    assert torch.load(run / "latest.pt")["step"] == torch.load(run / "best.pt")["step"] == 3


def test_a_pending_save_record_that_is_not_one_is_dropped_not_a_traceback(tmp_path):
    """A hand-edited `pending` entry of checkpoints.json without its metric or validation was a
    KeyError traceback at the next start (fresh-eyes hunt, session 37): an entry that is not one
    is left out, as any other of the wrong type."""
    folder, _ = training_folder(tmp_path)
    info = json.loads((folder.folder / "checkpoints.json").read_text())
    (folder.folder / "checkpoints.json").write_text(json.dumps({**info, "pending": {"step": 2, "export": False}}))
    assert folder.recover(export_state) == []
    assert torch.load(folder.folder / "best.pt")["step"] == 2 and folder._info()["latest_step"] == 2


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("a regular file, not a folder")
    folder = Checkpoints(tmp_path / "file" / "run")
    with pytest.raises(CheckpointError, match=r"cannot write .*file/run/step_00000001.pt: .*/file is a file, not a folder$"):
        folder.save(1, {"step": 1})
    with pytest.raises(CheckpointError, match=r"cannot write .*file/x.safetensors: .*/file is a file, not a folder$"):
        save_codec(tmp_path / "file" / "x.safetensors", build(Codec, CODEC_PRESETS["tiny"]))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk. Needs the right to mount (root in a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_clear_error_and_leaves_no_temporaries(tiny_disk):
    big = {"w": torch.ones(200_000), "step": 1}  # 800 kB
    folder = Checkpoints(tiny_disk / "run")
    with pytest.raises(CheckpointError, match=r"cannot write .*step_00000001.pt: No space left on device$"):
        folder.save(1, big)
    codec = build(Codec, dataclasses.replace(CODEC_PRESETS["tiny"], encode_channels=64))
    with pytest.raises(CheckpointError, match=r"cannot write .*codec.safetensors: No space left on device$"):
        save_codec(tiny_disk / "codec.safetensors", codec)
    assert [p.name for p in tiny_disk.rglob("*") if p.is_file()] == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def rewritten(src, dst, meta=None, state=None):
    """`src` written again to `dst` with its header changed by `meta` and its tensors by `state`,
    and its content hash made again: a file as another tool (or an edit by hand) would leave it."""
    from safetensors.torch import load_file, save_file
    tensors, fields = load_file(str(src)), header(src)
    tensors, fields = (state or dict)(tensors), (meta or dict)(fields)
    fields["content_sha256"] = content_hash(tensors, fields)
    save_file(tensors, str(dst), metadata=fields)
    return dst


def edited(key, value):
    def edit(fields):
        fields = dict(fields)
        if value is None:
            del fields[key]
        else:
            fields[key] = value
        return fields
    return edit


@pytest.mark.parametrize("key, value, message", [
    ("config", "{not json", "the 'config' field of its header is not a JSON object"),
    ("config", None, "its header has no 'config' field"),
    ("config", '{"lm_layers": "three"}', "its config is not a valid TransformerConfig: lm_layers: expected an int"),
    ("extra", "[]", "the 'extra' field of its header is not a JSON object"),
    ("quantization", '{"mode": "int3", "layers": {}}', "records an unknown quantization 'int3'"),
    ("quantization", '{"mode": "int8", "layers": {"lm.input": "int3"}}',
     "the quantization its header records does not fit its model: unknown layer quantization 'int3'"),
    ("quantization", '{"mode": "int8", "layers": {"lm.nowhere": "int8"}}',
     "the quantization its header records does not fit its model"),
    ("quantization", '{"mode": "int8", "layers": {"lm.input": 8}}',
     "the quantization its header records does not fit its model: unknown layer quantization 8"),
    ("quantization", '{"mode": "int4", "layers": {"lm.input": "int8"}}',
     "its header records int4 quantization, but its layers are int8; re-export it"),
    ("quantization", '{"mode": "int8", "layers": {}}', "its header records int8 quantization, but no quantized layer"),
    # a path outside the three parts was dropped unread, while it set the mode (int4 over int8 layers)
    ("quantization", '{"mode": "int4", "layers": {"lm.input": "int8", "codec.decoder.0": "int4/128"}}',
     "its header records quantized layers outside the quantizer, LM and resynthesizer (codec.decoder.0)"),
    # nested past the JSON parser's recursion: a RecursionError traceback
    ("config", "[" * 100_000 + "]" * 100_000, "the 'config' field of its header is not a JSON object"),
], ids=["config-json", "config-missing", "config-type", "extra-list", "mode", "layer-spec", "layer-path",
        "layer-spec-not-text", "mode-of-other-layers", "mode-without-layers", "layer-outside-the-parts",
        "config-nested-too-deep"])
def test_a_damaged_header_is_one_error_naming_the_file_and_field(tmp_path, monkeypatch, key, value, message):
    """Header fields that are not JSON, missing, of the wrong type, or a quantization this code does
    not know: a CheckpointError naming the file and the field, before any weights are read. They
    were a JSONDecodeError, KeyError, AttributeError or ConfigError naming no file, or (an unknown
    mode) silently ignored. A mode that is not its layers' (int8 recorded over int4 layers, or over
    none) loaded as such: quantize= and init_from were checked against it."""
    good = save_transformer(tmp_path / "good.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    path = rewritten(good, tmp_path / "bad.safetensors", edited(key, value))
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(CheckpointError) as e:
        load_hertz_dev(path, codec=None)
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def config_set(key, value):
    """A header edit: the recorded config's `key` set to `value` (as JSON writes it)."""
    def edit(fields):
        config = json.loads(fields["config"])
        config[key] = value
        return {**fields, "config": json.dumps(config)}
    return edit


@pytest.mark.parametrize("kind, key, value, message", [
    ("transformer", "eps", -1.0, "its config is not a valid TransformerConfig: eps: expected a number > 0, got -1.0"),
    ("transformer", "fsq_levels", [1, 8, 8, 8, 64],
     "its config is not a valid TransformerConfig: fsq_levels: expected each item >= 2, got (1, 8, 8, 8, 64)"),
    ("transformer", "seq_len", 0, "its config is not a valid TransformerConfig: seq_len: expected a number >= 1, got 0"),
    ("transformer", "lm_heads", 3, "its config is not a valid TransformerConfig: lm_dim=64 and lm_heads=3: the heads "
                                   "split lm_dim into equal heads of an even size"),
    ("transformer", "resynth_kv_heads", 3, "its config is not a valid TransformerConfig: resynth_heads=4 and "
                                           "resynth_kv_heads=3: each key/value head serves an equal group"),
    ("transformer", "lm_dim", 1 << 30, "its config does not build a HertzDev (Storage size calculation overflowed"),
    ("transformer", "fsq_levels", [8] * 30, "its config is not a valid TransformerConfig: fsq_levels=(8, 8, 8, "),
    ("transformer", "lm_layers", 10 ** 7, "its config is not a valid TransformerConfig: lm_layers=10000000: more than "
                                          "4096 layers"),
    ("codec", "channel_ratios", [1, 2, 4, 4, 4], "its config is not a valid CodecConfig: strides=(2, 2, 4, 5, 5, 5) "
                                                 "and channel_ratios=(1, 2, 4, 4, 4) need one item per encoder block"),
    ("codec", "norm_stddev", 0.0, "its config is not a valid CodecConfig: norm_stddev: expected a number >= "),
], ids=["eps", "fsq-level-1", "seq-len-0", "heads", "kv-heads", "huge", "vocab-huge", "layers-huge", "codec-ratios",
        "codec-norm"])
def test_a_header_config_out_of_range_or_contradicting_itself_is_one_error_before_any_weights(
        tmp_path, monkeypatch, kind, key, value, message):
    """Header configs (hash consistent: edited, or another tool's) whose values are out of their
    fields' ranges, whose heads do not divide the width, whose codec has fewer channel ratios than
    strides, or whose sizes no memory holds: one CheckpointError naming the file and the field,
    before any weights are read. Ranges were checked on command-line overrides only: eps=-1 and a
    level of 1 loaded into a model of NaN outputs, seq_len=0 crashed when generating; the others
    were an AssertionError or a RuntimeError traceback from inside a layer."""
    if kind == "codec":
        good = save_codec(tmp_path / "good.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    else:
        good = save_transformer(tmp_path / "good.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    path = rewritten(good, tmp_path / "bad.safetensors", config_set(key, value))
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(CheckpointError) as e:
        load_codec(path) if kind == "codec" else load_hertz_dev(path, codec=None)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value), str(e.value)


def test_a_damaged_codec_given_as_a_path_is_found_before_the_transformer_s_weights(tmp_path, monkeypatch):
    """codec=PATH (--codec) naming a codec whose bytes changed: refused naming it before the
    transformer's weights are read and hashed; it was read after them, the 8.5B model's included.
    The model loads with the good codec as before."""
    from model import loading
    codec = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]),
                             codec_source=str(codec))
    bad = tmp_path / "flipped.safetensors"
    data = bytearray(codec.read_bytes())
    data[-1] ^= 0x40
    bad.write_bytes(bytes(data))
    read = loading.read_weights

    def only_codecs(path, *args, kind=None, **kwargs):
        assert kind == "codec", f"{path} read before the codec"
        return read(path, *args, kind=kind, **kwargs)
    monkeypatch.setattr("model.loading.read_weights", only_codecs)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(bad))} is corrupted"):
        load_hertz_dev(model, codec=bad)
    monkeypatch.setattr("model.loading.read_weights", read)
    assert load_hertz_dev(model, codec=codec).codec is not None


def test_tensors_that_do_not_fit_their_config_are_one_line(tmp_path):
    """A file whose config builds another model than its tensors (a consistent hash: written so):
    one CheckpointError line naming the file, the part and the tensors at fault; it was a
    RuntimeError with torch's message of every missing key, one per line (a traceback in the
    scripts)."""
    from model.checkpoint import write_weights
    model = build(HertzDev, TRANSFORMER_PRESETS["tiny"])
    state = {f"{p}.{k}": v for p in ("quantizer", "lm", "resynth") for k, v in getattr(model, p).state_dict().items()}
    path = tmp_path / "model.safetensors"
    write_weights(path, state, "transformer", dataclasses.replace(model.config, lm_layers=model.config.lm_layers + 2))
    with pytest.raises(CheckpointError, match=re.escape(f"{path} (lm) does not match the model built from its "
                                                        "config: missing 16 tensors (layers.")) as e:
        load_hertz_dev(path, codec=None)
    assert "\n" not in str(e.value)
    state["lm.input.weight"] = state["lm.input.weight"].to(torch.int32)  # a dtype the parameter cannot take
    write_weights(path, state, "transformer", model.config)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} (lm) does not match")) as e:
        load_hertz_dev(path, codec=None)
    assert "\n" not in str(e.value)


def test_non_finite_weights_are_refused_when_loaded(tmp_path):
    """NaN in a file whose hash matches (written by another tool, or before writes refused them):
    a CheckpointError naming the file and tensor, not a model that generates noise; verify=False
    loads it anyway. It loaded silently."""
    def poison(state):
        next(iter(state.values())).view(-1)[0] = float("nan")
        return state
    good = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    bad = rewritten(good, tmp_path / "nan.safetensors", state=poison)
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ": 1 tensors hold NaN or inf"):
        load_codec(bad)
    load_codec(bad, verify=False)


def test_a_recorded_codec_that_is_gone_is_found_before_the_weights(tmp_path, monkeypatch):
    """The codec a checkpoint records, moved since: a CheckpointError naming both files and the
    fix, before the transformer's weights are read (it was a FileNotFoundError naming the codec
    only, after them); a codec= of another kind is refused before them too."""
    codec = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    path = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]),
                            codec_source=str(codec))
    codec.rename(tmp_path / "moved.safetensors")
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(CheckpointError, match=re.escape(f"{path} records its codec as {codec}, which is not "
                                                        "there (moved or deleted): pass its new path as codec=")):
        load_hertz_dev(path)
    with pytest.raises(CheckpointError, match="expected a codec checkpoint .*found a transformer"):
        load_hertz_dev(path, codec=path)


def test_a_recorded_codec_trained_further_since_is_refused_not_decoded_with(tmp_path):
    """An export records the codec it was trained on (path and fingerprint, as train_transformer.py
    writes them); a codec trained further or replaced at that path since would decode the model's
    latents to noise: a CheckpointError naming both, and the fix. The same codec loads (in bf16
    too: the fingerprint is of the file's float32 weights); codec=PATH takes the new one on purpose."""
    from model.latents import codec_fingerprint
    torch.manual_seed(0)
    trained_on = build(Codec, CODEC_PRESETS["tiny"])
    codec = save_codec(tmp_path / "codec.safetensors", trained_on)
    path = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]),
                            codec_source=str(codec), extra={"codec_fingerprint": codec_fingerprint(trained_on)})
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_hertz_dev(path, dtype=dtype).codec
        assert loaded.config == trained_on.config and next(loaded.parameters()).dtype == dtype
    further = build(Codec, CODEC_PRESETS["tiny"])
    save_codec(codec, further)  # trained further in place
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path} was trained on the latents of codec {codec_fingerprint(trained_on)}, and the codec it records, "
            f"{codec}, is now another ({codec_fingerprint(further)}: trained further or replaced since)")):
        load_hertz_dev(path)
    assert torch.equal(next(load_hertz_dev(path, codec=codec).codec.parameters()), next(further.parameters()))


def test_atomically_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp's temporaries are 0600, and renamed into place they stayed so: on a shared machine
    a lab mate could not read a checkpoint, an encoded latents shard, a saved WAV or the dataset
    index. Every atomic writer now gives 0o666 less the umask, as open() does."""
    import numpy as np
    from model.audio import save_audio
    from model.data import INDEX_FILENAME, scan_audio_folder
    from model.latents import prepare_latents
    old = os.umask(0o002)  # a group-shared umask: 0o664, which neither 0600 nor a fixed 0644 gives
    try:
        torch.manual_seed(0)
        codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
        save_codec(tmp_path / "codec.safetensors", codec)
        atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"step": 1}, tmp))
        save_audio(tmp_path / "audio" / "a.wav", np.zeros((1, 8000), np.float32), 16000)
        scan_audio_folder(tmp_path / "audio")
        out = prepare_latents(str(tmp_path / "audio"), codec, "mono", str(tmp_path / "latents"), log=lambda m: None)
        written = [tmp_path / "codec.safetensors", tmp_path / "state.pt", tmp_path / "audio" / "a.wav",
                   tmp_path / "audio" / INDEX_FILENAME, out / "manifest.json", out / "shard_00000.bin"]
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    finally:
        os.umask(old)
    assert modes == {p.name: "0o664" for p in written}


def drained(fifo, write) -> bytes:
    """`write()`, while a thread reads everything written into the named pipe `fifo`: the bytes. (The
    reader opens it without waiting for a writer, so a `write` that never opens it ends the read
    when it returns, rather than leaving a thread waiting in open.)"""
    import threading
    import time
    done, chunks = threading.Event(), []
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def read():
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:  # a writer has it open, nothing to read yet
                data = None
            if data:
                chunks.append(data)
            elif data == b"" and (chunks or done.is_set()):  # the writer closed it (or never came)
                return
            else:
                time.sleep(0.005)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        write()
    finally:
        done.set()
        reader.join(timeout=30)
        os.close(fd)
    return b"".join(chunks)


def test_saving_weights_to_a_pipe_or_a_link_to_one_writes_into_it_not_over_it(tmp_path):
    """save_codec, save_transformer and save_adapter (model.checkpoint.atomic_write) renamed their
    temporary over the path: a device or a named pipe was replaced by a regular file (as root,
    `save_codec("/dev/null", codec)` broke /dev/null for every process of the machine), as the
    audio writer (model.files.replace_atomically) never did. Both now write into it (here a named
    pipe, and a link to it): it stays what it was, and what comes out of it loads."""
    from model.lora import LoRAConfig, apply_lora, read_adapter, save_adapter
    torch.manual_seed(0)
    codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    model = build(HertzDev, TRANSFORMER_PRESETS["tiny"])
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "pipe")
    for target in (tmp_path / "pipe", tmp_path / "link.safetensors"):
        written = drained(tmp_path / "pipe", lambda: save_codec(target, codec))
        (tmp_path / "codec.safetensors").write_bytes(written)
        assert torch.equal(next(iter(load_codec(tmp_path / "codec.safetensors").state_dict().values())),
                           next(iter(codec.state_dict().values())))
    written = drained(tmp_path / "pipe", lambda: save_transformer(tmp_path / "pipe", model))
    (tmp_path / "model.safetensors").write_bytes(written)
    assert load_hertz_dev(tmp_path / "model.safetensors", device="cpu", codec=None) is not None
    lora = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(model, rank=4, alpha=8.0)
    written = drained(tmp_path / "pipe", lambda: save_adapter(tmp_path / "link.safetensors", model, lora,
                                                              "file-sha256:abc"))
    (tmp_path / "model.safetensors").write_bytes(written)
    assert read_adapter(tmp_path / "model.safetensors")[0] == lora
    assert (tmp_path / "pipe").is_fifo() and os.readlink(tmp_path / "link.safetensors") == str(tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codec.safetensors", "link.safetensors",
                                                           "model.safetensors", "pipe"]  # no temporary beside them


@pytest.mark.parametrize("value", [123, ["codec.safetensors"], ""], ids=["number", "list", "empty"])
def test_a_recorded_codec_that_is_not_a_path_is_one_error_naming_the_file_and_field(tmp_path, monkeypatch, value):
    """A header whose extra records the codec as a number, a list or an empty string (edited, or
    written by another tool; the hash matches): a CheckpointError naming the file and the field,
    before any weights are read. It was a TypeError from os.fspath; codec= given loads it."""
    model = build(HertzDev, TRANSFORMER_PRESETS["tiny"])
    path = tmp_path / "model.safetensors"
    write_transformer(path, model, codec_source=value)  # the unchecked writer: save_transformer refuses these
    with monkeypatch.context() as m:
        m.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
        with pytest.raises(CheckpointError) as e:
            load_hertz_dev(path)
    assert str(e.value).startswith(f"{path}: the 'codec' field of its header's extra is {value!r}")
    assert "\n" not in str(e.value)
    assert load_hertz_dev(path, codec=None).codec is None


def test_files_cut_short_or_empty_are_named_so_wherever_a_model_or_adapter_is_expected(tmp_path):
    """A checkpoint cut short (an interrupted copy or download: in its tensors, or in its header),
    a training state `.pt` cut short, an empty file: one CheckpointError (AdapterError for an
    adapter) saying so. The `.pt` was a zipfile.BadZipFile traceback in every loader and script, the
    others 'a file that is neither safetensors nor PyTorch'; a LoRA run's training state given as
    the adapter names the adapter exported beside it (it was 'header too large')."""
    from model.lora import AdapterError
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    data = model.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    folder, _ = training_folder(tmp_path)
    state = (folder.folder / "latest.pt").read_bytes()
    cases = {"tensors.safetensors": (data[:len(data) - 10], f"a safetensors file cut short: {len(data) - 10} bytes of "
                                                            f"the {len(data)} its header describes"),
             "header.safetensors": (data[:100], f"a safetensors file cut short: 100 bytes, shorter than the "
                                                f"{header_end} of its header"),
             "state.pt": (state[:len(state) // 2], "a PyTorch file cut short or damaged"),
             "empty.safetensors": (b"", "an empty file")}
    for name, (content, found) in cases.items():
        (tmp_path / name).write_bytes(content)
        for load in (load_codec, load_hertz_dev):
            with pytest.raises(CheckpointError) as e:
                load(tmp_path / name)
            assert str(e.value).startswith(f"{tmp_path / name}: expected a ") and f", found {found}" in str(e.value)
        with pytest.raises(AdapterError, match=f"^{re.escape(str(tmp_path / name))} is not an adapter file: it is "
                                               f"{re.escape(found)}"):
            load_hertz_dev(model, adapter=tmp_path / name)
    lora_run = tmp_path / "lora"
    lora_run.mkdir()
    torch.save({"model": {}, "optimizer": {}, "codec_source": None, "step": 2}, lora_run / "latest.pt")
    (lora_run / "latest.adapter.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=re.escape(f"{lora_run / 'latest.pt'} is not an adapter file: it is a "
                                                     "transformer training state; the adapter exported beside it is "
                                                     f"{lora_run / 'latest.adapter.safetensors'}")):
        load_hertz_dev(model, adapter=lora_run / "latest.pt")


def test_a_header_cut_blank_or_not_json_is_named_so_not_a_foreign_file(tmp_path):
    """A file cut within the last 8 bytes of its header was '12941 bytes, shorter than its own
    12936-byte header' (the 8 bytes of its length not counted); one cut at exactly 8 bytes, one
    whose header is zeroed (in part or whole) and one whose first byte flipped (its length one off,
    cutting its JSON or taking in a byte after it) were 'a file that is neither safetensors nor
    PyTorch'. Now: cut short against 8 + its length, a blank header, a header that is not JSON."""
    model = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    data = model.read_bytes()
    length = int.from_bytes(data[:8], "little")
    end, mid = 8 + length, 8 + length // 2
    cases = {"last-bytes": (data[:end - 3], f"a safetensors file cut short: {end - 3} bytes, shorter than the {end} of "
                                            "its header (an incomplete copy or download?)"),
             "at-8": (data[:8], f"a safetensors file cut short: 8 bytes, shorter than the {end} of its header (an "
                                "incomplete copy or download?)"),
             "zeroed": (data[:mid] + bytes(64) + data[mid + 64:], "a damaged safetensors file (its header is not "
                                                                  "valid JSON)"),
             "blank": (data[:8] + bytes(length) + data[end:], "a damaged safetensors file (its header is blank)"),
             "first-byte": (bytes([data[0] ^ 1]) + data[1:], "a damaged safetensors file (its header is not valid "
                                                             "JSON)")}
    for name, (content, found) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_codec(path)
        assert str(e.value) == f"{path}: expected a codec checkpoint (.safetensors), found {found}", name


def test_an_adapter_given_for_a_model_names_its_base(tmp_path):
    """A LoRA adapter file where a transformer checkpoint is expected (--variant, --checkpoint):
    one line naming the base it goes on and how to pass it; it said 'found a adapter' and no more."""
    from model.lora import LoRAConfig, apply_lora, base_fingerprint, save_adapter
    base = save_transformer(tmp_path / "base.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    model = build(HertzDev, TRANSFORMER_PRESETS["tiny"])
    cfg = LoRAConfig(rank=2, alpha=4.0)
    apply_lora(model, **dataclasses.asdict(cfg))
    adapter = save_adapter(tmp_path / "best.adapter.safetensors", model, cfg, base_fingerprint(base), str(base))
    with pytest.raises(CheckpointError) as e:
        load_hertz_dev(adapter)
    assert str(e.value) == (f"{adapter}: expected a transformer checkpoint (.safetensors), found an adapter; load the "
                            f"base it was trained on ({base}) and pass the adapter as adapter= (--adapter, ADAPTER)")


def test_device_and_dtype_are_taken_by_name_and_checked_before_any_weights(tmp_path):
    """dtype="bfloat16" was a TypeError from deep inside Module.to, raised after the weights were
    read; device="gpu" or a GPU this machine lacks failed after reading (official: after the
    download). Now a name or a torch object works, and a bad one is a ValueError naming it first."""
    path = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]), str(path))
    assert next(load_codec(path, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    loaded = load_hertz_dev(model, device=torch.device("cpu"), dtype="float16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    (tmp_path / "noise.bin").write_bytes(os.urandom(64))  # reading it would be a CheckpointError
    for kwargs, message in ((dict(dtype="bf16"), r"dtype= 'bf16': expected auto, bfloat16, float16, float32"),
                            (dict(dtype=torch.int8), r"dtype= torch.int8: expected"),
                            (dict(device="gpu"), r"device= 'gpu': expected auto, cpu, cuda"),
                            (dict(device="cuda:99"), r"device= cuda:99: (only \d+ GPU|no GPU is visible)")):
        with pytest.raises(ValueError, match=message):
            load_codec(tmp_path / "noise.bin", **kwargs)
        with pytest.raises(ValueError, match=message):
            load_hertz_dev(tmp_path / "noise.bin", **kwargs)
        with pytest.raises(ValueError, match=message):  # before looking for (or downloading) the official files
            load_hertz_dev("duplex", ckpt_dir=tmp_path / "empty", offline=True, **kwargs)


def test_saving_the_wrong_object_is_a_type_error_naming_it_and_writes_nothing(tmp_path):
    """save_codec(path, a HertzDev) wrote a 'codec' file no loader could read; save_transformer of
    a Codec, or with the Codec object as codec_source, failed deep (in json). The Path that
    save_codec returns is taken as codec_source (it was a JSON error)."""
    codec, model = build(Codec, CODEC_PRESETS["tiny"]), build(HertzDev, TRANSFORMER_PRESETS["tiny"])
    with pytest.raises(TypeError, match="codec must be a Codec, got HertzDev: its codec is model.codec"):
        save_codec(tmp_path / "a.safetensors", model)
    with pytest.raises(TypeError, match="model must be a HertzDev, got Codec: a codec is saved with save_codec"):
        save_transformer(tmp_path / "b.safetensors", codec)
    with pytest.raises(TypeError, match="codec_source must be the path of the codec .*save it with save_codec"):
        save_transformer(tmp_path / "c.safetensors", model, codec)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_codec(None, codec)
    assert list(tmp_path.iterdir()) == []
    codec_path = save_codec(tmp_path / "codec.safetensors", codec)
    loaded = load_hertz_dev(save_transformer(tmp_path / "model.safetensors", model, codec_path))
    assert torch.equal(loaded.codec.compressor.proj_out.bias, codec.compressor.proj_out.bias)


def test_a_loaded_model_saved_again_keeps_its_codec_and_a_bad_codec_source_is_refused_when_saving(tmp_path,
                                                                                                monkeypatch):
    """save_transformer(path, load_hertz_dev(...)) (the README's quantized copy, done once) recorded
    no codec, so the copy loaded without one and generating failed; it now records the codec the
    model was loaded with (absolute, with its fingerprint), so the copy decodes with the same codec
    and is refused like its original once that codec changes. A codec_source that is not one of our
    codecs was written and failed only when loaded."""
    from model.latents import codec_fingerprint
    torch.manual_seed(0)
    codec = build(Codec, CODEC_PRESETS["tiny"])
    codec_path = save_codec(tmp_path / "codec.safetensors", codec)
    original = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]),
                                codec_path, extra={"codec_fingerprint": codec_fingerprint(codec)})
    monkeypatch.chdir(tmp_path)
    copy = save_transformer("int8.safetensors", load_hertz_dev(original, quantize="int8"))
    monkeypatch.chdir("/")  # recorded absolute: found from another working folder
    meta = read_metadata(tmp_path / "int8.safetensors")
    assert meta["extra"]["codec"] == str(codec_path) and meta["quantization"]["mode"] == "int8"
    assert meta["extra"]["codec_fingerprint"] == codec_fingerprint(codec)
    assert torch.equal(load_hertz_dev(tmp_path / copy.name).codec.compressor.proj_out.bias,
                       codec.compressor.proj_out.bias)
    save_codec(codec_path, build(Codec, CODEC_PRESETS["tiny"]))  # trained further in place
    with pytest.raises(CheckpointError, match="is now another"):
        load_hertz_dev(tmp_path / copy.name)
    for bad, error in ((tmp_path / "missing.safetensors", FileNotFoundError), (original, CheckpointError),
                       ("duplex", FileNotFoundError)):
        with pytest.raises(error):
            save_transformer(tmp_path / "bad.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]), bad)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("writer", ["model.checkpoint.atomic_write", "model.files.replace_atomically"])
def test_a_temporary_left_by_a_writer_killed_before_its_rename_is_removed_by_the_next(tmp_path, writer):
    """A writer SIGKILLed between writing its temporary `.NAME.<hex>.tmp` and renaming it into place
    left the temporary for good (a latents folder's shard lists and manifest, the dataset index, a
    saved WAV, a model file). The temporary is locked by its writer until renamed, and the next
    writer of NAME removes those it can lock; a live writer's (locked) stays."""
    from killed_writer import killed_writer, stopped_writer
    module, function = writer.rsplit(".", 1)
    target = tmp_path / "shard_00000.json"
    code = (f"from {module} import {function}\n"
            f"{function}({str(target)!r}, lambda tmp: pathlib.Path(tmp).write_text('{{}}'))")
    live, held = stopped_writer(code, target.name)
    dead = tmp_path / killed_writer(code, target.name)
    try:
        assert dead.is_file() and (tmp_path / held).is_file() and not target.exists()
        write = getattr(__import__(module, fromlist=[function]), function)
        write(target, lambda tmp: Path(tmp).write_text("[]"))
        assert not dead.exists(), "the temporary of the killed writer is still there"
        assert (tmp_path / held).is_file(), "the temporary of a live writer was removed"
        assert target.read_text() == "[]"
    finally:
        live.kill()
        live.communicate()
    write(target, lambda tmp: Path(tmp).write_text("[1]"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_an_atomic_write_works_where_there_is_no_fcntl(tmp_path):
    """Where Python has no fcntl (Windows, where the client writes its recordings through
    model.files.replace_atomically), the temporaries are written unlocked and none is known dead:
    the lock of the temporaries was an ImportError there."""
    target = tmp_path / "chat.wav.json"
    code = ("import sys, pathlib\nsys.modules['fcntl'] = None  # as on Windows: import fcntl fails\n"
            "from model.files import drop_dead_temporaries, replace_atomically\n"
            f"replace_atomically({str(target)!r}, lambda tmp: pathlib.Path(tmp).write_text('[1]'))\n"
            f"print(drop_dead_temporaries({str(tmp_path)!r}))\n")
    (tmp_path / ".other.json.0123abcd.tmp").write_text("")  # a temporary of unknown state: kept
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr[-2000:]
    assert target.read_text() == "[1]"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.0123abcd.tmp", target.name]


def test_a_temporary_s_name_is_shortened_to_an_end_and_names_are_counted_as_their_file_system_does(tmp_path):
    """Where a folder takes names shorter than a temporary's hash and suffix (NAME_MAX 14: a minix
    file system; 12: msdos), shortening the temporary's prefix never ended (the empty head cut again
    and again): the write hung. (The OS says 14 here; the disk takes more, so the write completes.)
    And names were counted in UTF-8 bytes everywhere, where Windows (the client runs there) counts
    UTF-16 code units: 100 CJK characters, 300 bytes, were refused as longer than NTFS's 255."""
    target = tmp_path / "a-recording.wav"
    code = ("import os, pathlib\nos.pathconf = lambda path, name: 14  # as minix says\n"
            "from model.files import replace_atomically\n"
            f"replace_atomically({str(target)!r}, lambda tmp: pathlib.Path(tmp).write_text('[1]'))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert target.read_text() == "[1]" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    from model.files import NAME_UNITS, name_length
    cjk = "語" * 100 + ".wav"
    assert name_length(cjk, "UTF-16 code units") == 104 and name_length(cjk, "bytes") == 304
    assert name_length("😀", "UTF-16 code units") == 2  # (a surrogate pair)
    assert NAME_UNITS == ("UTF-16 code units" if os.name == "nt" else "bytes")


def test_stray_tensors_beside_the_model_s_are_refused(tmp_path):
    """A checkpoint with tensors outside its parts (another tool's `codec.*` in a transformer file, a
    second head; an unprefixed tensor in a codec file), its hash consistent: each part is loaded
    strictly, but these were ignored unsaid. Now one CheckpointError naming them, before any weights
    are read."""
    model = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
    codec = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    extra = {"codec.encoder.conv.weight": torch.zeros(2), "lm_head2.weight": torch.zeros(3)}
    stray = rewritten(model, tmp_path / "stray.safetensors", state=lambda t: {**t, **extra})
    with pytest.raises(CheckpointError) as e:
        load_hertz_dev(stray, codec=None)
    assert str(e.value) == (f"{stray} does not match the model built from its config: unexpected 2 tensors "
                            "(codec.encoder.conv.weight, lm_head2.weight)")
    stray = rewritten(codec, tmp_path / "stray_codec.safetensors", state=lambda t: {**t, "decoderX.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match=re.escape(f"{stray} does not match the model built from its config: "
                                                        "unexpected 1 tensors (decoderX.weight)")):
        load_codec(stray)
    assert load_hertz_dev(model, codec=None) is not None and load_codec(codec) is not None


def test_a_safetensors_file_with_bytes_appended_or_refused_is_named_damaged(tmp_path):
    """A checkpoint with bytes after its data (two files joined, an append), or whose header does
    not fit its data (a dtype whose size its offsets do not hold): the safetensors library refuses
    both, and they were 'a file that is neither safetensors nor PyTorch'."""
    model = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    data = model.read_bytes()
    (tmp_path / "appended.safetensors").write_bytes(data + bytes(16))
    with pytest.raises(CheckpointError) as e:
        load_codec(tmp_path / "appended.safetensors")
    assert str(e.value) == (f"{tmp_path / 'appended.safetensors'}: expected a codec checkpoint (.safetensors), found a "
                            f"damaged safetensors file: {len(data) + 16} bytes, 16 more than the {len(data)} its header "
                            "describes (bytes appended to it?)")
    length = int.from_bytes(data[:8], "little")
    text = data[8:8 + length].decode()
    first = re.search(r'"dtype":"F32"', text)
    assert first is not None
    wrong = text[:first.start()] + '"dtype":"F64"' + text[first.end():]  # twice the bytes its offsets hold
    (tmp_path / "wrong.safetensors").write_bytes(data[:8] + wrong.encode() + data[8 + length:])
    with pytest.raises(CheckpointError) as e:
        load_codec(tmp_path / "wrong.safetensors")
    assert "found a damaged safetensors file (" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ["ours", "official"])
def test_a_weights_file_this_user_cannot_read_is_one_error_line(tmp_path, which):
    """A checkpoint (or an official file in --ckpt-dir) without read permission for this user: a
    PermissionError traceback from deep inside the loading; now one `error: cannot read FILE:
    Permission denied` line, exit status 2."""
    from unprivileged import unprivileged
    import numpy as np
    import soundfile as sf
    repo = Path(__file__).resolve().parents[1]
    sf.write(tmp_path / "prompt.wav", 0.1 * np.sin(np.arange(16000) / 5), 16000)
    if which == "ours":
        path = save_transformer(tmp_path / "model.safetensors", build(HertzDev, TRANSFORMER_PRESETS["tiny"]))
        flags = ["--variant", str(path), "--codec", str(save_codec(tmp_path / "c.safetensors",
                                                                     build(Codec, CODEC_PRESETS["tiny"])))]
    else:
        from model.hub import CODEC, OFFICIAL_FILES, QUANTIZER, VARIANTS
        folder = tmp_path / "official"
        folder.mkdir()
        for name in [QUANTIZER, *VARIANTS["duplex"][:2], CODEC]:
            (folder / OFFICIAL_FILES[name].filename).write_bytes(b"weights")
        path = folder / OFFICIAL_FILES[QUANTIZER].filename
        flags = ["--ckpt-dir", str(folder), "--offline"]
    path.chmod(0)
    r = subprocess.run(unprivileged() + [sys.executable, "complete.py", str(tmp_path / "prompt.wav"),
                                         str(tmp_path / "out.wav"), "--device", "cpu", "--seconds", "0.25", *flags],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: cannot read {path}: Permission denied", r.stderr[-3000:]
    assert not (tmp_path / "out.wav").exists()


def _saved_over(path: Path, source: Path) -> None:
    """`source`'s bytes renamed over `path`, as a training run's save replaces its `best.safetensors`."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(source.read_bytes()))


def test_a_checkpoint_saved_over_while_it_loads_is_loaded_whole_or_named(tmp_path, monkeypatch):
    """A loader reads a file's header first (its config, its recorded codec and fingerprint) and its
    tensors last, each through its own open of the path. A training run saving over the file in
    between (concurrency hunt, session 37) gave a model of one file's weights with the codec the
    other file records (noise, without a word), or a false "corrupted: re-export or re-download".
    Now a load whose file was replaced meanwhile starts again, and a file replaced at every
    attempt is one error line saying so."""
    import model.checkpoint as checkpoint
    import model.loading as loading
    from model.latents import codec_fingerprint
    exports, marks, prints = [], [], []
    for i in range(2):  # one architecture, each export trained with its own codec
        torch.manual_seed(i)
        codec = build(Codec, CODEC_PRESETS["tiny"])
        codec_file = save_codec(tmp_path / f"codec{i}.safetensors", codec)
        model = build(HertzDev, dataclasses.replace(TRANSFORMER_PRESETS["tiny"], duplex=True))
        exports.append(save_transformer(tmp_path / f"m{i}.safetensors", model, codec_source=str(codec_file)))
        marks.append(next(model.lm.parameters()).detach().clone())
        prints.append(codec_fingerprint(codec))
    best = tmp_path / "best.safetensors"
    _saved_over(best, exports[0])
    read_weights, saves = loading.read_weights, iter([exports[1]])

    def saved_over_first(path, *args, **kwargs):  # m1 saved over best after its header was read, before its tensors
        if Path(path) == best and (source := next(saves, None)) is not None:
            _saved_over(best, source)
        return read_weights(path, *args, **kwargs)
    monkeypatch.setattr(loading, "read_weights", saved_over_first)
    model = load_hertz_dev(best)
    assert torch.equal(next(model.lm.parameters()), marks[1]) and codec_fingerprint(model.codec) == prints[1]

    turns = iter(exports * 3)  # saved over at every attempt: named, not loaded
    saves = turns
    with pytest.raises(CheckpointError) as caught:
        load_hertz_dev(best)
    assert str(caught.value) == (f"{best} was replaced while it loaded (another process saved over it: a training "
                                 "run's save?); load it again")
    monkeypatch.setattr(loading, "read_weights", read_weights)

    # the header and the tensors of one read: a file saved over between them is that, not "corrupted"
    import safetensors.torch
    load_file = safetensors.torch.load_file

    def saved_over_then_read(path, *args, **kwargs):
        _saved_over(best, exports[0])
        return load_file(path, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "load_file", saved_over_then_read)
    with pytest.raises(checkpoint.FileReplaced, match="was replaced while it loaded"):
        checkpoint.read_weights(best)
    # a link made or removed (best.safetensors is a link of the latest export, which the next save renames away)
    # changes the file's change time, not the file read: no replacement
    version = checkpoint.file_version(best)
    os.link(best, tmp_path / "latest.safetensors")
    (tmp_path / "latest.safetensors").unlink()
    checkpoint.check_unreplaced(best, version)
