"""LoRA adapters (model/lora.py): a frozen base, trainable low-rank adapters, merging, adapter
files bound to their base, and load_hertz_dev(adapter=...)."""
import dataclasses
import hashlib
import importlib.util
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config.transformer_config import PRESETS
from model import HertzDev, build, load_hertz_dev, mixture_nll, plex_codes, save_transformer
from model import hub
from model.lora import (AdapterError, LoRAConfig, LoRALinear, adapted, apply_lora, base_fingerprint,
                        load_adapter, lora_state_dict, merge_lora, read_adapter, save_adapter)

from hub_server import HubServer
from reference import LAYOUT_FILE, PARITY_DIR, load, require, transformer_config

CFG = dataclasses.replace(PRESETS["tiny"], duplex=True)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets="both", parts=("lm", "resynth"))


def tiny(seed=0) -> HertzDev:
    torch.manual_seed(seed)
    return build(HertzDev, CFG).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 9, 2 * CFG.latent_dim, generator=g)


def outputs(model, latents) -> list[torch.Tensor]:
    """Every output of the LM and the resynthesizer on `latents` (both channels, every head)."""
    lm = model.lm(latents)
    resynth = model.resynth(latents, plex_codes(model.quantizer, latents, CFG.duplex))
    return torch.utils._pytree.tree_leaves((lm, resynth))


def loss(model, latents):
    """LM cross entropy on the next latent's FSQ index plus the resynthesizer's mixture NLL of the
    next latent, both channels: what the trainer optimises."""
    channels = latents.chunk(2, dim=-1)
    total = 0.0
    for logits, x in zip(model.lm(latents), channels):
        _, idx = model.quantizer(x)
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten().long())
    for mix, x in zip(model.resynth(latents, plex_codes(model.quantizer, latents, True)), channels):
        total = total + mixture_nll(x[:, 1:], tuple(t[:, :-1] for t in mix)).mean()
    return total


def train(model, steps=2, lr=1e-2):
    """`steps` Adam steps on the trainable parameters (the adapters)."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss(model, batch(10 + step)).backward()
        opt.step()
    return model.eval()


def base_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}


@pytest.mark.parametrize("targets,names", [("attention", {"proj_qkv", "attn_out"}),
                                           ("feedforward", {"gateup_proj", "down_proj"}),
                                           ("both", {"proj_qkv", "attn_out", "gateup_proj", "down_proj"}),
                                           ("all", {"proj_qkv", "attn_out", "gateup_proj", "down_proj"})])
@torch.no_grad()
def test_adapting_keeps_outputs_and_base_keys(one_thread, targets, names):
    model = tiny()
    x = batch()
    before, keys = outputs(model, x), set(model.state_dict())
    paths = apply_lora(model, targets, rank=4, alpha=8.0)
    heads = {"lm.output.output", "lm.output2.output", "resynth.io.fc_loc", "resynth.io.fc_scale",
             "resynth.io.fc_weight"} if targets == "all" else set()  # duplex: the LM has a head per channel
    blocks = [p for p in paths if p not in heads]
    assert heads <= set(paths) and {p.rpartition(".")[2] for p in blocks} == names
    assert len(blocks) == len(names) * (CFG.lm_layers + CFG.resynth_layers)
    assert all(p.startswith(("lm.layers.", "resynth.stack.layers.")) for p in blocks)
    # B starts at zero: the adapted model computes exactly what the base does.
    for got, want in zip(outputs(model, x), before):
        assert torch.equal(got, want)
    # The base keys are the original ones; the adapters add <path>.lora_A/B and nothing else.
    state = model.state_dict()
    assert set(lora_state_dict(model)) == {f"{p}.lora_{ab}" for p in paths for ab in "AB"}
    assert set(state) - set(lora_state_dict(model)) == keys
    # Only the adapters train, in float32.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert all(v.dtype == torch.float32 for v in lora_state_dict(model).values())
    # The adapted model's base weights load strict=True into a model built fresh.
    fresh = tiny(seed=5)
    fresh.load_state_dict(base_state(model), strict=True)
    for got, want in zip(outputs(fresh, x), before):
        assert torch.equal(got, want)


def test_full_size_adapted_model_keeps_the_official_layout():
    """hertz_dev duplex on meta, adapted at rank 128: the LM and resynthesizer state dicts minus
    the adapters are exactly the official files' keys, and those load strict=True."""
    import json
    layout = json.loads(require(LAYOUT_FILE).read_text())
    official = {title.split(" (")[0]: tensors for title, tensors in layout.items()}
    cfg = PRESETS["hertz_dev"]
    with torch.device("meta"):
        model = HertzDev(cfg)
    paths = apply_lora(model, "both", rank=128, alpha=256.0)
    adapters = lora_state_dict(model)
    for part, name in (("lm", "inference_scion_54000"), ("resynth", "inference_care_50000")):
        keys = {k for k in getattr(model, part).state_dict() if not k.endswith((".lora_A", ".lora_B"))}
        assert keys == set(official[name])
        with torch.device("meta"):
            fresh = getattr(HertzDev(cfg), part)
        fresh.load_state_dict({k: torch.empty(s, device="meta") for k, (s, _) in official[name].items()},
                              strict=True, assign=True)
    assert len(paths) == 4 * (cfg.lm_layers + cfg.resynth_layers)
    n = sum(v.numel() for v in adapters.values())
    assert 0.01 < n / sum(p.numel() for p in model.parameters()) < 0.05  # rank 128: a few % of 8.5B


