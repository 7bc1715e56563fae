"""cross_entropy (Triton) against F.cross_entropy on float64 logits (transformers' causal-LM loss).

CPU tests run under TRITON_INTERPRET=1; `gpu` tests run compiled in bf16/fp16. Tolerances (relative
error vs float64): loss 1e-5 for every dtype (the logits are exact inputs; the sum is float32),
gradient 1e-5 fp32, 1e-2 bf16, 2e-3 fp16 (one rounding; compared with the reference rounded to that dtype). Fresh outputs are poisoned with NaN; NaN
never passes except where torch gives NaN too (every token ignored).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kernel_testing import TOL, needs_interpreter, poison_fixture, rel_err
from qconv.errors import QconvError
from qconv.kernels.cross_entropy import cross_entropy, cross_entropy_reference


poison = poison_fixture()


def run_and_compare(shape, vocab, dtype, device, softcap=None, chunk_size=None, reduction="mean", n_ignored=1,
                    grad_in_forward=False):
    torch.manual_seed(vocab + len(shape))
    x_leaf = (torch.randn(*shape, vocab, device=device) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, device=device)
    labels.view(-1)[:n_ignored] = -100
    logits = x_leaf * 1  # an intermediate, like lm_head's output: the gradient reuses its storage
    kept = logits.detach().clone()
    loss = cross_entropy(logits, labels, softcap=softcap, chunk_size=chunk_size, reduction=reduction,
                         grad_in_forward=grad_in_forward)
    assert torch.equal(logits.detach(), kept) != grad_in_forward  # only that mode overwrites them in the forward
    grad = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.7, device=device)
    loss_value = loss.detach().clone()
    loss.backward(grad)

    xd = x_leaf.detach().double().requires_grad_()
    ref = cross_entropy_reference(xd, labels, softcap=softcap, reduction=reduction)
    ref.backward(grad.double())
    assert loss.dtype == torch.float32
    assert rel_err(loss_value, ref) < 1e-5
    # against the reference rounded to the logits' dtype: fp16 flushes the tiny probabilities of a large
    # vocabulary to zero in both
    assert x_leaf.grad.dtype == dtype and rel_err(x_leaf.grad, xd.grad.to(dtype)) < TOL[dtype]


@needs_interpreter
@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (5003, None), (300, 16)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_reference_fp32(poison, vocab, chunk, softcap):
    run_and_compare((5,), vocab, torch.float32, "cpu", softcap=softcap, chunk_size=chunk)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_3d_logits(poison, reduction):
    run_and_compare((2, 3), 700, torch.float32, "cpu", reduction=reduction, n_ignored=2)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_in_forward(poison, reduction):
    run_and_compare((2, 3), 900, torch.float32, "cpu", softcap=5.0, chunk_size=256, reduction=reduction,
                    n_ignored=2, grad_in_forward=True)


@needs_interpreter
def test_bf16_logits(poison):
    run_and_compare((4,), 3000, torch.bfloat16, "cpu", chunk_size=1024)
    run_and_compare((4,), 3000, torch.bfloat16, "cpu", softcap=30.0)


@needs_interpreter
def test_all_ignored_and_bad_labels_like_torch():
    x = torch.randn(3, 50, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's 0/0 in the interpreter
        loss = cross_entropy(x * 1, torch.full((3,), -100))
    ref = torch.nn.functional.cross_entropy(x.detach(), torch.full((3,), -100))
    assert torch.isnan(loss) and torch.isnan(ref)  # torch: 0/0 = NaN
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # torch's gradient is zero there too
    assert torch.isnan(cross_entropy(x.detach(), torch.tensor([1, 50, 2])))  # out of range: NaN, not garbage


@needs_interpreter
def test_gradient_storage_reuse_rules():
    x_leaf = torch.randn(4, 64, requires_grad=True)
    labels = torch.randint(0, 64, (4,))
    logits = x_leaf * 1
    seen = {}
    logits.register_hook(lambda g: seen.__setitem__("grad", g.data_ptr()))
    cross_entropy(logits, labels).backward()
    assert seen["grad"] == logits.data_ptr()  # written into the lm_head output's storage

    logits = x_leaf * 1
    other = logits * x_leaf  # saves logits; made first, so its backward runs after ours
    with pytest.raises(RuntimeError, match="inplace"):
        (cross_entropy(logits, labels) + other.sum()).backward()

    for logits, kw in ((x_leaf * 1, {"inplace_backward": False}), (x_leaf, {})):
        before = logits.detach().clone()
        cross_entropy(logits, labels, **kw).backward()
        assert torch.equal(logits.detach(), before)


def test_argument_errors():
    x, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(QconvError, match="chunk_size"):
        cross_entropy(x, y, chunk_size=100)
    with pytest.raises(QconvError, match="do not match"):
        cross_entropy(x, torch.randint(0, 10, (5,)))
    with pytest.raises(QconvError, match="reduction"):
        cross_entropy(x, y, reduction="avg")
    with pytest.raises(QconvError, match="softcap"):
        cross_entropy(x, y, softcap=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu(poison, dtype, softcap):
    run_and_compare((3, 171), 32000, dtype, "cuda", softcap=softcap, n_ignored=40)
    run_and_compare((64,), 128256, dtype, "cuda", softcap=softcap, chunk_size=4096)
    run_and_compare((5, 40), 50000, dtype, "cuda", softcap=softcap, n_ignored=30, grad_in_forward=True)


@pytest.mark.gpu
def test_gpu_fp32(poison):
    run_and_compare((2, 100), 32000, torch.float32, "cuda", n_ignored=7)


@pytest.mark.gpu
def test_gpu_all_ignored():
    x = torch.randn(8, 1000, device="cuda", requires_grad=True)
    loss = cross_entropy(x * 1, torch.full((8,), -100, device="cuda"))
    loss.backward()
    assert torch.isnan(loss) and torch.equal(x.grad, torch.zeros_like(x))
