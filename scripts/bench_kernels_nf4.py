"""Benchmark the NF4 kernels against bitsandbytes and plain PyTorch, side by side on one GPU.

Used by ``scripts/bench_kernels.py`` (``bench_nf4(...)`` returns table rows); runs alone too:

    python scripts/bench_kernels_nf4.py [--sweep] [--json OUT.json]

Times: ``ms`` is ``triton.testing.do_bench`` (median, L2 flushed) of the eager call, as a user sees it;
``ms_graph`` the same for a CUDA-graph replay of the call (GPU time, without Python and launch cost);
``host_us`` the host time per call of back-to-back eager calls. Bytes counted (each input read once,
each output written once): dequantize = packed + uint8 absmax + output; GEMV = packed + absmax + x + y.
``frac_copy`` is GB/s over a device-to-device copy measured in the same run (bytes read + written).
``--sweep`` first times our kernels' launch parameters (GPU time, each config checked against the
reference; ``bench_kernels_nf4_sweep.py``) and uses the fastest for the rest of the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

LLAMA_SHAPES = {"gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336),
                "q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096)}
DEQUANT_CASES = [("14336x4096 bf16", (14336, 4096), torch.bfloat16, 64), ("4096x4096 bf16", (4096, 4096), torch.bfloat16, 64),
                 ("14336x4096 fp16", (14336, 4096), torch.float16, 64), ("14336x4096 fp32", (14336, 4096), torch.float32, 64),
                 ("14336x4096 bf16 bs256", (14336, 4096), torch.bfloat16, 256)]
BIG = (14336, 4096)  # the few-rows, training and sweep shape
TRAIN_TOKENS = 4096


def _do_bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (after three warm-up calls on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _graph_bench(fn: Callable[[], Any]) -> float:
    """Median ms of one CUDA-graph replay of ``fn``: GPU time without Python/launch overhead."""
    return _do_bench(_capture(fn).replay)


def _host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host microseconds per call (enqueue cost) over back-to-back calls."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _graph_bench_clean(fn: Callable[[], Any], reps: int = 100) -> float:
    """Median ms of one CUDA-graph replay of ``fn`` after an L2 flush that leaves only clean lines.

    ``do_bench`` flushes L2 by writing 256 MB, so the timed call starts with L2 full of dirty lines and
    every line it reads first forces a write-back to DRAM: a streaming read then pays for a write too.
    Here the flush reads 256 MB instead (as in decoding, where the previous kernels mostly read weights).
    """
    graph = _capture(fn)
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda").fill_(1)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.sum(dtype=torch.int64)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def measure(fn: Callable[[], Any], *, graph: bool = True, host: bool = True, clean: bool = False) -> dict:
    """``ms`` (do_bench, eager), ``ms_graph`` (CUDA-graph replay), ``host_us`` (enqueue cost per call);
    ``clean``: also ``ms_graph_clean`` (graph replay after a read-only L2 flush, :func:`_graph_bench_clean`)."""
    t = {"ms": _do_bench(fn)}
    if graph:
        try:
            t["ms_graph"] = _graph_bench(fn)
            if clean:
                t["ms_graph_clean"] = _graph_bench_clean(fn)
        except Exception:  # not capturable: leave the column empty
            t["ms_graph"] = None
    if host:
        t["host_us"] = _host_us(fn)
    return t


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 28) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def _quantized(n_out: int, n_in: int, device: str, blocksize: int = 64, quant_type: str = "nf4",
               double_quant: bool = True, dtype=torch.bfloat16):
    import bitsandbytes.functional as F

    w = torch.randn(n_out, n_in, device=device, dtype=dtype)
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def _row(section: str, case: str, impl: str, t: dict, nbytes: int | None, copy_gbps: float, **extra) -> dict:
    row = dict(section=section, case=case, impl=impl)
    for key, suffix in (("ms", ""), ("ms_graph", "_graph"), ("ms_graph_clean", "_graph_clean")):
        ms = t.get(key)
        row[key] = round(ms, 5) if ms else None
        gbps = nbytes / ms / 1e6 if (nbytes and ms) else None
        row["gbps" + suffix] = round(gbps, 1) if gbps else None
        row["frac_copy" + suffix] = round(gbps / copy_gbps, 3) if gbps else None
    row["host_us"] = round(t["host_us"], 1) if t.get("host_us") else None
    row.update(extra)
    return row


def _with_ratios(rows: list[dict], baseline: str = "bitsandbytes") -> list[dict]:
    """Add ``speedup_vs_bnb`` (and ``_graph``): baseline ms / ms, per case that has a baseline row."""
    for key in ("ms", "ms_graph", "ms_graph_clean"):
        base = {(r["section"], r["case"]): r.get(key) for r in rows if r["impl"] == baseline}
        for r in rows:
            b = base.get((r["section"], r["case"]))
            r["speedup_vs_bnb" + key[2:]] = round(b / r[key], 2) if (b and r.get(key)) else None
    return rows


def _safe(log: Callable, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a config that fails to compile must not end the run
        log(f"  {what}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def bench_dequantize(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    import bitsandbytes.functional as F

    from qconv.kernels import dequantize_nf4

    rows = []
    for case, (n, k), dtype, bs in DEQUANT_CASES:
        packed, qs = _quantized(n, k, device, bs, dtype=dtype)
        nbytes = packed.numel() + qs.absmax.numel() + n * k * dtype.itemsize
        out = torch.empty(n, k, dtype=dtype, device=device)
        ours = dequantize_nf4(packed, qs, dtype)
        exact = bool(torch.equal(ours, F.dequantize_4bit(packed, qs)))
        for impl, fn in [("qconv", lambda: dequantize_nf4(packed, qs, dtype, out=out)),
                         ("bitsandbytes", lambda: F.dequantize_4bit(packed, qs, out=out))]:
            t = _safe(log, f"dequantize {case} {impl}", lambda: measure(fn))
            if t:
                rows.append(_row("dequantize", case, impl, t, nbytes, copy_gbps,
                                 check=f"bitwise={exact}" if impl == "qconv" else None))
    return rows


def bench_gemv(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    import bitsandbytes as bnb

    from qconv.kernels import dequantize_nf4, matmul_nf4

    rows = []
    for case, (n, k) in LLAMA_SHAPES.items():
        packed, qs = _quantized(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        nbytes = packed.numel() + qs.absmax.numel() + 2 * (n + k)
        ref = x.double() @ dequantize_nf4(packed, qs, torch.float32).double().t()
        impls = [("qconv", lambda: matmul_nf4(x, packed, qs)),
                 ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs)),
                 ("dequant+matmul", lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).t())]
        for impl, fn in impls:
            err = _safe(log, f"gemv {case} {impl} check", lambda: _rel_err(fn(), ref))
            t = _safe(log, f"gemv {case} {impl}", lambda: measure(fn))
            if t:
                rows.append(_row("gemv 1 row", case, impl, t, nbytes, copy_gbps,
                                 check=f"rel_err={err:.1e}" if err is not None else None))
    return rows


def bench_rows(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """Few rows (batched decoding) through 14336x4096: matmul_nf4 vs dequantize + matmul vs bitsandbytes."""
    import bitsandbytes as bnb

    from qconv.kernels import dequantize_nf4, matmul_nf4

    rows = []
    n, k = BIG
    packed, qs = _quantized(n, k, device)
    for m in (2, 4, 8, 16):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        impls = [("qconv", lambda: matmul_nf4(x, packed, qs)),
                 ("dequant+matmul", lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).t()),
                 ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs))]
        for impl, fn in impls:
            t = _safe(log, f"rows {m} {impl}", lambda: measure(fn, host=False))
            if t:
                rows.append(_row("few rows 14336x4096", f"M={m}", impl, t, None, copy_gbps))
    return rows


def bench_training(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """TRAIN_TOKENS tokens through 14336x4096, forward and forward+backward (grad to x only)."""
    import bitsandbytes as bnb

    from qconv.kernels import matmul_nf4

    rows = []
    n, k = BIG
    packed, qs = _quantized(n, k, device)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    x = torch.randn(TRAIN_TOKENS, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TRAIN_TOKENS, n, device=device, dtype=torch.bfloat16)

    def fwd_bwd(f):
        def run():
            x.grad = None
            f().backward(dy)
        return run

    impls = [("qconv", lambda: matmul_nf4(x, packed, qs)), ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs)),
             ("bf16 linear (no quant)", lambda: x @ w.t())]
    for impl, fn in impls:
        with torch.no_grad():
            t = _safe(log, f"train fwd {impl}", lambda: measure(fn, graph=False, host=False))
        if t:
            rows.append(_row(f"{TRAIN_TOKENS} tokens 14336x4096", "forward", impl, t, None, copy_gbps))
        t = _safe(log, f"train fwd+bwd {impl}", lambda: measure(fwd_bwd(fn), graph=False, host=False))
        if t:
            rows.append(_row(f"{TRAIN_TOKENS} tokens 14336x4096", "forward+backward", impl, t, None, copy_gbps))
    return rows


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def _load_sweep():
    """``bench_kernels_nf4_sweep.py`` next to this file (loaded by path, like the other scripts load theirs)."""
    path = Path(__file__).with_name("bench_kernels_nf4_sweep.py")
    spec = importlib.util.spec_from_file_location("bench_kernels_nf4_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_nf4(device: str = "cuda", *, copy_gbps: float | None = None, sweep_params: bool = False,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Run the NF4 benchmarks; returns rows ``{section, case, impl, ms, ms_graph, gbps, frac_copy, ...}``.

    With ``sweep_params`` the launch-parameter sweeps run first and the fastest checked configs become
    the module defaults for the rest of the run (``kernels/nf4_*.py`` carry the values chosen so).
    """
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device)
    rows = [_row("copy", "device-to-device 256 MiB", "torch copy_", {"ms": 2 * (1 << 28) / copy_gbps / 1e6},
                 2 * (1 << 28), copy_gbps)]
    sweep = _load_sweep() if sweep_params else None
    sections = [sweep.sweep_dequantize, sweep.sweep_gemv, sweep.sweep_rows] if sweep_params else []
    sections += [bench_dequantize, bench_gemv, bench_rows, bench_training]
    for section in sections:
        if section is bench_dequantize and sweep_params:
            sweep.apply_best(rows, log)
        log(f"[bench_nf4] {section.__name__}")
        new = section(device, copy_gbps, log)
        for r in new:  # as they come: a run cut short still shows what it measured
            log("  " + " | ".join(f"{k}={v}" for k, v in r.items() if v is not None and k not in ("section", "params")))
        rows += new
    return _with_ratios(rows)


TABLE_COLUMNS = ["section", "case", "impl", "ms", "ms_graph", "host_us", "gbps", "frac_copy", "frac_copy_graph",
                 "speedup_vs_bnb", "speedup_vs_bnb_graph", "check"]


def format_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (``cols``: the columns to show; default all of ``TABLE_COLUMNS`` for
    the standard table, and when given, those with at least one value)."""
    if cols is None:
        cols = TABLE_COLUMNS
    else:
        cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    text = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(t, widths)) for t in text]
    return "\n".join(lines)


def environment() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep our kernels' launch parameters")
    ap.add_argument("--json", help="write the rows and the environment to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_nf4: needs a CUDA device")
    rows = bench_nf4(sweep_params=args.sweep)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "rows": rows}, fh, indent=1)
    print(json.dumps(environment()))
    print(format_table(rows))


if __name__ == "__main__":
    main()
