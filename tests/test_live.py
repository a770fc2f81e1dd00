"""The live duplex engine (LiveEngine) on a tiny random model, float32, CPU: batched sessions equal
the same sessions run alone; resets, warm starts and paused rows leave the other rows untouched;
a row past the context slides and goes on; the matrix-product streaming codec equals the codec."""
import dataclasses

import numpy as np
import pytest
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS
from model import Codec, HertzDev, SamplingParams, build
from model.live import LiveEngine

from conv_stream import ConvStreamCodec

TOL = 1e-5
STEPS = 12
PARAMS = [SamplingParams(), SamplingParams(token_temp=0.5, top_p=0.9),
          SamplingParams(mixture_temp=0, gaussian_temp=0.3)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=True)).eval()
    m.codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    return m


def signal(n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rows, 2000, generator=g) * 0.1


PROMPTS = [signal(1, 2, 7)[0].reshape(2, 1, 2000).repeat(1, 1, 3).reshape(2, 6000), None, signal(1, 2, 8)[0]]


def start(engine, row, i):
    engine.reset(row, PARAMS[i], seed=100 + i, prompt=PROMPTS[i])


@torch.no_grad()
def test_batched_sessions_equal_sessions_alone(model):
    user = signal(STEPS, 3, 1)
    batched = LiveEngine(model, max_sessions=3)
    for r in range(3):
        start(batched, r, r)
    out = torch.stack([batched.step(u) for u in user])  # (steps, 3, 2000)
    assert out.shape == (STEPS, 3, 2000) and out.abs().sum() > 0
    for r in range(3):
        alone = LiveEngine(model, max_sessions=1)
        start(alone, 0, r)
        one = torch.stack([alone.step(u[r:r + 1]) for u in user])
        assert (one[:, 0] - out[:, r]).abs().max() <= TOL
    # warm start: 3 prompt frames = 2 prefilled, the last one stepped; then one frame per step
    assert batched.positions.tolist() == [3 + STEPS, STEPS, 1 + STEPS]
    assert np.array_equal(batched.state.pos.numpy(), batched.positions)


@torch.no_grad()
def test_reset_and_warm_start_leave_other_rows_untouched(model):
    user = signal(STEPS, 2, 2)
    ref = LiveEngine(model, max_sessions=2)
    start(ref, 0, 0)
    start(ref, 1, 1)
    want = torch.stack([ref.step(u) for u in user])

    e = LiveEngine(model, max_sessions=2)
    start(e, 0, 0)
    start(e, 1, 2)  # another session in row 1 first ...
    got = [e.step(u) for u in user[:4]]
    e.release(1)
    start(e, 1, 1)  # ... replaced mid-stream: a fresh session, warm-started or not
    got += [e.step(torch.cat([u[:1], v[1:]])) for u, v in zip(user[4:], user)]
    got = torch.stack(got)
    assert (got[:, 0] - want[:, 0]).abs().max() <= TOL  # row 0 never noticed
    assert (got[4:, 1] - want[:STEPS - 4, 1]).abs().max() <= TOL  # row 1 is a brand-new session


@torch.no_grad()
def test_inactive_rows_are_frozen(model):
    user = signal(STEPS, 2, 3)
    ref = LiveEngine(model, max_sessions=2)
    start(ref, 0, 0)
    start(ref, 1, 2)
    want = torch.stack([ref.step(u) for u in user])
    e = LiveEngine(model, max_sessions=2)
    start(e, 0, 0)
    start(e, 1, 2)
    got, k = [], 0
    for i in range(STEPS + 3):  # row 1 pauses for steps 3..5, then goes on where it was
        paused = 3 <= i < 6
        u = torch.stack([user[min(i, STEPS - 1), 0], user[k, 1]])
        out = e.step(u, active=[True, not paused])
        if paused:
            assert out[1].abs().max() == 0
        else:
            got.append(out[1])
            k += 1
        if k == STEPS:
            break
    assert (torch.stack(got) - want[:, 1]).abs().max() <= TOL
    free = e.step(torch.zeros(2, 2000), active=[True, False])
    e.release(0)
    assert e.step(torch.zeros(2, 2000), active=[True, False]).abs().max() == 0  # nothing occupied
    assert free[0].abs().max() > 0


