"""Presets, typed key=value overrides and their errors."""
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from config import (ConfigError, ConfigMismatch, apply_overrides, check_compatible, config_diff, fields_marked,
                    field_types, from_dict, parse_args)
from config.codec_config import PRESETS as CODEC_PRESETS
from config.codec_config import CodecConfig
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
from config.transformer_config import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def trainer_here(script, argv, cwd, capfd, monkeypatch):
    """`python SCRIPT ARGV` in `cwd`, by the script's `main` in this process, as the script runs it
    (`model.training.run_script`) and as `subprocess.run` returns it (`in_process.main_in_process`:
    the warnings raised added to stderr), without a process' start (importing torch, the optimizers'
    Dynamo: seconds a run). For the errors found before any slow work, the subject here."""
    import importlib

    from in_process import main_in_process
    from model.training import run_script
    main = importlib.import_module(Path(script).stem).main
    monkeypatch.chdir(cwd)
    return main_in_process(script, lambda args: run_script(lambda: main(args)), argv, capfd)


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


def test_none_as_a_bare_word_unsets_a_field_that_may_be_none():
    """`init_from=none` (as `eval_quantize=none` is written) was taken as a path named "none"
    (`init_from='none' is neither official, a variant ... nor an existing .safetensors file`), and
    `lm_kv_heads=none` was refused; a field that may be None takes it as None. A field that may
    not stays a string or an error."""
    cfg = parse_args(["--config=tiny", "init_from=official"], TRANSFORMER_PRESETS)
    for word in ("none", "None", "NULL"):
        cfg2 = apply_overrides(cfg, {"init_from": word, "lm_kv_heads": word, "base_quantize": word})
        assert (cfg2.init_from, cfg2.lm_kv_heads, cfg2.base_quantize) == (None, None, None)
    assert parse_args(["--config=tiny", "init_from=none"], CODEC_PRESETS).init_from is None
    assert parse_args(["--config=tiny", "eval_quantize=none"], TRANSFORMER_PRESETS).eval_quantize == "none"
    with pytest.raises(ConfigError, match="batch_size: expected an int, got 'none'"):
        parse_args(["--config=tiny", "batch_size=none"], TRANSFORMER_PRESETS)


UNKNOWN = [(CODEC_PRESETS, "batch_sise=3", "unknown config key 'batch_sise' for CodecConfig; did you mean "
                                           "batch_size? (--help lists every key)"),
           (CODEC_PRESETS, "batch-size=3", "unknown config key 'batch-size' for CodecConfig; did you mean "
                                           "batch_size? (--help lists every key)"),
           (CODEC_PRESETS, "max_step=3", "unknown config key 'max_step' for CodecConfig; did you mean max_steps, "
                                         "max_minutes or warmup_steps? (--help lists every key)"),
           (TRANSFORMER_PRESETS, "lr=1e-3", "unknown config key 'lr' for TransformerConfig; did you mean "
                                            "learning_rate or lora_rank? (--help lists every key)"),
           (CODEC_PRESETS, "bogus=1", "unknown config key 'bogus' for CodecConfig (--help lists every key)"),
           (CODEC_PRESETS, "=3", "cannot parse argument '=3': no key before '='; use key=value")]


@pytest.mark.parametrize("presets, arg, message", UNKNOWN)
def test_an_unknown_key_suggests_the_closest(presets, arg, message):
    """The error listed all 60-odd keys on one line, whatever the key (`=3`: key ''); now the
    closest ones: a typo, dashes for underscores, initials."""
    with pytest.raises(ConfigError) as e:
        parse_args([arg], presets)
    assert str(e.value) == message


@pytest.mark.parametrize("script, arg, message", [
    ("train_codec", "stage=lm", "unknown config key 'stage' for CodecConfig: it is a key of train_transformer.py "
                                "(TransformerConfig), not of this script"),
    ("train_transformer", "mel_weight=1", "unknown config key 'mel_weight' for TransformerConfig: it is a key of "
                                          "train_codec.py (CodecConfig), not of this script")])
