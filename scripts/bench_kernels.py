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
4096 x 128256; bf16. ``--sweep`` also times our launch parameters (TUNING dicts); the NF4 kernels come
from ``scripts/bench_kernels_nf4.py`` when it is there.
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


def measure(step: Callable[[], None], params: list[torch.Tensor]) -> tuple[float, float]:
    """(median ms, extra MiB of one step)."""
    from triton.testing import do_bench

    for p in params:
        p.grad = None
    step()  # compile / autotune outside the memory measurement
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / MiB
    for p in params:
        p.grad = None
    ms = do_bench(step, warmup=25, rep=200, grad_to_none=params or None, return_mode="median")
    return float(ms), extra


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes // 2, dtype=DT, device="cuda").normal_()
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

    x = torch.randn(n_rows, n_cols, dtype=DT, device="cuda")
    w = torch.nn.Parameter(torch.rand(n_cols, dtype=DT, device="cuda") + 0.5)

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

    q = torch.randn(bsz, seq, n_q, head_dim, dtype=DT, device="cuda")  # projection outputs, [b, s, h, d]
    k = torch.randn(bsz, seq, n_kv, head_dim, dtype=DT, device="cuda")
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    freqs = torch.arange(seq, device="cuda").float()[:, None] * inv
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

    g = torch.randn(n_rows, n_cols, dtype=DT, device="cuda")
    u = torch.randn(n_rows, n_cols, dtype=DT, device="cuda")
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

    logits = torch.randn(n_rows, vocab, dtype=DT, device="cuda")
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")

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


def bench_cases(copy_gbps: float) -> list[dict]:
    rows = []
    for name, make in CASES.items():
        nbytes, params, bufs, impls = make()
        results = {}
        for impl, fn in impls.items():
            try:
                results[impl] = measure(make_step(fn, bufs), params)
            except Exception as exc:
                log(f"  {name} / {impl}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        liger_ms = results.get("liger", (None,))[0]
        for impl, (ms, extra) in results.items():
            r = row("fwd+bwd", name, impl, ms, extra, nbytes, copy_gbps,
                    vs_liger=round(liger_ms / ms, 2) if liger_ms else None)
            log(f"  {r}")
            rows.append(r)
        del bufs, impls
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# Launch-parameter sweep (ours only), one parameter at a time around the defaults
# ------------------------------------------------------------------------------------------------
SWEEPS = {  # case -> (module, [TUNING overrides]); {} is the default
    "rms_norm 4096x4096": ("qconv.kernels.rms_norm", [
        {}, {"fwd_warps": 4}, {"fwd_warps": 16}, {"fwd_tile": 8192}, {"fwd_tile": 16384, "fwd_warps": 16},
        {"bwd_programs_per_sm": 1}, {"bwd_programs_per_sm": 4}, {"bwd_programs_per_sm": 4, "bwd_warps": 4},
        {"bwd_programs_per_sm": 8, "bwd_warps": 4}, {"bwd_warps": 4}, {"bwd_warps": 16}, {"bwd_tile": 8192},
        {"bwd_tile": 8192, "bwd_warps": 16}]),
    "rope 32q+8kv x 4096 x 128": ("qconv.kernels.rope", [
        {}, {"block_s": 8}, {"block_s": 32}, {"block_s": 64, "block_h": 2}, {"block_h": 4}, {"block_h": 4, "num_warps": 4},
        {"block_h": 2, "num_warps": 4}, {"block_h": 1, "block_s": 64, "num_warps": 4}, {"num_warps": 4}, {"num_warps": 16}]),
    "swiglu 4096x14336": ("qconv.kernels.swiglu", [
        {}, {"block": 1024, "num_warps": 4}, {"block": 2048, "num_warps": 4}, {"block": 2048}, {"block": 8192},
        {"block": 8192, "num_warps": 16}, {"block": 16384, "num_warps": 16}, {"num_warps": 4}, {"num_warps": 16}]),
    "cross_entropy 4096x128256": ("qconv.kernels.cross_entropy", [
        {}, {"fwd_chunk": 4096, "fwd_warps": 4}, {"fwd_chunk": 4096}, {"fwd_chunk": 16384, "fwd_warps": 16},
        {"fwd_chunk": 16384}, {"fwd_chunk": 32768, "fwd_warps": 32}, {"fwd_warps": 16}, {"fwd_warps": 4},
        {"bwd_block": 4096, "bwd_warps": 4}, {"bwd_block": 2048, "bwd_warps": 4}, {"bwd_block": 16384, "bwd_warps": 16},
        {"bwd_block": 4096}, {"bwd_warps": 16}, {"bwd_warps": 4}]),
    "cross_entropy 4096x128256 grad_in_fwd": ("qconv.kernels.cross_entropy", [
        {}, {"fwd_chunk": 16384, "fwd_warps": 16}, {"fwd_chunk": 32768, "fwd_warps": 32}, {"fwd_chunk": 16384, "fwd_warps": 32},
        {"fwd_chunk": 4096, "fwd_warps": 4}, {"fwd_chunk": 32768, "fwd_warps": 16}]),
}


def sweep(copy_gbps: float, deadline: float) -> list[dict]:
    rows = []
    for name, (module, overrides) in SWEEPS.items():
        tuning = importlib.import_module(module).TUNING
        default = dict(tuning)
        nbytes, params, bufs, impls = CASES[name.replace(" grad_in_fwd", "")]()
        step = make_step(impls["qconv grad_in_fwd" if name.endswith("grad_in_fwd") else "qconv"], bufs)
        for override in overrides:
            if time.time() > deadline:
                log("sweep: out of time")
                return rows
            tuning.clear()
            tuning.update(default, **override)
            label = ",".join(f"{k}={v}" for k, v in override.items()) or "default"
            try:
                ms, extra = measure(step, params)
            except Exception as exc:
                log(f"  sweep {name} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            r = row("sweep", name, label, ms, extra, nbytes, copy_gbps)
            log(f"  {r}")
            rows.append(r)
        tuning.clear()
        tuning.update(default)
        del bufs, impls, step
        torch.cuda.empty_cache()
    return rows


def bench_nf4_rows(copy_gbps: float) -> list[dict]:
    path = Path(__file__).with_name("bench_kernels_nf4.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_kernels_nf4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bench_nf4("cuda", copy_gbps=copy_gbps, log=log)


def format_table(rows: list[dict]) -> str:
    cols = ["section", "case", "impl", "ms", "extra_mib", "gbps", "frac_copy", "vs_liger", "speedup_vs_bnb"]
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
        rows += sweep(copy_gbps, time.time() + args.sweep_seconds)
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
