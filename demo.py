"""The embedded default job: raw audio to a generated conversation, end to end, on a CPU.

    python demo.py                 # a few minutes on 2 cores
    python demo.py --codec-steps 400 --transformer-steps 400   # longer, better-sounding runs

1. `data/demo/prepare.py`: an offline eSpeak NG corpus (monologues and two-speaker dialogues).
2. `train_codec.py --config tiny`: a tiny codec VAE on it (mel + KL + adversarial losses).
3. `train_transformer.py --config tiny`: a tiny duplex quantizer + LM + resynthesizer on the
   codec's latents.
4. `complete.py`: continues a validation dialogue with the trained model.

Every step is the real command a researcher would run (printed as it starts). Checkpoints go to
`checkpoints/codec` and `checkpoints/transformer`; running the demo again resumes them (nothing
to do once `max_steps` is reached), with other step counts too. When the codec has changed since
the transformer was trained (more codec steps), the transformer starts over on the new codec's
latents, with a note, and its old run is moved aside. `--fresh` starts both over.
"""
import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from config import ArgumentParser, Terminated  # (Terminated: a SIGTERM raised where demo.py is, as Ctrl-C)

ROOT = Path(__file__).resolve().parent
CODEC = "checkpoints/codec/best.safetensors"
TRANSFORMER_DIR = "checkpoints/transformer"
CORPUS = "data/demo"  # data/demo/prepare.py's corpus (train/, val/), beside the recipe
PROMPT = f"{CORPUS}/val/dialogue/dialogue_00000.wav"  # the first validation dialogue: the completion's prompt
STEP_GRACE = 10  # seconds a step is given to stop after a Ctrl-C or SIGTERM


def terminated(signum, frame):
    raise Terminated


