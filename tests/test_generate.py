"""The completion engine (model/generator.py, model/decode.py) on tiny random models, float32, CPU.

Completions have the requested length; the same seed gives the same output; the cached engine
equals an uncached reference (full forwards every step) draw for draw; batch rows are
independent; a context slide continues exactly as a fresh prefill of the kept frames would.
"""
import copy
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS
from model import Codec, HertzDev, SamplingParams, build
from model.cuda_graphs import attention_windows
from model.decode import DecodeState, decode_step, prompt_prefill
from model.generator import Generator
from model.sampling import row_seed

from uncached import generate_uncached

TOL = 1e-4
PARAMS = [SamplingParams(), SamplingParams(token_temp=1.0, top_p=0.9, min_p=0.05, mixture_temp=1.0, gaussian_temp=0.3)]


def tiny(duplex: bool, **overrides) -> HertzDev:
    torch.manual_seed(0)
    model = build(HertzDev, dataclasses.replace(PRESETS["tiny"], duplex=duplex, **overrides)).eval()
    model.codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["mono", "duplex"])
def model(request):
    return tiny(request.param)


def prompt_latents(model, B=2, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 32 * model.config.channels, generator=g)


@torch.no_grad()
def test_completion_lengths_and_shapes(model):
    C = model.config.channels
    gen = Generator(model, batch_size=2)
    out = gen.generate(prompt_latents(model), 9, seed=0)
    assert out.shape == (2, 6 + 9, 32 * C) and torch.isfinite(out).all()
    audio = torch.randn(2, C, 2000 * 3 + 123) * 0.1  # cut to whole frames
    wav = gen.complete(audio, 5, seed=0)
    assert wav.shape == (2, C, 2000 * (3 + 5)) and wav.dtype == torch.float32 and torch.isfinite(wav).all()


@torch.no_grad()
def test_same_seed_same_output_other_seed_other_output(model):
    gen = Generator(model, batch_size=2)
    p = prompt_latents(model)
    a, b = gen.generate(p, 8, seed=5), gen.generate(p, 8, seed=5)
    c = Generator(model, batch_size=2).generate(p, 8, seed=5)  # a fresh engine too
    d = gen.generate(p, 8, seed=6)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a[:, 6:], d[:, 6:])
    assert torch.equal(a[:, :6], p)  # the prompt is returned as given


@torch.no_grad()
def test_a_call_does_not_depend_on_what_an_earlier_call_left_in_the_caches(model):
    """An earlier call whose prompt overflowed the KV caches (latents of 1e30: inf and NaN there),
    longer than the next call's: the next call equals a fresh engine's. A row's caches were not
    cleared between calls, and their stale slots past the new prompt, though masked, made every
    output NaN (0 * NaN in the attention). (`generate` now refuses such a prompt at its entry;
    the call past its checks stands for anything that leaves non-finite values behind.)"""
    p = prompt_latents(model, T=3)
    want = Generator(model, batch_size=2).generate(p, 4, seed=1)
    gen = Generator(model, batch_size=2)
    gen._generate(prompt_latents(model, T=20) * 1e30, 2, [SamplingParams()] * 2, [1, 2], False)
    assert not torch.isfinite(gen.state.lm.k).all()  # the earlier call did poison them
    assert torch.equal(gen.generate(p, 4, seed=1), want)


@pytest.mark.parametrize("params", PARAMS, ids=["default", "top_p-min_p"])
@torch.no_grad()
def test_cached_equals_uncached_reference(model, params):
    p = prompt_latents(model)
    cached = Generator(model, batch_size=2).generate(p, 12, params, seed=3)
    reference = generate_uncached(model, p, 12, params, seed=3)
    assert (cached - reference).abs().max() <= TOL


@torch.no_grad()
def test_rows_are_independent_of_the_batch(model):
    """Row r of a batch equals the same prompt generated alone with that row's seed, and each
    row may have its own sampling parameters. In float64: in float32 a batch of 3 and a batch of 1
    round matmuls differently (~1e-7), enough to flip a sampled token now and then."""
    model = copy.deepcopy(model).double()
    p = prompt_latents(model, B=3).double()
    params = [PARAMS[0], PARAMS[1], SamplingParams(token_temp=0, mixture_temp=0, gaussian_temp=0)]
    batch = Generator(model, batch_size=3).generate(p, 8, params, seed=11)
    alone = Generator(model, batch_size=1)
    for r in range(3):
        one = alone.generate(p[r:r + 1], 8, params[r], seed=[row_seed(11, r)])
        assert (one[0] - batch[r]).abs().max() <= TOL
    greedy = generate_uncached(model, p[2:3], 8, params[2], seed=0)  # no randomness at all
    assert (greedy[0] - batch[2]).abs().max() <= TOL