@torch.no_grad()
def test_row_paused_at_the_end_of_its_context(model):
    """An occupied row that waits (no chunk) exactly at the end of its context neither breaks the
    steps of the other rows nor changes its own output when it resumes."""
    L, keep = 16, 8
    user = signal(2 * L, 2, 5)
    ref = LiveEngine(model, max_sessions=2, max_len=L, keep=keep)
    start(ref, 0, 1)
    want = [ref.step(torch.stack([user[i, 0], user[i, 1]]))[0] for i in range(L + 4)]
    e = LiveEngine(model, max_sessions=2, max_len=L, keep=keep)
    start(e, 0, 1)
    start(e, 1, 1)
    got, k = [], 0
    for i in range(L + 8):
        paused = L <= i < L + 4 and e.positions[0] == L  # row 0 waits at the end of its context
        out = e.step(torch.stack([user[k, 0], user[i % L, 1]]), active=[not paused, True])
        if not paused:
            got.append(out[0])
            k += 1
        assert torch.isfinite(out).all()
        if k == L + 4:
            break
    assert (torch.stack(got) - torch.stack(want)).abs().max() <= TOL


@torch.no_grad()
def test_context_overflow_slides_the_row_only(model):
    """A row at the end of its context keeps its last `keep` frames and goes on; a row beside it
    that is far from its end is not disturbed."""
    L, keep = 16, 8
    user = signal(2 * L, 2, 4)
    e = LiveEngine(model, max_sessions=2, max_len=L, keep=keep)
    start(e, 0, 1)
    outs, pos0 = [], []
    for i, u in enumerate(user):
        if i == L - 4:
            start(e, 1, 1)  # row 1 starts late: it never reaches the end
        outs.append(e.step(u))
        pos0.append(int(e.positions[0]))
    assert max(pos0) == L and pos0[L] == keep + 1  # slid from L back to keep, then stepped
    assert torch.isfinite(torch.stack(outs)).all()
    alone = LiveEngine(model, max_sessions=1, max_len=L, keep=keep)
    start(alone, 0, 1)
    late = torch.stack([alone.step(u[1:]) for u in user[L - 4:]])
    assert (late[:, 0] - torch.stack(outs[L - 4:])[:, 1]).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("prompted", [False, True], ids=["no-prompt", "prompt"])
def test_replies_are_the_whole_decode_of_the_model_channel(model, prompted):
    """The model's audio, streamed reply by reply, equals the codec's decode of the model channel's
    latents in one piece: the prompt's frames, the frame the reset left pending (its audio is what
    reset returns), then each step's. The pending latent never went through the decoder stream, so
    after every reset the decoder went from the prompt's last frame (or nothing) straight to the
    frame after the pending one, and for about 2 s (its receptive field) the replies differed
    from the decode of the same latents."""
    from model.stream_codec import decode_frames
    Z = PRESETS["tiny"].latent_dim
    e = LiveEngine(model, max_sessions=2)
    e.reset(1, seed=4, prompt=PROMPTS[0])  # another session beside it
    pending = e.reset(0, seed=3, prompt=PROMPTS[2] if prompted else None)
    t0 = int(e.positions[0])
    replies = torch.cat([e.step(u)[0] for u in signal(20, 2, 9)])
    frames = torch.cat([e.state.hist[0, :int(e.positions[0])], torch.cat([torch.zeros(1, Z), e.m[0]], -1)])
    whole = decode_frames(model.codec, frames[None], 2)[0, 1]  # the model channel, decoded whole
    if not prompted:  # the silence latent the session starts from
        assert torch.equal(frames[0, Z:], e.silence[0])
    assert pending.shape == (2000,) and pending.dtype == torch.float32
    assert (pending - whole[2000 * t0:2000 * (t0 + 1)]).abs().max() <= TOL
    assert (replies - whole[2000 * (t0 + 1):]).abs().max() <= TOL * max(1.0, float(whole.abs().max()))


@torch.no_grad()
def test_codec_implementations_agree(model):
    """The live step with the matrix-product streaming codec equals the one with the module codec."""
    user = signal(6, 2, 5)
    outs = []
    for codec in (None, ConvStreamCodec(model.codec)):
        e = LiveEngine(model, max_sessions=2, codec=codec)
        start(e, 0, 0)
        start(e, 1, 2)
        outs.append(torch.stack([e.step(u) for u in user]))
    assert (outs[0] - outs[1]).abs().max() <= TOL


