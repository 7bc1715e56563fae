"""qconv: quantize Hugging Face causal LMs once to NF4, load them fast for QLoRA.

Sub-packages: ``qconv.format`` (the on-disk format), ``qconv.converter`` (the ``qconv`` CLI),
``qconv.runtime`` (``from_pretrained``), ``qconv.kernels`` (Triton kernels).
"""

__version__ = "0.1.0"

from qconv.errors import QconvError  # noqa: E402

__all__ = ["QconvError", "__version__"]
