"""Small helpers shared by the qconv Triton kernels.

The interpreter switch (``TRITON_INTERPRET=1``) is read when a kernel is first used. ``_tanh`` is a
``@triton.jit`` helper that the kernels call from their own modules.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from qconv.errors import QconvError

#: Floating dtypes our kernels accept as inputs and produce as outputs.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Names used in error messages and benchmark tables.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def triton_config(configs: Sequence[triton.Config], interpreter: triton.Config | None = None) -> list[triton.Config]:
    """Autotune candidates: all of ``configs`` on a GPU, exactly one under the interpreter.

    ``triton.autotune`` with two or more configs fails in the interpreter ("0 active drivers"), so
    there we return ``[interpreter]`` (default: the first of ``configs``). Pick a config with large
    blocks for the interpreter: each program instance costs ~2.5 ms there.
    """
    if not configs:
        raise ValueError("triton_config needs at least one config")
    if is_interpreter():
        return [interpreter if interpreter is not None else configs[0]]
    return list(configs)


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch floating dtype."""
    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    try:
        return table[dtype]
    except KeyError:
        raise QconvError(f"qconv kernels: unsupported dtype {dtype} (expected float32, bfloat16 or float16)") from None


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(*tensors: torch.Tensor, name: str = "kernel") -> None:
    """Raise QconvError unless the tensors can run a Triton kernel here (CUDA, or CPU under the interpreter)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and is_interpreter():
            continue
        raise QconvError(
            f"qconv.kernels.{name}: tensor on {t.device} needs a CUDA device "
            "(or TRITON_INTERPRET=1 to run the kernel on the CPU)"
        )


def ensure_contiguous(fn: Callable) -> Callable:
    """Decorator: make every tensor argument contiguous before calling ``fn`` (e.g. autograd forward/backward)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


def on_tensor_device(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with its first tensor argument's GPU as the current CUDA device.

    Triton launches on the current device, and with ``device_map`` over several GPUs a layer's inputs
    live on a GPU that is not the current one (accelerate's hooks move tensors, not the device).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return wrapper


@triton.jit
def _tanh(x):
    """tanh in float32 from one exp (never overflows)."""
    z = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - z) / (1.0 + z)
    return tl.where(x >= 0, t, -t)