def test_a_training_step_changes_only_the_adapters(one_thread):
    model = tiny()
    x = batch()
    before = outputs(model, x)
    apply_lora(model, **dataclasses.asdict(LORA))
    base = base_state(model)
    init = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train(model)
    assert all(torch.equal(v, base[k]) for k, v in base_state(model).items())  # bit-identical
    assert all(not torch.equal(v, init[k]) for k, v in lora_state_dict(model).items())
    with torch.no_grad():
        assert not torch.allclose(outputs(model, x)[0], before[0])


@pytest.mark.parametrize("targets", ["both", "all"])
@torch.no_grad()
def test_merged_equals_adapted_and_saves_as_an_ordinary_checkpoint(one_thread, tmp_path, targets):
    model = tiny()
    apply_lora(model, **{**dataclasses.asdict(LORA), "targets": targets})
    with torch.enable_grad():
        train(model)
    x = batch()
    want = outputs(model, x)
    # Unmerged, the adapters were written as weights that no loader took (found only when loading it)
    with pytest.raises(ValueError, match=r"^model holds LoRA adapters on \d+ layers \(lm\.layers\.0\.attn\.attn\."
                                         r"proj_qkv, .*: merge them first"):
        save_transformer(tmp_path / "unmerged.safetensors", model)
    assert not list(tmp_path.iterdir())
    paths = merge_lora(model)
    assert len(paths) == 4 * (CFG.lm_layers + CFG.resynth_layers) + 5 * (targets == "all") and not adapted(model)
    assert all(type(model.get_submodule(p)) is nn.Linear for p in paths)
    assert set(model.state_dict()) == set(tiny().state_dict())
    for got, w in zip(outputs(model, x), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    path = save_transformer(tmp_path / "merged.safetensors", model)
    loaded = load_hertz_dev(path, codec=None)
    for got, w in zip(outputs(loaded, x), outputs(model, x)):
        assert torch.equal(got, w)


@torch.no_grad()
def test_adapter_file_round_trip(one_thread, tmp_path):
    model = tiny()
    apply_lora(model, **dataclasses.asdict(LORA))
    with torch.enable_grad():
        train(model)
    path = save_adapter(tmp_path / "latest.adapter.safetensors", model, LORA, "file-sha256:abc", "base.safetensors")
    cfg, extra = read_adapter(path)
    assert cfg == LORA and extra == {"base_fingerprint": "file-sha256:abc", "base_source": "base.safetensors"}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model))  # only the adapters
    fresh = tiny()
    assert load_adapter(fresh, path, "file-sha256:abc") == LORA
    x = batch()
    for got, want in zip(outputs(fresh, x), outputs(model, x)):
        assert torch.equal(got, want)
    with pytest.raises(AdapterError, match="not those of"):
        save_adapter(tmp_path / "x.safetensors", model, dataclasses.replace(LORA, rank=8), "file-sha256:abc")


