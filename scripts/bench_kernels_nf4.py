"""Benchmark the NF4 kernels against bitsandbytes and plain PyTorch, side by side on one GPU.

Used by ``scripts/bench_kernels.py`` (``bench_nf4(...)`` returns table rows); runs alone too:

    python scripts/bench_kernels_nf4.py [--sweep] [--json OUT.json]

Bytes counted (each input read once, each output written once): dequantize = packed + uint8 absmax +
output; GEMV = packed + absmax + x + y. ``frac_copy`` is GB/s over a device-to-device copy measured in
the same run (bytes read + bytes written). ``--sweep`` also times the launch parameters of our kernels
(bytes per program, rows per program, warps, code-table variant) to choose the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
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


def _row(section: str, case: str, impl: str, ms: float, nbytes: int | None, copy_gbps: float, **extra) -> dict:
    gbps = nbytes / ms / 1e6 if nbytes else None
    row = dict(section=section, case=case, impl=impl, ms=round(ms, 5),
               gbps=round(gbps, 1) if gbps else None, frac_copy=round(gbps / copy_gbps, 3) if gbps else None)
    row.update(extra)
    return row


def _with_ratios(rows: list[dict], baseline: str = "bitsandbytes") -> list[dict]:
    """Add ``speedup_vs_bnb`` (baseline ms / ms) to every row of a case that has a baseline row."""
    base = {(r["section"], r["case"]): r["ms"] for r in rows if r["impl"] == baseline}
    for r in rows:
        b = base.get((r["section"], r["case"]))
        r["speedup_vs_bnb"] = round(b / r["ms"], 2) if b else None
    return rows


def _safe(log: Callable, what: str, fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as exc:  # a config that fails to compile must not end the run
        log(f"  {what}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None


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
        for impl, fn in [("qconv", lambda: dequantize_nf4(packed, qs, dtype, out=out)),
                         ("bitsandbytes", lambda: F.dequantize_4bit(packed, qs, out=out))]:
            ms = _safe(log, f"dequantize {case} {impl}", lambda: _do_bench(fn))
            if ms:
                rows.append(_row("dequantize", case, impl, ms, nbytes, copy_gbps))
    return rows


def bench_gemv(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qconv.kernels import dequantize_nf4, matmul_nf4

    rows = []
    for case, (n, k) in LLAMA_SHAPES.items():
        packed, qs = _quantized(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        nbytes = packed.numel() + qs.absmax.numel() + 2 * (n + k)
        impls = [("qconv", lambda: matmul_nf4(x, packed, qs)),
                 ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs)),
                 ("bnb gemv_4bit", lambda: F.gemv_4bit(x, packed.t(), state=qs)),
                 ("dequant+matmul", lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).t())]
        for impl, fn in impls:
            ms = _safe(log, f"gemv {case} {impl}", lambda: _do_bench(fn))
            if ms:
                rows.append(_row("gemv 1 row", case, impl, ms, nbytes, copy_gbps))
    return rows


def bench_rows(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """Few rows (batched decoding): fused tl.dot vs dequantize + torch.matmul vs bitsandbytes."""
    import bitsandbytes as bnb

    from qconv.kernels import nf4_matmul
    from qconv.kernels.nf4_dequantize import _packed_bytes, _state_fields, dequantize_nf4

    rows = []
    n, k = BIG
    packed, qs = _quantized(n, k, device)
    f = _state_fields(qs)
    data = _packed_bytes(packed, f["numel"])
    for m in (2, 4, 8, 16, 32, 64):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        impls = [("fused tl.dot", lambda: nf4_matmul._fused_dot(x, data, qs, f, None)),
                 ("dequant+matmul", lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).t()),
                 ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs))]
        for impl, fn in impls:
            ms = _safe(log, f"rows {m} {impl}", lambda: _do_bench(fn))
            if ms:
                rows.append(_row("few rows 14336x4096", f"M={m}", impl, ms, None, copy_gbps))
    return rows


def bench_training(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """4096 tokens through 14336x4096, forward and forward+backward (grad to x only)."""
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
            ms = _safe(log, f"train fwd {impl}", lambda: _do_bench(fn))
        if ms:
            rows.append(_row("4096 tokens 14336x4096", "forward", impl, ms, None, copy_gbps))
        ms = _safe(log, f"train fwd+bwd {impl}", lambda: _do_bench(fwd_bwd(fn)))
        if ms:
            rows.append(_row("4096 tokens 14336x4096", "forward+backward", impl, ms, None, copy_gbps))
    return rows


# --------------------------------------------------------------------------------------------------
# Launch-parameter sweeps (to choose the defaults in kernels/nf4_*.py)
# --------------------------------------------------------------------------------------------------
def _sweep_inputs(device: str):
    from qconv.kernels import nf4_dequantize as nd

    n, k = BIG
    packed, qs = _quantized(n, k, device)
    f = nd._state_fields(qs)
    return n, k, packed, qs, f, nd._packed_bytes(packed, f["numel"])


def sweep_dequantize(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    from qconv.kernels import nf4_dequantize as nd

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    out = torch.empty(n * k, dtype=torch.bfloat16, device=device)
    nbytes = packed.numel() + qs.absmax.numel() + 2 * n * k
    for bpp, warps, pair in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16), (True, False)):
        ms = _safe(log, f"sweep dequant {bpp} {warps} {pair}", lambda: _do_bench(
            lambda: nd._launch_dequantize(data, qs, f, out, bytes_per_program=bpp, num_warps=warps, pair=pair)))
        if ms:
            rows.append(_row("sweep dequantize", f"bytes={bpp} warps={warps} pair={pair}", "qconv", ms, nbytes, copy_gbps))
    return rows


def sweep_gemv(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    from qconv.kernels import nf4_matmul as nm

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    nbytes = packed.numel() + qs.absmax.numel() + 2 * (n + k)
    gemv_grid = [(bn, step, w, p) for bn, step in ((2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 128),
                                                   (16, 256), (32, 128), (1, 2048))
                 for w in (4, 8) for p in (True, False)]
    for bn, step, warps, pair in gemv_grid:
        ms = _safe(log, f"sweep gemv {bn} {step} {warps} {pair}", lambda: _do_bench(
            lambda: nm._gemv(x, data, qs, f, None, block_n=bn, step_bytes=step, num_warps=warps, pair=pair)))
        if ms:
            rows.append(_row("sweep gemv", f"block_n={bn} step={step} warps={warps} pair={pair}", "qconv", ms, nbytes, copy_gbps))
    return rows


def sweep_dot(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    from qconv.kernels import nf4_matmul as nm

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    x16 = torch.randn(16, k, device=device, dtype=torch.bfloat16)
    for bn, bk, warps, stages, pair in [(64, 128, 4, 3, True), (64, 128, 4, 3, False), (32, 128, 4, 3, True),
                                        (128, 128, 4, 3, True), (64, 256, 4, 3, True), (64, 64, 4, 3, True),
                                        (64, 128, 4, 2, True), (64, 128, 4, 4, True), (128, 128, 8, 3, True),
                                        (32, 256, 4, 3, True), (128, 64, 4, 4, True)]:
        ms = _safe(log, f"sweep dot {bn} {bk} {warps} {stages} {pair}", lambda: _do_bench(
            lambda: nm._fused_dot(x16, data, qs, f, None, block_n=bn, block_k=bk, num_warps=warps,
                                  num_stages=stages, pair=pair)))
        if ms:
            rows.append(_row("sweep dot M=16", f"block_n={bn} block_k={bk} warps={warps} stages={stages} pair={pair}",
                             "qconv", ms, None, copy_gbps))
    return rows


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def bench_nf4(device: str = "cuda", *, copy_gbps: float | None = None, sweep_params: bool = False,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Run the NF4 benchmarks; returns rows ``{section, case, impl, ms, gbps, frac_copy, speedup_vs_bnb}``."""
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device)
    rows = [_row("copy", "device-to-device 256 MiB", "torch copy_", 2 * (1 << 28) / copy_gbps / 1e6, 2 * (1 << 28), copy_gbps)]
    sections = [bench_dequantize, bench_gemv, bench_rows, bench_training]
    if sweep_params:
        sections += [sweep_dequantize, sweep_gemv, sweep_dot]
    for section in sections:
        log(f"[bench_nf4] {section.__name__}")
        new = section(device, copy_gbps, log)
        for r in new:  # as they come: a run cut short still shows what it measured
            log(f"  {r['section']} | {r['case']} | {r['impl']} | {r['ms']} ms | {r['gbps']} GB/s | {r['frac_copy']}")
        rows += new
    return _with_ratios(rows)


def format_table(rows: list[dict]) -> str:
    cols = ["section", "case", "impl", "ms", "gbps", "frac_copy", "speedup_vs_bnb"]
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
