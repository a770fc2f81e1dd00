"""Config presets and `key=value` overrides shared by every script, and the `ArgumentParser` of
the scripts that take flags.

A config is a frozen dataclass. Scripts pick a named preset with `--config NAME` and override
any field with `key=value`; values are parsed with `ast.literal_eval` (bare words are taken as
strings; `none` or `null` is None where the field may be None) and checked against the field's
declared type, nanoGPT-configurator style, without exec; an enumerated option is a `Literal[...]`
field, so an unknown value is refused with the choices.

What a checkpoint must agree on is marked on the field itself, `field(metadata={"arch": True})`
(the network; also "disc", "resume", "schedule"): `fields_marked` lists the marked fields and
`config_diff` is the one comparison that resume, `init_from` and the codec fingerprint use.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import math
import operator
import os
import re
import signal
import sys
import threading
import types
import typing
from contextlib import contextmanager
from typing import Any, Iterable, Mapping, NoReturn, Sequence


def printable(text, newlines: bool = False) -> str:
    """`text` for a terminal: its unprintable characters (a newline, a tab, an escape sequence, a
    name's undecodable bytes) written as Python writes them in a string (`\\n`, `\\x1b`,
    `\\udcff`), the rest as it is; with `newlines`, its line breaks kept (a message of several
    lines by design, as ConfigMismatch's). A file's name may hold any of them, and the errors and
    warnings that name files must stay one line and cannot recolour or move the user's terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (newlines and c == "\n") else repr(c)[1:-1] for c in text)


@contextmanager
def exit_on_interrupt(rest: str = " while starting"):
    """Within it, Ctrl-C or SIGTERM ends the process at once with one line on stderr,
    `interrupted (Ctrl-C|SIGTERM)` and `rest`, and exit status 130, or 143 for SIGTERM, as
    `interrupted_exit` ends it later: around a script's imports (torch takes seconds), where Ctrl-C
    was a KeyboardInterrupt traceback (an abort, inside torch's own initialisation, which no
    exception may cross: hence an exit from the handler, with nothing begun to stop). Both signals
    get their handlers back as it ends, however it ends (an import that failed, caught by a test
    or a notebook). A signal ignored (a job started with nohup) stays ignored; outside the main
    thread, nothing."""
    if threading.current_thread() is not threading.main_thread():  # (handlers are set only there)
        yield
        return

    def exit_now(signum, frame):
        by = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        os.write(2, f"interrupted ({by}){rest}\n".encode())
        os._exit(143 if signum == signal.SIGTERM else 130)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, exit_now)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # (None: set outside Python)


def interrupted_exit(e: KeyboardInterrupt, rest: str) -> NoReturn:
    """End the process after a Ctrl-C or a SIGTERM (`Terminated`, from `sigterm_as_interrupt`):
    one line on stderr, `interrupted (Ctrl-C|SIGTERM)` and `rest` (on a line of its own under an
    open progress bar), exit code 130, or 143 for SIGTERM."""
    from tqdm import tqdm
    by = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
    tqdm.write(f"interrupted ({by}){rest}", file=sys.stderr)
    raise SystemExit(143 if isinstance(e, Terminated) else 130) from None


class Terminated(KeyboardInterrupt):
    """A SIGTERM received within `sigterm_as_interrupt` (a script encoding latents, loading weights,
    generating), raised where it is, as Ctrl-C raises KeyboardInterrupt, so that it stops the same
    way: what is done is kept (the encoding commits on the way out; SIGTERM's default ended the
    process there, losing what was encoded since the last commit, without a word)."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once, as in the loop
    raise Terminated


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raised as `Terminated` for the time of a `with` block of Python work that keeps what
    it has done when interrupted (the latents' encoding commits on its way out), in the main
    thread. Elsewhere SIGTERM keeps its own action: a handler of Python's runs only between
    bytecodes, so around a wait in native code (a rendezvous, a barrier waiting on a missing
    peer) it held the signal, and the process, until the wait ended (up to its 30 minutes)."""
    if threading.current_thread() is not threading.main_thread():  # (handlers are set only there)
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # (None: set outside Python)