@torch.no_grad()
def test_slide_continues_like_a_fresh_prefill_of_the_kept_frames():
    """Past the context, a row keeps its last `keep` frames (with the tokens they were made
    with) and goes on: what follows equals the uncached reference started from those frames."""
    model = tiny(True)
    L, keep, T = 24, 10, 6
    gen = Generator(model, batch_size=2, max_len=L, keep=keep)
    p = prompt_latents(model, T=T)
    out = gen.generate(p, 30, seed=2)  # slides once, when the position reaches L
    assert out.shape[1] == T + 30 and torch.isfinite(out).all()
    steps_before = L - (T - 1)  # steps taken when the slide happens
    kept = out[:, L - keep:L + 1]  # the kept frames and the pending frame
    tokens = gen.state.toks[:, :keep].clone()  # slots below `keep` still hold the kept tokens
    ref = generate_uncached(model, kept, 10, seed=2, prompt_tokens=tokens, first_counter=steps_before)
    assert (ref[:, keep + 1:] - out[:, L + 1:L + 11]).abs().max() <= TOL


@torch.no_grad()
def test_prompt_longer_than_context_is_an_error():
    model = tiny(False)
    gen = Generator(model, batch_size=1, max_len=16, keep=8)
    with pytest.raises(ValueError, match="context"):
        gen.generate(torch.randn(1, 17, 32), 2)
    with pytest.raises(ValueError):
        gen.generate(torch.randn(2, 4, 32), 2)  # wrong batch


@torch.no_grad()
def test_a_context_keep_or_compile_argument_out_of_its_range_is_named():
    """max_len=0 and keep=0 were taken for the defaults, max_len -1 or 2.5 were torch errors at the
    first step, keep=2.5 failed at the first slide, a max_len past the model's context was taken
    silently, and compile="block" was read letter by letter ("unknown parts ['b', 'c', ...]")."""
    from model.decode import Kernels
    model = tiny(False)
    L = model.config.seq_len
    for bad in (0, -1, 2.5, L + 1, True, "16"):
        with pytest.raises(ValueError, match=re.escape(f"max_len must be None (the model's context, {L} latents) or "
                                                       f"an integer in [2, {L}], got {bad!r}")):
            Generator(model, batch_size=1, max_len=bad)
    for bad, message in ((0, "keep must be in [1, 15], got 0"), (16, "keep must be in [1, 15], got 16"),
                         (2.5, "keep must be None (3/4 of the context) or an integer, got 2.5")):
        with pytest.raises(ValueError, match=re.escape(message)):
            Generator(model, batch_size=1, max_len=16, keep=bad)
    assert Generator(model, batch_size=1, max_len=16, keep=np.int64(8)).keep == 8
    with pytest.raises(ValueError, match=re.escape("unknown parts to compile ['blocks']")):
        Kernels.make("blocks")


@torch.no_grad()
def test_dry_run_leaves_the_state_as_it_was(model):
    """Graph capture warms up by running the step with every row inactive: nothing may move."""
    p = prompt_latents(model)
    ref = Generator(model, batch_size=2).generate(p, 6, seed=4)
    gen = Generator(model, batch_size=2)
    orig = gen.graphs.run

    def run_with_dry_runs(fn, key):
        gen.graphs.dry_run(fn, key)
        orig(fn, key)
    gen.graphs.run = run_with_dry_runs
    assert torch.equal(gen.generate(p, 6, seed=4), ref)


@torch.no_grad()
def test_positions_windows_and_histories():
    model = tiny(True)
    st = DecodeState.make(model, 2, 32)
    frames = prompt_latents(model, B=1, T=5)[0]
    x = prompt_prefill(model, st.row(1), frames)
    assert st.host_pos.tolist() == [0, 4] and st.pos.tolist() == [0, 4]
    assert torch.equal(st.hist[1, :4], frames[:4]) and torch.equal(x[0, 0], frames[4])
    st.active[0] = False  # row 0 is free: it must not move
    xs = torch.zeros(2, 1, 64)
    xs[1] = x[0]
    decode_step(model, st, xs, 8)
    assert st.pos.tolist() == [0, 5] and st.counter.tolist() == [0, 1]
    assert torch.equal(st.hist[1, 4], frames[4])
    assert attention_windows(2048) == [128, 256, 512, 1024, 2048] and attention_windows(64) == [64]