def test_load_hertz_dev_applies_and_merges_an_adapter(one_thread, tmp_path):
    base = tiny()
    ckpt = save_transformer(tmp_path / "duplex.safetensors", base)
    fingerprint = base_fingerprint(ckpt)
    trained = load_hertz_dev(ckpt, codec=None)
    apply_lora(trained, **dataclasses.asdict(LORA))
    train(trained)
    adapter = save_adapter(tmp_path / "a.adapter.safetensors", trained, LORA, fingerprint, str(ckpt))
    x = batch()
    with torch.no_grad():
        want = outputs(trained, x)
        model = load_hertz_dev(ckpt, codec=None, adapter=adapter)
        assert len(adapted(model)) == 4 * (CFG.lm_layers + CFG.resynth_layers)
        assert not any(p.requires_grad for p in model.parameters())
        for got, w in zip(outputs(model, x), want):
            assert torch.equal(got, w)
        merged = load_hertz_dev(ckpt, codec=None, adapter=adapter, merge=True)
        assert not adapted(merged)
        for got, w in zip(outputs(merged, x), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merge=True needs an adapter"):
        load_hertz_dev(ckpt, codec=None, merge=True)


def test_an_adapter_decodes_with_the_codec_its_fine_tuning_encoded_with(one_thread, tmp_path):
    """An adapter fine-tuned with another codec_checkpoint than its base's codec learnt that codec's
    latents (its header records it, path and fingerprint, as the trainer's export writes them); with
    codec="auto" the base's codec decoded them, without a word. Now the adapter's codec is loaded
    (and `codec_config_of` says so before the weights), refused by name once it was trained further."""
    from config.codec_config import PRESETS as CODEC_PRESETS
    from model import Codec, save_codec
    from model.loading import codec_config_of
    from model.latents import codec_fingerprint
    from model.lora import lora_state_dict, write_adapter
    from model.checkpoint import CheckpointError
    torch.manual_seed(0)
    base_codec, tuned_codec = build(Codec, CODEC_PRESETS["tiny"]), build(Codec, CODEC_PRESETS["tiny"])
    base_codec_path = save_codec(tmp_path / "base-codec.safetensors", base_codec)
    tuned_codec_path = save_codec(tmp_path / "tuned-codec.safetensors", tuned_codec)
    ckpt = save_transformer(tmp_path / "duplex.safetensors", tiny(), base_codec_path)
    model = load_hertz_dev(ckpt, codec=None)
    apply_lora(model, **dataclasses.asdict(LORA))
    adapter = tmp_path / "a.adapter.safetensors"
    write_adapter(adapter, lora_state_dict(model), LORA, base_fingerprint(ckpt), str(ckpt),
                  {"codec": str(tuned_codec_path), "codec_fingerprint": codec_fingerprint(tuned_codec)})
    first = next(iter(tuned_codec.state_dict()))
    assert torch.equal(load_hertz_dev(ckpt, adapter=adapter).codec.state_dict()[first], tuned_codec.state_dict()[first])
    assert torch.equal(load_hertz_dev(ckpt).codec.state_dict()[first], base_codec.state_dict()[first])  # no adapter
    explicit = load_hertz_dev(ckpt, adapter=adapter, codec=base_codec_path)  # codec= decides when given
    assert torch.equal(explicit.codec.state_dict()[first], base_codec.state_dict()[first])
    assert codec_config_of(ckpt, adapter=adapter) == tuned_codec.config
    save_codec(tuned_codec_path, build(Codec, CODEC_PRESETS["tiny"]))  # trained further in place
    with pytest.raises(CheckpointError, match=re.escape(f"{adapter} was trained on the latents of codec "
                                                        f"{codec_fingerprint(tuned_codec)}, and the codec it records")):
        load_hertz_dev(ckpt, adapter=adapter)


def test_an_adapter_of_another_base_is_refused_naming_both(tmp_path):
    a = save_transformer(tmp_path / "a.safetensors", tiny(seed=0))
    b = save_transformer(tmp_path / "b.safetensors", tiny(seed=1))
    model = load_hertz_dev(a, codec=None)
    apply_lora(model, **dataclasses.asdict(LORA))
    adapter = save_adapter(tmp_path / "a.adapter.safetensors", model, LORA, base_fingerprint(a), str(a))
    with pytest.raises(AdapterError) as e:
        load_hertz_dev(b, codec=None, adapter=adapter)
    message = str(e.value)
    assert "\n" not in message
    for part in (str(adapter), str(a), base_fingerprint(a), str(b), base_fingerprint(b)):
        assert part in message
    # Found before any weights load: the official files are absent here, offline, and the error
    # is still the adapter's.
    with pytest.raises(AdapterError) as e:
        load_hertz_dev("mono", codec=None, ckpt_dir=tmp_path / "empty", offline=True, adapter=adapter)
    assert base_fingerprint("mono") in str(e.value) and base_fingerprint(a) in str(e.value)
    with pytest.raises(AdapterError, match="not an adapter file"):
        load_hertz_dev(a, codec=None, adapter=b)



def test_an_adapter_whose_header_contradicts_the_base_is_refused_before_the_base_loads(tmp_path, monkeypatch):
    """An adapter of this base (its fingerprint matches) whose header's rank or targets are not
    those of its tensors on the base's config (a rank edited, an export with another run's
    targets): one AdapterError naming the file, the header's rank and targets and the tensors at
    fault, before the base's weights are read (it was found only after they had loaded); a run's
    folder given for the file names the adapter files in it (it was 'no such adapter file')."""
    from model.lora import write_adapter
    base = save_transformer(tmp_path / "base.safetensors", tiny())
    model = tiny()
    apply_lora(model, **dataclasses.asdict(LORA))
    state = lora_state_dict(model)
    for name, config, message in (
            ("rank", dataclasses.replace(LORA, rank=3), "its header says rank 3, targets both of lm+resynth, and "
                                                        "its tensors are not those: wrong shapes of 32 tensors (lm."),
            ("targets", dataclasses.replace(LORA, targets="all"), "missing 10 tensors (lm.output.output.lora_A")):
        path = tmp_path / f"{name}.adapter.safetensors"
        write_adapter(path, state, config, base_fingerprint(base), str(base))
        with monkeypatch.context() as m:
            m.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
            with pytest.raises(AdapterError) as e:
                load_hertz_dev(base, codec=None, adapter=path)
        assert str(e.value).startswith(f"adapter {path} does not fit {base}: ") and message in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match=re.escape(f"{tmp_path} is a folder, not an adapter file: pass one of its "
                                                     f"adapter files, {tmp_path / 'rank.adapter.safetensors'}, ")):
        load_hertz_dev(base, codec=None, adapter=tmp_path)


