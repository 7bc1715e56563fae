"""NF4 / FP4 blockwise dequantize (bitsandbytes 4-bit format, optional double-quantized absmax).

Format (see ``docs/format.md``): element ``i`` of the flattened weight is nibble ``i % 2`` of byte
``i // 2`` (high nibble first); its value is ``code[nibble] * absmax[i // blocksize]``. With double
quant the absmax itself is stored as uint8 and is ``nested_code[q] * nested_absmax[b // 256] + offset``.
All arithmetic is float32 and in the same order as bitsandbytes, so float32 output is bit-identical to
``bitsandbytes.functional.dequantize_4bit``; bf16/fp16 output is that value rounded to nearest even
(bit-identical to bitsandbytes on CUDA; the interpreter truncates instead: within one ulp). One sign of
zero differs: bitsandbytes' CUDA FP4 kernel returns -0.0 for the FP4 code 0b1000, where its CPU path and
the stored code table (which we follow) give +0.0.

Layout of the Triton kernel: one program dequantizes ``ROWS`` whole quantization blocks, i.e. a
contiguous span of ``ROWS * blocksize / 2`` packed bytes, as a ``[ROWS, blocksize/2]`` tile; the block's
absmax (and its nested dequantization) is computed once per row; each byte's two values come from one
8-byte gather in a cached 256-entry table of (high, low) pairs (or two gathers from the 16-entry code),
and the row is written with one contiguous store.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qconv.errors import QconvError
from qconv.kernels.utils import FLOAT_DTYPES, is_interpreter, on_tensor_device

try:  # triton is optional: without it, CPU tensors still dequantize through the PyTorch reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Default launch parameters, chosen by the H100 sweep in docs/benchmarks.md (2048 B/4 warps and
#: 4096 B/8 warps were within 1% of each other): packed bytes per program, warps.
DEFAULT_BYTES_PER_PROGRAM = 2048
DEFAULT_NUM_WARPS = 4
#: Look values up per byte in a 256-entry (high, low) table instead of per nibble in the 16-entry code
#: (slower on an H100: the 2 KB table spreads one warp's gather over many cache lines).
DEFAULT_PAIR_TABLE = False
#: Under the interpreter every program instance costs ~2.5 ms: use few, large ones.
INTERPRETER_BYTES_PER_PROGRAM = 32768



# --------------------------------------------------------------------------------------------------
# Quant state access (duck-typed: bitsandbytes' QuantState, never imported here)
# --------------------------------------------------------------------------------------------------
def _state_fields(quant_state: Any) -> dict[str, Any]:
    """Validate ``quant_state`` and return the fields the kernels use."""
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type not in ("nf4", "fp4"):
        raise QconvError(f"dequantize_nf4: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    blocksize = int(getattr(quant_state, "blocksize", 0))
    if blocksize not in BLOCKSIZES:
        raise QconvError(f"dequantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    shape = tuple(int(s) for s in quant_state.shape)
    code = quant_state.code
    if code is None or code.numel() != 16:
        raise QconvError("dequantize_nf4: quant_state.code must hold the 16-entry 4-bit code table")
    nested = bool(getattr(quant_state, "nested", False))
    fields = dict(quant_type=quant_type, blocksize=blocksize, shape=shape, numel=math.prod(shape),
                  code=code, absmax=quant_state.absmax, nested=nested, dtype=quant_state.dtype)
    if nested:
        state2 = quant_state.state2
        nested_bs = int(state2.blocksize)
        if nested_bs <= 0 or nested_bs & (nested_bs - 1):
            raise QconvError(f"dequantize_nf4: nested blocksize must be a power of two, got {nested_bs}")
        if state2.code is None or state2.code.numel() != 256:
            raise QconvError("dequantize_nf4: nested code table must have 256 entries")
        fields.update(nested_code=state2.code, nested_absmax=state2.absmax, nested_blocksize=nested_bs,
                      offset=quant_state.offset)
    return fields


def _packed_bytes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor (any quant_storage dtype is reinterpreted as bytes)."""
    flat = packed.contiguous()
    if flat.dtype != torch.uint8:
        flat = flat.reshape(-1).view(torch.uint8)
    flat = flat.reshape(-1)
    need = (numel + 1) // 2
    if flat.numel() != need:
        raise QconvError(
            f"dequantize_nf4: packed weight has {flat.numel()} bytes, expected {need} for {numel} elements"
        )
    return flat


