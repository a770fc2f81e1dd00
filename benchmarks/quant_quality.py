"""What int8 / int4 weights and an fp8 KV cache cost in quality, and what LoRA fine-tuning learns
compared with full fine-tuning, on models trained in the run. One JSON object a line.

    python benchmarks/quant_quality.py                       # GPU: (a) at hertz_dev size, (b) trains small models
    python benchmarks/quant_quality.py --part a
    python benchmarks/quant_quality.py --part b --codec checkpoints/codec_proof/best.safetensors   # reuse a codec
    python benchmarks/quant_quality.py --smoke               # CPU, tiny presets, a few steps: checks the path

(a) "logits": the duplex model at --size (hertz_dev) with random weights, in bf16 on the GPU, on a
fixed input (seeded latents, --batch x --frames): each mode's outputs against bf16's. int8 and int4
quantize a copy of the bf16 model (`model.quant.quantize_model`); fp8_kv runs the bf16 weights
through an fp8 KV cache (one cached pass over the frames, what generation reads), int8+fp8_kv both.
Fields: lm_rel_err (all logits, both heads), lm_top1 (the fraction of positions whose most likely
token is bf16's), code_agreement (the quantizer's FSQ indices equal to bf16's), resynth_rel_err
{locs, scales, logits} of the mixture (computed from bf16's codes, so it measures the
resynthesizer alone), and the same with the model's own codes (resynth_own_codes_rel_err).

(b) a `small` duplex model trained on the demo corpus in this run (issue 12's item 4b and issue
13's learning proof), then adapted to voices it never heard, as a user makes the model theirs.
The split (`split`; a "split" line gives the voices and each set's files, dialogues and seconds;
{base,finetune}-train.jsonl, finetune-dev.jsonl and finetune-val.jsonl in --work list the files)
reads every file's voices from the corpus' manifest.json: the fine-tuning voices are eSpeak NG's
whispered, creaky, Klatt and elderly variants (ADAPT_VOICES), plus the voices in most other
dialogues where those speak in fewer than 3 training dialogues or under a third of their seconds
(a small corpus, or Flite and Festival taking half the speakers). The training dialogues in which
any of them speaks are dealt in file order, half to finetune-train, an eighth to finetune-dev,
three eighths to finetune-val; the base learns from every other training file (monologues and
dialogues: still most of the corpus) and never hears those voices. Stages, each a trainer process
with a time limit (with --smoke both trainers run in this process, as the evaluations do):
  codec           train_codec.py on corpus/train (--codec-minutes), unless --codec PATH is given
                  (the codec is the fixed representation, trained on all of train/ as the official
                  one was on broad speech; what is adapted is the LM);
  base-quantizer  train_transformer.py stage=quantizer on base-train (monologues: channel 1
                  silent), picked on val/mono, --transformer-minutes;
  base-lm         stage=lm on them, from base-quantizer's best, --transformer-minutes: "the base"
                  (or --checkpoint PATH instead of these two, which should not have heard the
                  fine-tuning voices either);
  finetune-full   the base fine-tuned on finetune-train, stage=lm (so the quantizer, the codes the
                  LM predicts, and the resynthesizer stay the base's), every LM weight, at each
                  of --full-lr (default 3e-4,1e-3), the first for --finetune-minutes, the others
                  for as many steps: one stage each, finetune-full[-lrRATE] (RATE when several);
  finetune-lora   the same with finetune=lora (rank --lora-rank, default the preset's 128, alpha
                  2 x rank, --lora-targets, default all: the blocks' projections and the heads)
                  at each of --lora-lr (default 1e-3,3e-3: LoRA's adapters start at zero and
                  usually want a higher rate than full fine-tuning), for the same steps:
                  finetune-lora[-TARGETS][-lrRATE] (TARGETS unless both).
                  Of each kind the run of lowest LM cross-entropy on finetune-dev is "full" and
                  "lora" ("finetune_pick" lines): rates picked as checkpoints are, on dialogues
                  neither is measured on, so that neither kind is compared at a rate that suits
                  only the other.
Both fine-tunes warm up for 10 steps, then hold their learning rate (the time limit, not a
schedule, ends them), evaluate every 10 steps on finetune-dev and keep their best checkpoint
there. The base hears dialogues too: a base that never heard two speakers leaves its LM's
channel-1 input and head untrained, which full fine-tuning trains and LoRA's adapters cannot
reach (the input projections are never adapted). The heads are: a new voice shifts which codes
follow which, and on a briefly trained base most of full fine-tuning's gain is in the heads
(measured on the CPU at tiny size, benchmarks/results/quant_lora_h200_session2.txt: LoRA on the
blocks alone recovered 4% of full fine-tuning's gain, with the heads more than all of it).
Evaluations run in this process (the trainer's own `evaluate`, via `train_transformer.main` with
eval_only=true: no process start each), on crops of --eval-seq-len latents, "val" once the base
is trained, "finetune" once the fine-tunes are:
  "val": the base on val/mono (where it was picked) in bf16, int8, int4 (`eval_quantize=`) and
      fp8_kv (`eval_kv_dtype=fp8`: forwards through a float8 KV cache): val lm_ce and resynth_nll,
      and each one's relative change against bf16 with the issue's bound (int8 1%, int4 3%, fp8 KV
      0.5%) and `within_bound`;
  "finetune": base, full and LoRA (its best adapter merged into the base) on finetune-val
      (dialogues of the fine-tuning voices that neither trained on nor picked on): val lm_ce,
      resynth_nll (the base's for all three: stage=lm), lm_acc, and the steps each trained; then
      "finetune_summary": each one's LM cross-entropy gain over the base, lora_recovered =
      LoRA's gain / full's, and `acceptance` (issue 13: recovered >= 0.7 and LoRA below the base).
"stage" lines give each stage's wall time and the step it stopped at; an evaluation that fails
prints its error in its line, the others still run, and the script exits 1 at the end.

Part (a) needs torch only. Part (b) runs the trainers, which need the packages the GPU image lacks
(soundfile, soxr, ...): `source benchmarks/gpu_setup.sh` first (it also builds the demo corpus, 60
minutes; otherwise --corpus is built with --corpus-minutes, 60, if missing: with eSpeak NG alone
the fine-tunes then train on 9 dialogues, 350 s, pick on 2 and are measured on 6, 253 s, and the
base learns from 224 files, 2281 s, 25 of them dialogues). With the defaults part (b) takes
about 9.5 minutes on an H200 with the codec, 7 without: 2.5 + 2 x 1 + 2 x 0.75 minutes of stages,
two LoRA runs of about 25 s each, a few seconds of start-up each, and seconds of evaluations
(--no-quant-eval skips the quantized ones; fewer rates or minutes make it shorter). Each finished stage
leaves a marker in --work (`<stage>.done`, with its wall time and steps) and is skipped when the
script runs again (an unfinished one resumes from its latest.pt), so running the same command
again continues.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from config import ArgumentParser  # noqa: E402
from config.transformer_config import PRESETS  # noqa: E402
from model import HertzDev, build, plex_codes  # noqa: E402
from model.quant import quantize_model, weight_bytes  # noqa: E402
from tests.reference import rel_err  # noqa: E402

T0 = time.time()
MODES = ("bf16", "int8", "int4", "fp8_kv", "int8+fp8_kv")
BOUNDS = {"int8": 0.01, "int4": 0.03, "fp8_kv": 0.005}  # the acceptance: relative change of the val metrics
# (b) the voices the fine-tunes adapt the base to, which it never hears: eSpeak NG's whispered, creaky,
# Klatt-synthesized and elderly variants, unlike any other training voice (data/demo/prepare.py's names)
ADAPT_VOICES = ("espeak:whisper", "espeak:whisperf", "espeak:croak", "espeak:klatt2", "espeak:klatt4",
                "espeak:grandma", "espeak:grandpa")
ADAPT_SHARE = 1 / 3  # at least this share of the training dialogues' seconds has them (more voices are added if not)
# how the dialogues with those voices are dealt, in file order: half train, three eighths val, an eighth dev
ROLES = ("finetune-train", "finetune-val", "finetune-dev", "finetune-train", "finetune-val", "finetune-train",
         "finetune-train", "finetune-val")


def rounded(v):
    return round(v, 6) if isinstance(v, float) else {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v


def emit(**fields) -> None:
    print(json.dumps(rounded(fields)), flush=True)


# --- (a) logits at full size, random weights ----------------------------------------------------

@torch.no_grad()
def outputs(model, x: torch.Tensor, kv_dtype, ref_plex=None) -> dict:
    """The LM logits (B, T, 2, V), FSQ indices, and the resynthesizer's mixtures given `ref_plex`
    (or the model's own codes), without a cache or through one cached pass in `kv_dtype`."""
    B, T = x.shape[:2]
    pos = torch.arange(T, device=x.device)[None].expand(B, T)

    def run(module, *args):
        if kv_dtype is None:
            return module(x, *args)
        return module(x, *args, cache=module.make_cache(B, T, dtype=kv_dtype), input_pos=pos)
    logits = torch.stack(run(model.lm), dim=2)
    own = plex_codes(model.quantizer, x, True)
    indices = torch.stack([model.quantizer(c)[1] for c in x.chunk(2, dim=-1)], dim=-1)
    mix = {"given": run(model.resynth, ref_plex if ref_plex is not None else own), "own": run(model.resynth, own)}
    return {"logits": logits, "indices": indices, "plex": own, "mix": mix}


def mixture_errors(got, want) -> dict:
    """{locs, scales, logits}: relative error of each, both channels together."""
    return {name: rel_err(torch.cat([g[i] for g in got]), torch.cat([w[i] for w in want]))
            for i, name in enumerate(("locs", "scales", "logits"))}


def part_a(size: str, device: str, batch: int, frames: int) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = dataclasses.replace(PRESETS[size], duplex=True)
    torch.manual_seed(0)
    t = time.time()
    model = build(HertzDev, cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    emit(bench="logits_setup", size=size, device=device, dtype=str(dtype), batch=batch, frames=frames,
         weights_gb=weight_bytes(model)["total"] / 1e9, build_s=time.time() - t)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, frames, 2 * cfg.latent_dim, generator=g).to(device, dtype)
    ref = outputs(model, x, None)
    top1 = ref["logits"].argmax(-1)
    for mode in MODES[1:]:
        weights, _, kv = mode.partition("+")
        if weights == "fp8_kv":
            weights, kv = "bf16", "fp8_kv"
        m = model if weights == "bf16" else quantize_model(copy.deepcopy(model), weights, pack=False)
        out = outputs(m, x, torch.float8_e4m3fn if kv else None, ref_plex=ref["plex"])
        emit(bench="logits", size=size, mode=mode, weights_gb=weight_bytes(m)["total"] / 1e9,
             lm_rel_err=rel_err(out["logits"], ref["logits"]),
             lm_top1=float((out["logits"].argmax(-1) == top1).float().mean()),
             code_agreement=float((out["indices"] == ref["indices"]).float().mean()),
             resynth_rel_err=mixture_errors(out["mix"]["given"], ref["mix"]["given"]),
             resynth_own_codes_rel_err=mixture_errors(out["mix"]["own"], ref["mix"]["own"]),
             elapsed_s=time.time() - T0)
        del m, out
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    del model


# --- (b) the small duplex model trained in this run: quantization quality and fine-tuning -------

def run(cmd: list, log: Path) -> str:
    """A trainer in a subprocess (its own process: GPU memory is freed after it); stdout, and the
    log file, which also holds stderr. A failure ends this script with the log's tail."""
    # the repository first, then what PYTHONPATH holds already (gpu_setup.sh's wheels in /tmp/site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=f, text=True)
        f.write(r.stdout)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} exited with {r.returncode}; see {log}:\n"
                         + log.read_text()[-3000:])
    return r.stdout


