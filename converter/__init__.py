"""The qconv converter: the `qconv` CLI and the pipeline it drives (source -> NF4 checkpoint).

``from qconv.converter import convert`` works without importing torch/transformers up front: the name is
resolved lazily on first use. (The function lives in the submodule of the same name, which is itself
callable with the same arguments, so either object the name resolves to converts.)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["convert", "ConvertResult"]


def __getattr__(name: str) -> Any:
    if name in ("convert", "ConvertResult"):
        module = importlib.import_module("qconv.converter.convert")
        globals()["convert"] = module.convert  # the import system set the submodule here; prefer the function
        return getattr(module, name)
    raise AttributeError(f"module 'qconv.converter' has no attribute {name!r}")
