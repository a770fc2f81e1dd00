"""The codec streams: chunk-by-chunk encoding and decoding equal the whole-signal outputs."""
import pytest
import torch

from config.codec_config import PRESETS
from model import Codec, build

from reference import codec_config, load


def codecs():
    torch.manual_seed(0)
    yield "tiny", build(Codec, PRESETS["tiny"]).eval()
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
