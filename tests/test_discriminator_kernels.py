"""The discriminators' fused bias + leaky ReLU (`model.discriminator_kernels`): its forward, the
gradient of its input and of the bias against torch's ops, in Triton's interpreter on the CPU and on
CUDA; and the discriminators with it against without it on CUDA."""
from __future__ import annotations

import pytest
import torch

CASES = r'''
import json, torch
from model.discriminator_kernels import bias_leaky_relu

def reference(y, bias, g, slope):
    """leaky_relu(y + bias) with the bias added in float32, and its gradients, in torch."""
    v = y.float() + bias.float()[None, :, None, None]
    out = torch.where(v > 0, v, v * slope)
    gy = torch.where(v > 0, g.float(), g.float() * slope)
    return out.to(y.dtype), gy.to(y.dtype), gy.sum((0, 2, 3))

def kernel_cases(device):
    rows = []
    # (B, C, H, W): one channel block and several, channels not a power of two, rows not a multiple of
    # a block, the shapes of a period discriminator's and an STFT discriminator's layers
    for shape, dtype, strided in (((2, 32, 75, 3), torch.bfloat16, False), ((3, 48, 17, 5), torch.float32, False),
                                  ((2, 1024, 13, 2), torch.bfloat16, False), ((2, 200, 9, 7), torch.bfloat16, True),
                                  ((1, 32, 40, 103), torch.float32, True)):
        g = torch.Generator().manual_seed(len(rows))
        y = torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
        bias = (0.5 * torch.randn(shape[1], generator=g)).to(device)
        grad = torch.randn(shape, generator=g).to(dtype).to(device)
        if strided:  # a gradient that arrives as a view, as the slice of a concatenation's
            grad = torch.cat([grad, grad], dim=-1)[..., :shape[-1]]
        else:
            grad = grad.contiguous(memory_format=torch.channels_last)
        yk, bk = y.clone().requires_grad_(), bias.clone().requires_grad_()
        out = bias_leaky_relu(yk, bk, 0.1)
        out.backward(grad)
        ref_out, ref_gy, ref_gb = reference(y, bias, grad, 0.1)
        rel = lambda a, b: float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max())
        rows.append({"shape": list(shape), "dtype": str(dtype), "strided": strided,
                     "channels_last": out.is_contiguous(memory_format=torch.channels_last),
                     "out_equal": bool(torch.equal(out.detach(), ref_out)), "out_rel": rel(out.detach(), ref_out),
                     "grad_y_equal": bool(torch.equal(yk.grad, ref_gy)), "grad_y_rel": rel(yk.grad, ref_gy),
                     "grad_y_channels_last": yk.grad.is_contiguous(memory_format=torch.channels_last),
                     "bias_grad_rel": float((bk.grad - ref_gb).abs().max() / ref_gb.abs().max()),
                     "bias_grad_dtype": str(bk.grad.dtype),
                     "negative_share": float((out < 0).float().mean())})
    return rows

def feature_cases(device):
    """feature_l1 against torch's per-map loop, on maps laid out as the discriminators' (channels-last),
    contiguous, one channels-last and one not, and a map with equal entries (where the gradient is 0)."""
    from model.discriminator_kernels import feature_l1
    g = torch.Generator().manual_seed(7)
    def maps(dtype):
        shapes = [(2, 32, 75, 3), (2, 128, 25, 3), (3, 5, 7), (2, 32, 40, 103), (2, 1, 9000)]
        real = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
        fake = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
        real[0], fake[0] = (t.contiguous(memory_format=torch.channels_last) for t in (real[0], fake[0]))
        fake[1] = fake[1].contiguous(memory_format=torch.channels_last)  # real[1] stays contiguous
        real[3] = real[3].transpose(2, 3).contiguous().transpose(2, 3)  # a strided layout of its own
        fake[4][..., :1000] = real[4][..., :1000]  # equal entries
        return real, fake
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        real, fake = maps(dtype)
        fk = [f.clone().requires_grad_() for f in fake]
        loss = feature_l1(real, fk)
        loss.backward(torch.tensor(3.0, device=device))
        fr = [f.clone().requires_grad_() for f in fake]
        ref = sum(torch.mean((a.float() - b.float()).abs()) for a, b in zip(real, fr))
        (3.0 * ref).backward()
        rows.append({"dtype": str(dtype), "loss_rel": float((loss - ref).abs() / ref),
                     "grad_rel": max(float((a.grad.float() - b.grad.float()).abs().max() / b.grad.float().abs().max())
                                     for a, b in zip(fk, fr)),
                     "zero_where_equal": bool((fk[4].grad[..., :1000] == 0).all()),
                     "layouts_kept": all(a.grad.stride() == a.stride() for a in fk),
                     "dtype_kept": all(a.grad.dtype == dtype for a in fk)})
    return rows
'''


def check_kernel_cases(rows, interpreter: bool = False):
    """The same float32 arithmetic as torch's, rounded once: equal on CUDA. Triton's interpreter
    rounds float32 to bf16 towards zero (the GPU to nearest), so there bf16 results may differ by
    one unit in the last place (a relative 2^-7); float32 ones are equal."""
    assert len(rows) == 5
    for row in rows:
        assert row["channels_last"] and row["grad_y_channels_last"], row
        if interpreter and row["dtype"] == "torch.bfloat16":
            assert row["out_rel"] <= 2 ** -7 and row["grad_y_rel"] <= 2 ** -7, row
        else:
            assert row["out_equal"] and row["grad_y_equal"], row
        assert row["bias_grad_rel"] < 1e-5, row  # only the order of the float32 sums differs
        assert row["bias_grad_dtype"] == "torch.float32", row
        assert 0.2 < row["negative_share"] < 0.8, row  # both sides of the activation were exercised


