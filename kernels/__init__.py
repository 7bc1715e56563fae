"""qconv Triton kernels: one file per op (kernels, a PyTorch reference, an autograd Function).

Public functions are exported lazily: ``import qconv.kernels`` does not import triton; the first
attribute access (``qconv.kernels.rms_norm``) imports the submodule that defines it.

Several functions share their submodule's name (``rms_norm``, ``swiglu``, ``cross_entropy``). Python
binds a submodule to its package when it is first imported, by any route; this package keeps the
function under the public name instead, so ``qconv.kernels.rms_norm`` is always the function. Reach a
submodule with ``from qconv.kernels.rms_norm import ...`` or ``importlib.import_module``.
"""

from __future__ import annotations

import importlib
import sys
import types
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


class _KernelsPackage(types.ModuleType):
    """The package's module type: binding an exported name to a submodule binds its function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            exported = [n for n, m in _EXPORTS.items() if m == name]
            for other in exported:  # e.g. loading swiglu.py exports both swiglu and geglu
                if hasattr(value, other):
                    super().__setattr__(other, getattr(value, other))
            if hasattr(value, name):
                return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