def test_sampling_params_are_validated():
    gen = Generator(tiny(False), batch_size=1)
    with pytest.raises(ValueError):
        gen.generate(torch.randn(1, 3, 32), 1, SamplingParams(top_p=0))
    with pytest.raises(ValueError):
        gen.generate(torch.randn(1, 3, 32), 1, [SamplingParams()] * 2)
    assert np.array_equal(gen.state.host_pos, gen.state.pos.numpy())


@pytest.fixture(scope="module")
def mono():
    return tiny(False)


@torch.no_grad()
def test_a_non_finite_prompt_is_refused_and_leaves_the_engine_usable(mono):
    """A NaN or inf prompt is one ValueError at the entry; before, it was taken, gave NaN audio,
    and left NaN in the caches, so every later call on that Generator gave NaN too."""
    audio = torch.randn(1, 1, 4000) * 0.1
    gen = Generator(mono, batch_size=1)
    ref = Generator(mono, batch_size=1).complete(audio, 3, seed=1)
    for bad in (float("nan"), float("inf")):
        poisoned = audio.clone()
        poisoned[0, 0, 100] = bad
        with pytest.raises(ValueError, match="prompt audio holds NaN or infinite"):
            gen.complete(poisoned, 3, seed=1)
        with pytest.raises(ValueError, match="prompt holds NaN or infinite"):
            gen.generate(torch.full((1, 2, 32), bad), 3)
    assert torch.equal(gen.complete(audio, 3, seed=1), ref)


@torch.no_grad()
def test_a_prompt_of_huge_latents_is_refused_and_leaves_the_engine_usable(mono):
    """Latents of 1e20 or 1e30 are finite, so they passed the entry's NaN check, overflowed inside
    the model and gave a NaN completion without a word; now one ValueError naming the prompt and
    the bound (the Generator's and the live engine's entry). Latents up to it are taken."""
    from model import LiveEngine
    from model.generator import MAX_LATENT_MAGNITUDE
    gen = Generator(mono, batch_size=1)
    ok = torch.randn(1, 3, 32)
    ref = gen.generate(ok, 2, seed=1)
    for peak in (1e20, 1e30):
        with pytest.raises(ValueError, match=re.escape(f"prompt peaks at {peak:.4g}, beyond 10000: codec latents are")):
            gen.generate(ok * 0 + peak, 2)
    assert torch.equal(gen.generate(ok, 2, seed=1), ref)
    big = gen.generate(ok / ok.abs().max() * MAX_LATENT_MAGNITUDE, 2)
    assert torch.isfinite(big).all()
    live = LiveEngine(tiny(True), max_sessions=1, compile=False)
    with pytest.raises(ValueError, match="prompt_latents peaks at 1e\\+30, beyond"):
        live.reset(0, prompt_latents=torch.full((2, 64), 1e30))


@torch.no_grad()
def test_prompt_audio_the_codec_encodes_to_non_finite_latents_is_refused_before_any_row_changes(mono):
    """Finite prompt audio (peak 500, within MAX_SAMPLE_MAGNITUDE) through the tiny untrained codec
    overflows its posterior to inf latents: Generator.complete returned NaN audio, and the live
    engine's reset prefilled them into a row it had already marked occupied. Now encode_frames
    refuses them (a ValueError naming the codec's latents), before the live row is touched."""
    from model import LiveEngine
    loud = 500 * torch.sin(torch.arange(4000) / 3.0)
    gen = Generator(mono, batch_size=1)
    with pytest.raises(ValueError, match="the codec encodes this prompt audio to NaN or infinite latents"):
        gen.complete(loud[None, None], 2)
    assert torch.isfinite(gen.complete(loud[None, None] / 500, 2, seed=0)).all()  # the same audio, at full scale
    live = LiveEngine(tiny(True), max_sessions=1, compile=False)
    with pytest.raises(ValueError, match="the codec encodes this prompt audio to NaN or infinite latents"):
        live.reset(0, prompt=torch.stack([loud, loud]))
    assert not live.occupied[0] and int(live.state.host_pos[0]) == 0


