"""Cross-entropy over a large vocabulary in Triton, never holding a float32 copy of the logits.

``cross_entropy(logits, labels)`` equals ``F.cross_entropy(logits.float(), labels, ignore_index=...)``
(the mean over non-ignored tokens; NaN when every token is ignored, like torch; the gradient is then zero).
``softcap=c`` applies Gemma 2's final-logit soft-capping ``c * tanh(x / c)`` inside. The loss is float32.

Forward: one program per row walks the vocabulary in chunks of ``chunk_size`` with an online
logsumexp (float32), writes the row's loss and logsumexp, and skips ignored rows without reading them; a
one-program kernel then sums the rows in a fixed order (deterministic) and counts the tokens on the
device, so nothing waits for the GPU. Backward: ``softmax - onehot`` scaled by ``grad / n_tokens``,
recomputed from the logits and the saved logsumexp in float32 chunks and written in the logits' dtype.
The logits stay intact in the forward (unlike Liger, which overwrites them there: trainers that read
``outputs.logits`` for metrics between the loss and the backward see gradients); in the backward the
gradient is written into the logits' own storage when they are an autograd intermediate (the lm_head
output), and autograd is told (a later reader of the old values fails loudly); pass
``inplace_backward=False`` to keep them. ``grad_in_forward=True`` opts into Liger's scheme (see
``cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qconv.errors import QconvError
from qconv.kernels.inplace import bump_version, is_graph_intermediate
from qconv.kernels.utils import _tanh, check_device, next_power_of_2, on_tensor_device

#: Launch parameters (benchmarks may override them). grad_in_forward uses few large programs (gif_*) so
#: that a row read by the first pass is still in L2 for the second.
TUNING = {"fwd_chunk": 8192, "fwd_warps": 8, "bwd_block": 4096, "bwd_warps": 8, "gif_chunk": 32768, "gif_warps": 32}
INTERPRETER_CHUNK = 16384
_REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                            softcap: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """What transformers' causal-LM loss computes: upcast to (at least) float32, soft-cap, F.cross_entropy."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


