"""The parity fixtures (made with the original implementation) and the configs that rebuild their
small models.

Two sets of the same files: `tests/fixtures/parity-compact` lives in the repository, so every
checkout tests parity; the larger `../shared/reference/parity` (or HERTZ_PARITY_DIR) is tested
too where it is present, and must be present under CI. Tests that only need parity-size files in
the official layout use the compact set (PARITY_DIR)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from config import from_dict
from config.codec_config import CodecConfig
from config.transformer_config import TransformerConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PARITY_DIR = FIXTURES / "parity-compact"
FULL_PARITY_DIR = Path(os.environ.get("HERTZ_PARITY_DIR", REPO.parent / "shared" / "reference" / "parity"))
LAYOUT_FILE = FIXTURES / "official_checkpoint_layout.json"


def parity_sets() -> list[Path]:
    """The fixture folders to test: the compact set, and the full one when present (always under CI,
    where its absence then fails in `require`)."""
    return [PARITY_DIR] + ([FULL_PARITY_DIR] if FULL_PARITY_DIR.is_dir() or os.environ.get("CI") else [])


def require(path: Path) -> Path:
    """Skip when a reference file is absent, except under CI, where that is a failure."""
    if not path.exists():
        message = f"reference material not found: {path} (set HERTZ_PARITY_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load(name: str, folder: Path = PARITY_DIR):
    return torch.load(require(folder / name), weights_only=True)


def configs(folder: Path = PARITY_DIR) -> dict:
    return json.loads(require(folder / "configs.json").read_text())


def codec_config(folder: Path = PARITY_DIR) -> CodecConfig:
    return from_dict(CodecConfig, configs(folder)["codec"])


def transformer_config(duplex: bool, folder: Path = PARITY_DIR) -> TransformerConfig:
    """The parity LM + resynthesizer + quantizer of `folder` as one TransformerConfig."""
    c = configs(folder)
    q, lm, rs = c["quantizer"], c["lm_duplex" if duplex else "lm_mono"], c["resynthesizer_duplex" if duplex else "resynthesizer_mono"]
    assert lm["split"] == rs["split"] == duplex and rs["plex_layer"] == rs["layers"] // 2
    assert lm["vocab_size"] == 8 ** len(q["levels"]) and lm["theta"] == rs["theta"] and lm["eps"] == rs["eps"]
    return TransformerConfig(
        latent_dim=q["input_dim"], duplex=duplex, fsq_levels=tuple(q["levels"]), quantizer_dim=q["dim"],
        quantizer_ff_dim=q["ff_dim"], seq_len=lm["seq_len"], theta=float(lm["theta"]), eps=lm["eps"],
        lm_dim=lm["dim"], lm_layers=lm["layers"], lm_heads=lm["n_head"], lm_kv_heads=lm["kv_heads"], lm_ff_dim=lm["ff_dim"],
        resynth_dim=rs["dim"], resynth_layers=rs["layers"], resynth_heads=rs["n_head"], resynth_kv_heads=rs["kv_heads"],
        resynth_ff_dim=rs["ff_dim"], num_components=rs["num_components"], plex_roll=rs["plex_roll"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