def test_a_key_of_the_other_trainer_names_that_trainer(script, arg, message):
    """A transformer key given to the codec trainer (or the other way round) was an unknown key
    like a typo; the trainer names the script it belongs to (before anything is read)."""
    main = __import__(script).main
    with pytest.raises(ConfigError) as e:
        main(["--config", "tiny", arg])
    assert str(e.value) == message


@pytest.mark.parametrize("arg,field", [("batch_size=1.5", "batch_size"), ("compile=maybe", "compile"),
                                       ("learning_rate=fast", "learning_rate"), ("strides=5", "strides"),
                                       ("strides=(2, 'a')", "strides"), ("lm_kv_heads=2.0", "lm_kv_heads")])
def test_wrong_type_is_a_clear_error(arg, field):
    presets = TRANSFORMER_PRESETS if field == "lm_kv_heads" else CODEC_PRESETS
    with pytest.raises(ConfigError, match=field):
        parse_args([arg], presets)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_a_float_field_given_nan_or_inf_is_refused_as_not_finite(value):
    """`learning_rate=nan` was refused as "expected a float", which it is to Python: the error
    says what is wrong with it."""
    with pytest.raises(ConfigError) as e:
        parse_args([f"learning_rate={value}"], CODEC_PRESETS)
    assert str(e.value) == f"learning_rate: expected a finite number, got {value!r}"


@pytest.mark.parametrize("presets, arg, message", [
    (TRANSFORMER_PRESETS, "base_quantize=int4", "base_quantize: expected one of int8 or None, got 'int4'"),
    (TRANSFORMER_PRESETS, "lm_ff_dim=wide", "lm_ff_dim: expected an int or None, got 'wide'"),  # (none: None)
    (CODEC_PRESETS, "init_from=5", "init_from: expected a string or None, got 5")])
def test_a_wrong_value_of_an_optional_field_names_what_it_takes(presets, arg, message):
    """An Optional field's error said `expected Optional`: not its choices nor its type."""
    with pytest.raises(ConfigError) as e:
        parse_args([arg], presets)
    assert str(e.value) == message


def test_unknown_preset_and_bad_argument():
    with pytest.raises(ConfigError, match="tiny"):
        parse_args(["--config", "huge"], CODEC_PRESETS)
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(["batch_size"], CODEC_PRESETS)


@pytest.mark.parametrize("argv, message", [
    (["learning_rate=1e-3", "batch_size=2", "learning_rate=2e-3"],
     "learning_rate is given twice (learning_rate=1e-3 and learning_rate=2e-3); give it once"),
    (["--batch_size=1", "batch_size=1"], "batch_size is given twice (--batch_size=1 and batch_size=1); give it once"),
    (["--config", "tiny", "--config=small"], "--config is given twice (--config tiny and --config=small); give it once")])
def test_a_key_given_twice_is_an_error_naming_it(argv, message):
    """The second of two values for one key (or two presets) silently won: a command line edited
    in one place and not the other trained with a value nobody meant. Now an error naming both."""
    with pytest.raises(ConfigError) as e:
        parse_args(argv, CODEC_PRESETS)
    assert str(e.value) == message


@pytest.mark.parametrize("presets, key", [(CODEC_PRESETS, "checkpoint_dir"), (CODEC_PRESETS, "init_from"),
                                          (TRANSFORMER_PRESETS, "latents_dir"), (TRANSFORMER_PRESETS, "codec_checkpoint"),
                                          (TRANSFORMER_PRESETS, "ckpt_dir"), (TRANSFORMER_PRESETS, "val_data_path")])
