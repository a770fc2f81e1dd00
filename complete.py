"""Complete a prompt file with hertz-dev: prompt audio in, WAV out.

    python complete.py prompt.wav out.wav                          # duplex (official weights), 10 s more
    python complete.py prompt.flac out.wav --variant mono --seconds 20 --seed 3
    python complete.py prompt.wav out.wav --variant checkpoints/transformer/best.safetensors
    python complete.py prompt.wav out.wav --token-temp 0.7 --top-p 0.95 --num 4   # out-0.wav ... out-3.wav
    python complete.py prompt.wav out.wav --adapter checkpoints/transformer/best.adapter.safetensors
    python complete.py prompt.wav out.wav --quantize int8       # half the GPU memory (int4: a quarter)

The prompt is any file soundfile reads, resampled to 16 kHz. Mono variants average its channels;
duplex puts a one-channel file on both speakers (as the original) and keeps the first two channels
of a longer one. A prompt longer than the context is trimmed to its last part, with a warning.
The output holds the prompt (as the codec reconstructs it) and the continuation, mono or stereo
(duplex: speaker 0 left, speaker 1 right); `--continuation-only` drops the prompt.

`--adapter` applies a LoRA adapter file (`model/lora.py`) to the `--variant` it was trained on;
an adapter of another base is refused, naming both. `--quantize int8|int4` quantizes the
transformer weights while loading (`model/quant.py`; the codec stays float); `--kv-dtype fp8`
keeps the KV caches in float8.

The arguments, the sampling parameters (ranges of `model/protocol.py`), the adapter file and the
prompt file are checked before any weights are loaded or downloaded: a mistake is one `error: ...` line, exit
code 2, and no file written. The flags and their values (the sampling parameters, --seconds, --num,
--seed), the prompt's path and the output's are checked before torch is imported: such a mistake is
its error line at once, not after the seconds of that import.

Sampling defaults are the original's `temps=(0.8, (0.5, 0.1))`: token temperature 0.8, mixture
temperature 0.5, Gaussian temperature 0.1; no top-p (1.0) and no min-p (0.0).
"""
from config import exit_on_interrupt
with exit_on_interrupt():  # Ctrl-C or SIGTERM while importing: one line, 130 or 143 (torch: in `complete`, also so)
    import argparse
    import math
    import os
    import sys
    import time
    import warnings

    # Only what the flags and their checks need (no torch): a mistake is one error line at once, not after
    # the seconds of importing torch; the rest is imported once they are checked.
    from config import ArgumentParser, printable
    from config.transformer_config import DTYPE_NAMES, KV_DTYPE_NAMES, QUANTIZE_MODES
    from model.hub import VARIANTS
    from model import protocol


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", type=os.path.expanduser, help="prompt audio file (WAV, FLAC, OGG, Opus, MP3, AIFF, ...)")
    ap.add_argument("out", type=os.path.expanduser, help="output WAV; with --num N > 1, OUT-0.wav ... OUT-(N-1).wav")
    ap.add_argument("--variant", type=os.path.expanduser, default="duplex",
                    help=f"{' | '.join(VARIANTS)} (official weights, downloaded to --ckpt-dir) or a checkpoint path")
    ap.add_argument("--adapter", type=os.path.expanduser,
        metavar="PATH", help="a LoRA adapter file (.adapter.safetensors) trained on --variant")
    ap.add_argument("--codec", type=os.path.expanduser, default="auto",
                    help="auto (official, or the one recorded in the checkpoint), official, or a path")
    ap.add_argument("--ckpt-dir", type=os.path.expanduser, default="ckpt")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the continuation (8 latents per second)")
    ap.add_argument("--token-temp", type=float, default=0.8, help="LM softmax temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of tokens (1: off)")
    ap.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the likeliest (0: off)")
    ap.add_argument("--mixture-temp", type=float, default=0.5, help="temperature of the mixture component choice")
    ap.add_argument("--gaussian-temp", type=float, default=0.1, help="scale of the Gaussian noise of a latent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num", type=int, default=1, help="completions of the same prompt, generated as one batch")
    ap.add_argument("--encode", choices=("sample", "mean"), default="sample",
                    help="prompt latents: a draw from the codec posterior (as the original) or its mean")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto",) + DTYPE_NAMES,
                    help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quantize", choices=QUANTIZE_MODES,
                    help="weight-only int8 or int4 transformer weights (default: float)")
    ap.add_argument("--kv-dtype", choices=KV_DTYPE_NAMES, default="auto",
                    help="KV caches: auto (the weights' dtype) or fp8 (half the bytes of bf16)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the transformer block (slower start, faster steps)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--continuation-only", action="store_true", help="write the continuation without the prompt")
    ap.add_argument("--offline", action="store_true", help="never download official weights")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the content-hash check of our .safetensors files (a changed file is an error by default)")
    args = ap.parse_args(argv)
    # the values, still without torch (model.protocol: numpy only), so that a mistake is its error at once
    if problem := protocol.completion_problem(args.seconds, args.num):  # NaN, inf, <= 0 (memory: once the config is read)
        ap.error(problem)
    if problem := protocol.seed_problem(args.seed):
        ap.error(f"--seed: {problem}")
    args.params = dict(token_temp=args.token_temp, top_p=args.top_p, min_p=args.min_p, mixture_temp=args.mixture_temp,
                       gaussian_temp=args.gaussian_temp)
    try:
        protocol.check_params(args.params)  # (made into SamplingParams once torch is imported)
    except ValueError as e:
        ap.error(str(e))
    return args


