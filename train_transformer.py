"""Train the latent quantizer, the latent LM and the resynthesizer on codec latents, mono or duplex.

    python data/demo/prepare.py --minutes 20                        # an offline demo corpus
    python train_codec.py --config tiny                             # the codec the tiny preset uses
    python train_transformer.py --config tiny                       # seconds on a CPU
    python train_transformer.py --config small device=cuda codec_checkpoint=official duplex=false
    torchrun --nproc_per_node 8 train_transformer.py --config hertz_dev init_from=official stage=lm
    python train_transformer.py --config hertz_dev init_from=official finetune=lora   # LoRA on one GPU

Stages (`stage=`), each resumable (see the README):
  quantizer      quantizer + resynthesizer jointly: the resynthesizer's mixture NLL of the next latent
                 given its FSQ code, gradients through FSQ's straight-through rounding into the quantizer
  resynthesizer  the resynthesizer alone, the quantizer frozen
  lm             the LM alone: cross-entropy on the frozen quantizer's index of the next latent
  all            all three: the NLL trains quantizer + resynthesizer, the cross-entropy trains the LM on
                 the current quantizer's indices (integers: no gradient reaches the quantizer from the LM)

Latents: the train and val folders are encoded once by the frozen codec (`codec_checkpoint`) into
`latents_dir` (mu and logvar; model/latents.py says why and how stale latents are ruled out); each
read draws z = mu + sigma * eps. Duplex reads two-channel files, one speaker per channel.

Everything goes to `checkpoint_dir`: `step_*.pt`, `latest.pt`, `best.pt` (by the stage's validation
loss) training states; `latest.safetensors` / `best.safetensors` for `model.load_hertz_dev` (LoRA runs,
`finetune=lora`: `latest.adapter.safetensors` / `best.adapter.safetensors`, see model/finetune.py);
`metrics.jsonl`, `samples/` (an audio completion per evaluation) and the W&B run. Evaluations also
print one JSON line each (`{"eval": step, ...}`).
"""
from __future__ import annotations

from config import exit_on_interrupt
with exit_on_interrupt():  # Ctrl-C or SIGTERM while importing (torch: seconds): one line, 130 or 143
    import dataclasses
    import json
    import math
    import os
    import sys
    import time
    import warnings
    from pathlib import Path
    from typing import Iterator

    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from config import ConfigError, check_compatible, fields_marked, from_dict, parse_args, printable
    from config.codec_config import CodecConfig
    from config.transformer_config import PRESETS, TransformerConfig
    from model import Codec, Generator, HertzDev, build, finetune, hub, load_codec, load_hertz_dev
    from model.checkpoint import CheckpointError, read_metadata
    from model.data import SkippedAudioWarning, StopSafeLoader, shared_with_training, workers_stopped
    from model.files import memory_limit
    from model.generator import completion_problem, completion_steps
    from model.loading import codec_config_fitting, official_transformer_config, recorded_codec_path, write_transformer
    from model.latents import (LatentCrops, LatentsError, StepSampler, codec_fingerprint, prepare_latents, sample_posterior,
                               scan_corpus)
    from model.objectives import STAGE_LOSSES, STAGES, compute_losses, peak_flops, through_cache, train_flops_per_latent
    from model.parallel import (compile_blocks, full_state_dicts, gradient_sync, inner, load_full_state_dicts,
                                parallelize, rank0_first)
    from model.quant import parameter_count, quantize_model
    from model.training import (Checkpoints, ConfigMismatch, Deadline, Dist, FiniteGuard, Logger, all_reduce_mean,
                                autocast, before_step, check_architecture, check_data_paths, check_finite_step,
                                check_folders, check_outside_data, check_resumable, check_schedule, check_trainer,
                                cosine_lr, finished, last_step, load_training_state, moved_aside, loss_scaler, partial_note, run_script,
                                resource_notes, schedule_notes, setup_distributed, state_to_load, stop_message, teardown_distributed,
                                validation_key, window_peak_gb, worker_warning_said, write_samples)

