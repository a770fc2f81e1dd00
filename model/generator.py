"""Completions: B prompts (latent frames or audio) continued at once, mono or duplex.

    gen = Generator(model, batch_size=1)
    audio = gen.complete(prompt_audio, steps=160, params=SamplingParams(), seed=0)
    latents = gen.complete_latents(prompt_audio, steps=160)   # the same before its decoding
    latents = gen.generate(prompt_latents, steps=160)

Each row is prefilled with its prompt, then every step is one `decode_step` for all rows (on
CUDA a CUDA graph per attention window); rows reaching the context slide (`model.decode`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .audio import MAX_SAMPLE_MAGNITUDE
from .cuda_graphs import StepKey
from .decode import Engine, decode_step, prompt_prefill, slide
from .files import memory_limit
from . import protocol
from .protocol import SEED_MAX
from .sampling import SamplingParams, row_seed
from .stream_codec import MAX_LATENT_MAGNITUDE, decode_frames, encode_frames

ParamsLike = Union[SamplingParams, Sequence[SamplingParams]]


def completion_steps(seconds: float, sample_rate: int = 16000, hop: int = 2000) -> int:
    """Latents of a continuation of `seconds` (rounded; at least one)."""
    return max(1, round(seconds * sample_rate / hop))


def completion_problem(seconds, num, cfg=None, device=None, dtype: Optional[torch.dtype] = None,
                       kv_dtype: Union[str, torch.dtype, None] = None,
                       names: tuple[str, str] = ("--seconds", "--num"), hop: int = 2000,
                       prompt_frames: int = 1) -> Optional[str]:
    """Why `num` completions of `seconds` each cannot be made, or None: the scripts' check of their
    length and count (`names`: how they are called there), before any weights load.

    `seconds` must be a finite number > 0 and `num` an integer >= 1. With the model's `cfg` and
    the `device` and `dtype` it will run in, they must also fit its memory: the decode state
    (`num` rows of KV caches at full context, `DecodeState.make` on a `meta` build) and the
    completions' audio (float32, the prompt's `prompt_frames` and the continuation, held whole on
    the device, then on the host to be written) must each be less than the device's (and the
    host's) memory. There is no limit on length beyond
    that: past the context a row slides (`model.decode.slide`)."""
    if (problem := protocol.completion_problem(seconds, num, names)) or cfg is None:
        return problem
    from .decode import DecodeState
    from .loading import HertzDev
    with torch.device("meta"):
        model = HertzDev(cfg).to(dtype or torch.float32)
    kv = DecodeState.make(model, num, kv_dtype=kv_dtype).kv_bytes
    audio = num * cfg.channels * hop * (completion_steps(seconds, cfg.sample_rate, hop) + prompt_frames) * 4
    device = torch.device(device or "cpu")
    host, host_name = memory_limit()
    limits = [(f"{host_name} ({host / 1e9:.1f} GB)", host, audio + (kv if device.type == "cpu" else 0))]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limits.append((f"{device}'s memory ({total / 1e9:.1f} GB)", total, kv + audio))
    for where, have, need in limits:
        if need > have:
            # one completion: its count is not named (demo.py and the trainer's samples have no such flag)
            asked = f"{names[0]} {seconds:g} needs" if num == 1 else f"{names[1]} {num} x {names[0]} {seconds:g} need"
            fix = "a shorter completion" if num == 1 else "fewer or shorter completions"
            return (f"{asked} at least {need / 1e9:.3g} GB (KV caches {kv / 1e9:.3g} GB, audio {audio / 1e9:.3g} "
                    f"GB), more than {where}: ask for {fix} (any length fits the context, which slides)")
    return None


def overflow_problem(completions: Tensor, variant, adapter=None, dtype: torch.dtype = torch.float32,
                     float32: str = "--dtype float32", codec=None) -> Optional[str]:
    """Why `completions` must not be written, or None: NaN or inf, which weights that overflow make
    (a WAV holds them as full-scale noise). The message names the weights (`variant`, `adapter`) and,
    in a `dtype` narrower than float32, how to ask for float32 where they were loaded (`float32`:
    complete.py's flag, the notebook's parameter). `codec` (the codec's file, or "official"): the
    completions are its audio of latents already found finite (`Generator.complete_latents`), so
    its weights are the ones named. One host sync."""
    if all(bool(torch.isfinite(row).all()) for row in completions):  # a row at a time: no audio-sized mask
        return None
    fix = "re-export them" if dtype in (torch.float32, torch.float64) else f"try {float32}, or re-export them"
    if codec is not None:
        name = "the official codec" if str(codec) == "official" else f"the codec {codec}"
        return (f"the completion holds NaN or inf: {name} decodes the finite latents of {variant} to NaN or inf: its "
                f"weights overflow in {str(dtype)[6:]} (values too large for it, or a damaged file): {fix}; "
                "no file written")
    return (f"the completion holds NaN or inf: the weights of {variant}{f' with adapter {adapter}' if adapter else ''} "
            f"overflow in {str(dtype)[6:]} (values too large for it, or a damaged file): {fix}; no file written")


def checked_audio(codec, latents: Tensor, channels: int, variant, adapter=None, dtype: torch.dtype = torch.float32,
                  codec_file=None, float32: str = "--dtype float32") -> tuple[Optional[Tensor], Optional[str]]:
    """(the audio of `latents`, from `Generator.complete_latents`, or None; why it must not be
    written, or None): the transformer's latents are checked first (`overflow_problem`, naming
    `variant` and `adapter`), then the codec's audio of them (naming `codec_file`: the codec's file,
    or "official"), so that the message names the weights at fault. Two host syncs."""
    if problem := overflow_problem(latents, variant, adapter, dtype, float32):
        return None, problem
    audio = decode_frames(codec, latents, channels)
    problem = overflow_problem(audio, variant, dtype=next(codec.parameters()).dtype, float32=float32,
                               codec=codec_file or "official")
    return (None, problem) if problem else (audio, None)


def as_params(params: ParamsLike, n: int) -> list[SamplingParams]:
    """One SamplingParams for each of `n` rows (each checked when it was made): the one given for
    all, or a list of n. TypeError or ValueError naming `params` otherwise."""
    if isinstance(params, SamplingParams):
        params = [params] * n
    elif not (isinstance(params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in params)):
        hint = ": make it SamplingParams(**params)" if isinstance(params, dict) else ""
        raise TypeError(f"params must be a SamplingParams or a list of {n} (one per row), "
                        f"got {type(params).__name__}{hint}")
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameter sets for {n} rows")
    return list(params)


def row_seeds(seed: Union[int, Sequence[int]], n: int) -> list[int]:
    """Each row's seed: `row_seed(seed, r)` for one int, or the n seeds given, each in [0, 2**63)
    (`row_seed` works modulo 2**64: -1 or 2**64 would silently be another seed's draws);
    TypeError or ValueError naming `seed` otherwise."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if problem := protocol.seed_problem(seed):
            raise ValueError(problem)
        return [row_seed(seed, r) for r in range(n)]
    seeds = seed.tolist() if isinstance(seed, (np.ndarray, Tensor)) else seed
    if isinstance(seeds, (list, tuple)) and len(seeds) == n and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < SEED_MAX for s in seeds):
        return [int(s) for s in seeds]
    what = f"seed must be an int, or a list of {n} ints in [0, 2**63) (one per row), got {seed!r}"[:300]
    raise (ValueError if isinstance(seeds, (list, tuple)) else TypeError)(what)