@contextmanager
def stop_signals_held(ctrl_c: list):
    """Hold Ctrl-C, SIGTERM and SIGHUP while the body runs (a few renames putting a set of files
    in place: stopped midway, they would leave part of each set, a demo corpus's in
    `data/demo/prepare.py`, complete.py's completions in `model.audio.save_audio_set`); after it,
    a SIGTERM or SIGHUP that came is acted on as it would have been (by default, the process
    ends), and a Ctrl-C is appended to
    `ctrl_c`, for the caller to say so. Noted by a handler, not blocked: `pthread_sigmask` holds
    them from the main thread only, and one sent to the process then goes to another thread
    (tqdm's monitor), where its default action ends the process all the same."""
    came = []
    stops = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # (None: set outside Python)
        for s in dict.fromkeys(came):
            if s == signal.SIGINT:
                ctrl_c.append(s)
            else:
                os.kill(os.getpid(), s)


class OneLine:
    """Base of the errors and warnings whose messages name files: shown (`str`) as one `printable`
    line, wherever they are printed. `args` keep the message as given (a DataLoader worker's
    traceback, which torch raises again as such an error in the main process, keeps its lines)."""

    def __str__(self) -> str:
        return printable(super().__str__())


class ConfigError(ValueError):
    """A bad preset name, unknown key or wrongly typed value on the command line."""


class ConfigMismatch(ConfigError):
    """This run's config contradicts a checkpoint's in fields they must agree on."""


# Metadata of a free-form string field with a checked shape: (regular expression, what it means).
DEVICE = {"pattern": (r"cpu|mps|cuda(:\d+)?", "cpu, cuda, cuda:N or mps")}

# Metadata of a file or folder field: `~` is expanded (a shell leaves it in `key=~/x`: zsh, or quoted),
# so that `checkpoint_dir=~/runs` is not a folder named `~` in the current one.
PATH = {"path": True}

# Metadata of a number field (or of each number of a tuple field) with a range, checked on
# overrides (`apply_overrides`) with the field named in the error; combined with the marks below,
# e.g. `field(default=32, metadata={**RESUME, **COUNT})`. Floats must be finite as well.
COUNT = {"min": 1}                   # sizes, steps between events, widths: >= 1
NON_NEGATIVE = {"min": 0}            # loss weights, learning rates, limits where 0 means "none"
POSITIVE = {"above": 0}              # lengths in seconds, scales: > 0
SEED = {"min": 0, "below": 2 ** 63}   # what torch.manual_seed and numpy's generators take (as complete.py --seed)
FRACTION = {"min": 0, "below": 1}    # Adam's betas, dropout: in [0, 1)
WINDOW = {"min": 4}                  # STFT windows in samples, hop = window / 4: >= 4


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected(tp) -> str:
    """What a value of type `tp` is, in an error: `an int`, `one of int8, int4`, `None`."""
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(tp)))}"
    return {int: "an int", float: "a float", str: "a string", bool: "a bool (true/false)",
            type(None): "None"}.get(tp, _type_name(tp))


def _choices(tp) -> str:
    """The values an enumerated type takes, for --help: `int8, int4`; `int8, None` if Optional."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    literals = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
    return ", ".join(map(str, literals + ([None] if literals and type(None) in members else [])))


def _coerce(value: Any, tp, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        expected = " or ".join(_expected(arg) for arg in args)  # not `Optional`, the name of the union
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    if origin is typing.Literal:
        # the same type too: 0.0 == False == 0, so model_channel=0.0 or =false passed as 0, each spelling
        # a value of its own where the config is written down (another latents cache key: encoded anew)
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}; got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}: expected a tuple like (1, 2), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args)) if args else tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int of hundreds of digits
                raise ConfigError(f"{key}: expected a finite number, got an integer of {len(str(abs(value)))} "
                                  "digits") from None
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as `device=cuda` is a string


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def fields_marked(cls, *marks: str) -> tuple[str, ...]:
    """The fields of `cls` whose metadata sets any of `marks`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if any(f.metadata.get(m) for m in marks))


def config_diff(saved: Mapping[str, Any], cfg, fields: Iterable[str]) -> list[str]:
    """One line per field of `fields` where a saved config (`asdict`, perhaps through JSON) and
    `cfg` differ: `  strides: the checkpoint has (2, 4), this run has (2, 2)`. Fields the saved
    config lacks (older checkpoints) are not compared."""
    lines = []
    for key in fields:
        if key not in saved:
            continue
        old, now = saved[key], getattr(cfg, key)
        old = tuple(old) if isinstance(old, list) else old
        if old != now:
            lines.append(f"  {key}: the checkpoint has {old!r}, this run has {now!r}")
    return lines


