"""Fused NF4/FP4 dequantize + GEMV for one row of x (decoding): the ``rows`` kernel.

Layout: a persistent program (``programs per SM x SMs`` of them) reads x once, in one vectorized
load, and keeps it in registers matched to the element positions of a 32-bit word of packed weight
(``X_p[c, i] = x[32 c + 8 i + p]``: float16 pairs, or float32 without ``HALF2``), then loops over
groups of ``R`` output features. For each group it reads whole rows of packed weight as 32-bit words
``[R, C, 4]`` (each thread owns 16 contiguous bytes of a row: one 128-bit load), turns each word into
its 8 code values, multiplies them with the matching x values and sums the 32 products of a 16-byte
chunk (see ``HALF2``); the chunk sum is
scaled by its quantization block's absmax (nested dequantization once per chunk), and each row is
reduced once. The next group's words and absmax are loaded one group ahead, in registers. Rows of
``K`` elements with ``K/32`` not a power of two are padded to the next power of two (masked).

Code lookup (constexpr ``LOOKUP_ASM``):

* True: in registers, with PTX ``prmt`` on the byte planes of the 16-entry code held as float16
  (passed as 8 32-bit kernel arguments, so any code table float16 can hold works): 8 values per word
  from 21 integer instructions and 8 conversions, no memory access. float16 rounds the code by at
  most 2^-11 relative; used for bf16/fp16 x.
* False: one 4-byte L1 gather per value from the float32 code (exact; float32 x, codes float16
  cannot hold, and Triton's interpreter, which cannot run inline assembly).

``HALF2`` (with the register lookup; the default): the lookup's float16 pairs are multiplied with x in
float16 pairs and summed per 16-byte chunk with ``fma.rn.f16x2`` (19 instructions for 32 products instead
of 32 conversions and 32 float32 FMAs: a quarter fewer instructions in the loop, 72 registers fewer at 4
warps); only the chunk sums are float32. x is first scaled by a power of two that brings max |x| into
[2^9, 2^10) (32 products of |code| <= 1 cannot overflow float16; exact for bf16/fp16 x unless an element
is 2^-24 below the largest), and y is scaled back.

``EARLY`` (a barrier after the prefetch loads) and ``PROBE`` (no code lookup: wrong results, a
benchmark probe of what the loads and reductions alone cost) exist for ``scripts/bench_gemv.py``.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import torch

from qconv.kernels.nf4_dequantize import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def _lookup_lines(word: str, low: tuple[str, ...], high: tuple[str, ...]) -> list[str]:
    """PTX lines: ``word`` (8 nibbles) -> float16 pairs ``p0..p3`` (``pj`` = elements 2j | 2j+1 << 16).

    ``low``/``high``: the registers holding the low/high bytes of the float16 code (entries 0-3, 4-7,
    8-11, 12-15). Nibble j of the word is element ``j ^ 1`` (high nibble first within a byte).
    """
    l0, l1, l2, l3 = low
    h0, h1, h2, h3 = high
    return [
        f"and.b32 m, {word}, 0x77777777;",
        f"and.b32 s, {word}, 0x88888888;",
        "shr.u32 s, s, 1;",
        "or.b32 s, s, 0x32103210;",
        "shr.u32 s2, s, 16;",
        "shr.u32 m2, m, 16;",
        f"prmt.b32 a, {l0}, {l1}, m;",
        f"prmt.b32 b, {l2}, {l3}, m;",
        "prmt.b32 l0, a, b, s;",
        f"prmt.b32 a, {h0}, {h1}, m;",
        f"prmt.b32 b, {h2}, {h3}, m;",
        "prmt.b32 h0, a, b, s;",
        f"prmt.b32 a, {l0}, {l1}, m2;",
        f"prmt.b32 b, {l2}, {l3}, m2;",
        "prmt.b32 l1, a, b, s2;",
        f"prmt.b32 a, {h0}, {h1}, m2;",
        f"prmt.b32 b, {h2}, {h3}, m2;",
        "prmt.b32 h1, a, b, s2;",
        "prmt.b32 p0, l0, h0, 0x4051;",
        "prmt.b32 p1, l0, h0, 0x6273;",
        "prmt.b32 p2, l1, h1, 0x4051;",
        "prmt.b32 p3, l1, h1, 0x6273;",
    ]


_LOOKUP_REGS = ".reg .b32 m, s, s2, m2, a, b, l0, h0, l1, h1, p0, p1, p2, p3;"


def _lookup_asm() -> str:
    """PTX: word ``$8`` (8 nibbles) -> ``$0..$7`` float32 code values in element order.

    ``$9..$12`` hold the low bytes of the float16 code (entries 0-3, 4-7, 8-11, 12-15), ``$13..$16``
    the high bytes.
    """
    lines = [_LOOKUP_REGS, ".reg .b16 e0, e1, e2, e3, e4, e5, e6, e7;"]
    lines += _lookup_lines("$8", ("$9", "$10", "$11", "$12"), ("$13", "$14", "$15", "$16"))
    lines += [f"mov.b32 {{e{2 * j}, e{2 * j + 1}}}, p{j};" for j in range(4)]
    lines += [f"cvt.f32.f16 ${j}, e{j};" for j in range(8)]
    return "{\n" + "\n".join(lines) + "\n}"


#: PTX lines: the four per-word ``f16x2`` accumulators ``acc0..acc3`` summed pairwise into ``$0`` (float32).
_CHUNK_SUM_LINES = ["add.rn.f16x2 acc0, acc0, acc1;", "add.rn.f16x2 acc2, acc2, acc3;",
                    "add.rn.f16x2 acc0, acc0, acc2;", "mov.b32 {lo, hi}, acc0;", "cvt.f32.f16 flo, lo;",
                    "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;"]
_CHUNK_REGS = [_LOOKUP_REGS, ".reg .b32 acc0, acc1, acc2, acc3;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]


def _chunk_dot_lines(words: tuple[str, ...], low: tuple[str, ...], high: tuple[str, ...],
                     x: Callable[[int, int], str]) -> list[str]:
    """PTX lines (registers declared, see ``_CHUNK_REGS``): the float16-pair dot of the 4 ``words`` with x into
    ``$0``. ``x(i, j)``: the register of x pair j (elements 2j | 2j+1 << 16) of word i; ``low``/``high``: the
    code planes (see ``_lookup_lines``)."""
    lines = list(_CHUNK_REGS)
    for i, word in enumerate(words):
        lines += _lookup_lines(word, low, high)
        lines.append(f"mul.rn.f16x2 acc{i}, p0, {x(i, 0)};")
        lines += [f"fma.rn.f16x2 acc{i}, p{j}, {x(i, j)}, acc{i};" for j in range(1, 4)]
    return lines + _CHUNK_SUM_LINES


def _chunk_dot_asm() -> str:
    """PTX: the dot product of one 16-byte chunk (4 words, 32 values) with x, in float16 pairs.

    ``$1..$4``: the words; ``$5..$8`` / ``$9..$12``: low / high bytes of the float16 code; ``$13..$28``:
    x as float16 pairs, ``$(13 + 4 i + j)`` = elements 2j | 2j+1 of word i. One ``f16x2`` accumulator per
    word (``fma.rn.f16x2``: four short dependency chains, not one long one), summed pairwise; ``$0`` =
    float32 sum of the two halves. x must be scaled so that 32 products cannot overflow float16 (the
    kernel brings max |x| into [2^9, 2^10)).
    """
    lines = _chunk_dot_lines(("$1", "$2", "$3", "$4"), ("$5", "$6", "$7", "$8"), ("$9", "$10", "$11", "$12"),
                             lambda i, j: f"${13 + 4 * i + j}")
    return "{\n" + "\n".join(lines) + "\n}"


def code_planes(code: torch.Tensor) -> tuple[int, ...] | None:
    """The 16-entry code as float16 byte planes (8 signed 32-bit ints), or None if float16 cannot hold it.

    Returns ``(L0, L1, L2, L3, H0, H1, H2, H3)``: ``Lj`` packs the low bytes of entries ``4j..4j+3``
    (entry ``4j`` in the lowest byte), ``Hj`` their high bytes.
    """
    c = code.detach().to("cpu", torch.float32).reshape(-1)
    h = c.half()
    if c.numel() != 16 or not torch.isfinite(h).all():
        return None
    if ((h.float() - c).abs() > 1e-3 * c.abs()).any():  # values outside float16's normal range
        return None
    bits = [v & 0xFFFF for v in h.view(torch.int16).tolist()]
    planes = []
    for shift in (0, 8):
        for j in range(4):
            word = sum(((bits[4 * j + t] >> shift) & 0xFF) << (8 * t) for t in range(4))
            planes.append(struct.unpack("<i", struct.pack("<I", word))[0])
    return tuple(planes)


if HAS_TRITON:

    @triton.jit
    def _word_values(w, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7, LOOKUP_ASM: tl.constexpr):
        """The 8 code values (float32, element order) of the 32-bit words ``w``."""
        if LOOKUP_ASM:
            return tl.inline_asm_elementwise(
                _LOOKUP_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,r,r",
                [w, t0, t1, t2, t3, t4, t5, t6, t7], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            return (tl.load(code_ptr + ((w >> 4) & 15)), tl.load(code_ptr + (w & 15)),
                    tl.load(code_ptr + ((w >> 12) & 15)), tl.load(code_ptr + ((w >> 8) & 15)),
                    tl.load(code_ptr + ((w >> 20) & 15)), tl.load(code_ptr + ((w >> 16) & 15)),
                    tl.load(code_ptr + ((w >> 28) & 15)), tl.load(code_ptr + ((w >> 24) & 15)))

    @triton.jit
    def _split4(t):
        """The four slices ``t[..., 0]`` .. ``t[..., 3]`` of a tensor whose last axis has length 4."""
        t = tl.reshape(t, t.shape[:-1] + [2, 2])
        even, odd = tl.split(t)  # last axis: the index's low bit
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
        return t0, t1, t2, t3

    @triton.jit
    def _half2_pairs(xa):
        """x [C, 4, 8] (float32, scaled) as float16 pairs: 16 int32 tensors [1, C], pair j of word i at 4i + j."""
        lo, hi = tl.split(tl.reshape(xa, (1, xa.shape[0], 4, 4, 2)))
        lo = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        q0, q1, q2, q3 = _split4(lo | hi)  # pair j: [1, C, 4 words]
        a0, a1, a2, a3 = _split4(q0)
        b0, b1, b2, b3 = _split4(q1)
        c0, c1, c2, c3 = _split4(q2)
        d0, d1, d2, d3 = _split4(q3)
        return a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2, a3, b3, c3, d3

    @triton.jit
    def _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, n, c, i, c_ok, kblk, row_words, blocks_per_row, N,
                    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, INT64: tl.constexpr, EVICT_FIRST: tl.constexpr):
        """Weight words [R, C, 4] of rows ``n`` and their blocks' absmax (uint8 + nested absmax, or float32).

        ``EVICT_FIRST``: the words are read once per call, so their L2 lines are marked evict-first: they
        replace each other instead of pushing out (and, when dirty, writing back) what else L2 holds.
        """
        n_ok = n < N
        if INT64:
            n = n.to(tl.int64)
        ok = n_ok[:, None] & c_ok[None, :]
        w_ptrs = w_ptr + (n[:, None, None] * row_words + c[None, :, None] * 4 + i[None, None, :])
        if EVICT_FIRST:
            words = tl.load(w_ptrs, mask=ok[:, :, None], other=0, eviction_policy="evict_first")
        else:
            words = tl.load(w_ptrs, mask=ok[:, :, None], other=0)
        blk = n[:, None] * blocks_per_row + kblk[None, :]
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=ok, other=0)
            nab = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=ok, other=0)
        else:
            qa = tl.load(absmax_ptr + blk, mask=ok, other=0)
            nab = qa
        return words, qa, nab

    @triton.jit(do_not_specialize=["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"])
    def _nf4_gemv_rows_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr, y_ptr,
        N, K, t0, t1, t2, t3, t4, t5, t6, t7,
        HALF_BS: tl.constexpr, C: tl.constexpr, R: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
        HAS_BIAS: tl.constexpr, LOOKUP_ASM: tl.constexpr, EVEN_K: tl.constexpr, INT64: tl.constexpr,
        EVICT_FIRST: tl.constexpr = True, HALF2: tl.constexpr = False, EARLY: tl.constexpr = False,
        PROBE: tl.constexpr = 0,
    ):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        c = tl.arange(0, C)  # 16-byte chunk of a row
        i = tl.arange(0, 4)  # 32-bit word within the chunk
        r = tl.arange(0, R)
        row_words = tl.multiple_of(K // 8, 4)  # K is a multiple of the blocksize (>= 32)
        if EVEN_K:
            c_ok = c < C
        else:
            c_ok = c * 32 < K
        blocks_per_row = K // (2 * HALF_BS)
        kblk = (c * 16) // HALF_BS  # quantization block of each chunk within its row
        step = n_prog * R
        # the first group's loads go out before x is read; later groups are prefetched one ahead in
        # registers (ptxas issues those loads late in the loop body, before the row reduction)
        words, qa, nab = _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, pid * R + r, c, i, c_ok, kblk,
                                     row_words, blocks_per_row, N, NESTED, NESTED_BS, INT64, EVICT_FIRST)
        # x in one vectorized load [C, 4, 8]
        p = tl.arange(0, 8)
        xf = tl.load(x_ptr + c[:, None, None] * 32 + i[None, :, None] * 8 + p[None, None, :],
                     mask=c_ok[:, None, None], other=0).to(tl.float32)
        if HALF2:  # x scaled by a power of two 2^-e that brings max |x| into [2^9, 2^10), as float16 pairs
            e = (tl.max(tl.abs(xf)).to(tl.int32, bitcast=True) >> 23) & 0xFF
            e = tl.minimum(tl.maximum(e, 20), 255)  # x all zero or below 2^-107: no scaling up beyond 2^116
            scale = ((263 - e) << 23).to(tl.float32, bitcast=True)
            unscale = ((e - 9) << 23).to(tl.float32, bitcast=True)
            xp = _half2_pairs(xf * scale)
        else:  # float32, split into the 8 element positions of a word
            xa = tl.reshape(xf, (C, 4, 2, 2, 2))
            xa, xb = tl.split(xa)  # even | odd p (tl.split takes the last axis: p's lowest bit)
            x04, x26 = tl.split(xa)
            x15, x37 = tl.split(xb)
            x0, x4 = tl.split(x04)
            x2, x6 = tl.split(x26)
            x1, x5 = tl.split(x15)
            x3, x7 = tl.split(x37)
        for n0 in range(pid * R, N, step):
            nx_words, nx_qa, nx_nab = _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, n0 + step + r, c, i, c_ok,
                                                  kblk, row_words, blocks_per_row, N, NESTED, NESTED_BS, INT64,
                                                  EVICT_FIRST)
            if EARLY:  # a barrier keeps ptxas from sinking the prefetch below this group's compute
                tl.debug_barrier()
            if HALF2:
                w0, w1, w2, w3 = _split4(words)
                chunk = tl.inline_asm_elementwise(
                    _CHUNK_DOT_ASM, "=f" + ",r" * 28,
                    [w0, w1, w2, w3, t0, t1, t2, t3, t4, t5, t6, t7, xp[0], xp[1], xp[2], xp[3], xp[4], xp[5],
                     xp[6], xp[7], xp[8], xp[9], xp[10], xp[11], xp[12], xp[13], xp[14], xp[15]],
                    dtype=tl.float32, is_pure=True, pack=1)  # [R, C]
            elif PROBE == 2:  # benchmark probe (wrong results): loads and reductions only
                dot = words.to(tl.float32, bitcast=True) * x0[None]
            else:
                if PROBE == 1:  # benchmark probe (wrong results): no code lookup, the words' bits as float32
                    v0 = words.to(tl.float32, bitcast=True)
                    v1, v2, v3, v4, v5, v6, v7 = v0, v0, v0, v0, v0, v0, v0
                else:
                    v0, v1, v2, v3, v4, v5, v6, v7 = _word_values(words, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                                                                  LOOKUP_ASM)
                dot = v0 * x0[None] + v1 * x1[None] + v2 * x2[None] + v3 * x3[None]
                dot += v4 * x4[None] + v5 * x5[None] + v6 * x6[None] + v7 * x7[None]
            if not HALF2:
                chunk = tl.sum(dot, axis=2)  # [R, C]
            if NESTED:
                absmax = tl.load(nested_code_ptr + qa) * nab + tl.load(offset_ptr)
            else:
                absmax = qa
            y = tl.sum(chunk * absmax, axis=1)  # [R]
            if HALF2:
                y = y * unscale
            n = n0 + r
            n_ok = n < N
            if HAS_BIAS:
                y += tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)
            tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)
            words, qa, nab = nx_words, nx_qa, nx_nab

    _LOOKUP_ASM = tl.constexpr(_lookup_asm())
    _CHUNK_DOT_ASM = tl.constexpr(_chunk_dot_asm())


#: Launch parameters of the rows kernel, by the row length of the weight in bytes (K/2, H100 sweep in
#: docs/benchmarks.md): ``(largest K/2, rows per step, warps, programs per SM)``; the last entry covers
#: longer rows.
ROWS_CONFIGS = [(2048, 4, 8, 2), (1 << 62, 1, 8, 2)]
#: Mark the weight words' L2 lines evict-first (H100 sweep, GPU time: 14336x4096 0.0268 -> 0.0261 ms,
#: 4096x14336 0.0323 -> 0.0300 ms; docs/benchmarks.md).
ROWS_EVICT_FIRST = True
#: With the register lookup, multiply and sum each 16-byte chunk in float16 pairs (``fma.rn.f16x2``,
#: x scaled by a power of two) instead of float32 (see ``_chunk_dot_asm``).
ROWS_HALF2 = True
#: Under the interpreter each program instance costs ~2.5 ms: one program for all rows.
INTERPRETER_ROWS = 16


def rows_config(K: int) -> tuple[int, int, int]:
    """``(rows per step, warps, programs per SM)`` for rows of ``K`` elements."""
    for limit, *config in ROWS_CONFIGS:
        if K // 2 <= limit:
            return tuple(config)
    return tuple(ROWS_CONFIGS[-1][1:])


def rows_launch(x: torch.Tensor, words: torch.Tensor, state: tuple, planes: tuple[int, ...] | None,
                f: dict[str, Any], bias: torch.Tensor | None, out: torch.Tensor, sm_count: int,
                r: int | None = None, num_warps: int | None = None, per_sm: int | None = None,
                lookup_asm: bool | None = None, early: bool = False, probe: int = 0,
                evict_first: bool | None = None, half2: bool | None = None) -> tuple[tuple, list, dict]:
    """Grid, positional arguments and launch options of the rows kernel for one row ``x`` [K]."""
    from qconv.kernels.utils import is_interpreter

    N, K = f["shape"]
    cr, cw, cp = rows_config(K)
    interp = is_interpreter()
    r = r or (INTERPRETER_ROWS if interp else cr)
    num_warps = num_warps or (4 if interp else cw)
    per_sm = per_sm or cp
    if lookup_asm is None:
        lookup_asm = planes is not None and not interp and x.dtype != torch.float32
    chunks = 1 << max(0, (K // 32 - 1).bit_length())
    groups = (N + r - 1) // r
    grid = (max(1, min(groups, 1 if interp else sm_count * per_sm)),)
    absmax, table, nested_code, nested_absmax, offset, nested_bs = state
    t = planes if (planes is not None and lookup_asm) else (0,) * 8
    args = [x, words, absmax, table, nested_code, nested_absmax, offset, bias if bias is not None else x, out, N, K, *t]
    consts = dict(HALF_BS=f["blocksize"] // 2, C=chunks, R=r, NESTED=f["nested"], NESTED_BS=nested_bs,
                  HAS_BIAS=bias is not None, LOOKUP_ASM=bool(lookup_asm), EVEN_K=chunks * 32 == K,
                  INT64=N * K // 2 >= 2**31, EARLY=bool(early), PROBE=int(probe),
                  EVICT_FIRST=ROWS_EVICT_FIRST if evict_first is None else bool(evict_first),
                  HALF2=bool(lookup_asm) and (ROWS_HALF2 if half2 is None else bool(half2)) and not probe)
    return grid, args, dict(consts, num_warps=num_warps)


def gemv_rows(x: torch.Tensor, words: torch.Tensor, state: tuple, planes: tuple[int, ...] | None,
              f: dict[str, Any], bias: torch.Tensor | None, out: torch.Tensor | None = None,
              sm_count: int = 132, **params) -> torch.Tensor:
    """``out`` [N] = dequantized W [N, K] @ ``x`` [K] (+ bias) through Triton's launcher."""
    if out is None:
        out = torch.empty(f["shape"][0], dtype=x.dtype, device=x.device)
    grid, args, kw = rows_launch(x, words, state, planes, f, bias, out, sm_count, **params)
    _nf4_gemv_rows_kernel[grid](*args, **kw)
    return out
