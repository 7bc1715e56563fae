"""Probe (GPU, triton 3.6 Gluon): is the NF4 code lookup what holds the GEMV at ~0.024 ms? Two measurements.

    python scripts/probe_gemv_smem.py [--json OUT.json]

1. **Shared-memory lookup.** A Gluon copy of the ``rows`` kernel (same persistent loop, one-group-ahead
   register prefetch, float16-pair sums, nested absmax) whose code lookup is a per-lane table in shared
   memory: 256 bytes x 32 lanes of float16 pairs ``(code[b >> 4], code[b & 15])``, 32 KB, entry
   ``b * 32 + lane`` so every lane reads its own bank (no conflicts). A byte of packed weight costs one
   ``prmt`` + one ``mad`` + one ``ld.shared`` + one ``fma.rn.f16x2``: about a third of the integer
   instructions of the register (``prmt``) lookup. The table sits at offset 0 of Triton's shared memory
   (checked in the compiled kernel's LLVM IR; ``global_smem`` is named in the inline assembly). Each
   config is checked against the float64 reference; ``fill=False`` skips filling the table (wrong results
   by design, never checked): what the loop costs without the per-program fill.
2. **Read floor.** Read-only Triton kernels over the same packed weight (blocks and persistent, 4-8 warps,
   L2 evict-first on/off, unrolled): no GEMV of that weight can be faster than the fastest of them.

Times are GPU time (CUDA-graph replay, ``bench_kernels_nf4._graph_bench``) in one process, with
``bitsandbytes.matmul_4bit`` and the production ``rows`` kernel as references. Not used by the package:
results and conclusions are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_gemv  # noqa: E402  (the sibling script: its loader, inputs, read floor and logger)

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
#: (rows per step, warps along rows, warps along chunks, programs per SM[, fill])
SMEM_CONFIGS = {4096: [(4, 2, 4, 2), (8, 2, 4, 2), (4, 1, 4, 4), (4, 2, 4, 3), (4, 1, 4, 4, False),
                       (4, 2, 4, 2, False)],
                14336: [(2, 1, 8, 2), (1, 1, 8, 2), (2, 2, 8, 1), (2, 1, 8, 2, False)]}


def _chunk_asm() -> str:
    """PTX, ``pack=4``: one 16-byte chunk (words ``$4..$7``) dotted with x pairs through the shared table.

    ``$(8 + 4j + i)``: x pair j (elements 2j | 2j+1 << 16) of word i; ``$24``: this lane's byte offset
    (lane * 4). Out: ``$0`` the float32 chunk sum, ``$1..$3`` zero. Byte k of a word holds elements 2k
    (high nibble) and 2k+1 (low nibble); its table entry is at ``global_smem + 128 * byte + lane * 4``.
    """
    from qconv.kernels import nf4_gemv as ng

    lines = [".reg .b32 t, a, v, g, acc0, acc1, acc2, acc3;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
             "mov.u32 g, global_smem;", "add.u32 g, g, $24;"]
    for i in range(4):
        for k in range(4):
            lines += [f"prmt.b32 t, ${4 + i}, 0, {0x4440 + k};", "mad.lo.u32 a, t, 128, g;", "ld.shared.b32 v, [a];"]
            lines.append(f"mul.rn.f16x2 acc{i}, v, ${8 + 4 * k + i};" if k == 0
                         else f"fma.rn.f16x2 acc{i}, v, ${8 + 4 * k + i}, acc{i};")
    lines += ng._CHUNK_SUM_LINES + ["mov.f32 $1, 0f00000000;", "mov.f32 $2, 0f00000000;", "mov.f32 $3, 0f00000000;"]
    return "{\n" + "\n".join(lines) + "\n}"


def build_kernel():
    """The Gluon kernel (defined here so that importing this file needs no Gluon)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    chunk_asm = gl.constexpr(_chunk_asm())

    @gluon.jit
    def _f16_bits(v, scale):
        return (v * scale).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32)

    @gluon.jit
    def _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, n, c3, i3, c_ok, c_ok3, kblk, row_words,
                    blocks_per_row, N, NESTED_BS: gl.constexpr):
        n_ok = n < N
        n3 = gl.expand_dims(gl.expand_dims(n, 1), 2)
        ok3 = gl.expand_dims(gl.expand_dims(n_ok, 1), 2) & c_ok3
        words = gl.load(w_ptr + n3 * row_words + c3 * 4 + i3, mask=ok3, other=0, eviction_policy="evict_first")
        ok2 = gl.expand_dims(n_ok, 1) & gl.expand_dims(c_ok, 0)
        blk = gl.expand_dims(n, 1) * blocks_per_row + gl.expand_dims(kblk, 0)
        qa = gl.load(absmax_ptr + blk, mask=ok2, other=0)
        nab = gl.load(nested_absmax_ptr + blk // NESTED_BS, mask=ok2, other=0)
        return words, qa, nab

    @gluon.jit
    def smem_gemv_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                         y_ptr, N, K, HALF_BS: gl.constexpr, C: gl.constexpr, R: gl.constexpr, WR: gl.constexpr,
                         WC: gl.constexpr, NESTED_BS: gl.constexpr, EVEN_K: gl.constexpr, FILL: gl.constexpr):
        gl.static_assert(WR * WC == gl.num_warps())
        L3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [WR, WC, 1], [2, 1, 0])
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        LT: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        pid = gl.program_id(0)
        c = gl.arange(0, C, layout=gl.SliceLayout(0, L2))
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L2))
        i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        c3 = gl.expand_dims(gl.expand_dims(c, 0), 2)  # [1, C, 1]
        i3 = gl.expand_dims(gl.expand_dims(i, 0), 1)  # [1, 1, 4]
        row_words = K // 8
        if EVEN_K:
            c_ok = c < C
        else:
            c_ok = c * 32 < K
        c_ok3 = gl.expand_dims(gl.expand_dims(c_ok, 0), 2)
        blocks_per_row = K // (2 * HALF_BS)
        kblk = (c * 16) // HALF_BS
        step = gl.num_programs(0) * R
        words, qa, nab = _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, pid * R + r, c3, i3, c_ok, c_ok3, kblk,
                                     row_words, blocks_per_row, N, NESTED_BS)
        # the per-lane table, entry b * 32 + lane = float16 pair (code[b >> 4], code[b & 15])
        b = gl.arange(0, 8192, layout=LT) >> 5
        one = gl.full([8192], 1.0, gl.float32, LT)
        pair = (_f16_bits(gl.load(code_ptr + (b >> 4)), one) & 0xFFFF) | (_f16_bits(gl.load(code_ptr + (b & 15)), one) << 16)
        table = gl.allocate_shared_memory(gl.int32, [8192], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        if FILL:
            table.store(pair)
        # x as float16 pairs [1, C, 4] (pair j of word i of chunk c), scaled so max |x| is in [2^9, 2^10)
        xo = x_ptr + c3 * 32 + i3 * 8
        xe0 = gl.load(xo + 0, mask=c_ok3, other=0).to(gl.float32)
        xd0 = gl.load(xo + 1, mask=c_ok3, other=0).to(gl.float32)
        xe1 = gl.load(xo + 2, mask=c_ok3, other=0).to(gl.float32)
        xd1 = gl.load(xo + 3, mask=c_ok3, other=0).to(gl.float32)
        xe2 = gl.load(xo + 4, mask=c_ok3, other=0).to(gl.float32)
        xd2 = gl.load(xo + 5, mask=c_ok3, other=0).to(gl.float32)
        xe3 = gl.load(xo + 6, mask=c_ok3, other=0).to(gl.float32)
        xd3 = gl.load(xo + 7, mask=c_ok3, other=0).to(gl.float32)
        m = gl.maximum(gl.maximum(gl.maximum(gl.abs(xe0), gl.abs(xd0)), gl.maximum(gl.abs(xe1), gl.abs(xd1))),
                       gl.maximum(gl.maximum(gl.abs(xe2), gl.abs(xd2)), gl.maximum(gl.abs(xe3), gl.abs(xd3))))
        ex = (gl.max(gl.max(gl.max(m, axis=2), axis=1), axis=0).to(gl.int32, bitcast=True) >> 23) & 0xFF
        ex = gl.minimum(gl.maximum(ex, 20), 255)
        scale = ((263 - ex) << 23).to(gl.float32, bitcast=True)
        unscale = ((ex - 9) << 23).to(gl.float32, bitcast=True)
        xp0 = (_f16_bits(xe0, scale) & 0xFFFF) | (_f16_bits(xd0, scale) << 16)
        xp1 = (_f16_bits(xe1, scale) & 0xFFFF) | (_f16_bits(xd1, scale) << 16)
        xp2 = (_f16_bits(xe2, scale) & 0xFFFF) | (_f16_bits(xd2, scale) << 16)
        xp3 = (_f16_bits(xe3, scale) & 0xFFFF) | (_f16_bits(xd3, scale) << 16)
        gl.thread_barrier()
        lane_off = (c3 % 32) * 4 + i3 * 0  # [1, C, 4]: each lane reads its own bank
        for n0 in range(pid * R, N, step):
            nx_words, nx_qa, nx_nab = _load_group(w_ptr, absmax_ptr, nested_absmax_ptr, n0 + step + r, c3, i3, c_ok,
                                                  c_ok3, kblk, row_words, blocks_per_row, N, NESTED_BS)
            dots = gl.inline_asm_elementwise(chunk_asm, "=f,=f,=f,=f" + ",r" * 24,
                                             [words, xp0, xp1, xp2, xp3, lane_off], dtype=gl.float32,
                                             is_pure=True, pack=4)
            absmax = gl.load(nested_code_ptr + qa) * nab + gl.load(offset_ptr)
            y = gl.sum(gl.sum(dots, axis=2) * absmax, axis=1) * unscale
            n = n0 + r
            gl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)
            words, qa, nab = nx_words, nx_qa, nx_nab
        table._keep_alive()

    return smem_gemv_kernel


