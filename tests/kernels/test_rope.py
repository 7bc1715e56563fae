"""apply_rope (Triton) against transformers' rotate_half formula evaluated in float64.

CPU tests run under TRITON_INTERPRET=1; `gpu` tests run compiled in bf16/fp16. Tolerances (relative
Frobenius error vs float64): 1e-5 for float32 inputs, 1e-2 bf16, 2e-3 fp16. Fresh outputs are poisoned
with NaN; NaN never passes.
"""

from __future__ import annotations

import pytest
import torch

from kernel_testing import TOL, needs_interpreter, poison_fixture, rel_err
from qconv.errors import QconvError
from qconv.kernels.rope import apply_rope, apply_rope_reference


poison = poison_fixture()


def cos_sin(cos_batch, seq, rot, dtype, device, duplicated=True):
    pos = torch.arange(seq, device=device)[None].expand(cos_batch, seq).float() + torch.arange(cos_batch, device=device)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], -1) if duplicated else torch.cat([freqs, freqs * 0.7], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def run_and_compare(bsz, n_q, n_kv, seq, head_dim, rot, cos_batch, dtype, device, layout="bshd", duplicated=True):
    """q/k built like transformers (projection output viewed [b, s, h, d], transposed) or contiguous."""
    torch.manual_seed(seq * 31 + head_dim)
    shape_q = (bsz, seq, n_q, head_dim) if layout == "bshd" else (bsz, n_q, seq, head_dim)
    shape_k = (bsz, seq, n_kv, head_dim) if layout == "bshd" else (bsz, n_kv, seq, head_dim)
    q_leaf = torch.randn(shape_q, dtype=dtype, device=device, requires_grad=True)
    k_leaf = torch.randn(shape_k, dtype=dtype, device=device, requires_grad=True)
    cos, sin = cos_sin(cos_batch, seq, rot, dtype, device, duplicated)
    q, k = q_leaf * 1, k_leaf * 1
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q_out, k_out = apply_rope(q, k, cos, sin)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq, dk))

    qd, kd = (t.detach().double().requires_grad_() for t in (q_leaf, k_leaf))
    q_ref, k_ref = (qd.transpose(1, 2), kd.transpose(1, 2)) if layout == "bshd" else (qd, kd)
    q_ref, k_ref = apply_rope_reference(q_ref, k_ref, cos.double(), sin.double())
    torch.autograd.backward((q_ref, k_ref), (dq.double(), dk.double()))
    tol = TOL[dtype]
    assert rel_err(q_out, q_ref) < tol and rel_err(k_out, k_ref) < tol
    assert rel_err(q_leaf.grad, qd.grad) < tol and rel_err(k_leaf.grad, kd.grad) < tol
    return q, q_out


CASES = [  # bsz, n_q, n_kv, seq, head_dim, rot, cos_batch
    (2, 4, 2, 37, 16, 16, 1),   # GQA, odd sequence
    (1, 3, 1, 5, 24, 24, 1),    # MQA, half head_dim 12 (not a power of two)
    (2, 2, 2, 9, 32, 16, 2),    # partial rotary, per-batch cos/sin
    (1, 8, 8, 70, 64, 64, 1),   # more positions than one block
]


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_matches_reference_fp32(poison, case, layout):
    run_and_compare(*case, torch.float32, "cpu", layout=layout)


@needs_interpreter
@pytest.mark.parametrize("block_s,block_h", [(4, 2), (8, 1)])
def test_small_blocks_step_over_heads_and_positions(poison, monkeypatch, block_s, block_h):
    """Several head steps per program, a ragged last head step (3 q heads) and a ragged last position block."""
    from qconv.kernels import rope

    monkeypatch.setattr(rope, "INTERPRETER_TUNING", {"block_s": block_s, "block_h": block_h})
    run_and_compare(2, 3, 1, 11, 16, 16, 2, torch.float32, "cpu")
    run_and_compare(1, 4, 2, 9, 24, 16, 1, torch.float32, "cpu", layout="bhsd")