def test_an_adapter_of_integer_tensors_or_an_infinite_alpha_is_refused_before_the_base_loads(tmp_path, monkeypatch):
    """An adapter whose hash matches (another tool wrote it) but whose tensors are integers or
    booleans, or whose header's alpha is infinite: refused before the base's weights are read,
    naming the file and what is wrong. The tensors were copied into the float32 adapters and the
    infinite scale applied, silently: every output of the model NaN."""
    from test_checkpoint import rewritten
    from model.checkpoint import CheckpointError
    base = save_transformer(tmp_path / "base.safetensors", tiny())
    model = tiny()
    apply_lora(model, **dataclasses.asdict(LORA))
    good = save_adapter(tmp_path / "good.adapter.safetensors", model, LORA, base_fingerprint(base), str(base))
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    for dtype in (torch.int32, torch.bool):
        path = rewritten(good, tmp_path / "int.adapter.safetensors",
                         state=lambda state: {k: v.to(dtype) for k, v in state.items()})
        with pytest.raises(AdapterError) as e:
            load_hertz_dev(base, codec=None, adapter=path)
        assert str(e.value).startswith(f"adapter {path} does not fit {base}: ") and "\n" not in str(e.value)
        assert f"its tensors are not those: not float 32 tensors (lm.layers.0.attn.attn.attn_out.lora_A {str(dtype)[6:]}" \
            in str(e.value)
    path = rewritten(good, tmp_path / "inf.adapter.safetensors",
                     meta=lambda meta: {**meta, "config": meta["config"].replace('"alpha": 8.0', '"alpha": Infinity')})
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: its config is not a valid LoRAConfig: lora "
                                              "alpha must be positive and finite, not inf$"):
        load_hertz_dev(base, codec=None, adapter=path)


