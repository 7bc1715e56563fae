"""The 4-bit Linear forward ``y = x @ W^T + b`` with W stored in the bitsandbytes NF4/FP4 format.

Paths, by the number of rows ``M = prod(x.shape[:-1])``:

* ``M == 1`` (decoding): a fused dequantize + GEMV Triton kernel. Each program owns ``BLOCK_N`` output
  features and walks the whole ``K`` axis, reading each packed byte once as a ``[BLOCK_N, NB, bs/2]``
  tile (``NB`` quantization blocks per step); the per-block dot product is reduced first and scaled by
  the block's absmax once, so the absmax (and its nested dequantization) costs one gather per block.
* ``1 < M <= FUSED_DOT_MAX_ROWS``: a fused dequantize + ``tl.dot`` kernel (W tiles never hit memory).
* larger ``M``: dequantize W once (``dequantize_nf4``) and call ``torch.matmul`` (cuBLAS).

The fused kernels need ``K % blocksize == 0`` (quantization blocks never straddle rows); other shapes
take the dequantize-then-matmul path. The autograd Function gives gradients to ``x`` (and ``bias``);
the weight is frozen: ``dx = dy @ W`` via dequantize + matmul.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qconv.errors import QconvError
from qconv.kernels.nf4_dequantize import HAS_TRITON, _packed_bytes, _state_fields, dequantize_nf4, state_tensors
from qconv.kernels.utils import FLOAT_DTYPES, is_interpreter

if HAS_TRITON:
    import triton
    import triton.language as tl

#: GEMV launch parameters (H100 sweep, docs/benchmarks.md): rows per program, bytes per row per step, warps.
GEMV_BLOCK_N = 8
GEMV_STEP_BYTES = 256
GEMV_NUM_WARPS = 4
GEMV_PAIR_TABLE = True
#: fused dequantize + tl.dot tiles (rows per tile: M rounded up to a power of two, 16 to 64)
DOT_BLOCK_N = 64
DOT_BLOCK_K = 128
DOT_NUM_WARPS = 4
DOT_NUM_STAGES = 3
DOT_PAIR_TABLE = True
#: Largest M that uses the fused dequantize + tl.dot kernel; above it dequantize + torch.matmul wins.
FUSED_DOT_MAX_ROWS = 16



# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference
# --------------------------------------------------------------------------------------------------
def matmul_nf4_reference(
    x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` with W dequantized by the PyTorch reference, computed in ``compute_dtype``."""
    from qconv.kernels.nf4_dequantize import dequantize_nf4_reference

    dtype = compute_dtype or x.dtype
    w = dequantize_nf4_reference(packed, quant_state, dtype, compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blk, mask,
                      NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
        """absmax of flat quantization blocks ``blk`` (dequantizing the nested absmax like bitsandbytes)."""
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0)
            scale = tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0)
            return scale + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + blk, mask=mask, other=0)

    @triton.jit
    def _code_values(code_ptr, q, PAIR: tl.constexpr, A: tl.constexpr, B: tl.constexpr, HALF_BS: tl.constexpr):
        """Unscaled values of byte tile ``q`` [A, B, HALF_BS] as [A, B, 2 * HALF_BS] (flat weight order)."""
        if PAIR:  # one 8-byte gather per byte from the [256, 2] (high, low) table
            t = tl.arange(0, 2)
            pair = tl.load(code_ptr + q[:, :, :, None].to(tl.int32) * 2 + t[None, None, None, :])
            return tl.reshape(pair, (A, B, 2 * HALF_BS))
        else:  # two 4-byte gathers per byte from the 16-entry code
            return tl.interleave(tl.load(code_ptr + (q >> 4)), tl.load(code_ptr + (q & 15)))

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        bias_ptr, y_ptr, N, K,
        HALF_BS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
        NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output features
        n_ok = n < N
        j = tl.arange(0, NB)  # quantization block within the step
        c = tl.arange(0, HALF_BS)  # byte within the block
        e = tl.arange(0, 2 * HALF_BS)  # element within the block
        blocks_per_row = K // (2 * HALF_BS)
        acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        for kb in range(0, blocks_per_row, NB):
            kblk = kb + j
            kblk_ok = kblk < blocks_per_row
            xt = tl.load(x_ptr + kblk[:, None] * (2 * HALF_BS) + e[None, :], mask=kblk_ok[:, None], other=0)
            blk = n[:, None] * blocks_per_row + kblk[None, :]  # [BLOCK_N, NB] flat block index
            blk_ok = n_ok[:, None] & kblk_ok[None, :]
            q = tl.load(packed_ptr + blk[:, :, None] * HALF_BS + c[None, None, :], mask=blk_ok[:, :, None], other=0)
            w = _code_values(code_ptr, q, PAIR, BLOCK_N, NB, HALF_BS)  # [BLOCK_N, NB, bs], absmax not applied yet
            part = tl.sum(w * xt.to(tl.float32)[None, :, :], axis=2)
            absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blk, blk_ok, NESTED, NESTED_BS)
            acc += part * absmax
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _nf4_dot_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        bias_ptr, y_ptr, M, N, K,
        HALF_BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
        NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        PAIR: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = m < M
        n_ok = n < N
        j = tl.arange(0, NB)
        c = tl.arange(0, HALF_BS)
        BLOCK_K: tl.constexpr = NB * 2 * HALF_BS
        kk = tl.arange(0, BLOCK_K)
        blocks_per_row = K // (2 * HALF_BS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, blocks_per_row, NB):
            kblk = kb + j
            blk = n[:, None] * blocks_per_row + kblk[None, :]
            blk_ok = n_ok[:, None] & (kblk < blocks_per_row)[None, :]
            q = tl.load(packed_ptr + blk[:, :, None] * HALF_BS + c[None, None, :], mask=blk_ok[:, :, None], other=0)
            absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blk, blk_ok, NESTED, NESTED_BS)
            w = _code_values(code_ptr, q, PAIR, BLOCK_N, NB, HALF_BS) * absmax[:, :, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # dequantized W[n, k-tile]
            k = kb * 2 * HALF_BS + kk
            xt = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0)
            if DOT_FP32:  # float32 x (IEEE, no tf32), or the interpreter (its bf16/fp16 dot is wrong)
                acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _fused_ok(f: dict[str, Any], K: int, M: int) -> bool:
    """Whether the fused kernels handle this shape: blocks within rows; small blocks for tl.dot tiles."""
    if K % f["blocksize"]:
        return False
    return M == 1 or (M <= FUSED_DOT_MAX_ROWS and f["blocksize"] <= 256)