@needs_interpreter
def test_bf16_and_distinct_halves(poison):
    run_and_compare(1, 4, 2, 10, 16, 16, 1, torch.bfloat16, "cpu")
    run_and_compare(1, 4, 2, 10, 16, 16, 1, torch.float32, "cpu", duplicated=False)


@needs_interpreter
def test_views_of_a_fused_qkv_projection(poison):
    """q and k as column slices of one qkv output (not dense): rotated out of place, right values."""
    qkv_leaf = torch.randn(2, 7, (4 + 2 + 2) * 16, requires_grad=True)
    cos, sin = cos_sin(1, 7, 16, torch.float32, "cpu")
    q, k, _ = (qkv_leaf * 1).view(2, 7, 8, 16).split([4, 2, 2], dim=2)
    q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    (q_out.square().sum() + k_out.sum()).backward()
    qkv_d = qkv_leaf.detach().double().requires_grad_()
    qd, kd, _ = qkv_d.view(2, 7, 8, 16).split([4, 2, 2], dim=2)
    q_ref, k_ref = apply_rope_reference(qd.transpose(1, 2), kd.transpose(1, 2), cos.double(), sin.double())
    (q_ref.square().sum() + k_ref.sum()).backward()
    assert rel_err(q_out, q_ref) < 1e-5 and rel_err(k_out, k_ref) < 1e-5
    assert rel_err(qkv_leaf.grad, qkv_d.grad) < 1e-5


@needs_interpreter
def test_inplace_for_intermediates_and_loud_when_saved_elsewhere():
    q_leaf = torch.randn(1, 6, 2, 8, requires_grad=True)
    k_leaf = torch.randn(1, 6, 2, 8, requires_grad=True)
    cos, sin = cos_sin(1, 6, 8, torch.float32, "cpu")
    q, k = (q_leaf * 1).transpose(1, 2), (k_leaf * 1).transpose(1, 2)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.equal(q, q_out)  # rotated in place

    # something else saved q before the rotation: its backward must fail, not use rotated values
    pre = q_leaf * 1
    saved = pre.sin()  # sin saves its input
    q_out, _ = apply_rope(pre.transpose(1, 2), (k_leaf * 1).transpose(1, 2), cos, sin)
    with pytest.raises(RuntimeError, match="inplace"):
        (saved.sum() + q_out.sum()).backward()


@needs_interpreter
def test_leaves_and_no_grad_inputs_untouched():
    cos, sin = cos_sin(1, 5, 8, torch.float32, "cpu")
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, requires_grad=True)
    q0, k0 = q.detach().clone(), k.detach().clone()
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0) and q_out.data_ptr() != q.data_ptr()
    with torch.no_grad():
        qn, kn = q0.clone(), k0.clone()
        apply_rope(qn, kn, cos, sin)
        assert torch.equal(qn, q0)
        q_in, k_in = apply_rope(qn, kn, cos, sin, inplace=True)
        assert q_in.data_ptr() == qn.data_ptr() and torch.allclose(qn, q_out.detach(), atol=1e-6)
        ref_q, ref_k = apply_rope_reference(q0, k0, cos, sin)
        assert rel_err(kn, ref_k) < 1e-6


def test_shape_errors():
    cos, sin = cos_sin(1, 5, 8, torch.float32, "cpu")
    with pytest.raises(QconvError, match="cos/sin"):
        apply_rope(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), cos, sin)
    with pytest.raises(QconvError, match="does not match"):
        apply_rope(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [(2, 32, 8, 300, 128, 128, 1), (1, 12, 4, 257, 64, 64, 1), (2, 6, 2, 33, 96, 64, 2)])
def test_gpu(poison, dtype, case):
    q, q_out = run_and_compare(*case, dtype, "cuda")
    assert q_out.data_ptr() == q.data_ptr()
