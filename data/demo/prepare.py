"""Make a small offline speech corpus with eSpeak NG (and Flite, Festival), for the demo and the tests.

    python data/demo/prepare.py --minutes 20 --seed 0

writes 16 kHz WAV files under --out (default data/demo):

    train/mono/mono_NNNNN.wav          one voice, a few sentences with pauses
    train/dialogue/dialogue_NNNNN.wav  two voices, one per channel: turns, pauses, some overlaps,
                                       short backchannels ("mm-hm", "right") from the listener
    val/...                            the same, about --val-fraction of the audio
    manifest.json                      settings, the train and held-out voices, and every file's
                                       voices and text with timings

Half the audio is monologue, half dialogue. The speech is synthetic but varied: eSpeak NG (eight
English accents, 40 voice variants with whispered and creaky ones, random pitch, range and rate)
through libespeak-ng from the `espeakng-loader` wheel via ctypes, and, where installed, Debian's
`flite` (voices slt, rms, awb, kal16) and Festival's `text2wave` (kal_diphone, ked_diphone,
cmu_us_slt_arctic_hts), at random speeds. Validation speakers are held out of training
(HELD_OUT), so validation figures measure how a model does on voices it never heard. The same
--seed, --minutes and installed voices give byte-identical files, and a corpus that already
exists with the same settings and voices is left alone (--force rebuilds it).
"""
from __future__ import annotations

import ctypes
import glob
import io
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from config import ArgumentParser, stop_signals_held  # noqa: E402 (the repository's, for its one-line errors)
from model.audio import broken_link_above  # noqa: E402 (numpy and the standard library only)
from model.files import REPLACING  # noqa: E402 (the standard library only)

SAMPLE_RATE = 16000
RECIPE_VERSION = 2  # bump when the recipe changes, so corpora made by an older one are rebuilt
HERE = os.path.dirname(os.path.abspath(__file__))
BYTES_PER_SECOND = 1.2 * SAMPLE_RATE * 2 * 1.5  # 16-bit, half mono half stereo, dialogues overshooting

LANGUAGES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029", "en-gb-x-gbclan",
             "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "Alex", "Andy", "Annie", "belinda", "benjamin", "david", "edward", "linda", "max",
            "norbert", "paul", "robert", "steph", "klatt2", "klatt4", "aunty", "caleb", "grandma",
            "grandpa", "john", "quincy", "shelby", "travis", "Lee",
            "croak", "whisper", "whisperf")  # the last three: a creaky and two whispered styles
FLITE_VOICES = {"slt": 170, "rms": 100, "awb": 110, "kal16": 105}  # voice: its usual f0 in Hz
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
ENGINES = ("espeak", "flite", "festival")
ENGINE_WEIGHTS = {"espeak": 0.5, "flite": 0.3, "festival": 0.2}  # share of speakers, among those installed
# speakers of val/ only, never in train/: validation measures unseen voices (accents are shared)
HELD_OUT = {"espeak": ("m4", "f3", "david", "aunty"), "flite": ("awb",), "festival": ("ked_diphone",)}

# espeak-ng's speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000        # return an error instead of calling exit()
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    engine: str   # espeak, flite or festival
    speaker: str  # eSpeak variant, Flite or Festival voice
    language: str  # eSpeak's accent; "en" for the others
    pitch: int    # 0-100, eSpeak's default 50; Flite: its f0 scaled by 2^((pitch - 50) / 100)
    range: int    # intonation range 0-100 (eSpeak only)
    rate: int     # words per minute; Flite and Festival stretch durations by 175 / rate
    level: float  # peak amplitude of this speaker's speech in the file

    @property
    def name(self) -> str:
        return f"{self.language}+{self.speaker}" if self.engine == "espeak" else f"{self.engine}:{self.speaker}"


