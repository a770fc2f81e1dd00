"""The hertz_dev presets build exactly the official key layout (all seven files), on meta; the
README names only files, tests, sections, flags and config keys that exist."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from config import ConfigError, parse_args
from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
from model import Codec, LatentLM, LatentQuantizer, Resynthesizer

from reference import LAYOUT_FILE, require

DUPLEX = TRANSFORMER_PRESETS["hertz_dev"]
MONO = dataclasses.replace(DUPLEX, duplex=False)
FILES = {
    "inference_apatosaurus_95000": (Codec, CODEC_PRESETS["hertz_dev"]),
    "inference_volcano_3": (LatentQuantizer, DUPLEX),
    "inference_scion_54000": (LatentLM, DUPLEX),
    "inference_care_50000": (Resynthesizer, DUPLEX),
    "inference_caraway_112000": (LatentLM, MONO),
    "inference_syrup_110000": (LatentLM, MONO),
    "inference_whip_72000": (Resynthesizer, MONO),
}


def layout() -> dict:
    raw = json.loads(require(LAYOUT_FILE).read_text())
    out = {}
    for title, tensors in raw.items():
        for name in title.split(" (")[0].split(" / "):
            out[name] = tensors
    return out


@pytest.mark.parametrize("name", sorted(FILES))
def test_official_layout_loads_strict(name):
    cls, cfg = FILES[name]
    expected = layout()[name]
    with torch.device("meta"):
        module = cls(cfg)
    state = module.state_dict()
    assert sorted(state) == sorted(expected)
    for key, (shape, dtype) in expected.items():
        assert list(state[key].shape) == shape, key
        assert dtype == "float32"
    # strict=True: a state dict with exactly the official keys and shapes loads.
    fake = {k: torch.empty(shape, device="meta") for k, (shape, _) in expected.items()}
    module.load_state_dict(fake, strict=True, assign=True)


def test_full_size_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in cls(cfg).parameters())
                  for name, (cls, cfg) in FILES.items()}
    duplex = sum(counts[n] for n in ("inference_apatosaurus_95000", "inference_volcano_3",
                                       "inference_scion_54000", "inference_care_50000"))
    assert round(duplex / 1e9, 2) == 8.53
    assert round(counts["inference_scion_54000"] / 1e9, 2) == 6.75
    assert round(counts["inference_care_50000"] / 1e9, 2) == 1.64
    assert round(counts["inference_volcano_3"] / 1e9, 2) == 0.05
    assert round(counts["inference_apatosaurus_95000"] / 1e9, 2) == 0.09


REPO = Path(__file__).resolve().parents[1]


def readme_drift(text: str) -> list[str]:
    """What README text names that does not exist: section links, repository files (results by bare
    name too), `tests/x.py::name` tests, `model.x.name` objects, a command's script and `--flags`,
    and a trainer command that its parser refuses (an unknown key or preset, a value of the wrong
    type, choice or range)."""
    bad = []
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", text, re.M)}
    bad += [f"#{a}" for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in slugs]
    fence = r"^```.*?$(.*?)^```$"
    code = re.findall(fence, text, re.M | re.S) + re.findall(r"`([^`]+)`", re.sub(fence, "", text, flags=re.M | re.S))
    tokens = [t.strip("(),;:") for span in code for t in span.split()]
    for t in tokens:
        path = re.fullmatch(r"((?:config|model|tests|benchmarks|data|web)/[\w./*-]+\.(?:py|md|sh|json|html|ipynb|txt))"
                            r"(?:::(\w+))?", t)
        if path and not list(REPO.glob(path[1])):
            bad.append(path[1])
        elif path and path[2] and not re.search(rf"^def {path[2]}\(", (REPO / path[1]).read_text(), re.M):
            bad.append(t)
        if re.fullmatch(r"[\w*]+_session\d*\.txt|quant_lora_h200[\w*]*\.txt", t) and \
                not list((REPO / "benchmarks/results").glob(t)):
            bad.append(t)
        ref = re.match(r"model\.(\w+)\.(\w+)", t)
        if ref and not (REPO / f"model/{ref[1]}.py").exists():
            bad.append(ref[0])
        elif ref and not re.search(rf"^(?:def |class )?{ref[2]}\b", (REPO / f"model/{ref[1]}.py").read_text(), re.M):
            bad.append(ref[0])
    presets = {"train_codec.py": CODEC_PRESETS, "train_transformer.py": TRANSFORMER_PRESETS}
    commands = [c for span in code for c in re.findall(r"((?:python3? |bash )?)(?<![\w/])((?:benchmarks/|data/demo/)?"
                                                        r"\w+\.(?:py|sh))((?: [^#\n]*)?)", span.replace("\\\n", " "))]
    for run, script, args in commands:
        if not (REPO / script).exists():  # a module named in prose (`codec.py`), or a script that is not
            bad += [script] if run else []
        elif script in presets:  # parsed as the trainer parses it: keys, presets, types, choices, ranges
            try:
                parse_args([a for a in args.split() if a != "--help"], presets[script])
            except ConfigError as e:
                bad.append(f"{script}{args}: {e}")
        else:
            source = (REPO / script).read_text()  # argparse's "--flag" (BooleanOptionalAction: "--no-" too)
            quoted = (lambda f: f in source) if script.endswith(".sh") else (lambda f: f'"{f}"' in source)
            bad += [f"{script} {f}" for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", args)
                    if f != "--help" and not quoted(f) and not quoted(f.replace("--no-", "--", 1))]
    return bad


def test_the_readme_names_only_what_exists():
    assert readme_drift((REPO / "README.md").read_text()) == []


def undefined_globals(path: Path) -> list[str]:
    """Names a module's code reads as globals that nothing in the module defines, imports or has
    as a builtin: what a NameError would stop only when that line runs (a benchmark's mode on the
    GPU, say)."""
    import builtins
    import symtable
    top = symtable.symtable(path.read_text(), str(path), "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    defined |= set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__path__",
                                     "__builtins__", "__loader__", "__package__"}
    tables, missing = [top], []
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for s in table.get_symbols():
            declared_here = s.is_assigned() or s.is_imported() or s.is_parameter()
            global_read = s.is_global() if table is not top else not declared_here
            if s.is_referenced() and global_read and s.get_name() not in defined:
                missing.append(f"{path.relative_to(REPO)}: {s.get_name()} (in {table.get_name()})")
    return missing


def test_no_script_or_module_reads_a_name_it_never_defines():
    files = [p for p in REPO.rglob("*.py") if not {".venv", ".git", "fixtures"} & set(p.relative_to(REPO).parts)]
    assert len(files) > 40
    missing = [m for p in files for m in undefined_globals(p)]
    assert not missing, missing
