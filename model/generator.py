"""Completions: B prompts (latent frames or audio) continued at once, mono or duplex.

    gen = Generator(model, batch_size=1)
    audio = gen.complete(prompt_audio, steps=160, params=SamplingParams(), seed=0)
    latents = gen.generate(prompt_latents, steps=160)

Each row is prefilled with its prompt, then every step is one `decode_step` for all rows (on
CUDA a CUDA graph per attention window); rows reaching the context slide (`model.decode`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .cuda_graphs import StepKey
from .decode import Engine, decode_step, prompt_prefill, slide
from .sampling import SamplingParams, row_seed
from .stream_codec import decode_frames, encode_frames

ParamsLike = Union[SamplingParams, Sequence[SamplingParams]]


def completion_steps(seconds: float, sample_rate: int = 16000, hop: int = 2000) -> int:
    """Latents of a continuation of `seconds` (rounded; at least one)."""
    return max(1, round(seconds * sample_rate / hop))


def completion_problem(seconds, num, cfg=None, device=None, dtype: Optional[torch.dtype] = None,
                       kv_dtype: Union[str, torch.dtype, None] = None,
                       names: tuple[str, str] = ("--seconds", "--num"), hop: int = 2000) -> Optional[str]:
    """Why `num` completions of `seconds` each cannot be made, or None: the scripts' check of their
    length and count (`names`: how they are called there), before any weights load.

    `seconds` must be a finite number > 0 and `num` an integer >= 1. With the model's `cfg` and
    the `device` and `dtype` it will run in, they must also fit its memory: the decode state
    (`num` rows of KV caches at full context, `DecodeState.make` on a `meta` build) and the
    completions' audio (float32, held whole on the device, then on the host to be written) must
    each be less than the device's (and the host's) memory. There is no limit on length beyond
    that: past the context a row slides (`model.decode.slide`)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        return f"{names[0]} must be a finite number > 0, got {seconds!r}"
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        return f"{names[1]} must be an integer >= 1, got {num!r}"
    if cfg is None:
        return None
    from .decode import DecodeState
    from .loading import HertzDev
    with torch.device("meta"):
        model = HertzDev(cfg).to(dtype or torch.float32)
    kv = DecodeState.make(model, num, kv_dtype=kv_dtype).kv_bytes
    audio = num * cfg.channels * hop * (completion_steps(seconds, cfg.sample_rate, hop) + 1) * 4  # and a prompt latent
    device = torch.device(device or "cpu")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [(f"this machine's memory ({host / 1e9:.1f} GB)", host, audio + (kv if device.type == "cpu" else 0))]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limits.append((f"{device}'s memory ({total / 1e9:.1f} GB)", total, kv + audio))
    for where, have, need in limits:
        if need > have:
            return (f"{names[1]} {num} x {names[0]} {seconds:g} need at least {need / 1e9:.3g} GB (KV caches "
                    f"{kv / 1e9:.3g} GB, audio {audio / 1e9:.3g} GB), more than {where}: ask for fewer or shorter "
                    "completions (any length fits the context, which slides)")
    return None


def as_params(params: ParamsLike, n: int) -> list[SamplingParams]:
    """One SamplingParams for each of `n` rows: the one given for all, or a list of n."""
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameter sets for {n} rows")
    return params


def row_seeds(seed: Union[int, Sequence[int]], n: int) -> list[int]:
    """Each row's seed: `row_seed(seed, r)` for one int, or the n seeds given."""
    return [row_seed(seed, r) for r in range(n)] if isinstance(seed, int) else [int(s) for s in seed]


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
        st, B = self.state, self.state.batch_size
        if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != self.x.shape[2]:
            raise ValueError(f"prompt must be ({B}, T, {self.x.shape[2]}), got {tuple(prompt.shape)}")
        T = prompt.shape[1]
        if not 1 <= T <= st.max_len:
            raise ValueError(f"a prompt of {T} latents does not fit the context of {st.max_len}: trim it")
        seeds = row_seeds(seed, B)
        prompt = prompt.to(device=self.x.device, dtype=self.x.dtype)
        params = as_params(params, B)
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
        """Prompt audio (B, C, N) at 16 kHz (C = 2 for duplex: [speaker 0, speaker 1]; N is cut
        to whole 2000-sample frames) -> (B, C, 2000 (N // 2000 + steps)) float32: the prompt as
        the codec reconstructs it, then the completion."""
        if self.codec is None:
            raise ValueError("this model has no codec: load it with codec=... or use generate() on latents")
        C, hop = self.model.config.channels, self.codec.hop_length
        if audio.dim() != 3 or audio.shape[1] != C:
            raise ValueError(f"prompt audio must be (B, {C}, N), got {tuple(audio.shape)}")
        seeds = row_seeds(seed, audio.shape[0])
        audio = audio[..., :audio.shape[-1] // hop * hop].to(self.x.device)
        frames = encode_frames(self.codec, audio, encode, torch.tensor(seeds, device=self.x.device))
        latents = self.generate(frames, steps, params, seeds, progress)
        return decode_frames(self.codec, latents, C)


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