def test_an_adapter_with_changed_bytes_nan_or_a_damaged_header_is_refused(tmp_path):
    """Adapter files are checked as checkpoints are: changed bytes (the hash in the header no longer
    matches) and NaN weights (with a matching hash) are a CheckpointError naming the file, and
    load_hertz_dev(verify=False) skips both; a header whose config is not JSON or not a LoRAConfig
    names the file and the field. The adapter's hash was never checked (both loaded, NaN and all),
    and the header's mistakes were a JSONDecodeError, KeyError or TypeError naming no file."""
    from safetensors.torch import load_file, save_file
    from model.checkpoint import CheckpointError, _header, content_hash
    base = save_transformer(tmp_path / "base.safetensors", tiny())
    model = load_hertz_dev(base, codec=None)
    apply_lora(model, **dataclasses.asdict(LORA))
    good = save_adapter(tmp_path / "good.adapter.safetensors", model, LORA, base_fingerprint(base), str(base))

    def write(name, rehash=True, **fields):
        state, meta = load_file(str(good)), {**_header(good), **fields}
        state[sorted(state)[0]].view(-1)[0] = float("nan")
        if rehash:
            meta["content_sha256"] = content_hash(state, meta)
        save_file(state, str(tmp_path / name), metadata=meta)
        return tmp_path / name

    for path, message in ((write("changed.safetensors", rehash=False), " is corrupted"),
                          (write("nan.safetensors"), ": 1 tensors hold NaN or inf")):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}{message}"):
            load_hertz_dev(base, codec=None, adapter=path)
        load_hertz_dev(base, codec=None, adapter=path, verify=False)
    for config, message in (("{", "the 'config' field of its header is not a JSON object"),
                            ('{"alpha": 8.0}', "its config is not a valid LoRAConfig: "),
                            ('{"rank": "4", "alpha": 8.0}',
                             "its config is not a valid LoRAConfig: rank: expected an int")):
        path = write("config.safetensors", config=config)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}"):
            load_hertz_dev(base, codec=None, adapter=path)


@torch.no_grad()
def test_an_official_variant_takes_its_adapter_through_the_hub(one_thread, tmp_path, monkeypatch):
    """Official files (the parity-size fixtures in the official layout, served by a loopback hub):
    an adapter saved against base_fingerprint("duplex") applies to load_hertz_dev("duplex")."""
    require(PARITY_DIR)
    files = {"inference_volcano_3": "quantizer_state_dict.pt", "inference_scion_54000": "lm_duplex_state_dict.pt",
             "inference_care_50000": "resynthesizer_duplex_state_dict.pt"}
    with HubServer() as server:
        for name, fixture in files.items():
            data = server.add(f"{name}.pt", PARITY_DIR / fixture)
            monkeypatch.setitem(hub.OFFICIAL_FILES, name,
                                hub.OfficialFile(name, hashlib.md5(data).hexdigest(), len(data), "test"))
        kw = dict(ckpt_dir=tmp_path / "ckpt", endpoint=server.endpoint, config=transformer_config(True), codec=None)
        trained = load_hertz_dev("duplex", **kw)
        cfg = LoRAConfig(rank=4, alpha=8.0, targets="attention", parts=("lm",))
        apply_lora(trained, **dataclasses.asdict(cfg))
        for v in lora_state_dict(trained).values():
            v.normal_(std=0.05)  # stands for trained adapters
        adapter = save_adapter(tmp_path / "duplex.adapter.safetensors", trained, cfg, base_fingerprint("duplex"), "duplex")
        model = load_hertz_dev("duplex", adapter=adapter, **kw)
    latents = load("transformers_duplex_io.pt")["latents"]
    for got, want in zip(model.lm(latents), trained.lm(latents)):
        assert torch.equal(got, want)
    assert read_adapter(adapter)[1]["base_fingerprint"].startswith("official:inference_volcano_3=")


