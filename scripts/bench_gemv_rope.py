"""Focused GPU benchmark of the NF4 GEMV (vs bitsandbytes) and RoPE (vs Liger), with launch-parameter sweeps.

    python scripts/bench_gemv_rope.py [--seconds 240] [--json OUT.json]

Its GEMV sweep covers the ``tile`` kernel, which since the ``rows`` kernel runs only M = 2-4 (``matmul_nf4``
with one row takes ``kernels/nf4_gemv.py``, benchmarked and swept by ``scripts/bench_gemv.py``).
Every swept config is checked against the reference before it is timed; the fastest checked config
(GPU time, CUDA graph) becomes the module default for the final tables. GEMV rows: ``ms`` = do_bench
median of the eager call (L2 flushed), ``ms_graph`` = CUDA-graph replay, ``host_us`` = host time per
back-to-back call (helpers of ``bench_kernels_nf4.py``). RoPE rows: forward + backward as in
``bench_kernels.py`` (wall = do_bench, fastest of 3 interleaved rounds; GPU = 10 steps in a CUDA graph).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gemv import _load, log  # noqa: E402  (the sibling script's loader and logger)


#: GEMV (tile kernel) configs: (block_n, step_bytes, num_warps)
GEMV_CONFIGS = [(4, 1024, 4), (8, 512, 4), (2, 2048, 4)]
ROPE_CONFIGS = [{"block_s": 1, "block_h": 16, "num_warps": 4}, {"block_s": 1, "block_h": 32, "num_warps": 4},
                {"block_s": 1, "block_h": 32, "num_warps": 8}, {"block_s": 2, "block_h": 32, "num_warps": 8},
                {"block_s": 4, "block_h": 8, "num_warps": 4}, {"block_s": 4, "block_h": 16, "num_warps": 8},
                {"block_s": 8, "block_h": 8, "num_warps": 8}, {"block_s": 2, "block_h": 8, "num_warps": 4},
                {"block_s": 2, "block_h": 16, "num_warps": 4}, {"block_s": 8, "block_h": 4, "num_warps": 4},
                {"block_s": 16, "block_h": 4, "num_warps": 8}, {"block_s": 4, "block_h": 32, "num_warps": 16}]


def sweep_gemv(nf4, deadline: float) -> list[dict]:
    from qconv.kernels import nf4_dequantize as nd
    from qconv.kernels import nf4_matmul as nm

    rows = []
    n, k = 14336, 4096
    packed, qs = nf4._quantized(n, k, "cuda")
    f = nd._state_fields(qs)
    data = nd._packed_bytes(packed, f["numel"])
    w_ref = nd.dequantize_nf4_reference(packed, qs, torch.float32).double()
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ w_ref.t()).float()
        for kind, cfg in [("tile", c) for c in GEMV_CONFIGS]:
            if time.time() > deadline:
                log("gemv sweep: out of time")
                return rows
            bn, step, warps = cfg
            params = dict(block_n=bn, step_bytes=step, num_warps=warps)
            run = lambda: nm._gemv(x, data, qs, f, None, **params)  # noqa: E731
            label = f"M={m} {kind} " + " ".join(f"{a}={b}" for a, b in params.items())
            err = nf4._safe(log, label, lambda: nf4._rel_err(run(), ref))
            t = nf4._safe(log, label, lambda: {"ms_graph": nf4._graph_bench(run)}) if err is not None and err < 1e-2 else None
            if t:
                rows.append(dict(section="sweep gemv", case=f"M={m}", impl=f"{kind} {label[len(f'M={m} {kind} '):]}",
                                 ms_graph=round(t["ms_graph"], 5), check=f"rel_err={err:.1e}", kind=kind, m=m, params=params))
                log(f"  {label}: {t['ms_graph']:.5f} ms (rel_err {err:.1e})")
            elif err is not None:
                log(f"  {label}: WRONG rel_err {err:.2e}")
    return rows


def apply_gemv(rows: list[dict]) -> dict:
    from qconv.kernels import nf4_matmul as nm

    one = [r for r in rows if r["m"] == 1]
    if not one:
        return {}
    best = min(one, key=lambda r: r["ms_graph"])
    p = best["params"]
    nm.GEMV_BLOCK_N, nm.GEMV_STEP_BYTES, nm.GEMV_NUM_WARPS = p["block_n"], p["step_bytes"], p["num_warps"]
    return {"kernel": best["kind"], **p, "ms_graph": best["ms_graph"]}


def bench_gemv(nf4, copy_gbps: float) -> list[dict]:
    import bitsandbytes as bnb

    from qconv.kernels import matmul_nf4

    dequant_ref = _load("bench_kernels_nf4_sweep")._dequant_ref
    rows = []
    for case, (n, k) in nf4.LLAMA_SHAPES.items():
        packed, qs = nf4._quantized(n, k, "cuda")
        nbytes = packed.numel() + qs.absmax.numel() + 2 * (n + k)
        for m in ((1, 2, 4) if n == 14336 else (1,)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ dequant_ref(packed, qs).t()
            for impl, fn in [("qconv", lambda: matmul_nf4(x, packed, qs)),
                             ("bitsandbytes", lambda: bnb.matmul_4bit(x, packed.t(), qs))]:
                err = nf4._safe(log, f"gemv {case} {impl}", lambda: nf4._rel_err(fn(), ref))
                t = nf4._safe(log, f"gemv {case} {impl}", lambda: nf4.measure(fn))
                if t:
                    r = nf4._row(f"gemv M={m}", case, impl, t, nbytes if m == 1 else None, copy_gbps,
                                 check=f"rel_err={err:.1e}" if err is not None else None)
                    rows.append(r)
                    log(f"  {r}")
    return nf4._with_ratios(rows)


def _rope_check(rope_mod) -> float:
    """Max relative error of forward and backward rotation (bf16, bench shape) against the reference."""
    b, s, hq, hk, d = 1, 4096, 32, 8, 128
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.arange(s, device="cuda").float()[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    errs = []
    for backward in (False, True):
        qo, ko = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        rope_mod._rotate(q, k, qo, ko, cos, sin, backward=backward)
        rq, rk = rope_mod.apply_rope_reference(q.float(), k.float(), cos.float(), (-sin if backward else sin).float())
        errs += [float((qo.float() - rq).norm() / rq.norm()), float((ko.float() - rk).norm() / rk.norm())]
    return max(errs) if all(e == e for e in errs) else float("nan")


def sweep_rope(kb, deadline: float) -> list[dict]:
    from qconv.kernels import rope as rope_mod

    rows = []
    nbytes, params, bufs, impls = kb.case_rope()
    step = kb.make_step(impls["qconv"], bufs)
    default = dict(rope_mod.TUNING)
    try:
        for cfg in ROPE_CONFIGS:
            if time.time() > deadline:
                log("rope sweep: out of time")
                break
            rope_mod.TUNING.update(cfg)
            label = " ".join(f"{a}={b}" for a, b in cfg.items())
            err = kb_safe(lambda: _rope_check(rope_mod), label)
            if err is None or not err < 1e-2:
                log(f"  rope {label}: WRONG or failed (rel_err {err})")
                continue
            g = kb_safe(lambda: kb.gpu_ms(step, params), label)
            if g:
                rows.append(dict(section="sweep rope", case="32q+8kv x 4096 x 128", impl=label, gpu_ms=round(g, 4),
                                 check=f"rel_err={err:.1e}", params=dict(cfg)))
                log(f"  rope {label}: {g:.4f} ms GPU (rel_err {err:.1e})")
    finally:
        rope_mod.TUNING.clear()
        rope_mod.TUNING.update(default)
    if rows:
        rope_mod.TUNING.update(min(rows, key=lambda r: r["gpu_ms"])["params"])
    return rows


def kb_safe(fn, label):
    try:
        return fn()
    except Exception as exc:
        log(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        return None


def bench_rope(kb, copy_gbps: float) -> list[dict]:
    nbytes, params, bufs, impls = kb.case_rope()
    steps = {impl: kb.make_step(fn, bufs) for impl, fn in impls.items()}
    extra = {impl: kb.extra_memory(step, params) for impl, step in steps.items()}
    wall: dict[str, float] = {}
    for _ in range(3):
        for impl, step in steps.items():
            wall[impl] = min(wall.get(impl, float("inf")), kb.wall_ms(step, params))
    gpu = {impl: kb.try_gpu_ms("rope", impl, step, params) for impl, step in steps.items()}
    rows = []
    for impl in steps:
        g, lg, lw = gpu[impl], gpu.get("liger"), wall.get("liger")
        rows.append(dict(section="rope fwd+bwd", case="32q+8kv x 4096 x 128", impl=impl, ms=round(wall[impl], 4),
                         vs_liger=round(lw / wall[impl], 2) if lw else None, gpu_ms=round(g, 4) if g else None,
                         gpu_vs_liger=round(lg / g, 3) if (g and lg) else None,
                         gpu_frac_copy=round(nbytes / g / 1e6 / copy_gbps, 3) if g else None, extra_mib=round(extra[impl], 1)))
        log(f"  {rows[-1]}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="time budget of the sweeps")
    ap.add_argument("--json", help="write rows, chosen defaults and the environment here")
    args = ap.parse_args(argv)
    start = time.time()
    nf4, kb = _load("bench_kernels_nf4"), _load("bench_kernels")
    env = {**nf4.environment(), **kb.environment()}
    log(json.dumps(env))
    copy_gbps = nf4.copy_bandwidth("cuda")
    out: dict = {"environment": env, "copy_gbps": copy_gbps, "rows": [], "chosen": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    gemv_sweep = sweep_gemv(nf4, start + 0.45 * args.seconds)
    out["chosen"]["gemv"] = apply_gemv(gemv_sweep)
    log(f"chosen gemv: {out['chosen']['gemv']}")
    out["rows"] += gemv_sweep
    save()
    gemv = bench_gemv(nf4, copy_gbps)
    out["rows"] += gemv
    save()
    rope_sweep = sweep_rope(kb, start + 0.85 * args.seconds)
    from qconv.kernels import rope as rope_mod

    out["chosen"]["rope"] = dict(rope_mod.TUNING)
    out["rows"] += rope_sweep
    save()
    rope = bench_rope(kb, copy_gbps)
    out["rows"] += rope
    save()
    print(json.dumps(env))
    print(f"copy {copy_gbps:.0f} GB/s; chosen: {json.dumps(out['chosen'], default=str)}")
    print(nf4.format_table(gemv_sweep + rope_sweep, ["section", "case", "impl", "ms_graph", "gpu_ms", "check"]))
    print(nf4.format_table(gemv, ["section", "case", "impl", "ms", "ms_graph", "host_us", "gbps", "frac_copy_graph",
                       "speedup_vs_bnb", "speedup_vs_bnb_graph", "check"]))
    print(nf4.format_table(rope, ["impl", "ms", "vs_liger", "gpu_ms", "gpu_vs_liger", "gpu_frac_copy", "extra_mib"]))


if __name__ == "__main__":
    main()