def run_here(cmd: list, log: Path) -> str:
    """`run` of a `train_transformer.py` or `train_codec.py` stage in this process, as `evaluate`
    runs the trainer: its `main` under `model.training.run_script` (a user's error is one `error:`
    line and exit status 1), for --smoke's CPU stages, whose time is mostly a process' start
    (importing torch and the optimizers' Dynamo: 6 s of CPU each, of a tiny stage's 8). A GPU stage keeps its own process,
    which frees its memory. Its stdout, and the log file, which also holds stderr; a failure ends
    this script as `run`'s does."""
    import importlib
    import io
    from model.training import run_script
    assert cmd[0] in ("train_transformer.py", "train_codec.py"), cmd
    trainer = importlib.import_module(cmd[0].removesuffix(".py"))
    out = io.StringIO()
    with open(log, "a") as f:
        f.write(f"$ (in process) {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(f):
                run_script(lambda: trainer.main([str(a) for a in cmd[1:]]))
            code = 0
        except SystemExit as e:
            code = e.code
        f.write(out.getvalue())
    if code:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} exited with {code}; see {log}:\n"
                         + log.read_text()[-3000:])
    return out.getvalue()


def stage(work: Path, name: str, cmd: list, log: Path, in_process: bool = False) -> dict:
    """Run a training stage (in this process if `in_process`: `run_here`) unless an earlier run of
    this script finished it (`<name>.done`, which records the stage's wall time and the step it
    stopped at); returns that record."""
    done = work / f"{name}.done"
    if done.exists():
        record = json.loads(done.read_text() or "{}")
        emit(bench="reused", stage=name, **record)
        return record
    t = time.time()
    out = (run_here if in_process else run)(cmd, log)
    evals = [json.loads(line) for line in out.splitlines() if line.startswith('{"eval"')]
    dev = [e["val/lm_ce"] for e in evals if "val/lm_ce" in e]
    record = {"steps": evals[-1]["eval"] if evals else None, "wall_s": round(time.time() - t, 1),
              "best_val_lm_ce": min(dev) if dev else None}
    done.write_text(json.dumps(record))
    emit(bench="stage", stage=name, **record, elapsed_s=time.time() - T0)
    return record