def test_base_fingerprints(tmp_path):
    lm, resynth, _ = hub.VARIANTS["duplex"]
    fp = base_fingerprint("duplex")
    for name in (hub.QUANTIZER, lm, resynth):
        assert f"{name}={hub.OFFICIAL_FILES[name].md5}" in fp
    assert base_fingerprint("mono") != base_fingerprint("mono-pure-audio") != fp
    path = save_transformer(tmp_path / "m.safetensors", tiny())
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        stored = (f.metadata() or {}).get("content_sha256")
    if stored:  # checkpoints that carry a content hash are fingerprinted by it
        assert base_fingerprint(path) == f"content-sha256:{stored}"
    else:
        assert base_fingerprint(path) == "file-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="neither an official variant"):
        base_fingerprint(tmp_path / "missing.safetensors")


def test_a_base_without_a_content_hash_is_fingerprinted_on_python_3_10(tmp_path, monkeypatch):
    """A checkpoint written before the content hash existed is fingerprinted by the SHA-256 of its
    bytes, also with Python 3.10's hashlib (the README's minimum), which has no `file_digest`."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = save_transformer(tmp_path / "m.safetensors", tiny())
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "content_sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    assert base_fingerprint(old) == "file-sha256:" + hashlib.sha256(old.read_bytes()).hexdigest()


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"),
                                          ({"alpha": float("inf")}, "alpha must be positive and finite"),
                                          # finite, but inf in float32 (1e300 / 4): NaN at the first step
                                          ({"alpha": 1e300}, r"lora_alpha / lora_rank = 1e\+300 / 4 = 2.5e\+299, "),
                                          ({"alpha": 4e4 + 4}, r"lora_alpha / lora_rank = 40004 / 4 = 10001, the "
                                                               "adapters' scale, is above 10000"),
                                          ({"dropout": 1.0}, "dropout"), ({"targets": "mlp"}, "targets"),
                                          ({"parts": ("codec",)}, "parts")])
def test_bad_lora_settings_are_clear_errors(kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **{**dataclasses.asdict(LORA), **kwargs})
    assert not adapted(model)


def test_adapting_twice_is_refused():
    model = tiny()
    apply_lora(model, "attention", 4, 8.0)
    with pytest.raises(AdapterError, match="already has adapters"):
        apply_lora(model, "feedforward", 4, 8.0)


@pytest.mark.skipif(importlib.util.find_spec("model.quant") is None,
                    reason="model/quant.py (int8 layers, issue 12) is not merged into this branch yet")
def test_lora_on_an_int8_base(one_thread):
    from model.quant import Int8Linear, quantize_model

    model = tiny()
    quantize_model(model, "int8")
    x = batch()
    with torch.no_grad():
        before = outputs(model, x)
    paths = apply_lora(model, **dataclasses.asdict(LORA))
    assert all(isinstance(model.get_submodule(p), (Int8Linear, LoRALinear)) for p in paths)
    with torch.no_grad():
        for got, want in zip(outputs(model, x), before):
            assert torch.equal(got, want)
    base = base_state(model)
    init = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train(model)
    assert all(torch.equal(v, base[k]) for k, v in base_state(model).items())
    assert all(not torch.equal(v, init[k]) for k, v in lora_state_dict(model).items())
    with pytest.raises(AdapterError, match="Int8Linear"):
        merge_lora(model)
    assert len(adapted(model)) == len(paths)  # a refused merge changes nothing


def test_merging_onto_a_quantized_checkpoint_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """An adapter trained on one of our int8 checkpoints (init_from it, finetune=lora) applies to it
    unmerged; merge=True was refused by merge_lora only after every weight had been read and
    hashed, and is now a ValueError before."""
    from model.quant import quantize_model
    base = save_transformer(tmp_path / "int8.safetensors", quantize_model(tiny(), "int8"))
    model = load_hertz_dev(base, codec=None)
    apply_lora(model, **dataclasses.asdict(LORA))
    adapter = save_adapter(tmp_path / "a.adapter.safetensors", model, LORA, base_fingerprint(base), str(base))
    assert adapted(load_hertz_dev(base, codec=None, adapter=adapter))
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(ValueError, match=f"^merge=True folds the adapter into float weights, and {re.escape(str(base))} "
                                         "holds int8 weights: keep the adapter unmerged"):
        load_hertz_dev(base, codec=None, adapter=adapter, merge=True)


def test_an_adapter_beyond_float16_is_refused_in_float16_and_an_overflowing_merge_names_its_layer(tmp_path):
    """An adapter whose lora_B holds 1e5 (finite in its float32 file, hash consistent) loaded on a
    float16 base: cast to float16 it was inf, and every output NaN. Now a CheckpointError naming the
    adapter, the tensor and the dtype; merged, an AdapterError naming the layer whose merged weight
    overflows, the model's layers unchanged; in float32 it loads."""
    from test_checkpoint import rewritten
    from model.checkpoint import CheckpointError
    base = save_transformer(tmp_path / "base.safetensors", tiny())
    model = tiny()
    apply_lora(model, **dataclasses.asdict(LORA))
    good = save_adapter(tmp_path / "good.adapter.safetensors", model, LORA, base_fingerprint(base), str(base))
    key = "lm.layers.0.attn.attn.attn_out.lora_B"
    big = rewritten(good, tmp_path / "big.adapter.safetensors",
                    state=lambda s: {**s, key: torch.full_like(s[key], 1e5)})
    with pytest.raises(CheckpointError) as e:
        load_hertz_dev(base, codec=None, adapter=big, dtype="float16")
    assert str(e.value) == (f"adapter {big}: 1 tensors hold values beyond what float16 holds ({key}); cast, they "
                            "would be inf and the model would generate noise: load it in bfloat16 or float32 (dtype=, "
                            "--dtype)")
    with pytest.raises(AdapterError, match=r"^merging the adapter into lm\.layers\.0\.attn\.attn\.attn_out makes "
                                           r"weights NaN or inf in float16 "):
        load_hertz_dev(base, codec=None, adapter=big, dtype="float16", merge=True)
    model = load_hertz_dev(base, codec=None, dtype="float16")
    apply_lora(model, **dataclasses.asdict(LORA))
    with torch.no_grad():
        model.lm.layers[0].attn.attn.attn_out.lora_B.fill_(1e5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError):
        merge_lora(model)
    assert len(adapted(model)) == 4 * (CFG.lm_layers + CFG.resynth_layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert load_hertz_dev(base, codec=None, adapter=big, dtype="float32") is not None


def test_a_damaged_adapter_is_found_before_the_base_s_weights_are_read(tmp_path, monkeypatch):
    """An adapter whose bytes changed, or that holds NaN under a matching hash: refused naming the
    file before the base's weights are read and hashed (for an official variant: downloaded). Its
    header and shapes were checked first, and its content only after the base had loaded."""
    from test_checkpoint import rewritten
    from model.checkpoint import CheckpointError
    base = save_transformer(tmp_path / "base.safetensors", tiny())
    model = tiny()
    apply_lora(model, **dataclasses.asdict(LORA))
    good = save_adapter(tmp_path / "good.adapter.safetensors", model, LORA, base_fingerprint(base), str(base))
    flipped = tmp_path / "flipped.adapter.safetensors"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0x40
    flipped.write_bytes(bytes(data))
    key = "lm.layers.0.attn.attn.attn_out.lora_A"
    nan = rewritten(good, tmp_path / "nan.adapter.safetensors",
                    state=lambda s: {**s, key: torch.full_like(s[key], float("nan"))})
    monkeypatch.setattr("model.loading.read_weights", lambda *a, **k: pytest.fail("base weights read"))
    for path, message in ((flipped, " is corrupted"), (nan, f": 1 tensors hold NaN or inf ({key})")):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path) + message)}"):
            load_hertz_dev(base, codec=None, adapter=path)
