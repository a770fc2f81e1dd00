"""Our checkpoint format: weights + config in one safetensors file; round trips rebuild the model."""
import dataclasses

import pytest
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
from model import Codec, HertzDev, build, load_codec, load_hertz_dev, save_codec, save_transformer
from model.checkpoint import atomic_write, read_metadata


@torch.no_grad()
def test_codec_round_trip(tmp_path):
    cfg = dataclasses.replace(CODEC_PRESETS["tiny"], encode_channels=5)  # a non-preset shape
    torch.manual_seed(0)
    codec = build(Codec, cfg).eval()
    path = save_codec(tmp_path / "codec.safetensors", codec)
    meta = read_metadata(path)
    assert meta["kind"] == "codec" and meta["config"]["encode_channels"] == 5
    loaded = load_codec(path)
    assert loaded.config.encode_channels == 5 and loaded.config.channel_ratios == cfg.channel_ratios
    audio = torch.randn(1, 1, 6000)
    assert torch.equal(loaded.encode(audio)[0], codec.encode(audio)[0])
    z = torch.randn(1, 3, 32)
    assert torch.equal(loaded.decode(z), codec.decode(z))


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


def test_wrong_kind_and_foreign_files_are_clear_errors(tmp_path):
    codec_path = save_codec(tmp_path / "codec.safetensors", build(Codec, CODEC_PRESETS["tiny"]))
    with pytest.raises(ValueError, match="not a transformer"):
        load_hertz_dev(codec_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a hertz-dev checkpoint"):
        load_codec(tmp_path / "other.safetensors")


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
