"""The live codec's Triton kernels (`model.stream_codec_kernels`, `StreamCodec(kernels=True)`): each
kind of convolution's taps and state update equal torch's unfold and where (ELU, Snake, none;
dilated, strided); the parity codec streamed chunk after chunk gives what torch's operations give
(`kernels=False`) and leaves the same state, with a row paused and one restarted; in Triton's
interpreter on the CPU and, where there is one, on CUDA."""
from triton_interpreter import interpreter_and_cuda

CASES = r'''
import json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "tests")
from model import Codec, StreamCodec
from model.codec import snake
from model.stream_codec_kernels import advance, taps
from reference import codec_config, load

def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

def activate(v, act, alpha):  # in float32, rounded once to v's dtype: what the kernels compute
    f = v.float()
    f = F.elu(f) if act == "elu" else snake(f, alpha.float()) if act == "snake" else f
    return f.to(v.dtype)

def units(device):
    # taps and advance against torch's unfold and where, for each kind of convolution the codec
    # has (kernel, dilation, stride, activation) and chunks shorter and longer than the context
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for C, L, k, d, s, act, act2 in ((5, 40, 7, 9, 1, "elu", "elu"), (3, 1, 7, 3, 1, "snake", "snake"),
                                         (6, 30, 4, 1, 2, None, None), (1, 2000, 7, 1, 1, None, None),
                                         (70, 10, 8, 1, 4, None, None), (9, 25, 7, 1, 1, "snake", "elu")):
            B, pad = 3, (k - 1) * d + 1 - s
            x = (2 * torch.randn(B, L, C, generator=g)).to(device, dtype)
            state = torch.randn(B, pad, C, generator=g).to(device, dtype)
            alpha = (0.5 + 1.5 * torch.rand(C, generator=g)).to(device)
            alpha2 = (0.5 + 1.5 * torch.rand(C, generator=g)).to(device)
            active = torch.tensor([True, False, True], device=device).view(B, 1, 1)
            h = torch.randn(B * ((pad + L - (k - 1) * d - 1) // s + 1), C, generator=g).to(device, dtype)
            full = torch.cat([state, activate(x, act, alpha)], 1)
            want_cols = full.unfold(1, (k - 1) * d + 1, s)[..., ::d].reshape(-1, C * k)
            want_state = torch.where(active, full[:, full.shape[1] - pad:], state)
            want_h = activate(h, act2, alpha2)
            cols = taps(x, state, k, d, s, act, alpha if act == "snake" else None)
            advance(x, state, active, act, alpha if act == "snake" else None, h=h if act2 else None, act2=act2,
                    alpha2=alpha2 if act2 == "snake" else None)
            rows.append({"unit": [C, L, k, d, s, act, act2], "dtype": str(dtype), "cols": rel(cols, want_cols),
                         "state": rel(state, want_state), "h": rel(h, want_h) if act2 else 0.0,
                         "shape": list(cols.shape) == list(want_cols.shape)})
    return rows

@torch.no_grad()
def codec(device):
    # the parity codec (the official layout, small: strides, pooling, upsampling, transposed
    # convolutions, ELU) streamed chunk after chunk both ways, with a row paused and one restarted
    torch.manual_seed(0)
    parity = Codec(codec_config()).eval()
    parity.load_state_dict(load("codec_state_dict.pt"))
    rows = []
    for dtype in ((torch.float32, torch.bfloat16) if device != "cpu" else (torch.float32,)):
        paths = [StreamCodec(parity.to(device, dt), kernels=k) for dt, k in
                 ((torch.float32, False), (dtype, False), (dtype, True))]
        states = [p.init_state(2) for p in paths]
        g = torch.Generator().manual_seed(1)
        worst = {"torch_encode": 0.0, "torch_decode": 0.0, "encode": 0.0, "decode": 0.0, "state": 0.0}
        for step, n in enumerate((1, 1, 1, 2)):
            audio = (0.1 * torch.randn(2, n * 2000, generator=g)).to(device)
            latents = torch.randn(2, n, 32, generator=g).to(device)
            for enc, dec in states:
                enc.active[1] = step != 1  # row 1 paused for the second chunk: its streams must not move
                if step == 2:  # row 0 restarted
                    enc.reset(slice(0, 1)); dec.reset(slice(0, 1))
            (mu, _), audio_ref = paths[0].encode(audio, states[0][0]), paths[0].decode(latents, states[0][1])
            live = [0] if step == 1 else [0, 1]  # a paused row's outputs are not used
            for name, p, (enc, dec) in (("torch_", paths[1], states[1]), ("", paths[2], states[2])):
                m, _ = p.encode(audio, enc)
                out = p.decode(latents, dec)
                worst[name + "encode"] = max(worst[name + "encode"], rel(m[live], mu[live]))
                worst[name + "decode"] = max(worst[name + "decode"], rel(out[live], audio_ref[live]))
        for s0, s1 in zip(states[1], states[2]):  # kernels' state against torch's, same dtype
            for b0, b1 in zip(s0.buffers, s1.buffers):
                worst["state"] = max(worst["state"], rel(b1, b0))
        rows.append({"dtype": str(dtype), **worst})
    return rows

def cases(device):
    return {"units": units(device), "codec": codec(device)}
'''


def check(result):
    """Units: the taps of the state and of x without activation are copies (equal); activated, the
    kernels' float32 arithmetic against torch's (ELU's exp(x) - 1 against expm1, sin's own), within
    a few float32 units, and one bf16 unit where rounded to bf16 (2^-7 relative). The codec in
    float32: every output and state within a few float32 units of torch's (the residual add made
    inside the 1x1 product); in bfloat16 (CUDA): no further from float32 torch than bf16 torch is,
    give or take a bf16 unit."""
    assert len(result["units"]) == 12
    for row in result["units"]:
        bound = 1e-6 if row["dtype"] == "torch.float32" else 2 ** -7
        assert row["shape"] and row["cols"] <= bound and row["state"] <= bound and row["h"] <= bound, row
        if row["unit"][5] is None:
            assert row["cols"] == 0 and row["state"] == 0, row
    for row in result["codec"]:
        if row["dtype"] == "torch.float32":
            assert max(row["encode"], row["decode"], row["state"]) <= 1e-5, row
        else:
            assert row["encode"] <= 1.5 * row["torch_encode"] + 2 ** -8, row
            assert row["decode"] <= 1.5 * row["torch_decode"] + 2 ** -8, row


(test_stream_codec_kernels_equal_torch_in_the_triton_interpreter,
 test_stream_codec_kernels_equal_torch_on_cuda) = interpreter_and_cuda(CASES, "cases", check)


def test_the_stream_codec_takes_the_kernels_on_cuda_only():
    """By default the kernels are used where the codec is on CUDA: on the CPU, torch's operations."""
    from config.codec_config import PRESETS
    from model import Codec, StreamCodec, build
    codec = build(Codec, PRESETS["tiny"]).eval()
    assert StreamCodec(codec).kernels is False
    assert StreamCodec(codec, kernels=True).kernels is True