@triton.jit
def _ce_grad(x, lse, label, cols, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(softmax - onehot) * scale`` for float32 logits ``x`` at ``cols``, through the soft-cap when set."""
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    p = tl.exp(x - lse)
    g = tl.where(cols == label, p - 1.0, p) * scale
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    return g


@triton.jit
def _ce_fwd_kernel(X, DX, LABELS, LOSS, LSE, SCALE, n_cols, stride_x, stride_dx, ignore_index, softcap,
                   HAS_SOFTCAP: tl.constexpr, GRAD: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if GRAD:
            for start in range(0, n_cols, CHUNK):
                cols = start + tl.arange(0, CHUNK)
                tl.store(DX + row * stride_dx + cols, tl.zeros((CHUNK,), tl.float32).to(DX.dtype.element_ty),
                         mask=cols < n_cols)
        return
    x_row = X + row * stride_x
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(mask, softcap * _tanh(x / softcap), -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    valid = (label >= 0) & (label < n_cols)
    x_label = tl.load(x_row + tl.where(valid, label, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        x_label = softcap * _tanh(x_label / softcap)
    tl.store(LOSS + row, tl.where(valid, lse - x_label, float("nan")))  # a label out of range: NaN, loudly
    tl.store(LSE + row, lse)
    if GRAD:  # second pass while the row is still in L2: the gradient for an upstream gradient of 1
        scale = tl.load(SCALE)
        for start in range(0, n_cols, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = _ce_grad(x, lse, label, cols, scale, softcap, HAS_SOFTCAP)
            tl.store(DX + row * stride_dx + cols, g.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _ce_count_kernel(LABELS, SCALE, n_rows, ignore_index, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """SCALE = 1 / (number of non-ignored labels) for the mean (inf when there is none), else 1."""
    if MEAN:
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, n_rows, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            labels = tl.load(LABELS + idx, mask=idx < n_rows, other=ignore_index).to(tl.int64)
            count += (labels != ignore_index).to(tl.int32)
        tl.store(SCALE, 1.0 / tl.sum(count, axis=0).to(tl.float32))
    else:
        tl.store(SCALE, 1.0)


@triton.jit
def _ce_sum_kernel(LOSS, OUT, SCALE, n_rows, BLOCK: tl.constexpr):
    """OUT = sum(LOSS) * SCALE, summed in a fixed order (0 * inf = NaN when every label is ignored)."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        total += tl.load(LOSS + idx, mask=idx < n_rows, other=0.0)
    tl.store(OUT, tl.sum(total, axis=0) * tl.load(SCALE))


@triton.jit
def _ce_scale_kernel(DX, GRAD, n_cols, col_blocks, stride_dx, stride_grad, BLOCK: tl.constexpr):
    """DX *= GRAD[row] (the forward-computed gradient); nothing to do for the usual upstream 1."""
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    g = tl.load(GRAD + row * stride_grad).to(tl.float32)
    if g != 1.0:
        cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dx = tl.load(DX + row * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, (dx * g).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(X, DX, LABELS, LSE, GRAD, SCALE, n_cols, col_blocks, stride_x, stride_dx, stride_grad,
                   ignore_index, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dx_ptr = DX + row * stride_dx + cols
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(dx_ptr, tl.zeros((BLOCK,), dtype=tl.float32).to(DX.dtype.element_ty), mask=mask)
        return
    scale = tl.load(GRAD + row * stride_grad).to(tl.float32) * tl.load(SCALE)
    lse = tl.load(LSE + row)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = _ce_grad(x, lse, label, cols, scale, softcap, HAS_SOFTCAP)
    tl.store(dx_ptr, g.to(DX.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(n_cols: int, chunk_size: int | None, cuda: bool, grad_in_forward: bool = False) -> tuple[int, int, int, int]:
    """(forward chunk, forward warps, backward block, backward warps)."""
    cap = next_power_of_2(n_cols)
    if not cuda:  # the interpreter: few, large programs
        chunk = min(chunk_size or INTERPRETER_CHUNK, cap)
        return chunk, 4, min(INTERPRETER_CHUNK, cap), 4
    prefix = "gif" if grad_in_forward else "fwd"
    chunk = min(chunk_size or TUNING[f"{prefix}_chunk"], cap)
    warps = TUNING[f"{prefix}_warps"] if chunk_size is None else min(32, max(4, chunk // 1024))
    return chunk, min(warps, max(4, chunk // 256)), min(TUNING["bwd_block"], cap), TUNING["bwd_warps"]


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper; saves the logits (no copy), labels and one logsumexp per row, or, with
    ``grad_in_forward``, the gradient computed by the forward."""

    @staticmethod
    def forward(ctx, logits2, labels1, ignore_index, softcap, chunk_size, reduction, reuse, grad_in_forward):
        n_rows, n_cols = logits2.shape
        device = logits2.device
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=device)
        scale = torch.empty(1, dtype=torch.float32, device=device)
        block_rows = min(4096, next_power_of_2(n_rows))
        _ce_count_kernel[(1,)](labels1, scale, n_rows, ignore_index, MEAN=reduction == "mean", BLOCK=block_rows,
                               num_warps=4)
        dx = (logits2 if reuse else torch.empty_like(logits2)) if grad_in_forward else logits2
        chunk, warps, _, _ = _launch(n_cols, chunk_size, logits2.is_cuda, grad_in_forward)
        _ce_fwd_kernel[(n_rows,)](logits2, dx, labels1, loss_rows, lse, scale, n_cols, logits2.stride(0),
                                  dx.stride(0), ignore_index, float(softcap or 1.0), HAS_SOFTCAP=softcap is not None,
                                  GRAD=grad_in_forward, CHUNK=chunk, num_warps=warps)
        if reduction == "none":
            loss = loss_rows
        else:
            loss = torch.empty((), dtype=torch.float32, device=device)
            _ce_sum_kernel[(1,)](loss_rows, loss, scale, n_rows, BLOCK=block_rows, num_warps=4)
        if grad_in_forward:
            if reuse:
                bump_version(logits2)
            ctx.save_for_backward(dx)
        else:
            ctx.save_for_backward(logits2, labels1, lse, scale)
        ctx.ignore_index, ctx.softcap, ctx.chunk_size, ctx.reuse = ignore_index, softcap, chunk_size, reuse
        ctx.grad_in_forward = grad_in_forward
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        stride_grad = grad.stride(0) if grad.dim() else 0
        if ctx.grad_in_forward:
            (dx,) = ctx.saved_tensors
            n_rows, n_cols = dx.shape
            _, _, block, warps = _launch(n_cols, ctx.chunk_size, dx.is_cuda)
            col_blocks = _cdiv(n_cols, block)
            _ce_scale_kernel[(n_rows * col_blocks,)](dx, grad, n_cols, col_blocks, dx.stride(0), stride_grad,
                                                     BLOCK=block, num_warps=warps)
            return dx.detach(), None, None, None, None, None, None, None
        logits2, labels1, lse, scale = ctx.saved_tensors
        n_rows, n_cols = logits2.shape
        dx = logits2 if ctx.reuse else torch.empty_like(logits2)
        _, _, block, warps = _launch(n_cols, ctx.chunk_size, logits2.is_cuda)
        col_blocks = _cdiv(n_cols, block)
        _ce_bwd_kernel[(n_rows * col_blocks,)](logits2, dx, labels1, lse, grad, scale, n_cols, col_blocks,
                                               logits2.stride(0), dx.stride(0), stride_grad,
                                               ctx.ignore_index, float(ctx.softcap or 1.0),
                                               HAS_SOFTCAP=ctx.softcap is not None, BLOCK=block, num_warps=warps)
        if ctx.reuse:
            bump_version(logits2)
            dx = dx.detach()
        return dx, None, None, None, None, None, None, None


@on_tensor_device
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  softcap: float | None = None, chunk_size: int | None = None, *, reduction: str = "mean",
                  inplace_backward: bool = True, grad_in_forward: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits [..., vocab]`` against ``labels [...]`` (see the module docstring).

    ``chunk_size``: vocabulary entries per step of the forward loop (a power of two; default tuned).
    ``reduction``: "mean" (default, over non-ignored tokens), "sum" or "none" (per token, 0 where ignored).
    ``grad_in_forward=True`` computes the gradient already in the forward, in a second pass over each
    row while it is still in L2 (Liger's scheme), overwriting the logits there when they are an autograd
    intermediate: faster, but the logits are gone right after the loss (read them before).
    """
    if reduction not in _REDUCTIONS:
        raise QconvError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise QconvError(f"cross_entropy: chunk_size must be a power of two >= 16, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise QconvError(f"cross_entropy: softcap must be positive, got {softcap}")
    if logits.dim() < 1 or labels.numel() * logits.shape[-1] != logits.numel():
        raise QconvError(f"cross_entropy: labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise QconvError(f"cross_entropy: labels must be integers, got {labels.dtype}")
    if labels.numel() == 0:
        return cross_entropy_reference(logits, labels, ignore_index, softcap, reduction)
    if not (logits.is_cuda and labels.is_cuda):
        check_device(logits, labels, name="cross_entropy")
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    labels1 = labels.reshape(-1).contiguous()
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    reuse = bool(inplace_backward and needs_grad and is_graph_intermediate(logits)
                 and logits2.data_ptr() == logits.data_ptr() and logits2.stride(0) >= logits2.shape[1])
    loss = CrossEntropyFunction.apply(logits2, labels1, int(ignore_index), None if softcap is None else float(softcap),
                                      chunk_size, reduction, reuse, bool(grad_in_forward and needs_grad))
    return loss.view(labels.shape) if reduction == "none" else loss
