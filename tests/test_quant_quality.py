"""benchmarks/quant_quality.py --smoke: both parts of the benchmark on the CPU with tiny presets (a
tiny corpus, a codec, a duplex base and its full and LoRA fine-tunes trained a few steps in the
run; the fine-tunes on dialogues of voices the base never heard), and the trainer's eval_quantize /
eval_kv_dtype options it relies on."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError
from config.transformer_config import PRESETS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quant_quality_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/quant_quality.py", "--smoke", "--corpus", str(tmp_path / "corpus"),
                        "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[-1]["bench"] == "done"
    logits = {line["mode"]: line for line in lines if line["bench"] == "logits"}
    assert list(logits) == ["int8", "int4", "fp8_kv", "int8+fp8_kv"]
    # the tiny model: int8 within 3%, int4 within 15%, fp8 KV within 5% (tests/test_kv_fp8.py's bound)
    for mode, bound in (("int8", 0.03), ("int4", 0.15), ("fp8_kv", 0.05)):
        line = logits[mode]
        assert 0 < line["lm_rel_err"] <= bound and 0 < line["resynth_rel_err"]["locs"] <= bound, line
        assert 0.5 <= line["lm_top1"] <= 1 and line["code_agreement"] > 0.9, line
    assert logits["int8"]["weights_gb"] < logits["fp8_kv"]["weights_gb"] / 3  # float32 weights vs int8
    assert lines[-1]["failures"] == 0
    stages = {line["stage"]: line for line in lines if line["bench"] == "stage"}
    fulls = ["finetune-full-lr0.0003", "finetune-full-lr0.001"]  # the default learning rates
    loras = ["finetune-lora-all-lr0.001", "finetune-lora-all-lr0.003"]  # and targets
    assert list(stages) == ["codec", "base-quantizer", "base-lm", *fulls, *loras, "merge-lora"]
    assert all(line["wall_s"] > 0 for line in stages.values())
    # (b) the fine-tuning proof: the base never heard the fine-tuning voices; both fine-tunes ran the
    # same steps on dialogues of those voices, picked on others, and are evaluated on yet others
    work = tmp_path / "work"
    corpus = json.loads((tmp_path / "corpus" / "manifest.json").read_text())["files"]
    voices = {str((tmp_path / "corpus" / f["path"]).resolve()): {f'{v["engine"]}:{v["speaker"]}' for v in f["voices"]}
              for f in corpus}
    names = ("base-train", "finetune-train", "finetune-dev", "finetune-val")
    splits = {name: [json.loads(line)["path"] for line in (work / f"{name}.jsonl").read_text().splitlines()]
              for name in names}
    split = next(line for line in lines if line["bench"] == "split")
    held = set(split["adapt_voices"])
    assert held and all(split[name]["files"] == len(splits[name]) > 0 for name in names)
    assert not any(voices[p] & held for p in splits["base-train"])
    assert all(any(kind in p for p in splits["base-train"]) for kind in ("/train/mono/", "/train/dialogue/"))
    tuning = [splits[name] for name in names[1:]]
    assert sum(map(len, tuning)) == len(set().union(*tuning))  # disjoint
    assert sorted(set().union(*tuning)) == sorted(p for p in voices if "/train/dialogue/" in p and voices[p] & held)
    assert all(stages[name]["steps"] == 4 for name in fulls + loras)
    # each kind's learning rate picked on finetune-dev, where each run's best checkpoint was picked
    picks = {line["model"]: line for line in lines if line["bench"] == "finetune_pick"}
    for kind, names in (("full", fulls), ("lora", loras)):
        dev = {name.rpartition("-lr")[2]: stages[name]["best_val_lm_ce"] for name in names}
        assert picks[kind]["dev_lm_ce"] == dev and picks[kind]["learning_rate"] == float(min(dev, key=dev.get))
    tuned = {line["model"]: line for line in lines if line["bench"] == "finetune"}
    assert list(tuned) == ["base", "full", "lora"]
    assert all(line["data"] == "finetune-val" for line in tuned.values())
    assert len({line["positions"] for line in tuned.values()}) == 1
    for name in ("full", "lora"):
        assert tuned[name]["steps"] == 4 and tuned[name]["lm_ce"] != tuned["base"]["lm_ce"]  # it learnt something
        assert tuned[name]["resynth_nll"] == tuned["base"]["resynth_nll"]  # stage=lm: the resynthesizer is the base's
    summary = next(line for line in lines if line["bench"] == "finetune_summary")
    assert summary["lm_ce_gain_lora"] == pytest.approx(tuned["base"]["lm_ce"] - tuned["lora"]["lm_ce"], abs=1e-5)
    if summary["lm_ce_gain_full"] > 0:
        assert summary["lora_recovered"] == pytest.approx(summary["lm_ce_gain_lora"] / summary["lm_ce_gain_full"],
                                                          rel=1e-3)
    assert isinstance(summary["acceptance"], bool)
    for kind in ("full", "lora"):
        assert tuned[kind]["learning_rate"] == picks[kind]["learning_rate"]
    full = work / f"finetune-full-lr{picks['full']['learning_rate']:g}"
    assert tuned["full"]["checkpoint"] == str(full / "best.safetensors")
    lora = work / f"finetune-lora-all-lr{picks['lora']['learning_rate']:g}"
    assert tuned["lora"]["checkpoint"] == str(lora / "best.merged.safetensors")
    assert all((work / name / "best.safetensors").is_file() for name in fulls)
    # (b) the quantization figures of the base
    val = {line["mode"]: line for line in lines if line["bench"] == "val"}
    assert list(val) == ["bf16", "int8", "int4", "fp8_kv"]
    assert len({line["positions"] for line in val.values()}) == 1  # the same crops in every mode
    for mode in ("int8", "int4", "fp8_kv"):
        for k in ("lm_ce", "resynth_nll"):
            assert math.isfinite(val[mode][k]) and val[mode][k] != val["bf16"][k]  # the mode took effect
            assert abs(val[mode][f"{k}_rel_change"]) < 0.05
        assert isinstance(val[mode]["within_bound"], bool)
    # again: the finished training stages are reused (with their steps), the evaluations run again
    r = subprocess.run([sys.executable, "benchmarks/quant_quality.py", "--smoke", "--part", "b", "--corpus",
                        str(tmp_path / "corpus"), "--work", str(work)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    reused = {line["stage"]: line for line in lines if line["bench"] == "reused"}
    assert list(reused) == ["codec", "base-quantizer", "base-lm", *fulls, *loras]
    assert reused["finetune-full-lr0.0003"]["steps"] == 4
    again = {line["mode"]: line for line in lines if line["bench"] == "val"}
    assert again["int8"]["lm_ce"] == val["int8"]["lm_ce"]  # the same checkpoint, the same crops
    again = {line["model"]: line for line in lines if line["bench"] == "finetune"}
    assert again["lora"]["lm_ce"] == tuned["lora"]["lm_ce"]


def test_eval_quantize_and_kv_dtype_need_eval_only():
    from train_transformer import check_config
    for field, value in (("eval_quantize", "int8"), ("eval_kv_dtype", "fp8")):
        with pytest.raises(ConfigError, match="apply to eval_only=true"):
            check_config(dataclasses.replace(PRESETS["tiny"], **{field: value}))


def test_adapt_voices_takes_the_listed_voices_then_the_most_frequent_to_a_third():
    from benchmarks.quant_quality import adapt_voices

    def dialogues(*pairs):  # 30 s each
        return {str(i): {"seconds": 30.0, "voices": [dict(zip(("engine", "speaker"), v.split(":"))) for v in pair]}
                for i, pair in enumerate(pairs)}
    others = [("espeak:m1", "flite:slt"), ("espeak:m2", "flite:slt"), ("espeak:m1", "espeak:m3"),
              ("espeak:m2", "flite:rms"), ("espeak:m3", "flite:slt")]
    # whisper and croak speak in 3 of 8: a third is reached with the listed voices alone, in their order
    assert adapt_voices(dialogues(("espeak:croak", "espeak:m1"), ("espeak:whisper", "espeak:m2"),
                                  ("espeak:m3", "espeak:whisper"), *others)) == ["espeak:whisper", "espeak:croak"]
    # croak alone: 1 of 6, so the voice in most of the other dialogues (Flite's slt, in 3) joins it
    assert adapt_voices(dialogues(("espeak:croak", "espeak:m1"), *others)) == ["espeak:croak", "flite:slt"]
    # none of them: m1 speaks in 2 of 5 dialogues, over a third, but 3 are needed (train, dev, val): ties by name
    assert adapt_voices(dialogues(("espeak:m1", "espeak:m2"), ("espeak:m1", "espeak:m3"), ("espeak:m5", "espeak:m6"),
                                  ("espeak:m4", "espeak:m7"), ("espeak:m8", "flite:slt"))) == ["espeak:m1", "espeak:m4"]


def test_split_deals_the_voices_dialogues_and_refuses_a_work_folder_of_another_split(tmp_path, capsys):
    from benchmarks.quant_quality import split

    def entry(path, *voices):
        return {"path": path, "seconds": 30.0, "voices": [{"engine": "espeak", "speaker": v} for v in voices]}
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    work.mkdir()
    files = [entry(f"train/dialogue/dialogue_{i:05d}.wav", "whisper" if i % 2 else "m1", "m2") for i in range(18)]
    files += [entry("train/mono/mono_00000.wav", "whisper"), entry("train/mono/mono_00001.wav", "m1"),
              entry("val/dialogue/dialogue_00000.wav", "m4", "f3")]
    (corpus / "manifest.json").write_text(json.dumps({"files": files}))
    paths = split(corpus, work)
    listed = {name: [Path(json.loads(line)["path"]).name for line in path.read_text().splitlines()]
              for name, path in paths.items()}
    whispered = [f"dialogue_{i:05d}.wav" for i in range(1, 18, 2)]  # 9, dealt by ROLES in file order
    assert listed["finetune-train"] == [whispered[i] for i in (0, 3, 5, 6, 8)]
    assert listed["finetune-dev"] == [whispered[2]]
    assert listed["finetune-val"] == [whispered[i] for i in (1, 4, 7)]
    assert listed["base-train"] == [f"dialogue_{i:05d}.wav" for i in range(0, 18, 2)] + ["mono_00001.wav"]
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["adapt_voices"] == ["espeak:whisper"] and line["finetune-val"] == {"files": 3, "dialogues": 3,
                                                                                 "seconds": 90.0}
    assert split(corpus, work) == paths  # the same split again: the earlier stages may be reused
    (work / "base-train.jsonl").write_text(json.dumps({"path": str(corpus / "train/mono/mono_00000.wav")}) + "\n")
    with pytest.raises(SystemExit, match="another split of the corpus .*base-train.jsonl"):
        split(corpus, work)