class ESpeak:
    """libespeak-ng in synchronous mode: `synth` returns the whole utterance at 16 kHz.

    The library keeps some state from one utterance to the next (the voice source's phase, its
    random generators, which are reseeded per utterance), so an utterance depends slightly on
    those before it; the corpus is therefore made by one process in a fixed order.
    """

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise SystemExit("error: the demo corpus needs eSpeak NG: pip install espeakng-loader") from e
        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(),
                                          INITIALIZE_DONT_EXIT)
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {self.data_path}")
        self.lib = lib
        self.libc = ctypes.CDLL(None) if sys.platform != "win32" else None
        self._chunks: list[np.ndarray] = []
        self._callback = SYNTH_CALLBACK(self._collect)  # kept on self: C holds only the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0: go on synthesising

    def voices(self) -> list[str]:
        """The variants we use; fails early, and clearly, if this eSpeak build lacks one (or a language)."""
        for language in LANGUAGES:
            if self.lib.espeak_SetVoiceByName(language.encode()) != 0:
                raise RuntimeError(f"eSpeak NG at {self.data_path} has no voice {language!r}")
        for variant in VARIANTS:  # an unknown variant is silently ignored by eSpeak, so look for it
            if not os.path.exists(os.path.join(self.data_path, "voices", "!v", variant)):
                raise RuntimeError(f"eSpeak NG at {self.data_path} has no variant {variant!r}")
        return list(VARIANTS)

    def synth(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        """Speak `text`; returns float32 (T,) at 16 kHz scaled to the voice's level."""
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice.name!r}")
        self.lib.espeak_SetParameter(PARAM_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(PARAM_PITCH, voice.pitch, 0)
        self.lib.espeak_SetParameter(PARAM_RANGE, voice.range, 0)
        # breath and aspiration noise use eSpeak's own generator and libc rand()
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        if self.libc is not None:
            self.libc.srand(ctypes.c_uint(seed))
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"eSpeak NG failed (error {err}) on {text!r} with voice {voice.name}")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0  # (T,) at 22050 Hz
        return to_level(audio, self.rate, voice.level)


def to_level(audio: np.ndarray, rate: int, level: float) -> np.ndarray:
    """float (T,) at `rate` -> float32 at 16 kHz with peak `level`."""
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    audio = audio.astype(np.float32)
    return audio * (level / max(float(np.abs(audio).max()), 1e-4))


