"""The qconv converter: the `qconv` CLI and the pipeline it drives (source -> NF4 checkpoint).

``from qconv.converter import convert`` works without importing torch/transformers up front: ``convert`` and
``ConvertResult`` live in :mod:`qconv.converter.conversion` and are resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qconv.converter.conversion import ConvertResult, convert

__all__ = ["convert", "ConvertResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("qconv.converter.conversion"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qconv.converter' has no attribute {name!r}")
