"""The codec streams: chunk-by-chunk encoding and decoding equal the whole-signal outputs."""
import dataclasses

import pytest
import torch

from config.codec_config import PRESETS
from model import Codec, build

from reference import codec_config, load


def codecs():
    torch.manual_seed(0)
    yield "tiny", build(Codec, PRESETS["tiny"]).eval()
    snake = build(Codec, dataclasses.replace(PRESETS["tiny"], activation="snake")).eval()
    with torch.no_grad():  # frequencies away from their initial 1, each its own
        for name, p in snake.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 2.0)
    yield "tiny-snake", snake
    parity = Codec(codec_config()).eval()
    parity.load_state_dict(load("codec_state_dict.pt"))
    yield "parity", parity


@pytest.mark.parametrize("chunk_latents", [1, 3])
@torch.no_grad()
def test_streaming_equals_offline(chunk_latents):
    for name, codec in codecs():
        B, L = 2, 12
        audio = torch.randn(B, 1, L * 2000) * 0.1
        mu, logvar = codec.encode(audio)
        latents = torch.randn(B, L, 32)
        decoded = codec.decode(latents)
        enc, dec = codec.init_stream(B)
        n = chunk_latents * 2000
        mus, logvars = zip(*[codec.encode_step(audio[..., i:i + n], enc) for i in range(0, L * 2000, n)])
        outs = [codec.decode_step(latents[:, i:i + chunk_latents], dec) for i in range(0, L, chunk_latents)]
        assert (torch.cat(mus, 1) - mu).abs().max() <= 1e-5, name
        assert (torch.cat(logvars, 1) - logvar).abs().max() <= 1e-5, name
        assert (torch.cat(outs, -1) - decoded).abs().max() <= 1e-5, name


@torch.no_grad()
def test_reset_restarts_only_the_given_rows():
    _, codec = next(codecs())
    latents = torch.randn(2, 4, 32)
    enc, dec = codec.init_stream(2)
    first = codec.decode_step(latents[:, :2], dec)
    codec.decode_step(latents[:, 2:], dec)
    dec.reset(torch.tensor([True, False]))
    again = codec.decode_step(latents[:, :2], dec)
    assert torch.allclose(again[0], first[0], atol=1e-6)
    assert not torch.allclose(again[1], first[1], atol=1e-3)


@pytest.mark.parametrize("chunk_latents", [1, 3])
@torch.no_grad()
def test_matmul_stream_codec_equals_offline(chunk_latents):
    """StreamCodec (channel-last, convolutions as matrix products: the live engine's codec)
    computes the codec's encode and decode, chunk by chunk."""
    from model import StreamCodec

    for name, codec in codecs():
        sc = StreamCodec(codec)
        B, L = 2, 9
        audio = torch.randn(B, 1, L * 2000) * 0.1
        latents = torch.randn(B, L, 32)
        mu, logvar = codec.encode(audio)
        decoded = codec.decode(latents)[:, 0]
        enc, dec = sc.init_state(B)
        n = chunk_latents * 2000
        mus, logvars = zip(*[sc.encode(audio[:, 0, i:i + n], enc) for i in range(0, L * 2000, n)])
        outs = [sc.decode(latents[:, i:i + chunk_latents], dec) for i in range(0, L, chunk_latents)]
        assert (torch.cat(mus, 1) - mu).abs().max() <= 1e-5, name
        assert (torch.cat(logvars, 1) - logvar).abs().max() <= 1e-5, name
        assert (torch.cat(outs, -1) - decoded).abs().max() <= 1e-5, name


@torch.no_grad()
def test_matmul_stream_codec_rows_reset_and_pause_alone():
    from model import StreamCodec

    _, codec = next(codecs())
    sc = StreamCodec(codec)
    latents = torch.randn(2, 4, 32)
    enc, dec = sc.init_state(2)
    first = sc.decode(latents[:, :2], dec)
    sc.decode(latents[:, 2:], dec)
    dec.reset(slice(0, 1))
    again = sc.decode(latents[:, :2], dec)
    assert torch.allclose(again[0], first[0], atol=1e-6) and not torch.allclose(again[1], first[1], atol=1e-3)
    # a paused row (active False) keeps its state: stepping it later continues where it was
    enc2, dec2 = sc.init_state(2)
    ref = torch.cat([sc.decode(latents[:, i:i + 1], dec2) for i in range(4)], -1)
    enc3, dec3 = sc.init_state(2)
    outs = [sc.decode(latents[:, :1], dec3)]
    dec3.active[1] = False
    sc.decode(torch.randn(2, 1, 32), dec3)  # row 1 paused: its state must not move
    dec3.active[1] = True
    outs += [sc.decode(latents[:, i:i + 1], dec3) for i in range(1, 4)]
    assert (torch.cat(outs, -1)[1] - ref[1]).abs().max() <= 1e-6


