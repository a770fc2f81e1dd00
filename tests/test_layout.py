"""The hertz_dev presets build exactly the official key layout (all seven files), on meta."""
import dataclasses
import json

import pytest
import torch

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