def output_problem(args) -> str | None:
    """What is wrong with the prompt file's path, --variant's, --codec's or the output paths, found
    without torch (the prompt's audio is read once the codec's rate and hop are known)."""
    from model.audio import AudioError, check_outputs, completion_paths, file_problem
    if problem := file_problem(args.prompt):
        return problem
    if args.variant not in VARIANTS and not os.path.isfile(args.variant):
        return f"--variant {args.variant!r} is neither one of {', '.join(VARIANTS)} nor a file"
    if args.codec not in ("auto", "official") and (problem := file_problem(args.codec)):
        return f"--codec: {problem}"
    try:
        # not a pipe, nor the prompt it would replace
        check_outputs(completion_paths(args.out, args.num), keep={"the prompt": args.prompt})
    except AudioError as e:
        return str(e)
    return None


def main(argv=None) -> int:
    from model.audio import missing_folders, remove_empty_folders
    args = parse_args(argv)
    made = missing_folders(args.out)  # by the output's check, before torch: a run that writes nothing takes them away
    try:
        if problem := output_problem(args):
            print(f"error: {printable(problem, newlines=True)}", file=sys.stderr)
            return 2
        return complete(args)
    finally:
        remove_empty_folders(made)  # (only those still empty: a completion written stays)


def complete(args) -> int:
    """The completion of checked arguments: the rest of the checks (those that need torch or the
    weights' configs), then the weights, the completions and their files; an exit status."""
    with exit_on_interrupt():  # Ctrl-C or SIGTERM while importing (torch: seconds): one line, 130 or 143
        import torch
        from model import load_hertz_dev
        from model import SamplingParams
        from model.audio import AudioError, check_prompt, completion_paths, load_prompt, save_audio_set
        from model.checkpoint import read_metadata
        from model.generator import Generator, checked_audio, completion_problem, completion_steps
        from model.lora import read_adapter
        from model.loading import (LOAD_ERRORS, codec_config_of, no_codec_problem, resolve_device, resolve_dtype,
                                   resolved_codec, transformer_config_of)
        from model.quant import quantization_of
        from model.stream_codec import PromptLatentsError
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device, "--dtype")  # one of its choices
    if args.adapter is not None:  # its header: a folder (naming the adapter files in it), another kind of file
        try:
            read_adapter(args.adapter)
        except (FileNotFoundError, *LOAD_ERRORS) as e:
            print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
            return 2
    try:  # the headers: the codec ours records, and its hop
        problem = None
        if args.codec == "auto" and args.variant not in VARIANTS:
            problem = no_codec_problem("--variant", args.variant, read_metadata(args.variant, kind="transformer"),
                                       args.codec)
        cfg = transformer_config_of(args.variant)
        if not problem:  # the codec's hop (samples per latent): the prompt's frames, the completions' audio
            hop = math.prod(codec_config_of(args.variant, args.codec, cfg, adapter=args.adapter).strides)
            codec = resolved_codec(args.variant, args.codec, args.adapter)[0]  # its file, named if it overflows
    except LOAD_ERRORS as e:
        problem = str(e)
    if problem:
        print(f"error: {printable(problem, newlines=True)}", file=sys.stderr)
        return 2
    try:  # before the weights: loading them can take minutes (or a 34 GB download)
        frames = check_prompt(args.prompt, cfg.sample_rate, hop, max_frames=cfg.seq_len)  # the part of it that is used
    except AudioError as e:
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2
    # what --num x (the prompt + --seconds) needs of this machine's memory
    if problem := completion_problem(args.seconds, args.num, cfg, device, dtype, args.kv_dtype, hop=hop,
                                     prompt_frames=frames):
        print(f"error: {printable(problem, newlines=True)}", file=sys.stderr)
        return 2

    t0 = time.time()
    try:  # an adapter of another base (or requantizing a quantized checkpoint) is refused before any weights load
        model = load_hertz_dev(args.variant, device=device, dtype=dtype, ckpt_dir=args.ckpt_dir,
                               codec=args.codec, offline=args.offline or None, adapter=args.adapter,
                               verify=not args.no_verify, quantize=args.quantize)
    except (*LOAD_ERRORS, ValueError) as e:
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2
    cfg = model.config
    hop = model.codec.hop_length
    mode = (quantization_of(model) or {}).get("mode")  # the weights' own: a checkpoint saved quantized, without --quantize
    print(f"loaded {args.variant} ({'duplex' if cfg.duplex else 'mono'})"
          f"{f' with adapter {args.adapter}' if args.adapter else ''} on {device} in {dtype}"
          f"{f' ({mode} weights)' if mode else ''} "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt = load_prompt(args.prompt, cfg.channels, cfg.sample_rate, hop, max_frames=cfg.seq_len)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except (AudioError, ValueError) as e:
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2

    steps = completion_steps(args.seconds, cfg.sample_rate, hop)
    frames = prompt.shape[1] // hop
    print(f"prompt {frames * hop / cfg.sample_rate:.2f} s ({frames} latents), generating {steps} latents "
          f"({steps * hop / cfg.sample_rate:.2f} s) x {args.num}", file=sys.stderr)
    gen = Generator(model, batch_size=args.num, compile=args.compile,
                    cuda_graphs=False if args.no_cuda_graphs else None, kv_dtype=args.kv_dtype)
    audio = torch.from_numpy(prompt)[None].expand(args.num, -1, -1)
    t0 = time.time()
    try:
        latents = gen.complete_latents(audio, steps, SamplingParams(**args.params), seed=args.seed, encode=args.encode,
                                       progress=True)
    except PromptLatentsError as e:  # the codec's latents of this prompt (encode_frames); the arguments are checked above
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2
    # weights that overflow make NaN, which a WAV holds as full-scale noise: the error names the weights at fault
    out, problem = checked_audio(gen.codec, latents, cfg.channels, args.variant, args.adapter, dtype, codec)
    if problem:
        print(f"error: {printable(problem, newlines=True)}", file=sys.stderr)
        return 2
    elapsed = time.time() - t0
    if args.continuation_only:
        out = out[..., frames * hop:]
    paths, ctrl_c = completion_paths(args.out, args.num), []
    try:  # all or none: written to temporaries, then renamed over the paths at once (never a mix with an earlier run's)
        save_audio_set(paths, out.cpu().clamp(-1, 1), cfg.sample_rate, ctrl_c=ctrl_c)
    except AudioError as e:  # a disk that filled while generating (checked writable before): every old file as it was
        print(f"error: {printable(e, newlines=True)}", file=sys.stderr)
        return 2
    for path, wav in zip(paths, out):
        print(f"wrote {printable(path)} ({wav.shape[0]} channel{'s' if wav.shape[0] > 1 else ''}, "
              f"{wav.shape[1] / cfg.sample_rate:.2f} s)", file=sys.stderr)
    if ctrl_c:  # (held while they were renamed)
        raise KeyboardInterrupt
    print(f"{steps * args.num / elapsed:.1f} latents/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from config import interrupted_exit, sigterm_as_interrupt  # (no torch: flag errors come before its import)
    try:
        with sigterm_as_interrupt():  # (SIGTERM: kill, a job's time limit) as Ctrl-C: 143, with the same line
            sys.exit(main())
    except KeyboardInterrupt as e:  # (nothing half-written: the outputs are written all or none)
        interrupted_exit(e, ": no completion written after the last one named")
