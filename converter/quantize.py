"""The quantize step: bitsandbytes' own ``quantize_4bit``, on the GPU when there is one.

The call is exactly the one ``bitsandbytes.nn.Params4bit`` makes when transformers quantizes on load
(same blocksize, double quant, quant type and storage), so the bytes match. Nothing is re-implemented.
"""

from __future__ import annotations

import logging

import torch

from qconv.errors import QconvError
from qconv.format import QuantSettings, pack_quant_state

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QconvError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise QconvError(f"--device: unsupported value {device!r} (choose from auto, cpu, cuda)")


class Quantizer:
    """Quantizes weights with fixed settings on one device and returns CPU tensors ready to write."""

    def __init__(self, settings: QuantSettings, device: torch.device):
        import bitsandbytes.functional as bnbf

        self._quantize_4bit = bnbf.quantize_4bit
        self.settings = settings
        self.device = device
        self.storage = getattr(torch, settings.quant_storage)

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Move (from a possibly pinned buffer) and cast, the order transformers uses: cast, then quantize."""
        if tensor.device != self.device:
            tensor = tensor.to(self.device, non_blocking=tensor.is_pinned())
        return tensor.to(dtype)

    def quantize(self, weight_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """All tensors for one quantized weight (packed data + quant state) by full name, on the quantizing
        device (the shard writer copies device tensors into its pinned host blocks)."""
        s = self.settings
        packed, state = self._quantize_4bit(
            weight.contiguous(),
            blocksize=s.blocksize,
            compress_statistics=s.double_quant,
            quant_type=s.quant_type,
            quant_storage=self.storage,
        )
        return pack_quant_state(weight_name, packed, state)