def check_steps(steps) -> int:
    """`steps` (latents to generate) as an int >= 0; TypeError or ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer >= 0 (latents to generate), got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (latents to generate), got {steps}")
    return int(steps)


def as_prompt(x, name: str, shape: str, audio: bool) -> Tensor:
    """A prompt given as a tensor or a numpy array, as a tensor; TypeError naming `name` (of the
    expected `shape`) if it is neither or not floating point, ValueError if it holds NaN or inf
    (they would poison the caches) or peaks beyond `model.audio.MAX_SAMPLE_MAGNITUDE` for `audio`
    (int16 PCM made float without / 32768: the codec makes non-finite latents of it), beyond
    `MAX_LATENT_MAGNITUDE` for latents. One reduction and one host sync, at the entry of a call."""
    hint = " (int16 PCM: divide by 32768, or model.protocol.pcm_to_float)" if audio else ""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point {shape}, got numpy {x.dtype}{hint}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point {shape}, got {x.dtype}{hint}")
    peak = float(x.abs().amax()) if x.numel() else 0.0
    if not math.isfinite(peak):
        raise ValueError(f"{name} holds NaN or infinite values")
    if audio and peak > MAX_SAMPLE_MAGNITUDE:
        raise ValueError(f"{name} peaks at {peak:.4g}, beyond {MAX_SAMPLE_MAGNITUDE:g} (full scale is 1): "
                         "int16 PCM made float? divide it by 32768")
    if not audio and peak > MAX_LATENT_MAGNITUDE:
        raise ValueError(f"{name} peaks at {peak:.4g}, beyond {MAX_LATENT_MAGNITUDE:g}: codec latents are about unit "
                         "scale (the model would overflow to NaN); pass the codec's latents (encode_frames)")
    return x


class Generator(Engine):
    """Completions of B prompts at once (mono or duplex), reusable across calls.

    On CUDA, a step (LM -> token -> resynthesizer -> latent, for all rows) is a CUDA graph per
    attention window, captured on first use; `compile=True` (or "auto", on CUDA) also compiles the
    transformer block with torch.compile (slower start, faster steps). `max_len`: context in
    latents (default: the model's), `keep`: latents kept by a slide (default 3/4 of it),
    `kv_dtype`: of the KV caches (None or "auto": the weights'; "fp8": float8, `model.transformer`).
    The state, kernels and graphs are built by `model.decode.Engine`.
    """

    def __init__(self, model, batch_size: int = 1, max_len: Optional[int] = None, keep: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, compile: Union[bool, str, Sequence[str]] = False,
                 kv_dtype: Union[str, torch.dtype, None] = None):
        super().__init__(model, batch_size, max_len, keep, kv_dtype, compile, cuda_graphs)
        self.codec = model.codec
        self.x = torch.zeros(batch_size, 1, model.config.channels * model.config.latent_dim,
                             device=self.state.pos.device, dtype=self.state.hist.dtype)

    def _step(self, key: StepKey) -> None:
        nxt, _ = decode_step(self.model, self.state, self.x, key.window, kernels=self.kernels, top_p=key.top_p)
        self.x.copy_(torch.where(self.state.active[:, None, None], nxt[:, None], self.x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                 seed: Union[int, Sequence[int]] = 0, progress: bool = False) -> Tensor:
        """prompt (B, T, C*Z) latent frames (T >= 1) -> (B, T + steps, C*Z): the prompt, then
        `steps` generated frames. `seed`: one int (row r draws with `row_seed(seed, r)`) or one
        seed per row. Beyond the context the rows slide (`model.decode`)."""
        B, D = self.state.batch_size, self.x.shape[2]
        prompt = as_prompt(prompt, "prompt", f"({B}, T, {D})", audio=False)
        if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != D:
            raise ValueError(f"prompt must be ({B}, T, {D}), got {tuple(prompt.shape)}")
        self._check_length(prompt.shape[1])
        return self._generate(prompt, check_steps(steps), as_params(params, B), row_seeds(seed, B), progress)

    def _check_length(self, T: int) -> None:
        if not 1 <= T <= self.state.max_len:
            raise ValueError(f"a prompt of {T} latents does not fit the context of {self.state.max_len}"
                             + (": trim it" if T else ""))

    def _generate(self, prompt: Tensor, steps: int, params: list[SamplingParams], seeds: list[int],
                  progress: bool) -> Tensor:
        """`generate` on checked arguments: one parameter set and one seed per row."""
        st, B, T = self.state, self.state.batch_size, prompt.shape[1]
        prompt = prompt.to(device=self.x.device, dtype=self.x.dtype)
        top_p = any(p.top_p < 1 for p in params)
        for r, p in enumerate(params):
            st.reset(r, seeds[r], p)
            self.x[r] = prompt_prefill(self.model, st.row(r), prompt[r])[0]
        st.active.fill_(True)
        out = torch.empty(B, T + steps, self.x.shape[2], device=self.x.device, dtype=self.x.dtype)
        out[:, :T] = prompt
        bar = _progress(steps, progress)
        for s in range(steps):
            if st.host_pos[0] >= st.max_len:
                for r in range(B):
                    slide(self.model, st.row(r), self.keep)
            self.graphs.run(self._step, self.graphs.key(int(st.host_pos[0]) + 1, top_p))
            st.host_pos += 1
            out[:, T + s] = self.x[:, 0]
            bar.update(1)
        bar.close()
        return out

    @torch.no_grad()
    def complete(self, audio: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                 seed: Union[int, Sequence[int]] = 0, encode: str = "sample", progress: bool = False) -> Tensor:
        """Prompt audio (B, C, N) at 16 kHz, float in [-1, 1], a tensor or numpy array (C = 2
        for duplex: [speaker 0, speaker 1]; N is cut to whole 2000-sample frames, at least one)
        -> (B, C, 2000 (N // 2000 + steps)) float32: the prompt as the codec reconstructs it, then
        the completion. Every argument is checked before any encoding: a TypeError or ValueError
        naming it."""
        latents = self.complete_latents(audio, steps, params, seed, encode, progress)
        return decode_frames(self.codec, latents, self.model.config.channels)

    @torch.no_grad()
    def complete_latents(self, audio: Tensor, steps: int, params: ParamsLike = SamplingParams(),
                         seed: Union[int, Sequence[int]] = 0, encode: str = "sample", progress: bool = False) -> Tensor:
        """`complete` before its decoding: (B, N // 2000 + steps, C*Z) latent frames, the prompt's
        then the generated ones, which `decode_frames(gen.codec, latents, C)` makes `complete`'s
        audio; a caller checks them first, to tell the transformer's overflow from the codec's."""
        if self.codec is None:
            raise ValueError("this model has no codec: load it with codec=... or use generate() on latents")
        B, C, hop = self.state.batch_size, self.model.config.channels, self.codec.hop_length
        audio = as_prompt(audio, "prompt audio", f"({B}, {C}, N)", audio=True)
        if audio.dim() != 3 or audio.shape[1] != C:
            kind = "a duplex model ([speaker 0, speaker 1])" if C == 2 else "a mono model"
            raise ValueError(f"prompt audio must be (B, {C}, N) for {kind}, got {tuple(audio.shape)}")
        if audio.shape[0] != B:
            raise ValueError(f"prompt audio holds {audio.shape[0]} prompts, this Generator was made for "
                             f"batch_size={B}")
        if audio.shape[-1] < hop:
            raise ValueError(f"prompt audio of {audio.shape[-1]} samples is shorter than one latent "
                             f"({hop} samples, {hop / self.model.config.sample_rate:g} s)")
        self._check_length(audio.shape[-1] // hop)
        steps, params, seeds = check_steps(steps), as_params(params, B), row_seeds(seed, B)
        audio = audio[..., :audio.shape[-1] // hop * hop].to(self.x.device)
        frames = encode_frames(self.codec, audio, encode, torch.tensor(seeds, device=self.x.device))
        return self._generate(frames, steps, params, seeds, progress)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    """A tqdm bar over `total` latents, or a bar that shows nothing."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, unit="latent")
    return _NoBar()
