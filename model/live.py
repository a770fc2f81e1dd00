"""The live duplex engine of the server: one batch row per session, one 2000-sample chunk in and
one out per step.

    live = LiveEngine(model, max_sessions=8)
    live.reset(row, params, seed, prompt=prompt_audio)         # a new session in a slot
    model_chunks = live.step(user_chunks)                      # (B, 2000) in -> (B, 2000) out

A step stream-encodes each row's user chunk, runs one `decode_step` (`model.decode`) for all rows
and stream-decodes the model's next latent; on CUDA the whole step is one CUDA graph per attention
window (`model.cuda_graphs`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .codec import Codec
from .cuda_graphs import StepKey
from .decode import Engine, decode_step, draw_noise, prompt_prefill, slide
from .generator import as_params, as_prompt
from .protocol import seed_problem
from .sampling import SamplingParams
from .stream_codec import StreamCodec, encode_frames


class LiveEngine(Engine):
    """Full-duplex conversation for `max_sessions` sessions at once, one batch row each.

    Channel 0 is the user, channel 1 the model (as the original server). Each `step` takes one
    2000-sample chunk (125 ms at 16 kHz) of user audio per row and returns one chunk of model
    audio per row: stream-encode the user chunk (a posterior draw, or its mean), pair it with the
    model's latent for that frame (predicted by the previous step), one LM + resynthesizer step
    for all rows, stream-decode the model's next latent. On CUDA the whole step is one CUDA graph
    per attention window.

    Rows are slots: `reset(row, ...)` starts a session there (optionally warm-started from a
    two-channel prompt), `release(row)` frees it. `step(..., active=mask)` advances only the
    masked occupied rows; the others are frozen (positions, codec streams, random streams and
    pending latents unchanged), e.g. while a client's audio has not arrived or a prompt is being
    replayed. A row reaching `max_len` slides (`model.decode`). Not thread-safe: call it from
    one thread (the server's GPU worker).

    Arguments: `max_sessions` rows; `max_len` context in latents (default: the model's, 2048) and
    `keep` latents kept by a slide (default 3/4 of it); `cuda_graphs` (default: on CUDA);
    `compile` ("auto": the transformer block with torch.compile on CUDA; False; or parts of
    COMPILABLE); `encode` "sample" (user latents drawn from the codec posterior, as the original
    tokenizer) or "mean"; `codec`: the streaming codec (default `StreamCodec(model.codec)`; any object
    with its `init_state` / `encode` / `decode` / `hop_length`); `kv_dtype` of the KV caches (None or
    "auto": the weights' dtype; "fp8": float8, half the bytes of bf16, `model.transformer`).
    """

    chunk = 2000

    def __init__(self, model, max_sessions: int = 8, max_len: Optional[int] = None, keep: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, compile: Union[bool, str, Sequence[str]] = "auto",
                 encode: str = "sample", codec=None, kv_dtype: Union[str, torch.dtype, None] = None):
        cfg = model.config
        if not cfg.duplex:
            raise ValueError("the live engine needs a duplex (two-channel) model")
        if model.codec is None:
            raise ValueError("the live engine needs the model's codec")
        if encode not in ("sample", "mean"):
            raise ValueError(f"encode must be 'sample' or 'mean', got {encode!r}")
        if model.codec.hop_length != self.chunk:
            raise ValueError(f"the codec has {model.codec.hop_length} samples per latent, expected {self.chunk}")
        super().__init__(model, max_sessions, max_len, keep, kv_dtype, compile, cuda_graphs, "max_sessions")
        self.encode, st = encode, self.state
        self.codec = StreamCodec(model.codec) if codec is None else codec
        B, Z, device, dtype = max_sessions, cfg.latent_dim, st.pos.device, st.hist.dtype
        self.enc, self.dec = self.codec.init_state(B, active=st.active.view(B, 1, 1))
        self.user = torch.zeros(B, self.chunk, device=device, dtype=dtype)   # static input
        self.audio = torch.zeros(B, self.chunk, device=device, dtype=torch.float32)  # static output
        self.m = torch.zeros(B, 1, Z, device=device, dtype=dtype)  # the model's latent of each row's pending frame
        with torch.no_grad():  # the model's first frame in a session without prompt: the latent of silence
            self.silence = model.codec.encode(torch.zeros(1, 1, self.chunk, device=device, dtype=dtype))[0][0]
        self.occupied = np.zeros(B, dtype=bool)
        self._top_p = np.zeros(B, dtype=bool)  # rows using top-p (host mirror: picks the graph)
        pinned = device.type == "cuda"
        self._user_host = torch.zeros(B, self.chunk, pin_memory=pinned)
        self._active_host = torch.zeros(B, dtype=torch.bool, pin_memory=pinned)
        self._audio_host = torch.zeros(B, self.chunk, pin_memory=pinned)
        st.active.zero_()

    @property
    def max_sessions(self) -> int:
        return self.state.batch_size

    @property
    def positions(self) -> np.ndarray:
        """Each row's position (frames in its context), host-side."""
        return self.state.host_pos.copy()

    def warmup(self) -> None:
        """Capture the CUDA graphs of every attention window now rather than on first use."""
        with torch.no_grad():
            self.graphs.capture(self._step)

    def _step(self, key: StepKey) -> None:
        model, st = self.model, self.state
        noise = draw_noise(model, st)
        mu, logvar = self.kernels.encode(self.codec, self.user, self.enc)  # (B, 1, Z)
        u = Codec.sample(mu, logvar, eps=noise.posterior[:, None]) if self.encode == "sample" else mu
        a = st.active[:, None, None]
        nxt, _ = decode_step(model, st, torch.cat([u, self.m], dim=-1), key.window, noise, self.kernels, key.top_p)
        m = nxt[:, None, self.m.shape[-1]:]
        self.m.copy_(torch.where(a, m, self.m))
        audio = self.kernels.decode(self.codec, m, self.dec).float()  # (B, 2000)
        self.audio.copy_(torch.where(a[:, 0], audio, 0))

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    @torch.no_grad()
    def reset(self, row: int, params: SamplingParams = SamplingParams(), seed: Optional[int] = None,
              prompt: Optional[Tensor] = None, prompt_latents: Optional[Tensor] = None) -> Tensor:
        """Start a session in slot `row`: position 0, fresh codec streams, `params`, and `seed`
        (None: a fresh random one). Other rows are not disturbed. Returns the model's audio of
        the frame the session continues from, (2000,) float32 on the CPU: the decoder's output for
        the pending latent (the silence latent without a prompt; after a prompt, the frame the
        prompt predicted), which the decoder stream runs through, so the replies that follow it
        are the whole decode of the model channel's latents. It is not a reply: the first `step`
        answers with the frame after it (a recording of the conversation puts it beside the user's
        first chunk).

        Warm start, from `prompt` (2, N) audio at 16 kHz, [user, model] channels, N cut to whole
        2000-sample chunks: the prompt is encoded (priming the row's encoder and decoder streams),
        prefilled, and the model's next frame predicted, so the next `step` continues the
        conversation after it. Or from `prompt_latents` (T, 2 Z), e.g. `encode_frames` of a
        prompt computed once for many sessions: the same, but the user encoder starts fresh.

        Every piece of the row's state is cleared (KV caches, histories, codec streams, pending
        latent, random stream, parameters), so a session's output does not depend on what the
        row held before, even non-finite values. The arguments are checked before the row is
        touched: a ValueError or IndexError leaves it as it was."""
        self._check_row(row)
        as_params(params, 1)[0].validate()  # a dict: a TypeError naming params, as the Generator's
        if seed is not None and (problem := seed_problem(seed)):  # 1.9 or "12" were taken as 1 and 12
            raise (ValueError if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else TypeError)(problem)
        if prompt is not None and prompt_latents is not None:
            raise ValueError("give prompt audio or prompt latents, not both")
        st, hop, Z = self.state, self.chunk, self.m.shape[-1]
        if prompt is not None:  # float audio at full scale 1, finite (int16 PCM would be encoded 32768x too loud)
            prompt = as_prompt(prompt, "prompt", "(2, N) audio [user, model]", audio=True)
            if prompt.dim() != 2 or prompt.shape[0] != 2:
                raise ValueError(f"a live prompt is (2, N) audio [user, model], got {tuple(prompt.shape)}")
            prompt = prompt[:, :prompt.shape[1] // hop * hop].to(self.user.device, self.user.dtype)
            if prompt.shape[1] == 0:
                raise ValueError("a live prompt needs at least one 2000-sample chunk")
            if prompt.shape[1] // hop > st.max_len:
                raise ValueError(f"a prompt of {prompt.shape[1] // hop} frames does not fit the context "
                                 f"of {st.max_len}")
        if prompt_latents is not None:
            frames = as_prompt(prompt_latents, "prompt_latents", f"(T, {2 * Z})", audio=False)
            frames = frames.to(self.user.device, self.user.dtype)
            if frames.dim() != 2 or frames.shape[1] != 2 * Z or not 1 <= frames.shape[0] <= st.max_len:
                raise ValueError(f"prompt latents must be (T, {2 * Z}) with 1 <= T <= {st.max_len}, "
                                 f"got {tuple(frames.shape)}")
        seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else int(seed)
        if prompt is not None:  # before the row is touched: latents the model cannot take are a ValueError
            frames = encode_frames(self.model.codec, prompt[None], self.encode, st.seed.new_tensor([seed]))[0]  # (T, 2 Z)
        view = st.row(row)
        st.reset(row, seed, params)  # its KV caches, frames and tokens zeroed too
        self._top_p[row] = params.top_p < 1
        self.enc.reset(slice(row, row + 1))
        self.dec.reset(slice(row, row + 1))
        self.user[row] = 0
        self.audio[row] = 0
        self.occupied[row] = True
        if prompt is None and prompt_latents is None:
            self.m[row] = self.silence
        else:
            x = prompt_prefill(self.model, view, frames)
            nxt, _ = decode_step(self.model, view, x, self.graphs.key(frames.shape[0], True).window)
            view.host_pos += 1
            self.m[row] = nxt[:, None, Z:][0]
            # Prime the row's codec streams: the encoder with the user channel, the decoder with the
            # model channel, so the next chunks continue the prompt's signals.
            if prompt is not None:
                self.codec.encode(prompt[:1], self.enc.row(row))
            self.codec.decode(frames[None, :, Z:], self.dec.row(row))
        # ... and with the pending frame: the first step decodes the frame after it, which without
        # this followed the prompt's last frame (or nothing) with a frame's gap in the decoder's input
        return self.codec.decode(self.m[row:row + 1], self.dec.row(row)).float()[0].cpu()

    def release(self, row: int) -> None:
        """Free slot `row`; it is not stepped until the next `reset`."""
        self._check_row(row)
        self.occupied[row] = False
        self.state.host_pos[row] = 0
        self.state.pos[row] = 0

    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):  # True was row 1
            raise TypeError(f"row must be an int, a slot of this engine (0..{self.max_sessions - 1}), got {row!r}")
        if not 0 <= row < self.max_sessions:
            raise IndexError(f"row {row} is not a slot of this engine (0..{self.max_sessions - 1})")

    def set_params(self, row: int, params: SamplingParams) -> None:
        """Change a session's sampling parameters (effective from the next step); ValueError
        (row unchanged) for values outside their ranges."""
        self._check_row(row)
        params = as_params(params, 1)[0]
        self.state.params.set(row, params)  # validated there, before the row is written
        self._top_p[row] = params.top_p < 1

    @torch.no_grad()
    def step(self, user_chunks, active=None) -> Tensor:
        """user_chunks (B, 2000) float audio in [-1, 1] (a numpy array or tensor; rows of free or
        inactive slots are ignored) -> (B, 2000) float32 CPU tensor of model audio (zeros for
        rows not stepped). `active` (B,) bool: the occupied rows to advance (default: all).
        Blocks until the step's audio is on the host. Chunks that are not float audio (int16 PCM),
        or that hold NaN or inf or peak far beyond full scale, are a TypeError or ValueError before
        any row moves: one such sample would leave its session's codec stream and history
        non-finite, and its replies NaN, until a reset."""
        st, B = self.state, self.max_sessions
        chunks = as_prompt(user_chunks, "user_chunks", f"({B}, {self.chunk}) float audio", audio=True).float()
        if chunks.shape != (B, self.chunk):
            raise ValueError(f"user_chunks must be ({B}, {self.chunk}), got {tuple(chunks.shape)}")
        if active is not None:  # [1] (meant: row 1) broadcast to every row
            mask = np.asarray(active)
            if mask.dtype != bool or mask.shape != (B,):
                raise ValueError(f"active must be a ({B},) bool mask of the rows to step, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
        run = self.occupied.copy() if active is None else (self.occupied & mask)
        # Slide every occupied row at the end of its context, paused ones too: the attention window
        # covers all occupied rows, and a slide is what a paused row's own next step would do first.
        for r in np.flatnonzero(self.occupied & (st.host_pos >= st.max_len)):
            slide(self.model, st.row(int(r)), self.keep)
        self._user_host.copy_(chunks)
        self._active_host.copy_(torch.from_numpy(run))
        self.user.copy_(self._user_host, non_blocking=True)
        st.active.copy_(self._active_host, non_blocking=True)
        occupied_pos = st.host_pos[self.occupied]
        key = self.graphs.key(int(occupied_pos.max(initial=0)) + 1, bool((self._top_p & run).any()))
        self.graphs.run(self._step, key)
        st.host_pos += run
        self._audio_host.copy_(self.audio, non_blocking=True)
        if self._audio_host.is_pinned():
            torch.cuda.current_stream().synchronize()
        return self._audio_host.clone()
