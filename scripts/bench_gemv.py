"""Focused GPU benchmark of the NF4 GEMV (``matmul_nf4`` with few rows) against bitsandbytes, with a sweep.

    python scripts/bench_gemv.py [--sweep] [--seconds 200] [--json OUT.json]

``--sweep`` first times the ``rows`` kernel's launch parameters (rows per step, warps, programs per SM;
then, at the previous default, float32 instead of float16-pair sums, L2 evict-first off, and the gather
lookup) and two probes without the code lookup for the two Llama MLP shapes: every config is checked against the float64 reference (configs that are wrong are skipped
loudly) and timed as GPU time (CUDA-graph replay); the fastest checked config per shape becomes the
default for the rest of the run. The table then compares ``matmul_nf4`` and
``bitsandbytes.matmul_4bit`` side by side: ``ms`` = ``triton.testing.do_bench`` median of the eager
Python call (L2 flushed by writing 256 MB), ``ms_graph`` = the same for a CUDA-graph replay (GPU time),
``ms_graph_clean`` = graph replay after an L2 flush that only reads (no dirty lines to write back: the
state decoding leaves L2 in), ``host_us`` = host time per back-to-back call (helpers of
``bench_kernels_nf4.py``), GB/s counted as packed weight + absmax + x + y, over a device-to-device copy
measured in the same run. The ``floor`` row of each shape only reads the packed weight (:func:`read_floor`):
no GEMV of that weight can be faster under the same flush.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
SHAPES = {"14336x4096": (14336, 4096), "4096x14336": (4096, 14336), "4096x4096": (4096, 4096),
          "1024x4096": (1024, 4096)}
SWEEP_SHAPES = ("14336x4096", "4096x14336")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sweep_configs(K: int) -> list[dict]:
    """Candidate launch parameters of the rows kernel for rows of K elements."""
    if K <= 4096:
        grid = itertools.product((2, 4, 8), (4, 8), (1, 2, 3, 4, 6))
        before = dict(r=4, num_warps=4, per_sm=2)  # the default before float16-pair sums
    else:
        grid = itertools.product((1, 2, 4), (4, 8, 16), (1, 2, 3))
        before = dict(r=2, num_warps=8, per_sm=1)
    out = [dict(r=r, num_warps=w, per_sm=p, lookup_asm=True) for r, w, p in grid]
    return out + [dict(before, lookup_asm=True, half2=False),  # float32 products and sums
                  dict(before, lookup_asm=True, evict_first=False),  # weight lines not marked evict-first
                  dict(before, lookup_asm=False)]  # the L1-gather lookup


#: Probes (results wrong by design, never checked or chosen): the rows kernel without the code lookup
#: (probe=1: the words' bits used as float32, FMAs kept; probe=2: one product per word) shows what the
#: loads, FMAs and reductions alone cost.
def probe_configs(K: int) -> list[dict]:
    base = [dict(r=4, num_warps=8, per_sm=2), dict(r=2, num_warps=8, per_sm=3)] if K <= 4096 else \
        [dict(r=2, num_warps=16, per_sm=1), dict(r=1, num_warps=8, per_sm=2)]
    return [dict(b, probe=level) for level in (1, 2) for b in base]


def rows_inputs(nf4, n: int, k: int) -> tuple:
    """A random [n, k] weight quantized by bitsandbytes and what ``gemv_rows`` takes for it:
    ``(packed, quant_state, fields, words, state, planes, w_ref)``, ``w_ref`` the float64 dequantized weight."""
    from qconv.kernels import nf4_dequantize as nd
    from qconv.kernels import nf4_gemv as ng

    packed, qs = nf4._quantized(n, k, "cuda")
    f = nd._state_fields(qs)
    words = nd._packed_bytes(packed, f["numel"]).view(torch.int32)
    state = nd.state_tensors(qs, f, packed.device, False)
    planes = ng.code_planes(qs.code)
    w_ref = nd.dequantize_nf4_reference(packed, qs, torch.float32).double()
    return packed, qs, f, words, state, planes, w_ref


def probe_case(nf4, n: int, k: int, sm: int) -> tuple:
    """One shape for the probe scripts: ``(fields, words, state, planes, x, ref, out, baselines)``: what
    ``gemv_rows`` takes for a random [n, k] NF4 weight, a random bf16 x [k], the float64 reference, an output
    buffer, and ``baselines`` = [(label, callable)] for the production rows kernel and bitsandbytes."""
    import bitsandbytes as bnb

    from qconv.kernels import nf4_gemv as ng

    packed, qs, f, words, state, planes, w_ref = rows_inputs(nf4, n, k)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    baselines = [("rows kernel (production)", lambda: ng.gemv_rows(x, words, state, planes, f, None, out, sm)),
                 ("bitsandbytes", lambda: bnb.matmul_4bit(x[None], packed.t(), qs)[0])]
    return f, words, state, planes, x, x.double() @ w_ref.t(), out, baselines


def sweep(nf4, deadline: float) -> list[dict]:
    from qconv.kernels import nf4_gemv as ng

    rows = []
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for case in SWEEP_SHAPES:
        n, k = SHAPES[case]
        packed, qs, f, words, state, planes, w_ref = rows_inputs(nf4, n, k)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(k, device="cuda", dtype=dtype)
            ref = x.double() @ w_ref.t()
            out = torch.empty(n, device="cuda", dtype=dtype)
            for cfg in probe_configs(k) if dtype == torch.bfloat16 else []:
                run = lambda: ng.gemv_rows(x, words, state, planes, f, None, out, sm, **cfg)  # noqa: E731
                label = f"{case} PROBE (wrong by design) " + " ".join(f"{a}={b}" for a, b in cfg.items())
                ms = nf4._safe(log, label, lambda: nf4._graph_bench(run))
                if ms:
                    rows.append(dict(section="probe rows kernel", case=case, impl=label[len(case) + 1:],
                                     ms_graph=round(ms, 5), check="not checked", k=k, params=cfg))
                    log(f"  {label}: {ms:.5f} ms")
            for cfg in sweep_configs(k) if dtype == torch.bfloat16 else []:
                if time.time() > deadline:
                    log("sweep: out of time")
                    return rows
                label = f"{case} " + " ".join(f"{a}={b}" for a, b in cfg.items())
                run = lambda: ng.gemv_rows(x, words, state, planes, f, None, out, sm, **cfg)  # noqa: E731
                err = nf4._safe(log, label, lambda: nf4._rel_err(run(), ref))
                if err is None or not err < 5e-3:
                    log(f"  {label}: SKIPPED, wrong or failed (rel_err {err})")
                    continue
                ms = nf4._safe(log, label, lambda: nf4._graph_bench(run))
                if ms:
                    rows.append(dict(section="sweep rows kernel", case=case, impl=label[len(case) + 1:],
                                     ms_graph=round(ms, 5), check=f"rel_err={err:.1e}", k=k, params=cfg))
                    log(f"  {label}: {ms:.5f} ms (rel_err {err:.1e})")
    return rows


def apply_sweep(rows: list[dict]) -> dict:
    """Make the fastest checked asm config per shape the module default (ROWS_CONFIGS)."""
    from qconv.kernels import nf4_gemv as ng

    chosen = {}
    for k in sorted({r["k"] for r in rows}):
        cands = [r for r in rows if r["k"] == k and r["section"] == "sweep rows kernel"
                 and r["params"].get("lookup_asm") and r["params"].get("evict_first", True)
                 and r["params"].get("half2", True)]
        if cands:
            best = min(cands, key=lambda r: r["ms_graph"])
            p = best["params"]
            chosen[k] = (p["r"], p["num_warps"], p["per_sm"])
    if chosen:
        ks = sorted(chosen)
        ng.ROWS_CONFIGS[:] = [(k // 2, *chosen[k]) for k in ks[:-1]] + [(1 << 62, *chosen[ks[-1]])]
    return {str(k): v for k, v in chosen.items()}


def read_floor(words: torch.Tensor, block: int = 2048, num_warps: int = 4, evict_first: bool = True):
    """A callable that only reads ``words`` (int32, the packed weight) once, as fast as Triton streams it:
    [block]-word programs, 128-bit loads, L2 lines evict-first, one int32 sum per block. No GEMV can take
    less time than this read in the same conditions: the floor row of the table (defaults; other values
    for ``scripts/probe_gemv_smem.py``'s read sweep)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if EVICT_FIRST:
            w = tl.load(w_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(w, axis=0))

    grid = (triton.cdiv(words.numel(), block),)
    out = torch.empty(grid[0], dtype=torch.int32, device=words.device)
    return lambda: _read_kernel[grid](words, out, words.numel(), BLOCK=block, EVICT_FIRST=evict_first,
                                      num_warps=num_warps)


def bench(nf4, copy_gbps: float) -> list[dict]:
    import bitsandbytes as bnb

    from qconv.kernels import matmul_nf4
    from qconv.kernels import nf4_dequantize as nd

    rows = []
    for case, (n, k) in SHAPES.items():
        packed, qs = nf4._quantized(n, k, "cuda")
        w_ref = nd.dequantize_nf4_reference(packed, qs, torch.float32).double()
        words = nd._packed_bytes(packed, nd._state_fields(qs)["numel"]).view(torch.int32)
        t = nf4._safe(log, f"{case} floor", lambda: nf4.measure(read_floor(words), host=False, clean=True))
        if t:
            r = nf4._row("gemv", f"{case}, 1, bfloat16", "floor: read the packed weight only", t, packed.numel(), copy_gbps)
            rows.append(r)
            log(f"  {r}")
        big = case in SWEEP_SHAPES
        more = [(2, torch.bfloat16), (4, torch.bfloat16), (1, torch.float16)] if big else []
        for m, dtype in [(1, torch.bfloat16)] + more:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w_ref.t()
            nbytes = packed.numel() + qs.absmax.numel() + dtype.itemsize * m * (n + k)
            label = f"{case}, {m}, {str(dtype)[6:]}"
            for impl, fn in [("qconv", lambda: matmul_nf4(x, packed, qs)),
                             ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs))]:
                err = nf4._safe(log, f"{label} {impl}", lambda: nf4._rel_err(fn(), ref))
                t = nf4._safe(log, f"{label} {impl}", lambda: nf4.measure(fn, clean=m == 1))
                if t:
                    r = nf4._row("gemv", label, impl, t, nbytes, copy_gbps,
                                 check=f"rel_err={err:.1e}" if err is not None else None)
                    rows.append(r)
                    log(f"  {r}")
    return nf4._with_ratios(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="sweep the rows kernel's launch parameters first")
    ap.add_argument("--seconds", type=float, default=200.0, help="time budget of the sweep")
    ap.add_argument("--json", help="write rows, chosen defaults and the environment here")
    args = ap.parse_args(argv)
    start = time.time()
    nf4 = _load("bench_kernels_nf4")
    env = nf4.environment()
    log(json.dumps(env))
    copy_gbps = nf4.copy_bandwidth("cuda")
    out: dict = {"environment": env, "copy_gbps": copy_gbps, "rows": [], "chosen": {}}
    swept = sweep(nf4, start + args.seconds) if args.sweep else []
    out["chosen"] = apply_sweep(swept)
    out["rows"] += swept
    from qconv.kernels import nf4_gemv as ng

    log(f"rows kernel configs: {ng.ROWS_CONFIGS}")
    rows = bench(nf4, copy_gbps)
    out["rows"] += rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(env))
    print(f"copy {copy_gbps:.0f} GB/s; rows kernel configs {ng.ROWS_CONFIGS}")
    if swept:
        print(nf4.format_table(sorted(swept, key=lambda r: (r["case"], r["ms_graph"])), ["case", "impl", "ms_graph", "check"]))
    print(nf4.format_table(rows, ["case", "impl", "ms", "ms_graph", "ms_graph_clean", "host_us", "frac_copy_graph",
                       "speedup_vs_bnb", "speedup_vs_bnb_graph", "speedup_vs_bnb_graph_clean", "check"]))


if __name__ == "__main__":
    main()