@pytest.mark.parametrize("cin,cout,k,d,length", [(3, 5, 7, 3, 100), (4, 4, 7, 9, 97), (2, 3, 3, 2, 11)])
def test_polyphase_dilated_conv_equals_the_dilated_conv(cin, cout, k, d, length):
    """The trainer's dilated convs over phases (float64): the same outputs and gradients as the
    dilated conv, also when the length is not a multiple of the dilation."""
    from model.codec import dilated_conv1d_polyphase
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(cin, cout, k, dilation=d).double()
    x = torch.randn(2, cin, length, dtype=torch.float64, requires_grad=True)
    want, got = conv(x), dilated_conv1d_polyphase(x, conv)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, conv.weight, conv.bias), g),
                    torch.autograd.grad(want, (x, conv.weight, conv.bias), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("polyphase", [False, True])
def test_channels_last_layout_gives_the_same_training_pass_and_gradients(polyphase, monkeypatch):
    """The trainer's layout on CUDA (`use_channels_last`: (B, C, 1, L) channels-last, each conv as
    the 2-D conv of the same weights, causal zeros as the conv's own padding), here on the parity
    codec (the official architecture and weights) in float64: the training pass (reconstruction,
    posterior, latents) and the gradients of the input and of every parameter equal those of the
    (B, C, L) layout, with and without the polyphase dilated convs; every convolution is handed a
    channels-last input, and in the backward the gradient of every convolution's output is
    channels-last too (a gradient allocated channels-first, as the backwards of a slice or a
    replication pad do, makes cuDNN convert it: that made the layout slower than (B, C, L)); the
    state dict is untouched and a stream still decodes as the whole signal."""
    import torch.nn.functional as F
    _, parity = list(codecs())[-1]
    codec = parity.double().train()
    state = {k: v.clone() for k, v in codec.state_dict().items()}
    audio = (0.1 * torch.randn(2, 1, 5 * 2000, dtype=torch.float64)).requires_grad_()

    def run():
        torch.manual_seed(1)  # the posterior draw
        out = codec(audio)
        loss = out["recon"].square().sum() + (out["mu"] * out["logvar"]).sum()
        return out, torch.autograd.grad(loss, [audio] + list(codec.parameters()))

    codec.dilated_convs_polyphase(min_channels=1 if polyphase else 1 << 30)
    want, want_grads = run()
    formats, grad_formats = [], []

    def recording(conv):
        def call(x, *args, **kwargs):
            formats.append(x.is_contiguous(memory_format=torch.channels_last))
            y = conv(x, *args, **kwargs)
            if y.requires_grad:
                y.register_hook(lambda g: grad_formats.append(g.is_contiguous(memory_format=torch.channels_last)))
            return y
        return call

    monkeypatch.setattr(F, "conv2d", recording(F.conv2d))
    monkeypatch.setattr(F, "conv_transpose2d", recording(F.conv_transpose2d))
    codec.use_channels_last()
    try:
        got, got_grads = run()
    finally:
        codec.use_channels_last(False)
        codec.dilated_convs_polyphase(min_channels=1 << 30)
    assert len(formats) == 81 and all(formats), formats  # every conv of the encoder and decoder
    assert len(grad_formats) == 81 and all(grad_formats), grad_formats
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    scale = max(g.abs().max().item() for g in want_grads)  # some gradients are ~0 (rounding-level)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale)
    assert all(torch.equal(codec.state_dict()[k].double(), v.double()) for k, v in state.items())
    codec.use_channels_last()
    with torch.no_grad():
        latents = torch.randn(2, 4, 32, dtype=torch.float64)
        whole = codec.decode(latents)
        _, dec = codec.init_stream(2)
        streamed = torch.cat([codec.decode_step(latents[:, i:i + 1], dec) for i in range(4)], dim=-1)
    codec.use_channels_last(False)
    torch.testing.assert_close(streamed, whole, rtol=1e-9, atol=1e-12)


@torch.no_grad()
def test_polyphase_switch_keeps_the_official_codecs_output_and_weights():
    """Switched on for every dilated conv (min_channels=1), the parity codec (the official
    architecture and weights) decodes as before up to float32 rounding, its state dict is
    unchanged, and streaming still uses the plain convs (and still equals the whole signal)."""
    _, parity = list(codecs())[-1]
    state = {k: v.clone() for k, v in parity.state_dict().items()}
    latents = torch.randn(2, 6, 32)
    want = parity.decode(latents)
    assert parity.dilated_convs_polyphase(min_channels=1) == 24  # dilations 3 and 9 x 6 blocks x 2 stacks
    try:
        got = parity.decode(latents)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        assert parity.state_dict().keys() == state.keys()
        assert all(torch.equal(parity.state_dict()[k], v) for k, v in state.items())
        _, dec = parity.init_stream(2)
        streamed = torch.cat([parity.decode_step(latents[:, i:i + 2], dec) for i in range(0, 6, 2)], dim=-1)
        torch.testing.assert_close(streamed, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    finally:
        assert parity.dilated_convs_polyphase(min_channels=1 << 30) == 0


@torch.no_grad()
def test_encode_and_decode_take_any_float_and_refuse_the_rest_with_one_error():
    """Float64 audio or latents were a dtype-mismatch RuntimeError (so was float32 audio into a
    bf16 codec): now cast to the weights' dtype. Int16 samples were encoded as if full scale were
    32767 (garbage latents); a (B, N) or two-channel signal, an empty one, latents of the wrong
    width and a tensor on another device were errors from deep inside a convolution: now one
    error naming the argument."""
    torch.manual_seed(0)
    codec = build(Codec, PRESETS["tiny"]).eval()
    audio = torch.randn(2, 1, 4000) * 0.1
    latents = torch.randn(2, 3, 32)
    assert torch.allclose(codec.encode(audio.double())[0], codec.encode(audio)[0])
    assert torch.allclose(codec.decode(latents.double()), codec.decode(latents))
    bf16 = build(Codec, PRESETS["tiny"], dtype=torch.bfloat16).eval()
    assert bf16.encode(audio)[0].dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"audio must be floating point \(B, 1, N\), got torch.int16"):
        codec.encode((audio * 32767).to(torch.int16))
    for bad in (audio[:, 0], audio.expand(2, 2, 4000)):
        with pytest.raises(ValueError, match=r"audio must be \(B, 1, N\), got .*one channel per row"):
            codec.encode(bad)
    with pytest.raises(ValueError, match="audio of 0 samples is shorter than one latent"):
        codec.encode(audio[..., :0])
    with pytest.raises(ValueError, match="audio is on meta, the codec on cpu"):
        codec.encode(audio.to("meta"))
    for bad in (latents[0], latents[..., :16], latents[:, :0]):
        with pytest.raises(ValueError, match=r"latents must be \(B, L, 32\) with L >= 1"):
            codec.decode(bad)


def test_snake_codec_trains_the_same_in_the_channels_last_layout():
    """`activation=snake` (a learned frequency a channel): the training pass and the gradients of
    every parameter, its frequencies included, are the same in the trainer's (B, C, 1, L)
    channels-last layout as in (B, C, L) (float64), and every frequency gets a gradient."""
    _, codec = [c for c in codecs() if c[0] == "tiny-snake"][0]
    codec = codec.double().train()
    audio = 0.1 * torch.randn(2, 1, 3 * 2000, dtype=torch.float64)

    def run():
        torch.manual_seed(1)  # the posterior draw
        out = codec(audio)
        loss = out["recon"].square().sum() + out["mu"].square().sum()
        return out["recon"], torch.autograd.grad(loss, list(codec.parameters()))

    want, want_grads = run()
    codec.use_channels_last()
    try:
        got, got_grads = run()
    finally:
        codec.use_channels_last(False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(codec.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
        if name.endswith("alpha"):
            assert b.abs().max() > 0, name


DECODE_MEMORY = r"""
import json, resource, torch
from config.codec_config import PRESETS
from model import Codec, build
from model.stream_codec import decode_frames
torch.manual_seed(0)
codec = build(Codec, PRESETS["tiny"]).eval()
with torch.no_grad():
    decode_frames(codec, torch.randn(1, 128, 32), 1)  # a chunk's own temporaries, allocated once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = decode_frames(codec, torch.randn(1, 4000, 32), 1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew": (after - before) * 1024, "audio": out.numel() * out.element_size()}))
"""


def test_decode_frames_holds_the_audio_once():
    """`decode_frames` (complete.py's and the notebook's decoding, which `completion_problem` counts
    as the audio once) kept every chunk's audio, then concatenated them: twice the audio at its
    peak (1.84x measured here), so a completion that passed the memory check could die at its
    decoding. Now each chunk is written into the output: the process' peak grows by the audio's
    32 MB once (500 s of audio from the tiny codec, in a process of its own)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", DECODE_MEMORY], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["audio"] == 4000 * 2000 * 4 and m["grew"] < 1.4 * m["audio"], m
