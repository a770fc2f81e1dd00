"""Train the hertz-dev codec VAE on folders of audio (WAV, FLAC, OGG, Opus, MP3, AIFF, CAF, AU, W64, RF64).

    python data/demo/prepare.py --minutes 20                 # an offline demo corpus
    python train_codec.py --config tiny                      # seconds on a CPU
    python train_codec.py --config small device=cuda         # one GPU
    torchrun --nproc_per_node 8 train_codec.py --config hertz_dev
    python train_codec.py --config small eval_only=true init_from=checkpoints/codec/best.safetensors

Recipe (DAC / HiFi-GAN): multi-resolution log-mel L1 + KL of the Gaussian latent + LSGAN (or
hinge) losses of multi-period and multi-resolution STFT discriminators + feature matching, and
optional phase-aware terms (waveform L1, complex-STFT L1; weight 0 by default); the total is
`sum(weights[k] * losses[k])` with every weight a config field. Each optimizer step reads
`grad_accum_steps` micro-batches; for each, one generator forward and one discriminator forward
of the real audio and one of the reconstruction, whose verdicts feed both losses: the generator's
back-propagates into the generator only, the discriminators' (real against reconstruction) into
the discriminators only. Then the generator and the discriminators each take their step. This is
the classic alternating GAN step (generator step with the discriminators frozen, then a
discriminator step on the reconstructions just made) computed with half the discriminator
forwards: the discriminators have not moved between the two, so their verdicts are the same.

Everything goes to `checkpoint_dir`: `step_*.pt`, `latest.pt` and `best.pt` (by validation mel
distance) training states, `latest.safetensors` / `best.safetensors` codecs for
`model.load_codec`, `metrics.jsonl`, `loss_curves.png`, `samples/` and the W&B run. A run resumes
from `latest.pt` by default at the same step, LR and data position (resume=false starts fresh and
moves an old run aside); init_from=official|PATH starts a fresh run from existing weights.
"""
from __future__ import annotations

from config import exit_on_interrupt
with exit_on_interrupt():  # Ctrl-C or SIGTERM while importing (torch: seconds): one line, 130 or 143
    import dataclasses
    import importlib.util
    import math
    import os
    import sys
    import time
    from contextlib import nullcontext
    from pathlib import Path
    from typing import NamedTuple

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.nn.utils import parametrize
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from config import ConfigError, config_diff, fields_marked, from_dict, parse_args, printable
    from config.codec_config import PRESETS, CodecConfig
    from config.transformer_config import TransformerConfig
    from model.audio import AudioError, save_audio
    from model.checkpoint import CheckpointError, read_metadata
    from model.codec import Codec, compile_codec
    from model.codec_losses import (DNSMOS, MultiResolutionMelLoss, MultiResolutionSTFTLoss, discriminator_loss,
                                    feature_matching_loss, generator_adversarial_loss, kl_bits_per_second, latent_kl,
                                    latent_mask, mel_filterbank, pesq_wb, si_sdr, stoi, waveform_l1)
    from model.cuda_graphs import GraphedPass
    from model.data import (AudioCropDataset, infinite_batches, make_loader, shared_with_training, slow_seek_note,
                            workers_stopped)
    from model.discriminators import Discriminators
    from model.hub import WeightsError
    from model.loading import load_codec, write_codec
    from model.parallel import average_gradients, broadcast_parameters, gradient_sync
    from model.plots import plot_metrics, save_mel_figure
    from model.training import (Checkpoints, Deadline, Dist, Logger, all_reduce_mean, autocast, before_step, FiniteGuard,
                                check_architecture, check_data_paths, check_folders, check_outside_data, check_trainer,
                                check_resumable, check_schedule, cosine_lr, finished, last_step, load_training_state,
                                loss_scaler, partial_note, preload_limit_gb, resource_notes, rng_state, run_script,
                                schedule_notes, seed_everything, set_rng_state, setup_distributed, StepTimer, state_to_load,
                                stop_message, teardown_distributed, unwrap, validation_key, WeightAverage, window_peak_gb,
                                worker_warning_said, write_samples)