def check_compatible(saved: Mapping[str, Any], cfg, fields: Iterable[str], what: str, fix: str) -> None:
    """Raise ConfigMismatch, one block naming each differing field, if `config_diff` finds any:
    `what` heads it (which checkpoint, for what) and `fix` ends it (what to do)."""
    diffs = config_diff(saved, cfg, fields)
    if diffs:
        raise ConfigMismatch(f"{what}:\n" + "\n".join(diffs) + f"\n{fix}")


def unknown_key(key: str, cls, elsewhere: Mapping[str, type] = {}) -> str:
    """The error for a key `cls` lacks: the other script's key when `elsewhere` (script -> its
    config class) has it, else the closest keys (a typo, `batch-size`, or initials: `lr`)."""
    head = f"unknown config key {key!r} for {cls.__name__}"
    for script, other in elsewhere.items():
        if key in field_types(other):
            return f"{head}: it is a key of {script} ({other.__name__}), not of this script"
    keys = list(field_types(cls))
    close = difflib.get_close_matches(key.replace("-", "_"), keys, n=3, cutoff=0.6)
    close += [k for k in keys if key and "".join(w[0] for w in k.split("_")) == key and k not in close]
    guess = f"; did you mean {', '.join(close[:-1])}{' or ' if len(close) > 1 else ''}{close[-1]}?" if close else ""
    return f"{head}{guess} (--help lists every key)"


