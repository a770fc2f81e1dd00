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
