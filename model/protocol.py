"""The live-conversation protocol and the sampling-parameter ranges (with a seed's, and a
completion's length and count), in one numpy-only module.

Imported by the server, the clients (which run without torch), the benchmark, the tests,
`complete.py` and the notebook, so that every entry point validates the same way.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Iterable, Mapping

import numpy as np

SAMPLE_RATE = 16000
CHUNK = 2000                          # samples per step: one latent, 125 ms
CHUNK_BYTES = 2 * CHUNK               # 16-bit PCM
TEXT_PREFIX = "data:audio/raw;base64,"  # the original server's audio text frames

# Websocket close codes of the live server (RFC 6455 and the IANA registry; 4000-4999 are ours).
CLOSE_BAD_DATA = 1007     # a text message that is not UTF-8
CLOSE_POLICY = 1008       # no valid token, too many bad messages or pings, or a client that does not read its replies
CLOSE_TOO_BIG = 1009      # a message over the server's --max-message-bytes (from the websocket layer)
CLOSE_INTERNAL = 1011     # the engine failed for this session
CLOSE_RESTART = 1012      # the server is shutting down (or restarting), with SHUTDOWN_REASON
CLOSE_TRY_AGAIN = 1013    # every slot is taken: try again later
CLOSE_IDLE = 4408         # no audio for the server's --idle-timeout seconds (as HTTP 408)
SHUTDOWN_REASON = "the server is shutting down"

# Websocket pings a connection may send: PING_BURST at once, then PING_RATE a second (a token bucket);
# one more closes it with CLOSE_POLICY. The websocket layer answers each ping at once, out of the app's
# sight, so a client pinging flat out (43,000 pings in one read) held the event loop and every session.
# Keepalives ping every few seconds at most (websockets' clients: every 20 s).
PING_RATE = 5.0
PING_BURST = 10

# Audio faster than real time: the server reads a session's chunks at most AUDIO_PACE times real time (10 a
# second), after AUDIO_BURST at once (a token bucket: a client catching up after the network held its audio
# back, 2 s of it, passes at once); beyond it the server stops reading that session until it is within them
# again, so TCP slows the sender at no cost to the server. A client sending flat out had every chunk parsed,
# queued and dropped, taking the event loop's time from every other session; one faster than real time on
# purpose (inference_client.py --no-realtime) is slowed to this pace. The quarter beyond real time lets a
# sound card whose clock runs fast, and a backlog beyond the burst, through.
AUDIO_PACE = 1.25
AUDIO_BURST = 16

# Seconds a client waits for the server before it gives up on it: the handshake, and the reply to its
# oldest unanswered chunk (inference_client.py's --reply-timeout default, the browser page's).
REPLY_TIMEOUT_S = 10.0



def wait_up(seconds: float, digits: int = 1) -> float:
    """A wait the server tells a client (`retry_after`, "try again in N s"), rounded up to `digits`
    decimals: never shorter than the real one, so a client that waits as told is not early (and a
    positive wait is never said as 0.0 s)."""
    scale = 10 ** digits
    return math.ceil(max(seconds, 0.0) * scale - 1e-9) / scale


# The clients' adaptive jitter buffer (the browser page's audio worklet and inference_client.py's
# Speaker), in milliseconds: after silence a reply starts playing `margin` after it arrived
# (marginStartMs at first); each underrun grows the margin by growMs, up to marginMaxMs; after
# shrinkAfterMs without one it shrinks by shrinkMs, down to the start, dropping up to shrinkMs of
# what the buffer held beyond it. The buffer holds at most the margin plus two chunks.
JITTER: dict[str, float] = {"marginStartMs": 20, "marginMaxMs": 250, "growMs": 20, "shrinkMs": 10,
                            "shrinkAfterMs": 5000}

# Sampling parameters: name -> (low, high, low inclusive, high inclusive, what it is).
PARAM_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "token_temp": (0.0, 5.0, True, True, "LM softmax temperature (0 = greedy)"),
    "top_p": (0.0, 1.0, False, True, "nucleus mass kept"),
    "min_p": (0.0, 1.0, True, False, "drop tokens below min_p * p_max"),
    "mixture_temp": (0.0, 5.0, True, True, "temperature of the mixture component choice"),
    "gaussian_temp": (0.0, 5.0, True, True, "scale of the Gaussian noise around the component"),
}
PARAM_NAMES = tuple(PARAM_RANGES)


# URL query parameters: the websocket's `?seed=` and `/health`'s `?window=` (and `?token=` everywhere).
SEED_MAX = 2 ** 63  # seeds are integers in [0, SEED_MAX)
_DECIMAL = re.compile(r"[0-9]{1,32}(\.[0-9]{0,32})?")


def query_params(pairs: Iterable[tuple[str, str]], known: Iterable[str]) -> dict[str, str]:
    """A URL query's (name, value) pairs as {name: value}; ValueError naming the first parameter
    that is not one of `known` (nor `token`), is given twice, or is empty."""
    known = ("token", *known)
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in known:
            raise ValueError(f"unknown query parameter {ascii(name)[:24]}; known: {', '.join(known)}")
        if name in out:
            raise ValueError(f"query parameter {name} given twice")
        if not value:
            raise ValueError(f"query parameter {name} is empty")
        out[name] = value
    return out


def seed_problem(seed) -> str | None:
    """Why `seed` is not one seed (an int in [0, SEED_MAX): `model.sampling.row_seed` works
    modulo 2**64, so -1 or 2**64 would silently be another seed's draws), or None."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < SEED_MAX:
        return None
    return f"seed must be an int in [0, 2**63), got {seed}"[:300]


def completion_problem(seconds, num, names: tuple[str, str] = ("--seconds", "--num")) -> str | None:
    """Why `num` completions of `seconds` each cannot be asked for, or None: `seconds` must be a
    finite number > 0 (numpy's scalars too) and `num` an integer >= 1 (`names`: how they are called
    where they are given). What they need of a machine's memory is
    `model.generator.completion_problem`'s."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        return f"{names[0]} must be a finite number > 0, got {seconds!r}"[:300]
    try:
        x = float(seconds)
    except OverflowError:  # an int beyond a float's range (10**400): completion_steps' OverflowError, naming nothing
        return f"{names[0]} must be a finite number > 0, got an integer too large"
    if not 0 < x < math.inf:
        return f"{names[0]} must be a finite number > 0, got {seconds!r}"[:300]
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 1:
        return f"{names[1]} must be an integer >= 1, got {num!r}"[:300]
    return None


def query_seed(text: str) -> int:
    """`?seed=` as an int: plain decimal digits in [0, SEED_MAX) (no sign, space, underscore or
    other digits that int() takes); ValueError naming it."""
    if not (_DECIMAL.fullmatch(text) and "." not in text and int(text) < SEED_MAX):
        raise ValueError(f"seed must be a decimal integer in [0, 2**63), got {ascii(text)[:24]}")
    return int(text)


def query_window(text: str) -> float:
    """`/health?window=` seconds: a plain decimal number > 0; ValueError naming it."""
    if not (_DECIMAL.fullmatch(text) and float(text) > 0):
        raise ValueError(f"window must be a decimal number of seconds > 0, got {ascii(text)[:24]}")
    return float(text)


_TOKEN_IN_TEXT = re.compile(r"(token=|bearer\s+)[^\s&\"']+", re.IGNORECASE)


def redact_tokens(text: str) -> str:
    """`text` with the value of every `token=...` (a URL's query) and `Bearer ...` (a header)
    replaced by REDACTED: what the server logs and the client prints never shows a token."""
    return _TOKEN_IN_TEXT.sub(r"\1REDACTED", text)


def describe_range(name: str) -> str:
    lo, hi, lo_in, hi_in, _ = PARAM_RANGES[name]
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_param(name: str, value) -> float:
    """The value as a float, or ValueError naming the parameter and its documented range.
    Refuses bools, non-numbers, integers too large for a float, non-finite values and values
    outside the range."""
    if name not in PARAM_RANGES:
        raise ValueError(f"unknown parameter {name!r}; known: {', '.join(PARAM_NAMES)}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in {describe_range(name)}, got {value!r}"[:200])
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a number in {describe_range(name)}, got an integer too large") from None
    lo, hi, lo_in, hi_in, _ = PARAM_RANGES[name]
    if not math.isfinite(x) or x < lo or x > hi or (x == lo and not lo_in) or (x == hi and not hi_in):
        raise ValueError(f"{name} must be in {describe_range(name)}, got {value!r}"[:200])
    return x


def check_params(values: Mapping[str, object]) -> dict[str, float]:
    """Every given parameter checked by `check_param`; returns {name: float}."""
    return {name: check_param(name, value) for name, value in values.items()}


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1] (the original's scale: / 32767)."""
    return np.clip(pcm.astype(np.float32) / 32767.0, -1.0, 1.0)


def float_to_pcm(audio: np.ndarray) -> np.ndarray:
    """float audio -> int16 little-endian PCM, clipped (no wrap-around on loud samples; NaN -> 0)."""
    a = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round(a * 32767.0), -32768, 32767).astype("<i2")


def percentiles(values, qs=(50, 99)) -> dict:
    """{"p50": ..., "p99": ...} rounded to 0.01, None where there are no values."""
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in qs}


def page_constants(defaults: Mapping[str, float]) -> str:
    """The constants the browser page (web/index.html) needs, as JSON safe inside a <script>
    element: sampleRate, chunk, textPrefix, jitter (`JITTER`), replyTimeoutS (`REPLY_TIMEOUT_S`), and
    for each parameter its range and `defaults` value:
    {"params": {name: {"min", "max", "minInclusive", "maxInclusive", "what", "default"}}}."""
    import json
    params = {name: {"min": lo, "max": hi, "minInclusive": lo_in, "maxInclusive": hi_in, "what": what,
                     "default": float(defaults[name])}
              for name, (lo, hi, lo_in, hi_in, what) in PARAM_RANGES.items()}
    text = json.dumps({"sampleRate": SAMPLE_RATE, "chunk": CHUNK, "textPrefix": TEXT_PREFIX, "jitter": JITTER,
                       "replyTimeoutS": REPLY_TIMEOUT_S, "params": params})
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