PARTS = ("quantizer", "lm", "resynth")
# FSDP2 warns about every module output that is a view; none of ours is modified in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def main(argv=None) -> dict:
    # --- config ---------------------------------------------------------------------------------
    cfg = parse_args(sys.argv[1:] if argv is None else argv, PRESETS,
                     elsewhere={"train_codec.py": CodecConfig})  # a key of the other trainer is named so
    check_config(cfg)
    lora = cfg.finetune == "lora"  # adapters on a frozen init_from base (model/finetune.py)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, before any process group
    finetune.check_config(cfg, world_size)
    if cfg.dtype == "float16" and cfg.parallel == "fsdp" and world_size > 1:
        raise ConfigError("dtype=float16 with parallel=fsdp: the float16 loss scale (model.training.loss_scaler) "
                          "is not sharded here; use dtype=bfloat16 (GPUs since Ampere), float32, or parallel=ddp")
    weights = {"lm_ce": cfg.lm_loss_weight, "resynth_nll": cfg.resynth_loss_weight}
    losses_of_stage, trained = STAGE_LOSSES[cfg.stage], finetune.trained_parts(cfg)

    # --- setup ----------------------------------------------------------------------------------
    ddp = setup_distributed(cfg.device)
    device, is_main = ddp.device, ddp.is_main
    say = tqdm.write if is_main else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    deadline = Deadline(cfg.max_minutes)
    run_dir = Path(cfg.checkpoint_dir)
    checkpoints = Checkpoints(run_dir, keep=cfg.keep_checkpoints,
                              export_suffix=finetune.ADAPTER_SUFFIX if lora else ".safetensors")

    # Where the weights come from: the latest checkpoint (resume), else init_from, else fresh.
    # eval_only evaluates init_from if given, else the latest checkpoint. Checked before the codec
    # loads and the latents are encoded, so a contradicting config fails at once.
    base = finetune.base_of(cfg) if lora else {}  # base_source, base_fingerprint of the LoRA base
    # one run at a time in a folder, till main ends; torch's warning of too many workers quiet after the note's
    with checkpoints.holding(is_main and not cfg.eval_only), worker_warning_said(cfg):
        latest = state_to_load(checkpoints, cfg.resume, cfg.eval_only, cfg.init_from, adapters=lora)
        state = read_state(latest, cfg, base) if latest else None
        step, source = (state["step"], f"{latest} (step {state['step']})") if state else (0, "random init")
        export = finetune.export_adapter if lora else export_state  # a state -> the file a user loads
        if finished(state, cfg, checkpoints, export, is_main, say):
            teardown_distributed()  # the same command again: nothing to train, nothing to encode
            return {}
        for note in resource_notes(cfg) + ([] if cfg.eval_only else schedule_notes(cfg) + stage_notes(cfg, state)):
            say(f"note: {note}")
        # the folder tidied after an interrupted save: a resumed run's before the latents (a damaged best.pt
        # is found here), a fresh run's once its old run is moved aside (below)
        for note in checkpoints.recover(export) if is_main and cfg.resume and not cfg.eval_only else []:
            say(f"note: {note}")
        codec = rank0_first(lambda: frozen_codec(cfg, device))  # rank 0 downloads the official codec if missing
        fingerprint = codec_fingerprint(codec)
        check_codec(state, latest, cfg, fingerprint, say)
        if is_main and not cfg.resume and not cfg.eval_only and (old := checkpoints.move_aside()):
            say(f"resume=false: moved the previous run in {printable(run_dir)} to {printable(old)}")
        train_set, val_set = build_data(cfg, codec, fingerprint, say)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if (state is None or lora) and cfg.init_from:  # a LoRA run's state holds the adapters, not the base
            model, label = rank0_first(lambda: initial_weights(cfg))
            source = label if state is None else f"{label}, adapters from {source}"
        else:
            model = build(HertzDev, cfg)
        calls = setup_model(model, cfg, ddp, trained)  # what the step calls for each part: itself, DDP or FSDP
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg, fsdp=ddp.enabled and cfg.parallel == "fsdp")
        scaler = loss_scaler(device, cfg.dtype)  # float16 only; passes everything through otherwise
        if state is not None:
            load_state(state, model, None if cfg.eval_only else optimizer, scaler, lora)
        if cfg.eval_quantize != "none":  # eval_only (check_config): the weights as a quantized deployment holds them
            quantize_model(model, cfg.eval_quantize, pack=False)  # whole sequences: no per-call unpacking of int4
        say(describe(model, cfg, trained, params, source, base, ddp))

        if cfg.eval_only:  # prints the metrics, writes nothing
            metrics, skipped = evaluate(model, calls, val_set, weights, cfg, ddp, said=set())
            if is_main:
                print(json.dumps({"eval": step, "source": source, **metrics}), flush=True)
            if note := non_finite_note(metrics, cfg, device):
                say(f"note: {source} evaluated{note}")
            if skipped:
                say(f"note: evaluated{partial_note(len(val_set), skipped, True)}")
            teardown_distributed()
            return metrics
        logger = Logger(cfg.wandb, cfg.wandb_project, run_dir, cfg, is_main=is_main,
                        resume_id=state.get("wandb_id") if state else None)
        for note in checkpoints.recover(export) if is_main and not cfg.resume else []:
            say(f"note: {note}")
        # what val/loss is measured on: best.pt is ranked among values measured on the same only
        validation = validation_key(val=val_set.folder.name, crops=val_set.crops, seq_len=cfg.seq_len, seed=cfg.seed,
                                    weights={k: weights[k] for k in losses_of_stage}, noise="per-crop")
        if is_main and (note := checkpoints.ranked_elsewhere(validation)):
            say(f"note: {note}")
        said = set()  # the validation files named unreadable so far: each is named once a run (`evaluate`)
        # the audio samples' prompt, read once: a validation shard damaged mid-run leaves the samples be
        prompt = val_set.crop(*val_set.crops[0]) if cfg.sample_seconds > 0 else None

        # --- training loop --------------------------------------------------------------------------
        loader = train_loader(train_set, cfg, ddp, step)
        batches = iter(loader)
        latents_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum_steps * ddp.world_size
        flops_per_latent = train_flops_per_latent(cfg, cfg.stage, cfg.seq_len)
        noise = torch.Generator(device)
        codes = torch.zeros(cfg.vocab_size, device=device)  # FSQ code histogram since the last log
        wrapped = [calls[name] for name in trained]
        # a fused optimizer skips a non-finite step on the device (FiniteGuard: no host sync a step);
        # under FSDP (not fused) the host checks each step before it is applied
        resumed = latest and (latest, step)  # (for the advice of a non-finite step's error)
        guard = FiniteGuard(optimizer, scaler=scaler, checkpoints=checkpoints, resumed=resumed) \
            if optimizer.defaults.get("fused") else None
        last = last_step(cfg.max_steps, cfg.stop_step)  # the schedule still ends at max_steps
        say(f"training from step {step} to {last}: {latents_per_step} latents "
            f"({cfg.batch_size} x {cfg.seq_len} x {cfg.grad_accum_steps} x {ddp.world_size}) per step, "
            f"{flops_per_latent / 1e9:.2f} GFLOP per latent; run folder {printable(run_dir)}")
        bar = tqdm(total=last, initial=step, disable=not is_main, dynamic_ncols=True, desc=f"train {cfg.stage}")
        start_step, t_log = step, time.time()
        sums, steps_since_log, metrics = {}, 0, {}
        # a SIGTERM or Ctrl-C stops the loop at the next step, saved; the data-loading workers stop with it
        with deadline.catching_signals(), workers_stopped(batches):
            while True:
                # evaluation and checkpoints come before the step: they describe the model after `step` updates
                t_pause = time.time()
                due = before_step(step, start_step, last, cfg.eval_interval, cfg.save_interval, deadline)
                if guard and (due.evaluate or due.save or due.stop):
                    guard.check()  # nothing is evaluated or saved after a non-finite step
                # what this step's evaluation measured (fewer crops: `partial_note`), and whether best.pt may rank it
                measured, ranked = validation, True
                if due.evaluate:
                    try:  # crops whose shard cannot be read now are left out (`evaluate`)
                        metrics, skipped = evaluate(model, calls, val_set, weights, cfg, ddp, said)
                    except LatentsError as e:  # none could be read: the state is saved unranked, and the run stops
                        deadline.unreadable, metrics, skipped = str(e), {}, []
                        due = dataclasses.replace(due, stop=True, save=step > start_step)
                    if metrics:
                        sample = audio_sample(step, model, prompt, codec, cfg, run_dir, logger, is_main)
                        logger.log({**metrics, **sample}, step)
                        if is_main:
                            print(json.dumps({"eval": step, **{k: round(v, 5) for k, v in metrics.items()}}), flush=True)
                        if note := non_finite_note(metrics, cfg, device):
                            say(f"note: step {step} evaluated{note}; not ranked for best.pt")
                    if skipped:  # measured on part of the validation: ranked only against the same part
                        measured = validation_key(validation=validation, skipped=skipped)
                        ranked = is_main and checkpoints.comparable(measured)
                        say(f"note: step {step} evaluated{partial_note(len(val_set), skipped, ranked)}")
                if due.save:
                    save(step, due.best_metric(metrics, "val/loss") if ranked else None, model, optimizer, scaler, cfg,
                         checkpoints, ddp, logger.run_id, fingerprint, base, measured)
                if due.stop:
                    if note := stop_message(step, cfg.max_steps, cfg.stop_step, cfg.max_minutes, deadline.stopped_by,
                                            deadline.lost_worker or deadline.unreadable):
                        say(note)
                    break
                t_log += time.time() - t_pause  # throughput counts training time only

                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = deadline.read(batches, cfg.grad_accum_steps)
                if micro_batches is None:  # a data-loading worker died: the loop stops at `step`, saved
                    continue
                step_loss = 0.0
                for micro, batch in enumerate(micro_batches):
                    # the posterior noise depends on (seed, step, micro-batch, rank) only: exact resume
                    seed = int(np.random.SeedSequence([cfg.seed, step, micro, ddp.rank]).generate_state(1)[0])
                    noise.manual_seed(seed)
                    if lora and cfg.lora_dropout:  # the adapters' dropout draws from the global generator
                        torch.manual_seed(seed)
                    x, valid = latents_of(batch, noise, device)
                    with gradient_sync(wrapped, micro == cfg.grad_accum_steps - 1):
                        with autocast(device, cfg.dtype):
                            losses, stats = compute_losses(calls["quantizer"], calls["lm"], calls["resynth"], x, valid,
                                                           cfg.duplex, losses_of_stage, "quantizer" in trained,
                                                           cfg.activation_checkpointing, cfg.compile)
                            losses["total"] = sum(weights[k] * losses[k] for k in losses_of_stage)
                        scaler.scale(losses["total"] / cfg.grad_accum_steps).backward()
                    step_loss = step_loss + losses["total"].detach()
                    tally(sums, codes, losses, stats, valid, cfg)
                scaler.unscale_(optimizer)  # (float16) the true gradients, before clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                    grad_norm = grad_norm.full_tensor()
                # under a float16 loss scale an overflowing gradient skips the step and lowers the scale
                files = batch_files(train_set, loader.sampler, step)  # read only if the step is reported
                if guard:
                    guard.flag(step, {"loss": step_loss}, files, grad_norms={"gradient norm": grad_norm})
                    optimizer.step()  # skipped on the device if flagged
                else:
                    check_finite_step(step, step_loss, None if scaler.is_enabled() else grad_norm, lambda: files,
                                      checkpoints, resumed)
                    scaler.step(optimizer)  # optimizer.step(), unless float16 gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_since_log += 1
                bar.update(1)

                if step % cfg.log_interval == 0 or step == last:
                    if guard:
                        guard.check()  # (the row below syncs anyway)
                    row = train_row(sums, codes, lr, grad_norm, latents_per_step, flops_per_latent, steps_since_log,
                                    time.time() - t_log, cfg, ddp)
                    logger.log(row, step)
                    bar.set_postfix(loss=f"{row['train/total']:.3f}", latents_s=f"{row['perf/latents_per_s']:.0f}")
                    sums, steps_since_log, t_log = {}, 0, time.time()
                    codes.zero_()

        bar.close()
        say(f"done at step {step}: {printable(run_dir / f'latest{checkpoints.export_suffix}')}")
        logger.finish()
        teardown_distributed()
        deadline.exit(step)  # stopped by a signal, a data-loading worker's death or an unreadable batch: saved
        return metrics


