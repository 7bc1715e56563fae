"""qconv Triton kernels: one file per op (Triton kernels, a PyTorch reference, an autograd Function).

Importing this package imports triton; the runtime imports it only when it patches a model (on CUDA, or on
the CPU under ``TRITON_INTERPRET=1``), so ``import qconv.runtime`` stays free of it. The functions are bound
here after their submodules load, so ``qconv.kernels.rms_norm`` is the function, not the file of that name.
"""

from qconv.kernels.cross_entropy import cross_entropy
from qconv.kernels.nf4_dequantize import dequantize_nf4
from qconv.kernels.nf4_matmul import matmul_nf4
from qconv.kernels.rms_norm import rms_norm
from qconv.kernels.rope import apply_rope
from qconv.kernels.swiglu import geglu, swiglu

__all__ = ["apply_rope", "cross_entropy", "dequantize_nf4", "geglu", "matmul_nf4", "rms_norm", "swiglu"]