def test_bad_arguments(model):
    e = LiveEngine(model, max_sessions=2)
    with pytest.raises(ValueError):
        e.step(torch.zeros(3, 2000))
    with pytest.raises(IndexError):
        e.reset(2)
    with pytest.raises(ValueError):
        e.reset(0, prompt=torch.zeros(1, 4000))  # a live prompt has two channels
    # int16 PCM, as such or made float without / 32768, and NaN: refused naming the prompt, the row untouched
    pcm = (PROMPTS[2] * 32767).round()
    for bad, error, message in ((pcm.to(torch.int16), TypeError, "prompt must be floating point"),
                                (pcm, ValueError, "prompt peaks at"),
                                (PROMPTS[2].clone().index_fill_(1, torch.tensor([7]), float("nan")), ValueError,
                                 "prompt holds NaN"),
                                (PROMPTS[2].numpy().astype("int16"), TypeError, "prompt must be floating point")):
        with pytest.raises(error, match=message):
            e.reset(0, prompt=bad)
    with pytest.raises(ValueError, match="prompt_latents holds NaN"):
        e.reset(0, prompt_latents=torch.full((2, 2 * PRESETS["tiny"].latent_dim), float("nan")))
    e.reset(0, prompt=PROMPTS[2].numpy())  # float numpy audio is taken as the tensor is
    with pytest.raises(ValueError):
        e.set_params(0, SamplingParams(gaussian_temp=float("nan")))
    # a dict of parameters, a seed that is not an int in range, a row that is a bool: named, as the
    # Generator names them (a dict was an AttributeError, 1.9 and "12" were seeds 1 and 12, True row 1)
    for call, error, message in ((lambda: e.reset(0, {"token_temp": 0.5}), TypeError, r"SamplingParams\(\*\*params\)"),
                                 (lambda: e.set_params(0, {"token_temp": 0.5}), TypeError, "params must be"),
                                 (lambda: e.reset(0, seed=1.9), TypeError, "seed must be an int"),
                                 (lambda: e.reset(0, seed="12"), TypeError, "seed must be an int"),
                                 (lambda: e.reset(0, seed=-1), ValueError, "seed must be an int in"),
                                 (lambda: e.reset(True), TypeError, "row must be an int")):
        with pytest.raises(error, match=message):
            call()
    # user chunks: NaN, inf, int16 PCM as such or made float without / 32768 left the session NaN
    # until a reset, without a word; and an index list as `active` ([1]: row 1) stepped every row
    e.reset(0, seed=1)
    e.reset(1, seed=2)
    chunks = signal(1, 2, 3)[0]
    before = e.positions.tolist()
    for bad, error, message in ((chunks.clone().index_put_((torch.tensor([1]), torch.tensor([5])),
                                                           torch.tensor(float("nan"))), ValueError, "holds NaN"),
                                (chunks.clone().fill_(float("inf")), ValueError, "holds NaN or infinite"),
                                ((chunks * 32767).round(), ValueError, "user_chunks peaks at"),
                                ((chunks * 32767).round().numpy().astype("int16"), TypeError, "int16 PCM")):
        with pytest.raises(error, match=message):
            e.step(bad)
    for active in ([1], [True], np.array([0, 1]), np.ones(3, dtype=bool)):
        with pytest.raises(ValueError, match=r"active must be a \(2,\) bool mask"):
            e.step(chunks, active=active)
    assert e.positions.tolist() == before  # no row moved
    e.step(chunks, active=np.array([False, True]))
    assert e.positions.tolist() == [before[0], before[1] + 1]
    mono = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=False))
    mono.codec = model.codec
    with pytest.raises(ValueError, match="duplex"):
        LiveEngine(mono)


@torch.no_grad()
def test_warm_start_from_latents(model):
    """Prompt latents computed once (e.g. for many sessions) warm-start a row as its audio does."""
    from model.stream_codec import encode_frames

    a, b = LiveEngine(model, max_sessions=2), LiveEngine(model, max_sessions=2)
    a.reset(1, PARAMS[0], seed=5, prompt=PROMPTS[2])
    frames = encode_frames(model.codec, PROMPTS[2][None], "sample", torch.tensor([5]))[0]
    b.reset(1, PARAMS[0], seed=5, prompt_latents=frames)
    assert torch.equal(a.m[1], b.m[1]) and a.positions.tolist() == b.positions.tolist() == [0, 1]
    with pytest.raises(ValueError):
        b.reset(0, prompt=PROMPTS[2], prompt_latents=frames)