def smem_launcher(kernel, x, words, state, f, out, sm, r, wr, wc, per_sm, fill=True):
    """A callable launching the Gluon kernel; raises if the table is not at offset 0 of shared memory."""
    import re

    n, k = f["shape"]
    absmax, code, nested_code, nested_absmax, offset, nested_bs = state
    chunks = 1 << max(0, (k // 32 - 1).bit_length())
    grid = (max(1, min((n + r - 1) // r, sm * per_sm)),)

    def run():
        return kernel[grid](x, words, absmax, code, nested_code, nested_absmax, offset, out, n, k,
                            HALF_BS=f["blocksize"] // 2, C=chunks, R=r, WR=wr, WC=wc, NESTED_BS=nested_bs,
                            EVEN_K=chunks * 32 == k, FILL=fill, num_warps=wr * wc)

    compiled = run()
    scratch = [int(o) for o in re.findall(r"@global_smem, i32 (\d+)", compiled.asm["llir"])]
    if compiled.metadata.shared < 32768 or any(0 < o < 32768 for o in scratch):
        raise RuntimeError(f"the table is not alone in shared memory [0, 32768): size {compiled.metadata.shared}, "
                           f"constant offsets {sorted(set(scratch))}")
    return lambda: (run(), out)[1]


def read_persistent_kernel():
    """A read-only kernel over int32 words: persistent programs, ``UNROLL`` [BLOCK]-word loads per step."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_persistent(w_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK * UNROLL, n, tl.num_programs(0) * BLOCK * UNROLL):
            for u in tl.static_range(UNROLL):
                offs = start + u * BLOCK + tl.arange(0, BLOCK)
                acc += tl.load(w_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))

    return read_persistent


def read_floor_rows(nf4, gemv, words: torch.Tensor, sm: int) -> list[dict]:
    """GPU time of the read-only kernels: ``bench_gemv.read_floor`` variants and persistent ones."""
    rows = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            for ef in (True, False):
                rows.append(dict(impl=f"read: {block}-word blocks, {warps} warps, evict_first={ef}",
                                 ms_graph=nf4._graph_bench(gemv.read_floor(words, block, warps, ef))))
    read_persistent = read_persistent_kernel()
    nw = words.numel()
    out = torch.empty(sm * 16, dtype=torch.int32, device=words.device)
    for block, warps, per_sm, unroll in [(1024, 4, 8, 4), (2048, 8, 4, 4), (1024, 4, 16, 2), (2048, 8, 8, 2),
                                         (4096, 8, 4, 2), (1024, 4, 8, 8), (512, 4, 16, 4)]:
        grid = (sm * per_sm,)
        fn = lambda: read_persistent[grid](words, out, nw, BLOCK=block, UNROLL=unroll, num_warps=warps)  # noqa: E731
        rows.append(dict(impl=f"read: persistent {block} words x{unroll}, {warps} warps, {per_sm}/SM",
                         ms_graph=nf4._graph_bench(fn)))
    return rows


def probe(nf4, gemv) -> list[dict]:
    kernel = build_kernel()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n, k in SHAPES:
        case = f"{n}x{k}"
        f, words, state, planes, x, ref, out, baselines = gemv.probe_case(nf4, n, k, sm)
        cands = [(label, fn, True) for label, fn in baselines]
        for cfg in SMEM_CONFIGS[14336 if k > 4096 else 4096]:
            fill = cfg[4] if len(cfg) > 4 else True
            label = "smem table {}x{} warps, {} rows, {}/SM{}".format(cfg[1], cfg[2], cfg[0], cfg[3],
                                                                       "" if fill else ", NO FILL (wrong by design)")
            try:
                cands.append((label, smem_launcher(kernel, x, words, state, f, out, sm, *cfg), fill))
            except Exception as exc:  # a config that does not compile is reported, not fatal
                gemv.log(f"  {case} {label}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        for label, fn, check in cands:
            err = nf4._rel_err(fn(), ref) if check else None
            if check and not err < 5e-3:
                gemv.log(f"  {case} {label}: WRONG (rel_err {err}), skipped")
                continue
            rows.append(dict(section="probe", case=case, impl=label, ms_graph=round(nf4._graph_bench(fn), 5),
                             check=f"rel_err={err:.1e}" if err is not None else "not checked"))
            gemv.log(f"  {rows[-1]}")
        if (n, k) == SHAPES[0]:
            rows += [dict(section="probe", case=case, check="", impl=r["impl"], ms_graph=round(r["ms_graph"], 5))
                     for r in read_floor_rows(nf4, gemv, words, sm)]
    return nf4._with_ratios(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows and the environment here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_gemv_smem.py needs a CUDA GPU")
    nf4 = bench_gemv._load("bench_kernels_nf4")
    rows = probe(nf4, bench_gemv)
    print(nf4.format_table(rows, ["case", "impl", "ms_graph", "speedup_vs_bnb_graph", "check"]))
    env = nf4.environment()
    print(" | ".join(f"{a}: {b}" for a, b in env.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
