"""Rotary position embedding (transformers' ``rotate_half`` convention) forward and backward in Triton.

``q' = q * cos + rotate_half(q) * sin`` with ``rotate_half([a, b]) = [-b, a]``, for q ``[bsz, n_heads, seq,
head_dim]``, k ``[bsz, n_kv_heads, seq, head_dim]`` and cos/sin ``[bsz or 1, seq, rot_dim]`` (also
``[seq, rot_dim]`` or transformers' unsqueezed ``[bsz or 1, 1, seq, rot_dim]``); a ``rot_dim`` below
``head_dim`` rotates the leading ``rot_dim`` values and passes the rest (partial rotary). Any strides with a
contiguous last dimension are read directly: transformers' ``q_proj(x).view(b, s, h, d).transpose(1, 2)``
is not copied. Both halves of cos/sin are read, so they need not be duplicated.

In place where safe: when q and k are autograd intermediates (the output of a projection, as in a model's
attention), they are rotated in their own storage, which autograd is told about (its version counter), and
the outputs are views of them; leaves, views of leaves and tensors outside autograd are left untouched
unless ``inplace=True`` is passed. The backward rotates the incoming gradients back, in their storage when
nobody else holds them. One program handles ``BLOCK_S`` positions of one batch row with every q and k
head (``BLOCK_H`` heads per step), so cos/sin are read once per position, as Liger's kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconv.errors import QconvError
from qconv.kernels.inplace import bump_version, ensure_calibrated, grad_is_exclusive, is_dense, is_graph_intermediate
from qconv.kernels.utils import check_device, next_power_of_2, on_tensor_device

#: Launch parameters (benchmarks may override them).
TUNING = {"block_s": 1, "block_h": 16, "num_warps": 4}  # positions per program, heads per step, warps (H100 sweep)
#: Under TRITON_INTERPRET=1 the blocks cover the whole tensor unless this is set (tests set it).
INTERPRETER_TUNING: dict | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (cos/sin ``[b or 1, seq, rot_dim]``), with partial rotary."""
    cos, sin = _cos_sin_3d(cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def one(x):
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)

    return one(q), one(k)