def run_for(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True), stopped past `timeout` seconds
    (subprocess.TimeoutExpired) or on Ctrl-C with its whole process group: a wrapper script's
    children would hold its pipes open, and run() would wait for them."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:  # closes the pipes when it ends
        try:
            out, err = process.communicate(timeout=timeout)
        except BaseException:
            stop(process)
            raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def stop(process: subprocess.Popen) -> None:
    """Kill a synthesizer started in its own session (`start_new_session`), with its children."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it has exited, its group with it
        pass
    process.wait()


class Flite:
    """Debian's `flite`, run once per utterance (deterministic: no random source)."""

    def __init__(self, folder: str, timeout: float):
        self.path, self.timeout = os.path.join(folder, "flite.wav"), timeout

    def voices(self) -> list[str]:
        """The voices of FLITE_VOICES installed here, in a fixed order; [] without flite."""
        if shutil.which("flite") is None:
            return []
        try:
            listed = run_for(["flite", "-lv"], self.timeout).stdout.split()
        except subprocess.TimeoutExpired:  # a flite that hangs: no voice of it is used
            return []
        return [v for v in FLITE_VOICES if v in listed]

    def synth(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        f0 = FLITE_VOICES[voice.speaker] * 2 ** ((voice.pitch - 50) / 100)  # rms ignores it
        if os.path.exists(self.path):  # never read as this utterance's
            os.remove(self.path)
        try:
            result = run_for(["flite", "-voice", voice.speaker, "--setf", f"duration_stretch={175 / voice.rate:.3f}",
                              "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", self.path], self.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flite did not finish within {self.timeout:g} s on {text!r} with voice "
                               f"{voice.speaker} (--timeout)") from None
        if result.returncode != 0 or not os.path.exists(self.path):
            said = " ".join(result.stderr.split())[-300:]  # one line
            raise RuntimeError(f"flite failed (exit status {result.returncode}) on {text!r} with voice "
                               f"{voice.speaker}{': ' + said if said else ''}")
        return read_wav(self.path, voice.level)


class Festival:
    """One Festival process (`festival --pipe`) kept for the whole corpus, since starting one costs
    more than an utterance; it is fed Scheme and says "done" after writing each utterance's WAV.
    Its errors go to a log beside the WAV, named when it fails; one that has not said "done"
    within `timeout` seconds of an utterance is stopped."""

    def __init__(self, folder: str, timeout: float):
        self.path, self.process, self.timeout = os.path.join(folder, "festival.wav"), None, timeout
        self.log = os.path.join(folder, "festival.log")

    def voices(self) -> list[str]:
        """The voices of FESTIVAL_VOICES installed here, in a fixed order; [] without Festival."""
        if shutil.which("festival") is None or shutil.which("stdbuf") is None:
            return []
        return [v for v in FESTIVAL_VOICES if glob.glob(f"/usr/share/festival/voices/*/{v}")]

    def synth(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        if self.process is None:
            # stdbuf: line-buffered, or "done" would wait in festival's buffer for ever
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(["stdbuf", "-oL", "festival", "--pipe"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
            self.output = b""  # read but not yet used
        quoted = text.replace("\\", "\\\\").replace('"', '\\"')
        if os.path.exists(self.path):  # never read as this utterance's
            os.remove(self.path)
        try:  # a festival that has exited: its stdin is a broken pipe
            # one expression: a voice that fails to load aborts it, no WAV is written; as separate ones
            # festival went on with the previous voice, and its speech was labelled with this one
            self.process.stdin.write((f"(begin (voice_{voice.speaker}) (Parameter.set 'Duration_Stretch "
                                     f'{175 / voice.rate:.3f}) (utt.save.wave (utt.synth (Utterance Text "{quoted}")) '
                                     f'"{self.path}" \'riff))\n(print "done")\n').encode())
            self.process.stdin.flush()
        except OSError as e:
            raise RuntimeError(f"festival exited (status {self.process.poll()}) before {text!r} with voice "
                               f"{voice.speaker}: {e.strerror or e}") from None
        if not self.wait_done(text, voice) or not os.path.exists(self.path):
            raise RuntimeError(f"festival failed on {text!r} with voice {voice.speaker}{self.said()}")
        return read_wav(self.path, voice.level)

    def wait_done(self, text: str, voice: Voice) -> bool:
        """Read festival's output up to its "done" line: True; False if it exits first. Past the
        timeout, festival is stopped and RuntimeError raised."""
        fd, deadline = self.process.stdout.fileno(), time.monotonic() + self.timeout
        while not any(line.strip() == b'"done"' for line in self.output.split(b"\n")[:-1]):  # whole lines
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close(kill=True)
                raise RuntimeError(f"festival did not finish within {self.timeout:g} s on {text!r} with voice "
                                   f"{voice.speaker} (--timeout)")
            if not (chunk := os.read(fd, 65536)):
                return False
            self.output += chunk
        self.output = b""  # nothing follows "done": festival waits for the next utterance
        return True

    def said(self) -> str:
        """The last line festival wrote to its log (its error), as `: LINE`, or ''."""
        try:
            with open(self.log, errors="replace") as f:
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        except OSError:
            return ""
        return f": {lines[-1][-300:]}" if lines else ""

    def close(self, kill: bool = False) -> None:
        """End festival: its input closed, it exits; one that does not (or `kill`) is stopped."""
        if self.process is not None:
            try:
                self.process.stdin.close()
            except OSError:  # it has exited already
                pass
            try:
                self.process.wait(timeout=0 if kill else self.timeout)
            except subprocess.TimeoutExpired:
                stop(self.process)
            self.process = None


def read_wav(path: str, level: float) -> np.ndarray:
    """A synthesizer's WAV file -> float32 (T,) at 16 kHz with peak `level`; the file is removed."""
    audio, rate = sf.read(path, dtype="float32")
    os.remove(path)
    if len(audio) == 0:  # (a valid WAV of no samples: counted as the synthesizer failing, as garbage is)
        raise RuntimeError(f"{os.path.basename(path)}: the synthesizer wrote no samples")
    return to_level(audio if audio.ndim == 1 else audio.mean(1), rate, level)


class Speakers:
    """Every installed synthesizer; `synth` speaks with whichever one the voice names."""

    def __init__(self, engines: list[str], folder: str, timeout: float):
        self.engines, self.broken, self.left_out = {}, {}, {}
        for engine in engines:
            synth = ESpeak() if engine == "espeak" else (Flite if engine == "flite" else Festival)(folder, timeout)
            voices = synth.voices()
            problems = {} if engine == "espeak" else self.failing(synth, engine, voices)
            working = [v for v in voices if v not in problems]
            if voices and not working:
                self.broken[engine] = problems[voices[0]]  # installed, but it fails: found before any synthesis
            elif working:
                self.engines[engine] = (synth, working)
                # a voice that fails is left out: never spoken by another voice under its name
                self.left_out.update({f"{engine}:{v}": problem for v, problem in problems.items()})
        # asked for, with no voice installed
        self.missing = [e for e in engines if e not in self.engines and e not in self.broken]

    @staticmethod
    def failing(synth, engine: str, voices: list[str]) -> dict[str, str]:
        """{voice: why `synth` cannot speak a word with it} for each of `voices` that fails. Festival
        is started again after a failure and after the last voice (`close`), so each voice is tried
        on its own and the corpus is the one made without this check."""
        problems = {}
        for speaker in voices:
            try:
                synth.synth("Hello.", Voice(engine, speaker, "en", 50, 50, 175, 0.5), seed=0)
            except (RuntimeError, OSError) as e:  # soundfile's errors on a bad WAV are RuntimeErrors
                problems[speaker] = str(e)
                if engine == "festival":
                    synth.close()
        if engine == "festival":
            synth.close()
        return problems

    def pool(self, split: str) -> list[tuple[str, str]]:
        """(engine, speaker) of the voices of a split: the held-out ones for val, the others for train."""
        return [(engine, v) for engine, (_, voices) in self.engines.items() for v in voices
                if (v in HELD_OUT[engine]) == (split == "val")]

    def synth(self, text: str, voice: Voice, seed: int) -> np.ndarray:
        return self.engines[voice.engine][0].synth(text, voice, seed)

    def close(self) -> None:
        if "festival" in self.engines:
            self.engines["festival"][0].close()


def read_text(path: str) -> tuple[list[str], list[str]]:
    """sentences.txt -> (sentences, backchannels)."""
    sections = {"sentences": [], "backchannels": []}
    current = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            sections[current].append(line)
    return sections["sentences"], sections["backchannels"]


def random_voice(rng: np.random.Generator, pool: list[tuple[str, str]], unlike: Voice | None = None) -> Voice:
    """A speaker from `pool` ((engine, speaker) pairs): an engine by ENGINE_WEIGHTS, then one of
    its speakers, with random accent (eSpeak), pitch, range, rate and level."""
    engines = sorted({e for e, _ in pool}, key=ENGINES.index)
    weights = np.array([ENGINE_WEIGHTS[e] for e in engines])
    while True:
        engine = engines[int(rng.choice(len(engines), p=weights / weights.sum()))]
        speakers = [s for e, s in pool if e == engine]
        voice = Voice(engine=engine, speaker=str(rng.choice(speakers)),
                      language=str(rng.choice(LANGUAGES)) if engine == "espeak" else "en",
                      pitch=int(rng.integers(25, 76)), range=int(rng.integers(30, 91)),
                      rate=int(rng.integers(140, 201)), level=float(rng.uniform(0.25, 0.8)))
        # two speakers should sound apart
        if unlike is None or (voice.engine, voice.speaker) != (unlike.engine, unlike.speaker) or len(pool) == 1:
            return voice


def seconds(rng: np.random.Generator, low: float, high: float) -> int:
    return int(rng.uniform(low, high) * SAMPLE_RATE)


def make_monologue(tts: Speakers, rng: np.random.Generator, pool: list, sentences: list[str]):
    """One voice of `pool`, 1-4 sentences with pauses -> (audio (1, T), manifest entry)."""
    voice = random_voice(rng, pool)
    picks = rng.choice(len(sentences), size=int(rng.integers(1, 5)), replace=False)
    parts, turns = [np.zeros(seconds(rng, 0.1, 0.5), np.float32)], []
    t = len(parts[0])  # where the next sentence starts
    for k, idx in enumerate(picks):
        if k > 0:
            parts.append(np.zeros(seconds(rng, 0.25, 0.9), np.float32))
            t += len(parts[-1])
        speech = tts.synth(sentences[idx], voice, seed=int(rng.integers(2**31)))
        turns.append({"channel": 0, "start": round(t / SAMPLE_RATE, 3), "text": sentences[idx]})
        parts.append(speech)
        t += len(speech)
    parts.append(np.zeros(seconds(rng, 0.1, 0.5), np.float32))
    audio = np.concatenate(parts)[None]  # (1, T)
    return audio, {"voices": [voice.__dict__], "turns": turns}


def make_dialogue(tts: Speakers, rng: np.random.Generator, pool: list, sentences: list[str],
                  backchannels: list[str], target_seconds: float):
    """Two voices of `pool` taking turns, one per channel -> (audio (2, T), manifest entry)."""
    voices = [random_voice(rng, pool)]
    voices.append(random_voice(rng, pool, unlike=voices[0]))
    margin = int(0.1 * SAMPLE_RATE)              # a speaker never overlaps themselves
    events = []                                  # (channel, start sample, audio (T,), text)
    free = [0, 0]                                # where each speaker's own speech ends
    t = seconds(rng, 0.2, 0.8)                   # end of the conversation so far
    speaker = int(rng.integers(2))
    line = int(rng.integers(len(sentences)))     # neighbouring lines of sentences.txt often answer each other
    while t < target_seconds * SAMPLE_RATE:
        other = 1 - speaker
        if rng.random() < 0.15:                  # change the subject
            line = int(rng.integers(len(sentences)))
        n = 1 if rng.random() < 0.6 else 2
        text = " ".join(sentences[(line + k) % len(sentences)] for k in range(n))
        line += n
        speech = tts.synth(text, voices[speaker], seed=int(rng.integers(2**31)))
        # mostly a pause before the reply; sometimes the reply starts before the other has finished
        gap = -seconds(rng, 0.1, 0.5) if rng.random() < 0.15 else seconds(rng, 0.15, 0.9)
        start = max(t + gap, free[speaker] + margin, 0)
        events.append((speaker, start, speech, text))
        free[speaker] = start + len(speech)
        # the listener acknowledges a long turn, without talking over their own speech
        if len(speech) > 1.5 * SAMPLE_RATE and rng.random() < 0.4:
            word = str(rng.choice(backchannels))
            back = tts.synth(word, voices[other], seed=int(rng.integers(2**31)))
            back_start = start + int(rng.uniform(0.3, 0.7) * len(speech))
            if back_start >= free[other] + margin:
                events.append((other, back_start, back, word))
                free[other] = back_start + len(back)
        t = max(t, start + len(speech))
        # a question is answered by the other speaker; otherwise the turn usually passes too
        if text.endswith("?") or rng.random() < 0.8:
            speaker = other
    audio = np.zeros((2, max(free) + seconds(rng, 0.2, 0.8)), np.float32)  # (2, T)
    for channel, start, speech, _ in events:
        audio[channel, start:start + len(speech)] += speech
    turns = [{"channel": c, "start": round(s / SAMPLE_RATE, 3), "text": text}
             for c, s, _, text in sorted(events, key=lambda e: e[1])]
    return audio, {"voices": [v.__dict__ for v in voices], "turns": turns}


def plan(minutes: float, val_fraction: float) -> list[tuple[str, str, float]]:
    """(split, kind, seconds of audio) for each part of the corpus: half monologue, half dialogue."""
    parts = []
    for split, fraction in (("train", 1.0 - val_fraction), ("val", val_fraction)):
        for kind in ("mono", "dialogue"):
            parts.append((split, kind, minutes * 60.0 * fraction / 2))
    return parts


UNFINISHED = ".{kind}_[0-9][0-9][0-9][0-9][0-9].wav.partial"


def unfinished(path: str) -> str:
    """Where a file of the corpus is written until the whole corpus is: a hidden name beside it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.partial")


def corpus_files(out: str, pattern: str = "{kind}_[0-9][0-9][0-9][0-9][0-9].wav") -> list[str]:
    """The files of a corpus in `out` (`pattern`: its WAV files' names; with a dot before, the
    unfinished ones of a run in progress)."""
    return sorted(path for split in ("train", "val") for kind in ("mono", "dialogue")
                  for path in glob.glob(os.path.join(glob.escape(out), split, kind, pattern.format(kind=kind))))


def strangers(out: str) -> str | None:
    """Why `out` cannot take a corpus, or None: a manifest.json that is not a demo corpus's (it
    would be replaced), or files under train/ and val/ that no run of this script wrote (they
    would be mixed into the corpus, and into training on it). Hidden files (the trainers' indexes,
    unfinished files of a killed run) are left alone, as the data loaders leave them out."""
    manifest = os.path.join(out, "manifest.json")
    if os.path.lexists(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                ours = "recipe_version" in json.load(f).get("settings", {})
        except (OSError, ValueError, AttributeError, TypeError):
            ours = False
        if not ours:
            return f"{manifest} is not a demo corpus's manifest"
    made, others = set(corpus_files(out)), []
    for split in ("train", "val"):
        for root, dirs, names in os.walk(os.path.join(out, split)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            others += [os.path.join(root, n) for n in names
                       if not n.startswith(".") and os.path.join(root, n) not in made]
    if others:
        more = f" and {len(others) - 1} more files were" if len(others) > 1 else " was"
        return f"{others[0]}{more} not written by this script"
    return None


def remove_unfinished(out: str) -> None:
    """Delete the files a run writes before its corpus is complete (hidden, `unfinished`): those of
    a run stopped before its swap began (`finish_swap` first finishes one stopped in it)."""
    for path in corpus_files(out, UNFINISHED) + glob.glob(unfinished(glob.escape(os.path.join(out, "manifest.json")))):
        os.remove(path)


def write_wav(path: str, audio: np.ndarray) -> None:
    """audio (C, T) -> a 16-bit WAV file. Made in memory, then written: a full disk is an OSError
    naming `path` (soundfile, writing to the file, said only "System error.")."""
    wav = io.BytesIO()
    sf.write(wav, audio.T, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    try:
        with open(path, "wb") as f:
            f.write(wav.getbuffer())
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


CORPUS_PATH = re.compile(r"(train|val)/(mono|dialogue)/\2_[0-9]{5}\.wav")  # a manifest's "path"


def put_in_place(out: str, paths: list[str]) -> None:
    """Swap the corpus written hidden (`paths`, relative to `out`, each as `unfinished`, and its
    manifest) for the previous one, by renames, deleting what the previous one has beyond it. The
    `REPLACING` mark in `out`, put down first and removed last, says a swap is under way: the
    trainers refuse the folder while it is there (`model.data.folder_problem`), and the next run
    finishes the swap (`finish_swap`). Each step may be repeated: a file already renamed is not
    looked for, so a swap stopped anywhere is finished by calling this again."""
    manifest, mark = os.path.join(out, "manifest.json"), os.path.join(out, REPLACING)
    with open(mark, "w"):
        pass
    if os.path.exists(unfinished(manifest)) and os.path.lexists(manifest):
        os.remove(manifest)  # the previous corpus's: it no longer describes the folder
    keep = set()
    for rel in paths:
        keep.add(path := os.path.join(out, rel))
        if os.path.exists(unfinished(path)):
            os.replace(unfinished(path), path)
    for path in corpus_files(out):
        if path not in keep:  # the previous corpus was longer
            os.remove(path)
    if os.path.exists(unfinished(manifest)):
        os.replace(unfinished(manifest), manifest)  # marks the corpus complete
    os.remove(mark)


def finish_swap(out: str) -> None:
    """Finish the swap of a run stopped while putting its corpus in place (`REPLACING` in `out`):
    all its files were written (its hidden manifest, written after them, lists them), so the folder
    becomes that corpus whole. Should one be missing (the folder changed by hand), neither corpus
    is whole: both are deleted, and this run makes its own."""
    manifest, mark = os.path.join(out, "manifest.json"), os.path.join(out, REPLACING)
    if not os.path.exists(mark):
        return
    try:  # the hidden manifest, or manifest.json once it was renamed (stopped just before the mark went)
        with open(unfinished(manifest) if os.path.exists(unfinished(manifest)) else manifest, encoding="utf-8") as f:
            paths = [entry["path"] for entry in json.load(f)["files"]]
        whole = all(isinstance(p, str) and CORPUS_PATH.fullmatch(p) and (os.path.exists(os.path.join(out, p))
                    or os.path.exists(unfinished(os.path.join(out, p)))) for p in paths)
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if whole:
        put_in_place(out, paths)
        print(f"note: a run stopped while putting its corpus in {out} in place; that corpus is now in place")
        return
    print(f"note: {out} holds part of two corpora (a swap stopped, files missing); both are deleted")
    for path in corpus_files(out) + [manifest]:
        if os.path.lexists(path):
            os.remove(path)
    remove_unfinished(out)
    os.remove(mark)


def existing_folder(path: str) -> str:
    """`path`, or the nearest of its parents that exists (where it would be made)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def hold_lock(out: str):
    """Hold `out`'s lock (a hidden file, `.prepare.lock`) until this process ends; returns the open
    file. A second run on the same folder (two demos started at once) waits for the first, then
    finds its corpus complete, instead of removing the files the first is writing as a killed run's."""
    f = open(os.path.join(out, ".prepare.lock"), "a")
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another prepare.py writing a corpus in {out}", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def is_complete(out: str, settings: dict) -> bool:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (manifest.get("settings") == settings
            and all(os.path.exists(os.path.join(out, entry["path"])) for entry in manifest["files"]))


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="total minutes of audio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=os.path.expanduser, default=HERE, help="output folder (default: this folder)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds Flite or Festival may take on one "
                        "utterance (default 60): one that takes longer is stopped, as failing")
    parser.add_argument("--engines", help=f"synthesizers to use, each of which must be installed (default: those "
                        f"of {', '.join(ENGINES)} installed; espeak is required)")
    args = parser.parse_args(argv)
    if not (0 < args.minutes < math.inf and 0 < args.val_fraction < 1):  # also refuses NaN
        parser.error("--minutes must be a finite number > 0 and --val-fraction between 0 and 1")
    if not 0 < args.timeout < math.inf:
        parser.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if args.seed < 0:  # numpy's seed sequences take non-negative integers
        parser.error(f"--seed must be an integer >= 0, got {args.seed}")
    if not args.out.strip():  # not the current folder by accident
        parser.error("--out needs a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder")
    if problem := broken_link_above(args.out):  # (a disk not mounted?) os.makedirs says "File exists"
        parser.error(f"--out {args.out}: {problem}")
    engines = list(ENGINES) if args.engines is None else args.engines.split(",")
    if "espeak" not in engines or not set(engines) <= set(ENGINES):
        parser.error(f"--engines must list espeak and any of {', '.join(ENGINES[1:])}, got {args.engines!r}")
    if twice := sorted({e for e in engines if engines.count(e) > 1}, key=ENGINES.index):  # a typo for another one?
        parser.error(f"--engines {args.engines}: {', '.join(twice)} is named twice; name each engine once")
    if os.path.isdir(args.out) and (problem := strangers(args.out)):  # nothing of them is deleted, nor mixed in
        parser.error(f"--out {args.out}: {problem}; choose an empty folder, or one holding a demo corpus")
    need, usage = args.minutes * 60 * BYTES_PER_SECOND, shutil.disk_usage(existing_folder(args.out))
    free = usage.free
    if need > free and usage.total > 0:  # (a pseudo file system, /proc: no size; making the folder there says why)
        parser.error(f"--minutes {args.minutes:g} makes about {need / 1e9:.3g} GB of WAV files, more than the "
                     f"{free / 1e9:.3g} GB free for {args.out}")
    try:
        make_corpus(args, engines, parser)
    except KeyboardInterrupt:  # Ctrl-C: as a killed run, the previous corpus whole; said in one line
        print(f"interrupted: the corpus in {args.out} is left as it was", file=sys.stderr)
        raise SystemExit(130) from None


def make_corpus(args, engines: list[str], parser) -> None:
    """Synthesize the corpus `args` describe into args.out, then put it in place of the previous one."""
    began = time.time()
    scratch = tempfile.TemporaryDirectory(prefix="demo-corpus-")
    try:
        tts = Speakers(engines, scratch.name, args.timeout)
    except (RuntimeError, OSError) as e:  # an eSpeak NG install that loads but is broken (its data, its library)
        raise SystemExit(f"error: eSpeak NG cannot be used here: {e}") from None
    if args.engines is not None and tts.broken:
        parser.error(f"--engines {args.engines}: {'; '.join(tts.broken.values())}: repair it or leave it out")
    for name, problem in (tts.broken | tts.left_out).items():  # those installed that work make the corpus
        print(f"note: {name} is left out, it fails here: {problem}", flush=True)
    if args.engines is not None and tts.missing:
        parser.error(f"--engines {args.engines}: {', '.join(tts.missing)} {'is' if len(tts.missing) == 1 else 'are'} "
                     f"not installed here (installed: {', '.join(tts.engines)}): install or leave out "
                     "(data/demo/README.md)")
    try:  # made now: a folder that cannot be made or written is found before any synthesis
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot make the folder ({e.strerror or e})")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out}: the folder is not writable")
    lock = hold_lock(args.out)  # noqa: F841 (held until the process ends)
    manifest = os.path.join(args.out, "manifest.json")
    voices = {split: [f"{e}:{s}" for e, s in tts.pool(split)] for split in ("train", "val")}
    settings = {"recipe_version": RECIPE_VERSION, "seed": args.seed, "minutes": args.minutes,
                "val_fraction": args.val_fraction, "sample_rate": SAMPLE_RATE, "voices": voices}
    ctrl_c = []
    with stop_signals_held(ctrl_c):
        finish_swap(args.out)  # a run's stopped in its swap: first, so no reader sees the folder half replaced
    if ctrl_c:
        raise KeyboardInterrupt
    remove_unfinished(args.out)  # a run's stopped before its swap
    if not args.force and is_complete(args.out, settings):
        print(f"demo corpus already in {args.out} (seed {args.seed}, {args.minutes} minutes, the same voices); "
              "--force rebuilds it")
        return
    print(f"synthesizers: {', '.join(tts.engines)}; {len(voices['train'])} training voices, "
          f"{len(voices['val'])} held out for validation: {', '.join(voices['val'])}")

    sentences, backchannels = read_text(os.path.join(HERE, "sentences.txt"))
    files, interrupted = [], []
    # Ctrl-C while synthesising is noted by the handler and acted on between files: raised in the
    # handler, a KeyboardInterrupt landing in eSpeak's ctypes callback or soundfile's cffi one is
    # "ignored" there (a traceback printed, and the run finishing, exit status 0, or failing later)
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        with tqdm(total=round(args.minutes * 60), desc="synthesising", dynamic_ncols=True,
                  bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}]") as bar:
            for part, (split, kind, budget) in enumerate(plan(args.minutes, args.val_fraction)):
                rng = np.random.default_rng([args.seed, part])
                folder = os.path.join(args.out, split, kind)
                os.makedirs(folder, exist_ok=True)
                made, count = 0.0, 0
                while made < budget or count == 0:  # every part gets at least one file
                    if interrupted:
                        raise KeyboardInterrupt
                    pool = tts.pool(split)
                    if kind == "mono":
                        audio, entry = make_monologue(tts, rng, pool, sentences)
                    else:
                        target = min(rng.uniform(20, 50), max(budget - made, 6.0))
                        audio, entry = make_dialogue(tts, rng, pool, sentences, backchannels, target)
                    rel = f"{split}/{kind}/{kind}_{count:05d}.wav"
                    write_wav(unfinished(os.path.join(args.out, rel)), audio)
                    duration = audio.shape[1] / SAMPLE_RATE
                    files.append({"path": rel, "seconds": round(duration, 3), **entry})
                    made, count = made + duration, count + 1
                    bar.update(min(duration, bar.total - bar.n))  # dialogues overshoot their share
        if interrupted:
            raise KeyboardInterrupt
        # written before the previous corpus is removed: a disk filling up now leaves that one whole
        with open(unfinished(manifest), "w") as f:
            json.dump({"settings": settings, "files": files}, f, indent=1)
    except (RuntimeError, OSError, KeyboardInterrupt) as e:  # nothing is replaced
        remove_unfinished(args.out)  # what a killed run leaves for the next one to remove, removed now
        if interrupted or isinstance(e, KeyboardInterrupt):  # (Ctrl-C reaches flite and festival too: they fail)
            raise KeyboardInterrupt from None
        # a synthesizer failing on a sentence; a full disk
        problem = f"cannot write {e.filename} ({e.strerror})" if isinstance(e, OSError) and e.filename else e
        sys.exit(f"error: {problem}; the corpus in {args.out} is left as it was")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tts.close()
    scratch.cleanup()
    # the previous corpus stays whole until this one is: killed before here, a run leaves it as it
    # was, and its own files hidden (ignored by the data loaders, removed by the next run). Killed
    # in the swap, it leaves the folder marked (refused by the trainers) and the next run finishes
    # the swap; Ctrl-C, SIGTERM and SIGHUP wait until it is done.
    with stop_signals_held(ctrl_c):
        put_in_place(args.out, [entry["path"] for entry in files])
    total = sum(f["seconds"] for f in files) / 60
    print(f"wrote {len(files)} files, {total:.1f} minutes, to {args.out} in {time.time() - began:.1f}s")
    if ctrl_c:
        print(f"interrupted: the corpus was already in place in {args.out}", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