# --- small pieces used by main --------------------------------------------------------------------

def get_lr(step: int, cfg: TransformerConfig) -> float:
    """The learning rate at `step`: linear warmup, then cosine decay to min_lr."""
    return cosine_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)


def read_state(path: Path, cfg: TransformerConfig, base: dict) -> dict:
    """The training state at `path`, checked against this run: the architecture and what its weights
    are (full or adapters, and the adapters' shape and scale: evaluating), or every field a resumed
    run must keep (resuming); for a LoRA run, the same base (`base`)."""
    state = load_training_state(path, mmap=True)
    check_trainer(state, path, "model", "train_transformer.py")
    if cfg.eval_only:  # a LoRA state's adapters, loaded as full weights or as other adapters: a late traceback
        fields = fields_marked(TransformerConfig, "arch") + ("finetune",) + (
            finetune.ADAPTER_FIELDS if cfg.finetune == "lora" else ())
        check_compatible(state["config"], cfg, fields, f"the config contradicts the checkpoint it would evaluate, "
                         f"{path}", "Use the checkpoint's values, or another checkpoint_dir.")
    else:  # resuming must also train the same stage, the same way
        fields = fields_marked(TransformerConfig, "arch", "resume")
        if cfg.finetune == state["config"].get("finetune") == "full":  # LoRA's values do nothing in either run
            fields = tuple(f for f in fields if f not in finetune.LORA_ONLY)
        check_resumable(state["config"], cfg, fields)
    if cfg.finetune == "lora":
        finetune.check_resume(state, base, path)
    return state


def check_codec(state: dict | None, path: Path | None, cfg: TransformerConfig, fingerprint: str, say) -> None:
    """Raise ConfigMismatch if the state at `path` was trained on the latents of another codec. A
    new run from one of our exports (init_from) that learnt another codec's latents is allowed (moving
    a model onto a fine-tuned codec is a workflow) but said, since it may as well be a mistake."""
    if state is not None and state["codec"] != fingerprint:
        raise ConfigMismatch(f"{path} was trained on latents of codec {state['codec']} "
                             f"({state['codec_source']}), this run's codec {cfg.codec_checkpoint} is {fingerprint}. "
                             "Use the same codec, another checkpoint_dir, or resume=false.")
    if (state is None or cfg.finetune == "lora") and cfg.init_from and os.path.isfile(cfg.init_from):
        extra = read_metadata(cfg.init_from, "transformer")["extra"]
        if extra.get("codec_fingerprint", fingerprint) != fingerprint:
            say(f"note: init_from={cfg.init_from} was trained on latents of codec {extra['codec_fingerprint']} "
                f"({extra.get('codec')}); this run's codec {cfg.codec_checkpoint} is {fingerprint}, whose latents "
                "it has not seen (pass its codec as codec_checkpoint if that is not what you meant)")


