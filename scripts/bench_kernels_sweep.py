"""Launch-parameter sweep of our kernels (the TUNING dicts), used by ``bench_kernels.py --sweep``.

Each case is timed with each set of overrides around the defaults ({} is the default); the GPU-only time
(CUDA graph, L2 flushed) is the number to compare, as small cases are host-bound on the wall clock.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

SWEEPS = {  # case -> (module, [TUNING overrides])
    "rms_norm 4096x4096": ("qconv.kernels.rms_norm", [
        {}, {"fwd_warps": 4}, {"fwd_warps": 16}, {"fwd_tile": 8192}, {"fwd_tile": 16384, "fwd_warps": 16},
        {"bwd_programs_per_sm": 2}, {"bwd_programs_per_sm": 2, "bwd_warps": 8}, {"bwd_programs_per_sm": 4, "bwd_warps": 8},
        {"bwd_warps": 8}, {"bwd_tile": 4096}, {"bwd_tile": 8192}]),
    "rope 32q+8kv x 4096 x 128": ("qconv.kernels.rope", [
        {}, {"block_s": 2}, {"block_h": 32}, {"block_s": 2, "block_h": 8}, {"num_warps": 8}, {"block_s": 8, "block_h": 4}]),
    "swiglu 4096x14336": ("qconv.kernels.swiglu", [
        {}, {"num_warps": 8}, {"block": 2048, "num_warps": 8}, {"block": 2048, "num_warps": 4}, {"block": 8192},
        {"block": 8192, "num_warps": 32}, {"block": 1024, "num_warps": 4}]),
    "cross_entropy 4096x128256": ("qconv.kernels.cross_entropy", [
        {}, {"fwd_chunk": 4096, "fwd_warps": 4}, {"fwd_chunk": 16384, "fwd_warps": 16}, {"fwd_chunk": 16384},
        {"fwd_warps": 16}, {"bwd_block": 8192}, {"bwd_block": 8192, "bwd_warps": 16}, {"bwd_block": 2048, "bwd_warps": 4},
        {"bwd_warps": 4}]),
    "cross_entropy 4096x128256 grad_in_fwd": ("qconv.kernels.cross_entropy", [
        {}, {"gif_chunk": 16384, "gif_warps": 16}, {"gif_chunk": 16384, "gif_warps": 32}, {"gif_chunk": 32768, "gif_warps": 16}]),
}


def sweep(cases: dict, make_step: Callable, measure: Callable, log: Callable, deadline: float) -> list[dict]:
    """``measure(case, label, step, params, nbytes) -> row``; stops at ``deadline`` (time.time())."""
    rows = []
    for name, (module, overrides) in SWEEPS.items():
        tuning = importlib.import_module(module).TUNING
        default = dict(tuning)
        nbytes, params, bufs, impls = cases[name.replace(" grad_in_fwd", "")]()
        step = make_step(impls["qconv grad_in_fwd" if name.endswith("grad_in_fwd") else "qconv"], bufs)
        try:
            for override in overrides:
                if time.time() > deadline:
                    log("sweep: out of time")
                    return rows
                tuning.clear()
                tuning.update(default, **override)
                label = ",".join(f"{k}={v}" for k, v in override.items()) or "default"
                try:
                    rows.append(measure(name, label, step, params, nbytes))
                    log(f"  {rows[-1]}")
                except Exception as exc:
                    log(f"  sweep {name} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            tuning.clear()
            tuning.update(default)
    return rows
