"""RMSNorm forward and backward in Triton, with the dtype behaviour of transformers' modules.

``y = x / sqrt(mean(x^2) + eps) * (offset + w)``, statistics in float32. Two castings, as in transformers:

* ``"llama"`` (``LlamaRMSNorm``, Mistral, Qwen2/3, ...): the normalized ``x`` is rounded to ``x.dtype``
  before it is multiplied by ``w``; the output dtype is ``promote(w.dtype, x.dtype)``.
* ``"gemma"`` (``Gemma2RMSNorm``, ``(1 + w)`` with ``offset=1.0``): everything in float32, the output is
  cast to ``x.dtype``.

The default casting is ``"llama"`` for ``offset == 0`` and ``"gemma"`` otherwise. Layout: the forward
normalizes a ``[BLOCK_M, n_cols]`` tile of whole rows per program and keeps ``1/rms`` per row (float32)
for the backward. The backward runs a few programs per SM, each looping over row tiles and accumulating
its share of ``dw`` in float32; the shares are summed at the end. ``dx`` is written into the incoming
gradient when nobody else holds it (``qconv.kernels.inplace``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qconv.errors import QconvError
from qconv.kernels.inplace import ensure_calibrated, grad_is_exclusive
from qconv.kernels.utils import check_device, next_power_of_2, on_tensor_device

MAX_COLS = 65536
#: Launch parameters (benchmarks may override them): elements per forward tile, backward programs per SM.
TUNING = {"fwd_tile": 4096, "fwd_warps": 0, "bwd_tile": 16384, "bwd_warps": 16, "bwd_programs_per_sm": 1}  # 0: auto
INTERPRETER_TILE = 65536


# ------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, used by tests and benchmarks)
# ------------------------------------------------------------------------------------------------
def _resolve_casting(offset: float, casting: str | None) -> str:
    casting = casting or ("llama" if offset == 0.0 else "gemma")
    if casting not in ("llama", "gemma"):
        raise QconvError(f"rms_norm: casting must be 'llama' or 'gemma', got {casting!r}")
    return casting


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       casting: str | None = None) -> torch.Tensor:
    """What LlamaRMSNorm / Gemma2RMSNorm compute (statistics in at least float32)."""
    casting = _resolve_casting(offset, casting)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (xhat * (offset + weight.to(compute))).to(x.dtype)
    w = weight if offset == 0.0 else weight + offset
    return w * xhat.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps, offset,
                         GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x_raw = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    xhat = x * rstd[:, None]
    if not GEMMA:  # transformers rounds the normalized x to the input dtype before the weight multiply
        xhat = xhat.to(x_raw.dtype).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                         offset, GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_raw = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x_raw.to(tl.float32) * rstd[:, None]
        m = dy * w[None, :]
        c = tl.sum(m * xhat, axis=1) / n_cols
        dx = (m - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if not GEMMA:
                xhat = xhat.to(x_raw.dtype).to(tl.float32)
            dw += tl.sum(dy * xhat, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(x: torch.Tensor, per_sm: int) -> int:
    return _sm_count(x.get_device()) * per_sm if x.is_cuda else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(n_rows: int, block_n: int, elements: int, warps: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for tiles of about ``elements`` values (whole rows)."""
    if not cuda:  # the interpreter: few, large programs
        elements, warps = INTERPRETER_TILE, 4
    block_m = max(1, min(next_power_of_2(n_rows), elements // block_n))
    warps = warps or min(16, max(4, block_m * block_n // 512))
    return block_m, warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, gemma: bool,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    block_n = next_power_of_2(n_cols)
    block_m, warps = _tile(n_rows, block_n, TUNING["fwd_tile"], TUNING["fwd_warps"], x2.is_cuda)
    grid = (_cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps, offset,
                               GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, rstd


def _backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
              gemma: bool, dx: torch.Tensor, compute_dw: bool) -> torch.Tensor | None:
    n_rows, n_cols = x2.shape
    block_n = next_power_of_2(n_cols)
    block_m, warps = _tile(n_rows, block_n, TUNING["bwd_tile"], TUNING["bwd_warps"], x2.is_cuda)
    programs = max(1, min(_cdiv(n_rows, block_m), _programs(x2, TUNING["bwd_programs_per_sm"])))
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else rstd
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_part, n_rows, n_cols, dy2.stride(0),
                                      x2.stride(0), dx.stride(0), offset, GEMMA=gemma, COMPUTE_DW=compute_dw,
                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dw_part.sum(0).to(weight.dtype) if compute_dw else None


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, w and 1/rms; the backward recomputes the normalized x."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma, out_dtype):
        ensure_calibrated()
        x2 = _as_rows(x)
        y, rstd = _forward(x2, weight, eps, offset, gemma, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.gemma, ctx.x_shape = offset, gemma, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        reuse = grad_is_exclusive(dy)
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _as_rows(dy)  # a copy (when dy is not viewable as rows) is ours to overwrite
        reuse = reuse or dy2.data_ptr() != dy.data_ptr()
        # dx has x's dtype; the incoming gradient has the output's (they differ for fp32 w on bf16 x)
        dx = dy2 if reuse and dy2.dtype == x2.dtype else torch.empty_like(x2)
        dw = _backward(dy2, x2, weight, rstd, ctx.offset, ctx.gemma, dx, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None, None, None, None


@on_tensor_device
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *,
             casting: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` with weight ``offset + weight`` (Gemma: ``offset=1.0``).

    Differentiable in ``x`` and ``weight``. ``casting`` ("llama"/"gemma") defaults from ``offset``: see
    the module docstring for the dtype behaviour.
    """
    casting = _resolve_casting(float(offset), casting)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise QconvError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if x.shape[-1] > MAX_COLS:
        raise QconvError(f"rms_norm: rows of {x.shape[-1]} values exceed the supported {MAX_COLS}")
    if x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset, casting)
    if not (x.is_cuda and weight.is_cuda):
        check_device(x, weight, name="rms_norm")
    gemma = casting == "gemma"
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), gemma, out_dtype)
