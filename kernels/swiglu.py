"""Gated MLP activations in Triton: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu(gate, up) = gelu(gate) * up``.

Element-wise, float32 inside, one rounding to the input dtype. The forward saves only gate and up; the
backward recomputes the activation. Memory as in Liger: when gate and up are autograd intermediates (the
outputs of gate_proj/up_proj) the backward writes their gradients into their own storage, which autograd
is told about (a later reader of the old values fails loudly); pass ``inplace_backward=False`` to keep
them. Otherwise the gate gradient goes into the incoming gradient's storage when nobody else holds it.
Rows may be strided (gate/up as halves of a fused projection); the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qconv.errors import QconvError
from qconv.kernels.inplace import bump_version, ensure_calibrated, grad_is_exclusive, is_graph_intermediate
from qconv.kernels.utils import _tanh, check_device, next_power_of_2, on_tensor_device

SILU, GELU_TANH, GELU_ERF = 0, 1, 2
_GELU = {"tanh": GELU_TANH, "none": GELU_ERF}
#: Launch parameters (benchmarks may override them): elements per program, warps.
TUNING = {"block": 4096, "num_warps": 16}
INTERPRETER_BLOCK = 1 << 16


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` (what LlamaMLP computes)."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``F.gelu(gate, approximate=...) * up`` (Gemma's gelu_pytorch_tanh MLP)."""
    return F.gelu(gate, approximate=approximate) * up


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))  # never overflows
    r = 1.0 / (1.0 + z)
    return tl.where(x >= 0, r, z * r)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """act(g) and, when WITH_GRAD, act'(g) (else 0), all float32."""
    if ACT == 0:  # silu
        s = _sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s)) if WITH_GRAD else 0.0
    elif ACT == 1:  # gelu, tanh approximation
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        t = _tanh(k0 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g * g) if WITH_GRAD else 0.0
    else:  # gelu, exact (erf)
        e = tl.erf(g * 0.7071067811865476)
        a = 0.5 * g * (1.0 + e)
        da = 0.5 * (1.0 + e) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327 if WITH_GRAD else 0.0
    return a, da


@triton.jit
def _glu_fwd_kernel(G, U, C, n_cols, col_blocks, s_g, s_u, s_c, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(C + row * s_c + cols, (a * u).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DC, G, U, DG, DU, n_cols, col_blocks, s_dc, s_g, s_u, s_dg, s_du,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dc = tl.load(DC + row * s_dc + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(DG + row * s_dg + cols, (dc * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * s_du + cols, (dc * a).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols] with a contiguous last dim; a fully contiguous tensor becomes one long row."""
    if t.is_contiguous():
        return t.view(1, -1)
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_shape(n_cols: int, cuda: bool) -> tuple[int, int]:
    if not cuda:  # the interpreter: few, large programs
        return min(INTERPRETER_BLOCK, next_power_of_2(n_cols)), 4
    return min(TUNING["block"], next_power_of_2(n_cols)), TUNING["num_warps"]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride()


class GatedActFunction(torch.autograd.Function):
    """Autograd wrapper for act(gate) * up; saves gate and up, recomputes act in backward."""

    @staticmethod
    def forward(ctx, gate, up, act, reuse_inputs):
        ensure_calibrated()
        g2, u2 = _rows(gate), _rows(up)
        if not _same_layout(g2, u2):  # e.g. one contiguous, one strided: use per-row views of both
            g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
            g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
            u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        n_rows, n_cols = g2.shape
        block, warps = _launch_shape(n_cols, g2.is_cuda)
        col_blocks = _cdiv(n_cols, block)
        _glu_fwd_kernel[(n_rows * col_blocks,)](g2, u2, out, n_cols, col_blocks, g2.stride(0), u2.stride(0),
                                                out.stride(0), ACT=act, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(g2, u2)
        ctx.act, ctx.shape = act, gate.shape
        ctx.reuse = reuse_inputs
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dc):
        dc_owned = grad_is_exclusive(dc)
        g2, u2 = ctx.saved_tensors
        dc2 = dc.reshape(g2.shape)
        dc2 = dc2 if dc2.stride(-1) == 1 else dc2.contiguous()
        dc_owned = dc_owned or dc2.data_ptr() != dc.data_ptr()  # a copy made here is ours
        if ctx.reuse:
            dg, du = g2, u2
        else:
            dg = dc2 if dc_owned else torch.empty_like(g2)
            du = torch.empty_like(u2)
        n_rows, n_cols = g2.shape
        block, warps = _launch_shape(n_cols, g2.is_cuda)
        col_blocks = _cdiv(n_cols, block)
        _glu_bwd_kernel[(n_rows * col_blocks,)](dc2, g2, u2, dg, du, n_cols, col_blocks, dc2.stride(0),
                                                g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
                                                ACT=ctx.act, BLOCK=block, num_warps=warps)
        if ctx.reuse:
            bump_version(g2, u2)
            dg, du = dg.detach(), du.detach()
        return dg.reshape(ctx.shape), du.reshape(ctx.shape), None, None


def _gated(gate: torch.Tensor, up: torch.Tensor, act: int, inplace_backward: bool, name: str) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise QconvError(f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if gate.numel() == 0:
        return (geglu_reference(gate, up, "tanh" if act == GELU_TANH else "none") if act else swiglu_reference(gate, up))
    if not (gate.is_cuda and up.is_cuda):
        check_device(gate, up, name=name)
    reuse = bool(inplace_backward and torch.is_grad_enabled() and is_graph_intermediate(gate)
                 and is_graph_intermediate(up) and _reusable_layout(gate) and _reusable_layout(up)
                 and gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr())
    return GatedActFunction.apply(gate, up, act, reuse)


def _reusable_layout(t: torch.Tensor) -> bool:
    """The saved [rows, cols] form of ``t`` is ``t``'s own memory (no copy) and rows do not overlap."""
    if t.is_contiguous():
        return True
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() else t
    return t2.stride(-1) == 1 and t2.data_ptr() == t.data_ptr() and t2.stride(0) >= t2.shape[-1]


@on_tensor_device
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, inplace_backward: bool = True) -> torch.Tensor:
    """``silu(gate) * up``, differentiable in both (see the module docstring for memory reuse)."""
    return _gated(gate, up, SILU, inplace_backward, "swiglu")


@on_tensor_device
def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          inplace_backward: bool = True) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` with ``approximate`` "tanh" (gelu_pytorch_tanh) or "none" (erf)."""
    if approximate not in _GELU:
        raise QconvError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return _gated(gate, up, _GELU[approximate], inplace_backward, "geglu")