def apply_overrides(cfg, overrides: Mapping[str, Any], elsewhere: Mapping[str, type] = {}):
    """Return a copy of `cfg` with `overrides` applied and type-checked; an unknown key is an
    error (`unknown_key`, which names the script of `elsewhere` that has it)."""
    types_ = field_types(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in types_:
            raise ConfigError(unknown_key(key, type(cfg), elsewhere))
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in typing.get_args(types_[key]):
            value = None  # the bare word (as `eval_quantize=none` is written): unset, not a path named "none"
        changes[key] = _coerce(value, types_[key], key)
        if fields[key].metadata.get("path") and isinstance(changes[key], str):
            changes[key] = os.path.expanduser(changes[key])
        pattern, means = fields[key].metadata.get("pattern", (None, None))
        if pattern and not re.fullmatch(pattern, changes[key]):
            raise ConfigError(f"{key}: expected {means}; got {changes[key]!r}")
        _check_range(key, changes[key], fields[key].metadata)
    return dataclasses.replace(cfg, **changes)


_BOUNDS = {"min": (">=", operator.ge), "above": (">", operator.gt), "below": ("<", operator.lt)}


def _check_range(key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    """ConfigError naming `key` when `value` (or an item of a tuple) is outside the field's range."""
    bounds = [(sign, test, metadata[m]) for m, (sign, test) in _BOUNDS.items() if m in metadata]
    if not bounds or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if not (math.isfinite(v) and all(test(v, bound) for _, test, bound in bounds)):
            what = "each item" if isinstance(value, tuple) else "a number" if math.isfinite(v) else "a finite number"
            expected = " and ".join(f"{sign} {bound}" for sign, _, bound in bounds)
            raise ConfigError(f"{key}: expected {what} {expected}, got {value!r}")


def from_dict(cls, data: Mapping[str, Any], strict: bool = True):
    """Rebuild a config saved with `dataclasses.asdict` (JSON turns tuples into lists), checked as
    an override is (each value's type and range) and, where `cls` has one, by its
    `check_architecture` (heads that divide the width, ...): a ConfigError naming the field, not a
    model that asserts when built or computes NaN (a header edited, or written by another tool)."""
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown and strict:
        raise ConfigError(f"unknown config keys {unknown} for {cls.__name__}")
    values = {k: _coerce(tuple(v) if isinstance(v, list) else v, types_[k], k)
              for k, v in data.items() if k in types_}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        _check_range(key, value, fields[key].metadata)
    cfg = cls(**values)
    if hasattr(cfg, "check_architecture"):
        cfg.check_architecture()
    return cfg


def parse_args(argv: Sequence[str], presets: Mapping[str, Any], default: str = "tiny",
               elsewhere: Mapping[str, type] = {}):
    """`--config NAME key=value ...` -> a frozen config. `elsewhere`: the other scripts' config
    classes (script name -> class), to name the script a key given here belongs to.

    `--help` raises SystemExit after printing every field with its preset value.
    """
    name, overrides, want_help = default, {}, False
    given = {}  # "--config" or a key -> the argument that set it: a second one is an error, not the winner
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):  # answered once the preset is known: `--help --config small` too
            want_help = True
            i += 1
            continue
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a preset name")
            key, text, arg = "--config", args[i + 1], f"--config {args[i + 1]}"
            i += 1
        elif arg.startswith("--config="):
            key, text = "--config", arg.split("=", 1)[1]
        elif "=" in arg:
            key, text = arg.split("=", 1)
            key = key.lstrip("-")
            if not key:
                raise ConfigError(f"cannot parse argument {arg!r}: no key before '='; use key=value")
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: use --config NAME and key=value")
        if key in given:  # the last one won silently: a command line edited in one place and not the other
            raise ConfigError(f"{key} is given twice ({given[key]} and {arg}); give it once")
        given[key] = arg
        if key == "--config":
            name = text
        else:
            overrides[key] = _parse_value(text)
        i += 1
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    cfg = presets[name]
    if want_help:
        lines = [f"presets: {', '.join(presets)} (choose with --config NAME)",
                 f"fields of {type(cfg).__name__} (preset {name!r}); override with key=value:"]
        types_ = field_types(type(cfg))
        for f in dataclasses.fields(cfg):
            means = _choices(types_[f.name]) or f.metadata.get("pattern", (None, ""))[1]
            lines.append(f"  {f.name}={getattr(cfg, f.name)!r}" + (f"  (one of: {means})" if means else ""))
        print("\n".join(lines))
        raise SystemExit(0)
    for key, value in overrides.items():  # `checkpoint_dir=` would be the current folder, `train_data_path=` all of it
        if isinstance(value, str) and not value.strip() and hasattr(cfg, key):
            raise ConfigError(f"{key}: no value given ({key}=); give one, e.g. {key}={getattr(cfg, key)!r}")
    return apply_overrides(cfg, overrides, elsewhere)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format, for every script that takes flags: a mistake is
    one line, `error: MESSAGE`, exit status 2, without argparse's usage lines before it (`--help`
    prints them, as before). A flag argparse itself refuses (unknown, missing its value, of the
    wrong type) is named by argparse, and the line ends with where the flags are listed; a
    script's own `error(...)` after parsing (a value out of range) is the line alone."""

    _parsing = False  # inside parse_args: an error is argparse's own, about the command line
    _argv: Sequence[str] = ()  # the arguments being parsed

    def parse_known_args(self, args=None, namespace=None):
        outer, self._parsing, self._argv = self._parsing, True, list(sys.argv[1:] if args is None else args)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            self._parsing = outer

    def parse_args(self, args=None, namespace=None):  # its unknown flags are refused after parse_known_args
        outer, self._parsing = self._parsing, True
        try:
            return super().parse_args(args, namespace)
        finally:
            self._parsing = outer

    def error(self, message: str):
        hint = f" ({self.prog} --help lists the flags)" if self._parsing else ""
        # A file whose name starts with "-" (`-take1.wav`) is read as a flag: the error then blames
        # another argument ("the following arguments are required: out"); say which one it was: one
        # that is there, or one that no flag is and that reads as a file's name (an output to write)
        dashed = [a for a in self._argv if self._parsing and isinstance(a, str) and a.startswith("-") and a != "-"
                  and a != "--"]
        if there := [a for a in dashed if os.path.exists(a)]:
            hint += f"; {there[0]} is a file, read as a flag: name it ./{there[0]}"
        elif named := [a for a in dashed if self._names_a_file(a)]:
            hint += f"; {named[0]} was read as a flag: to name a file so, write ./{named[0]}"
        self.exit(2, f"error: {printable(message + hint, newlines=True)}\n")

    def _names_a_file(self, arg: str) -> bool:
        """Whether `arg`, starting with "-", is no flag of this parser and reads as a file's name: a
        path separator in it, or an extension of letters (`-take2.wav`; not `-0.5`, not `--x=1.5`)."""
        flags = self._option_string_actions
        if "=" in arg or any(arg == o or (arg.startswith("--") and o.startswith(arg)) for o in flags):
            return False
        return "/" in arg or os.sep in arg or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", arg) is not None