@torch.no_grad()
def test_prompt_audio_must_be_float_audio_at_its_scale(mono):
    """int16 PCM, or PCM made float without scaling, gave non-finite audio: now one error saying
    what to do; a numpy array (or float64) is taken as the same tensor would be."""
    audio = torch.randn(1, 1, 4000) * 0.1
    gen = Generator(mono, batch_size=1)
    ref = gen.complete(audio, 2, seed=0)
    pcm = (audio * 32767).round().to(torch.int16)
    with pytest.raises(TypeError, match=r"prompt audio must be floating point .*int16 PCM: divide by 32768"):
        gen.complete(pcm, 2)
    with pytest.raises(ValueError, match=r"prompt audio peaks at .*full scale is 1.*divide it by 32768"):
        gen.complete(pcm.float(), 2)
    assert torch.equal(gen.complete(audio.numpy(), 2, seed=0), ref)
    assert torch.equal(gen.complete(audio.double(), 2, seed=0), ref)
    assert torch.equal(gen.generate(torch.zeros(1, 2, 32).numpy(), 1), gen.generate(torch.zeros(1, 2, 32), 1))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(audio=torch.zeros(2, 1, 4000)), ValueError, "holds 2 prompts, this Generator was made for batch_size=1"),
    (dict(audio=torch.zeros(1, 2, 4000)), ValueError, r"must be \(B, 1, N\) for a mono model"),
    (dict(audio=torch.zeros(1, 1, 1999)), ValueError, "1999 samples is shorter than one latent"),
    (dict(steps=-1), ValueError, "steps must be an integer >= 0"),
    (dict(steps=2.5), TypeError, "steps must be an integer >= 0"),
    (dict(params={"token_temp": 0.5}), TypeError, r"params must be a SamplingParams .*SamplingParams\(\*\*params\)"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed="3"), TypeError, "seed must be an int"),
    (dict(seed=[1, 2]), ValueError, r"seed must be an int, or a list of 1 ints"),
    # row_seed works modulo 2**64: these were the draws of seeds 2**64 - 1 and 0, without a word
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=2 ** 64), ValueError, r"seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"),
    (dict(encode="median"), ValueError, "encode mode must be 'sample' or 'mean'"),
], ids=["batch", "channels", "short", "steps<0", "steps-float", "params-dict", "seed-float",
        "seed-str", "seed-list", "seed-negative", "seed-2**64", "encode"])
def test_bad_completion_arguments_are_one_error_naming_them_before_any_encoding(mono, kwargs, error, message):
    """Each was a deep traceback (or, seed="3", silently taken as the per-row seed list [3]);
    now it is refused before the codec runs."""
    gen = Generator(mono, batch_size=1)
    args = dict(audio=torch.zeros(1, 1, 4000), steps=2) | kwargs
    calls = []
    encode = mono.codec.encode
    mono.codec.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)  # counts the encodings
    try:
        with pytest.raises(error, match=message):
            gen.complete(**args)
    finally:
        del mono.codec.encode
    assert calls == []


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_an_engine_of_no_rows_is_refused_naming_its_argument(mono, size):
    """batch_size 0 made an engine that completes nothing, -1 or 1.5 failed deep in a cache's
    allocation; now one ValueError naming the argument (LiveEngine's max_sessions too)."""
    from model import LiveEngine
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        Generator(mono, batch_size=size)
    with pytest.raises(ValueError, match="max_sessions must be an integer >= 1"):
        LiveEngine(tiny(True), max_sessions=size)


def test_an_eager_completion_and_its_memory_check_import_neither_dynamo_nor_sympy():
    """Kernels.make set a torch._dynamo option even for an eager engine, importing torch._dynamo
    (about 2 s of CPU at every start of complete.py, the server or the live client) that only a
    compiled engine uses; completion_problem's sizing build on `meta` ran torch.arange there, a
    Python kernel that imports sympy (0.6 s). complete.py's memory check and a whole eager
    completion, in a fresh process, now leave both unimported."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, torch\n"
            "from test_generate import tiny\n"
            "from model.generator import Generator, completion_problem\n"
            "assert completion_problem(1.0, 2, tiny(True).config) is None\n"
            "with torch.no_grad():\n"
            "    wav = Generator(tiny(True), batch_size=1).complete(torch.zeros(1, 2, 4000), 2, seed=0)\n"
            "assert wav.shape == (1, 2, 8000), wav.shape\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code], cwd=tests.parent, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
