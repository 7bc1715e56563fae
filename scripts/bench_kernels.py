"""Benchmark qconv's Triton kernels side by side with Liger-Kernel and plain PyTorch on one GPU.

    python scripts/bench_kernels.py [--sweep] [--no-nf4] [--json OUT.json]

Each case times forward + backward together (autograd overhead included) with
``triton.testing.do_bench`` (median) and measures the extra memory of one step (peak allocated minus
allocated before). Inputs are made the way a model makes them: activations come out of a graph node whose
backward drops its gradient (a projection's backward would consume it), and gradients arrive fresh from a
node downstream, so each implementation may reuse storage exactly as it would in training.
Bytes counted (each tensor read or written once per pass): RMSNorm x, y, dy, x, dx; RoPE q+k four times;
SwiGLU gate, up, out, dout, gate, up, dgate, dup; cross-entropy logits read in the forward, read and
written in the backward. ``frac_copy`` = GB/s over a device-to-device copy measured in the same run.
Cases: RMSNorm 4096x4096, RoPE 32 q + 8 kv heads x 4096 x 128, SwiGLU/GeGLU 4096x14336, cross-entropy
4096 x 128256; bf16. ``gpu_ms``: the same step's GPU time alone (CUDA graph replay, L2 flushed; small
cases are host-bound on the wall clock). ``--sweep`` also times our launch parameters
(``bench_kernels_sweep.py``); the NF4 kernels come from ``scripts/bench_kernels_nf4.py`` when it is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

DT = torch.bfloat16
DEVICE = "cuda"
MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------
class _Source(torch.autograd.Function):
    """Hands out buffers as outputs of a graph node; its backward drops the gradients."""

    @staticmethod
    def forward(ctx, anchor, *bufs):
        ctx.n = len(bufs)
        return tuple(b.detach() for b in bufs)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (ctx.n + 1)


class _Sink(torch.autograd.Function):
    """Ends the graph with a scalar; its backward hands fresh (uninitialized) gradients to the outputs."""

    @staticmethod
    def forward(ctx, *ys):
        ctx.specs = [(y.shape, y.stride(), y.dtype, y.device) for y in ys]
        return ys[0].new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return tuple(torch.empty_strided(s, st, dtype=d, device=dev) for s, st, d, dev in ctx.specs)


def make_step(fn: Callable, bufs: list[torch.Tensor]) -> Callable[[], None]:
    anchor = torch.zeros((), device=bufs[0].device, requires_grad=True)

    def step():
        outs = fn(*_Source.apply(anchor, *bufs))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        loss = outs[0] if outs[0].dim() == 0 else _Sink.apply(*outs)
        loss.backward()

    return step


def _reset(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def extra_memory(step: Callable[[], None], params: list[torch.Tensor]) -> float:
    """MiB allocated on top of what was there, at the peak of one step (after a warm-up step)."""
    _reset(params)
    step()  # compile / first-use work outside the measurement
    _reset(params)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    _reset(params)
    return (torch.cuda.max_memory_allocated() - base) / MiB


def wall_ms(step: Callable[[], None], params: list[torch.Tensor]) -> float:
    """do_bench median (L2 flushed between steps): what a step costs, Python and autograd included."""
    from triton.testing import do_bench

    return float(do_bench(step, warmup=25, rep=100, grad_to_none=params or None, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def _graph_ms(fn: Callable[[], None], params: list[torch.Tensor], n: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _reset(params)
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            _reset(params)
            fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del g
    _reset(params)
    return sorted(times)[len(times) // 2]


def gpu_ms(step: Callable[[], None], params: list[torch.Tensor], n: int = 10) -> float:
    """GPU time of a step: n steps (each after an L2 flush) replayed as one CUDA graph, minus the flushes."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * MiB, dtype=torch.int8, device=DEVICE))
    flush = _FLUSH[0]

    def flushed_step():
        flush.zero_()
        step()

    return _graph_ms(flushed_step, params, n) - _graph_ms(flush.zero_, [], n)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes // 2, dtype=DT, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / ms / 1e6


# ------------------------------------------------------------------------------------------------
# Cases: name -> (bytes moved, params, bufs, {impl: fn})
# ------------------------------------------------------------------------------------------------
def _liger(module: str, attr: str):
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), attr)
    except Exception as exc:  # pragma: no cover - depends on the machine
        log(f"liger_kernel.ops.{module}.{attr} unavailable: {type(exc).__name__}: {exc}")
        return None


