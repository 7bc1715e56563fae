"""Launch-parameter sweeps of the NF4 kernels, used by ``bench_kernels_nf4.py --sweep`` (``bench_nf4(sweep_params=True)``).

GPU time (CUDA-graph replay); each config is checked against the reference before it is timed, and
``apply_best`` makes the fastest checked configs the module defaults of ``qconv.kernels.nf4_*``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling script, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_nf4 import BIG, _graph_bench, _quantized, _rel_err, _row, _safe  # noqa: E402


def _sweep_inputs(device: str, shape=None):
    from qconv.kernels import nf4_dequantize as nd

    n, k = shape or BIG
    packed, qs = _quantized(n, k, device)
    f = nd._state_fields(qs)
    return n, k, packed, qs, f, nd._packed_bytes(packed, f["numel"])


def sweep_dequantize(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    from qconv.kernels import nf4_dequantize as nd

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    ref = nd.dequantize_nf4_reference(packed, qs, torch.bfloat16)
    out = torch.empty(n * k, dtype=torch.bfloat16, device=device)
    nbytes = packed.numel() + qs.absmax.numel() + 2 * n * k
    configs = [(b, w, False) for b in (2048, 4096, 8192) for w in (4, 8)] + [(4096, 8, True), (4096, 16, False)]
    for bpp, warps, pair in configs:
        def run():
            return nd._launch_dequantize(data, qs, f, out, bytes_per_program=bpp, num_warps=warps, pair=pair)
        ok = _safe(log, f"sweep dequant {bpp} {warps} {pair}", lambda: bool(torch.equal(run().view(n, k), ref)))
        t = _safe(log, f"sweep dequant {bpp} {warps} {pair}", lambda: {"ms_graph": _graph_bench(run)}) if ok else None
        if t:
            rows.append(_row("sweep dequantize", f"bytes={bpp} warps={warps} pair={pair}", "qconv", t, nbytes,
                             copy_gbps, params=dict(bytes_per_program=bpp, num_warps=warps, pair=pair)))
    return rows


GEMV_SWEEP = [(bn, step) for bn, step in ((1, 2048), (2, 1024), (2, 2048), (4, 512), (4, 1024), (8, 256), (8, 512),
                                            (16, 256), (16, 512), (32, 128), (32, 256), (64, 128))]


def sweep_gemv(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """The ``tile`` GEMV kernel's launch parameters, timed with 2 rows of x (one row takes the ``rows``
    kernel of ``kernels/nf4_gemv.py``, swept by ``scripts/bench_gemv.py``)."""
    from qconv.kernels import nf4_matmul as nm

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    x = torch.randn(2, k, device=device, dtype=torch.bfloat16)
    ref = (x.double() @ _dequant_ref(packed, qs).t()).float()
    nbytes = packed.numel() + qs.absmax.numel() + 2 * 2 * (n + k)
    configs = [(bn, step, w, False, True) for bn, step in GEMV_SWEEP for w in (4, 8)]
    configs += [(bn, step, 4, False, False) for bn, step in GEMV_SWEEP]
    configs += [(8, 512, 4, True, True), (4, 1024, 4, True, True), (16, 256, 4, True, True)]
    for bn, step, warps, pair, eo in configs:
        def run():
            return nm._gemv(x, data, qs, f, None, block_n=bn, step_bytes=step, num_warps=warps, pair=pair,
                            even_odd=eo, rows=2)
        err = _safe(log, f"sweep gemv {bn} {step} {warps} {pair} {eo}", lambda: _rel_err(run(), ref))
        t = _safe(log, f"sweep gemv {bn} {step} {warps} {pair} {eo}", lambda: {"ms_graph": _graph_bench(run)}) \
            if err is not None and err < 1e-2 else None
        if t:
            rows.append(_row("sweep gemv", f"block_n={bn} step={step} warps={warps} pair={pair} even_odd={eo}",
                             "qconv", t, nbytes, copy_gbps, check=f"rel_err={err:.1e}",
                             params=dict(block_n=bn, step_bytes=step, num_warps=warps, pair=pair, even_odd=eo)))
    return rows


def sweep_rows(device: str, copy_gbps: float, log: Callable) -> list[dict]:
    """GEMV with several rows of x (rows per program 1..8) against dequantize + matmul."""
    from qconv.kernels import nf4_matmul as nm
    from qconv.kernels.nf4_dequantize import dequantize_nf4

    rows = []
    n, k, packed, qs, f, data = _sweep_inputs(device)
    w_ref = _dequant_ref(packed, qs)
    for m in (2, 3, 4, 8, 16):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = (x.double() @ w_ref.t()).float()
        t = _safe(log, f"sweep rows {m} dequant+matmul",
                  lambda: {"ms_graph": _graph_bench(lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).t())})
        if t:
            rows.append(_row("sweep rows", f"M={m}", "dequant+matmul", t, None, copy_gbps, params=dict(m=m, rows=0)))
        for rpp in (1, 2, 4, 8):
            if rpp > 2 * m:
                continue

            def run():
                return nm._gemv(x, data, qs, f, None, rows=rpp)
            err = _safe(log, f"sweep rows {m} gemv rows={rpp}", lambda: _rel_err(run(), ref))
            t = _safe(log, f"sweep rows {m} gemv rows={rpp}", lambda: {"ms_graph": _graph_bench(run)}) \
                if err is not None and err < 1e-2 else None
            if t:
                rows.append(_row("sweep rows", f"M={m}", f"gemv rows/program={rpp}", t, None, copy_gbps,
                                 check=f"rel_err={err:.1e}", params=dict(m=m, rows=rpp)))
    return rows


def _dequant_ref(packed, qs) -> torch.Tensor:
    from qconv.kernels.nf4_dequantize import dequantize_nf4_reference

    return dequantize_nf4_reference(packed, qs, torch.float32).double()


def apply_best(rows: list[dict], log: Callable) -> dict:
    """Set the module defaults to the fastest checked configs of the sweeps (GPU time); returns them."""
    from qconv.kernels import nf4_dequantize as nd
    from qconv.kernels import nf4_matmul as nm

    chosen = {}
    deq = [r for r in rows if r["section"] == "sweep dequantize" and r.get("ms_graph")]
    if deq:
        p = min(deq, key=lambda r: r["ms_graph"])["params"]
        nd.DEFAULT_BYTES_PER_PROGRAM, nd.DEFAULT_NUM_WARPS, nd.DEFAULT_PAIR_TABLE = \
            p["bytes_per_program"], p["num_warps"], p["pair"]
        chosen["dequantize"] = p
    gemv = [r for r in rows if r["section"] == "sweep gemv" and r.get("ms_graph")]
    if gemv:
        p = min(gemv, key=lambda r: r["ms_graph"])["params"]
        nm.GEMV_BLOCK_N, nm.GEMV_STEP_BYTES, nm.GEMV_NUM_WARPS, nm.GEMV_PAIR_TABLE, nm.GEMV_EVEN_ODD = \
            p["block_n"], p["step_bytes"], p["num_warps"], p["pair"], p["even_odd"]
        chosen["gemv"] = p
    few = [r for r in rows if r["section"] == "sweep rows" and r.get("ms_graph")]
    if few:
        best_rpp, max_rows = {}, 1
        for m in sorted({r["params"]["m"] for r in few}):
            at_m = [r for r in few if r["params"]["m"] == m]
            base = [r["ms_graph"] for r in at_m if r["params"]["rows"] == 0]
            kern = [r for r in at_m if r["params"]["rows"] > 0]
            if base and kern:
                best = min(kern, key=lambda r: r["ms_graph"])
                if best["ms_graph"] < base[0]:
                    max_rows = m
                    best_rpp[m] = best["params"]["rows"]
        nm.GEMV_MAX_ROWS = max_rows
        if best_rpp:
            nm.GEMV_ROWS_PER_PROGRAM = max(best_rpp.values())
        chosen["rows"] = dict(max_rows=nm.GEMV_MAX_ROWS, rows_per_program=nm.GEMV_ROWS_PER_PROGRAM, per_m=best_rpp)
    log(f"[bench_nf4] chosen defaults: {json.dumps(chosen)}")
    return chosen