def run(args: list[str]) -> None:
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    step = subprocess.Popen([sys.executable] + args, cwd=ROOT)
    try:
        code = step.wait()
    except KeyboardInterrupt as e:
        stop(step, signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        raise
    if code != 0:  # the step said why above; one line saying which step, and how to go on
        how = f"killed by signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exit code {code}"
        sys.exit(f"error: step {args[0]} failed ({how}; its messages are above): fix what it says and run the same "
                 "command to go on, or start the demo over: python demo.py --fresh")


def stop(step: subprocess.Popen, received: signal.Signals) -> None:
    """After a Ctrl-C or a SIGTERM (`received`): let the step end as it does on its own Ctrl-C or
    SIGTERM (a terminal sends Ctrl-C to both, as Slurm and systemd's default KillMode send SIGTERM),
    rather than killing it mid-write, as subprocess.run did after 0.25 s. One that goes on (only
    demo.py was signalled: `kill PID`, KillMode=process) is sent the signal of its own after
    STEP_GRACE seconds, not at once: a trainer takes a second one as "stop now, unsaved"; one that
    still does not end, or a second Ctrl-C or SIGTERM, kills it."""
    try:
        try:
            step.wait(timeout=STEP_GRACE)
        except subprocess.TimeoutExpired:
            step.send_signal(received)
            step.wait(timeout=STEP_GRACE)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        step.kill()
        step.wait()


def codec_changed() -> bool:
    """Whether the transformer run to resume was trained on the latents of another codec than the
    current `CODEC` (the codec trained further since): it cannot resume on these latents."""
    import torch
    from model import load_codec
    from model.latents import codec_fingerprint
    from model.training import Checkpoints
    latest = Checkpoints(ROOT / TRANSFORMER_DIR).latest  # what the trainer would resume from
    if latest is None:
        return False
    trained_on = torch.load(latest, map_location="cpu", mmap=True, weights_only=False)["codec"]
    return trained_on != codec_fingerprint(load_codec(ROOT / CODEC))


def corpus_folders() -> set[Path]:
    """The folders of the demo's corpus as the OS reaches them: one of them may be a link elsewhere
    (data/demo/train on another disk), which the path of a file in it does not name."""
    found = set()
    for folder, dirs, _ in os.walk(ROOT / CORPUS, followlinks=True):
        if (real := Path(os.path.realpath(folder))) in found:  # reached again (a link back into it)
            dirs[:] = []
        found.add(real)
    return found | {Path(os.path.realpath(ROOT / CORPUS))}  # (also before the corpus' folder is made)


def evals(metrics: Path, keys: tuple[str, ...]) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl (those that have all `keys`, each a number: a
    NaN or inf is written as null)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if all(r.get(k) is not None for k in keys)]


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20, help="size of the demo corpus")
    ap.add_argument("--codec-steps", type=int, default=20)
    ap.add_argument("--transformer-steps", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=4, help="length of the generated continuation")
    ap.add_argument("--out", type=os.path.expanduser, help="the completion WAV, relative to where demo.py is run (default: "
                    "outputs/demo/completion.wav in the repository, beside its checkpoints)")
    ap.add_argument("--fresh", action="store_true", help="start both trainings over (resume=false)")
    args = ap.parse_args()
    if not (0 < args.minutes < math.inf and 0 < args.seconds < math.inf):  # also refuses NaN
        ap.error("--minutes and --seconds must be finite numbers > 0")
    if args.codec_steps < 1 or args.transformer_steps < 1:
        ap.error("--codec-steps and --transformer-steps must be >= 1")
    from config.transformer_config import PRESETS
    from model.audio import AudioError, check_output
    from model.generator import completion_problem
    if problem := completion_problem(args.seconds, 1, PRESETS["tiny"]):  # this machine's memory
        ap.error(problem)
    # the steps run in ROOT; a path given is from where demo.py is run
    out = ROOT / "outputs/demo/completion.wav" if args.out is None else Path(args.out).absolute()
    if corpus_folders() & set(Path(os.path.realpath(out)).parents):  # read by every later run: its corpus check stops it
        ap.error(f"--out {args.out}: it is in the demo's corpus folder ({ROOT / CORPUS}), which every demo run reads "
                 "as its training and validation audio; write the completion elsewhere")
    try:  # what complete.py would refuse (the prompt too), found before the corpus and the trainings
        check_output(str(out), keep={"the demo's prompt": str(ROOT / PROMPT)})
    except AudioError as e:
        ap.error(f"--out: {e}")
    t0 = time.time()
    resume = "resume=false" if args.fresh else "resume=true"

    run(["data/demo/prepare.py", "--minutes", str(args.minutes), "--seed", "0"])
    run(["train_codec.py", "--config", "tiny", f"max_steps={args.codec_steps}", "wandb=disabled", resume])
    try:
        changed = not args.fresh and codec_changed()
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # a damaged checkpoint
        sys.exit(f"error: cannot compare the codec with the one {TRANSFORMER_DIR} was trained on ({e}): start the "
                 "demo over: python demo.py --fresh")
    if changed:
        print(f"\nnote: the codec changed since {TRANSFORMER_DIR} was trained: the transformer starts over on the "
              "new codec's latents (resume=false moves its previous run aside)", flush=True)
        resume = "resume=false"
    run(["train_transformer.py", "--config", "tiny", f"max_steps={args.transformer_steps}", "wandb=disabled",
         f"codec_checkpoint={CODEC}", resume])
    prompt = sorted((ROOT / "data/demo/val/dialogue").glob("*.wav"))[0]
    run(["complete.py", str(prompt.relative_to(ROOT)), str(out), "--variant",
         f"{TRANSFORMER_DIR}/best.safetensors", "--seconds", str(args.seconds), "--seed", "0"])

    codec = evals(ROOT / "checkpoints/codec/metrics.jsonl", ("val/mel_distance",))
    model = evals(ROOT / TRANSFORMER_DIR / "metrics.jsonl", ("val/lm_ce", "val/resynth_nll"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    if codec:
        a, b = codec[0], codec[-1]
        print(f"  codec       val mel distance {a['val/mel_distance']:.3f} -> {b['val/mel_distance']:.3f} "
              f"(steps {a['step']} -> {b['step']})")
    if model:
        a, b = model[0], model[-1]
        print(f"  transformer val LM cross-entropy {a['val/lm_ce']:.3f} -> {b['val/lm_ce']:.3f}, "
              f"resynthesizer NLL {a['val/resynth_nll']:.2f} -> {b['val/resynth_nll']:.2f}")
    print(f"  completion  {args.out or out.relative_to(ROOT)} (prompt {prompt.relative_to(ROOT)}; "
          "left: speaker 0, right: speaker 1)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except KeyboardInterrupt as e:  # one line, not a traceback: the corpus and checkpoints made so far are kept
        by = " (SIGTERM)" if isinstance(e, Terminated) else ""
        print(f"interrupted{by}: run the same command again to go on from where it stopped", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
