"""Probe (GPU, triton 3.6 Gluon): does a warp-specialized TMA pipeline bring the NF4 GEMV closer to the read floor?

    python scripts/probe_gemv_ws.py [--json OUT.json]

The ``rows`` kernel keeps the next group of weight words in registers (one group ahead). Here the memory side
is decoupled from the arithmetic instead: in each persistent program one producer warp streams ``[BN, 256]``-word
tiles of packed weight (and their ``[BN, 32]`` absmax) by TMA into a ``STAGES``-deep shared-memory ring with
mbarriers, while the default partition (``W`` consumer warps) takes each tile from shared memory, looks the
codes up in registers (the rows kernel's ``prmt`` sequence), multiplies in float16 pairs with x (scaled per
program as in the rows kernel, kept in shared memory) and accumulates per row. Variants: the absmax as uint8 +
nested dequantization (the format), or as float32 made beforehand (one more copy of the constants: not what
the runtime holds, a probe of what the nested lookup costs), and with or without ``fence_async_shared`` before
the consumer releases a slot. The rows kernel is also timed with that float32 absmax.

Every config is checked against the float64 reference before it is timed (GPU time, CUDA-graph replay, one
process), with ``bitsandbytes.matmul_4bit``, the production rows kernel and the read floor
(``bench_gemv.read_floor``) in the same run. Needs K % 2048 == 0. Not used by the package: results and
conclusions are in docs/benchmarks.md.
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
#: (rows per tile BN, ring stages, consumer warps, programs per SM, maxnreg); the first three for the small shapes
CONFIGS = [(16, 3, 4, 1, 128), (8, 3, 4, 2, 128), (8, 2, 4, 2, 128), (16, 3, 4, 2, 128), (8, 4, 4, 2, 128),
           (8, 3, 4, 3, 80), (16, 3, 8, 1, 168), (8, 6, 4, 2, 128), (32, 3, 4, 1, 128)]
#: (label, float32 absmax, fence before release)
VARIANTS = [("nested", False, True), ("nested, no fence", False, False), ("float32 absmax, no fence", True, False)]


def _chunk_asm() -> str:
    """PTX, ``pack=4``: ``$0`` = the float16-pair dot of one 16-byte chunk (``$1..$3`` zero).

    ``$4..$7``: the chunk's words; ``$(8 + 4k)``: code plane k (rows kernel order: low bytes 0-3, high bytes
    4-7); ``$(40 + 4j + i)``: x pair j (elements 2j | 2j+1 << 16) of word i.
    """
    from qconv.kernels import nf4_gemv as ng

    lines = ng._chunk_dot_lines(("$4", "$5", "$6", "$7"), ("$8", "$12", "$16", "$20"), ("$24", "$28", "$32", "$36"),
                                lambda i, j: f"${40 + 4 * j + i}")
    lines += ["mov.f32 $1, 0f00000000;", "mov.f32 $2, 0f00000000;", "mov.f32 $3, 0f00000000;"]
    return "{\n" + "\n".join(lines) + "\n}"


def build_kernel():
    """The Gluon kernel (defined here so that importing this file needs no Gluon)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    chunk_asm = gl.constexpr(_chunk_asm())

    @gluon.jit
    def _pair(v, scale):
        """bf16 pairs (int32) -> float16 pairs of the values times ``scale``."""
        lo = ((v << 16).to(gl.float32, bitcast=True) * scale).to(gl.float16).to(gl.int16, bitcast=True)
        hi = ((v & -65536).to(gl.float32, bitcast=True) * scale).to(gl.float16).to(gl.int16, bitcast=True)
        return (lo.to(gl.int32) & 0xFFFF) | (hi.to(gl.int32) << 16)

    @gluon.jit
    def _absmax2(v):
        return gl.maximum(gl.abs((v << 16).to(gl.float32, bitcast=True)),
                          gl.abs((v & -65536).to(gl.float32, bitcast=True)))

    @gluon.jit
    def _x_tile(xs_j, s, words, NBP: gl.constexpr, LX: gl.constexpr):
        """x pair j of segment ``s`` from shared memory, broadcast to the shape of ``words``."""
        XS3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        x = xs_j._reinterpret(gl.int32, [NBP, 32, 2, 4], XS3).index(s).load(LX)
        x, _ = gl.broadcast(gl.expand_dims(x, 0), words)
        return x

    @gluon.jit
    def _producer(w_desc, a_desc, w_bufs, a_bufs, ready, empty, N, NB: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr):
        i = 0
        for rb in range(gl.program_id(0), gl.cdiv(N, BN), gl.num_programs(0)):
            for s in range(NB):
                slot = i % STAGES
                mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + a_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [rb * BN, s * 256], ready.index(slot), w_bufs.index(slot))
                tma.async_copy_global_to_shared(a_desc, [rb * BN, s * 32], ready.index(slot), a_bufs.index(slot))
                i += 1

    @gluon.jit
    def _consumer(w_bufs, a_bufs, ready, empty, xs, t0, t1, t2, t3, t4, t5, t6, t7, unscale, nested_code_ptr,
                  nested_absmax_ptr, offset_ptr, y_ptr, N, K, NB: gl.constexpr, NBP: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, NESTED_BS: gl.constexpr, L4: gl.constexpr, FLOAT_ABSMAX: gl.constexpr,
                  FENCE: gl.constexpr):
        LA: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))  # [BN, 32 blocks]
        LX: gl.constexpr = gl.SliceLayout(0, L4)
        PLAIN4: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
        PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        # [rows, quantization blocks, 16-byte chunks, words]; the code planes broadcast to that shape
        p0 = gl.full([BN, 32, 2, 4], t0, gl.int32, L4)
        p1 = gl.full([BN, 32, 2, 4], t1, gl.int32, L4)
        p2 = gl.full([BN, 32, 2, 4], t2, gl.int32, L4)
        p3 = gl.full([BN, 32, 2, 4], t3, gl.int32, L4)
        p4 = gl.full([BN, 32, 2, 4], t4, gl.int32, L4)
        p5 = gl.full([BN, 32, 2, 4], t5, gl.int32, L4)
        p6 = gl.full([BN, 32, 2, 4], t6, gl.int32, L4)
        p7 = gl.full([BN, 32, 2, 4], t7, gl.int32, L4)
        off = gl.load(offset_ptr)
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, LA))
        i = 0
        for rb in range(gl.program_id(0), gl.cdiv(N, BN), gl.num_programs(0)):
            n = rb * BN + r
            acc = gl.zeros([BN, 32], gl.float32, LA)
            for s in range(NB):
                slot = i % STAGES
                if not FLOAT_ABSMAX:  # one nested absmax per row and tile (32 blocks never cross a nested block)
                    nab = gl.load(nested_absmax_ptr + (n * (K // 64) + s * 32) // NESTED_BS, mask=n < N, other=0)
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                words = w_bufs.index(slot)._reinterpret(gl.int32, [BN, 32, 2, 4], PLAIN4).load(L4)
                if FLOAT_ABSMAX:
                    absmax = a_bufs.index(slot)._reinterpret(gl.float32, [BN, 32], PLAIN2).load(LA)
                else:
                    qa = a_bufs.index(slot)._reinterpret(gl.uint8, [BN, 32], PLAIN2).load(LA)
                if FENCE:
                    fence_async_shared()
                mbarrier.arrive(empty.index(slot), count=1)
                x0 = _x_tile(xs[0], s, words, NBP, LX)
                x1 = _x_tile(xs[1], s, words, NBP, LX)
                x2 = _x_tile(xs[2], s, words, NBP, LX)
                x3 = _x_tile(xs[3], s, words, NBP, LX)
                dots = gl.inline_asm_elementwise(chunk_asm, "=f,=f,=f,=f" + ",r" * 52,
                                                 [words, p0, p1, p2, p3, p4, p5, p6, p7, x0, x1, x2, x3],
                                                 dtype=gl.float32, is_pure=True, pack=4)
                chunk = gl.sum(gl.sum(dots, axis=3), axis=2)  # [BN, 32]
                if not FLOAT_ABSMAX:
                    absmax = gl.load(nested_code_ptr + qa.to(gl.int32)) * gl.expand_dims(nab, 1) + off
                acc += chunk * absmax
                i += 1
            gl.store(y_ptr + n, (gl.sum(acc, axis=1) * unscale).to(y_ptr.dtype.element_ty), mask=n < N)

    @gluon.jit
    def ws_gemv_kernel(w_desc, a_desc, x_ptr, t0, t1, t2, t3, t4, t5, t6, t7, nested_code_ptr, nested_absmax_ptr,
                       offset_ptr, y_ptr, N, K, NB: gl.constexpr, NBP: gl.constexpr, BN: gl.constexpr,
                       STAGES: gl.constexpr, NESTED_BS: gl.constexpr, FLOAT_ABSMAX: gl.constexpr,
                       FENCE: gl.constexpr):
        W: gl.constexpr = gl.num_warps()
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 2, 4], [1, 32, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
        # x (as int32 bf16 pairs): pair j of word (s, b, c, i) is x_ptr[4 * (256 s + 8 b + 4 c + i) + j]
        ss = gl.arange(0, NBP, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        bb = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        cc = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
        ii = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        s4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(ss, 1), 2), 3)
        word = (s4 * 256 + gl.expand_dims(gl.expand_dims(gl.expand_dims(bb, 0), 2), 3) * 8
                + gl.expand_dims(gl.expand_dims(gl.expand_dims(cc, 0), 1), 3) * 4
                + gl.expand_dims(gl.expand_dims(gl.expand_dims(ii, 0), 1), 2))
        v0 = gl.load(x_ptr + word * 4 + 0, mask=s4 < NB, other=0)
        v1 = gl.load(x_ptr + word * 4 + 1, mask=s4 < NB, other=0)
        v2 = gl.load(x_ptr + word * 4 + 2, mask=s4 < NB, other=0)
        v3 = gl.load(x_ptr + word * 4 + 3, mask=s4 < NB, other=0)
        m = gl.maximum(gl.maximum(_absmax2(v0), _absmax2(v1)), gl.maximum(_absmax2(v2), _absmax2(v3)))
        ex = (gl.max(gl.max(gl.max(gl.max(m, axis=3), axis=2), axis=1), axis=0).to(gl.int32, bitcast=True) >> 23) & 0xFF
        ex = gl.minimum(gl.maximum(ex, 20), 255)  # as the rows kernel: max |x| scaled into [2^9, 2^10)
        scale = ((263 - ex) << 23).to(gl.float32, bitcast=True)
        unscale = ((ex - 9) << 23).to(gl.float32, bitcast=True)
        XSL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
        xs = (gl.allocate_shared_memory(gl.int32, [NBP, 32, 2, 4], XSL, _pair(v0, scale)),
              gl.allocate_shared_memory(gl.int32, [NBP, 32, 2, 4], XSL, _pair(v1, scale)),
              gl.allocate_shared_memory(gl.int32, [NBP, 32, 2, 4], XSL, _pair(v2, scale)),
              gl.allocate_shared_memory(gl.int32, [NBP, 32, 2, 4], XSL, _pair(v3, scale)))
        w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 256], w_desc.layout)
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BN, 32], a_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(STAGES):
            mbarrier.init(ready.index(k), count=1)
            mbarrier.init(empty.index(k), count=1)
        gl.thread_barrier()
        gl.warp_specialize([
            (_consumer, (w_bufs, a_bufs, ready, empty, xs, t0, t1, t2, t3, t4, t5, t6, t7, unscale, nested_code_ptr,
                         nested_absmax_ptr, offset_ptr, y_ptr, N, K, NB, NBP, BN, STAGES, NESTED_BS, L4, FLOAT_ABSMAX,
                         FENCE)),
            (_producer, (w_desc, a_desc, w_bufs, a_bufs, ready, empty, N, NB, BN, STAGES)),
        ], [1], [24])

    return ws_gemv_kernel


