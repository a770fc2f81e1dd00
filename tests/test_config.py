"""Presets, typed key=value overrides and their errors."""
import dataclasses
import subprocess
import sys

import pytest

from config import ConfigError, apply_overrides, from_dict, parse_args
from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS


@pytest.mark.parametrize("presets", [CODEC_PRESETS, TRANSFORMER_PRESETS])
def test_presets_exist_and_are_frozen(presets):
    assert {"tiny", "small", "hertz_dev"} <= set(presets)
    cfg = presets["tiny"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3


def test_hertz_dev_presets_are_the_official_architecture():
    c = CODEC_PRESETS["hertz_dev"]
    assert (c.encode_channels, c.decode_channel_multiplier, c.strides, c.channel_ratios, c.latent_dim) == \
        (16, 4, (2, 2, 4, 5, 5, 5), (4, 8, 16, 16, 16, 16), 32)
    t = TRANSFORMER_PRESETS["hertz_dev"]
    assert (t.lm_dim, t.lm_layers, t.lm_heads, t.resynth_layers, t.resynth_heads, t.vocab_size) == (4096, 32, 32, 8, 16, 32768)
    for presets in (CODEC_PRESETS, TRANSFORMER_PRESETS):
        for cfg in presets.values():
            hop = 1
            for s in getattr(cfg, "strides", (2, 2, 4, 5, 5, 5)):
                hop *= s
            assert hop == 2000


def test_overrides_are_typed():
    cfg = parse_args(["--config", "small", "batch_size=3", "learning_rate=1e-3", "compile=true",
                      "strides=(2, 2, 4, 5, 5, 5)", "device=cpu", "init_from=None"], CODEC_PRESETS)
    assert (cfg.batch_size, cfg.learning_rate, cfg.compile, cfg.device, cfg.init_from) == (3, 1e-3, True, "cpu", None)
    assert cfg.encode_channels == CODEC_PRESETS["small"].encode_channels
    cfg = parse_args(["--config=tiny", "learning_rate=1", "lm_kv_heads=2", "init_from=checkpoints/x.safetensors"],
                     TRANSFORMER_PRESETS)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.lm_kv_heads == 2 and cfg.init_from == "checkpoints/x.safetensors"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_args(["batch_sise=3"], CODEC_PRESETS)
    assert "batch_sise" in str(e.value) and "batch_size" in str(e.value) and "learning_rate" in str(e.value)


@pytest.mark.parametrize("arg,field", [("batch_size=1.5", "batch_size"), ("compile=maybe", "compile"),
                                       ("learning_rate=fast", "learning_rate"), ("strides=5", "strides"),
                                       ("strides=(2, 'a')", "strides"), ("lm_kv_heads=2.0", "lm_kv_heads")])
def test_wrong_type_is_a_clear_error(arg, field):
    presets = TRANSFORMER_PRESETS if field == "lm_kv_heads" else CODEC_PRESETS
    with pytest.raises(ConfigError, match=field):
        parse_args([arg], presets)


def test_unknown_preset_and_bad_argument():
    with pytest.raises(ConfigError, match="tiny"):
        parse_args(["--config", "huge"], CODEC_PRESETS)
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(["batch_size"], CODEC_PRESETS)


def test_from_dict_round_trip_turns_lists_into_tuples():
    cfg = apply_overrides(TRANSFORMER_PRESETS["tiny"], {"fsq_levels": (8, 8, 8)})
    data = dataclasses.asdict(cfg)
    data["fsq_levels"] = list(data["fsq_levels"])
    assert from_dict(type(cfg), data) == cfg
    with pytest.raises(ConfigError):
        from_dict(type(cfg), {**data, "bogus": 1})


def test_help_lists_fields(tmp_path):
    code = "import sys; from config import parse_args; from config.codec_config import PRESETS; parse_args(sys.argv[1:], PRESETS)"
    out = subprocess.run([sys.executable, "-c", code, "--config", "small", "--help"], capture_output=True, text=True,
                         cwd=str(tmp_path.parent), env={"PYTHONPATH": str(__import__('pathlib').Path(__file__).parents[1])})
    assert out.returncode == 0 and "batch_size=32" in out.stdout and "hertz_dev" in out.stdout
