"""qconv Triton kernels: one file per op (kernels, a PyTorch reference, an autograd Function).

Public functions are exported lazily: ``import qconv.kernels`` does not import triton; the first
attribute access (``qconv.kernels.rms_norm``) imports the submodule that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule of qconv.kernels that defines it
_EXPORTS = {
    "dequantize_nf4": "nf4_dequantize",
    "matmul_nf4": "nf4_matmul",
    "rms_norm": "rms_norm",
    "apply_rope": "rope",
    "swiglu": "swiglu",
    "geglu": "swiglu",
    "cross_entropy": "cross_entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