@triton.jit
def _rotate_heads(X, XO, base, n_heads, s_h, s_s, pos64, d, sd_mask, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate all ``n_heads`` heads of the positions ``pos64``, ``BLOCK_H`` heads at a time (outputs: X's strides)."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads < n_heads)[:, None, None] & sd_mask[None, :, :]
        src = base + heads[:, None, None] * s_h + pos64[None, :, None] * s_s + d[None, None, :]
        x1 = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + src + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        tl.store(XO + src, y1.to(XO.dtype.element_ty), mask=mask)
        tl.store(XO + src + HALF, y2.to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, seq_len, n_qh, n_kh, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
                 sc_b, sc_s, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """One program: ``BLOCK_S`` positions of one batch row, every q and k head; cos/sin read once."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HALF:  # no mask along the head dimension: keeps the loads vectorized
        sd_mask = (pos < seq_len)[:, None]
    else:
        sd_mask = (pos < seq_len)[:, None] & (d < HALF)[None, :]
    pos64 = pos.to(tl.int64)

    cs = b * sc_b + pos64[:, None] * sc_s + d[None, :]
    cos1 = tl.load(COS + cs, mask=sd_mask, other=0.0).to(tl.float32)[None, :, :]
    cos2 = tl.load(COS + cs + HALF, mask=sd_mask, other=0.0).to(tl.float32)[None, :, :]
    sin1 = tl.load(SIN + cs, mask=sd_mask, other=0.0).to(tl.float32)[None, :, :]
    sin2 = tl.load(SIN + cs + HALF, mask=sd_mask, other=0.0).to(tl.float32)[None, :, :]
    _rotate_heads(Q, QO, b * sq_b, n_qh, sq_h, sq_s, pos64, d, sd_mask, cos1, cos2, sin1, sin2,
                  HALF, BLOCK_H, BACKWARD)
    _rotate_heads(K, KO, b * sk_b, n_kh, sk_h, sk_s, pos64, d, sd_mask, cos1, cos2, sin1, sin2,
                  HALF, BLOCK_H, BACKWARD)


def _cos_sin_3d(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.shape != sin.shape:
        raise QconvError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if cos.dim() == 4 and cos.shape[1] == 1:
        cos, sin = cos[:, 0], sin[:, 0]
    elif cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() != 3:
        raise QconvError(f"apply_rope: cos/sin must be [bsz or 1, seq, rot_dim], got {tuple(cos.shape)}")
    return cos, sin


def _rotate(q, k, q_out, k_out, cos, sin, backward: bool) -> None:
    """q_out/k_out must have q/k's strides (they are q/k, or ``_out_like`` of a dense q/k)."""
    bsz, n_qh, seq, _ = q.shape
    n_kh = k.shape[1]
    half = cos.shape[-1] // 2
    if q.is_cuda:
        block_s, warps = TUNING["block_s"], TUNING["num_warps"]
        block_h = min(TUNING["block_h"], next_power_of_2(max(n_qh, n_kh)))
    elif INTERPRETER_TUNING is not None:  # tests: small blocks, several head steps
        block_s, block_h, warps = INTERPRETER_TUNING["block_s"], INTERPRETER_TUNING["block_h"], 4
    else:  # the interpreter: few, large programs
        block_s, block_h, warps = min(64, next_power_of_2(seq)), next_power_of_2(max(n_qh, n_kh)), 4
    grid = (-(-seq // block_s), bsz)
    _rope_kernel[grid](q, k, q_out, k_out, cos, sin, seq, n_qh, n_kh,
                       *_strides(q), *_strides(k), *_strides(cos)[:2],
                       HALF=half, BLOCK_D=next_power_of_2(half), BLOCK_S=block_s, BLOCK_H=block_h,
                       BACKWARD=backward, num_warps=warps)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of the leading three dims; 0 for dims of size 1 (never 1: Triton would make it a constant)."""
    st, sh = x.stride(), x.shape
    return (st[0] if sh[0] > 1 else 0, st[1] if sh[1] > 1 else 0, st[2] if sh[2] > 1 else 0)


def _out_like(x: torch.Tensor, rot: int) -> torch.Tensor:
    """A fresh output in x's layout; the values past ``rot`` (partial rotary) are copied over."""
    out = torch.empty_like(x)
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is dense with a contiguous last dim (``empty_like`` then keeps its strides)."""
    return x if x.stride(-1) == 1 and is_dense(x) else x.contiguous()


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper; saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace):
        ensure_calibrated()
        rot = cos.shape[-1]
        if inplace:  # apply_rope checked that q and k are dense with a contiguous last dim
            q_out, k_out = q_in, k_in = q, k
        else:
            q_in, k_in = _dense(q), _dense(k)
            q_out, k_out = _out_like(q_in, rot), _out_like(k_in, rot)
        _rotate(q_in, k_in, q_out, k_out, cos, sin, backward=False)
        if inplace:
            bump_version(q, k)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        dq_owned = grad_is_exclusive(dq)  # exclusive implies dense
        dk_owned = grad_is_exclusive(dk)
        cos, sin = ctx.saved_tensors
        rot = cos.shape[-1]
        dq_in = dq if dq_owned and dq.stride(-1) == 1 else _dense(dq)
        dk_in = dk if dk_owned and dk.stride(-1) == 1 else _dense(dk)
        # a copy made by _dense is ours as well
        dq_out = dq_in if dq_owned or dq_in is not dq else _out_like(dq_in, rot)
        dk_out = dk_in if dk_owned or dk_in is not dk else _out_like(dk_in, rot)
        _rotate(dq_in, dk_in, dq_out, dk_out, cos, sin, backward=True)
        return dq_out, dk_out, None, None, None


@on_tensor_device
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               inplace: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (transformers' layout and ``rotate_half`` convention); returns ``(q_out, k_out)``.

    ``inplace=None`` rotates in place only autograd intermediates (see the module docstring); ``True``
    always rotates in place, ``False`` never.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise QconvError(f"apply_rope: q and k must be [bsz, heads, seq, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    cos, sin = _cos_sin_3d(cos, sin)
    bsz, _, seq, head_dim = q.shape
    if k.shape[0] != bsz or k.shape[2] != seq or k.shape[3] != head_dim:
        raise QconvError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    rot = cos.shape[-1]
    if cos.shape[1] != seq or cos.shape[0] not in (1, bsz) or rot % 2 or rot > head_dim or rot == 0:
        raise QconvError(f"apply_rope: cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)}")
    if q.dtype != k.dtype:
        raise QconvError(f"apply_rope: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    if q.numel() == 0 or k.numel() == 0:
        return apply_rope_reference(q, k, cos, sin)
    if not (q.is_cuda and k.is_cuda and cos.is_cuda and sin.is_cuda):
        check_device(q, k, cos, sin, name="apply_rope")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if inplace is None:
        grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        inplace = grads and is_graph_intermediate(q) and is_graph_intermediate(k)
    inplace = bool(inplace) and q.stride(-1) == 1 and k.stride(-1) == 1 and is_dense(q) and is_dense(k) \
        and q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    return RoPEFunction.apply(q, k, cos, sin, inplace)