def _gemv(x2: torch.Tensor, data: torch.Tensor, quant_state: Any, f: dict[str, Any], bias: torch.Tensor | None,
          block_n: int | None = None, step_bytes: int | None = None, num_warps: int | None = None,
          pair: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused dequantize + GEMV for one row ``x2`` [1, K] into ``out`` [1, N] (allocated when None)."""
    N, K = f["shape"]
    half = f["blocksize"] // 2
    block_n = block_n or (16 if is_interpreter() else GEMV_BLOCK_N)
    step_bytes = step_bytes or (4096 if is_interpreter() else GEMV_STEP_BYTES)
    pair = GEMV_PAIR_TABLE if pair is None else pair
    nb = max(1, min(step_bytes // half, 1 << max(0, (K // f["blocksize"] - 1).bit_length())))
    y = out if out is not None else torch.empty((1, N), dtype=x2.dtype, device=x2.device)
    absmax, table, nested_code, nested_absmax, offset, nested_bs = state_tensors(quant_state, f, x2.device, pair)
    _nf4_gemv_kernel[(triton_cdiv(N, block_n),)](
        x2, data, absmax, table, nested_code, nested_absmax, offset, bias if bias is not None else x2, y, N, K,
        HALF_BS=half, BLOCK_N=block_n, NB=nb, NESTED=f["nested"], NESTED_BS=nested_bs,
        HAS_BIAS=bias is not None, PAIR=pair, num_warps=num_warps or GEMV_NUM_WARPS,
    )
    return y


def _fused_dot(x2: torch.Tensor, data: torch.Tensor, quant_state: Any, f: dict[str, Any], bias: torch.Tensor | None,
               block_m: int | None = None, block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, pair: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused dequantize + tl.dot for ``x2`` [M, K] into ``out`` [M, N] (allocated when None)."""
    M, K = x2.shape
    N = f["shape"][0]
    half = f["blocksize"] // 2
    block_m = block_m or min(64, max(16, 1 << (M - 1).bit_length()))  # tl.dot tiles need >= 16 rows
    block_n, block_k = block_n or DOT_BLOCK_N, block_k or DOT_BLOCK_K
    pair = DOT_PAIR_TABLE if pair is None else pair
    nb = max(1, block_k // f["blocksize"])
    y = out if out is not None else torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    absmax, table, nested_code, nested_absmax, offset, nested_bs = state_tensors(quant_state, f, x2.device, pair)
    grid = (triton_cdiv(M, block_m), triton_cdiv(N, block_n))
    _nf4_dot_kernel[grid](
        x2, data, absmax, table, nested_code, nested_absmax, offset, bias if bias is not None else x2, y, M, N, K,
        HALF_BS=half, BLOCK_M=block_m, BLOCK_N=block_n, NB=nb, NESTED=f["nested"], NESTED_BS=nested_bs,
        HAS_BIAS=bias is not None, DOT_FP32=x2.dtype == torch.float32 or is_interpreter(), PAIR=pair,
        num_warps=num_warps or DOT_NUM_WARPS, num_stages=num_stages or DOT_NUM_STAGES,
    )
    return y

def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------------
# Forward dispatch and autograd
# --------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, f: dict[str, Any], bias: torch.Tensor | None) -> None:
    if len(f["shape"]) != 2:
        raise QconvError(f"matmul_nf4: the quantized weight must be 2-D [out, in], got shape {f['shape']}")
    N, K = f["shape"]
    if x.shape[-1] != K:
        raise QconvError(f"matmul_nf4: x has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise QconvError(f"matmul_nf4: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if bias is not None and bias.numel() != N:
        raise QconvError(f"matmul_nf4: bias has {bias.numel()} entries, expected {N}")


def _forward(x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None) -> torch.Tensor:
    f = _state_fields(quant_state)
    _check(x, f, bias)
    N, K = f["shape"]
    lead = x.shape[:-1]
    M = math.prod(lead)
    bias_c = bias.to(x.dtype).contiguous() if bias is not None else None
    on_triton = x.device.type == "cuda" or is_interpreter()
    if on_triton and x.dtype != torch.float64 and M >= 1 and _fused_ok(f, K, M):
        data = _packed_bytes(packed, f["numel"])
        x2 = x.reshape(M, K).contiguous()
        y = _gemv(x2, data, quant_state, f, bias_c) if M == 1 else _fused_dot(x2, data, quant_state, f, bias_c)
        return y.reshape(*lead, N)
    w = _dequantize_for(packed, quant_state, x.dtype)
    y = torch.matmul(x, w.t())
    return y + bias_c if bias_c is not None else y


def _dequantize_for(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """W in ``dtype``; float64 (for gradcheck) is the exact upcast of the float32 dequantization."""
    if dtype == torch.float64:
        return dequantize_nf4(packed, quant_state, torch.float32).double()
    return dequantize_nf4(packed, quant_state, dtype)


class MatmulNF4Function(torch.autograd.Function):
    """``y = x @ W^T + b`` with a frozen 4-bit W; gradients flow to ``x`` and ``bias``."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        ctx.packed, ctx.quant_state = packed, quant_state
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _forward(x, packed, quant_state, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize_for(ctx.packed, ctx.quant_state, dy.dtype)
            dx = torch.matmul(dy, w)
        if ctx.bias_needs_grad:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, None, None, dbias


def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit Linear forward ``x @ W^T + bias`` (W: dequantized ``[out, in]`` weight), in ``x.dtype``.

    Differentiable in ``x`` and ``bias``; the packed weight is frozen. ``x`` may be float64 (tests,
    gradcheck): W is then the float32 dequantization upcast.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return MatmulNF4Function.apply(x, packed, quant_state, bias)
    return _forward(x, packed, quant_state, bias)
