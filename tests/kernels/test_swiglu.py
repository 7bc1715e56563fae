"""swiglu / geglu (Triton) against F.silu / F.gelu evaluated in float64.

CPU tests run under TRITON_INTERPRET=1; `gpu` tests run compiled in bf16/fp16. Tolerances (relative
Frobenius error vs float64): 1e-5 for float32 inputs (the tanh GELU's gradient 2e-6), 1e-2 bf16, 2e-3
fp16. Fresh outputs are poisoned with NaN; NaN never passes.
"""

from __future__ import annotations

import pytest
import torch

from kernel_testing import TOL, needs_interpreter, poison_fixture, rel_err
from qconv.errors import QconvError
from qconv.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference

ACTS = {
    "silu": (swiglu, swiglu_reference),
    "gelu_tanh": (lambda g, u, **k: geglu(g, u, "tanh", **k), lambda g, u: geglu_reference(g, u, "tanh")),
    "gelu_erf": (lambda g, u, **k: geglu(g, u, "none", **k), lambda g, u: geglu_reference(g, u, "none")),
}


poison = poison_fixture()


def run_and_compare(act, shape, dtype, device, fused=False, **kw):
    """gate/up as projection outputs (intermediates), or as the two halves of one fused projection."""
    fn, ref_fn = ACTS[act]
    torch.manual_seed(sum(shape))
    if fused:
        gu_leaf = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * 3).to(dtype).requires_grad_()
        gate, up = (gu_leaf * 1).chunk(2, dim=-1)
    else:
        g_leaf = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
        u_leaf = torch.randn(shape, device=device).to(dtype).requires_grad_()
        gate, up = g_leaf * 1, u_leaf * 1
    out = fn(gate, up, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)

    if fused:
        gd_leaf = gu_leaf.detach().double().requires_grad_()
        gd, ud = gd_leaf.chunk(2, dim=-1)
        grads = [(gu_leaf.grad, gd_leaf)]
    else:
        gd, ud = (t.detach().double().requires_grad_() for t in (g_leaf, u_leaf))
        grads = [(g_leaf.grad, gd), (u_leaf.grad, ud)]
    ref = ref_fn(gd, ud)
    ref.backward(dout.double())
    tol = TOL[dtype] * (2 if act == "gelu_tanh" else 1)
    assert out.dtype == dtype and rel_err(out, ref) < tol
    for got, want in grads:
        assert rel_err(got, want.grad) < tol


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(3, 5, 300), (7, 1000), (4, 33)])
def test_matches_reference_fp32(poison, act, shape):
    run_and_compare(act, shape, torch.float32, "cpu")


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
def test_fused_projection_halves(poison, act):
    run_and_compare(act, (2, 3, 40), torch.float32, "cpu", fused=True)


@needs_interpreter
def test_bf16(poison):
    run_and_compare("silu", (6, 130), torch.bfloat16, "cpu")
    run_and_compare("gelu_tanh", (6, 130), torch.bfloat16, "cpu")


@needs_interpreter
def test_backward_reuses_intermediates_and_is_loud_when_saved_elsewhere():
    g_leaf = torch.randn(4, 50, requires_grad=True)
    u_leaf = torch.randn(4, 50, requires_grad=True)
    gate, up = g_leaf * 1, u_leaf * 1
    seen = {}
    gate.register_hook(lambda g: seen.__setitem__("dgate", g.data_ptr()))
    swiglu(gate, up).square().sum().backward()
    assert seen["dgate"] == gate.data_ptr()  # the gradient lives in gate's storage now

    # another op saved gate before swiglu's backward overwrites it: autograd must refuse
    gate, up = g_leaf * 1, u_leaf * 1
    other = gate * u_leaf  # mul saves gate; made first, so its backward runs after swiglu's
    with pytest.raises(RuntimeError, match="inplace"):
        (swiglu(gate, up).sum() + other.sum()).backward()

    # kept intact when asked, and for leaves
    for gate, up, kw in ((g_leaf * 1, u_leaf * 1, {"inplace_backward": False}), (g_leaf, u_leaf, {})):
        before = gate.detach().clone()
        swiglu(gate, up, **kw).sum().backward()
        assert torch.equal(gate.detach(), before)


def test_errors():
    with pytest.raises(QconvError, match="must match"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(QconvError, match="approximate"):
        geglu(torch.randn(2, 4), torch.randn(2, 4), approximate="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", list(ACTS))
def test_gpu(poison, act, dtype):
    run_and_compare(act, (1000, 4099), dtype, "cuda")
    run_and_compare(act, (2, 300, 1408), dtype, "cuda", fused=True)


@pytest.mark.gpu
def test_gpu_fp32(poison):
    run_and_compare("silu", (3, 1000, 999), torch.float32, "cuda")