def build_data(cfg: TransformerConfig, codec, fingerprint: str, say) -> tuple[LatentCrops | None, LatentCrops]:
    """The training and validation crops of the train and val folders' latents, encoded by `codec`
    into latents_dir first where they are missing or stale; with eval_only the val folder's only
    (the training crops are None: the train folder is neither read nor encoded)."""
    channels = "stereo" if cfg.duplex else "mono"
    splits = {"val": cfg.val_data_path} if cfg.eval_only else {"train": cfg.train_data_path, "val": cfg.val_data_path}
    # a val folder without usable audio, before train is encoded
    files = {split: scan_corpus(path, cfg.sample_rate, codec.hop_length) for split, path in splits.items()}
    if cfg.duplex and "train" in files and all(f.channels == 1 for f in files["train"]):
        learns = "stay silent" if cfg.mono_to_stereo == "silence" else "repeat its partner"
        say(f"note: every file of train_data_path={cfg.train_data_path} has one channel: duplex=true pairs each with "
            f"{'silence' if cfg.mono_to_stereo == 'silence' else 'itself'} (mono_to_stereo={cfg.mono_to_stereo}), "
            f"so the model learns to {learns} on channel 1, the voice it becomes; set duplex=false for a mono model, "
            "or give it two-channel conversations")
    if "train" in files and (note := shared_with_training(files["val"], files["train"], cfg.val_data_path)):
        say(f"note: {note}")  # the same files under two paths count too (a link, a manifest beside the folder)
    folders = {split: prepare_latents(path, codec, channels, cfg.latents_dir, cfg.sample_rate, cfg.mono_to_stereo,
                                      fingerprint, cfg.num_workers, log=say, model_channel=cfg.model_channel)
               for split, path in splits.items()}
    train_set = LatentCrops(folders["train"], cfg.seq_len, train=True, seed=cfg.seed) if "train" in folders else None
    val_set = LatentCrops(folders["val"], cfg.seq_len, train=False, val_crops_per_file=cfg.val_crops_per_file,
                          max_crops=cfg.val_crops)
    train = f"train {train_set.lengths.sum()} in {len(train_set.files)} files, " if train_set else ""
    say(f"latents (codec {fingerprint}, {channels}): {train}val {len(val_set)} crops of <= {cfg.seq_len}")
    if train_set is not None and (longest := int(train_set.lengths.max())) < cfg.seq_len:
        # (every crop padded to seq_len: the steps' compute, and their latents/s, are mostly padding)
        padding = 1 - train_set.lengths.sum() / (len(train_set.files) * cfg.seq_len)
        say(f"note: seq_len={cfg.seq_len} is longer than every file of train_data_path={cfg.train_data_path} (the "
            f"longest is {longest} latents): each crop is padded to seq_len, about {padding:.0%} of each step is "
            f"padding that trains nothing; seq_len={longest} trains the same for less")
    return train_set, val_set


def setup_model(model: HertzDev, cfg: TransformerConfig, ddp: Dist, trained: tuple[str, ...]) -> dict:
    """Make the trained parts learn (their weights, or with finetune=lora their adapters) and freeze
    the others, move them to the device, compile their blocks (`compile`), and wrap the trained
    parts for the processes (DDP or FSDP). Returns what the step calls for each part."""
    lora, fsdp = cfg.finetune == "lora", ddp.enabled and cfg.parallel == "fsdp"
    compute_dtype = torch.bfloat16 if ddp.device.type == "cuda" and cfg.dtype == "bfloat16" else torch.float32
    if lora:  # cast, quantize and adapt the base on the CPU; only the adapters then learn
        finetune.setup(model, cfg, compute_dtype)
    for name in PARTS:  # trained parts learn; the others are frozen (and left out of the optimizer)
        part = getattr(model, name).train(name in trained)
        if not lora:  # a LoRA model's trainable parameters are its adapters (finetune.setup)
            part.requires_grad_(name in trained)
        if not (fsdp and name in trained):
            part.to(ddp.device)  # FSDP moves a trained part to the GPUs block by block, as it shards it
    if cfg.compile:
        for name in ("lm", "resynth"):
            compile_blocks(getattr(model, name))
    mesh = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(ddp.device.type, (ddp.world_size,))
    return {name: parallelize(getattr(model, name), cfg.parallel, ddp.device, ddp.world_size, compute_dtype, mesh)
            if name in trained else getattr(model, name) for name in PARTS}


def load_state(state: dict, model: HertzDev, optimizer: torch.optim.Optimizer | None,
               scaler: torch.amp.GradScaler, lora: bool) -> None:
    """Load a training state's weights (LoRA: its adapters) into `model`, and its optimizer state
    and loss scale (float16) unless `optimizer` is None; then drop them from `state`, which the run
    keeps."""
    load = finetune.load_state_dicts if lora else load_full_state_dicts
    load(model, state["model"], *((optimizer, state["optimizer"]) if optimizer is not None else ()))
    if optimizer is not None and state.get("scaler"):  # saved by a float16 run (others save none)
        scaler.load_state_dict(state["scaler"])
    del state["model"], state["optimizer"]


def make_optimizer(params: list, cfg: TransformerConfig, fsdp: bool) -> torch.optim.AdamW:
    """AdamW over the trainable `params`, with weight decay on the matrices only; fused (one
    kernel a step, and a non-finite step skipped on the device: `FiniteGuard`) except under FSDP
    (as before: there the host checks each step, `check_finite_step`)."""
    decay, rest = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=not fsdp)


def batch_files(train_set: LatentCrops, sampler: StepSampler, step: int) -> Iterator[str]:
    """The files of this rank's batch at `step`, computed when read (a reported step only)."""
    for j in sampler.indices(step):
        yield train_set.files[train_set.draw(j)[0]]["name"]


def train_loader(train_set: LatentCrops, cfg: TransformerConfig, ddp: Dist, step: int) -> torch.utils.data.DataLoader:
    """This rank's training batches from `step` on (`StepSampler`: what a micro-batch reads depends
    on its step, its index and the rank only, so a resumed run reads what an uninterrupted one would)."""
    sampler = StepSampler(cfg.batch_size, cfg.grad_accum_steps, ddp.rank, ddp.world_size, start_step=step)
    return StopSafeLoader(train_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          pin_memory=ddp.device.type == "cuda", sampler=sampler)