def check_feature_cases(rows):
    """The loss equal up to the order of float32 sums; the gradients, -sign(a - b) * grad / numel,
    within a unit in the last place (the kernel multiplies by 1 / numel where torch divides; the
    interpreter rounds bf16 towards zero), 0 where a == b."""
    assert len(rows) == 2
    for row in rows:
        assert row["loss_rel"] < 1e-5, row
        bf16 = row["dtype"] == "torch.bfloat16"
        assert row["grad_rel"] <= (2 ** -7 if bf16 else 2 ** -22), row
        assert row["zero_where_equal"] and row["layouts_kept"] and row["dtype_kept"], row


def test_bias_leaky_relu_equals_torch_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernels' interpreter")
    from triton_interpreter import run_cases
    check_kernel_cases(run_cases(CASES, "kernel_cases", "cpu"), interpreter=True)


def test_feature_l1_equals_torchs_loss_and_gradients_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernels' interpreter")
    from triton_interpreter import run_cases
    check_feature_cases(run_cases(CASES, "feature_cases", "cpu"))


DISCRIMINATORS = r'''
import json, torch
import model.codec_losses as cl
import model.discriminators as md
from config.codec_config import PRESETS

def step(device, kernels):
    """The trainer's discriminator part of a step (channels-last, `small`'s discriminators, float32)
    with the Triton kernels (here forced on for the device) or with torch's ops: the generator's
    loss (adversarial + feature matching) into the reconstruction, the discriminators' into
    their weights."""
    torch.manual_seed(0)
    disc = md.Discriminators(PRESETS["small"]).to(device)
    disc.use_channels_last()
    disc.use_kernels(kernels)
    # 2000 samples: every kernel still runs over several programs along rows and channels
    real = 0.1 * torch.randn(1, 1, 2000, device=device)
    fake = (0.1 * torch.randn(1, 1, 2000, device=device)).requires_grad_()
    d_real, d_fake = disc(real), disc(fake)
    loss_g = cl.generator_adversarial_loss(d_fake) + cl.feature_matching_loss(d_real, d_fake, kernel=kernels)
    loss_d = cl.discriminator_loss(d_real, d_fake)
    loss_g.backward(inputs=[fake], retain_graph=True)
    loss_d.backward(inputs=list(disc.parameters()))
    return loss_g.detach(), loss_d.detach(), fake.grad, [p.grad for p in disc.parameters()]

def compare(device):
    torch_ops, kernels = step(device, False), step(device, True)
    rel = lambda a, b: float((a - b).norm() / b.norm())
    return {"loss_g_rel": rel(kernels[0], torch_ops[0]), "loss_d_rel": rel(kernels[1], torch_ops[1]),
            "fake_grad_rel": rel(kernels[2], torch_ops[2]),
            "weight_grad_rel": max(rel(a, b) for a, b in zip(kernels[3], torch_ops[3])),
            "grads": sum(g is not None for g in kernels[3]), "params": len(kernels[3])}
'''


def test_the_discriminators_step_with_the_kernels_equals_torchs_ops_in_the_triton_interpreter():
    """The kernels inside `small`'s discriminators, forward and both backwards, as the trainer runs
    them (channels-last; the gradient of the STFT discriminators' last band layers arrives as a
    slice of a concatenation's): the losses, the reconstruction's gradient and every weight's
    gradient equal torch's ops' up to the order of float32 sums."""
    pytest.importorskip("triton", reason="Triton (requirements.txt, Linux) runs the kernels' interpreter")
    from triton_interpreter import interpreted
    r = interpreted(DISCRIMINATORS + "\nprint(json.dumps(compare('cpu')))\n")
    assert r["grads"] == r["params"], r
    assert r["loss_g_rel"] < 1e-6 and r["loss_d_rel"] < 1e-6, r
    assert r["fake_grad_rel"] < 1e-5 and r["weight_grad_rel"] < 1e-4, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bias_leaky_relu_equals_torch_on_cuda():
    from triton_interpreter import run_cases
    check_kernel_cases(run_cases(CASES, "kernel_cases", "cuda"))
    check_feature_cases(run_cases(CASES, "feature_cases", "cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_discriminators_with_the_fused_activation_match_torchs_ops_on_cuda():
    """The trainer's discriminators (channels-last, bf16 autocast) with and without the fused bias
    and activation: the same logits, feature maps and weight gradients up to bf16 rounding."""
    import model.discriminators as md
    from config.codec_config import PRESETS
    torch.manual_seed(0)
    disc = md.Discriminators(PRESETS["small"]).cuda()
    disc.use_channels_last()
    audio = 0.1 * torch.randn(2, 1, 16000, device="cuda")
    results = {}
    for fused in (False, True):
        disc.use_kernels(fused)
        disc.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = disc(audio)
            loss = sum((logits.float() ** 2).mean() + sum(f.float().abs().mean() for f in feats)
                       for logits, feats in outs)
        loss.backward()
        results[fused] = ([t.detach().float() for logits, feats in outs for t in [logits, *feats]],
                          [p.grad.float() for p in disc.parameters()])
    for a, b in zip(results[False][0], results[True][0]):
        assert (a - b).abs().max() <= 0.02 * a.abs().max() + 1e-3
    for a, b in zip(results[False][1], results[True][1]):
        assert (a - b).norm() <= 0.02 * a.norm() + 1e-6