def test_a_path_starting_with_a_tilde_is_in_the_home_folder(presets, key, tmp_path, monkeypatch):
    """`checkpoint_dir=~/runs` reaches the script unexpanded from zsh or in quotes, and made a
    folder named `~` in the current one; paths are expanded, other strings are not."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_args([f"{key}=~/runs/a", "wandb_project=~x"], presets)
    assert getattr(cfg, key) == str(tmp_path / "runs" / "a") and cfg.wandb_project == "~x"


def test_from_dict_round_trip_turns_lists_into_tuples():
    cfg = apply_overrides(TRANSFORMER_PRESETS["tiny"], {"fsq_levels": (8, 8, 8)})
    data = dataclasses.asdict(cfg)
    data["fsq_levels"] = list(data["fsq_levels"])
    assert from_dict(type(cfg), data) == cfg
    with pytest.raises(ConfigError):
        from_dict(type(cfg), {**data, "bogus": 1})


@pytest.mark.parametrize("cls, key, value, message", [
    (TransformerConfig, "eps", -1.0, "eps: expected a number > 0, got -1.0"),
    (TransformerConfig, "theta", 0.5, "theta: expected a number > 1, got 0.5"),
    (TransformerConfig, "resynth_heads", 7, "resynth_dim=4096 and resynth_heads=7: the heads split resynth_dim"),
    (CodecConfig, "strides", [2, 4], "strides=(2, 4) and channel_ratios=(4, 8, 16, 16, 16, 16) need one item per"),
])
def test_from_dict_checks_ranges_and_the_architecture_as_overrides_and_trainers_do(cls, key, value, message):
    """What a saved config (a checkpoint's header) rebuilds is checked as an override is, and by the
    architecture's own check the trainers call: from_dict checked the types alone, so a header's
    eps=-1 or heads that do not divide the width built a model of NaN outputs or an AssertionError.
    Every preset passes."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        from_dict(cls, {**dataclasses.asdict(cls()), key: value})
    for presets in (CODEC_PRESETS, TRANSFORMER_PRESETS):
        for cfg in presets.values():
            assert from_dict(type(cfg), json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_help_lists_fields(tmp_path):
    code = "import sys; from config import parse_args; from config.codec_config import PRESETS; parse_args(sys.argv[1:], PRESETS)"
    out = subprocess.run([sys.executable, "-c", code, "--config", "small", "--help"], capture_output=True, text=True,
                         cwd=str(tmp_path.parent), env={"PYTHONPATH": str(__import__('pathlib').Path(__file__).parents[1])})
    assert out.returncode == 0 and "batch_size=32" in out.stdout and "hertz_dev" in out.stdout
    assert "gan_loss='lsgan'  (one of: lsgan, hinge)" in out.stdout
    assert "dtype='bfloat16'  (one of: bfloat16, float16, float32)" in out.stdout
    assert "device='cuda'  (one of: cpu, cuda, cuda:N or mps)" in out.stdout


def test_help_lists_the_choices_of_every_enumerated_field(capsys):
    """Every Literal field's choices are in its --help line, an Optional one's with None (the README
    says so; base_quantize=None was listed without its choice, int8)."""
    for presets in (CODEC_PRESETS, TRANSFORMER_PRESETS):
        with pytest.raises(SystemExit):
            parse_args(["--help"], presets)
        lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
        for key, tp in field_types(type(presets["tiny"])).items():
            literal = [a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is typing.Literal]
            if literal:
                choices = [*map(str, typing.get_args(literal[0]))] + (["None"] if tp is not literal[0] else [])
                assert lines[key].endswith(f"(one of: {', '.join(choices)})"), lines[key]


def test_help_describes_the_preset_named_after_it_and_an_unknown_one_is_an_error(tmp_path, capfd, monkeypatch):
    """`--help --config small` describes small (it described tiny), and `--config nope --help`
    is one `error:` line of the trainer (it was a KeyError traceback)."""
    code = ("import sys; from config import parse_args; from config.codec_config import PRESETS; "
            "parse_args(sys.argv[1:], PRESETS)")
    env = {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, "--help", "--config", "small"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0 and "(preset 'small')" in out.stdout and "batch_size=32" in out.stdout, out.stderr
    r = trainer_here("train_codec.py", ["--config", "nope", "--help"], tmp_path, capfd, monkeypatch)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["error: unknown preset 'nope'; choose one of tiny, small, small_fast, "
                                             "hertz_dev"]


@pytest.mark.parametrize("script, key", [("train_codec.py", "checkpoint_dir"), ("train_codec.py", "train_data_path"),
                                         ("train_transformer.py", "latents_dir"),
                                         ("train_transformer.py", "init_from")])
def test_an_empty_value_is_an_error_not_the_current_folder(tmp_path, script, key, capfd, monkeypatch):
    """`checkpoint_dir=` used to train into the current folder (and `train_data_path=` to scan
    all of it, .venv included): an empty value is one `error:` line, and nothing is written."""
    r = trainer_here(script, ["--config", "tiny", "device=cpu", f"{key}="], tmp_path, capfd, monkeypatch)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {key}: no value given ({key}=); give one, e.g. {key}="), lines
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):  # an unknown key is named as such
        parse_args(["bogus="], CODEC_PRESETS)


ENUMS = [(CODEC_PRESETS, "dtype=bf16", ("bfloat16", "float16", "float32")),
         (CODEC_PRESETS, "gan_loss=x", ("lsgan", "hinge")),
         (CODEC_PRESETS, "wandb=on", ("online", "offline", "disabled")),
         (TRANSFORMER_PRESETS, "dtype=bf16", ("bfloat16", "float16", "float32")),
         (TRANSFORMER_PRESETS, "stage=foo", ("quantizer", "resynthesizer", "lm", "all")),
         (TRANSFORMER_PRESETS, "parallel=tp", ("ddp", "fsdp")),
         (TRANSFORMER_PRESETS, "mono_to_stereo=copy", ("silence", "duplicate"))]


@pytest.mark.parametrize("presets,arg,choices", ENUMS)
def test_unknown_enumerated_value_lists_the_choices(presets, arg, choices):
    key, value = arg.split("=")
    with pytest.raises(ConfigError) as e:
        parse_args([arg], presets)
    assert str(e.value) == f"{key}: expected one of {', '.join(choices)}; got {value!r}"
    for choice in choices:  # and every choice is accepted
        assert getattr(parse_args([f"{key}={choice}"], presets), key) == choice


@pytest.mark.parametrize("presets", [CODEC_PRESETS, TRANSFORMER_PRESETS])
def test_device_is_checked_for_its_shape(presets):
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert parse_args([f"device={device}"], presets).device == device
    for device in ("gpu", "cuda:x", "cuda1", "cpu "):
        with pytest.raises(ConfigError) as e:
            parse_args([f"device={device}"], presets)
        assert str(e.value) == f"device: expected cpu, cuda, cuda:N or mps; got {device!r}"


RANGES = [(CODEC_PRESETS, "batch_size=0", "batch_size: expected a number >= 1, got 0"),
          (CODEC_PRESETS, "segment_seconds=0", "segment_seconds: expected a number > 0, got 0.0"),
          (CODEC_PRESETS, "learning_rate=-1e-4", "learning_rate: expected a number >= 0, got -0.0001"),
          (CODEC_PRESETS, "kl_weight=1e999", "kl_weight: expected a finite number >= 0, got inf"),
          (CODEC_PRESETS, "strides=(2,0,5)", "strides: expected each item >= 1, got (2, 0, 5)"),
          (CODEC_PRESETS, "beta2=1", "beta2: expected a number >= 0 and < 1, got 1.0"),
          (TRANSFORMER_PRESETS, "lm_heads=0", "lm_heads: expected a number >= 1, got 0"),
          (TRANSFORMER_PRESETS, "lm_kv_heads=-2", "lm_kv_heads: expected a number >= 1, got -2"),
          (TRANSFORMER_PRESETS, "lora_dropout=1.5", "lora_dropout: expected a number >= 0 and < 1, got 1.5"),
          (TRANSFORMER_PRESETS, "eval_interval=0", "eval_interval: expected a number >= 1, got 0"),
          # no step to train: the run would evaluate once and say done, with no checkpoint written
          (CODEC_PRESETS, "max_steps=0", "max_steps: expected a number >= 1, got 0"),
          (TRANSFORMER_PRESETS, "max_steps=0", "max_steps: expected a number >= 1, got 0"),
          # hop = window / 4: a window under 4 samples has no hop (torch.stft's error in the first step)
          (CODEC_PRESETS, "mel_windows=(2,64)", "mel_windows: expected each item >= 4, got (2, 64)"),
          # the lowest of the MRD discriminator's five bands (a tenth of window / 2 + 1 bins) empty below 18:
          # a convolution's traceback in the first step
          (CODEC_PRESETS, "mrd_windows=(512,16)", "mrd_windows: expected each item >= 18, got (512, 16)"),
          # FSQ divides by level - 1: a NaN loss at the first step, after the corpus was encoded
          (TRANSFORMER_PRESETS, "fsq_levels=(8,1)", "fsq_levels: expected each item >= 2, got (8, 1)"),
          # the audio divided by 1e-30: infinite latents, a NaN loss at step 0 blamed on the data
          (CODEC_PRESETS, "norm_stddev=1e-30", "norm_stddev: expected a number >= 3.0517578125e-05, got 1e-30"),
          # the rotary rates theta ** (-2i / head_dim) infinite in float32: NaN at the first step, blamed on the data
          (TRANSFORMER_PRESETS, "theta=1e-300", "theta: expected a number > 1, got 1e-300"),
          (TRANSFORMER_PRESETS, "theta=1", "theta: expected a number > 1, got 1.0")]


@pytest.mark.parametrize("presets,arg,message", RANGES)
def test_values_outside_a_fields_range_are_refused_naming_the_field(presets, arg, message):
    with pytest.raises(ConfigError) as e:
        parse_args([arg], presets)
    assert str(e.value) == message


@pytest.mark.parametrize("presets", [CODEC_PRESETS, TRANSFORMER_PRESETS])
def test_every_preset_value_is_inside_its_range_and_the_bounds_are_accepted(presets):
    """Each preset's own values pass its fields' ranges (overriding a field with its preset value
    is never refused), and so do the bounds themselves: 0 where 0 is allowed, None for optional
    sizes."""
    for name, cfg in presets.items():
        ranged = [f for f in dataclasses.fields(cfg) if {"min", "above", "below"} & set(f.metadata)]
        assert len(ranged) > 20
        assert apply_overrides(cfg, {f.name: getattr(cfg, f.name) for f in ranged}) == cfg, name
    cfg = next(iter(presets.values()))
    assert apply_overrides(cfg, {"warmup_steps": 0, "grad_clip": 0.0, "beta1": 0.0}).warmup_steps == 0
    if "lm_kv_heads" in {f.name for f in dataclasses.fields(cfg)}:
        assert apply_overrides(cfg, {"lm_kv_heads": None}).lm_kv_heads is None


@pytest.mark.parametrize("script, key", [("train_codec.py", "checkpoint_dir"),
                                         ("train_transformer.py", "latents_dir")])
def test_a_file_where_a_run_folder_goes_is_one_error_line_before_anything_slow(tmp_path, script, key, capfd,
                                                                             monkeypatch):
    (tmp_path / "taken").write_text("not a folder")
    out = trainer_here(script, ["--config", "tiny", f"{key}={tmp_path / 'taken'}",
                                f"train_data_path={tmp_path / 'no-corpus'}"], tmp_path, capfd, monkeypatch)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr == f"error: {key}={str(tmp_path / 'taken')!r} is a file, not a folder\n"


def test_stages_are_the_stage_choices():
    from model.objectives import STAGE_LOSSES, STAGES
    choices = typing.get_args(typing.get_type_hints(TransformerConfig)["stage"])
    assert set(STAGES) == set(STAGE_LOSSES) == set(choices)


def test_bad_enumerated_value_is_one_error_line_of_the_codec_trainer(tmp_path, capfd, monkeypatch):
    out = trainer_here("train_codec.py", ["--config", "tiny", "dtype=bf16", f"checkpoint_dir={tmp_path / 'run'}"],
                       tmp_path, capfd, monkeypatch)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr == "error: dtype: expected one of bfloat16, float16, float32; got 'bf16'\n"
    assert not (tmp_path / "run").exists()


# The specification of what each checkpoint check compares (written once, here).
CODEC_ARCH = ("input_channels", "output_channels", "encode_channels", "decode_channel_multiplier", "kernel_size",
              "bias", "channel_ratios", "strides", "latent_dim", "norm_stddev", "weight_norm", "activation", "sample_rate")
CODEC_DISC = ("mpd_periods", "mpd_channels", "mrd_windows", "mrd_channels")
CODEC_RESUME = ("segment_seconds", "batch_size", "grad_accum_steps", "seed")
CODEC_SCHEDULE = ("learning_rate", "min_lr", "warmup_steps", "max_steps", "disc_learning_rate", "disc_start_step",
                  "ema_decay")
TRANSFORMER_ARCH = ("latent_dim", "duplex", "fsq_levels", "quantizer_dim", "quantizer_ff_dim", "lm_dim", "lm_layers",
                    "lm_heads", "lm_kv_heads", "lm_ff_dim", "resynth_dim", "resynth_layers", "resynth_heads",
                    "resynth_kv_heads", "resynth_ff_dim", "num_components", "plex_roll", "theta", "eps")
TRANSFORMER_RESUME = ("stage", "finetune", "lora_rank", "lora_alpha", "lora_targets", "base_quantize")


def test_marked_fields_are_the_specification():
    assert set(fields_marked(CodecConfig, "arch")) == set(CODEC_ARCH)
    assert set(fields_marked(CodecConfig, "disc")) == set(CODEC_DISC)
    assert set(fields_marked(CodecConfig, "resume")) == set(CODEC_RESUME)
    assert set(fields_marked(CodecConfig, "schedule")) == set(CODEC_SCHEDULE)
    assert set(fields_marked(TransformerConfig, "arch")) == set(TRANSFORMER_ARCH)
    assert set(fields_marked(TransformerConfig, "resume")) == set(TRANSFORMER_RESUME)
    assert fields_marked(TransformerConfig, "disc", "schedule") == ()
    # several marks: their union, in declaration order
    both = fields_marked(CodecConfig, "arch", "disc")
    assert set(both) == set(CODEC_ARCH + CODEC_DISC)
    names = [f.name for f in dataclasses.fields(CodecConfig)]
    assert list(both) == sorted(both, key=names.index)


def test_config_diff_names_each_differing_field():
    cfg = CODEC_PRESETS["tiny"]
    other = dataclasses.replace(cfg, encode_channels=8, strides=(2, 4), batch_size=2, mel_weight=1.0)
    saved = json.loads(json.dumps(dataclasses.asdict(other)))  # tuples come back as lists, as from a .safetensors
    del saved["kernel_size"]  # a field an older checkpoint did not have is not compared
    assert config_diff(saved, cfg, CODEC_ARCH) == [
        "  encode_channels: the checkpoint has 8, this run has 4",
        f"  strides: the checkpoint has (2, 4), this run has {cfg.strides!r}"]
    assert config_diff(saved, cfg, ("kernel_size", "mel_windows", "channel_ratios")) == []
    with pytest.raises(ConfigMismatch) as e:
        check_compatible(saved, cfg, CODEC_ARCH + CODEC_RESUME, "x.pt differs", "Do this.")
    assert str(e.value) == ("x.pt differs:\n  encode_channels: the checkpoint has 8, this run has 4\n"
                            f"  strides: the checkpoint has (2, 4), this run has {cfg.strides!r}\n"
                            "  batch_size: the checkpoint has 2, this run has 4\nDo this.")
    assert isinstance(e.value, ConfigError)  # the trainers' error exit names it in one `error:` block


FLAG_SCRIPTS = ["complete.py", "demo.py", "inference_client.py", "inference_server.py", "data/demo/prepare.py",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py"))]


@pytest.mark.parametrize("script, args, message", [
    ("demo.py", ["--seconds", "abc"], "argument --seconds: invalid float value: 'abc'"),
    ("data/demo/prepare.py", ["--minutes"], "argument --minutes: expected one argument"),
    ("inference_client.py", ["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ("inference_server.py", ["--port", "x"], "argument --port: invalid int value: 'x'"),
    ("benchmarks/server.py", ["--seconds"], "argument --seconds: expected one argument"),
], ids=["bad-type", "missing-value", "unknown-flag", "server", "benchmark"])
def test_a_bad_flag_is_one_error_line_naming_it_with_a_hint_to_help(script, args, message):
    """An unknown flag, a flag missing its value or of the wrong type: one `error:` line naming the
    flag and where the flags are listed, exit status 2; argparse printed its usage lines before
    `prog: error: ...`. A script's own check after parsing is the line alone, and --help is intact."""
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=60)
    name = Path(script).name
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {message} ({name} --help lists the flags)\n")
    if script == "data/demo/prepare.py":
        r = subprocess.run([sys.executable, str(ROOT / script), "--minutes", "nan"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: --minutes must be a finite number > 0")
        assert len(r.stderr.splitlines()) == 1
        r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("usage: prepare.py [-h] [--minutes MINUTES]")


@pytest.mark.parametrize("script, args, message", [
    ("complete.py", ["-take1.wav", "out.wav"], "the following arguments are required: out"),
    ("inference_client.py", ["--input-wav", "-take1.wav", "--output-wav", "o.wav"],
     "argument --input-wav: expected one argument"),
], ids=["positional", "flag-value"])
def test_a_file_named_with_a_leading_dash_is_named_in_the_error(tmp_path, script, args, message):
    """A recording named `-take1.wav` is read by argparse as a flag, and its error blamed another
    argument ("the following arguments are required: out"): the line now names the file and how
    to give it."""
    (tmp_path / "-take1.wav").write_bytes(b"RIFF")
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    name = Path(script).name
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", f"error: {message} ({name} --help lists the flags); -take1.wav is a file, read as a flag: "
               "name it ./-take1.wav\n")


@pytest.mark.parametrize("args, named", [
    (["prompt.wav", "-take2.wav"], "-take2.wav"), (["prompt.wav", "-takes/2.wav"], "-takes/2.wav"),
    (["prompt.wav", "out.wav", "--bogus"], None), (["prompt.wav", "--seconds", "-0.5"], None),
], ids=["an-output", "a-path", "a-mistyped-flag", "a-negative-number"])
def test_an_output_named_with_a_leading_dash_is_named_in_the_error(tmp_path, args, named):
    """`complete.py prompt.wav -take2.wav` (an output, not there yet) said only "the following
    arguments are required: out": the hint named a dashed argument only when it was a file. Now one
    that is no flag and reads as a file name (an extension, a path separator) is named too."""
    r = subprocess.run([sys.executable, str(ROOT / "complete.py"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    hint = f"; {named} was read as a flag: to name a file so, write ./{named}\n"
    assert r.stderr.endswith(hint) if named else "read as a flag" not in r.stderr, r.stderr


@pytest.mark.parametrize("script", FLAG_SCRIPTS)
def test_every_script_with_flags_parses_them_with_the_shared_parser(script):
    """Each script's flags go through config.ArgumentParser, so its errors have the one format above."""
    text = (ROOT / script).read_text()
    assert "argparse.ArgumentParser(" not in text
    assert "ArgumentParser(" not in text or "from config import ArgumentParser" in text


@pytest.mark.parametrize("cls, presets, override, message", [
    (CodecConfig, CODEC_PRESETS, "seed=-1", "seed: expected a number >= 0 and < 9223372036854775808, got -1"),
    (TransformerConfig, TRANSFORMER_PRESETS, f"seed={2 ** 64}",
     f"seed: expected a number >= 0 and < 9223372036854775808, got {2 ** 64}"),
    (TransformerConfig, TRANSFORMER_PRESETS, "model_channel=0.0", "model_channel: expected one of 0, 1; got 0.0"),
    (TransformerConfig, TRANSFORMER_PRESETS, "model_channel=False", "model_channel: expected one of 0, 1; got False"),
    (CodecConfig, CODEC_PRESETS, "learning_rate=1" + "0" * 400,
     "learning_rate: expected a finite number, got an integer of 401 digits"),
], ids=["seed-negative", "seed-past-int64", "literal-float", "literal-bool", "float-overflow"])
def test_values_the_run_cannot_take_are_config_errors(cls, presets, override, message):
    """A seed below 0 or past 2**63 (a traceback at the first batch, after the data decoded, or from
    torch.manual_seed); a Literal given as 0.0 or false (taken as 0: `0.0 == False == 0`, each
    spelling its own latents cache key); a float of 401 digits (OverflowError)."""
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", "tiny", override], presets)
    assert str(e.value) == message


SLOW_IMPORT = """import runpy, sys, time
class Slow:  # the first import of {module!r}: a line on stderr, then a wait for the signal
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            print("importing", file=sys.stderr, flush=True)
            time.sleep(60)
sys.meta_path.insert(0, Slow())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig, status, by", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
@pytest.mark.parametrize("script, module, rest", [
    ("train_codec.py", "torch", " while starting"), ("train_transformer.py", "torch", " while starting"),
    ("complete.py", "numpy", " while starting"), ("inference_server.py", "fastapi", " while starting"),
    ("inference_server.py", "torch", " while loading: the server did not start")])  # (main's: the engine's)
def test_an_interrupt_while_a_script_imports_is_one_line_and_128_plus_the_signal(tmp_path, script, module, rest, sig,
                                                                                 status, by):
    """Ctrl-C while a script imports its packages (torch: seconds; here an import made slow) was a
    KeyboardInterrupt traceback (or an abort, inside torch's initialisation), and SIGTERM ended it
    without a word; `exit_on_interrupt` makes either one `interrupted` line, status 130 (143 for
    SIGTERM), as after the imports (`config.interrupted_exit`)."""
    import signal
    argv = [script, "--device", "cpu", "--offline", "--ckpt-dir", str(tmp_path), "--port", "0"] \
        if script == "inference_server.py" else [script]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT.format(module=module, argv=argv)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr.readline() == "importing\n"
        proc.send_signal(getattr(signal, sig))
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert (proc.returncode, err) == (status, f"interrupted ({by}){rest}\n")


def test_an_import_that_fails_within_exit_on_interrupt_gives_the_signals_their_handlers_back():
    """A script's imports failing within `exit_on_interrupt` (inference_server.py without fastapi is
    a SystemExit there, which a test or a notebook catches) left its handler set: the process' next
    Ctrl-C ended it with `interrupted (Ctrl-C) while starting`. The handlers now come back however
    the block ends."""
    import signal
    import threading
    from config import exit_on_interrupt
    assert threading.current_thread() is threading.main_thread()  # (where it sets handlers)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        with exit_on_interrupt():
            assert signal.getsignal(signal.SIGINT) is not before[0]  # (its own, while importing)
            raise SystemExit("error: fastapi is not installed")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
