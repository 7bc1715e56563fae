"""rms_norm (Triton) against a float64 PyTorch reference and transformers' RMSNorm modules.

CPU tests run the kernels under TRITON_INTERPRET=1 (scripts/test.sh); `gpu` tests run them compiled in
bf16/fp16. Tolerances (relative Frobenius error vs float64): 1e-5 for float32 inputs, 1e-2 for bf16 and
2e-3 for fp16 (one rounding of the output). Fresh outputs are poisoned with NaN: any element a kernel
fails to write shows up. NaN never passes.
"""

from __future__ import annotations

import pytest
import torch

from kernel_testing import TOL, needs_interpreter, poison_fixture, rel_err
from qconv.errors import QconvError
from qconv.kernels.rms_norm import rms_norm, rms_norm_reference


poison = poison_fixture(int_fill=-7)  # NaN floats, -7 ints


def run_and_compare(shape, dtype, offset, device, w_dtype=None, casting=None):
    torch.manual_seed(hash((shape, offset)) % 1000)
    x_leaf = torch.randn(*shape, dtype=dtype, device=device).mul_(3).requires_grad_()
    w = (torch.randn(shape[-1], device=device) * 0.5 + (0.0 if offset else 1.0)).to(w_dtype or dtype).requires_grad_()
    y = rms_norm(x_leaf * 1, w, 1e-6, offset, casting=casting)
    dy = torch.randn_like(y)
    y.backward(dy)

    xd = x_leaf.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    yd = rms_norm_reference(xd, wd, 1e-6, offset, casting)
    yd.backward(dy.double())
    tol = TOL[dtype]
    assert rel_err(y, yd) < tol
    assert rel_err(x_leaf.grad, xd.grad) < tol
    assert rel_err(w.grad, wd.grad) < tol * (4 if dtype != torch.float32 else 1)
    return y


@needs_interpreter
@pytest.mark.parametrize("shape", [(3, 5, 300), (4, 1024), (1, 7, 33), (70, 64)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_reference_fp32(poison, shape, offset):
    run_and_compare(shape, torch.float32, offset, "cpu")


@needs_interpreter
def test_bf16_compute_in_fp32(poison):
    run_and_compare((6, 200), torch.bfloat16, 0.0, "cpu")
    run_and_compare((6, 200), torch.bfloat16, 1.0, "cpu")


def compare_with_transformers(dtype, device):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 96, dtype=dtype, device=device) * 2
    llama = LlamaRMSNorm(96, eps=1e-5).to(device, dtype)
    gemma = Gemma2RMSNorm(96, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        llama.weight.normal_(1.0, 0.2)
        gemma.weight.normal_(0.0, 0.2)
        for module, offset, eps in ((llama, 0.0, 1e-5), (gemma, 1.0, 1e-6)):
            ref = module(x)
            out = rms_norm(x, module.weight, eps, offset)
            assert out.dtype == ref.dtype
            # both round once from float32; rsqrt may differ in the last float32 bit: allow one ulp
            ulp = torch.finfo(dtype).eps
            diff = (out.float() - ref.float()).abs()
            assert (diff <= ref.float().abs() * ulp + 1e-6).all()
            assert (diff == 0).float().mean() > 0.95
        # float32 weight on a half input: transformers' product (and ours) is float32
        llama32 = LlamaRMSNorm(96).to(device)
        assert rms_norm(x, llama32.weight, 1e-6).dtype == llama32(x).dtype == torch.float32


@needs_interpreter
def test_like_transformers_modules():
    # fp16 here: the interpreter truncates float32 -> bf16 (a GPU rounds to nearest even); bf16 in test_gpu_*
    compare_with_transformers(torch.float16, "cpu")


@needs_interpreter
def test_fp32_weight_on_bf16_input(poison):
    run_and_compare((5, 130), torch.bfloat16, 0.0, "cpu", w_dtype=torch.float32)


@needs_interpreter
@pytest.mark.parametrize("case", ["linear", "residual_pending", "residual_done"])
def test_gradient_reuse_only_when_exclusive(case):
    """dx goes into dy's storage after a Linear; not while dy still waits for another consumer (the
    residual add after Gemma2's post norms, when that branch runs later); gradients are right either way."""
    torch.manual_seed(1)
    w_lin = torch.randn(64, 48)
    x = torch.randn(2, 3, 64, requires_grad=True)
    r = torch.randn(2, 3, 64, requires_grad=True)
    weight = torch.randn(64).requires_grad_()
    seen = {}
    r_in = r * 1 if case == "residual_pending" else None  # made before y: its backward runs after ours
    xin = x * 1
    xin.register_hook(lambda g: seen.__setitem__("dx", g.data_ptr()))
    y = rms_norm(xin, weight, 1e-6, 1.0)
    y.register_hook(lambda g: seen.__setitem__("dy", g.data_ptr()))
    h = y if case == "linear" else (r_in if r_in is not None else r * 1) + y
    (h @ w_lin).square().sum().backward()
    xd, rd, wd = (t.detach().double().requires_grad_() for t in (x, r, weight))
    hd = rms_norm_reference(xd, wd, 1e-6, 1.0)
    hd = hd if case == "linear" else rd + hd
    (hd @ w_lin.double()).square().sum().backward()
    assert rel_err(x.grad, xd.grad) < 1e-5 and rel_err(weight.grad, wd.grad) < 1e-5
    if case != "linear":
        assert rel_err(r.grad, rd.grad) < 1e-5
    if case == "linear":
        assert seen["dx"] == seen["dy"]
    if case == "residual_pending":
        assert seen["dx"] != seen["dy"]


@needs_interpreter
def test_weight_frozen_and_noncontiguous_input(poison):
    x = torch.randn(40, 6).t().requires_grad_()  # [6, 40], stride (1, 6)
    w = torch.randn(40)
    y = rms_norm(x, w, 1e-5)
    y.backward(torch.ones_like(y))
    xd = x.detach().double().requires_grad_()
    rms_norm_reference(xd, w.double(), 1e-5).backward(torch.ones(6, 40, dtype=torch.float64))
    assert rel_err(x.grad, xd.grad) < 1e-5


def test_bad_weight_shape():
    with pytest.raises(QconvError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(2, 333, 4096), (1024, 1000), (5, 16384)])
def test_gpu(poison, dtype, offset, shape):
    run_and_compare(shape, dtype, offset, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_like_transformers_modules(dtype):
    compare_with_transformers(dtype, "cuda")
