"""Helpers shared by the kernel tests: tolerances, relative error, NaN-poisoned allocations."""

from __future__ import annotations

import pytest
import torch

from qconv.kernels.utils import is_interpreter

needs_interpreter = pytest.mark.skipif(not is_interpreter(), reason="CPU kernels need TRITON_INTERPRET=1")
#: Relative Frobenius error allowed vs float64, by input dtype (one rounding of the output).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def poison_fixture(int_fill: int | None = None):
    """A ``poison`` fixture: torch.empty/empty_like return NaN-filled floats (and ``int_fill``-filled
    integer tensors unless None) while a test runs, so any element a kernel fails to write shows up."""

    @pytest.fixture
    def poison(monkeypatch):
        real_empty, real_like = torch.empty, torch.empty_like

        def fill(t):
            if t.is_floating_point():
                return t.fill_(float("nan"))
            return t if int_fill is None else t.fill_(int_fill)

        monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
        monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))

    return poison