def _float32_on(t: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float32)
    return t.to(device=device, dtype=torch.float32).contiguous().reshape(-1)


def _absmax_float32(fields: dict[str, Any], device: torch.device, compute: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-block absmax as ``compute`` dtype, dequantizing the nested absmax like bitsandbytes does."""
    if not fields["nested"]:
        return fields["absmax"].to(device=device, dtype=compute).reshape(-1)
    q = fields["absmax"].to(device).reshape(-1).long()
    code2 = fields["nested_code"].to(device=device, dtype=compute)
    absmax2 = fields["nested_absmax"].to(device=device, dtype=compute).reshape(-1)
    block2 = torch.arange(q.numel(), device=device) // fields["nested_blocksize"]
    absmax = code2[q] * absmax2[block2]  # one rounding, then the offset add: bitsandbytes' order
    return absmax + _float32_on(fields["offset"], device).to(compute)


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference
# --------------------------------------------------------------------------------------------------
def dequantize_nf4_reference(
    packed: torch.Tensor, quant_state: Any, out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantize in plain PyTorch; ``compute_dtype=float64`` gives the exact real value."""
    f = _state_fields(quant_state)
    device = packed.device
    data = _packed_bytes(packed, f["numel"])
    nibbles = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[: f["numel"]].long()
    code = f["code"].to(device=device, dtype=compute_dtype)
    absmax = _absmax_float32(f, device, compute_dtype)
    block = torch.arange(f["numel"], device=device) // f["blocksize"]
    values = code[nibbles] * absmax[block]
    return values.to(out_dtype or f["dtype"]).reshape(f["shape"])


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
        n_bytes, n_elements, n_blocks,
        HALF_BS: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
        INT64: tl.constexpr, PAIR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INT64:
            pid = pid.to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)  # quantization-block indices of this program
        cols = tl.arange(0, HALF_BS)
        row_ok = rows < n_blocks
        byte_idx = rows[:, None] * HALF_BS + cols[None, :]
        q = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0)
        if NESTED:
            qa = tl.load(absmax_ptr + rows, mask=row_ok, other=0)
            scale = tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + rows // NESTED_BS, mask=row_ok, other=0)
            absmax = scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0)
        if PAIR:  # one 8-byte gather per byte from the 256-entry table of (high, low) values
            pair = tl.load(code_ptr + q[:, :, None].to(tl.int32) * 2 + tl.arange(0, 2)[None, None, :])
            values = tl.reshape(pair * absmax[:, None, None], (ROWS, 2 * HALF_BS))
        else:  # two 4-byte gathers per byte from the 16-entry code table
            hi = tl.load(code_ptr + (q >> 4)) * absmax[:, None]
            lo = tl.load(code_ptr + (q & 15)) * absmax[:, None]
            values = tl.interleave(hi, lo)  # [ROWS, 2 * HALF_BS], element order of the flat weight
        out_idx = rows[:, None] * (2 * HALF_BS) + tl.arange(0, 2 * HALF_BS)[None, :]
        tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n_elements)


