"""The codec's Snake activation as Triton kernels (`model.snake_kernels`): forward, the gradient of
x and of each channel's frequency equal torch's formula (`model.codec.snake`, float32), in Triton's
interpreter on the CPU and, where there is one, on CUDA; the layout and dtype kept."""
import torch

from triton_interpreter import interpreter_and_cuda

CASES = r'''
import json
import torch
from model.codec import snake as reference
from model.snake_kernels import snake

def cases(device):
    rows = []
    for dtype, c, length in ((torch.float32, 12, 777), (torch.float32, 130, 301), (torch.bfloat16, 40, 513)):
        g = torch.Generator().manual_seed(c)
        x = (3 * torch.randn(2, c, 1, length, generator=g)).to(device, dtype).contiguous(memory_format=torch.channels_last)
        alpha = (0.5 + 1.5 * torch.rand(c, generator=g)).to(device).requires_grad_()
        grad = torch.randn(2, c, 1, length, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
        xk = x.clone().requires_grad_()
        out = snake(xk, alpha)
        out.backward(grad)
        ak = alpha.grad.clone()
        alpha.grad = None
        xr = x.float().clone().requires_grad_()
        ref = reference(xr, alpha.view(-1, 1, 1))
        ref.backward(grad.float())
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        rows.append({"dtype": str(dtype), "channels": c, "out_rel": rel(out, ref), "grad_x_rel": rel(xk.grad, xr.grad),
                     "grad_alpha_rel": rel(ak, alpha.grad),
                     "layout_kept": out.is_contiguous(memory_format=torch.channels_last)
                                    and xk.grad.is_contiguous(memory_format=torch.channels_last),
                     "dtype_kept": out.dtype == dtype and xk.grad.dtype == dtype and ak.dtype == torch.float32})
    return rows
'''


def check(rows):
    """float32: the formula's float32 arithmetic in another order (the kernel's d/dx is one
    expression, the partial sums of each frequency's gradient another order): within a few units
    in the last place of the largest value; bf16: within one bf16 unit (2^-7, relative)."""
    assert len(rows) == 3
    for row in rows:
        bf16 = row["dtype"] == "torch.bfloat16"
        assert row["out_rel"] <= (2 ** -7 if bf16 else 1e-6), row
        assert row["grad_x_rel"] <= (2 ** -7 if bf16 else 1e-6), row
        assert row["grad_alpha_rel"] <= (2e-2 if bf16 else 1e-5), row  # bf16: summed from rounded x and grad
        assert row["layout_kept"] and row["dtype_kept"], row


(test_snake_kernels_equal_the_formula_in_the_triton_interpreter,
 test_snake_kernels_equal_the_formula_on_cuda) = interpreter_and_cuda(CASES, "cases", check)


def test_the_snake_module_is_the_formula_on_the_cpu_in_either_layout():
    """On the CPU (and for (B, C, L) anywhere) the module is the formula, whose values the kernels
    are tested against above."""
    from model.codec import Snake, snake
    m = Snake(5)
    with torch.no_grad():
        m.alpha.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 1, 40).contiguous(memory_format=torch.channels_last)
    assert torch.equal(m(x), snake(x, m.alpha.view(-1, 1, 1)))
    assert torch.equal(m(x[:, :, 0]), snake(x[:, :, 0], m.alpha.view(-1, 1)))