def describe(model: HertzDev, cfg: TransformerConfig, trained: tuple[str, ...], params: list, source: str,
             base: dict, ddp: Dist) -> str:
    """What the run trains, on which weights and processes (and, for LoRA, its adapters)."""
    n_params = {name: parameter_count(getattr(model, name)) for name in PARTS}  # (quantized layers' weights too)
    what = "evaluating" if cfg.eval_only else "training"  # (eval_only trains nothing)
    text = (f"stage {cfg.stage}: {what} {' + '.join(trained)} ({sum(n_params[n] for n in trained) / 1e6:.2f}M of "
            f"{sum(n_params.values()) / 1e6:.2f}M parameters), {'duplex' if cfg.duplex else 'mono'}, weights from "
            f"{source}; {ddp.world_size} x {ddp.device}" + (f" ({cfg.parallel})" if ddp.enabled else ""))
    if cfg.finetune == "lora":
        text += (f"\nfinetune=lora: {sum(p.numel() for p in params) / 1e6:.2f}M adapter parameters "
                 f"(rank {cfg.lora_rank}, {cfg.lora_targets}) on the frozen base {base['base_source']}"
                 + (f" in {mode}" if (mode := finetune.base_quantization(cfg)) else ""))
    return text


def latents_of(batch: dict, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's posterior sample (B, T, C*32), zero on padding, and its valid mask (B, T)."""
    posterior = batch["posterior"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    return sample_posterior(posterior, generator) * valid[..., None], valid


def val_latents(batch: dict, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents_of` for validation: each crop's posterior noise drawn from its own generator,
    seeded by `seed` and the crop's index, so the figures do not depend on how the crops are
    dealt out (the number of processes, the batch size). One generator for a rank's crops in
    turn made them change with the number of GPUs, and best.pt ranked figures measured so."""
    posterior = batch["posterior"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    mu, logvar = posterior.unbind(dim=2)
    eps = torch.stack([torch.randn(mu.shape[1:], device=device, dtype=mu.dtype,
                                   generator=torch.Generator(device).manual_seed(seed * 1_000_003 + max(int(i), 0)))
                       for i in batch["index"]])
    return Codec.sample(mu, logvar, eps=eps) * valid[..., None], valid


@torch.no_grad()
def evaluate(model: HertzDev, calls: dict, val_set: LatentCrops, weights: dict, cfg: TransformerConfig,
             ddp: Dist, said: set[int]) -> tuple[dict, list[int]]:
    """LM and resynthesizer validation metrics over the fixed crops (shared out over ranks) with
    the same posterior noise every time, and the quantizer's code usage; `val/loss` weighs the
    stage's losses by `weights`. And the crops left out (their index in the validation set, the
    same on every rank): those whose shard cannot be read now, each file named in one warning by
    rank 0 unless in `said` (the files named by the run's earlier evaluations, which it adds to);
    a LatentsError when none can be read. A collective under torch.distributed."""
    device = ddp.device
    for m in model.children():
        m.eval()
    parts = [inner(calls[name]) for name in PARTS]
    if cfg.eval_kv_dtype != "none":  # eval_only: the LM and resynthesizer read their keys/values from a cache
        parts[1:] = [through_cache(p, cfg.eval_kv_dtype) for p in parts[1:]]
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # lm ce, lm correct, resynth nll, positions
    histogram = torch.zeros(cfg.vocab_size, device=device, dtype=torch.float64)
    unread = []  # (crop, why) of this rank's crops that cannot be read now
    for batch in val_batches(val_set, cfg.batch_size, ddp.rank, ddp.world_size, unread):
        x, valid = val_latents(batch, cfg.seed, device)
        with autocast(device, cfg.dtype):
            out, stats = compute_losses(*parts, x, valid, cfg.duplex, ("lm_ce", "resynth_nll"),
                                        compiled=cfg.compile)
        n = stats["count"] * cfg.channels
        sums += torch.stack([out["lm_ce"] * n, stats["lm_correct"], out["resynth_nll"] * n, n]).double()
        count_codes(histogram, stats, valid, cfg)
    missing = torch.zeros(len(val_set), device=device, dtype=torch.float64)  # 1: a crop left out, on any rank
    missing[[j for j, _ in unread]] = 1
    if ddp.enabled:
        dist.all_reduce(sums)
        dist.all_reduce(histogram)
        dist.all_reduce(missing)
    for name in finetune.trained_parts(cfg):
        getattr(model, name).train()
    skipped = missing.nonzero().flatten().tolist()
    if skipped:  # (the same on every rank) each rank's reasons to rank 0, which names each file once a run
        everyone = [unread]
        if ddp.enabled:
            everyone = [None] * ddp.world_size
            dist.all_gather_object(everyone, unread)
        for j, why in sorted(sum(everyone, [])):
            if ddp.is_main and (file := val_set.crops[j][0]) not in said:
                said.add(file)
                warnings.warn(f"leaving the validation crops of {val_set.files[file]['name']} out while they cannot be "
                              f"read (said once; each evaluation's note counts them): {why}", SkippedAudioWarning)
    if len(skipped) == len(val_set):
        raise LatentsError(f"latents folder {val_set.folder}: none of its {len(val_set)} validation crops can be read "
                           f"now (named above); delete {val_set.folder} and run again to encode it anew")
    ce, correct, nll, n = (sums / sums[3].clamp_min(1)).tolist()[:3] + [sums[3].item()]
    p = histogram / histogram.sum().clamp_min(1)
    metrics = {"val/lm_ce": ce, "val/lm_acc": correct, "val/lm_ppl": math.exp(min(ce, 50.0)),
               "val/resynth_nll": nll, "val/code_usage": (histogram > 0).double().mean().item(),
               "val/code_perplexity": math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()), "val/positions": n}
    metrics["val/loss"] = sum(weights[k] * metrics[f"val/{k}"] for k in STAGE_LOSSES[cfg.stage])
    return metrics, skipped


def non_finite_note(metrics: dict, cfg: TransformerConfig, device: torch.device) -> str:
    """What follows an evaluation's line when some of its metrics are NaN or inf (the JSON line
    prints them bare, metrics.jsonl as null): which, and the likely cause, as the codec trainer's
    `evaluation_note` says it of its reconstructions; "" when all are finite."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return ""
    dtype = cfg.dtype if device.type == "cuda" else "float32"  # (`autocast`)
    return (f" to NaN or inf {', '.join(bad)}: the model's outputs overflow on the validation latents in {dtype} "
            "(weights or latents too large for it)" + ("" if dtype == "float32" else "; try dtype=float32"))


@torch.no_grad()
def audio_sample(step: int, model: HertzDev, crop: dict | None, codec, cfg: TransformerConfig, run_dir: Path,
                 logger: Logger, is_main: bool) -> dict:
    """Continue `crop` (the first validation crop; the first half of it, at most) for `sample_seconds`
    with the cached sampling loop LM -> token -> resynthesizer -> latent; decode both, write
    samples/step_*.wav (rank 0) and return its W&B media. Nothing with sample_seconds=0."""
    if cfg.sample_seconds <= 0:
        return {}
    prompt_len = max(1, min(int(crop["valid"].sum()), cfg.seq_len // 2))
    device = next(codec.parameters()).device
    prompt = crop["posterior"][None, :prompt_len, 0].to(device)  # the posterior mean, (1, P, C*32)
    hop = codec.hop_length  # samples per latent: 2000 for the official codec, another for one of ours
    latents = complete(model, prompt, completion_steps(cfg.sample_seconds, cfg.sample_rate, hop), seed=step)
    if not is_main:
        return {}
    audio = torch.cat([codec.decode(c.float()) for c in latents.chunk(cfg.channels, dim=-1)], dim=1)[0]  # (C, N)
    from model.audio import save_audio
    write_samples(run_dir / "samples", lambda folder: save_audio(str(folder / f"step_{step:08d}.wav"),
                                                                 audio.clamp(-1, 1).cpu().numpy(), cfg.sample_rate))
    clip = logger.audio("samples/completion", audio.cpu().numpy(), cfg.sample_rate,
                        caption=f"{prompt_len * hop / cfg.sample_rate:.1f} s prompt, {cfg.sample_seconds:.1f} s generated")
    return {"samples/completion": clip} if clip is not None else {}


def tally(sums: dict, codes: torch.Tensor, losses: dict, stats: dict, valid: torch.Tensor,
          cfg: TransformerConfig) -> None:
    """Add a micro-batch's losses, LM accuracy and FSQ codes to what the next log row averages."""
    for k, v in losses.items():
        sums.setdefault(f"train/{k}", []).append(v.detach().float())
    if "lm_correct" in stats:
        sums.setdefault("train/lm_acc", []).append(stats["lm_correct"] / (cfg.channels * stats["count"]).clamp_min(1))
    count_codes(codes, stats, valid, cfg)


def count_codes(histogram: torch.Tensor, stats: dict, valid: torch.Tensor, cfg: TransformerConfig) -> None:
    """Add a batch's FSQ codes to `histogram` (vocab_size,) without a host sync: padding adds
    zero counts, and so do the out-of-range indices of NaN codes (a diverged quantizer, which
    check_finite_step reports)."""
    index = stats["indices"].flatten().long()
    inside = (index >= 0) & (index < cfg.vocab_size)
    counts = (valid.repeat(cfg.channels, 1).flatten() & inside).to(histogram.dtype)
    histogram.index_add_(0, index.where(inside, 0), counts)


def train_row(sums: dict, codes: torch.Tensor, lr: float, grad_norm: torch.Tensor, latents_per_step: int,
              flops_per_latent: float, steps: int, seconds: float, cfg: TransformerConfig, ddp: Dist) -> dict:
    """The log row of the last `steps` steps (`seconds` of training): the losses averaged over the
    micro-batches and ranks, the code usage, the last gradient norm, the learning rate, the
    throughput and the model FLOP utilisation. A collective under torch.distributed."""
    keys = list(sums)
    means = [torch.stack(sums[k]).mean().float() for k in keys] + [(codes > 0).float().mean()]
    *values, usage = all_reduce_mean(torch.stack(means)).tolist()  # one collective, one host sync
    row = dict(zip(keys, values))
    row["train/code_usage"] = usage  # per rank, since the last log
    rate = latents_per_step * steps / seconds
    row.update({"lr": lr, "grad_norm": grad_norm.item(), "perf/latents_per_s": rate, "perf/step_s": seconds / steps})
    if "train/lm_ce" in row:
        row["train/lm_ppl"] = math.exp(min(row["train/lm_ce"], 50.0))
    if peak := peak_flops(ddp.device, cfg.peak_tflops):
        row["perf/mfu"] = rate * flops_per_latent / (peak * ddp.world_size)
    if (mem := window_peak_gb(ddp.device)) is not None:
        row["perf/gpu_mem_gb"] = mem
    return row


def save(step: int, metric: float | None, model: HertzDev, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, cfg: TransformerConfig, checkpoints: Checkpoints, ddp: Dist,
         wandb_id: str | None, fingerprint: str, base: dict, validation: str) -> None:
    """Training state (full, unsharded) to step_*.pt / latest.pt (/ best.pt), and the model as
    latest.safetensors (/ best.safetensors) for load_hertz_dev, or with finetune=lora the adapters
    (model/finetune.py); `validation`: what `metric` was measured on (`validation_key`). A
    collective under FSDP; rank 0 writes."""
    lora = cfg.finetune == "lora"
    model_state, optim_state = (finetune.state_dicts if lora else full_state_dicts)(model, optimizer)
    if not ddp.is_main:
        return
    training_state = {"model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict(), "step": step,
                      "config": dataclasses.asdict(cfg), "codec": fingerprint, "codec_source": recorded_codec_path(cfg.codec_checkpoint),
                      "world_size": ddp.world_size, "wandb_id": wandb_id,
                      "val/loss": metric, **base}
    export = finetune.export_adapter if lora else export_state
    checkpoints.save(step, training_state, metric, export=lambda tmp: export(training_state, tmp),
                     validation=validation)


def export_state(saved: dict, tmp: str) -> None:
    """The model of a training state as our .safetensors (for load_hertz_dev); also rebuilds an
    export that a kill left behind its .pt."""
    extra = {"step": saved["step"], "stage": saved["config"]["stage"], "codec_fingerprint": saved["codec"],
             "val/loss": saved.get("val/loss")}
    write_transformer(tmp, _export_model(from_dict(TransformerConfig, saved["config"], strict=False), saved["model"]),
                      codec_source=saved["codec_source"], extra=extra)

def check_config(cfg: TransformerConfig) -> None:
    """Mistakes found from the config alone and the file system, before anything slow."""
    check_folders(cfg, "checkpoint_dir", "latents_dir", "ckpt_dir")
    if cfg.plex_roll != 1:
        raise ConfigError("training assumes plex_roll=1 (the official value): position t predicts latent t+1 "
                          "given the code of latent t+1")
    if cfg.seq_len < 2:
        raise ConfigError("seq_len must be at least 2 latents (one prediction)")
    cfg.check_architecture()  # (as the loaders check a checkpoint's header)
    if not cfg.eval_only and (cfg.eval_quantize != "none" or cfg.eval_kv_dtype != "none"):
        raise ConfigError("eval_quantize and eval_kv_dtype apply to eval_only=true (training stays in float)")
    stereo_only = [f"{k}={getattr(cfg, k)}" for k, default in (("model_channel", 1), ("mono_to_stereo", "silence"))
                   if getattr(cfg, k) != default]
    if not cfg.duplex and stereo_only:  # a mono run averages the channels: these would be ignored
        raise ConfigError(f"{' and '.join(stereo_only)} with duplex=false: it applies to duplex runs only (a mono "
                          "run averages every file's channels); drop it or set duplex=true")
    if not cfg.eval_only:
        check_schedule(cfg)
        # a stage's loss at weight 0: the parts it trains get zero gradients, and weight decay only
        for loss, key, other in (("lm_ce", "lm_loss_weight", "quantizer"),
                                 ("resynth_nll", "resynth_loss_weight", "lm")):
            if loss in STAGE_LOSSES[cfg.stage] and getattr(cfg, key) == 0:
                raise ConfigError(f"{key}=0 with stage={cfg.stage}, which trains on {loss}: nothing would learn "
                                  f"from it; set {key} > 0" + (f", or stage={other}" if cfg.stage == "all" else ""))
    source = cfg.codec_checkpoint
    if source != "official" and not os.path.isfile(source):
        hint = ("train one with `python train_codec.py --config tiny` (it writes checkpoints/codec/best.safetensors)"
                if source == PRESETS["tiny"].codec_checkpoint else "check the path")
        raise ConfigError(f"codec_checkpoint={source!r}: no such file; {hint}, or pass codec_checkpoint=official "
                          "or codec_checkpoint=PATH to one of our codecs")
    # the codec's rate and latent size, from its header, as loading checks them: audio resampled to another
    # rate would encode into other latents, and latents of another size do not fit the model (a shape
    # error after encoding)
    codec_cfg = codec_config_fitting(source, cfg, "this run", "set latent_dim and sample_rate to the codec's, or pass "
                                                              "another codec_checkpoint")
    if (codec_cfg.input_channels, codec_cfg.output_channels) != (1, 1):  # a shape traceback once encoding started
        raise ConfigError(f"codec_checkpoint={source} has input_channels={codec_cfg.input_channels} and "
                          f"output_channels={codec_cfg.output_channels}: the latents are made one speaker's channel "
                          "at a time by a mono codec (1 in, 1 out); pass one (train_codec.py trains mono codecs)")
    if not cfg.resume and not cfg.eval_only and cfg.init_from and os.path.isfile(cfg.init_from) and \
            moved_aside(cfg.checkpoint_dir, cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from} lies in checkpoint_dir={cfg.checkpoint_dir}, which resume=false "
                          "moves aside before the weights are read: copy it out of the run folder first and pass the "
                          "copy (or give this run another checkpoint_dir)")
    # each evaluation's audio sample, held whole (a failed allocation at the first evaluation, after encoding),
    # in latents of the codec's hop
    if not cfg.eval_only and cfg.sample_seconds > 0 and (problem := completion_problem(
            cfg.sample_seconds, 1, cfg, names=("sample_seconds", "audio samples"), hop=math.prod(codec_cfg.strides))):
        raise ConfigError(f"{problem}; sample_seconds=0 makes none")
    # the LM's logits of one batch (B, T, vocab), at least 2 bytes each: a failed allocation (traceback) at the
    # step-0 evaluation, after the latents were encoded (a lower bound: a step needs more, the sample check above
    # sees the KV caches only)
    logits = cfg.batch_size * cfg.seq_len * cfg.vocab_size * (4 if cfg.dtype == "float32" else 2)
    host, host_name = memory_limit()
    if logits > host:
        raise ConfigError(f"seq_len={cfg.seq_len} with batch_size={cfg.batch_size}: the LM's logits of one batch alone "
                          f"({cfg.batch_size} x {cfg.seq_len} x {cfg.vocab_size} {cfg.dtype}) take {logits / 1e9:.3g} GB, "
                          f"more than {host_name} ({host / 1e9:.1f} GB): lower seq_len or batch_size")
    if cfg.init_from is not None:  # its kind and architecture from the header, before the latents are encoded
        check_init_from(cfg)
    # a bad manifest line now, not after the codec loads; eval_only reads the val data only
    check_data_paths(cfg, "val_data_path", *(() if cfg.eval_only else ("train_data_path",)))
    if cfg.sample_seconds > 0 and not cfg.eval_only:  # samples/step_*.wav
        check_outside_data(cfg, "checkpoint_dir", "train_data_path", "val_data_path")


def stage_notes(cfg: TransformerConfig, state: dict | None) -> list[str]:
    """What a stage's config asks for that is allowed but may not be meant: a stage that trains on
    the codes of a frozen quantizer starting from random weights (no init_from, no state to resume:
    the recipe's stage=quantizer run was forgotten), and a loss weight the stage never uses."""
    notes = []
    if "quantizer" not in STAGES[cfg.stage] and not cfg.init_from and state is None:
        notes.append(f"stage={cfg.stage} keeps the quantizer frozen, and with no init_from it is a random one: the "
                     f"{'LM learns to predict' if cfg.stage == 'lm' else 'resynthesizer learns from'} the codes of a "
                     "quantizer that was never trained; start from the stage=quantizer run's export "
                     "(init_from=RUN/best.safetensors) unless this is meant")
    for loss, key in (("lm_ce", "lm_loss_weight"), ("resynth_nll", "resynth_loss_weight")):
        default = TransformerConfig.__dataclass_fields__[key].default
        if loss not in STAGE_LOSSES[cfg.stage] and getattr(cfg, key) != default:
            notes.append(f"{key}={getattr(cfg, key):g} with stage={cfg.stage}, which does not train on {loss}: it "
                         "has no effect")
    return notes


def frozen_codec(cfg: TransformerConfig, device: torch.device):
    """The codec that makes the latents (and decodes the audio samples), frozen, in float32."""
    return (load_codec(cfg.codec_checkpoint, device=device, dtype=torch.float32, ckpt_dir=cfg.ckpt_dir)
            .eval().requires_grad_(False))


def check_init_from(cfg: TransformerConfig) -> None:
    """ConfigError (or CheckpointError, WeightsError) for an init_from that `initial_weights` would
    refuse: an official variant of the other channel mode or of another architecture than this
    run's, or whose files are missing offline; a path that is not a file, or a file that is not one
    of our transformers of this run's architecture (read from its header only)."""
    source, variant = cfg.init_from, finetune.init_source(cfg)
    if variant in hub.VARIANTS:
        if hub.VARIANTS[variant][2] != cfg.duplex:
            raise ConfigError(f"init_from={source} is {'duplex' if hub.VARIANTS[variant][2] else 'mono'}, "
                              f"this run has duplex={cfg.duplex}")
        # found after the latents were encoded (and the files downloaded) before
        check_compatible(dataclasses.asdict(official_transformer_config(variant)), cfg,
                         fields_marked(TransformerConfig, "arch"), f"init_from={source} has the official architecture",
                         "Use --config hertz_dev (or its architecture fields).")
        hub.check_offline((hub.QUANTIZER, *hub.VARIANTS[variant][:2]), cfg.ckpt_dir)
    elif os.path.isfile(source):
        meta = read_metadata(source, "transformer")
        check_architecture(meta["config"], cfg, source)
        mode = (meta["quantization"] or {}).get("mode")
        if mode and not cfg.eval_only and cfg.finetune != "lora":  # its Linears hold no parameters to train
            raise ConfigError(f"init_from={source} holds {mode} weights, which full training cannot update: "
                              "init from the float checkpoint it was quantized from, or pass finetune=lora "
                              "(adapters on the quantized base)")
        if mode and cfg.eval_quantize not in ("none", mode):
            raise ConfigError(f"init_from={source} holds {mode} weights: eval_quantize={cfg.eval_quantize} "
                              "would evaluate them as they are; drop eval_quantize, or init from the float checkpoint")
        if mode and cfg.base_quantize not in (None, mode):  # its layers cannot be requantized (model/quant.py)
            raise ConfigError(f"init_from={source} holds {mode} weights: base_quantize={cfg.base_quantize} cannot "
                              "requantize them; drop base_quantize, or init from the float checkpoint")
    else:
        raise ConfigError(f"init_from={source!r} is neither official, a variant ({', '.join(hub.VARIANTS)}) "
                          "nor an existing .safetensors file")


def initial_weights(cfg: TransformerConfig) -> tuple[HertzDev, str]:
    """A model on the CPU in float32 from init_from: "official" (the variant of this run's
    `duplex`), a variant name (duplex, mono, mono-pure-audio), or one of our .safetensors
    (`check_init_from` has checked it)."""
    source, variant = cfg.init_from, finetune.init_source(cfg)
    if variant in hub.VARIANTS:
        try:
            model = load_hertz_dev(variant, device="cpu", dtype=torch.float32, codec=None, ckpt_dir=cfg.ckpt_dir,
                                   config=cfg)
        except (RuntimeError, CheckpointError) as e:  # not downloadable, or another architecture
            raise ConfigError(f"init_from={source}: {e}\nThe official weights have the hertz_dev architecture: use "
                              "--config hertz_dev (or its architecture fields).") from None
        label = f"official {variant}"
    else:
        model = load_hertz_dev(source, device="cpu", dtype=torch.float32, codec=None)
        label = source
    model.config = cfg
    return model, label


def _export_model(cfg: TransformerConfig, state: dict) -> HertzDev:
    """A HertzDev holding a full state dict (no copy), for write_transformer."""
    with torch.device("meta"):
        export = HertzDev(cfg)
    export.load_state_dict(state, strict=True, assign=True)
    return export


def val_batches(dataset: LatentCrops, batch_size: int, rank: int, world: int, unread: list[tuple[int, str]]):
    """This rank's share of the validation crops in full batches; every rank gets the same number
    of batches (padding crops are all invalid), as FSDP needs every rank in every forward. A crop
    that cannot be read now (LatentsError: its shard cut short or damaged since the run started)
    comes back all invalid too, and (its index, why) is added to `unread`."""
    per_rank = math.ceil(len(dataset) / world)
    mine = list(range(rank, len(dataset), world))
    mine += [-1] * (math.ceil(per_rank / batch_size) * batch_size - len(mine))
    empty = {"posterior": torch.zeros(dataset.seq_len, 2, dataset.dim),
             "valid": torch.zeros(dataset.seq_len, dtype=torch.bool)}

    def read(j: int) -> dict:
        try:
            return dataset[j] if j >= 0 else empty
        except LatentsError as e:
            unread.append((j, str(e)))
            return empty

    for i in range(0, len(mine), batch_size):
        items = [read(j) for j in mine[i:i + batch_size]]
        yield {**{k: torch.stack([item[k] for item in items]) for k in items[0]},
               "index": torch.tensor(mine[i:i + batch_size])}  # each crop's (-1: padding), for its noise


@torch.no_grad()
def complete(model: HertzDev, prompt: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Continue `prompt` (1, P, C*32) by `n` latents with the completion engine (`Generator`: the
    cached LM -> token -> resynthesizer -> latent step, default sampling parameters); returns
    (1, P + n, C*32). Eager, without CUDA graphs: the parts may be sharded (FSDP) and their
    compiled blocks were compiled for training shapes."""
    from torch.distributed.fsdp import FSDPModule
    sharded = isinstance(model.quantizer, FSDPModule)
    with torch.compiler.set_stance("force_eager"):
        if sharded:  # indices_to_codes is not a forward: gather the quantizer's weights by hand
            model.quantizer.unshard()
        try:
            return Generator(model, batch_size=1, cuda_graphs=False).generate(prompt, n, seed=seed)
        finally:
            if sharded:
                model.quantizer.reshard()


if __name__ == "__main__":
    run_script(main)
