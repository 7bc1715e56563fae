"""The qconv runtime: load pre-quantized NF4 checkpoints straight onto the device.

``model, tokenizer = qconv.runtime.from_pretrained("org/model-bnb-4bit")``. Importing this package is
cheap (no torch, transformers or bitsandbytes until ``from_pretrained`` runs).
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_pretrained"]


def from_pretrained(name_or_path, **kwargs: Any):
    """Load a bitsandbytes 4-bit checkpoint and its tokenizer; see :func:`qconv.runtime.loader.from_pretrained`."""
    from qconv.runtime.loader import from_pretrained as _load

    return _load(name_or_path, **kwargs)