def ws_launcher(kernel, x, words, state, planes, f, out, sm, bn, stages, warps, per_sm, maxnreg, absf=None,
                fence=True):
    """A callable launching the warp-specialized kernel (``absf``: float32 absmax instead of uint8 + nested)."""
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, k = f["shape"]
    if k % 2048:
        raise ValueError(f"the warp-specialized probe needs K % 2048 == 0, got K={k}")
    absmax, _, nested_code, nested_absmax, offset, nested_bs = state
    a2 = (absmax.view(torch.uint8) if absf is None else absf).view(n, k // 64)
    w_desc = TensorDescriptor.from_tensor(words.view(n, k // 8), [bn, 256], gl.NVMMASharedLayout(0, 32, rank=2))
    a_desc = TensorDescriptor.from_tensor(a2, [bn, 32], gl.NVMMASharedLayout(0, a2.element_size() * 8, rank=2))
    nb = k // 2048
    grid = (max(1, min(triton.cdiv(n, bn), sm * per_sm)),)
    kw = dict(NB=nb, NBP=1 << (nb - 1).bit_length(), BN=bn, STAGES=stages, NESTED_BS=nested_bs,
              FLOAT_ABSMAX=absf is not None, FENCE=fence, num_warps=warps, maxnreg=maxnreg)
    xi = x.view(torch.int32)

    def run():
        kernel[grid](w_desc, a_desc, xi, *planes, nested_code, nested_absmax, offset, out, n, k, **kw)
        return out

    return run


def probe(nf4, gemv) -> list[dict]:
    from qconv.kernels import nf4_gemv as ng

    kernel = build_kernel()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n, k in SHAPES:
        case = f"{n}x{k}"
        f, words, state, planes, x, ref, out, cands = gemv.probe_case(nf4, n, k, sm)
        absmax, code, nested_code, nested_absmax, offset, nested_bs = state
        blk = torch.arange(absmax.numel(), device="cuda")
        absf = (nested_code[absmax.view(torch.uint8).long()] * nested_absmax[blk // nested_bs] + offset).contiguous()
        state_f, f_f = (absf, code, absf, absf, absf, 1), dict(f, nested=False)
        cands.append(("rows kernel, float32 absmax",
                      lambda: ng.gemv_rows(x, words, state_f, planes, f_f, None, out, sm)))
        for bn, stages, warps, per_sm, maxnreg in CONFIGS[:3] if n < 14336 and k == 4096 else CONFIGS:
            for name, use_f, fence in VARIANTS:
                label = f"ws {name}: {bn} rows x {stages} stages, {warps}+1 warps, {per_sm}/SM, maxnreg {maxnreg}"
                fn = nf4._safe(gemv.log, f"{case} {label}", lambda: ws_launcher(
                    kernel, x, words, state, planes, f, out, sm, bn, stages, warps, per_sm, maxnreg,
                    absf if use_f else None, fence))
                if fn is not None:
                    cands.append((label, fn))
        for label, fn in cands:
            out.zero_()
            err = nf4._safe(gemv.log, f"{case} {label}", lambda: nf4._rel_err(fn(), ref))
            if err is None or not err < 5e-3:
                gemv.log(f"  {case} {label}: WRONG or failed (rel_err {err}), skipped")
                continue
            ms = nf4._graph_bench(fn)
            err = max(err, nf4._rel_err(fn(), ref))  # again after the timed replays
            rows.append(dict(section="probe", case=case, impl=label, ms_graph=round(ms, 5), check=f"rel_err={err:.1e}"))
            gemv.log(f"  {rows[-1]}")
        rows.append(dict(section="probe", case=case, impl="read floor (bench_gemv.read_floor)", check="",
                         ms_graph=round(nf4._graph_bench(gemv.read_floor(words)), 5)))
    return nf4._with_ratios(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows and the environment here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_gemv_ws.py needs a CUDA GPU")
    nf4 = bench_gemv._load("bench_kernels_nf4")
    rows = probe(nf4, bench_gemv)
    best = {}
    for r in rows:
        if r["impl"].startswith("ws ") and (r["case"] not in best or r["ms_graph"] < best[r["case"]]["ms_graph"]):
            best[r["case"]] = r
    print(nf4.format_table(rows, ["case", "impl", "ms_graph", "speedup_vs_bnb_graph", "check"]))
    print("\nfastest warp-specialized config per shape:")
    print(nf4.format_table(list(best.values()), ["case", "impl", "ms_graph", "speedup_vs_bnb_graph", "check"]))
    env = nf4.environment()
    print(" | ".join(f"{a}: {b}" for a, b in env.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