def voice_names(entry: dict) -> set[str]:
    """The voices of a file of the demo corpus' manifest, as "engine:speaker" (prepare.py's names)."""
    return {f"{v['engine']}:{v['speaker']}" for v in entry["voices"]}


def adapt_voices(dialogues: dict[str, dict]) -> list[str]:
    """The training voices whose dialogues the base never hears and the fine-tunes adapt it to:
    ADAPT_VOICES that speak in the training dialogues (`dialogues`: path -> manifest entry), then,
    while the dialogues with any of them are fewer than 3 or hold less than ADAPT_SHARE of the
    training dialogues' seconds, the voice speaking in most of the others (ties by name)."""
    spoken = set().union(*(voice_names(e) for e in dialogues.values()))
    held = [v for v in ADAPT_VOICES if v in spoken]
    total = sum(e["seconds"] for e in dialogues.values())
    while True:
        adapted = [e for e in dialogues.values() if voice_names(e) & set(held)]
        counts = Counter(v for e in dialogues.values() if not voice_names(e) & set(held) for v in voice_names(e))
        if not counts or (len(adapted) >= 3 and sum(e["seconds"] for e in adapted) >= ADAPT_SHARE * total):
            return held
        held.append(min(counts, key=lambda v: (-counts[v], v)))


def split(corpus: Path, work: Path) -> dict:
    """jsonl manifests (model/manifest.py) in `work`, from the voices the corpus' manifest.json
    names for every file (`adapt_voices`): the training dialogues in which any of those voices
    speaks are dealt in file order, by ROLES, to "finetune-train" (what the fine-tunes learn
    from), "finetune-dev" (picks their best checkpoints) and "finetune-val" (the final figures);
    "base-train" is every other training file, monologues and dialogues, without those voices.
    The base's own picking and its quantization figures read val/ (other speakers). Emits a
    "split" line with the voices and each set's files and seconds; returns {name: path}. A --work
    whose manifests list other files (another corpus, or this script's earlier design, whose base
    heard every training dialogue) is refused, since its finished stages would be reused."""
    try:
        entries = json.loads((corpus / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {corpus / 'manifest.json'}: cannot read the corpus' voices ({e}); "
                         "rebuild it with data/demo/prepare.py --force") from None
    files = {str((corpus / e["path"]).resolve()): e for e in entries if e["path"].startswith("train/")}
    dialogues = {p: e for p, e in files.items() if e["path"].startswith("train/dialogue/")}
    held = adapt_voices(dialogues)
    adapted = sorted(p for p, e in dialogues.items() if voice_names(e) & set(held))
    chosen = {name: [p for i, p in enumerate(adapted) if ROLES[i % len(ROLES)] == name]
              for name in ("finetune-train", "finetune-dev", "finetune-val")}
    chosen["base-train"] = sorted(p for p, e in files.items() if not voice_names(e) & set(held))
    if len(adapted) < 3 or len(dialogues) == len(adapted):
        raise SystemExit(f"error: {corpus / 'train' / 'dialogue'} holds {len(dialogues)} dialogues, {len(adapted)} "
                         "with the fine-tuning voices; the split needs at least 3 of those (train, dev, val) and one "
                         "other for the base: build a larger corpus (--corpus-minutes)")
    texts = {name: "".join(json.dumps({"path": p, "duration": files[p]["seconds"]}) + "\n" for p in paths)
             for name, paths in chosen.items()}
    # the stages of an earlier run are reused: they must have learnt from the same files
    stale = [f"{name}.jsonl" for name, text in texts.items()
             if (work / f"{name}.jsonl").is_file() and (work / f"{name}.jsonl").read_text() != text]
    if stale:
        raise SystemExit(f"error: {work} holds runs of another split of the corpus ({', '.join(stale)} differ): "
                         "use another --work, or delete it")
    for name, text in texts.items():
        (work / f"{name}.jsonl").write_text(text)
    emit(bench="split", adapt_voices=held,
         **{name: {"files": len(paths), "dialogues": sum(p in dialogues for p in paths),
                   "seconds": round(sum(files[p]["seconds"] for p in paths), 1)} for name, paths in chosen.items()})
    return {name: work / f"{name}.jsonl" for name in chosen}


def train(args, work: Path, log: Path) -> tuple[str, str]:
    """Corpus, codec (unless --codec) and base transformer (unless --checkpoint); returns the
    (base, codec) checkpoint paths. The base learns from the training monologues and dialogues
    without the fine-tuning voices (`split`), and is picked on val/mono."""
    corpus = Path(args.corpus)
    if not (corpus / "train").is_dir():
        # --smoke: eSpeak NG alone, the fastest, and the same corpus wherever Flite and Festival are installed
        run(["data/demo/prepare.py", "--minutes", args.corpus_minutes, "--seed", 0, "--out", corpus,
             *(["--engines", "espeak"] if args.smoke else [])], log)
    manifests = split(corpus, work)
    common = [f"train_data_path={corpus / 'train'}", f"val_data_path={corpus / 'val'}", "wandb=disabled",
              f"device={args.device}"]
    codec = args.codec
    if codec is None:
        codec_dir = work / "codec"
        steps = ["max_steps=2", "eval_interval=2", "save_interval=2", "log_interval=1"] if args.smoke else \
            ["max_steps=20000", "warmup_steps=200", "eval_interval=250", "save_interval=250", "log_interval=50",
             "num_workers=6", f"max_minutes={args.codec_minutes}"]
        stage(work, "codec", ["train_codec.py", "--config", args.preset, *common, f"checkpoint_dir={codec_dir}", *steps],
              log, in_process=args.smoke)
        codec = str(codec_dir / "best.safetensors")
    if args.checkpoint:
        return args.checkpoint, codec
    steps = ["max_steps=4", "eval_interval=2", "save_interval=2", "log_interval=1", "batch_size=2", "val_crops=4",
             "seq_len=32"] if args.smoke else \
        ["seq_len=256", "batch_size=32", "max_steps=300", "warmup_steps=30", "learning_rate=6e-4", "min_lr=6e-5",
         "eval_interval=50", "save_interval=300", "log_interval=10", "num_workers=4",
         f"max_minutes={args.transformer_minutes}"]
    common = [f"train_data_path={manifests['base-train']}", f"val_data_path={corpus / 'val' / 'mono'}",
              "wandb=disabled", f"device={args.device}", f"codec_checkpoint={codec}", f"latents_dir={work / 'latents'}",
              "compile=false", "duplex=true", "sample_seconds=0"]
    q_dir, lm_dir = work / "base-quantizer", work / "base-lm"
    stage(work, "base-quantizer", ["train_transformer.py", "--config", args.preset, *common, *steps,
                                   "stage=quantizer", f"checkpoint_dir={q_dir}"], log, in_process=args.smoke)
    stage(work, "base-lm", ["train_transformer.py", "--config", args.preset, *common, *steps, "stage=lm",
                            f"init_from={q_dir / 'best.safetensors'}", f"checkpoint_dir={lm_dir}"], log,
          in_process=args.smoke)
    return str(lm_dir / "best.safetensors"), codec


def finetune(args, work: Path, log: Path, base: str, codec: str) -> dict:
    """The base fine-tuned on the dialogues of voices it never heard (finetune-train; stage=lm: the
    quantizer, hence the codes the LM predicts, and the resynthesizer stay the base's), fully and
    with LoRA, for the same steps: the first full run for --finetune-minutes, every other run for
    as many steps as it made, each kind at each of its learning rates. All at a constant learning
    rate after a short warmup (so that the steps, not a schedule, differ from the time limit's),
    each keeping its best checkpoint on other dialogues of those voices (finetune-dev), evaluated
    every 10 steps: a batch (16 crops of 32 s) holds more audio than the few minutes they train on,
    so the best can come early. Returns {"full": .safetensors, "lora": .adapter.safetensors,
    "steps": {...}, "lr": {...}} (each kind's picked run and rate)."""
    train_set, dev_set = work / "finetune-train.jsonl", work / "finetune-dev.jsonl"  # split() wrote them
    common = ["train_transformer.py", "--config", args.preset, f"init_from={base}", f"codec_checkpoint={codec}",
              f"train_data_path={train_set}", f"val_data_path={dev_set}", f"latents_dir={work / 'latents'}",
              "wandb=disabled", f"device={args.device}", "compile=false", "duplex=true", "stage=lm",
              "sample_seconds=0", "keep_checkpoints=1"]
    common += ["seq_len=32", "batch_size=2", "val_crops=4", "warmup_steps=1", "eval_interval=2", "log_interval=1"] \
        if args.smoke else ["seq_len=256", "batch_size=16", "warmup_steps=10", "eval_interval=10", "log_interval=5",
                            "num_workers=4"]
    steps = None  # the first run's, which --finetune-minutes ends: every other run makes as many

    def sweep(model: str, rates: list[float], prefix: str, settings: list[str]) -> tuple[Path, dict, float]:
        """One stage per learning rate (`prefix`, with -lrRATE when there are several); returns
        the (folder, record, rate) of the run of lowest LM cross-entropy on finetune-dev."""
        nonlocal steps
        runs = {}
        for lr in rates:
            name = prefix + ("" if len(rates) == 1 else f"-lr{lr:g}")
            if args.smoke:
                limit = ["max_steps=4"]
            elif steps is None:
                limit = ["max_steps=100000", f"max_minutes={args.finetune_minutes}"]
            else:  # the time limit only guards against a much slower step
                limit = [f"max_steps={steps}", f"max_minutes={2 * args.finetune_minutes}"]
            record = stage(work, name, [*common, *limit, *settings, f"learning_rate={lr}", f"min_lr={lr}",
                                        "save_interval=100000", f"checkpoint_dir={work / name}"], log,
                           in_process=args.smoke)
            steps = steps or record["steps"]
            runs[lr] = (work / name, record)
        dev = {lr: record.get("best_val_lm_ce") for lr, (_, record) in runs.items()}
        picked = min(runs, key=lambda lr: math.inf if dev[lr] is None else dev[lr])
        if len(runs) > 1:
            emit(bench="finetune_pick", model=model, dev_lm_ce={f"{lr:g}": ce for lr, ce in dev.items()},
                 learning_rate=picked, elapsed_s=time.time() - T0)
        return (*runs[picked], picked)

    full_dir, full, full_lr = sweep("full", args.full_lr, "finetune-full", ["finetune=full"])
    targets = "" if args.lora_targets == "both" else f"-{args.lora_targets}"
    lora_dir, lora, lora_lr = sweep("lora", args.lora_lr, f"finetune-lora{targets}",
                                    ["finetune=lora", f"lora_rank={args.lora_rank}", f"lora_alpha={2 * args.lora_rank}",
                                     f"lora_targets={args.lora_targets}"])
    return {"full": str(full_dir / "best.safetensors"), "lora": str(lora_dir / "best.adapter.safetensors"),
            "steps": {"full": full["steps"], "lora": lora["steps"]}, "lr": {"full": full_lr, "lora": lora_lr}}


def evaluate(args, work: Path, log: Path, model: str, codec: str, train_path: Path, val_path: Path,
             extra: tuple = ()) -> dict:
    """The trainer's own evaluation (`train_transformer.py eval_only=true`) of `model` on the
    validation crops of `val_path`, in this process (one process start for every evaluation; its
    output goes to the log); returns its metrics, and `eval_s` its wall time."""
    import train_transformer
    argv = ["--config", args.preset, f"init_from={model}", f"codec_checkpoint={codec}", f"val_data_path={val_path}",
            f"train_data_path={train_path}", f"latents_dir={work / 'latents'}", "eval_only=true", "compile=false",
            "wandb=disabled", f"device={args.device}", "duplex=true", f"checkpoint_dir={work / 'eval'}",
            f"seq_len={args.eval_seq_len}", *(["batch_size=2", "val_crops=4"] if args.smoke else []), *extra]
    t = time.time()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        f.write(f"$ (in process) train_transformer.py {' '.join(argv)}\n")
        metrics = train_transformer.main(argv)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {**metrics, "eval_s": time.time() - t}


def merged(base: str, adapter: str, codec: str) -> str:
    """The LoRA adapter folded into its base, saved beside it as an ordinary checkpoint (the
    trainer's evaluation takes init_from files)."""
    from model import load_hertz_dev, save_transformer
    path = adapter.replace(".adapter.safetensors", ".merged.safetensors")
    save_transformer(path, load_hertz_dev(base, device="cpu", dtype=torch.float32, codec=None, adapter=adapter,
                                          merge=True), codec_source=codec)
    return path


def part_b(args, work: Path) -> int:
    """Train (or reuse) the base and evaluate it quantized (issue 12), then fine-tune it and
    evaluate the fine-tunes (issue 13). An evaluation that fails prints its error in its JSON line
    and the others still run; returns how many failed."""
    log = work / "log.txt"
    corpus = Path(args.corpus)
    base, codec = train(args, work, log)
    failures = 0

    def attempt(bench: str, label: dict, *where, extra=()) -> dict | None:
        nonlocal failures
        try:
            return evaluate(args, work, log, *where, extra=extra)
        except Exception as e:  # noqa: BLE001 - one failed evaluation must not cost the others' figures
            failures += 1
            emit(bench=bench, **label, error=f"{type(e).__name__}: {e}"[:500], elapsed_s=time.time() - T0)
            return None

    # issue 12, 4b: the base in bf16 and as deployed quantized, on the val monologues
    metrics = {}
    for mode in ("bf16", "int8", "int4", "fp8_kv") if args.quant_eval else ():
        extra = {"bf16": [], "int8": ["eval_quantize=int8"], "int4": ["eval_quantize=int4"],
                 "fp8_kv": ["eval_kv_dtype=fp8"]}[mode]
        row = attempt("val", {"mode": mode}, base, codec, work / "base-train.jsonl", corpus / "val" / "mono",
                      extra=extra)
        if row is None:
            continue
        metrics[mode] = row
        fields = {k: row[f"val/{k}"] for k in ("lm_ce", "resynth_nll", "lm_acc", "code_usage", "positions")}
        if mode != "bf16" and "bf16" in metrics:
            ref = metrics["bf16"]
            for k in ("lm_ce", "resynth_nll"):
                # relative to |bf16| (a Gaussian-mixture NLL can be negative)
                fields[f"{k}_rel_change"] = (row[f"val/{k}"] - ref[f"val/{k}"]) / abs(ref[f"val/{k}"])
            fields["bound"] = BOUNDS[mode]
            fields["within_bound"] = all(abs(fields[f"{k}_rel_change"]) <= BOUNDS[mode]
                                         for k in ("lm_ce", "resynth_nll"))
        emit(bench="val", mode=mode, data="val/mono", checkpoint=base, **fields, eval_s=row["eval_s"],
             elapsed_s=time.time() - T0)
    # issue 13, 4: base, full fine-tuning and LoRA on dialogues of the fine-tuning voices they did not train on
    tuned = finetune(args, work, log, base, codec)
    t = time.time()
    try:
        lora = merged(base, tuned["lora"], codec)
        emit(bench="stage", stage="merge-lora", wall_s=time.time() - t, elapsed_s=time.time() - T0)
    except Exception as e:  # noqa: BLE001 - as an evaluation's
        failures += 1
        lora = None
        emit(bench="stage", stage="merge-lora", error=f"{type(e).__name__}: {e}"[:500], elapsed_s=time.time() - T0)
    ce = {}
    for name, path in (("base", base), ("full", tuned["full"]), ("lora", lora)):
        if path is None:
            continue
        row = attempt("finetune", {"model": name}, path, codec, work / "finetune-train.jsonl",
                      work / "finetune-val.jsonl")
        if row is None:
            continue
        ce[name] = row["val/lm_ce"]
        emit(bench="finetune", model=name, data="finetune-val", checkpoint=path, steps=tuned["steps"].get(name, 0),
             learning_rate=tuned["lr"].get(name),
             **{k: row[f"val/{k}"] for k in ("lm_ce", "resynth_nll", "lm_acc", "positions")}, eval_s=row["eval_s"],
             elapsed_s=time.time() - T0)
    if len(ce) == 3:
        gain = {k: ce["base"] - ce[k] for k in ("full", "lora")}
        recovered = gain["lora"] / gain["full"] if gain["full"] > 0 else None
        emit(bench="finetune_summary", lm_ce_gain_full=gain["full"], lm_ce_gain_lora=gain["lora"],
             lora_recovered=recovered, lora_below_base=ce["lora"] < ce["base"],
             acceptance=bool(recovered is not None and recovered >= 0.7 and ce["lora"] < ce["base"]),
             steps=tuned["steps"], lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
             lora_targets=args.lora_targets,
             elapsed_s=time.time() - T0)
    return failures


def rates(text: str) -> list[float]:
    """--lora-lr: comma-separated positive learning rates."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
    return values


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "both"), default="both")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny presets, a few steps: checks the code path")
    ap.add_argument("--device", default=None, help="default cuda (--smoke: cpu)")
    ap.add_argument("--size", default=None, help="(a) preset (default hertz_dev; --smoke: tiny)")
    ap.add_argument("--batch", type=int, default=2, help="(a) rows of the fixed input")
    ap.add_argument("--frames", type=int, default=None, help="(a) latents a row (default 256; --smoke: 16)")
    ap.add_argument("--preset", default=None, help="(b) preset trained and evaluated (default small; --smoke: tiny)")
    ap.add_argument("--checkpoint", type=os.path.expanduser, help="(b) a trained duplex base (.safetensors) instead of training one")
    ap.add_argument("--codec", type=os.path.expanduser, help="(b) the codec (.safetensors) to use instead of training one")
    ap.add_argument("--no-quant-eval", dest="quant_eval", action="store_false",
                    help="(b) only the fine-tuning proof: skip the base's quantized evaluations")
    ap.add_argument("--corpus", default=None, help="(b) the demo corpus folder (built if missing; default data/demo)")
    ap.add_argument("--corpus-minutes", type=float, default=60.0,
                    help="(b) minutes of the corpus, if built (gpu_setup.sh's 60 by default)")
    ap.add_argument("--codec-minutes", type=float, default=2.5, help="(b) codec training, unless --codec")
    ap.add_argument("--transformer-minutes", type=float, default=1.0, help="(b) each of the two base stages")
    ap.add_argument("--finetune-minutes", type=float, default=0.75,
                    help="(b) full fine-tuning; LoRA then trains as many steps (at most 2x this long)")
    ap.add_argument("--full-lr", type=rates, default=rates("3e-4,1e-3"),
                    help="(b) learning rates of full fine-tuning, comma-separated: one run each, the best on "
                         "finetune-dev kept")
    ap.add_argument("--lora-lr", type=rates, default=rates("1e-3,3e-3"),
                    help="(b) learning rates of LoRA, comma-separated: one run each, the best on finetune-dev kept")
    ap.add_argument("--lora-targets", default="all", choices=("attention", "feedforward", "both", "all"),
                    help="(b) the layers LoRA adapts (train_transformer.py lora_targets)")
    ap.add_argument("--lora-rank", type=int, default=None, help="(b) default: the preset's lora_rank (alpha: 2x rank)")
    ap.add_argument("--eval-seq-len", type=int, default=None, help="(b) latents a val crop (default 256; --smoke: 32)")
    ap.add_argument("--work", default=None, help="(b) folder for runs and latents (default: checkpoints/quant_quality)")
    args = ap.parse_args()
    smoke = args.smoke
    defaults = dict(device="cpu" if smoke else "cuda", size="tiny" if smoke else "hertz_dev", frames=16 if smoke else 256,
                    preset="tiny" if smoke else "small", eval_seq_len=32 if smoke else 256,
                    corpus="data/demo", work="checkpoints/quant_quality")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lora_rank is None:
        args.lora_rank = PRESETS[args.preset].lora_rank
    for path in (args.checkpoint, args.codec):
        if path is not None and not os.path.isfile(path):
            ap.error(f"no such file: {path}")
    if args.checkpoint and not args.codec:
        ap.error("--checkpoint needs --codec (the codec its latents came from)")
    if smoke:
        # 5 training dialogues: 3 with the fine-tuning voices (train, dev, val), 2 for the base
        args.corpus_minutes = min(args.corpus_minutes, 6.0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name() if args.device.startswith("cuda")
         else "cpu", smoke=smoke)
    if args.part in ("a", "both"):
        part_a(args.size, args.device, args.batch, args.frames)
    failures = part_b(args, work) if args.part in ("b", "both") else 0
    emit(bench="done", failures=failures, elapsed_s=time.time() - T0)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