def main(argv=None) -> dict:
    # --- config ---------------------------------------------------------------------------------
    cfg = parse_args(sys.argv[1:] if argv is None else argv, PRESETS,
                     elsewhere={"train_transformer.py": TransformerConfig})  # a key of the other trainer is named so
    check_config(cfg)
    weights = {"mel": cfg.mel_weight, "kl": cfg.kl_weight, "adv": cfg.adv_weight, "feature": cfg.feature_weight,
               "wave": cfg.wave_weight, "stft": cfg.stft_weight, "logmag": cfg.logmag_weight}

    # --- setup ----------------------------------------------------------------------------------
    ddp = setup_distributed(cfg.device)
    device, is_main = ddp.device, ddp.is_main
    say = tqdm.write if is_main else (lambda *a, **k: None)
    deadline = Deadline(cfg.max_minutes)
    seed_everything(cfg.seed + ddp.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed crop length: let cuDNN pick the fastest convs
    run_dir = Path(cfg.checkpoint_dir)
    checkpoints = Checkpoints(run_dir, keep=cfg.keep_checkpoints)
    # one run at a time in a folder, till main ends; torch's warning of too many workers quiet after the note's
    with checkpoints.holding(is_main and not cfg.eval_only), worker_warning_said(cfg):
        latest = state_to_load(checkpoints, cfg.resume, cfg.eval_only, cfg.init_from)  # before the slow work
        state = checkpoints.load(latest, map_location="cpu") if latest else None
        if state is not None:  # a foreign or contradicting state is refused before the data is decoded
            check_trainer(state, latest, "generator", "train_codec.py")
            check_resumable(state["config"], cfg, resumed_fields(cfg))
        if finished(state, cfg, checkpoints, export_state, is_main, say):  # the same command again: nothing to train
            curves = run_dir / "loss_curves.png"  # (not drawn when the run was stopped after its last save)
            if is_main and not curves.exists() and (run_dir / "metrics.jsonl").is_file() and \
                    importlib.util.find_spec("matplotlib") is not None and write_samples(
                        run_dir, lambda folder: plot_metrics(folder / "metrics.jsonl", curves, title=f"codec ({run_dir})"),
                        "the loss curves", "the run is saved"):
                say(f"drew {curves}, which the run had not")
            teardown_distributed()
            return {}
        for note in resource_notes(cfg) + ([] if cfg.eval_only else schedule_notes(cfg) + recipe_notes(cfg)):
            say(f"note: {note}")
        # the folder tidied after an interrupted save: a resumed run's before the data (a damaged best.pt is
        # found here), a fresh run's once its old run is moved aside (below)
        for note in checkpoints.recover(export_state) if is_main and cfg.resume and not cfg.eval_only else []:
            say(f"note: {note}")
        init = None  # init_from's weights, read (and checked) before the data; DDP broadcasts rank 0's to the others
        if not latest and cfg.init_from and (is_main or cfg.eval_only):
            init = read_init(cfg.init_from, cfg, discriminators=not cfg.eval_only)
        have = optional_packages(cfg, say)
        dnsmos = DNSMOS() if cfg.val_mos and is_main else None  # rank 0 alone evaluates
        hop = math.prod(cfg.strides)
        val_loader, train_loader = build_data(cfg, is_main, say)
        generator, discriminators, mel_loss = build_models(cfg, device)
        stft_loss = MultiResolutionSTFTLoss(cfg.stft_windows).to(device)
        logmag_loss = MultiResolutionSTFTLoss(cfg.logmag_windows, term="log_magnitude").to(device)
        opt_g, opt_d = make_optimizers(cfg, generator, discriminators)
        scaler = loss_scaler(device, cfg.dtype)  # float16 only; passes everything through otherwise

        # where the weights come from: the latest checkpoint (resume), else init_from, else a fresh initialisation
        step, source = 0, "random init"
        # eval_only val_raw: the training weights of a .pt keeping an average (its export's are the average's)
        raw = state["generator"] if state is not None and "ema" in state else init.raw if init is not None else None
        if latest:
            step = load_state(state, cfg, ddp, generator, discriminators, opt_g, opt_d, scaler, say)
            source = f"{latest} (step {state['step']})"
        elif init is not None:
            generator.load_state_dict(init.generator)
            if init.discriminators is not None:
                discriminators.load_state_dict(init.discriminators)
            source, init = init.label, None  # (the weights are the modules' now)
        average = None  # ema_decay: the weights' moving average, which validation and the exports use
        if cfg.ema_decay > 0 and not cfg.eval_only:
            average = WeightAverage(generator, cfg.ema_decay)  # (starts at the weights loaded above)
            if state is not None and "ema" in state:
                average.load_state_dict(state["ema"])
            elif state is not None:
                say(f"note: {latest} holds no weight average: ema_decay={cfg.ema_decay:g} starts one from its weights")
        if is_main and not cfg.resume and not cfg.eval_only and (old := checkpoints.move_aside()):
            say(f"resume=false: moved the previous run in {printable(run_dir)} to {printable(old)}")
        say(f"codec: {sum(p.numel() for p in generator.parameters()) / 1e6:.2f}M parameters, discriminators: "
            f"{sum(p.numel() for p in discriminators.parameters()) / 1e6:.2f}M; weights from {source}")

        if cfg.eval_only:
            try:  # (rank 0 scores alone; an error of its own ends every rank after the barrier, one line)
                if is_main:
                    metrics, _, skipped, overflowed, unscored = evaluate(generator, val_loader, mel_loss, cfg, have,
                                                                         dnsmos)
                    rows = [(source + (" (weight average)" if raw is not None else ""), metrics)]
                    check_reconstructions(overflowed, len(val_loader.dataset) - len(skipped), rows[0][0], cfg, device)
                    if cfg.val_raw and raw is not None:
                        generator.load_state_dict(raw)
                        raw_metrics, _, _, overflowed, _ = evaluate(generator, val_loader, mel_loss, cfg, have, dnsmos,
                                                                    samples=False)
                        rows.append((f"{source} (training weights)", raw_metrics))
                        check_reconstructions(overflowed, len(val_loader.dataset) - len(skipped), rows[1][0], cfg,
                                              device)
                        metrics.update(as_val_raw(raw_metrics))
                    elif cfg.val_raw:
                        say(f"note: val_raw=true: {source} holds one set of weights (no weight average), scored above")
                    print_table(rows, len(val_loader.dataset), len(skipped))
                    if unscored:
                        say(f"note: {', '.join(unscored)} had no crop to score (each too short or silent), so NaN")
            finally:
                teardown_distributed()
            return metrics if is_main else {}

        # --- training loop --------------------------------------------------------------------------
        epoch, skip = divmod(step * cfg.grad_accum_steps, len(train_loader))  # micro-batches this rank has read
        batches = infinite_batches(train_loader, start_epoch=epoch, skip=skip)
        # generator: the (compiled) generator, in DDP when distributed. The discriminators' gradients
        # are averaged by hand (average_gradients): their two losses each back-propagate through only
        # part of the graph, which DDP's per-forward bookkeeping cannot follow.
        # compile=true compiles the generator only: a compiled discriminator's backward is one graph,
        # which computes its weight gradients whenever the generator's loss passes through it (the
        # discriminators' backward done twice a step), where eager autograd skips them (`small` on one
        # H200: 87.0 samples/s, against 81.7 with the discriminators compiled too and 79.7 eager)
        if device.type == "cuda":  # the layout cuDNN computes in; its dilated convs are slow: the same convs
            generator.use_channels_last()
            discriminators.use_channels_last()
            generator.dilated_convs_polyphase()  # (over phases)
        disc_kernels = cfg.disc_kernels and device.type == "cuda"  # Triton: CUDA only
        discriminators.use_kernels(disc_kernels)
        generator = compile_and_wrap(generator, cfg.compile, ddp)
        broadcast_parameters(discriminators)  # no-op in one process
        gen_params, disc_params = list(generator.parameters()), list(discriminators.parameters())
        # under torchrun or a float16 loss scale, eager: their collectives and scale live outside the pass
        graphed = cfg.cuda_graph and device.type == "cuda" and not ddp.enabled and not scaler.is_enabled()
        if cfg.cuda_graph and device.type == "cuda" and not graphed:
            say(f"note: cuda_graph=true runs eagerly {'under torchrun' if ddp.enabled else 'with dtype=float16'}")

        def train_pass(use_disc: bool, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            """One micro-batch: the generator reconstructs, the discriminators judge real audio and the
            reconstruction once, and each side's loss back-propagates into its own weights only.
            Returns the losses, detached ("disc": the discriminators')."""
            real = audio * mask[:, None]
            with autocast(device, cfg.dtype, cache=not graphed):
                out = generator(audio)
                fake = out["recon"] * mask[:, None]  # the codec is causal: padding never leaks back
                losses = {"mel": mel_loss(fake, real, mask),
                          "kl": latent_kl(out["mu"], out["logvar"], latent_mask(mask, hop))}
                if cfg.wave_weight > 0:
                    losses["wave"] = waveform_l1(fake, real, mask)
                if cfg.stft_weight > 0:
                    losses["stft"] = stft_loss(fake, real, mask)
                if cfg.logmag_weight > 0:
                    losses["logmag"] = logmag_loss(fake, real, mask)
                if use_disc:
                    with parametrize.cached():  # each weight-normed weight computed once for both passes
                        d_real, d_fake = discriminators(real), discriminators(fake)
                    if cfg.adv_weight > 0:
                        losses["adv"] = generator_adversarial_loss(d_fake, cfg.gan_loss)
                    if cfg.feature_weight > 0:
                        losses["feature"] = feature_matching_loss(d_real, d_fake, kernel=disc_kernels)
                    loss_d = discriminator_loss(d_real, d_fake, cfg.gan_loss)
                losses["total"] = sum(weights[k] * losses[k] for k in losses)
            scaler.scale(losses["total"] / cfg.grad_accum_steps).backward(inputs=gen_params, retain_graph=use_disc)
            if use_disc:  # the same verdicts, differentiated into the discriminators only
                scaler.scale(loss_d / cfg.grad_accum_steps).backward(inputs=disc_params)
                losses["disc"] = loss_d
            return {k: v.detach().float() for k, v in losses.items()}

        # cuda_graph: the pass replayed from a CUDA graph (a step at 2 s crops is bound by the host's launches)
        run_pass = GraphedPass(train_pass, gen_params + disc_params, enabled=graphed)
        guard = FiniteGuard(opt_g, opt_d, scaler=scaler, checkpoints=checkpoints, resumed=latest and (latest, step))
        logger = Logger(cfg.wandb, cfg.wandb_project, run_dir, cfg, is_main=is_main,
                        resume_id=state.get("wandb_id") if state else None)
        for note in checkpoints.recover(export_state) if is_main and not cfg.resume else []:
            say(f"note: {note}")
        validation = None  # what val/mel_distance is measured on (rank 0): best.pt is ranked among values on the same
        if is_main:
            val_set = val_loader.dataset
            validation = validation_key(files=[(f.path, f.frames, f.sample_rate) for f in val_set.files],
                                        crops=val_set.crops, mel=(cfg.mel_windows, cfg.mel_bins))
            if note := checkpoints.ranked_elsewhere(validation):
                say(f"note: {note}")
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps * ddp.world_size
        last = last_step(cfg.max_steps, cfg.stop_step)  # the schedule still ends at max_steps
        say(f"training from step {step} to {last}: {samples_per_step} crops of {cfg.segment_seconds} s "
            f"per step on {ddp.world_size} x {device}, run folder {printable(run_dir)}")
        if device.type == "cuda" and step < last:  # a first step minutes long, with the bar at 0: said, not a hang
            say(f"note: the first step tries cuDNN's algorithms for each convolution of {cfg.segment_seconds} s "
                "crops (on an H200: 35-45 s at 2 s crops, 1.5-2 min at 6 s); the steps after it do not")
        bar = tqdm(total=last, initial=step, disable=not is_main, dynamic_ncols=True, desc="train")
        start_step, t_log = step, time.time()
        sums, metrics, timer = {}, {}, StepTimer(device)  # sums: loss name -> per-micro-batch values since the last log
        # a SIGTERM or Ctrl-C stops the loop at the next step, saved; the data-loading workers stop with it
        with deadline.catching_signals(), workers_stopped(batches):
            while True:
                # evaluation (rank 0) and checkpoints, before the step: they describe the model after `step` updates
                due = before_step(step, start_step, last, cfg.eval_interval, cfg.save_interval, deadline)
                if due.evaluate or due.save or due.stop:
                    guard.check()  # nothing is evaluated or saved after a non-finite step
                    timer.pause()
                t_pause = time.time()
                # what this step's evaluation measured (fewer crops: `partial_note`), and whether best.pt may rank it
                measured, ranked = validation, True
                if due.evaluate and is_main:
                    try:  # crops of files unreadable now are left out (`evaluate`)
                        with average.averaged() if average else nullcontext():
                            metrics, pairs, skipped, overflowed, unscored = evaluate(generator, val_loader, mel_loss,
                                                                                     cfg, have, dnsmos)
                        if average and cfg.val_raw:  # the training weights too, for comparison
                            trained, _, _, raw_overflowed, _ = evaluate(generator, val_loader, mel_loss, cfg, have,
                                                                        dnsmos, samples=False)
                            metrics.update(as_val_raw(trained))
                            overflowed = max(overflowed, raw_overflowed)
                    except AudioError as e:  # none could be read: the state is saved unranked, and the run stops
                        deadline.unreadable, metrics = str(e), {}
                    if metrics:
                        logger.log({**metrics, **log_samples(run_dir, pairs, cfg.sample_rate, logger, have.plots)}, step)
                        note = ""
                        if skipped:  # crops of files unreadable now: measured on part of the validation
                            measured = validation_key(validation=validation, skipped=skipped)
                            ranked = checkpoints.comparable(measured)
                            note = partial_note(len(val_loader.dataset), skipped, ranked)
                        note += evaluation_note(len(val_loader.dataset) - len(skipped), overflowed, unscored)
                        say(f"step {step}: {summary(metrics)}{note}")
                if due.evaluate and ddp.enabled:  # rank 0 evaluated alone: whether it could, every rank's to know
                    told = [deadline.unreadable]
                    dist.broadcast_object_list(told, src=0)
                    deadline.unreadable = told[0]
                if due.evaluate and deadline.unreadable:
                    due = dataclasses.replace(due, stop=True, save=step > start_step)
                if due.save:
                    # (unranked: never against best.pt's value, measured on other crops)
                    metric = due.best_metric(metrics, "val/mel_distance") if ranked else None
                    save(step, metric, checkpoints, generator, discriminators, average, opt_g, opt_d, scaler, cfg,
                         ddp, logger.run_id, measured)
                if ddp.enabled and (due.evaluate or due.save):
                    dist.barrier()  # rank 0 evaluated or wrote alone: the others wait here, not in the next all-reduce
                if due.stop:
                    if note := stop_message(step, cfg.max_steps, cfg.stop_step, cfg.max_minutes, deadline.stopped_by,
                                            deadline.lost_worker or deadline.unreadable):
                        say(note)
                    break
                t_log += time.time() - t_pause  # throughput counts training time only
                timer.step_start()

                lr, lr_d = get_lr(step, cfg)
                for optimizer, value in ((opt_g, lr), (opt_d, lr_d)):
                    for group in optimizer.param_groups:
                        group["lr"] = value
                # the discriminators judge (and learn) only when a generator term uses their verdicts
                use_disc = step >= cfg.disc_start_step and (cfg.adv_weight > 0 or cfg.feature_weight > 0)

                micro_batches = deadline.read(batches, cfg.grad_accum_steps)
                if micro_batches is None:  # a data-loading worker died: the loop stops at `step`, saved
                    continue
                step_loss, disc_loss, files = 0.0, 0.0, []
                for micro, batch in enumerate(micro_batches):
                    files += [train_loader.dataset.files[i].path for i in batch["file"].tolist()]
                    with gradient_sync([generator], micro == cfg.grad_accum_steps - 1):
                        losses = run_pass(use_disc, batch["audio"].to(device, non_blocking=True),  # (B, 1, N)
                                          batch["mask"].to(device, non_blocking=True))  # (B, N): 0 on padding
                    step_loss = step_loss + losses["total"]
                    disc_loss = disc_loss + losses.get("disc", 0.0)
                    for k, v in losses.items():
                        sums.setdefault(k, []).append(v)
                optimizers = (opt_g, opt_d) if use_disc else (opt_g,)
                if use_disc:
                    average_gradients(discriminators)  # no-op in one process
                for optimizer in optimizers:
                    scaler.unscale_(optimizer)  # (float16) the true gradients, before clipping
                norms = {"grad_norm/generator": clip(gen_params, cfg.grad_clip)}
                if use_disc:
                    norms["grad_norm/discriminators"] = clip(disc_params, cfg.disc_grad_clip)
                # a non-finite step's updates are skipped on the device; `guard.check()` reports it (under a
                # float16 loss scale an overflowing gradient is skipped without an error, and the scale lowered)
                finite = {"loss": step_loss, **({"discriminator loss": disc_loss} if use_disc else {})}
                grads = {"gradient norm": norms["grad_norm/generator"],
                         **({"discriminator gradient norm": norms["grad_norm/discriminators"]} if use_disc else {})}
                guard.flag(step, finite, files, grad_norms=grads)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=not graphed)  # a graph adds into the gradients it captured
                scaler.update()
                step += 1
                if average:
                    average.update(step)
                timer.step_end()
                bar.update(1)

                if step % cfg.log_interval == 0 or step == last:
                    guard.check()  # (the device has caught up: the wall time below is the steps')
                    row = train_row(sums, norms, lr, lr_d, samples_per_step, timer.durations(), time.time() - t_log,
                                    cfg, device, graphed)
                    logger.log(row, step)
                    bar.set_postfix(loss=f"{row['loss/total']:.3f}", mel=f"{row['loss/mel']:.3f}",
                                    samples_s=f"{row['perf/samples_per_s']:.1f}")
                    sums, t_log = {}, time.time()

        bar.close()
        png = is_main and have.plots and write_samples(  # (a full disk: one warning line; the run is saved)
            run_dir, lambda folder: plot_metrics(folder / "metrics.jsonl", folder / "loss_curves.png",
                                                 title=f"codec ({run_dir})"), "the loss curves", "the run is saved")
        say(f"done at step {step}: {printable(run_dir / 'latest.safetensors')}" + (f", curves in {printable(png)}" if png else ""))
        logger.finish()
        teardown_distributed()
        deadline.exit(step)  # stopped by a signal, a data-loading worker's death or an unreadable batch: saved
        return metrics


# --- small pieces used by main --------------------------------------------------------------------

class Available(NamedTuple):
    """Which optional metrics and figures this run can make."""
    stoi: bool
    pesq: bool
    plots: bool


def get_lr(step: int, cfg: CodecConfig) -> tuple[float, float]:
    """The generator's and the discriminators' learning rates at `step`: one cosine schedule, scaled."""
    lr = cosine_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    return lr, lr * cfg.disc_learning_rate / cfg.learning_rate if cfg.learning_rate > 0 else cfg.disc_learning_rate


def build_data(cfg: CodecConfig, is_main: bool, say) -> tuple[DataLoader | None, DataLoader | None]:
    """The validation loader (rank 0 only, None elsewhere) and the training loader (None with eval_only)."""
    # every rank reads its own share of the training crops; rank 0 alone evaluates, so the
    # validation numbers do not depend on the number of GPUs
    val_loader, train_loader = None, None
    preload_gb = preload_limit_gb(cfg.preload_max_gb)  # (resource_notes says when it is lower)
    if is_main:
        val_set = AudioCropDataset(cfg.val_data_path, cfg.val_segment_seconds or cfg.segment_seconds, cfg.sample_rate,
                                   train=False, max_val_crops=cfg.val_crops, preload_max_gb=preload_gb)
        val_loader = make_loader(val_set, cfg.batch_size, num_workers=cfg.num_workers, distributed=False)
        say(describe("val", val_set))
    if not cfg.eval_only:
        train_set = AudioCropDataset(cfg.train_data_path, cfg.segment_seconds, cfg.sample_rate, train=True,
                                     seed=cfg.seed, preload_max_gb=preload_gb)
        train_loader = make_loader(train_set, cfg.batch_size, num_workers=cfg.num_workers, distributed=True,
                                   seed=cfg.seed)
        if len(train_loader) == 0:
            raise ConfigError(f"{cfg.train_data_path} gives {len(train_set)} training crops of {cfg.segment_seconds} s, "
                              f"fewer than batch_size={cfg.batch_size} per process: add audio or lower batch_size")
        say(describe("train", train_set))
        if is_main and (padding := padding_share(train_set)) > 0.5:  # (the losses leave it out: compute for nothing)
            say(f"note: about {padding:.0%} of each training crop is padding: most of {cfg.train_data_path}'s audio "
                f"is in files shorter than segment_seconds={cfg.segment_seconds:g}, and the losses leave the padding "
                "out; a shorter segment_seconds trains on the same audio for less")
        if is_main and (note := shared_with_training(val_set.files, train_set.files, cfg.val_data_path)):
            say(f"note: {note}")  # its mel distance, STOI and PESQ would measure memorised audio
    if is_main and (note := slow_seek_note([val_set, None if cfg.eval_only else train_set],
                                           preload_limit_gb(math.inf))):
        say(f"note: {note}")  # long MP3s streamed: a crop's cost grows with its place in the file
    return val_loader, train_loader


def build_models(cfg: CodecConfig, device: torch.device) -> tuple[Codec, Discriminators, MultiResolutionMelLoss]:
    """The codec (the generator), the discriminators and the mel loss, freshly initialised on `device`."""
    generator = Codec(cfg).to(device)
    discriminators = Discriminators(cfg).to(device)
    return generator, discriminators, MultiResolutionMelLoss(cfg.mel_windows, cfg.mel_bins, cfg.sample_rate).to(device)


def make_optimizers(cfg: CodecConfig, generator: Codec,
                    discriminators: Discriminators) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """The generator's and the discriminators' AdamW (`adamw`)."""
    return adamw(generator, cfg.learning_rate, cfg), adamw(discriminators, cfg.disc_learning_rate, cfg)


def load_state(state: dict, cfg: CodecConfig, ddp: Dist, generator: Codec, discriminators: Discriminators,
               opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               say) -> int:
    """Load a training state: its codec (all eval_only needs: the weight average where it holds one,
    as its export does) and, resuming, its discriminators, optimizers, loss scale (float16) and this
    rank's RNG state (`main` loads the weight average). Returns the step to continue from (0 with eval_only)."""
    if cfg.eval_only:
        generator.load_state_dict(exported_weights(state))  # (main checked the state's kind and config)
        return 0
    generator.load_state_dict(state["generator"])
    for note in resume_notes(state, cfg, ddp.world_size):
        say(f"note: {note}")
    discriminators.load_state_dict(state["discriminators"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    if state.get("scaler"):  # saved by a float16 run (others save none)
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng_state"]  # one per rank
    if ddp.rank < len(rngs):
        set_rng_state(rngs[ddp.rank])
    else:
        seed_everything(cfg.seed + ddp.rank + state["step"])
    return state["step"]


def resumed_fields(cfg: CodecConfig) -> tuple[str, ...]:
    """What a state must agree on: evaluating needs the same codec; resuming, the same
    discriminators too and what fixes the data order (counted in micro-batches). The schedule may
    change."""
    return fields_marked(CodecConfig, *(("arch",) if cfg.eval_only else ("arch", "disc", "resume")))


def compile_and_wrap(module: nn.Module, compile: bool, ddp: Dist) -> nn.Module:
    """`module` compiled (with `compile`), wrapped in DDP when distributed: the training step's."""
    compiled = compile_codec(module) if compile else module
    if not ddp.enabled:
        return compiled
    return DDP(compiled, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None)


@torch.no_grad()
def evaluate(generator: nn.Module, val_loader: DataLoader, mel_loss: MultiResolutionMelLoss, cfg: CodecConfig,
             have: Available, dnsmos: DNSMOS | None, samples: bool = True) -> tuple[dict, list, list[int], int, list[str]]:
    """Validation metrics of the posterior mean's reconstruction (mel distance, SI-SDR, STOI,
    wideband PESQ, DNSMOS with val_mos), the latent's KL rate, (`samples`) a few (input, output)
    pairs, the crops left out (their index in the validation set): those of files that
    failed to read, all padding, which no metric counts; how many crops' reconstructions hold NaN
    or inf (weights that overflow: their mel distance makes the mean NaN, the other metrics leave
    them out); and the metrics no other crop could score (each too short or silent: NaN)."""
    codec = unwrap(generator).eval()
    device, hop = next(codec.parameters()).device, math.prod(cfg.strides)
    mels, sdrs, stois, pesqs, moses, pairs, skipped = [], [], [], [], [], [], []
    kl_sum, latents, seen, overflowed = 0.0, 0, 0, 0
    for batch in val_loader:
        audio, mask = batch["audio"].to(device), batch["mask"].to(device)
        with autocast(device, cfg.dtype):
            mu, logvar = codec.encode(audio)
            recon = codec.decode(mu)
        real, recon = audio * mask[:, None], recon.float() * mask[:, None]
        keep = mask.sum(-1) > 0  # an unreadable file's crop is all padding
        skipped += [seen + i for i in (~keep).nonzero().flatten().tolist()]
        seen += len(keep)
        finite = recon.flatten(1).isfinite().all(-1)  # (B,)
        overflowed += int((keep & ~finite).sum())
        mels.append(mel_loss(recon, real, mask, per_item=True)[keep].cpu())
        sdrs.append(si_sdr(recon, real, mask)[keep & finite].cpu())  # NaN for a silent crop: left out of the mean
        real_latents = latent_mask(mask, hop)
        kl_sum += latent_kl(mu, logvar, real_latents).item() * real_latents.sum().item()
        latents += int(real_latents.sum().item())
        for i in (keep & finite).nonzero().flatten().tolist():
            n = int(mask[i].sum())
            x, y = real[i, 0, :n].cpu().numpy(), recon[i, 0, :n].cpu().numpy()
            # NaN where a metric cannot score the crop: (almost) silence, too short
            stois.append(stoi(y, x, cfg.sample_rate) if have.stoi else math.nan)
            pesqs.append(pesq_wb(y, x, cfg.sample_rate) if have.pesq else math.nan)
            if dnsmos is not None:
                moses.append(dnsmos(y, cfg.sample_rate))
            # a pair to listen to and draw: a quarter second at least (a click of a few ms, shorter
            # than the mel figure's window, failed in its STFT and ended the run), and not silence
            if samples and len(pairs) < cfg.num_audio_samples and n >= cfg.sample_rate // 4 and np.sqrt(np.mean(x ** 2)) > 1e-3:
                pairs.append((x, y))
    codec.train()
    if not sum(len(m) for m in mels):  # every crop all padding: NaN metrics, and no step could become best.pt
        files = val_loader.dataset.files
        raise AudioError(f"no audio to evaluate on in {files.source}: its {len(files)} files failed to read "
                         "(named above); set val_data_path to a folder of readable audio")
    metrics = {"val/mel_distance": torch.cat(mels).mean().item(), "val/si_sdr": nanmean(torch.cat(sdrs).tolist()),
               "val/stoi": nanmean(stois), "val/pesq": nanmean(pesqs),
               "val/kl_bits_per_s": kl_bits_per_second(kl_sum / max(latents, 1), cfg.sample_rate / hop)}
    if dnsmos is not None:
        metrics["val/dnsmos"] = nanmean(moses)
    scored = {"SI-SDR": torch.cat(sdrs).tolist(), "STOI": stois if have.stoi else [], "PESQ": pesqs if have.pesq else [],
              "DNSMOS": moses}
    unscored = [name for name, values in scored.items() if values and not any(map(math.isfinite, values))]
    return metrics, pairs, skipped, overflowed, unscored


def evaluation_note(crops: int, overflowed: int, unscored: list[str]) -> str:
    """What an evaluation's line adds when the reconstructions of `overflowed` of its `crops`
    held NaN or inf, or no crop could score the `unscored` metrics (`evaluate`)."""
    note = ""
    if overflowed:
        note += (f" (the reconstructions of {overflowed} of {crops} crops hold NaN or inf: the codec's weights overflow "
                 "on them; mel distance is NaN, not ranked for best.pt, and the other metrics leave them out)")
    if unscored:
        note += f" ({', '.join(unscored)}: no crop to score, each too short or silent)"
    return note


def check_reconstructions(overflowed: int, crops: int, source: str, cfg: CodecConfig, device: torch.device) -> None:
    """eval_only: CheckpointError naming the weights (`source`) when the reconstructions of
    `overflowed` of the `crops` validation crops held NaN or inf (`evaluate`), whose metrics would
    be a row of NaN."""
    if not overflowed:
        return
    dtype = cfg.dtype if device.type == "cuda" else "float32"  # (`autocast`)
    fix = "re-export them" if dtype == "float32" else "try dtype=float32, or re-export them"
    raise CheckpointError(f"the reconstructions of {overflowed} of {crops} validation crops hold NaN or inf: the "
                          f"weights of {source} overflow in {dtype} (values too large for it, or a damaged file): {fix}")


def as_val_raw(metrics: dict) -> dict:
    """An evaluation of the training weights, named as logged beside a weight average's: val_raw/..."""
    return {k.replace("val/", "val_raw/", 1): v for k, v in metrics.items()}


def summary(metrics: dict, prefix: str = "val") -> str:
    """One line of an evaluation's metrics (and, logged with val_raw, the training weights' after it)."""
    line = (f"{prefix} mel distance {metrics[f'{prefix}/mel_distance']:.4f} | SI-SDR {metrics[f'{prefix}/si_sdr']:.2f} dB | "
            f"STOI {metrics[f'{prefix}/stoi']:.4f} | PESQ {metrics[f'{prefix}/pesq']:.3f} | "
            f"KL {metrics[f'{prefix}/kl_bits_per_s']:.1f} bits/s"
            + (f" | DNSMOS {metrics[f'{prefix}/dnsmos']:.3f}" if f"{prefix}/dnsmos" in metrics else ""))
    return line + (f"\n  (training weights: {summary(metrics, 'val_raw')})" if prefix == "val" and "val_raw/mel_distance" in metrics else "")


def train_row(sums: dict, norms: dict, lr: float, lr_d: float, samples_per_step: int, step_times: list[float],
              seconds: float, cfg: CodecConfig, device: torch.device, graphed: bool) -> dict:
    """The log row of the steps since the last (`step_times`, their durations; `seconds` of
    training): each loss averaged over the micro-batches and ranks (`sums`: name -> values), the
    KL rate, the last gradient norms, the learning rates and the throughput, with the median and
    slowest step (a periodic stall shows as a max far above the median), and the peak GPU memory
    (`graphed`: reserved, which holds the CUDA graph's). A collective under torch.distributed."""
    steps = len(step_times)
    keys = sorted(sums)  # the same on every rank
    means = all_reduce_mean(torch.stack([torch.stack(sums[k]).mean() for k in keys])).tolist()
    row = {f"loss/{k}": v for k, v in zip(keys, means)}
    row["rate/kl_bits_per_s"] = kl_bits_per_second(row["loss/kl"], cfg.sample_rate / math.prod(cfg.strides))
    row.update({k: v.item() for k, v in norms.items()}, lr=lr, lr_disc=lr_d,
               **{"perf/samples_per_s": samples_per_step * steps / seconds, "perf/step_s": seconds / steps,
                  "perf/step_s_p50": float(np.median(step_times)), "perf/step_s_max": max(step_times)})
    if (mem := window_peak_gb(device, reserved=graphed)) is not None:
        row["perf/gpu_mem_gb"] = mem
    return row


def save(step: int, metric: float | None, checkpoints: Checkpoints, generator: nn.Module, discriminators: nn.Module,
         average: WeightAverage | None, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, cfg: CodecConfig, ddp: Dist, wandb_id: str | None,
         validation: str | None) -> None:
    """Training state to step_*.pt / latest.pt (/ best.pt), and the codec beside it as safetensors
    (the weight average's, with one); `validation`: what `metric` was measured on
    (`validation_key`). A collective under torch.distributed (every rank's RNG state is saved);
    rank 0 writes."""
    rngs = [rng_state()]
    if ddp.enabled:
        rngs = [None] * ddp.world_size
        dist.all_gather_object(rngs, rng_state())
    if not ddp.is_main:
        return
    state = {
        "generator": unwrap(generator).state_dict(), "discriminators": unwrap(discriminators).state_dict(),
        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(), "step": step,
        "rng_state": rngs,
        "config": dataclasses.asdict(cfg), "world_size": ddp.world_size, "wandb_id": wandb_id,
        "val/mel_distance": metric}  # the LR is a function of the step: no scheduler state
    if average is not None:
        state["ema"] = average.state_dict()
    checkpoints.save(step, state, metric, export=lambda tmp: export_state(state, tmp), validation=validation)

def check_config(cfg: CodecConfig) -> None:
    """Mistakes found from the config alone, the file system and the installed packages, before
    anything slow."""
    check_folders(cfg, "checkpoint_dir")
    if cfg.val_mos:
        missing = [m for m in ("speechmos", "onnxruntime", "librosa") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"val_mos=true needs {', '.join(missing)}: pip install {' '.join(missing)}, "
                              "or set val_mos=false")
        if cfg.sample_rate != 16000:
            raise ConfigError(f"val_mos=true: DNSMOS needs 16 kHz audio, not sample_rate={cfg.sample_rate}")
    check_data_paths(cfg, "val_data_path", *(() if cfg.eval_only else ("train_data_path",)))
    if cfg.num_audio_samples > 0 and not cfg.eval_only:  # samples/*.wav, which a scan of the data would find
        check_outside_data(cfg, "checkpoint_dir", "train_data_path", "val_data_path")
    if (cfg.input_channels, cfg.output_channels) != (1, 1):  # a traceback in the first step, after the data
        raise ConfigError(f"input_channels={cfg.input_channels} and output_channels={cfg.output_channels}: this "
                          "trainer reads mono crops and its losses compare one channel; keep both at 1 (the duplex "
                          "model encodes each speaker's channel with a mono codec)")
    cfg.check_architecture()  # (as the loaders check a checkpoint's header)
    hop = math.prod(cfg.strides)
    for key in ("segment_seconds", "val_segment_seconds"):
        segment = round(getattr(cfg, key) * cfg.sample_rate)
        if segment % hop or (segment == 0 and getattr(cfg, key) > 0):  # (val_segment_seconds=0: segment_seconds)
            raise ConfigError(f"{key}={getattr(cfg, key)} gives {segment} samples, not a positive multiple of "
                              f"the codec's {hop} samples per latent")
    if not cfg.mel_windows or len(cfg.mel_windows) != len(cfg.mel_bins):
        raise ConfigError(f"mel_windows={cfg.mel_windows} and mel_bins={cfg.mel_bins}: give one number of mel "
                          "bands per window, at least one window")
    check_windows(cfg)
    if not cfg.mpd_periods and not cfg.mrd_windows:
        raise ConfigError("mpd_periods=() and mrd_windows=(): no discriminator left; keep at least one (to train "
                          "without the adversarial terms, set adv_weight=0 feature_weight=0: the discriminators "
                          "then neither run nor learn)")
    if cfg.mpd_periods and not cfg.mpd_channels:
        raise ConfigError("mpd_channels=(): the period discriminators need their layers' widths (or mpd_periods=())")
    if cfg.stft_weight > 0 and not cfg.stft_windows:
        raise ConfigError("stft_weight > 0 with stft_windows=(): give the complex-STFT term its windows, "
                          "or set stft_weight=0")
    if cfg.logmag_weight > 0 and not cfg.logmag_windows:
        raise ConfigError("logmag_weight > 0 with logmag_windows=(): give the log-magnitude term its windows, "
                          "or set logmag_weight=0")
    if cfg.val_raw and not cfg.ema_decay and not cfg.eval_only:  # (eval_only: the .pt says whether it keeps one)
        raise ConfigError("val_raw=true scores the training weights beside their moving average, which "
                          "ema_decay=0 does not keep: set ema_decay (e.g. 0.998) or val_raw=false")
    if not cfg.eval_only:
        check_schedule(cfg)
        weights = ("mel_weight", "kl_weight", "adv_weight", "feature_weight", "wave_weight", "stft_weight",
                   "logmag_weight")
        if not any(getattr(cfg, k) for k in weights):
            raise ConfigError(f"{', '.join(weights)} are all 0: the generator would learn nothing; "
                              "give at least one loss a weight > 0")


def check_windows(cfg: CodecConfig) -> None:
    """ConfigError naming both fields when an STFT window or a period is too long for the crops it
    reads (a traceback in the first step, after the data and the first evaluation): a crop is padded
    by reflection, by half a window at each end for an STFT, to a whole number of periods for the
    period discriminator, and reflection needs fewer padded samples than the crop holds."""
    train = round(cfg.segment_seconds * cfg.sample_rate)
    val = round((cfg.val_segment_seconds or cfg.segment_seconds) * cfg.sample_rate)
    training = not cfg.eval_only
    adversarial = training and (cfg.adv_weight > 0 or cfg.feature_weight > 0)  # else the discriminators never run
    for key, crop_key, crop, used in (
            ("mel_windows", "segment_seconds", train, training or not cfg.val_segment_seconds),
            ("mel_windows", "val_segment_seconds", val, cfg.val_segment_seconds > 0),
            ("stft_windows", "segment_seconds", train, training and cfg.stft_weight > 0),
            ("logmag_windows", "segment_seconds", train, training and cfg.logmag_weight > 0),
            ("mrd_windows", "segment_seconds", train, adversarial),
            ("mpd_periods", "segment_seconds", train, adversarial)):
        longest = max(getattr(cfg, key), default=0)
        if used and longest >= 2 * crop:
            pad = "to whole periods" if key == "mpd_periods" else "by half a window at each end"
            raise ConfigError(f"{key}={getattr(cfg, key)}: {longest} is too long for the {crop}-sample crops of "
                              f"{crop_key}={getattr(cfg, crop_key)}; it must be under {2 * crop} (a crop is padded "
                              f"by reflection, {pad}, which needs fewer samples than the crop holds): use shorter "
                              f"{key} or a longer {crop_key}")


def recipe_notes(cfg: CodecConfig) -> list[str]:
    """What a recipe does that is allowed but may not be meant (said as notes, as `schedule_notes`):
    discriminators that start at or after max_steps never run, so the adversarial terms that
    adv_weight and feature_weight ask for are left out of the whole run (a short trial of a recipe
    with a mel-only start, small_fast's, may mean it); mel bands that no frequency bin of their
    window falls in (too many bands for the window: librosa warns the same), which add a constant
    to the mel loss and nothing else."""
    notes = []
    if cfg.disc_start_step >= cfg.max_steps and (cfg.adv_weight > 0 or cfg.feature_weight > 0):
        notes.append(f"disc_start_step={cfg.disc_start_step} >= max_steps={cfg.max_steps}: the discriminators never "
                     f"start, so no adversarial or feature-matching term is trained (adv_weight={cfg.adv_weight:g}, "
                     f"feature_weight={cfg.feature_weight:g}); lower disc_start_step unless this is meant "
                     "(adv_weight=0 feature_weight=0 says so)")
    for window, bands in zip(cfg.mel_windows, cfg.mel_bins):
        empty = int((mel_filterbank(window, bands, cfg.sample_rate).sum(-1) == 0).sum())
        if empty:
            notes.append(f"mel_bins: {empty} of the {bands} mel bands of the {window}-sample window hold no frequency "
                         f"bin (it has {window // 2 + 1}); they add a constant to the mel loss and nothing else: give "
                         "that window fewer bands")
    return notes


def resume_notes(state: dict, cfg: CodecConfig, world_size: int) -> list[str]:
    """What a resumed run changes against its checkpoint and is allowed to: the schedule, the
    number of processes, an init_from that only fresh runs use."""
    notes = []
    changed = config_diff(state["config"], cfg, fields_marked(CodecConfig, "schedule"))
    if changed:
        notes.append("resuming with a changed schedule:\n" + "\n".join(changed))
    if state.get("world_size", 1) != world_size:
        notes.append(f"checkpoint made with {state.get('world_size', 1)} processes, resumed with {world_size}: "
                     "the step and LR continue, the data order does not")
    if cfg.init_from:
        notes.append(f"resuming from {Path(cfg.checkpoint_dir) / 'latest.pt'}; "
                     f"init_from={cfg.init_from} only starts fresh runs")
    return notes


def optional_packages(cfg: CodecConfig, say) -> Available:
    """Whether STOI, wideband PESQ and the plots can be made (pystoi, pesq at 16 kHz,
    matplotlib); `say`s a note for each that cannot."""
    have_stoi, have_pesq, have_plots = (importlib.util.find_spec(m) is not None
                                        for m in ("pystoi", "pesq", "matplotlib"))
    if not have_stoi:
        say("note: pystoi is not installed, so STOI is reported as NaN (pip install pystoi)")
    if not have_pesq:
        say("note: pesq is not installed, so PESQ is reported as NaN (pip install pesq)")
    elif cfg.sample_rate != 16000:
        have_pesq = False
        say(f"note: wideband PESQ needs 16 kHz audio, so it is reported as NaN at sample_rate={cfg.sample_rate}")
    if not have_plots:
        say("note: matplotlib is not installed, so no mel images or loss curves (pip install matplotlib)")
    return Available(have_stoi, have_pesq, have_plots)


def adamw(module: torch.nn.Module, lr: float, cfg: CodecConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the convolution and linear weights only: not on biases nor on
    the weight-norm magnitudes (`original0`), which set the scale of each output channel; fused
    (on the CPU too), which `FiniteGuard` needs."""
    decay, rest = [], []
    for name, p in module.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("original0") else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm` (no clipping when <= 0); the norm before clipping.
    `params`: a list made once, not `module.parameters()`, which walks the module tree again at each
    call (the weight-normed convolutions nest three deep: ~17,000 Python calls a `small` step)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


class InitWeights(NamedTuple):
    """The weights init_from names, read before the data: the codec's (a training state's weight
    average where it keeps one, as its export), the discriminators' (None when not wanted or of
    another architecture), a label for the log, and the training weights of a state keeping an
    average (None otherwise; eval_only's val_raw scores them)."""
    generator: dict
    discriminators: dict | None
    label: str
    raw: dict | None = None


def read_init(source: str, cfg: CodecConfig, discriminators: bool) -> InitWeights:
    """The weights of init_from: "official", one of our codecs (.safetensors), or a training state
    (.pt; its discriminators too, with `discriminators`, when they have this run's architecture).
    Raises ConfigError naming the file when it is none of those, or of another architecture."""
    if source == "official":
        try:
            codec = load_codec("official", config=cfg)  # the official file in this run's architecture
        except WeightsError as e:  # not downloadable, or missing offline: no word on the architecture
            raise ConfigError(f"init_from=official: {e}") from None
        except (RuntimeError, CheckpointError) as e:  # another architecture
            raise ConfigError(f"init_from=official: {e}\nThe official codec has the hertz_dev architecture: "
                              "use --config hertz_dev (or its architecture fields).") from None
        return InitWeights(codec.state_dict(), None, "the official codec")
    if not os.path.isfile(source):
        raise ConfigError(f"init_from={source!r} is neither 'official' nor an existing .safetensors or .pt file")
    if source.endswith(".safetensors"):
        check_architecture(read_metadata(source)["config"], cfg, source)
        return InitWeights(load_codec(source).state_dict(), None, source)
    state = load_training_state(source, advice="name another file in init_from")
    if "generator" not in state:
        raise ConfigError(f"init_from={source}: not a codec training state written by train_codec.py")
    check_architecture(state["config"], cfg, source)
    raw = state["generator"] if "ema" in state else None
    if discriminators and not config_diff(state["config"], cfg, fields_marked(CodecConfig, "disc")):
        return InitWeights(exported_weights(state), state["discriminators"], f"{source} (codec and discriminators)", raw)
    return InitWeights(exported_weights(state), None, source, raw)


def exported_weights(saved: dict) -> dict:
    """The codec weights a training state stands for, as its export holds them: the weight average's
    where it keeps one (ema_decay), else the training weights."""
    return {**saved["generator"], **saved.get("ema", {})}


def export_state(saved: dict, tmp: str) -> None:
    """The codec of a training state, as `save` exports it: rebuilds an export a kill left behind."""
    with torch.device("meta"):  # no initialisation: it would draw from the RNG an exact resume restored
        codec = Codec(from_dict(CodecConfig, saved["config"], strict=False))
    codec.load_state_dict(exported_weights(saved), assign=True)
    write_codec(tmp, codec, {"step": saved["step"], "val/mel_distance": saved.get("val/mel_distance")})


def padding_share(dataset: AudioCropDataset) -> float:
    """The expected share of a training crop that is padding: a crop comes from a file with a chance
    proportional to its length, and one shorter than the crop is zero-padded to it."""
    lengths = dataset.lengths.astype(np.float64)
    return float((lengths / max(lengths.sum(), 1) * np.clip(1 - lengths / dataset.segment, 0, 1)).sum())


def describe(name: str, dataset: AudioCropDataset) -> str:
    return (f"{name}: {len(dataset.files)} files, {dataset.total_seconds / 60:.1f} min in {dataset.files.source}, "
            f"{len(dataset)} crops" + (", decoded into memory" if dataset.preloaded else "") + dataset.files.left_out())


def log_samples(run_dir: Path, pairs: list, sample_rate: int, logger: Logger, figure: bool = True) -> dict:
    """Write the latest (input, reconstruction) pairs and their mel spectrograms to
    `run_dir/samples/`; W&B media of the same for `logger.log`."""
    def write(folder: Path):
        for i, (x, y) in enumerate(pairs):
            save_audio(folder / f"{i}_input.wav", x, sample_rate)
            save_audio(folder / f"{i}_recon.wav", y, sample_rate)
        return save_mel_figure(folder / "mels.png", pairs, sample_rate) if pairs and figure else None

    png = write_samples(run_dir / "samples", write)  # (a folder or disk that fails them: said, and the run goes on)
    media = {}
    for i, (x, y) in enumerate(pairs if logger.run is not None else ()):
        media[f"audio/{i}_input"] = logger.audio("input", x[None], sample_rate)
        media[f"audio/{i}_recon"] = logger.audio("recon", y[None], sample_rate)
    if png is not None and logger.run is not None:
        media["mels"] = logger.image(png)
    return media


def nanmean(values: list) -> float:
    """Mean of the finite values (a metric is NaN where it cannot score a crop); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def print_table(rows: list[tuple[str, dict]], crops: int, skipped: int = 0) -> None:
    """eval_only's table: a row (label, metrics) per set of weights scored, on `crops` less
    `skipped` (unreadable) validation crops."""
    scored = f"{crops - skipped} of {crops}" if skipped else crops
    mos = "val/dnsmos" in rows[0][1]
    print("\n| codec | val crops | mel distance | SI-SDR (dB) | STOI | PESQ | KL (bits/s) |"
          + (" DNSMOS |" if mos else "") + "\n|---|---|---|---|---|---|---|" + ("---|" if mos else ""))
    for source, m in rows:
        print(f"| {source} | {scored} | {m['val/mel_distance']:.4f} | {m['val/si_sdr']:.2f} | {m['val/stoi']:.4f} | "
              f"{m['val/pesq']:.3f} | {m['val/kl_bits_per_s']:.1f} |" + (f" {m['val/dnsmos']:.3f} |" if mos else ""))


if __name__ == "__main__":
    run_script(main)
