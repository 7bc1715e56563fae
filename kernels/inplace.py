"""When may a kernel write its result into an existing buffer? Rules shared by rms_norm, rope, swiglu and
cross_entropy (the "in place where safe" policy).

Two kinds of buffer are reused:

* an *intermediate activation* saved for backward (gate/up of swiglu, the logits of cross_entropy) or
  rotated in the forward (q/k of apply_rope): allowed when the tensor was produced by an autograd op
  (not a leaf, not a view of a leaf), so no parameter or user input is overwritten. After writing we bump
  its version counter: any other autograd node that saved the same storage then raises PyTorch's usual
  "modified by an inplace operation" error instead of computing a wrong gradient silently.
* the *gradient handed to backward* (dy of rms_norm, dq/dk of apply_rope): allowed only when nobody else
  holds it. Autograd hands the same gradient tensor to several consumers after an addition
  (``residual + norm(x)``), and the caller may hold the tensor given to ``backward``; both are detected
  from reference counts (C++ uses of the tensor and its storage, Python references). The expected counts
  of an exclusive gradient are measured once by a tiny CPU probe that also checks that the shared cases
  are told apart; where they are not (another torch/Python), reuse is switched off.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

log = logging.getLogger(__name__)


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers its memory exactly once (a permutation of a contiguous layout)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def is_graph_intermediate(t: torch.Tensor) -> bool:
    """True when ``t`` is an autograd intermediate (made by an op, neither a leaf nor a view of a leaf)."""
    if not t.requires_grad or t.grad_fn is None:
        return False
    base = t._base
    return base is None or base.grad_fn is not None


def bump_version(*tensors: torch.Tensor) -> None:
    """Tell autograd that these tensors were modified in place (saved copies elsewhere then fail loudly)."""
    torch.autograd.graph.increment_version(list(tensors))


def _signature(g: torch.Tensor):
    """Reference counts of a gradient tensor as seen two calls below a backward's top frame."""
    base = g._base
    storage_uses = torch._C._storage_Use_Count(g.untyped_storage()._cdata)
    if base is None:
        return ("plain", g._use_count(), sys.getrefcount(g), storage_uses)
    if base._base is not None:
        return None
    return ("view", g._use_count(), sys.getrefcount(g), storage_uses, base._use_count(), sys.getrefcount(base))


class _Calibration:
    lock = threading.Lock()
    exclusive: frozenset | None = None  # signatures of exclusive gradients; empty: reuse switched off
    recording: list | None = None


def grad_is_exclusive(g: torch.Tensor) -> bool:
    """True when the gradient ``g`` passed to a backward is referenced by nobody else.

    Call it as the first statement of ``backward`` with the argument itself (``grad_is_exclusive(dy)``):
    Python reference counts are compared with those of the calibration probe, which calls it the same way.
    """
    sig = _signature(g)
    if _Calibration.recording is not None:
        _Calibration.recording.append(sig)
        return False
    if _Calibration.exclusive is None:
        calibrate()
    return sig is not None and sig in _Calibration.exclusive and is_dense(g)


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        grad_is_exclusive(g)
        return g * 2.0


def _probe_cases():
    """(is_exclusive, run) pairs: graphs whose probe backward sees an exclusive or a shared gradient."""
    w = torch.randn(8, 5)

    def linear_2d():
        x = torch.randn(6, 8, requires_grad=True)
        (_Probe.apply(x) @ w).square().sum().backward()

    def linear_3d():
        x = torch.randn(2, 3, 8, requires_grad=True)
        torch.nn.functional.linear(_Probe.apply(x), w.t()).square().sum().backward()

    def two_consumers():
        x = torch.randn(6, 8, requires_grad=True)
        y = _Probe.apply(x)
        ((y @ w).square().sum() + (y @ w).sum()).backward()

    def residual():
        x = torch.randn(6, 8, requires_grad=True)
        r = torch.randn(6, 8, requires_grad=True)
        ((r * 1.0 + _Probe.apply(x)) @ w).square().sum().backward()

    def residual_3d():
        x = torch.randn(2, 3, 8, requires_grad=True)
        r = torch.randn(2, 3, 8, requires_grad=True)
        torch.nn.functional.linear(r * 1.0 + _Probe.apply(x), w.t()).square().sum().backward()

    def caller_holds_grad():
        x = torch.randn(6, 8, requires_grad=True)
        g = torch.randn(6, 8)
        _Probe.apply(x).backward(g)

    def hook_keeps_grad():
        x = torch.randn(6, 8, requires_grad=True)
        kept = []
        y = _Probe.apply(x)
        y.register_hook(kept.append)
        (y @ w).square().sum().backward()

    return [
        (True, linear_2d), (True, linear_3d), (True, two_consumers),
        (False, residual), (False, residual_3d), (False, caller_holds_grad),
        (False, hook_keeps_grad),
    ]


def ensure_calibrated() -> None:
    """Run the probe now (call from a forward, so that it never runs inside a backward or a graph capture)."""
    if _Calibration.exclusive is None:
        calibrate()


def calibrate() -> frozenset:
    """Measure the reference counts of exclusive gradients once (CPU, ~1 ms); switch reuse off if unsure."""
    with _Calibration.lock:
        if _Calibration.exclusive is not None:
            return _Calibration.exclusive
        good: set = set()
        bad: set = set()
        try:
            # Identity saved-tensor hooks shadow any outer ones: under non-reentrant activation checkpointing
            # the outer hooks would recompute the checkpointed forward from inside this probe's backward,
            # which re-enters calibrate() and deadlocks on the lock.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                for exclusive, run in _probe_cases():
                    _Calibration.recording = []
                    run()
                    (good if exclusive else bad).update(_Calibration.recording)
        except Exception as exc:  # a torch without these internals: never reuse gradients
            log.debug("gradient reuse probe failed (%s): reuse switched off", exc)
            good, bad = set(), set()
        finally:
            _Calibration.recording = None
        good.discard(None)
        if good & bad:
            log.debug("gradient reuse probe cannot tell exclusive from shared gradients: reuse switched off")
            good = set()
        _Calibration.exclusive = frozenset(good)
        return _Calibration.exclusive
