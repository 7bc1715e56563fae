"""The 4-bit Linear forward ``y = x @ W^T + b`` with W stored in the bitsandbytes NF4/FP4 format.

Paths, by the number of rows ``M = prod(x.shape[:-1])``:

* ``M == 1`` (decoding one sequence): the persistent ``rows`` kernel of ``nf4_gemv.py`` (x held in
  registers, 128-bit weight loads, the code looked up in registers with ``prmt``, prefetch one group
  of rows ahead), launched directly from a cached compiled kernel after the first call.
* ``2 <= M <= GEMV_MAX_ROWS``: the ``tile`` kernel below. Each program owns ``BLOCK_N`` output
  features and walks all of K as ``[BLOCK_N, NB, bs/2]`` byte tiles; both nibbles of a byte are looked
  up in the 16-entry code, each block's dot product with x is reduced in float32 and scaled by the
  block's absmax (nested dequantization once per block). A split-K variant was measured slower on an
  H100 and removed (docs/benchmarks.md).
* larger ``M``: dequantize W once (``dequantize_nf4``) and call ``torch.matmul`` (cuBLAS). A fused
  dequantize + ``tl.dot`` kernel was measured slower than this at every M on an H100 (docs/benchmarks.md).

The GEMV kernels need ``K % blocksize == 0`` (quantization blocks never straddle rows); other shapes
take the dequantize-then-matmul path. Calls that need no gradient skip autograd and the quant-state
validation: kernel arguments are cached per quant state (``_GemvPlan``). The autograd Function gives
gradients to ``x`` (and ``bias``); the weight is frozen: ``dx = dy @ W`` via dequantize + matmul.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qconv.errors import QconvError
from qconv.kernels.nf4_dequantize import HAS_TRITON, _packed_bytes, _state_fields, dequantize_nf4, state_tensors
from qconv.kernels.nf4_gemv import code_planes, rows_launch
from qconv.kernels.utils import FLOAT_DTYPES, is_interpreter, on_tensor_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qconv.kernels.nf4_gemv import _nf4_gemv_rows_kernel

logger = logging.getLogger(__name__)

#: tile kernel (2-4 rows; H100 sweep, docs/benchmarks.md): features per program, packed bytes per
#: feature per step, warps, code lookup (True: one gather per byte from a 256-entry pair table), x split
#: into even/odd elements (True) or the weight tile interleaved (False).
GEMV_BLOCK_N = 4
GEMV_STEP_BYTES = 1024
GEMV_NUM_WARPS = 4
GEMV_PAIR_TABLE = False
GEMV_EVEN_ODD = False
#: Rows of x per GEMV program (a power of two), and the largest M that takes the GEMV path (above it
#: dequantize + torch.matmul was faster on the H100).
GEMV_ROWS_PER_PROGRAM = 4
GEMV_MAX_ROWS = 4
#: One row of x (M = 1) takes the persistent ``rows`` kernel of ``nf4_gemv.py`` (x held in registers,
#: 128-bit weight loads, code lookup in registers); 2-4 rows take the ``tile`` kernel below.
GEMV_ROWS_KERNEL = True


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
    def _nibble_values(code_ptr, q, PAIR: tl.constexpr):
        """Unscaled (high, low) nibble values of the byte tile ``q`` [A, B, C], each [A, B, C]."""
        if PAIR:  # one 8-byte gather per byte from the [256, 2] (high, low) table
            t = tl.arange(0, 2)
            return tl.split(tl.load(code_ptr + q[:, :, :, None].to(tl.int32) * 2 + t[None, None, None, :]))
        else:  # two 4-byte gathers per byte from the 16-entry code
            return tl.load(code_ptr + (q >> 4)), tl.load(code_ptr + (q & 15))

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        bias_ptr, y_ptr, M, N, K,
        HALF_BS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr,
        NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR: tl.constexpr,
        EVEN_ODD: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output features
        n_ok = n < N
        r_idx = tl.arange(0, ROWS)
        j = tl.arange(0, NB)  # quantization block within the step
        c = tl.arange(0, HALF_BS)  # byte within the block
        t = tl.arange(0, 2)
        blocks_per_row = K // (2 * HALF_BS)
        acc = tl.zeros((ROWS, BLOCK_N, NB), dtype=tl.float32)
        for kb in range(0, blocks_per_row, NB):
            kblk = kb + j
            kblk_ok = kblk < blocks_per_row
            blk = n[:, None] * blocks_per_row + kblk[None, :]  # [BLOCK_N, NB] flat block index
            blk_ok = n_ok[:, None] & kblk_ok[None, :]
            q = tl.load(packed_ptr + blk[:, :, None] * HALF_BS + c[None, None, :], mask=blk_ok[:, :, None], other=0)
            absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blk, blk_ok, NESTED, NESTED_BS)
            hi, lo = _nibble_values(code_ptr, q, PAIR)  # [BLOCK_N, NB, HALF_BS] each
            if not EVEN_ODD:
                w = tl.interleave(hi, lo)  # [BLOCK_N, NB, bs] in weight order
            for r in tl.static_range(ROWS):
                m = pid_m * ROWS + r
                x_row = x_ptr + m.to(tl.int64) * K
                x_ok = kblk_ok & ((m + 0 * j) < M)  # [NB]
                if EVEN_ODD:  # x[k] for k = 2c (high nibble) and 2c + 1 (low nibble) of each block
                    xk = tl.load(x_row + kblk[:, None, None] * (2 * HALF_BS) + 2 * c[None, :, None] + t[None, None, :],
                                 mask=x_ok[:, None, None], other=0)
                    xe, xo = tl.split(xk.to(tl.float32))  # [NB, HALF_BS] each
                    part = tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2)
                else:
                    e = tl.arange(0, 2 * HALF_BS)
                    xk = tl.load(x_row + kblk[:, None] * (2 * HALF_BS) + e[None, :], mask=x_ok[:, None], other=0)
                    part = tl.sum(w * xk.to(tl.float32)[None, :, :], axis=2)
                acc += tl.where(r_idx[:, None, None] == r, (part * absmax)[None, :, :], 0.0)
        y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)[None, :]
        m_all = pid_m * ROWS + r_idx
        tl.store(y_ptr + m_all[:, None].to(tl.int64) * N + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(m_all < M)[:, None] & n_ok[None, :])


def _gemv(x2: torch.Tensor, data: torch.Tensor, quant_state: Any, f: dict[str, Any], bias: torch.Tensor | None,
          block_n: int | None = None, step_bytes: int | None = None, num_warps: int | None = None,
          pair: bool | None = None, even_odd: bool | None = None, rows: int | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused dequantize + GEMV of ``x2`` [M, K] into ``out`` [M, N] (allocated when None)."""
    M, K = x2.shape
    N = f["shape"][0]
    half = f["blocksize"] // 2
    block_n = block_n or (16 if is_interpreter() else GEMV_BLOCK_N)
    step_bytes = step_bytes or (4096 if is_interpreter() else GEMV_STEP_BYTES)
    pair = GEMV_PAIR_TABLE if pair is None else pair
    even_odd = GEMV_EVEN_ODD if even_odd is None else even_odd
    rows = rows or min(GEMV_ROWS_PER_PROGRAM, 1 << (M - 1).bit_length())
    nb = max(1, min(step_bytes // half, 1 << max(0, (K // f["blocksize"] - 1).bit_length())))
    y = out if out is not None else torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    absmax, table, nested_code, nested_absmax, offset, nested_bs = state_tensors(quant_state, f, x2.device, pair)
    grid = (triton_cdiv(N, block_n), triton_cdiv(M, rows))
    _nf4_gemv_kernel[grid](
        x2, data, absmax, table, nested_code, nested_absmax, offset, bias if bias is not None else x2, y, M, N, K,
        HALF_BS=half, BLOCK_N=block_n, NB=nb, ROWS=rows, NESTED=f["nested"], NESTED_BS=nested_bs,
        HAS_BIAS=bias is not None, PAIR=pair, EVEN_ODD=even_odd, num_warps=num_warps or GEMV_NUM_WARPS,
    )
    return y


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _GemvPlan:
    """Per (quant state, packed weight, device): the GEMV kernels' weight arguments and cached launchers."""

    def __init__(self, packed: torch.Tensor, quant_state: Any, f: dict[str, Any], device: torch.device):
        self.packed, self.absmax, self.f, self.device = packed, quant_state.absmax, f, device
        self.N, self.K = f["shape"]
        self.data = _packed_bytes(packed, f["numel"])
        # the rows kernel reads 32-bit words: the row length K/2 is a multiple of 16 bytes (blocksize >= 32)
        self.words = self.data.view(torch.int32) if self.data.data_ptr() % 16 == 0 else None
        self.state = state_tensors(quant_state, f, device, False)
        self.planes = code_planes(f["code"]) if device.type == "cuda" else None
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.launchers: dict[tuple, Any] = {}

    def rows(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The rows kernel for one row ``x`` [K]: a cached direct launch after the first call."""
        key = (x.dtype, bias is not None, x.data_ptr() % 16, 0 if bias is None else bias.data_ptr() % 16)
        launcher = self.launchers.get(key)
        if launcher is not None:
            return launcher(x, bias)
        y = torch.empty(self.N, dtype=x.dtype, device=x.device)
        grid, args, kw = rows_launch(x, self.words, self.state, self.planes, self.f, bias, y, self.sm_count)
        compiled = _nf4_gemv_rows_kernel[grid](*args, **kw)
        if x.is_cuda and not torch.cuda.is_current_stream_capturing():
            launcher = _direct_launcher(compiled, grid, args, kw, x, bias, y)
            if launcher is not None:
                self.launchers[key] = launcher
        return y


#: Whether launching a cached compiled kernel directly gave the same result as Triton's launcher
#: (checked once per process on the first CUDA call; None: not yet checked).
_DIRECT_LAUNCH_OK: bool | None = None


def _direct_launcher(compiled: Any, grid: tuple, args: list, consts: dict, x: torch.Tensor,
                     bias: torch.Tensor | None, y_ref: torch.Tensor):
    """A launcher that calls the compiled rows kernel directly (no per-call argument binding), or None."""
    global _DIRECT_LAUNCH_OK
    try:
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        get_stream = torch._C._cuda_getCurrentRawStream
    except AttributeError:  # another Triton: keep its launcher
        return None
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    names = _nf4_gemv_rows_kernel.arg_names  # every parameter, constexprs included, in signature order
    values = dict(zip(names, args), **{k: v for k, v in consts.items() if k in names})
    if len(values) != len(names):
        return None
    mid, tail = tuple(args[1:7]), tuple(values[k] for k in names[9:])
    n, dtype, device, index = y_ref.shape[0], x.dtype, x.device, x.device.index

    def launch(xv: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if torch.cuda.current_device() != index:  # the kernel is loaded for this device's context
            with torch.cuda.device(index):
                return launch(xv, b)
        y = torch.empty(n, dtype=dtype, device=device)
        run(g0, g1, g2, get_stream(index), function, metadata, None, None, None,
            xv, *mid, xv if b is None else b, y, *tail)
        return y

    if _DIRECT_LAUNCH_OK is None:
        try:
            got = launch(x, bias).float()
            ref = y_ref.float()
            _DIRECT_LAUNCH_OK = bool(torch.equal(got, ref))
        except Exception as exc:  # noqa: BLE001 - a launcher ABI we do not know: keep Triton's
            logger.warning("matmul_nf4: direct kernel launch failed (%s); using Triton's launcher", exc)
            _DIRECT_LAUNCH_OK = False
        if not _DIRECT_LAUNCH_OK:
            logger.warning("matmul_nf4: direct kernel launch disagrees with Triton's launcher; using Triton's")
    return launch if _DIRECT_LAUNCH_OK else None


def _gemv_plan(packed: torch.Tensor, quant_state: Any, x: torch.Tensor) -> _GemvPlan | None:
    """The cached GEMV plan of this weight for x's device, or None when the GEMV path cannot take x."""
    plan = getattr(quant_state, "_qconv_gemv_plan", None)
    if plan is not None and plan.packed is packed and plan.absmax is quant_state.absmax and plan.device == x.device:
        return plan
    if not (x.device.type == "cuda" or is_interpreter()):
        return None
    f = _state_fields(quant_state)
    if len(f["shape"]) != 2 or f["shape"][1] % f["blocksize"]:
        return None
    plan = _GemvPlan(packed, quant_state, f, x.device)
    try:
        quant_state._qconv_gemv_plan = plan
    except AttributeError:  # a state object that takes no attributes: plan every call
        pass
    return plan


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
    plan = _gemv_plan(packed, quant_state, x) if x.dtype != torch.float64 else None
    if plan is not None and x.shape[-1] == plan.K and (bias is None or bias.numel() == plan.N):
        M = x.numel() // plan.K
        if 1 <= M <= GEMV_MAX_ROWS and x.dtype in FLOAT_DTYPES:  # decoding: the fast path
            x2 = x.reshape(M, plan.K)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
                bias = bias.to(x.dtype).contiguous()
            if M == 1 and GEMV_ROWS_KERNEL and plan.words is not None:
                y = plan.rows(x2.view(plan.K), bias)
            else:
                y = _gemv(x2, plan.data, quant_state, plan.f, bias)
            return y.view(*x.shape[:-1], plan.N)
    f = _state_fields(quant_state)
    _check(x, f, bias)
    bias_c = bias.to(x.dtype).contiguous() if bias is not None else None
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


@on_tensor_device
def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit Linear forward ``x @ W^T + bias`` (W: dequantized ``[out, in]`` weight), in ``x.dtype``.

    Differentiable in ``x`` and ``bias``; the packed weight is frozen. ``x`` may be float64 (tests,
    gradcheck): W is then the float32 dequantization upcast.
    """
    if (x.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
        return MatmulNF4Function.apply(x, packed, quant_state, bias)
    return _forward(x, packed, quant_state, bias)