def case_rms_norm(n_rows: int = 4096, n_cols: int = 4096):
    from qconv.kernels.rms_norm import rms_norm

    x = torch.randn(n_rows, n_cols, dtype=DT, device=DEVICE)
    w = torch.nn.Parameter(torch.rand(n_cols, dtype=DT, device=DEVICE) + 0.5)

    def eager(x):  # LlamaRMSNorm.forward
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    impls = {"qconv": lambda x: rms_norm(x, w, 1e-6), "eager": eager}
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    if liger is not None:
        impls["liger"] = lambda x: liger.apply(x, w, 1e-6, 0.0, "llama", True)
    return 5 * x.numel() * 2, [w], [x], impls


def case_rope(bsz: int = 1, n_q: int = 32, n_kv: int = 8, seq: int = 4096, head_dim: int = 128):
    from qconv.kernels.rope import apply_rope

    q = torch.randn(bsz, seq, n_q, head_dim, dtype=DT, device=DEVICE)  # projection outputs, [b, s, h, d]
    k = torch.randn(bsz, seq, n_kv, head_dim, dtype=DT, device=DEVICE)
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = torch.arange(seq, device=DEVICE).float()[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)

    def eager(q, k):  # apply_rotary_pos_emb
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)

        def rot(x):
            return torch.cat((-x[..., head_dim // 2:], x[..., : head_dim // 2]), dim=-1)

        return q * c + rot(q) * s, k * c + rot(k) * s

    def as_hf(fn):
        return lambda q, k: fn(q.transpose(1, 2), k.transpose(1, 2))

    impls = {"qconv": as_hf(lambda q, k: apply_rope(q, k, cos, sin)), "eager": as_hf(eager)}
    liger = _liger("rope", "LigerRopeFunction")
    if liger is not None:
        impls["liger"] = as_hf(lambda q, k: liger.apply(q, k, cos, sin))
    return 4 * (q.numel() + k.numel()) * 2, [], [q, k], impls


def case_glu(act: str, n_rows: int = 4096, n_cols: int = 14336):
    from qconv.kernels.swiglu import geglu, swiglu

    g = torch.randn(n_rows, n_cols, dtype=DT, device=DEVICE)
    u = torch.randn(n_rows, n_cols, dtype=DT, device=DEVICE)
    if act == "silu":
        impls = {"qconv": swiglu, "eager": lambda g, u: F.silu(g) * u}
        liger = _liger("swiglu", "LigerSiLUMulFunction")
    else:
        impls = {"qconv": lambda g, u: geglu(g, u, "tanh"), "eager": lambda g, u: F.gelu(g, approximate="tanh") * u}
        liger = _liger("geglu", "LigerGELUMulFunction")
    if liger is not None:
        impls["liger"] = liger.apply
    return 8 * g.numel() * 2, [], [g, u], impls


def case_cross_entropy(n_rows: int = 4096, vocab: int = 128256):
    from qconv.kernels.cross_entropy import cross_entropy

    logits = torch.randn(n_rows, vocab, dtype=DT, device=DEVICE)
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)

    def eager(x):  # transformers' ForCausalLMLoss: upcast, then F.cross_entropy
        return F.cross_entropy(x.float(), labels, ignore_index=-100)

    impls = {"qconv": lambda x: cross_entropy(x, labels),
             "qconv grad_in_fwd": lambda x: cross_entropy(x, labels, grad_in_forward=True), "eager": eager}
    liger = _liger("cross_entropy", "LigerCrossEntropyFunction")
    if liger is not None:
        impls["liger"] = lambda x: liger.apply(x, labels, None, -100)[0]
    return 3 * logits.numel() * 2, [], [logits], impls


CASES = {
    "rms_norm 4096x4096": case_rms_norm,
    "rope 32q+8kv x 4096 x 128": case_rope,
    "swiglu 4096x14336": lambda: case_glu("silu"),
    "geglu(tanh) 4096x14336": lambda: case_glu("gelu_tanh"),
    "cross_entropy 4096x128256": case_cross_entropy,
}


def row(section, case, impl, ms, extra, nbytes, copy_gbps, **more):
    gbps = nbytes / ms / 1e6 if ms else None
    r = dict(section=section, case=case, impl=impl, ms=round(ms, 4) if ms else None,
             extra_mib=round(extra, 1) if extra is not None else None,
             gbps=round(gbps, 1) if gbps else None, frac_copy=round(gbps / copy_gbps, 3) if gbps else None)
    r.update(more)
    return r


#: implementations that synchronize with the host (Liger's cross-entropy reads n_tokens with .item()):
#: they cannot be captured in a CUDA graph, so they get no GPU-only time
NO_GRAPH = {("cross_entropy 4096x128256", "liger")}
_GRAPHS_OK = [True]


def try_gpu_ms(case: str, impl: str, step, params) -> float | None:
    if (case, impl) in NO_GRAPH or not _GRAPHS_OK[0]:
        return None
    try:
        return gpu_ms(step, params)
    except Exception as exc:  # a failed capture can leave CUDA unusable: try no more graphs
        _GRAPHS_OK[0] = False
        log(f"  {case} / {impl}: CUDA graph timing FAILED ({type(exc).__name__}: {str(exc)[:200]}); graphs off")
        return None


def bench_cases(copy_gbps: float, rounds: int = 3) -> list[dict]:
    """Every implementation of a case: memory, then ``rounds`` interleaved do_bench runs (the fastest
    median is kept: the host is shared), then the GPU-only time from a CUDA graph."""
    rows = []
    for name, make in CASES.items():
        nbytes, params, bufs, impls = make()
        steps, extra, wall = {}, {}, {}
        for impl, fn in impls.items():
            try:
                step = make_step(fn, bufs)
                extra[impl] = extra_memory(step, params)
                steps[impl] = step
            except Exception as exc:
                log(f"  {name} / {impl}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        for _ in range(rounds):
            for impl, step in steps.items():
                wall[impl] = min(wall.get(impl, float("inf")), wall_ms(step, params))
        gpu = {impl: try_gpu_ms(name, impl, step, params) for impl, step in steps.items()}
        ref_wall, ref_gpu = wall.get("liger"), gpu.get("liger")
        for impl in steps:
            g = gpu[impl]
            r = row("fwd+bwd", name, impl, wall[impl], extra[impl], nbytes, copy_gbps,
                    vs_liger=round(ref_wall / wall[impl], 2) if ref_wall else None,
                    gpu_ms=round(g, 4) if g else None,
                    gpu_frac_copy=round(nbytes / g / 1e6 / copy_gbps, 3) if g else None,
                    gpu_vs_liger=round(ref_gpu / g, 2) if (g and ref_gpu) else None)
            log(f"  {r}")
            rows.append(r)
        del bufs, impls, steps
        torch.cuda.empty_cache()
    return rows


def sweep_rows(copy_gbps: float, deadline: float) -> list[dict]:
    spec = importlib.util.spec_from_file_location("bench_kernels_sweep", Path(__file__).with_name("bench_kernels_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def measure(case, label, step, params, nbytes):
        extra = extra_memory(step, params)
        g = try_gpu_ms(case, "qconv", step, params)
        return row("sweep", case, label, wall_ms(step, params), extra, nbytes, copy_gbps, gpu_ms=round(g, 4) if g else None,
                   gpu_frac_copy=round(nbytes / g / 1e6 / copy_gbps, 3) if g else None)

    return module.sweep(CASES, make_step, measure, log, deadline)


def bench_nf4_rows(copy_gbps: float) -> list[dict]:
    path = Path(__file__).with_name("bench_kernels_nf4.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_kernels_nf4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bench_nf4("cuda", copy_gbps=copy_gbps, log=log)


def format_table(rows: list[dict]) -> str:
    cols = ["section", "case", "impl", "ms", "extra_mib", "gbps", "frac_copy", "vs_liger", "gpu_ms", "gpu_frac_copy",
            "gpu_vs_liger", "speedup_vs_bnb"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    text = [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(v.ljust(w) for v, w in zip(t, widths)) for t in text])


def environment() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name()}
    for pkg in ("liger_kernel", "transformers"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            pass
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep our kernels' launch parameters")
    ap.add_argument("--sweep-seconds", type=float, default=90.0, help="time limit of the sweep")
    ap.add_argument("--no-nf4", action="store_true", help="skip the NF4 kernels (scripts/bench_kernels_nf4.py)")
    ap.add_argument("--json", help="write the rows and the environment to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA device")
    env = environment()
    log(json.dumps(env))
    copy_gbps = copy_bandwidth()
    rows = [row("copy", "device-to-device 1 GiB", "torch copy_", 2 * (1 << 30) / copy_gbps / 1e6, None, 2 << 30, copy_gbps)]

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))

    rows += bench_cases(copy_gbps)
    save()
    if args.sweep:
        rows += sweep_rows(copy_gbps, time.time() + args.sweep_seconds)
        save()
    if not args.no_nf4:
        try:
            rows += bench_nf4_rows(copy_gbps)
        except Exception as exc:
            log(f"NF4 benchmark failed: {type(exc).__name__}: {exc}")
        save()
    print(json.dumps(env))
    print(format_table(rows))


if __name__ == "__main__":
    main()