def state_tensors(quant_state: Any, f: dict[str, Any], device: torch.device, pair: bool) -> tuple:
    """Kernel arguments ``(absmax, table, nested_code, nested_absmax, offset, nested_blocksize)`` on ``device``.

    ``table`` is the 16-entry code, or with ``pair`` the ``[256, 2]`` table of (high, low) nibble values
    per byte. The result is cached on the quant state (keyed by device and the identity and version of
    every tensor used), so repeated calls skip the conversions.
    """
    sources = [f["absmax"], f["code"]] + ([f["nested_code"], f["nested_absmax"], f["offset"]] if f["nested"] else [])
    key = (str(device), pair, f["nested"]) + tuple(
        (t.data_ptr(), t._version) if isinstance(t, torch.Tensor) else t for t in sources)
    cache = getattr(quant_state, "_qconv_kernel_args", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    if pair:
        code = f["code"].to(device=device, dtype=torch.float32).reshape(-1)
        table = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
    else:
        table = _float32_on(f["code"], device)
    if f["nested"]:
        args = (f["absmax"].to(device).reshape(-1), table, _float32_on(f["nested_code"], device),
                _float32_on(f["nested_absmax"], device), _float32_on(f["offset"], device), f["nested_blocksize"])
    else:
        absmax = _float32_on(f["absmax"], device)
        args = (absmax, table, absmax, absmax, absmax, 1)
    try:
        quant_state._qconv_kernel_args = (key, args)
    except AttributeError:  # a state object that takes no attributes: convert every time
        pass
    return args


def _launch_dequantize(
    data: torch.Tensor, quant_state: Any, f: dict[str, Any], out: torch.Tensor,
    bytes_per_program: int | None = None, num_warps: int | None = None, pair: bool | None = None,
) -> torch.Tensor:
    """Run the Triton kernel over flat uint8 ``data`` into flat contiguous ``out``."""
    blocksize, numel = f["blocksize"], f["numel"]
    n_blocks = (numel + blocksize - 1) // blocksize
    if f["absmax"].numel() != n_blocks:
        raise QconvError(f"dequantize_nf4: absmax has {f['absmax'].numel()} entries, expected {n_blocks}")
    half = blocksize // 2
    if bytes_per_program is None:
        bytes_per_program = INTERPRETER_BYTES_PER_PROGRAM if is_interpreter() else DEFAULT_BYTES_PER_PROGRAM
    pair = DEFAULT_PAIR_TABLE if pair is None else pair
    rows = max(1, bytes_per_program // half)
    rows = min(rows, 1 << max(0, (n_blocks - 1).bit_length()))  # never more rows than the tensor has
    absmax, table, nested_code, nested_absmax, offset, nested_bs = state_tensors(quant_state, f, data.device, pair)
    grid = (triton_cdiv(n_blocks, rows),)
    _nf4_dequantize_kernel[grid](
        data, absmax, table, nested_code, nested_absmax, offset, out,
        data.numel(), numel, n_blocks,
        HALF_BS=half, ROWS=rows, NESTED=f["nested"], NESTED_BS=nested_bs,
        INT64=grid[0] * rows * blocksize >= 2**31, PAIR=pair,
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        enable_fp_fusion=False,  # keep bitsandbytes' rounding: code2*absmax2 rounded, then + offset
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
@on_tensor_device
def dequantize_nf4(
    packed: torch.Tensor, quant_state: Any, out_dtype: torch.dtype | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (nf4 or fp4, plain or double-quantized absmax).

    ``packed`` is the stored weight (uint8 ``[ceil(n/2), 1]``, or another quant_storage dtype holding the
    same bytes); ``quant_state`` a ``bitsandbytes.functional.QuantState``. Returns a tensor of
    ``quant_state.shape`` in ``out_dtype`` (default ``quant_state.dtype``), or fills ``out`` (contiguous,
    that shape) when given. On a CPU tensor without ``TRITON_INTERPRET=1`` the PyTorch reference runs.
    """
    f = _state_fields(quant_state)
    out_dtype = out_dtype or (out.dtype if out is not None else f["dtype"])
    if out_dtype not in FLOAT_DTYPES:
        raise QconvError(f"dequantize_nf4: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if out is not None and (out.dtype != out_dtype or tuple(out.shape) != f["shape"] or not out.is_contiguous()):
        raise QconvError(f"dequantize_nf4: out must be a contiguous {out_dtype} tensor of shape {f['shape']}")
    data = _packed_bytes(packed, f["numel"])
    if data.device.type != "cuda" and not is_interpreter():
        result = dequantize_nf4_reference(data, quant_state, out_dtype)
        if out is None:
            return result
        return out.copy_(result)
    if out is None:
        out = torch.empty(f["shape"], dtype=out_dtype, device=data.device)
    if f["numel"] == 0:
        return out
    _launch_dequantize(data, quant_state, f, out.view(-1))
    return out
